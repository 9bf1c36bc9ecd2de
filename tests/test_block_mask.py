"""fastattn.BlockMask: tile classification, tile lists, element-mask sources, validation, plot."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fastattn import BlockMask
from fastattn.block_mask import EMPTY, FULL, PARTIAL, layout_from_kv_lists


def expected_layout(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Tile codes of a (B, H, Lq, Lk) bool mask, tile by tile in Python (independent of the library)."""
    B, H, Lq, Lk = dense.shape
    out = torch.empty(B, H, math.ceil(Lq / bq), math.ceil(Lk / bk), dtype=torch.int8)
    for qb in range(out.shape[2]):
        for kb in range(out.shape[3]):
            tile = dense[:, :, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            count = tile.sum(dim=(2, 3))
            out[:, :, qb, kb] = torch.where(count == tile[0, 0].numel(), FULL, torch.where(count == 0, EMPTY, PARTIAL))
    return out


def check_lists(bm: BlockMask) -> None:
    """kv_lists / q_lists agree with the layout: counts, increasing indices, round trip."""
    layout = bm.layout
    kv_num, kv_idx, full_kv_num, full_kv_idx = bm.kv_lists
    q_num, q_idx, full_q_num, full_q_idx = bm.q_lists
    for t in (kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx):
        assert t.dtype == torch.int32
    torch.testing.assert_close(kv_num, (layout == PARTIAL).sum(-1, dtype=torch.int32))
    torch.testing.assert_close(full_kv_num, (layout == FULL).sum(-1, dtype=torch.int32))
    torch.testing.assert_close(q_num, (layout == PARTIAL).sum(-2, dtype=torch.int32))
    torch.testing.assert_close(full_q_num, (layout == FULL).sum(-2, dtype=torch.int32))
    nkb = bm.num_blocks[1]
    rebuilt = layout_from_kv_lists(kv_num, kv_idx, full_kv_num, full_kv_idx, nkb)
    torch.testing.assert_close(rebuilt, layout)
    rebuilt_t = layout_from_kv_lists(q_num, q_idx, full_q_num, full_q_idx, bm.num_blocks[0])
    torch.testing.assert_close(rebuilt_t, layout.transpose(-1, -2))
    for num, idx in ((kv_num, kv_idx), (full_kv_num, full_kv_idx), (q_num, q_idx), (full_q_num, full_q_idx)):
        valid = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
        steps = idx[..., 1:] - idx[..., :-1]
        assert bool((steps > 0)[valid[..., 1:]].all()), "indices must increase within a row"


DENSE_CASES = [
    pytest.param(1, 1, 97, 97, 16, id="L97-B16"),
    pytest.param(2, 3, 130, 130, (32, 16), id="B2-H3-L130-B32x16"),
    pytest.param(1, 2, 17, 45, (8, 5), id="H2-Lq17-Lk45-B8x5"),
    pytest.param(2, 1, 33, 7, (4, 8), id="B2-Lq33-Lk7-B4x8"),
]


@pytest.mark.parametrize("B, H, Lq, Lk, block_size", DENSE_CASES)
@pytest.mark.parametrize("kind", ["random", "band"])
def test_from_dense_classifies_tiles(B, H, Lq, Lk, block_size, kind):
    if kind == "random":
        dense = torch.rand(B, H, Lq, Lk) > 0.3
    else:  # large full and empty regions, so every code appears
        i = torch.arange(Lq)[:, None]
        j = torch.arange(Lk)[None, :]
        dense = ((j - i).abs() <= 10).expand(B, H, Lq, Lk).clone()
        dense[..., :3] = True
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    bm = BlockMask.from_dense(dense, block_size=block_size)
    assert bm.block_size == (bq, bk) and bm.seq_lens == (Lq, Lk) and bm.shape == (B, H, Lq, Lk)
    torch.testing.assert_close(bm.layout, expected_layout(dense, bq, bk))
    assert torch.equal(bm.to_dense(), dense)
    assert bm.density == pytest.approx(float((bm.layout != EMPTY).float().mean()))
    check_lists(bm)


def test_from_dense_accepts_2d_and_3d():
    dense = torch.rand(3, 20, 11) > 0.5
    bm3 = BlockMask.from_dense(dense, 4)
    assert bm3.shape == (1, 3, 20, 11)
    assert torch.equal(bm3.to_dense()[0], dense)
    bm2 = BlockMask.from_dense(dense[0], 4)
    assert bm2.shape == (1, 1, 20, 11)
    assert torch.equal(bm2.to_dense()[0, 0], dense[0])


@pytest.mark.parametrize(
    "nqb, nkb, block_size, seq_lens",
    [
        pytest.param(7, 7, 16, (97, 97), id="L97-B16"),
        pytest.param(5, 9, (32, 16), (130, 130), id="L130-B32x16"),
        pytest.param(3, 4, (8, 8), None, id="L24x32-B8"),
    ],
)
def test_from_layout(nqb, nkb, block_size, seq_lens):
    tiles = torch.rand(2, nqb, nkb) > 0.5
    bm = BlockMask.from_layout(tiles, block_size=block_size, seq_lens=seq_lens)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    Lq, Lk = seq_lens or (nqb * bq, nkb * bk)
    dense = tiles.repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :Lq, :Lk][None]
    assert torch.equal(bm.to_dense(), dense)
    assert set(bm.layout.unique().tolist()) <= {EMPTY, FULL}
    assert bm.element_mask is None and bm.num_partial == 0
    check_lists(bm)


