"""Split-KV decoding in the Triton forward: key-range splits merged by lse, GQA groups per program.

The launcher splits the key range when the grid would underfill the GPU; here the split count is
forced (``num_splits``) so the interpreter runs the split path on tiny shapes, and each case is
checked against the reference in values and lse: Lk not a multiple of the split, splits that see
no key, GQA groups packed into one program, every forward feature.
"""

from __future__ import annotations

import pytest
import torch

from fastattn import BlockMask, reference
from fastattn.backends.triton import ensure_kernels_importable

from .helpers import make_qkv, op_args
from .tolerance import assert_close_to_reference, high_precision

pytest.importorskip("triton")
ensure_kernels_importable()

from fastattn.triton_kernels import attention_fwd as fwd  # noqa: E402

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32 = torch.float16, torch.float32


@pytest.fixture(autouse=True)
def _pinned_config(monkeypatch):
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")


def launch(fwd_args: list, num_splits: int | None, block_counter=None):
    """``attention_fwd`` on the op arguments ``op_args`` gives (FWD_SCHEMA order)."""
    (q, k, v, attn_mask, alibi, klen, qlen, kv_num, kv_idx, full_num, full_idx, partial, tile_ids,
     bq, bk, scale, left, right, softcap, dropout_p, seed) = fwd_args
    masks = fwd.MaskArgs(
        attn_mask=attn_mask, alibi_slopes=alibi, key_lengths=klen, query_lengths=qlen,
        kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_num, full_kv_indices=full_idx,
        partial_masks=partial, partial_tile_ids=tile_ids, block_size_q=bq, block_size_k=bk,
        window_left=left, window_right=right, softcap=softcap,
    )
    return fwd.attention_fwd(q, k, v, masks, scale=scale, dropout_p=dropout_p, seed=seed, num_splits=num_splits,
                             block_counter=block_counter)


def check_split(q, k, v, num_splits: int, **kwargs):
    """The split forward's out and lse against the reference (float64/32 and in q's precision)."""
    seed = 1234
    fwd_args, _ = op_args(q, k, v, backend="triton", seed=seed, **kwargs)
    out, lse = launch(fwd_args, num_splits)
    if kwargs.get("dropout_p", 0) > 0:
        B, Hq, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        kwargs["dropout_keep"] = fwd.dropout_keep_mask(B, Hq, Lq, Lk, kwargs["dropout_p"], seed, q.device)
    hp = high_precision(q.dtype)

    def cast(t):
        return t.to(hp) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32 else t

    ref32, lse32 = reference.attention(*(t.to(hp) for t in (q, k, v)), return_lse=True,
                                       **{key: cast(val) for key, val in kwargs.items()})
    ref_lp, lse_lp = reference.attention(q, k, v, return_lse=True, **kwargs)
    assert_close_to_reference("out", out, ref32, ref_lp)
    hidden = torch.isinf(lse32)
    assert torch.equal(torch.isinf(lse), hidden) and bool((lse[hidden] < 0).all()), "rows that see nothing"
    assert_close_to_reference("lse", lse[~hidden], lse32[~hidden].float(), lse_lp[~hidden].float(), atol_floor=1e-4)
    return out, lse


def qkv(B, Hq, Hkv, Lq, Lk, D=16, dtype=F32):
    return make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device=DEVICE, requires_grad=False)


@pytest.mark.parametrize(
    "B, Hq, Hkv, Lq, Lk, D, dtype, splits, kwargs",
    [
        pytest.param(1, 2, 2, 1, 130, 16, F32, 3, {}, id="Lq1-Lk130-split3"),
        pytest.param(2, 8, 2, 1, 97, 40, F16, 4, {"causal": True}, id="Lq1-Lk97-gqa4-split4-causal-fp16"),
        pytest.param(1, 4, 1, 1, 20, 16, F32, 7, {}, id="Lq1-Lk20-mqa-split7-most-splits-empty"),
        pytest.param(1, 8, 2, 5, 97, 16, F32, 3, {"causal": True}, id="Lq5-Lk97-gqa4-split3-spec-verify"),
        pytest.param(1, 4, 1, 16, 257, 16, F16, 5, {"window": (40, 0)}, id="Lq16-Lk257-mqa-split5-window"),
        pytest.param(1, 3, 1, 3, 70, 64, F32, 2, {"window": (-1, 2)}, id="Lq3-Lk70-gqa3-split2-right2"),
        pytest.param(1, 2, 1, 17, 130, 16, F32, 3, {"causal": True}, id="Lq17-Lk130-unpacked-split3"),
        pytest.param(1, 2, 2, 40, 33, 16, F32, 2, {"causal": True}, id="Lq40-Lk33-split2-rows-see-nothing"),
    ],
)
def test_split_matches_reference(B, Hq, Hkv, Lq, Lk, D, dtype, splits, kwargs):
    check_split(*qkv(B, Hq, Hkv, Lq, Lk, D, dtype), splits, **kwargs)


def test_split_with_lengths_including_an_empty_cache():
    q, k, v = qkv(3, 4, 2, 2, 97)
    key_lengths = torch.tensor([97, 0, 41], dtype=torch.int32, device=DEVICE)
    query_lengths = torch.tensor([2, 2, 1], dtype=torch.int32, device=DEVICE)
    out, lse = check_split(q, k, v, 4, key_lengths=key_lengths, query_lengths=query_lengths, causal=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == float("-inf")).all())


