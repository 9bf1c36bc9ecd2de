"""Attention maps: captured probabilities are the exact softmax, layers and heads are selected, plots are written."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastattn
from fastattn import analysis


def _softmax_by_hand(q, k, *, causal=False, window=None, top_left=False):
    """Independent of fastattn: masked softmax of q k^T / sqrt(D) in float64, GQA by repeating k."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    Lq, Lk = s.shape[-2:]
    i = torch.arange(Lq).view(-1, 1)
    j = torch.arange(Lk).view(1, -1)
    diag = i if top_left else i + (Lk - Lq)
    visible = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        visible &= j <= diag
    if window is not None:
        visible &= (j >= diag - window[0]) & (j <= diag + window[1])
    return torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)


@pytest.mark.parametrize(
    "B, Hq, Hkv, Lq, Lk, D, kwargs",
    [
        pytest.param(2, 4, 2, 17, 23, 16, dict(causal=True), id="B2-H4-Hkv2-Lq17-Lk23-D16-causal"),
        pytest.param(1, 3, 3, 29, 29, 8, dict(window=(5, 2)), id="B1-H3-L29-D8-window5_2"),
        pytest.param(1, 2, 1, 13, 9, 40, dict(), id="B1-H2-Hkv1-Lq13-Lk9-D40-dense"),
    ],
)
def test_captured_probabilities_are_the_softmax(B, Hq, Hkv, Lq, Lk, D, kwargs):
    q = torch.randn(B, Hq, Lq, D)
    k = torch.randn(B, Hkv, Lk, D)
    v = torch.randn(B, Hkv, Lk, D)
    with analysis.capture_attention() as capture:
        out = fastattn.attention(q, k, v, **kwargs)
    assert len(capture.records) == 1
    p = capture.records[0].probabilities()
    assert p.shape == (B, Hq, Lq, Lk)
    expected = _softmax_by_hand(q, k, **kwargs)
    torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=1e-5)
    # The probabilities are the ones the call used: P @ V is its output.
    v_rep = v.repeat_interleave(Hq // Hkv, dim=1)
    torch.testing.assert_close(p @ v_rep, out, atol=1e-5, rtol=1e-5)


def test_sdpa_calls_are_captured_with_top_left_causal():
    q, k, v = torch.randn(1, 2, 11, 8), torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    with analysis.capture_attention() as capture:
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    p = capture.records[0].probabilities()
    torch.testing.assert_close(p.double(), _softmax_by_hand(q, k, causal=True, top_left=True), atol=1e-6, rtol=1e-5)


def test_capture_restores_the_dispatch_function():
    import fastattn.api
    import fastattn.autograd

    original = fastattn.autograd.run
    with analysis.capture_attention():
        assert fastattn.api.run is not original
    assert fastattn.api.run is original and fastattn.autograd.run is original


def test_layers_by_position_and_by_module_name():
    torch.manual_seed(0)
    model = analysis.ExampleModel(dim=32, heads=2, layers=3, max_len=64).eval()
    tokens = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        plain = model(tokens)
        with analysis.capture_attention(model, layers=[1]) as by_position:
            captured = model(tokens)
        with analysis.capture_attention(model, layers=["blocks.2"]) as by_name:
            model(tokens)
        with analysis.capture_attention(model) as every:
            model(tokens)
    torch.testing.assert_close(captured, plain, atol=0, rtol=0)
    assert [(r.layer, r.module) for r in by_position.records] == [(1, "blocks.1")]
    assert [(r.layer, r.module) for r in by_name.records] == [(2, "blocks.2")]
    assert [r.module for r in every.records] == ["blocks.0", "blocks.1", "blocks.2"]
    assert every.records[1].probabilities().shape == (2, 2, 21, 21)
    torch.testing.assert_close(every.records[1].probabilities(), by_position.records[0].probabilities())


def test_head_statistics_on_hand_made_maps():
    L = 8
    p = torch.zeros(1, 3, L, L)
    p[0, 0] = 1.0 / L  # uniform over 8 keys
    p[0, 1] = torch.eye(L)  # each query on its own position
    p[0, 2, :, 0] = 1.0  # everyone on key 0: mean distance = mean(i) = 3.5
    stats = analysis.head_statistics(p)
    assert stats[0]["entropy"] == pytest.approx(math.log(L))
    assert stats[0]["normalized_entropy"] == pytest.approx(1.0)
    assert stats[0]["mean_distance"] == pytest.approx(sum(abs(i - j) for i in range(L) for j in range(L)) / L / L)
    assert stats[1]["entropy"] == pytest.approx(0.0) and stats[1]["mean_distance"] == pytest.approx(0.0)
    assert stats[2]["mean_distance"] == pytest.approx(3.5)


def test_head_statistics_skip_rows_that_see_nothing():
    p = torch.zeros(1, 1, 3, 4)
    p[0, 0, 0, 1] = 1.0  # row 0 looks 1 back... rows 1, 2 see nothing
    stats = analysis.head_statistics(p, offset=0)
    assert stats[0]["mean_distance"] == pytest.approx(1.0)
    assert stats[0]["entropy"] == pytest.approx(0.0)


def test_plot_and_cli(tmp_path):
    q = torch.randn(1, 3, 12, 8)
    with analysis.capture_attention() as capture:
        fastattn.attention(q, q, q, causal=True)
        fastattn.attention(q, q, q)
    path = analysis.plot_attention_maps(capture.records, tmp_path / "maps.png", heads=[0, 2])
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="heads"):
        analysis.plot_attention_maps(capture.records, tmp_path / "bad.png", heads=[3])

    from fastattn.cli import main

    out = tmp_path / "cli"
    assert main(["attention-map", "--seq-len", "19", "--num-layers", "2", "--layers", "1", "--causal",
                 "--out", str(out)]) == 0
    stats = json.loads((out / "attention_stats.json").read_text())
    assert [(s["layer"], s["module"], s["head"]) for s in stats] == [(1, "blocks.1", h) for h in range(4)]
    assert (out / "attention_maps.png").stat().st_size > 1000
    assert main(["attention-map", "--layers", "5", "--out", str(out)]) == 2