def test_partial_masks_source_round_trips():
    dense = torch.rand(2, 1, 37, 29) > 0.5
    dense[0, 0, :8, :8] = True
    dense[1, 0, 8:16] = False
    ref = BlockMask.from_dense(dense, (8, 8))
    B, H, nqb, nkb = ref.layout.shape
    padded = torch.zeros(B, H, nqb * 8, nkb * 8, dtype=torch.bool)
    padded[..., :37, :29] = dense
    tiles = padded.view(B, H, nqb, 8, nkb, 8).permute(0, 1, 2, 4, 3, 5)
    bm = BlockMask(layout=ref.layout, seq_lens=(37, 29), block_size=8, partial_masks=tiles[ref.layout == PARTIAL])
    assert torch.equal(bm.to_dense(), dense)
    # The dense element mask agrees with the mask on every tile that is not empty.
    visible_tiles = (ref.layout != EMPTY).repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :37, :29]
    assert torch.equal(bm.element_mask & visible_tiles, dense)
    ids = bm.partial_tile_ids
    assert ids.dtype == torch.int32
    assert torch.equal(ids[ref.layout == PARTIAL], torch.arange(bm.num_partial, dtype=torch.int32))
    assert bool((ids[ref.layout != PARTIAL] == -1).all())


@pytest.mark.parametrize("window", [(3, 0), (None, 0), (2, 5), (0, None)], ids=["L3-R0", "causal", "L2-R5", "L0-Rinf"])
def test_window_source(window):
    Lq, Lk = 23, 31
    i = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    left, right = window
    dense = torch.ones(Lq, Lk, dtype=torch.bool)
    if left is not None:
        dense &= j >= i - left
    if right is not None:
        dense &= j <= i + right
    layout = BlockMask.from_dense(dense, (4, 8)).layout
    bm = BlockMask(layout=layout, seq_lens=(Lq, Lk), block_size=(4, 8), window=window)
    assert bm.window == window
    assert torch.equal(bm.to_dense()[0, 0], dense)
    assert bm.element_mask.shape == (1, 1, Lq, Lk)


def test_to_keeps_the_element_mask_source():
    dense = torch.rand(19, 23) > 0.5
    bm = BlockMask.from_dense(dense, 4).to("cpu")
    assert torch.equal(bm.to_dense()[0, 0], dense)
    w = BlockMask(layout=BlockMask.from_dense(torch.ones(9, 9, dtype=torch.bool).tril(), 4).layout,
                  seq_lens=(9, 9), block_size=4, window=(None, 0)).to(torch.device("cpu"))
    assert w.window == (None, 0)
    assert torch.equal(w.to_dense()[0, 0], torch.ones(9, 9, dtype=torch.bool).tril())


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "block_size", [0, -4, (16,), (16, 0), (8, 8, 8), 2.5, True, "16"], ids=["0", "neg", "one", "zero-k", "three", "float", "bool", "str"]
)
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        BlockMask.from_dense(torch.ones(8, 8, dtype=torch.bool), block_size)
    with pytest.raises(ValueError, match="block_size"):
        BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool), block_size)