def test_split_with_alibi_softcap_and_float_mask_gqa():
    q, k, v = qkv(2, 4, 2, 3, 75, dtype=F16)
    q.mul_(3)
    slopes = torch.rand(2, 4, device=DEVICE) * 0.5
    mask = torch.randn(2, 4, 3, 75, device=DEVICE, dtype=F16)
    check_split(q, k, v, 3, alibi_slopes=slopes, softcap=2.0, attn_mask=mask)


def test_split_with_bool_mask_and_a_fully_masked_row():
    q, k, v = qkv(1, 4, 1, 4, 90)
    mask = torch.rand(1, 4, 4, 90, device=DEVICE) > 0.5
    mask[0, 1, 2] = False
    out, lse = check_split(q, k, v, 4, attn_mask=mask)
    assert torch.equal(out[0, 1, 2], torch.zeros_like(out[0, 1, 2]))


def test_split_with_block_mask():
    q, k, v = qkv(1, 2, 1, 40, 150)
    i, j = torch.arange(40, device=DEVICE)[:, None], torch.arange(150, device=DEVICE)[None, :]
    mask = BlockMask.from_dense((j < 20) | ((j - 100 - i).abs() < 12) | (j > 140), block_size=16)
    assert (mask.layout == 0).any() and (mask.layout == 1).any() and (mask.layout == 2).any()
    check_split(q, k, v, 3, block_mask=mask)


def test_split_with_dropout_keeps_the_pattern():
    q, k, v = qkv(1, 4, 2, 2, 90)
    out, _ = check_split(q, k, v, 3, dropout_p=0.3)
    fwd_args, _ = op_args(q, k, v, backend="triton", seed=1234, dropout_p=0.3)
    whole, _ = launch(fwd_args, 1)
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-5)


def test_splits_partition_the_visited_key_blocks():
    # Every key block visited once across splits; with more splits than blocks, some visit none.
    q, k, v = qkv(1, 2, 2, 1, 100)
    fwd_args, _ = op_args(q, k, v, backend="triton")
    counters = {}
    for splits in (1, 6):
        counter = torch.full((splits * 2,), -1, dtype=torch.int32, device=DEVICE)
        launch(fwd_args, splits, block_counter=counter)
        counters[splits] = counter.view(splits, 2)
    blocks = -(-100 // fwd.fwd_tiles(q, v)[1])
    assert counters[1].tolist() == [[blocks, blocks]]
    assert counters[6].sum(0).tolist() == [blocks, blocks]
    assert (counters[6] == 0).any() and bool((counters[6] >= 0).all())


def test_decoding_packs_a_gqa_group_into_one_program():
    # Hq = 8 query heads over Hkv = 2 kv heads: 2 programs (one per kv head) per split, not 8.
    q, k, v = qkv(1, 8, 2, 1, 70)
    counter = torch.full((64,), -1, dtype=torch.int32, device=DEVICE)
    fwd_args, _ = op_args(q, k, v, backend="triton")
    launch(fwd_args, 3, block_counter=counter)
    assert bool((counter[:6] >= 0).all()) and bool((counter[6:] == -1).all())
    blocks = -(-70 // fwd.fwd_tiles(q, v)[1])
    assert counter[:6].view(3, 2).sum(0).tolist() == [blocks, blocks]


@pytest.mark.parametrize(
    "programs, key_blocks, sms, want",
    [
        pytest.param(8, 512, 132, 33, id="decode-B1-Hkv8-Lk32k"),
        pytest.param(32, 512, 132, 9, id="decode-B1-Hq32-unpacked"),
        pytest.param(8, 20, 132, 5, id="few-key-blocks"),
        pytest.param(8, 3, 132, 1, id="too-few-key-blocks"),
        pytest.param(264, 512, 132, 1, id="grid-fills-the-gpu"),
        pytest.param(1, 10**6, 132, 128, id="capped"),
        pytest.param(8, 512, 0, 1, id="no-gpu"),
    ],
)
def test_choose_num_splits(programs, key_blocks, sms, want):
    assert fwd.choose_num_splits(programs, key_blocks, sms) == want


def test_num_splits_must_be_positive():
    q, k, v = qkv(1, 2, 2, 1, 40)
    with pytest.raises(ValueError, match="num_splits"):
        fwd.attention_fwd(q, k, v, scale=0.25, num_splits=0)


def test_automatic_split_when_the_grid_underfills_the_gpu(monkeypatch):
    # Pretend to be on a 132-SM GPU: 2 programs (one per kv head) fill nothing, so the launcher
    # splits the 10 key blocks in two (MIN_BLOCKS_PER_SPLIT = 4 each at least).
    monkeypatch.setattr(fwd, "sm_count", lambda device: 132)
    q, k, v = qkv(1, 8, 2, 1, 300)
    block_n = fwd.fwd_tiles(q, v)[1]
    splits = fwd.choose_num_splits(2, -(-300 // block_n), 132)
    assert splits > 1
    fwd_args, _ = op_args(q, k, v, backend="triton")
    counter = torch.full((64,), -1, dtype=torch.int32, device=DEVICE)
    launch(fwd_args, None, block_counter=counter)
    assert int((counter >= 0).sum()) == 2 * splits
    check_split(q, k, v, None)
