"""The gradient of an additive ``attn_mask`` (``dbias``) in the mask's own broadcast shape.

A mask that broadcasts over batch, heads, rows or columns reaches the ops as a stride-0 view, and
every backend returns its gradient in the mask's own shape, accumulated in float32 and rounded once,
never through a dense ``(B, Hq, Lq, Lk)`` buffer.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.ops import bwd_fake, dbias_shape

from .helpers import bwd_op_args, check_against_reference, make_qkv, op_args

B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 17, 23, 16

# The mask's shape as the caller gives it, written with the call's dimensions.
PATTERNS = ["1-1-Lq-Lk", "B-1-1-Lk", "1-H-Lq-Lk", "1-1-Lq-1", "H-1-Lk", "B-H-Lq-Lk"]
# (B, Hq, Hkv, Lq, Lk, D) of the calls checked against the reference: GQA, Lq != Lk, a single query.
SHAPES = [
    pytest.param((B, Hq, Hkv, Lq, Lk, D), id="B2-H4-Hkv2-Lq17-Lk23-D16"),
    pytest.param((1, 3, 1, 1, 97, 40), id="B1-H3-Hkv1-Lq1-Lk97-D40"),
]


def _mask_shape(pattern: str, b: int, h: int, lq: int, lk: int) -> tuple[int, ...]:
    sizes = {"1": 1, "B": b, "H": h, "Lq": lq, "Lk": lk}
    return tuple(sizes[name] for name in pattern.split("-"))


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)]


def _usable(backend: str) -> None:
    reasons = fastattn.get_backend(backend).unavailable_reasons()
    if reasons:
        pytest.skip(f"{backend}: {reasons}")


def _own_shape(shape) -> tuple[int, ...]:
    return (1,) * (4 - len(shape)) + tuple(shape)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_returns_dbias_in_the_masks_own_shape(backend, pattern):
    _usable(backend)
    torch.manual_seed(0)
    shape = _mask_shape(pattern, B, Hq, Lq, Lk)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, requires_grad=False)
    mask = torch.randn(shape)
    fwd, lists = op_args(q, k, v, backend=backend, attn_mask=mask, causal=True)
    expanded = fwd[3]
    assert expanded.shape == (B, Hq, Lq, Lk) and expanded.data_ptr() == mask.data_ptr()  # a view, no copy
    ops = fastattn.get_backend(backend).ops
    out, lse = ops.fwd(*fwd)
    args = bwd_op_args(fwd, lists, out, lse, compute_dbias=True)
    dbias = ops.bwd(*args)[3]
    want_shape = _own_shape(shape)
    assert dbias_shape(expanded) == want_shape
    assert dbias.shape == want_shape and dbias.dtype == mask.dtype and dbias.is_contiguous()
    fake = bwd_fake(*args)[3]
    assert fake.shape == dbias.shape and fake.dtype == dbias.dtype
    # The reference op materialises dS and sums it over the broadcast dimensions.
    want = fastattn.get_backend("reference").ops.bwd(*args)[3]
    torch.testing.assert_close(dbias, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_gradient_matches_the_reference(backend, dims, pattern, dtype):
    _usable(backend)
    torch.manual_seed(1)
    b, hq, hkv, lq, lk, d = dims
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype=dtype)
    mask = torch.randn(_mask_shape(pattern, b, hq, lq, lk), dtype=dtype, requires_grad=True)
    check_against_reference(backend, q, k, v, attn_mask=mask, window=(9, 3))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradient_of_a_mask_the_caller_expanded(backend):
    # An expanded mask that requires grad (a non-leaf view here) has a gradient of the expanded shape:
    # each of its elements gets its own score gradient, and the caller's expand sums them.
    _usable(backend)
    torch.manual_seed(6)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D)
    base = torch.randn(1, 1, Lq, Lk, requires_grad=True)
    out = fastattn.attention(q, k, v, attn_mask=base.expand(B, Hq, Lq, Lk), causal=True, backend=backend)
    dout = torch.randn_like(out)
    got, = torch.autograd.grad(out, base, dout)
    want, = torch.autograd.grad(fastattn.reference.attention(q, k, v, attn_mask=base, causal=True), base, dout)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.interpreter
@pytest.mark.parametrize("pattern", PATTERNS[:-1])  # the broadcast ones
def test_triton_deterministic_mode_sums_a_dense_scratch_to_the_same_dbias(pattern):
    _usable("triton")
    torch.manual_seed(4)
    shape = _mask_shape(pattern, B, Hq, Lq, Lk)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, requires_grad=False)
    fwd, lists = op_args(q, k, v, backend="triton", attn_mask=torch.randn(shape), window=(5, 2))
    ops = fastattn.get_backend("triton").ops
    out, lse = ops.fwd(*fwd)
    args = bwd_op_args(fwd, lists, out, lse, compute_dbias=True)
    atomic = ops.bwd(*args)[3]
    torch.use_deterministic_algorithms(True)
    try:
        fixed = ops.bwd(*args)[3]
    finally:
        torch.use_deterministic_algorithms(False)
    assert fixed.shape == atomic.shape == _own_shape(shape)
    torch.testing.assert_close(fixed, atomic, atol=1e-5, rtol=1e-5)


def test_cpu_broadcast_mask_gradient_allocates_no_dense_buffer():
    # Dense, (B, Hq, Lq, Lk) float32 would be 2 * 8 * 1024 * 1024 * 4 = 64 MiB; the mask's own
    # shape (1, 1, 1024, 1024) is 4 MiB. The whole backward must stay far below the dense size.
    _usable("cpu")
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(2)
    b, h, length, d = 2, 8, 1024, 16
    q, k, v = make_qkv(b, h, h, length, length, d)
    bias = torch.zeros(1, 1, length, length, requires_grad=True)
    out = fastattn.attention(q, k, v, attn_mask=bias, causal=True, backend="cpu")
    dout = torch.randn_like(out)
    dense_bytes = b * h * length * length * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(out, (q, k, v, bias), dout)
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert largest < dense_bytes / 4, f"an allocation of {largest} bytes (dense dbias is {dense_bytes})"
    assert bias.grad is None


@pytest.mark.parametrize("pattern", PATTERNS[:-1])
def test_cpu_broadcast_mask_gradient_is_deterministic(pattern):
    _usable("cpu")
    torch.manual_seed(5)
    q, k, v = make_qkv(B, Hq, Hkv, 97, 130, D)
    mask = torch.randn(_mask_shape(pattern, B, Hq, 97, 130), requires_grad=True)
    dout = torch.randn(B, Hq, 97, D)
    first, second = (
        torch.autograd.grad(fastattn.attention(q, k, v, attn_mask=mask, backend="cpu"), mask, dout)[0]
        for _ in range(2)
    )
    assert first.shape == mask.shape and torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_mask_gradient_in_the_masks_own_shape(pattern):
    _usable("cuda")
    torch.manual_seed(3)
    shape = _mask_shape(pattern, B, Hq, Lq, Lk)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, 64, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    mask = torch.randn(shape, device="cuda")
    fwd, lists = op_args(q, k, v, backend="cuda", attn_mask=mask, causal=True)
    ops = fastattn.get_backend("cuda").ops
    out, lse = ops.fwd(*fwd)
    args = bwd_op_args(fwd, lists, out, lse, compute_dbias=True)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            dbias = ops.bwd(*args)[3]
        finally:
            torch.use_deterministic_algorithms(False)
        assert dbias.shape == _own_shape(shape) and dbias.dtype == mask.dtype
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    check_against_reference("cuda", q, k, v, attn_mask=mask.bfloat16().requires_grad_(), causal=True)