def test_bad_dtypes():
    with pytest.raises(TypeError, match="mask must be a bool"):
        BlockMask.from_dense(torch.ones(8, 8), 4)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        BlockMask.from_dense([[True]], 4)
    with pytest.raises(TypeError, match="layout must be a bool"):
        BlockMask.from_layout(torch.ones(2, 2, dtype=torch.int8), 4)
    with pytest.raises(TypeError, match="layout must be an int8"):
        BlockMask(layout=torch.ones(1, 1, 2, 2, dtype=torch.int32), seq_lens=(8, 8), block_size=4)
    layout = torch.full((1, 1, 2, 2), PARTIAL, dtype=torch.int8)
    with pytest.raises(TypeError, match="element_mask must be a bool"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4, element_mask=torch.ones(8, 8))
    with pytest.raises(TypeError, match="partial_masks must be a bool"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4, partial_masks=torch.ones(4, 4, 4))


def test_bad_shapes_and_lengths():
    with pytest.raises(ValueError, match="mask must have 2 to 4 dimensions"):
        BlockMask.from_dense(torch.ones(8, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="seq_lens"):
        BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool), 4, seq_lens=(9, 8))
    with pytest.raises(ValueError, match="seq_lens"):
        BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool), 4, seq_lens=(8,))
    with pytest.raises(ValueError, match="tiles, expected"):
        BlockMask(layout=torch.zeros(1, 1, 2, 3, dtype=torch.int8), seq_lens=(8, 8), block_size=4)
    with pytest.raises(ValueError, match="layout must be 4-D"):
        BlockMask(layout=torch.zeros(2, 2, dtype=torch.int8), seq_lens=(8, 8), block_size=4)
    with pytest.raises(ValueError, match="layout codes"):
        BlockMask(layout=torch.full((1, 1, 2, 2), 3, dtype=torch.int8), seq_lens=(8, 8), block_size=4)
    layout = torch.full((1, 1, 2, 2), PARTIAL, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs element_mask, window or partial_masks"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4)
    with pytest.raises(ValueError, match="element_mask of shape"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4, element_mask=torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="partial_masks must have shape"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4, partial_masks=torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most one"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4, window=(1, 0),
                  element_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="window left"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4, window=(-1, 0))
    with pytest.raises(TypeError, match="window right"):
        BlockMask(layout=layout, seq_lens=(8, 8), block_size=4, window=(1, 0.5))


def test_shared_partial_blocks_and_their_validation():
    layout = torch.tensor([[PARTIAL, FULL], [EMPTY, PARTIAL]], dtype=torch.int8)[None, None]
    block = torch.tensor([[True, False], [True, True]])[None]
    ids = torch.tensor([[0, -1], [-1, 0]], dtype=torch.int32)[None, None]
    bm = BlockMask(layout=layout, seq_lens=(4, 4), block_size=2, partial_masks=block, partial_tile_ids=ids)
    dense = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(bm.to_dense()[0, 0], dense)
    assert torch.equal(bm.to("cpu").to_dense()[0, 0], dense)
    with pytest.raises(TypeError, match="partial_tile_ids must be an int32"):
        BlockMask(layout=layout, seq_lens=(4, 4), block_size=2, partial_masks=block, partial_tile_ids=ids.long())
    with pytest.raises(ValueError, match=r"partial_tile_ids must lie in \[0, 1\)"):
        BlockMask(layout=layout, seq_lens=(4, 4), block_size=2, partial_masks=block, partial_tile_ids=ids + 1)
    with pytest.raises(ValueError, match="-1 on tiles that are not partial"):
        BlockMask(layout=layout, seq_lens=(4, 4), block_size=2, partial_masks=block, partial_tile_ids=ids.abs())
    with pytest.raises(ValueError, match="partial_tile_ids must have layout's shape"):
        BlockMask(layout=layout, seq_lens=(4, 4), block_size=2, partial_masks=block, partial_tile_ids=ids[0])
    with pytest.raises(ValueError, match="needs partial_masks"):
        BlockMask(layout=layout, seq_lens=(4, 4), block_size=2, window=(0, 0), partial_tile_ids=ids)


# ----------------------------------------------------------------------------------------- plot
def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    bm = BlockMask.from_dense(torch.rand(2, 40, 50) > 0.5, 8)
    path = tmp_path / "mask.png"
    figure = bm.plot(path, b=0, h=1)
    assert path.stat().st_size > 1000
    assert len(figure.axes) == 2  # tiles and elements
    assert len(bm.plot(show_elements=False).axes) == 1
    with pytest.raises(ValueError, match="h must lie"):
        bm.plot(h=2)


def test_plot_without_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    bm = BlockMask.from_dense(torch.ones(8, 8, dtype=torch.bool), 4)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        bm.plot()
