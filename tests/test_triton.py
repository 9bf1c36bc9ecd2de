"""The Triton backend against the reference, in values and gradients.

Without a GPU these run the kernels through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small and the grid is chosen, not a cartesian product:
every feature is crossed with the sizes that stress it (odd lengths, Lq != Lk both ways,
padded head dims, GQA). ``-m gpu`` tests at the end run realistic sizes on a CUDA GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import BlockMask, masks, reference
from fastattn.autograd import block_args, effective_attn_mask
from fastattn.backends import BackendNotSupportedError
from fastattn.backends.triton import ensure_kernels_importable

from .helpers import bwd_op_args, check_against_reference, make_qkv, op_args
from .tolerance import assert_close_to_reference

triton = pytest.importorskip("triton")
ensure_kernels_importable()  # a source tree built in place (the GPU check) has no installed mapping

from fastattn.triton_kernels import configs  # noqa: E402
from fastattn.triton_kernels.attention_fwd import MaskArgs, attention_fwd, fwd_tiles  # noqa: E402

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32 = torch.float16, torch.float32


@pytest.fixture(autouse=True)
def _pinned_config(monkeypatch):
    # One config per kernel: autotuning every feature combination would dominate the GPU run.
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")


def qkv(B, Hq, Hkv, Lq, Lk, D, dtype=F32, **kwargs):
    return make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device=DEVICE, **kwargs)


# --------------------------------------------------------------------------- dense shapes, dtypes, GQA
@pytest.mark.parametrize(
    "B, Hq, Hkv, Lq, Lk, D, dtype",
    [
        pytest.param(2, 2, 2, 1, 1, 16, F32, id="B2-H2-L1-D16-fp32"),
        pytest.param(1, 2, 2, 17, 17, 40, F16, id="B1-H2-L17-D40-fp16"),
        pytest.param(1, 2, 2, 97, 130, 64, F32, id="B1-H2-Lq97-Lk130-D64-fp32"),
        pytest.param(1, 2, 2, 130, 97, 96, F16, id="B1-H2-Lq130-Lk97-D96-fp16"),
        pytest.param(1, 4, 1, 97, 97, 40, F32, id="B1-Hq4-Hkv1-L97-D40-fp32"),
        pytest.param(1, 8, 1, 33, 17, 16, F16, id="B1-Hq8-Hkv1-Lq33-Lk17-D16-fp16"),
        pytest.param(2, 2, 1, 1, 130, 64, F32, id="B2-Hq2-Hkv1-Lq1-Lk130-D64-fp32"),
        pytest.param(1, 2, 2, 17, 33, 40, torch.bfloat16, id="B1-H2-Lq17-Lk33-D40-bf16"),
    ],
)
def test_dense(B, Hq, Hkv, Lq, Lk, D, dtype):
    check_against_reference("triton", *qkv(B, Hq, Hkv, Lq, Lk, D, dtype))


def test_value_head_dim_differs():
    q, k, v = make_qkv(1, 2, 1, 33, 40, 40, Dv=16, device=DEVICE)
    check_against_reference("triton", q, k, v, causal=True)


# --------------------------------------------------------------------------- causal and windows
@pytest.mark.parametrize(
    "Lq, Lk, D, dtype, kwargs",
    [
        pytest.param(97, 130, 40, F32, {"causal": True}, id="Lq97-Lk130-D40-causal"),
        pytest.param(130, 97, 64, F16, {"causal": True}, id="Lq130-Lk97-D64-causal-fp16"),
        pytest.param(130, 130, 16, F32, {"window": (16, 8)}, id="L130-D16-window16-8"),
        pytest.param(97, 130, 40, F32, {"window": (20, -1)}, id="Lq97-Lk130-D40-left20"),
        pytest.param(130, 97, 40, F16, {"window": (-1, 10)}, id="Lq130-Lk97-D40-right10-fp16"),
        pytest.param(97, 97, 16, F32, {"window": (0, 0)}, id="L97-D16-window0-0"),
        pytest.param(97, 33, 16, F32, {"window": (3, 40), "causal": True}, id="Lq97-Lk33-D16-window3-causal"),
    ],
)
def test_causal_and_window(Lq, Lk, D, dtype, kwargs):
    check_against_reference("triton", *qkv(1, 2, 1, Lq, Lk, D, dtype), **kwargs)


def _random_band_cases(count: int, seed: int = 1234) -> list:
    """Odd lengths and windows (negative right bounds, empty bands, lengths) drawn once, ids from the values."""
    import random

    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        Lq, Lk = rng.randint(1, 100), rng.randint(1, 100)
        left = rng.choice([-1, 0, rng.randint(1, 40)])
        right = rng.choice([-1, 0, rng.randint(1, 40)])
        klen = rng.randint(0, Lk) if rng.random() < 0.5 else None
        cases.append(pytest.param(Lq, Lk, left, right, klen, id=f"Lq{Lq}-Lk{Lk}-window{left}_{right}-klen{klen}"))
    return cases


@pytest.mark.parametrize("Lq, Lk, left, right, klen", _random_band_cases(10))
def test_random_bands(Lq, Lk, left, right, klen):
    q, k, v = qkv(2, 2, 1, Lq, Lk, 16)
    lengths = None if klen is None else torch.tensor([Lk, klen], dtype=torch.int32, device=DEVICE)
    check_against_reference("triton", q, k, v, window=(left, right), key_lengths=lengths)


@pytest.mark.parametrize("Lq, Lk", [pytest.param(97, 40, id="Lq97-Lk40"), pytest.param(40, 97, id="Lq40-Lk97")])
def test_sdpa_top_left_causal(monkeypatch, Lq, Lk):
    q, k, v = qkv(1, 2, 2, Lq, Lk, 16)
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    # torch gives NaN where a top-left causal row sees nothing (Lq > Lk never, Lq < Lk never: row 0 sees key 0).
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, torch.autograd.grad(want, (q64, k64, v64), dout.double())):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- attn_mask
def test_bool_attn_mask_broadcast():
    q, k, v = qkv(2, 2, 1, 33, 50, 16)
    mask = torch.rand(2, 1, 33, 50, device=DEVICE) > 0.3  # broadcast over heads: stride 0
    check_against_reference("triton", q, k, v, attn_mask=mask)


def test_float_attn_mask_with_gradient():
    q, k, v = qkv(1, 2, 2, 40, 33, 40)
    mask = torch.randn(2, 40, 33, device=DEVICE)
    mask[:, :, 5] = float("-inf")
    mask.requires_grad_()
    check_against_reference("triton", q, k, v, attn_mask=mask, causal=True)


def test_float_attn_mask_gradient_broadcast_with_gqa_and_window():
    q, k, v = qkv(2, 4, 1, 33, 40, 16)
    mask = (torch.randn(1, 1, 33, 40, device=DEVICE) * 0.5).requires_grad_()  # dbias summed over B and Hq
    check_against_reference("triton", q, k, v, attn_mask=mask, window=(9, 2))


def test_float_attn_mask_fp16_no_gradient():
    q, k, v = qkv(1, 2, 2, 17, 40, 16, F16)
    mask = torch.randn(17, 40, device=DEVICE, dtype=F16)
    check_against_reference("triton", q, k, v, attn_mask=mask)


# --------------------------------------------------------------------------- BlockMask
@pytest.mark.parametrize(
    "Lq, Lk, block_size, kwargs",
    [
        pytest.param(97, 97, 32, {}, id="L97-block32"),
        pytest.param(97, 130, (64, 32), {}, id="Lq97-Lk130-block64x32"),
        pytest.param(130, 97, (32, 64), {"causal": True}, id="Lq130-Lk97-block32x64-causal"),
    ],
)
def test_block_mask_from_dense(Lq, Lk, block_size, kwargs):
    q, k, v = qkv(2, 2, 1, Lq, Lk, 16)
    i = torch.arange(Lq, device=DEVICE)[:, None]
    j = torch.arange(Lk, device=DEVICE)[None, :]
    # Local band + a few global keys + random tiles: empty, partial and full tiles all occur.
    dense = ((i - j).abs() < 20) | (j < 5) | (torch.rand(2, 1, Lq, Lk, device=DEVICE) > 0.998)
    dense[:, :, :64, :64] = True
    mask = BlockMask.from_dense(dense, block_size=block_size)
    assert (mask.layout == 0).any() and (mask.layout == 1).any() and (mask.layout == 2).any()
    check_against_reference("triton", q, k, v, block_mask=mask, **kwargs)


def test_block_mask_blocks_larger_than_kernel_tiles():
    # 128-blocks span several kernel tiles (the tiles are capped to fit on chip).
    q, k, v = qkv(1, 2, 1, 200, 200, 16)
    i, j = torch.arange(200, device=DEVICE)[:, None], torch.arange(200, device=DEVICE)[None, :]
    mask = BlockMask.from_dense(j <= i, block_size=128)
    assert mask.layout.flatten().tolist() == [1, 0, 2, 1]  # partial, empty, full, partial
    check_against_reference("triton", q, k, v, block_mask=mask)


def test_block_mask_with_gqa_lengths_alibi_and_dropout():
    q, k, v = qkv(2, 4, 2, 70, 90, 16)
    i, j = torch.arange(70, device=DEVICE)[:, None], torch.arange(90, device=DEVICE)[None, :]
    mask = BlockMask.from_dense((j // 30 == i // 30) | (j < 8), block_size=(32, 32))
    lengths = torch.tensor([90, 61], dtype=torch.int32, device=DEVICE)
    slopes = torch.rand(4, device=DEVICE) * 0.3
    check_against_reference(
        "triton", q, k, v, block_mask=mask, key_lengths=lengths, alibi_slopes=slopes, dropout_p=0.2
    )


def test_block_mask_from_layout_broadcast_over_batch_and_heads():
    q, k, v = qkv(2, 2, 2, 40, 50, 16)
    layout = torch.rand(3, 4, device=DEVICE) > 0.4
    layout[:, 0] = True
    mask = BlockMask.from_layout(layout, block_size=16, seq_lens=(40, 50))
    check_against_reference("triton", q, k, v, block_mask=mask)


def test_block_mask_unsupported_block_size_is_refused():
    q, k, v = qkv(1, 1, 1, 30, 30, 16, requires_grad=False)
    mask = BlockMask.from_dense(torch.ones(30, 30, dtype=torch.bool, device=DEVICE), block_size=24)
    with pytest.raises(BackendNotSupportedError, match="block_size"):
        fastattn.attention(q, k, v, block_mask=mask, backend="triton")


# --------------------------------------------------------------------------- lengths, ALiBi, softcap
@pytest.mark.parametrize(
    "key_lengths, query_lengths, kwargs",
    [
        pytest.param([50, 7], None, {}, id="klen"),
        pytest.param(None, [33, 0], {"causal": True}, id="qlen-causal"),
        pytest.param([0, 31], [20, 9], {"window": (4, 2)}, id="both-window"),
    ],
)
def test_lengths(key_lengths, query_lengths, kwargs):
    q, k, v = qkv(2, 2, 1, 33, 50, 40)
    as_tensor = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32, device=DEVICE)
    check_against_reference(
        "triton", q, k, v, key_lengths=as_tensor(key_lengths), query_lengths=as_tensor(query_lengths), **kwargs
    )


@pytest.mark.parametrize(
    "slopes_shape, kwargs",
    [
        pytest.param((2,), {"causal": True}, id="slopes-H-causal"),
        pytest.param((2, 2), {"key_lengths": torch.tensor([40, 21], dtype=torch.int32)}, id="slopes-BH-klen"),
    ],
)
def test_alibi(slopes_shape, kwargs):
    q, k, v = qkv(2, 2, 1, 33, 40, 16)
    slopes = torch.rand(slopes_shape, device=DEVICE) * 0.5
    kwargs = {key: val.to(DEVICE) if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()}
    check_against_reference("triton", q, k, v, alibi_slopes=slopes, **kwargs)


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="fp32"), pytest.param(F16, id="fp16")])
def test_softcap_with_alibi_and_float_mask(dtype):
    q, k, v = qkv(1, 2, 2, 40, 33, 40, dtype)
    q.data.mul_(3)  # scores well beyond the cap
    mask = torch.randn(40, 33, device=DEVICE, dtype=dtype)
    check_against_reference(
        "triton", q, k, v, softcap=2.0, alibi_slopes=torch.tensor([0.3, 0.1], device=DEVICE), attn_mask=mask,
        window=(-1, 5),
    )


# --------------------------------------------------------------------------- dropout
def test_dropout_matches_reference_given_the_same_mask():
    q, k, v = qkv(2, 2, 1, 40, 33, 16)
    check_against_reference("triton", q, k, v, dropout_p=0.3, causal=True)


def test_dropout_reproducible_and_seeded():
    q, k, v = qkv(1, 2, 2, 33, 40, 16, requires_grad=False)
    torch.manual_seed(7)
    a = fastattn.attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(7)
    b = fastattn.attention(q, k, v, dropout_p=0.5, backend="triton")
    c = fastattn.attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    inputs = fastattn._inputs.normalize(q, k, v, dropout_p=0.5)
    keep = fastattn.get_backend("triton").dropout_keep_mask(inputs, seed=1234)
    assert keep.shape == (1, 2, 33, 40) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.5) < 0.05


# --------------------------------------------------------------------------- fully masked rows
def test_fully_masked_rows_give_zero_and_finite_gradients():
    q, k, v = qkv(1, 2, 1, 33, 40, 16)
    mask = torch.rand(33, 40, device=DEVICE) > 0.5
    mask[3] = False
    mask[20:25] = False
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, return_lse=True, backend="triton")
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.equal(out[:, :, 20:25], torch.zeros_like(out[:, :, 20:25]))
    assert torch.isinf(lse[:, :, 3]).all() and (lse[:, :, 3] < 0).all()
    assert torch.isfinite(lse[:, :, :3]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))
    # Lq > Lk causal: the first Lq - Lk rows see nothing (values and grads against the reference too).
    check_against_reference("triton", *qkv(1, 2, 1, 70, 33, 16), causal=True)


def test_no_keys_gives_zero_output_and_gradient():
    q, k, v = qkv(1, 2, 1, 5, 0, 16)
    out, lse = fastattn.attention(q, k, v, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q.grad))


# --------------------------------------------------------------------------- what a row cannot see
def _check_poisoned(q, k, v, k_poison, q_poison=None, **kwargs):
    """The Triton backward on inputs holding NaN / Inf where no row can see them (``k_poison``: bool
    ``(B, Hkv, Lk)`` over keys, set in k and v; ``q_poison`` ``(B, Hq, Lq)`` over queries, set in q and
    dout) against the reference gradients of the clean inputs. The forward's ``out, lse`` come from
    the clean inputs, so only the backward kernels are under test."""
    ops = fastattn.get_backend("triton").ops
    fwd, lists = op_args(q, k, v, backend="triton", **kwargs)
    out, lse = ops.fwd(*fwd)
    args = bwd_op_args(fwd, lists, out, lse)
    dout = args[0]
    hp = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want32 = torch.autograd.grad(reference.attention(*hp, **kwargs), hp, dout.double())
    want_lp = torch.autograd.grad(reference.attention(*lp, **kwargs), lp, dout)
    bad_q, bad_k, bad_v, bad_dout = (t.detach().clone() for t in (q, k, v, dout))
    bad_k[k_poison] = float("nan")
    bad_v[k_poison] = float("inf")
    if q_poison is not None:
        bad_q[q_poison] = float("nan")
        bad_dout[q_poison] = float("nan")
    args[:4] = [bad_dout, bad_q, bad_k, bad_v]
    got = ops.bwd(*args)[:3]
    for name, g, w32, wlp in zip(("dq", "dk", "dv"), got, want32, want_lp):
        assert_close_to_reference(name, g, w32, wlp)


def test_nan_past_lengths_reaches_no_gradient():
    q, k, v = qkv(2, 4, 2, 40, 70, 16, requires_grad=False)
    klen, qlen = [70, 33], [25, 40]
    k_poison = torch.arange(70, device=DEVICE)[None, None, :] >= torch.tensor(klen, device=DEVICE)[:, None, None]
    q_poison = torch.arange(40, device=DEVICE)[None, None, :] >= torch.tensor(qlen, device=DEVICE)[:, None, None]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    _check_poisoned(
        q, k, v, k_poison.expand(2, 2, 70), q_poison.expand(2, 4, 40), key_lengths=as_tensor(klen),
        query_lengths=as_tensor(qlen), causal=True,
    )


def test_nan_outside_the_band_reaches_no_gradient():
    # offset 40, window (3, 0): keys before 37 are seen by no row, and share a tile with keys that are.
    q, k, v = qkv(1, 2, 1, 20, 60, 16, requires_grad=False)
    k_poison = (torch.arange(60, device=DEVICE) < 37).expand(1, 1, 60)
    _check_poisoned(q, k, v, k_poison, window=(3, 0), softcap=5.0)


def test_nan_in_empty_block_mask_tiles_reaches_no_gradient():
    q, k, v = qkv(1, 2, 1, 64, 64, 16, requires_grad=False)
    layout = torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
    layout[:, 2] = False  # keys 32..47: empty tiles only
    mask = BlockMask.from_layout(layout, block_size=16, seq_lens=(64, 64))
    k_poison = ((torch.arange(64, device=DEVICE) // 16) == 2).expand(1, 1, 64)
    _check_poisoned(q, k, v, k_poison, block_mask=mask)


# --------------------------------------------------------------------------- tensor descriptors (TMA)
# The interpreter emulates tensor descriptors, so the suite above runs the TMA path (aligned
# inputs); these run the pointer path, which older GPUs and unaligned inputs take.
@pytest.fixture
def pointer_loads(monkeypatch):
    from fastattn.triton_kernels import attention_fwd as fwd_module

    monkeypatch.setattr(fwd_module, "_tma_device", lambda device: False)


def test_tensor_descriptors_only_for_16_byte_aligned_rows(monkeypatch):
    from fastattn.triton_kernels.attention_fwd import _tma_device, use_tensor_descriptors

    device = torch.device(DEVICE)
    aligned = torch.randn(1, 2, 17, 40, dtype=F16, device=DEVICE)  # 80-byte rows
    short_rows = torch.randn(1, 2, 17, 20, dtype=F16, device=DEVICE)  # 40-byte rows
    shifted = torch.randn(1 + 2 * 17 * 40, dtype=F16, device=DEVICE)[1:].view(1, 2, 17, 40)  # starts 2 bytes in
    strided = torch.randn(1, 2, 40, 17, dtype=F16, device=DEVICE).transpose(2, 3)  # last stride 17
    assert use_tensor_descriptors(aligned, aligned) == _tma_device(device)
    for bad in (short_rows, shifted, strided):
        assert not use_tensor_descriptors(aligned, bad)
    monkeypatch.setenv("FASTATTN_TRITON_TMA", "0")
    assert not use_tensor_descriptors(aligned)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(window=(9, 3), softcap=5.0, lengths=True), id="window-softcap-lengths"),
        pytest.param(dict(causal=True, alibi=True, dropout_p=0.2, float_mask=True), id="causal-alibi-dropout-mask"),
    ],
)
def test_pointer_loads(pointer_loads, kwargs):
    kwargs = dict(kwargs)
    q, k, v = qkv(2, 4, 2, 33, 47, 40)
    if kwargs.pop("lengths", False):
        kwargs.update(key_lengths=torch.tensor([47, 30], device=DEVICE), query_lengths=torch.tensor([20, 33], device=DEVICE))
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = torch.rand(4, device=DEVICE)
    if kwargs.pop("float_mask", False):
        kwargs["attn_mask"] = torch.randn(33, 47, device=DEVICE).requires_grad_()
    check_against_reference("triton", q, k, v, **kwargs)


def test_pointer_loads_keep_nan_past_lengths_out(pointer_loads):
    test_nan_past_lengths_reaches_no_gradient()


@pytest.mark.gpu
def test_gpu_pointer_loads(pointer_loads):
    q, k, v = make_qkv(2, 8, 2, 1000, 1000, 128, dtype=torch.bfloat16, device="cuda")
    check_against_reference("triton", q, k, v, causal=True)


def test_unaligned_inputs_take_the_pointer_path():
    q, k, v = (
        torch.randn(1 + 2 * 17 * 24, dtype=F16, device=DEVICE)[1:].view(1, 2, 17, 24).requires_grad_()
        for _ in range(3)
    )
    check_against_reference("triton", q, k, v, causal=True)


# --------------------------------------------------------------------------- layouts, determinism
def test_non_contiguous_blhd_inputs():
    B, L, H, D = 2, 40, 2, 40
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    check_against_reference("triton", q, k, v, causal=True)


def test_backward_is_deterministic():
    q, k, v = qkv(1, 4, 1, 97, 70, 40)
    dout = torch.randn(1, 4, 97, 40, device=DEVICE)
    grads = []
    for _ in range(2):
        out = fastattn.attention(q, k, v, window=(30, 5), backend="triton")
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- block skipping
@pytest.mark.parametrize(
    "Lq, Lk, window",
    [
        pytest.param(200, 200, (None, 0), id="L200-causal"),
        pytest.param(130, 257, (None, 0), id="Lq130-Lk257-causal"),
        pytest.param(257, 130, (40, 10), id="Lq257-Lk130-window40-10"),
        pytest.param(200, 200, (30, None), id="L200-left30"),
    ],
)
def test_forward_visits_only_visible_key_blocks(Lq, Lk, window):
    q, k, v = qkv(1, 1, 1, Lq, Lk, 16, requires_grad=False)
    block_m, block_n = fwd_tiles(q, v)
    num_m = math.ceil(Lq / block_m)
    counter = torch.full((num_m,), -1, dtype=torch.int32, device=DEVICE)
    out, _ = attention_fwd(q, k, v, MaskArgs(window_left=window[0], window_right=window[1]), scale=0.25,
                           block_counter=counter)
    inputs = fastattn._inputs.normalize(q, k, v, window_override=window)
    visible = reference.visible_mask(inputs)[0, 0]
    padded = torch.zeros(num_m * block_m, math.ceil(Lk / block_n) * block_n, dtype=torch.bool, device=DEVICE)
    padded[:Lq, :Lk] = visible
    tiles = padded.view(num_m, block_m, -1, block_n).any(dim=3).any(dim=1)  # (num_m, num_n)
    assert counter.tolist() == tiles.sum(dim=1).tolist()
    assert counter.sum().item() < tiles.numel()  # something was skipped
    assert_close_to_reference("out", out, *(reference.attention_from_inputs(inputs)[0] for _ in range(2)))


@pytest.mark.parametrize("block_size", [16, 32], ids=["bs16", "bs32"])
def test_forward_visits_only_listed_block_mask_tiles(block_size):
    # A document-causal mask per head: each query block visits exactly its non-empty mask tiles
    # (partial + full), counted by the kernel, against the tiles of the dense mask.
    B, H, L = 2, 2, 97
    i = torch.arange(L, device=DEVICE)
    doc = torch.stack([i // 40, i // 25]).view(1, H, L).expand(B, H, L)
    dense = (doc[..., :, None] == doc[..., None, :]) & (i[None, :] <= i[:, None])
    mask = BlockMask.from_dense(dense, block_size=block_size)
    q, k, v = qkv(B, H, H, L, L, 16, requires_grad=False)
    inputs = fastattn._inputs.normalize(q, k, v, block_mask=mask)
    lists, bq, bk = block_args(inputs)
    num_m = math.ceil(L / bq)
    counter = torch.full((B * H * num_m,), -1, dtype=torch.int32, device=DEVICE)
    masks_ = MaskArgs(attn_mask=effective_attn_mask(inputs), kv_num_blocks=lists[0], kv_indices=lists[1],
                      full_kv_num_blocks=lists[2], full_kv_indices=lists[3], block_size_q=bq, block_size_k=bk)
    out, _ = attention_fwd(q, k, v, masks_, scale=inputs.scale, block_counter=counter)
    padded = torch.zeros(B, H, num_m * bq, math.ceil(L / bk) * bk, dtype=torch.bool, device=DEVICE)
    padded[..., :L, :L] = dense
    tiles = padded.view(B, H, num_m, bq, -1, bk).any(dim=5).any(dim=3)  # (B, H, num_m, num_n)
    assert counter.view(B, H, num_m).tolist() == tiles.sum(dim=3).tolist()
    assert counter.sum().item() < tiles.numel() / 2  # most tiles were skipped
    assert_close_to_reference("out", out, *(reference.attention_from_inputs(inputs)[0] for _ in range(2)))


# --------------------------------------------------------------------------- ops: opcheck, compile, errors
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"causal": True, "alibi_slopes": torch.tensor([0.5, 0.25])}, id="causal-alibi"),
        pytest.param({"attn_mask": torch.randn(17, 20), "dropout_p": 0.2}, id="float-mask-dropout"),
        pytest.param({"block_mask": masks.document(torch.arange(17)[None] // 6, torch.arange(20)[None] // 7,
                                                   causal=True, block_size=16)}, id="per-tile-masks"),
    ],
)
def test_opcheck(kwargs):
    q, k, v = qkv(1, 2, 1, 17, 20, 16, requires_grad=False)
    kwargs = {key: val.to(DEVICE) if isinstance(val, (torch.Tensor, BlockMask)) else val for key, val in kwargs.items()}
    fwd, lists = op_args(q, k, v, backend="triton", seed=11, **kwargs)
    ops = fastattn.get_backend("triton").ops
    torch.library.opcheck(ops.fwd, tuple(fwd))
    out, lse = ops.fwd(*fwd)
    mask = fwd[3]
    compute_dbias = mask is not None and mask.is_floating_point()
    torch.library.opcheck(ops.bwd, tuple(bwd_op_args(fwd, lists, out, lse, compute_dbias)))


def test_compile_fullgraph():
    q, k, v = qkv(1, 2, 1, 17, 20, 16)
    # The backend registry imports its modules on first use, which dynamo cannot trace: load it first.
    assert fastattn.get_backend("triton").ops is not None

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return fastattn.attention(q, k, v, causal=True, softcap=5.0, backend="triton")

    out = f(q, k, v)
    want = reference.attention(q, k, v, causal=True, softcap=5.0)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "dtype, D, match",
    [
        pytest.param(torch.float64, 16, "dtype float64", id="fp64"),
        pytest.param(F32, 320, "head_dim 320", id="D320"),
    ],
)
def test_unsupported_inputs_are_refused_with_reasons(dtype, D, match):
    q, k, v = qkv(1, 1, 1, 5, 5, D, dtype, requires_grad=False)
    with pytest.raises(BackendNotSupportedError, match=match):
        fastattn.attention(q, k, v, backend="triton")


def test_launcher_refuses_block_sizes_that_cannot_be_tiles():
    q, k, v = qkv(1, 1, 1, 30, 30, 16, requires_grad=False)
    lists = BlockMask.from_dense(torch.ones(30, 30, dtype=torch.bool, device=DEVICE), block_size=24).kv_lists
    with pytest.raises(ValueError, match="block_size_q and block_size_k"):
        attention_fwd(q, k, v, MaskArgs(kv_num_blocks=lists[0], kv_indices=lists[1], full_kv_num_blocks=lists[2],
                                        full_kv_indices=lists[3], block_size_q=24, block_size_k=24), scale=0.25)


def test_interpreter_is_not_auto_selected():
    if not configs.in_interpreter():
        pytest.skip("only meaningful in the Triton interpreter")
    q, k, v = qkv(1, 1, 1, 5, 5, 16, requires_grad=False)
    inputs = fastattn._inputs.normalize(q, k, v)
    reasons = fastattn.get_backend("triton").auto_select_reasons(inputs)
    assert reasons and "interpreter" in reasons[0]


# --------------------------------------------------------------------------- GPU: realistic sizes
BF16 = torch.bfloat16
GPU_CASES = [
    pytest.param(1, 2, 1, 16384, 16384, 64, BF16, {"causal": True}, id="B1-Hq2-Hkv1-L16384-D64-causal-bf16"),
    pytest.param(2, 8, 2, 4097, 4097, 128, F16, {}, id="B2-Hq8-Hkv2-L4097-D128-fp16"),
    pytest.param(2, 8, 2, 4097, 4097, 128, BF16, {}, id="B2-Hq8-Hkv2-L4097-D128-bf16"),
    pytest.param(1, 4, 4, 2049, 3001, 256, BF16, {"causal": True}, id="B1-H4-Lq2049-Lk3001-D256-causal-bf16"),
    pytest.param(1, 4, 4, 3001, 2049, 256, F16, {"causal": True}, id="B1-H4-Lq3001-Lk2049-D256-causal-fp16"),
    pytest.param(1, 8, 8, 8191, 8191, 128, F16, {"window": (512, 0)}, id="B1-H8-L8191-D128-window512-fp16"),
    pytest.param(
        2, 4, 4, 2000, 2000, 96, BF16, {"softcap": 30.0, "dropout_p": 0.1}, id="B2-H4-L2000-D96-softcap-dropout-bf16"
    ),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, dtype, kwargs", GPU_CASES)
def test_gpu_realistic(B, Hq, Hkv, Lq, Lk, D, dtype, kwargs):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device="cuda")
    check_against_reference("triton", q, k, v, **kwargs)
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_block_mask_and_lengths_bf16():
    L = 3000
    q, k, v = make_qkv(2, 4, 2, L, L, 128, dtype=torch.bfloat16, device="cuda")
    doc = torch.arange(L, device="cuda") // 700  # packed documents, causal within each
    i, j = torch.arange(L, device="cuda")[:, None], torch.arange(L, device="cuda")[None, :]
    mask = BlockMask.from_dense((doc[:, None] == doc[None, :]) & (j <= i), block_size=(128, 64))
    check_against_reference("triton", q, k, v, block_mask=mask)
    lengths = torch.tensor([L, 1234], dtype=torch.int32, device="cuda")
    check_against_reference("triton", q, k, v, key_lengths=lengths, query_lengths=lengths, causal=True)


@pytest.mark.gpu
def test_gpu_autotuned(monkeypatch):
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "1")
    q, k, v = make_qkv(2, 4, 2, 1537, 1537, 128, dtype=torch.bfloat16, device="cuda")
    check_against_reference("triton", q, k, v, causal=True)


@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph():
    q, k, v = make_qkv(2, 4, 2, 1000, 1000, 64, dtype=torch.bfloat16, device="cuda")

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return fastattn.attention(q, k, v, causal=True, backend="triton")

    out = f(q, k, v)
    want = fastattn.attention(q, k, v, causal=True, backend="triton")
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.gpu
def test_gpu_fp32_tf32x3_meets_the_tolerance():
    q, k, v = make_qkv(1, 2, 2, 1000, 1000, 64, dtype=F32, device="cuda")
    check_against_reference("triton", q, k, v, causal=True)


# --------------------------------------------------------------------------- configs
def test_autotuning_is_opt_in_and_pruned_before_compiling(monkeypatch):
    monkeypatch.delenv("FASTATTN_AUTOTUNE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not configs.autotune_enabled(128, 2)  # pinned by default: bit-reproducible across processes
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "1")
    assert configs.autotune_enabled(128, 2)
    assert configs.tune_bucket(100) == 128 and configs.tune_bucket(128) == 128 and configs.tune_bucket(1) == 64
    for key in (configs.FWD_KEY, configs.DKDV_KEY, configs.DQ_KEY):
        assert "TUNE_LK" in key and "GROUP" in key
    q = torch.empty(1, dtype=torch.bfloat16)
    kinds = (("fwd", configs.fwd_configs()), ("dkdv", configs.dkdv_configs()), ("dq", configs.dq_configs()))
    for kind, candidates in kinds:
        wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)  # too much shared memory
        thin = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=8, num_stages=1)  # 2 rows per warp
        kept = configs.prune(kind)([*candidates, wide, thin], {}, p_q=q, BLOCK_D=256, BLOCK_DV=256)
        assert wide not in kept and thin not in kept and kept
        for c in kept:
            meta = dict(c.kwargs, num_stages=c.num_stages)
            assert configs.shared_memory_estimate(kind, meta, 256, 256, 2) <= configs.SMEM_LIMIT
            assert configs.m_dim(kind, c.kwargs) >= 16 * c.num_warps


def test_pinned_configs_per_kernel(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's configs (configs reads the variable per call)
    for kind in configs.KINDS:
        for head_dim in (64, 128, 256):
            meta = configs.pinned_config(kind, head_dim, 2)
            assert set(meta) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    assert configs.pinned_config("bwd", 128) == configs.pinned_config("dkdv", 128)  # the former name
    # Block-mask tiles never put fewer than 16 rows of the M dimension on a warp.
    meta = configs.block_mask_config("dkdv", 128, 64, 16)
    assert meta["BLOCK_N"] == 16 and meta["num_warps"] == 1
    assert configs.block_mask_config("dq", 128, 64, 64)["num_warps"] == 4


def test_lean_configs_for_feature_mixes_that_spill(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plain = {"HAS_MASK": False, "HAS_DROPOUT": False, "HAS_SOFTCAP": 0}
    for flags, lean in (
        (plain, False), ({**plain, "HAS_DROPOUT": True}, False), ({**plain, "HAS_SOFTCAP": 2}, False),
        ({**plain, "HAS_MASK": True}, True), ({**plain, "HAS_DROPOUT": True, "HAS_SOFTCAP": 1}, True),
    ):
        assert configs.lean_features(flags) == lean
        for kind in configs.KINDS:
            for head_dim in (64, 128):
                meta = configs.pinned_config(kind, head_dim, 2, flags)
                assert (meta != configs.pinned_config(kind, head_dim, 2)) == lean, (kind, head_dim, flags)
                assert configs.m_dim(kind, meta) >= 16 * meta["num_warps"]
            # 256 keeps its configs (already the smallest).
            assert configs.pinned_config(kind, 256, 2, flags) == configs.pinned_config(kind, 256, 2)
