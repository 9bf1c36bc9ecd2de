"""The CUDA backend (csrc/cuda) against the reference: values and gradients, every feature.

Kernel tests are marked ``gpu`` (skipped without a CUDA GPU). The tests at the end run anywhere:
they check that the backend explains why it cannot run and declines what it does not support.
Run the sanitizers on the GPU with
``compute-sanitizer --tool {memcheck,racecheck,synccheck} python csrc/cuda/sanitize_case.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn.backends import cuda as cuda_backend
from fastattn.backends.cuda import BACKEND, HEAD_DIMS, CudaBackend

from .helpers import check_against_reference, make_qkv
from .tolerance import assert_close_to_reference

gpu = pytest.mark.gpu
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(B, Hq, Hkv, Lq, Lk, D, dtype, **kwargs):
    return make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device="cuda", **kwargs)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for one test: the CUDA backward then adds dQ in
    a fixed key-block order instead of with float atomics (bit-identical across runs). ``warn_only`` (which
    selects the same path) lets the reference's cuBLAS matmuls run without CUBLAS_WORKSPACE_CONFIG."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _backward_kernels(fn) -> list[str]:
    """Names of the CUDA kernels ``fn()`` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


# (B, Hq, Hkv, Lq, Lk, D): odd lengths, Lq != Lk both ways, GQA and MQA.
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, 64, id="B1-H1-L1-D64"),
    pytest.param(2, 3, 3, 17, 17, 64, id="B2-H3-L17-D64"),
    pytest.param(1, 2, 2, 97, 97, 128, id="B1-H2-L97-D128"),
    pytest.param(2, 4, 2, 257, 97, 64, id="B2-Hq4-Hkv2-Lq257-Lk97-D64"),
    pytest.param(1, 4, 1, 97, 257, 128, id="B1-Hq4-Hkv1-Lq97-Lk257-D128"),
    pytest.param(1, 2, 2, 1, 1000, 64, id="B1-H2-Lq1-Lk1000-D64"),
    pytest.param(1, 2, 1, 1000, 1000, 128, id="B1-Hq2-Hkv1-L1000-D128"),
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D", SHAPES)
def test_plain(B, Hq, Hkv, Lq, Lk, D, dtype):
    check_against_reference("cuda", *_qkv(B, Hq, Hkv, Lq, Lk, D, dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D", SHAPES)
def test_causal(B, Hq, Hkv, Lq, Lk, D, dtype):
    check_against_reference("cuda", *_qkv(B, Hq, Hkv, Lq, Lk, D, dtype), causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "Lq, Lk, window",
    [
        pytest.param(257, 257, (32, 0), id="Lq257-Lk257-w32-0"),
        pytest.param(97, 257, (64, 17), id="Lq97-Lk257-w64-17"),
        pytest.param(257, 97, (-1, 5), id="Lq257-Lk97-w-1-5"),
        pytest.param(200, 300, (0, -1), id="Lq200-Lk300-w0-inf"),
        pytest.param(1000, 1000, (100, 100), id="Lq1000-Lk1000-w100-100"),
    ],
)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_window(Lq, Lk, window, D, dtype):
    check_against_reference("cuda", *_qkv(1, 2, 1, Lq, Lk, D, dtype), window=window)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_top_left_causal_negative_window_right(D, dtype, monkeypatch):
    # SDPA's top-left is_causal with Lq < Lk is window_right = Lq - Lk < 0 in bottom-right terms.
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    Lq, Lk = 17, 97
    q, k, v = _qkv(2, 2, 2, Lq, Lk, D, dtype)
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))

    def reference(dtype_):
        leaves = [t.detach().to(dtype_).requires_grad_() for t in (q, k, v)]
        inputs = fastattn._inputs.normalize(*leaves, window_override=(None, Lq - Lk))
        ref_out, _ = fastattn.reference.attention_from_inputs(inputs)
        return (ref_out, *torch.autograd.grad(ref_out, leaves, dout.to(dtype_)))

    for name, g, want32, want_lp in zip(("out", "dq", "dk", "dv"), got, reference(torch.float32), reference(dtype)):
        assert_close_to_reference(name, g, want32, want_lp)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_rows_that_see_nothing(D, dtype):
    # Bottom-right causal with Lq > Lk: rows i < Lq - Lk see no key: out 0, lse -inf, zero gradients.
    Lq, Lk = 97, 17
    q, k, v = _qkv(1, 2, 2, Lq, Lk, D, dtype)
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    (dq,) = torch.autograd.grad(out, (q,), torch.randn_like(out))
    blind = torch.arange(Lq, device="cuda") < Lq - Lk
    assert (out[:, :, blind] == 0).all() and (dq[:, :, blind] == 0).all()
    assert torch.isneginf(lse[:, :, blind]).all() and torch.isfinite(lse[:, :, ~blind]).all()
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(D, causal, dtype):
    q, k, v = _qkv(3, 2, 1, 97, 130, D, dtype)
    key_lengths = torch.tensor([130, 61, 0], dtype=torch.int32, device="cuda")
    query_lengths = torch.tensor([97, 33, 5], dtype=torch.int32, device="cuda")
    check_against_reference(
        "cuda", q, k, v, causal=causal, key_lengths=key_lengths, query_lengths=query_lengths
    )


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("slopes_shape", ["H", "BH"])
def test_alibi(D, slopes_shape, dtype):
    q, k, v = _qkv(2, 4, 2, 97, 150, D, dtype)
    slopes = torch.rand(4 if slopes_shape == "H" else (2, 4), device="cuda", dtype=torch.float32)
    check_against_reference("cuda", q, k, v, causal=True, alibi_slopes=slopes)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_softcap(D, dtype):
    q, k, v = _qkv(1, 2, 2, 97, 97, D, dtype)
    with torch.no_grad():
        q.mul_(4)  # large scores, so the cap bites
    check_against_reference("cuda", q, k, v, softcap=5.0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("kind", ["bool", "float", "bool-broadcast", "float-grad"])
def test_attn_mask(D, kind, dtype):
    B, H, Lq, Lk = 2, 2, 97, 130
    q, k, v = _qkv(B, H, H, Lq, Lk, D, dtype)
    if kind == "bool":
        mask = torch.rand(B, H, Lq, Lk, device="cuda") > 0.3
        mask[0, 0, 5] = False  # a row that sees nothing
    elif kind == "bool-broadcast":
        mask = torch.rand(Lq, Lk, device="cuda") > 0.5
    elif kind == "float":
        mask = torch.randn(B, 1, Lq, Lk, device="cuda", dtype=dtype)
    else:  # a learned bias: its gradient is checked too
        mask = torch.randn(1, H, Lq, Lk, device="cuda", dtype=torch.float32).requires_grad_()
    check_against_reference("cuda", q, k, v, attn_mask=mask)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("block_size", [64, 128, (128, 64)], ids=["bs64", "bs128", "bs128x64"])
def test_block_mask_layout(D, block_size, dtype):
    Lq, Lk = 300, 450
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    layout = torch.rand(2, nq, nk, device="cuda") > 0.5
    layout[:, :, 0] = True
    layout[1, -1] = False  # a query block that sees nothing
    mask = fastattn.BlockMask.from_layout(layout, block_size=(bq, bk), seq_lens=(Lq, Lk))
    check_against_reference("cuda", *_qkv(1, 2, 1, Lq, Lk, D, dtype), block_mask=mask)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_block_mask_partial_tiles(D, dtype):
    # A dense mask whose tiles are empty, full and partial; partial tiles use the element mask.
    Lq, Lk = 257, 257
    i = torch.arange(Lq, device="cuda")[:, None]
    j = torch.arange(Lk, device="cuda")[None, :]
    dense = (j <= i) & ((i - j < 100) | (j < 10))
    mask = fastattn.BlockMask.from_dense(dense, block_size=64)
    check_against_reference("cuda", *_qkv(1, 2, 2, Lq, Lk, D, dtype), block_mask=mask)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_everything_together(D, dtype):
    q, k, v = _qkv(2, 4, 2, 150, 97, D, dtype)
    slopes = torch.rand(2, 4, device="cuda")
    lengths = torch.tensor([97, 40], dtype=torch.int32, device="cuda")
    qlens = torch.tensor([150, 77], dtype=torch.int32, device="cuda")
    check_against_reference(
        "cuda", q, k, v, window=(50, 3), alibi_slopes=slopes, softcap=20.0, key_lengths=lengths,
        query_lengths=qlens, scale=0.1,
    )


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_strided_and_misaligned_inputs(D, dtype):
    B, L, H = 2, 97, 4
    # (B, L, H, D) storage seen as (B, H, L, D): no copy.
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    check_against_reference("cuda", q, k, v, causal=True)
    # The gradients come in the inputs' layouts, as the ops' shared fake (empty_like) says.
    out = fastattn.attention(q, k, v, causal=True, backend="cuda")
    for x, dx in zip((q, k, v), torch.autograd.grad(out, (q, k, v), torch.randn_like(out))):
        assert dx.stride() == x.stride()
    # Rows that start off a 16-byte boundary (copied once by the host code).
    base = torch.randn(B * H * L * D + 1, device="cuda", dtype=dtype)
    q = base[1:].view(B, H, L, D).detach().requires_grad_()
    k, v = (t.detach().requires_grad_() for t in _qkv(B, H, H, L, L, D, dtype))
    out = check_against_reference("cuda", q, k, v)
    # A misaligned dout gives the same gradients as its aligned copy (in the deterministic mode
    # bit for bit; the default dQ atomics may add in another order).
    dout_storage = torch.randn(out.numel() + 1, device="cuda", dtype=dtype)
    dout = dout_storage[1:].view_as(out)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = fastattn.attention(q, k, v, backend="cuda")
        misaligned = torch.autograd.grad(out, (q, k, v), dout)
        out = fastattn.attention(q, k, v, backend="cuda")
        aligned = torch.autograd.grad(out, (q, k, v), dout.clone())
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    for a, b in zip(misaligned, aligned):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_lse(D, dtype):
    q, k, v = _qkv(2, 2, 1, 97, 257, D, dtype, requires_grad=False)
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    ref_out, ref_lse = fastattn.reference.attention(q.float(), k.float(), v.float(), causal=True, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 97)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_backward_is_deterministic_when_asked(D, dtype, deterministic):
    # torch.use_deterministic_algorithms(True): the generic key-block kernel adds dQ in key-block
    # order (no atomics, no second pass); the gradients are bit-identical across runs and match the
    # reference. Many key blocks per query tile (Lk = 1000) so that the order has work to do.
    q, k, v = _qkv(2, 8, 2, 257, 1000, D, dtype)
    dout = torch.randn(2, 8, 257, D, device="cuda", dtype=dtype)
    grads = []
    for _ in range(3):
        out = fastattn.attention(q, k, v, causal=True, backend="cuda")
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for again in grads[1:]:
        for a, b in zip(grads[0], again):
            assert torch.equal(a, b)
    out = fastattn.attention(q, k, v, causal=True, backend="cuda")
    names = _backward_kernels(lambda: torch.autograd.grad(out, (q, k, v), dout))
    assert any("attention_bwd_kernel" in n and "true, true, true, true" in n for n in names), names
    assert not any("attention_bwd_dq_kernel" in n for n in names), names
    check_against_reference("cuda", q, k, v, causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize(
    "case", ["window-lengths", "block-mask", "block-mask-128x192"], ids=["window-lengths", "bm64", "bm128x192"]
)
def test_deterministic_dq_order_skips_key_blocks(D, dtype, case, deterministic):
    # Key blocks that skip a query tile (window, key/query lengths, BlockMask lists with empty
    # blocks) are left out of that tile's dQ order: nothing waits for them, and two runs agree bit
    # for bit and with the reference.
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 300, 700
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    if case == "window-lengths":
        kwargs = {"window": (150, 40), "key_lengths": torch.tensor([700, 333], dtype=torch.int32, device="cuda"),
                  "query_lengths": torch.tensor([300, 201], dtype=torch.int32, device="cuda")}
    else:
        bq, bk = (64, 64) if case == "block-mask" else (128, 192)
        layout = torch.rand(B, Hq, -(-Lq // bq), -(-Lk // bk), device="cuda") > 0.4
        layout[..., 0] = True
        kwargs = {"block_mask": fastattn.BlockMask.from_layout(layout, block_size=(bq, bk), seq_lens=(Lq, Lk))}
    dout = torch.randn(B, Hq, Lq, D, device="cuda", dtype=dtype)
    runs = []
    for _ in range(2):
        out = fastattn.attention(q, k, v, backend="cuda", **kwargs)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    check_against_reference("cuda", q, k, v, **kwargs)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_backward_default_sums_dq_with_atomics(D, dtype):
    # By default one kernel does all five products and adds dQ with float atomics: no dQ pass runs;
    # dK and dV (registers, a fixed order) stay bit-identical across runs, dQ matches the reference.
    assert not torch.are_deterministic_algorithms_enabled()
    q, k, v = _qkv(2, 8, 2, 257, 300, D, dtype)
    dout = torch.randn(2, 8, 257, D, device="cuda", dtype=dtype)
    out = fastattn.attention(q, k, v, causal=True, backend="cuda")
    names = _backward_kernels(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    assert not any("attention_bwd_dq_kernel" in n for n in names), names
    assert any("attention_bwd_kernel" in n and "true, false, false, false" in n for n in names), names
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    check_against_reference("cuda", q, k, v, causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("bias", [None, "alibi", "mask"], ids=["nobias", "alibi", "mask"])
def test_deterministic_backward_every_feature(D, dtype, bias, deterministic):
    # The deterministic kernel is the generic one (features decided at run time): windows, softcap,
    # lengths, GQA and each bias against the reference.
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 150, 211
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, dtype)
    kwargs = {"window": (90, 7), "softcap": 20.0, "key_lengths": torch.tensor([211, 130], dtype=torch.int32,
                                                                              device="cuda")}
    if bias == "alibi":
        kwargs["alibi_slopes"] = torch.rand(Hq, device="cuda") * 0.1
    elif bias == "mask":
        kwargs["attn_mask"] = torch.randn(B, 1, Lq, Lk, device="cuda", dtype=dtype).requires_grad_()
    check_against_reference("cuda", q, k, v, **kwargs)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("window", [False, True], ids=["full", "window"])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("bias", [None, "alibi", "mask"], ids=["nobias", "alibi", "mask"])
def test_every_instantiation(D, dtype, window, softcap, bias):
    # One call per (kWindow, kSoftcap, kBias) template flag combination of the forward and of the
    # backward (values and gradients), with lengths spanning several key tiles and query tiles so
    # both passes (boundary tiles, then interior tiles) and the cp.async double buffers run: a
    # window open on both sides has boundary tiles at both ends.
    B, H, Lq, Lk = 2, 2, 300, 777
    q, k, v = _qkv(B, H, H, Lq, Lk, D, dtype)
    kwargs = {"softcap": softcap, "window": (200, 100) if window else None}
    if bias == "alibi":
        kwargs["alibi_slopes"] = torch.rand(H, device="cuda") * 0.1
    elif bias == "mask":
        kwargs["attn_mask"] = torch.randn(B, 1, Lq, Lk, device="cuda", dtype=dtype)
    check_against_reference("cuda", q, k, v, **kwargs)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_nan_in_cache_slots_past_key_lengths_never_reaches_a_result(D, dtype, deterministic):
    # Unused KV-cache slots hold garbage; the kernels never read them (zero-filled tiles), so the
    # output and every gradient equal those of a clean cache (bit for bit in the deterministic mode).
    B, H, Lq, Lk = 2, 2, 37, 300
    q, k, v = _qkv(B, H, H, Lq, Lk, D, dtype)
    lengths = torch.tensor([300, 77], dtype=torch.int32, device="cuda")
    clean = [t.detach().clone() for t in (k, v)]
    with torch.no_grad():
        for t in (k, v):
            t[1, :, 77:] = float("nan")
        for t in clean:
            t[1, :, 77:] = 0
    dout = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype)
    results = []
    for kk, vv in ((k, v), [t.requires_grad_() for t in clean]):
        out = fastattn.attention(q, kk, vv, key_lengths=lengths, causal=True, backend="cuda")
        results.append((out, *torch.autograd.grad(out, (q, kk, vv), dout)))
    # On sm_90 the Hopper forward's tile that crosses key_lengths holds the NaN rows (TMA loads whole
    # tiles), so the poisoned run's rows are recomputed by the sm80 follow-up launch: equal within rounding.
    hopper = cuda_backend.forward_path(fastattn._inputs.normalize(q, k, v, key_lengths=lengths, causal=True)) == "sm90"
    for name, poisoned, want in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(poisoned).all(), name
        if hopper:
            torch.testing.assert_close(poisoned, want, atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(poisoned, want), name
    assert (results[0][2][1, :, 77:] == 0).all() and (results[0][3][1, :, 77:] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_additive_mask_at_the_dtype_minimum(D, dtype):
    # Hugging Face pads with torch.finfo(dtype).min; a row masked everywhere at that value is a row
    # of equal scores (the reference's mean of V), not a row that sees nothing, and nothing overflows.
    B, H, Lq, Lk = 2, 2, 97, 130
    q, k, v = _qkv(B, H, H, Lq, Lk, D, dtype)
    low = torch.finfo(dtype).min
    mask = torch.zeros(B, 1, Lq, Lk, device="cuda", dtype=dtype)
    mask[0, :, :, 100:] = low  # key padding
    mask[1, :, 5] = low        # one fully masked row
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, return_lse=True, backend="cuda")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if dtype == torch.bfloat16:
        # -3.39e38 absorbs every score (in float32 too): equal weights, the mean of V. (float16's
        # minimum, -65504, does not absorb float32 scores: there the reference's float32 softmax decides.)
        mean_v = v.detach()[1].float().mean(dim=-2)  # (H, D)
        torch.testing.assert_close(out[1, :, 5].float(), mean_v, atol=2e-2, rtol=0)
    check_against_reference("cuda", q, k, v, attn_mask=mask)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("shape", [(2, 1, 1, 130), (1, 2, 97, 130), (2, 2, 97, 1)], ids=["B11Lk", "1HLqLk", "BHLq1"])
def test_dbias_of_a_broadcast_mask(D, dtype, shape):
    # The kernels sum dbias in the mask's own broadcast shape (float atomics where it broadcasts);
    # the gradient the user's mask receives is that sum once, not once per broadcast position.
    q, k, v = _qkv(2, 2, 2, 97, 130, D, dtype)
    mask = (torch.randn(*shape, device="cuda", dtype=torch.float32) * 0.5).requires_grad_()
    check_against_reference("cuda", q, k, v, attn_mask=mask, causal=True)


@gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("shape", [(2, 1, 1, 130), (1, 1, 97, 130), (2, 2, 97, 1)], ids=["B11Lk", "11LqLk", "BHLq1"])
def test_dbias_of_a_broadcast_mask_is_deterministic_when_asked(D, shape, deterministic):
    # The deterministic mode sums a broadcast mask's gradient by torch over a dense float32 scratch
    # (no atomics): bit-identical across runs, the reference's values.
    q, k, v = _qkv(2, 2, 2, 97, 130, D, torch.bfloat16)
    mask = (torch.randn(*shape, device="cuda", dtype=torch.float32) * 0.5).requires_grad_()
    dout = torch.randn(2, 2, 97, D, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        out = fastattn.attention(q, k, v, attn_mask=mask, causal=True, backend="cuda")
        grads.append(torch.autograd.grad(out, (q, mask), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    check_against_reference("cuda", q, k, v, attn_mask=mask, causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("scale", [-0.2, 0.0], ids=["negative", "zero"])
def test_zero_and_negative_scale(D, dtype, scale):
    # The plain kernels keep raw q.k units (valid for scale > 0); other scales take the natural-unit kernels.
    check_against_reference("cuda", *_qkv(1, 2, 2, 97, 150, D, dtype), scale=scale, causal=True)


@gpu
def test_kernel_image_probe_finds_this_gpu():
    index = torch.cuda.current_device()
    assert fastattn._extension.load()[0].cuda_kernel_image_error(index) is None
    assert BACKEND.unavailable_reasons() == []


@gpu
def test_raw_op_rejects_bad_input():
    q, k, v = _qkv(1, 2, 2, 17, 17, 64, torch.float16, requires_grad=False)
    fwd = BACKEND.ops.fwd
    args = (None,) * 10 + (0, 0, 0.125, None, None, 0.0, 0.0, 0)  # optionals: mask .. lengths, 4 lists, 2 partial
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        fwd(q.float(), k.float(), v.float(), *args)
    with pytest.raises(RuntimeError, match="head_dim"):
        fwd(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(), *args)
    with pytest.raises(RuntimeError, match="dropout_p"):
        fwd(q, k, v, *args[:-2], 0.1, 0)
    with pytest.raises(RuntimeError, match="must be on q's device"):
        fwd(q, k.cpu(), v, *args)
    partial = (torch.ones(1, 64, 64, dtype=torch.bool, device="cuda"), torch.zeros(1, 1, 1, 1, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="partial_masks is not supported"):
        fwd(q, k, v, *args[:8], *partial, *args[10:])


@gpu
def test_window_narrower_than_one_key_sees_nothing(deterministic):
    # A raw-op window with left + right < 0 hides every key: out 0, lse -inf, zero gradients, and
    # the deterministic backward (whose dQ order needs non-empty bands) visits no tile and returns.
    q, k, v = _qkv(1, 2, 2, 97, 130, 64, torch.float16, requires_grad=False)
    args = (None,) * 10 + (0, 0, 0.125, 5, -6, 0.0, 0.0, 0)
    out, lse = BACKEND.ops.fwd(q, k, v, *args)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv, _ = BACKEND.ops.bwd(torch.randn_like(out), q, k, v, out, lse, *(None,) * 4, *(None,) * 10,
                                    *args[10:], False)
    torch.cuda.synchronize()
    assert all((g == 0).all() for g in (dq, dk, dv))


@gpu
def test_deterministic_backward_refuses_lists_that_are_not_transposes(deterministic):
    # The ordered dQ counts, per query block, the key blocks of the forward lists; backward lists
    # that list other pairs would leave a key block waiting forever, so the op refuses them.
    Lq = Lk = 128
    q, k, v = _qkv(1, 1, 1, Lq, Lk, 64, torch.float16, requires_grad=False)
    out, lse = BACKEND.ops.fwd(q, k, v, *(None,) * 10, 0, 0, 0.125, None, None, 0.0, 0.0, 0)
    mask = fastattn.BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool, device="cuda"), block_size=64)
    kv_lists, q_lists = list(mask.kv_lists), list(mask.q_lists)
    counts = 2 if int(q_lists[2].sum()) > 0 else 0  # the full or the partial blocks' counts
    q_lists[counts] = q_lists[counts].clone()
    q_lists[counts].view(-1)[0] -= 1  # key block 0 lists one query block fewer than the forward lists say
    with pytest.raises(RuntimeError, match="q_num_blocks"):
        BACKEND.ops.bwd(torch.randn_like(out), q, k, v, out, lse, None, None, None, None, *kv_lists, *q_lists, None,
                        None, 64, 64, 0.125, None, None, 0.0, 0.0, 0, False)


def _compute_sanitizer() -> str | None:
    """compute-sanitizer on the PATH or in the CUDA toolkit."""
    found = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if found is None and home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            found = os.path.join(home, "bin", "compute-sanitizer")
    return found


@gpu
@pytest.mark.skipif(_compute_sanitizer() is None, reason="compute-sanitizer not found (PATH, $CUDA_HOME/bin)")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_sanitize_case(tool):
    # memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory hazards (the
    # cp.async double buffer and its barriers); synccheck: barriers reached by part of a CTA.
    script = os.path.join(ROOT, "csrc", "cuda", "sanitize_case.py")
    result = subprocess.run(
        [_compute_sanitizer(), "--tool", tool, "--error-exitcode", "1", sys.executable, script],
        cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# These run on any machine.


def test_unavailable_reasons_explain_themselves():
    reasons = CudaBackend().unavailable_reasons()
    if torch.cuda.is_available() and fastattn._extension.build_info().get("cuda"):
        major, _ = torch.cuda.get_device_capability()
        has_image = fastattn._extension.load()[0].cuda_kernel_image_error(torch.cuda.current_device()) is None
        assert (reasons == []) == (major >= 8 and has_image)
    else:
        assert reasons, "without a GPU or the CUDA build the backend must say why it is unavailable"
        assert any(word in " ".join(reasons) for word in ("not built", "CUDA kernels", "no CUDA GPU")), reasons


def test_cpu_tensors_are_declined_naming_the_device():
    q, k, v = make_qkv(1, 2, 2, 17, 17, 64, dtype=torch.float16)
    with pytest.raises(fastattn.BackendNotSupportedError, match="q is on cpu"):
        fastattn.attention(q, k, v, backend="cuda")


@pytest.mark.parametrize(
    "D, dtype, kwargs, expected",
    [
        pytest.param(96, torch.float16, {}, "head_dim 96 is not compiled", id="D96"),
        pytest.param(64, torch.float32, {}, "dtype float32 is not supported", id="fp32"),
        pytest.param(64, torch.float16, {"dropout_p": 0.1}, "dropout is not supported", id="dropout"),
        pytest.param(
            64, torch.float16, {"block_mask": "bs32"}, "multiples of 64", id="block-size-32",
        ),
    ],
)
def test_declines_what_it_does_not_support(D, dtype, kwargs, expected):
    q, k, v = make_qkv(1, 2, 2, 64, 64, D, dtype=dtype)
    if kwargs.get("block_mask") == "bs32":
        kwargs = {"block_mask": fastattn.BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool), block_size=32)}
    inputs = fastattn._inputs.normalize(q, k, v, **kwargs)
    reasons = BACKEND.not_supported_reasons(inputs)
    assert any(expected in r for r in reasons), reasons


@pytest.mark.cuda_build
def test_cuda_ops_registered_in_the_cuda_build():
    fastattn._extension.load()
    if not fastattn._extension.build_info().get("cuda"):
        pytest.skip("fastattn._C was built without CUDA")
    # The CUDA dispatch key has a kernel for both ops.
    for op in ("attention_fwd", "attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", "CUDA")


# The forward ops' arguments after q, k, v: optionals (mask .. lengths, 4 lists, 2 partial), block sizes,
# scale, window, softcap, dropout_p, seed.
_FWD_ARGS = (None,) * 10 + (0, 0, 0.125, None, None, 0.0, 0.0, 0)


def _forward_ops() -> list:
    """The CUDA forward ops this build registers (the Hopper op only where it was built)."""
    ops = [torch.ops.fastattn.attention_fwd]
    if hasattr(torch.ops.fastattn, "attention_fwd_sm90"):
        ops.append(torch.ops.fastattn.attention_fwd_sm90)
    return ops


@pytest.mark.cuda_build
@pytest.mark.parametrize(
    "layout, B, H, L", [("BLHD", 2, 4, 97), ("BHLD", 2, 4, 97), ("BLHD", 1, 1, 97), ("BLHD", 2, 4, 1)],
    ids=["transposed", "contiguous", "one-head", "one-row"],
)
def test_cuda_forward_fakes_put_out_in_q_layout(layout, B, H, L):
    # What torch.compile sees of the CUDA forward ops (their fakes, run here on fake CUDA tensors,
    # no GPU needed): out in q's layout by ops.output_like_q, the rule the kernels' host code
    # (csrc/cuda/attention_checks.h output_like_q) applies; lse contiguous float32.
    from torch._subclasses.fake_tensor import FakeTensorMode

    fastattn._extension.load()
    if not fastattn._extension.build_info().get("cuda"):
        pytest.skip("fastattn._C was built without CUDA")
    from fastattn.ops import output_like_q

    with FakeTensorMode():
        def make(heads, length):
            if layout == "BLHD":
                return torch.empty(B, length, heads, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            return torch.empty(B, heads, length, 64, device="cuda", dtype=torch.bfloat16)

        q, k, v = make(H, L), make(max(H // 2, 1), 50), make(max(H // 2, 1), 50)
        expected = output_like_q(q, 64)
        for op in _forward_ops():
            out, lse = op(q, k, v, *_FWD_ARGS)
            assert out.shape == (B, H, L, 64) and out.stride() == expected.stride(), (op, out.stride())
            assert lse.shape == (B, H, L) and lse.dtype == torch.float32 and lse.is_contiguous()
    if layout == "BLHD" and H > 1 and L > 1:
        assert expected.transpose(1, 2).is_contiguous()  # (B, L, H, D) memory, as q


@gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_forward_out_in_q_layout_values_and_strides(D):
    # A (B, L, H, D) tensor transposed to (B, H, L, D): both forward ops (the sm80 op and, where
    # built, the Hopper op, which runs its own kernel on an H100) write out in that layout, with the
    # reference's values, and the backward takes such an out and gives gradients in q's layout.
    B, L, H = 2, 97, 4
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    ref = fastattn.reference.attention(q.float(), k.float(), v.float())
    for op in _forward_ops():
        out, _ = op(q, k, v, *_FWD_ARGS[:12], D**-0.5, *_FWD_ARGS[13:])
        assert out.stride() == q.stride(), (op, out.stride(), q.stride())
        assert out.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = check_against_reference("cuda", q, k, v, causal=True)
    assert out.stride() == q.stride()


class _FakeExtension:
    def __init__(self, error):
        self.error = error

    def cuda_kernel_image_error(self, index):
        return self.error


@pytest.mark.parametrize(
    "error",
    [None, "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"],
    ids=["image", "no-image"],
)
def test_gpu_newer_than_the_build_is_refused(monkeypatch, error):
    # An sm_100 GPU with an extension built for 8.0;9.0a: the probe (cudaFuncGetAttributes in
    # csrc/cuda/attention_fwd.cu) finds no image, and the backend refuses with that reason.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(cuda_backend._extension, "load", lambda: (_FakeExtension(error), None))
    monkeypatch.setattr(cuda_backend, "_IMAGE_REASONS", {})
    reason = cuda_backend._capability_reason(torch.device("cuda", 0))
    if error is None:
        assert reason is None
    else:
        assert "no CUDA kernel image for this GPU (sm_100)" in reason and "TORCH_CUDA_ARCH_LIST" in reason
        assert error in reason


@pytest.mark.cuda_build
def test_kernel_image_probe_without_a_gpu_answers_with_a_reason():
    module, _ = fastattn._extension.load()
    if not fastattn._extension.build_info().get("cuda"):
        pytest.skip("fastattn._C was built without CUDA")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_kernel_image_probe_finds_this_gpu covers it")
    error = module.cuda_kernel_image_error(0)
    assert isinstance(error, str) and error.startswith("cuda"), error


# ---------------------------------------------------------------- hidden NaN/Inf (issue 16, items 5 and 6) ----
# NaN in k and Inf/NaN in v where rows cannot see them; exact per (row, key) pair. The sm80 forward
# runs a CTA's tiles again by selection when its output is non-finite; the Hopper forward (plain calls
# on sm_90) is followed by an sm80 launch that does the same for its non-finite row blocks; the
# backward zeroes K's non-finite entries once per key block and selects dS (docs/cuda-kernels.md).


def _poison_cuda(q, k, v, poison, rows=None, **kwargs):
    """Poison ``k[poison]`` (NaN) and ``v[poison]`` (Inf, NaN in the first column), ``poison`` bool
    ``(B, Hkv, Lk)``; the results of query ``rows`` (bool ``(Lq,)``, default all) must stay finite and
    equal the clean run's (within rounding: a row block that meets a non-finite value is computed
    again); with every row clean, dk and dv too."""
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[poison] = float("nan")
    vp[poison] = float("inf")
    vp[..., :1][poison] = float("nan")
    runs = []
    for kk, vv in ((kp, vp), (k.detach(), v.detach())):
        leaves = [t.detach().clone().requires_grad_() for t in (q, kk, vv)]
        out, lse = fastattn.attention(*leaves, backend="cuda", return_lse=True, **kwargs)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        runs.append((out, lse, *torch.autograd.grad(out, leaves, dout)))
    sel = (lambda t: t) if rows is None else (lambda t: t[:, :, rows])
    tol = {"atol": 2e-2, "rtol": 2e-2}
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        if rows is not None and name in ("dk", "dv"):
            continue  # keys that some rows see legitimately carry NaN into their gradients
        got, want = sel(runs[0][i]), sel(runs[1][i])
        assert not torch.isnan(got).any(), f"a hidden NaN reached {name}"
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")
    return runs[0]


def _key_poison(B, Hkv, Lk, keys):
    poison = torch.zeros(B, Hkv, Lk, dtype=torch.bool, device="cuda")
    poison[..., keys] = True
    return poison


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_hidden_nan_under_a_padding_column_of_a_bool_mask(D, dtype, deterministic):
    B, H, Lq, Lk = 2, 2, 97, 200
    q, k, v = _qkv(B, H, H, Lq, Lk, D, dtype)
    keep = torch.rand(B, 1, 1, Lk, device="cuda") < 0.6
    keep[..., 0] = True
    poison = (~keep[:, 0, 0, :])[:, None, :].expand(B, H, Lk)
    _poison_cuda(q, k, v, poison, attn_mask=keep)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_hidden_nan_outside_every_rows_window(D, dtype):
    q, k, v = _qkv(1, 2, 2, 4, 300, D, dtype)
    # Rows sit at keys 296..299: a left window of 5 hides keys 0..290 from every row (keys 256..290
    # share the rows' key tile).
    _poison_cuda(q, k, v, _key_poison(1, 2, 300, slice(0, 291)), window=(5, 0))


@gpu
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_hidden_nan_in_an_empty_block_mask_tile(D, block):
    L = 4 * block
    q, k, v = _qkv(1, 1, 1, L, L, D, torch.bfloat16)
    layout = torch.ones(4, 4, dtype=torch.bool).tril()
    bm = fastattn.BlockMask.from_layout(layout, block_size=block).to("cuda")
    rows = torch.arange(L, device="cuda") < 3 * block  # key block 3 is empty for query blocks 0-2
    _poison_cuda(q, k, v, _key_poison(1, 1, L, slice(3 * block, L)), rows=rows, block_mask=bm)


def _mixed(q, k, v, j, seen_by, **kwargs):
    """Key ``j`` poisoned, seen by rows ``seen_by`` only (others of the same tiles do not): those others
    keep their clean results; the rows that see it are NaN (a visible NaN propagates)."""
    B, Hkv, Lk = k.shape[:3]
    out = _poison_cuda(q, k, v, _key_poison(B, Hkv, Lk, j), rows=~seen_by, **kwargs)[0]
    assert torch.isnan(out[:, :, seen_by]).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_hidden_nan_on_the_causal_diagonal(D, dtype, deterministic):
    q, k, v = _qkv(2, 2, 1, 150, 150, D, dtype)
    _mixed(q, k, v, 137, torch.arange(150, device="cuda") >= 137, causal=True)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_hidden_nan_at_a_window_edge(D, dtype):
    q, k, v = _qkv(1, 2, 2, 200, 200, D, dtype)
    i = torch.arange(200, device="cuda")
    _mixed(q, k, v, 100, (i - 100).abs() <= 3, window=(3, 3))


@gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_hidden_nan_in_a_partial_block_mask_tile(D, deterministic):
    # Documents [0, 150) and [150, 256): key 160 shares partial tiles with rows 128..149 of the first
    # document, which do not see it.
    q, k, v = _qkv(1, 2, 1, 256, 256, D, torch.bfloat16)
    doc = (torch.arange(256) >= 150).long()[None]
    bm = fastattn.masks.document(doc, causal=True, block_size=64).to("cuda")
    _mixed(q, k, v, 160, torch.arange(256, device="cuda") >= 160, block_mask=bm)


@gpu
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_hidden_nan_under_a_mixed_column_of_a_bool_mask(D, dtype, softcap):
    # With softcap the backward's tanh' of the hidden NaN score must not reach dX (dq, dk).
    q, k, v = _qkv(1, 3, 3, 129, 129, D, dtype)
    keep = torch.rand(1, 1, 129, 129, device="cuda") < 0.7
    keep[..., 11] = torch.arange(129, device="cuda") % 3 == 0  # key 11: seen by every third row only
    _mixed(q, k, v, 11, keep[0, 0, :, 11], attn_mask=keep, softcap=softcap)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_a_nan_or_inf_query_row_is_nan_not_zero(D, dtype):
    # Plain calls: the Hopper forward on sm_90, the sm80 one elsewhere; with a bool mask always sm80.
    q, k, v = _qkv(1, 1, 1, 140, 140, D, dtype, requires_grad=False)
    q[0, 0, 1, 3] = float("nan")
    q[0, 0, 2, 0] = float("inf")
    k[..., 0] = k[..., 0].abs() + 0.1  # row 2's scores are +inf
    for kwargs in ({}, {"attn_mask": torch.ones(140, 140, dtype=torch.bool, device="cuda")}):
        out, lse = fastattn.attention(q, k, v, backend="cuda", return_lse=True, **kwargs)
        assert torch.isnan(out[0, 0, 1:3]).all() and torch.isnan(lse[0, 0, 1:3]).all()
        others = torch.ones(140, dtype=torch.bool)
        others[1:3] = False
        assert torch.isfinite(out[0, 0, others]).all() and torch.isfinite(lse[0, 0, others]).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_visible_nan_key_makes_its_gradients_nan(dtype):
    # The backward zeroes K's non-finite entries for dX K; a row that sees the key still gets NaN (its
    # score is made NaN by selection), in dq and in that key's dk and dv.
    q, k, v = _qkv(1, 2, 2, 97, 97, 64, dtype)
    kp = k.detach().clone()
    kp[0, 0, 40] = float("nan")
    kp.requires_grad_()
    out = fastattn.attention(q, kp, v, backend="cuda", causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, kp, v), torch.randn_like(out))
    assert torch.isnan(dq[0, 0, 40:]).all() and torch.isfinite(dq[0, 0, :40]).all() and torch.isfinite(dq[0, 1]).all()
    assert torch.isnan(dk[0, 0, 40]).all() and torch.isnan(dv[0, 0, 40]).all()