def test_capture_rejects_bad_arguments():
    with pytest.raises(TypeError, match="layers"):
        analysis.capture_attention(layers="blocks.0")
    with pytest.raises(ValueError, match="model"):
        analysis.capture_attention(layers=["blocks.0"])
    with pytest.raises(TypeError, match="model"):
        analysis.capture_attention(model=3)


def test_fastattn_nn_modules_are_captured():
    """Probabilities captured inside fastattn.nn.MultiheadAttention equal the weights torch's own
    MultiheadAttention returns for the same parameters."""
    torch.manual_seed(0)
    ours = fastattn.nn.MultiheadAttention(24, 3, batch_first=True).eval()
    theirs = torch.nn.MultiheadAttention(24, 3, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, 24)
    causal = torch.triu(torch.ones(13, 13, dtype=torch.bool), diagonal=1)  # True = not allowed (torch polarity)
    with torch.no_grad(), analysis.capture_attention(ours) as capture:
        ours(x, x, x, attn_mask=causal, need_weights=False)
    with torch.no_grad():
        _, weights = theirs(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False)
    assert len(capture.records) == 1 and capture.records[0].module == "<model>"
    torch.testing.assert_close(capture.records[0].probabilities(), weights, atol=1e-5, rtol=1e-4)


def test_attention_figure_has_colour_bar_ticks_and_explained_labels():
    q = torch.randn(1, 2, 12, 8)
    with analysis.capture_attention() as capture:
        fastattn.attention(q, q, q, causal=True)
    fig = analysis.attention_figure(capture.records)
    try:
        fig.canvas.draw()
        panels = [ax for ax in fig.axes if ax.get_images()]
        colour_bars = [ax for ax in fig.axes if not ax.get_images()]
        assert len(panels) == 2 and len(colour_bars) == 1
        assert "attention probability" in colour_bars[0].get_ylabel()
        for ax in panels:
            assert len(ax.get_xticks()) >= 2 and len(ax.get_yticks()) >= 2
            assert "entropy" in ax.get_title() and "dist" in ax.get_title() and "H=" not in ax.get_title()
        footnote = fig.get_supxlabel()
        assert "entropy" in footnote and "nats" in footnote and "dist" in footnote
        assert panels[0].get_images()[0].get_clim() == panels[1].get_images()[0].get_clim()  # one shared scale
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_attention_map_cli_without_matplotlib(tmp_path, monkeypatch, capsys):
    import sys

    from fastattn.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "maps"
    assert main(["attention-map", "--seq-len", "9", "--num-layers", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "entropy" in printed and printed.count("matplotlib is not installed") == 1
    assert len(json.loads((out / "attention_stats.json").read_text())) == 4
    assert not (out / "attention_maps.png").exists()
    assert main(["attention-map", "--heads", "7", "--out", str(out)]) == 2
