"""fastattn.patch_model and fastattn.sdpa_override on models built from torch modules."""

import pytest
import torch
from torch import nn

import fastattn
from fastattn.nn import MultiheadAttention

DT = torch.float64


class Tagger(nn.Module):
    """An encoder and a bare attention layer side by side, like a small user model."""

    def __init__(self, d_model=24, nhead=4, layers=2, batch_first=True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=40, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)
        self.pool = nn.MultiheadAttention(d_model, 2, batch_first=batch_first)
        self.head = nn.Linear(d_model, 3)

    def forward(self, x, key_padding_mask=None, mask=None):
        h = self.encoder(x, mask=mask, src_key_padding_mask=key_padding_mask)
        pooled, _ = self.pool(h[:, :1], h, h, key_padding_mask=key_padding_mask, need_weights=False)
        return self.head(pooled)


def count_attention_calls(monkeypatch):
    """Count fastattn.attention calls (a hook on the modules would itself disable torch's fast path)."""
    calls = []
    real = fastattn.attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastattn, "attention", counting)
    return calls


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "kpm-right"])
@pytest.mark.parametrize("mode", ["eval-no-grad", "eval-grad", "train"])
def test_patch_encoder_same_outputs(mode, padding, monkeypatch):
    model = Tagger().to(DT)
    model.train(mode == "train")
    x = torch.randn(3, 9, 24, dtype=DT)
    kpm = (torch.arange(9)[None] >= torch.tensor([9, 6, 4])[:, None]) if padding else None
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        before = model(x, kpm)
        replaced = fastattn.patch_model(model)
        calls = count_attention_calls(monkeypatch)
        after = model(x, kpm)
    assert replaced == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "pool"]
    assert all(isinstance(model.get_submodule(name), MultiheadAttention) for name in replaced)
    assert model.training == (mode == "train")
    assert len(calls) == 3, "torch's encoder fast path bypassed the patched attention"
    torch.testing.assert_close(after, before)
    if mode != "eval-no-grad":
        after.sum().backward()
        assert model.encoder.layers[0].self_attn.in_proj_weight.grad is not None


def test_patch_causal_mask_and_seq_first():
    model = Tagger(batch_first=False).to(DT).eval()
    # Tagger slices h[:, :1] assuming batch-first; run only the encoder here.
    encoder = model.encoder
    x = torch.randn(8, 2, 24, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(8, dtype=DT)
    before = encoder(x, mask=mask, is_causal=True)
    assert fastattn.patch_model(encoder) == ["layers.0.self_attn", "layers.1.self_attn"]
    torch.testing.assert_close(encoder(x, mask=mask, is_causal=True), before)


def test_patch_keeps_device_dtype_frozen_and_shared():
    shared = nn.MultiheadAttention(8, 2, dtype=torch.float16)
    shared.in_proj_weight.requires_grad_(False)
    model = nn.ModuleDict({"a": shared, "b": shared})
    assert sorted(fastattn.patch_model(model)) == ["a", "b"]
    assert model["a"] is model["b"]
    assert model["a"].in_proj_weight.dtype == torch.float16
    assert not model["a"].in_proj_weight.requires_grad and model["a"].out_proj.weight.requires_grad
    assert fastattn.patch_model(model) == []  # nothing left to replace


def test_patch_model_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        fastattn.patch_model("not a module")
    with pytest.raises(TypeError, match="from_torch"):
        fastattn.patch_model(nn.MultiheadAttention(8, 2))


def test_sdpa_override_routes_and_restores():
    original = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=DT) for _ in range(3))
    expected = original(q, k, v, is_causal=True)
    with fastattn.sdpa_override():
        assert torch.nn.functional.scaled_dot_product_attention is fastattn.scaled_dot_product_attention
        # torch's own MultiheadAttention looks SDPA up in torch.nn.functional as well
        torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), expected)
    assert torch.nn.functional.scaled_dot_product_attention is original
    with pytest.raises(RuntimeError, match="boom"), fastattn.sdpa_override():
        raise RuntimeError("boom")
    assert torch.nn.functional.scaled_dot_product_attention is original


def test_sdpa_override_reaches_torch_multihead_attention():
    mha = nn.MultiheadAttention(12, 3, batch_first=True, dtype=DT).eval()
    x = torch.randn(2, 6, 12, dtype=DT)
    seen = []
    real = fastattn.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    expected, _ = mha(x, x, x, need_weights=False)
    with fastattn.sdpa_override():
        torch.nn.functional.scaled_dot_product_attention = spy  # observe the calls made inside the block
        got, _ = mha(x, x, x, need_weights=False)
    assert seen, "torch.nn.MultiheadAttention did not call the overridden SDPA"
    torch.testing.assert_close(got, expected)


def test_patch_model_without_multihead_attention_warns():
    with pytest.warns(UserWarning, match="no torch.nn.MultiheadAttention in Sequential.*sdpa_override"):
        assert fastattn.patch_model(nn.Sequential(nn.Linear(4, 4))) == []


def test_patch_model_on_a_hugging_face_model_points_at_register():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2Model(config)
    with pytest.raises(ValueError, match=r"Hugging Face .*integrations\.transformers\.register\(\).*'fastattn'"):
        fastattn.patch_model(model)


def test_sdpa_override_does_not_reach_the_fused_inference_path():
    """As documented: torch's fused inference fast path of nn.MultiheadAttention and
    nn.TransformerEncoderLayer (eval, no_grad) never calls F.scaled_dot_product_attention; with
    gradients recorded (the regular path) they do."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True).eval()
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    seen = []
    real = fastattn.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    with fastattn.sdpa_override():
        torch.nn.functional.scaled_dot_product_attention = spy
        with torch.no_grad():
            layer(x)
            mha(x, x, x, need_weights=False)
        assert not seen
        mha(x, x, x, need_weights=False)
        assert len(seen) == 1


def test_patched_encoder_returns_values_at_padded_positions():
    """As documented: the nested-tensor path gives 0 at padded positions, the patched encoder does not;
    every other position is unchanged."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        before = encoder(x, src_key_padding_mask=padding)
        fastattn.patch_model(encoder)
        after = encoder(x, src_key_padding_mask=padding)
    assert torch.all(before[padding] == 0) and after[padding].abs().sum() > 0
    torch.testing.assert_close(after[~padding], before[~padding], rtol=1e-4, atol=1e-5)
