"""fastattn.varlen_attention against a per-sequence loop over the reference, values and gradients."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.block_mask import EMPTY
from fastattn.varlen import varlen_block_mask, varlen_dropout_keep_mask

from .helpers import op_args
from .tolerance import assert_close_to_reference, high_precision

BACKENDS = ["reference", "cpu"]


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _loop(q, k, v, lens_q, lens_k, keeps=None, **kwargs):
    """Reference attention of each sequence alone, packed back: ``out (total_q, Hq, Dv)``, ``lse (Hq, total_q)``.
    ``keeps``: each sequence's dropout keep pattern ``(Hq, Lq_s, Lk_s)`` (with ``dropout_p`` in kwargs)."""
    outs, lses = [], []
    sq = sk = 0
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs, ks, vs = q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk]
        sq, sk = sq + lq, sk + lk
        if lq == 0:
            continue
        if lk == 0:  # no key: zeros, lse -inf
            outs.append(torch.zeros(lq, q.shape[1], v.shape[2], dtype=q.dtype))
            lses.append(torch.full((q.shape[1], lq), float("-inf")))
            continue
        if keeps is not None:  # the kernel's own pattern
            out, lse = reference.attention(*(t[None].transpose(1, 2) for t in (qs, ks, vs)), return_lse=True,
                                           dropout_keep=keeps[s][None], **kwargs)
            out = out.transpose(1, 2)
        else:
            out, lse = fastattn.attention(qs[None], ks[None], vs[None], layout="blhd", backend="reference",
                                          return_lse=True, **kwargs)
        outs.append(out[0])
        lses.append(lse[0].float())
    return torch.cat(outs), torch.cat(lses, dim=1)


def _check(backend, lens_q, lens_k, *, Hq=4, Hkv=2, D=16, Dv=16, seed=0, device="cpu", dtype=torch.float32,
           lse_grad=False, **kwargs):
    """varlen_attention on ``backend`` against the per-sequence reference loop: out, lse and the
    gradients of q, k, v (and through lse too with ``lse_grad``), by the tolerance rule. With
    ``dropout_p``, the reference applies the pattern the kernel reports for the seed the call drew."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((tq, Hq, D), (tk, Hkv, D), (tk, Hkv, Dv)))
    dout = torch.randn(tq, Hq, Dv, generator=g).to(dtype)
    dlse = torch.randn(Hq, tq, generator=g)

    def loss(out, lse):
        total = (out * dout.to(out.dtype)).sum()
        if lse_grad:  # rows that see no key have lse -inf: no gradient flows there
            total = total + torch.where(torch.isfinite(lse), lse * dlse.to(lse.dtype), 0).sum()
        return total

    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    device_kwargs = {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in kwargs.items()}
    rng = torch.random.get_rng_state()
    out, lse = fastattn.varlen_attention(*leaves, _cu(lens_q).to(device), _cu(lens_k).to(device), max(lens_q),
                                         max(lens_k), backend=backend, return_lse=True, **device_kwargs)
    keeps = None
    if kwargs.get("dropout_p", 0) > 0:  # replay the seed the call drew
        torch.random.set_rng_state(rng)
        keeps = [m.cpu() for m in varlen_dropout_keep_mask(backend, reference.draw_seed(), _cu(lens_q).to(device),
                                                           _cu(lens_k).to(device), Hq, kwargs["dropout_p"])]
    assert out.dtype == dtype and lse.dtype == torch.float32
    grads = torch.autograd.grad(loss(out, lse), leaves)
    out, lse = out.cpu(), lse.cpu()
    results = {}
    for ref_dtype in (high_precision(dtype), dtype):
        ref_leaves = [t.to(ref_dtype).requires_grad_() for t in (q, k, v)]
        ref, ref_lse = _loop(*ref_leaves, lens_q, lens_k, keeps, **kwargs)
        ref_grads = torch.autograd.grad(loss(ref, ref_lse.to(ref_dtype)), ref_leaves)
        results[ref_dtype] = (ref, ref_lse, ref_grads)
    (ref_hi, lse_hi, grads_hi), (ref_lp, _, grads_lp) = results[high_precision(dtype)], results[dtype]
    assert out.shape == (tq, Hq, Dv) and lse.shape == (Hq, tq)
    assert_close_to_reference("out", out, ref_hi, ref_lp)
    finite = torch.isfinite(lse_hi)
    assert torch.equal(torch.isfinite(lse), finite)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    torch.testing.assert_close(lse[finite].double(), lse_hi[finite].double(), atol=tol, rtol=tol)
    for name, grad, g_hi, g_lp in zip(("dq", "dk", "dv"), grads, grads_hi, grads_lp):
        assert_close_to_reference(name, grad, g_hi, g_lp)


# Lengths: 0 and 1, Lq_s > Lk_s and Lq_s < Lk_s, sequences that straddle the 64-token tiles.
LENGTHS = [
    ([1, 0, 37, 70, 5], [1, 3, 37, 70, 0]),  # equal lengths, an empty query side, an empty key side
    ([9, 1, 80, 0, 30], [25, 17, 66, 4, 30]),  # Lq_s < Lk_s and Lq_s > Lk_s
]
FEATURES = [
    {},
    {"causal": True},
    {"window": (5, 3)},
    {"causal": True, "window": (20, -1), "softcap": 4.0},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=["equal", "unequal"])
@pytest.mark.parametrize("kwargs", FEATURES, ids=["plain", "causal", "window", "causal-window-softcap"])
def test_matches_per_sequence_reference(backend, lengths, kwargs):
    _check(backend, *lengths, **kwargs)


@pytest.fixture
def triton_varlen_calls():
    """Counts the Triton varlen kernel's forward and backward op calls."""
    pytest.importorskip("triton")
    from fastattn.varlen import varlen_kernel_ops

    ops = varlen_kernel_ops("triton")
    calls = []
    originals = ops.fwd, ops.bwd
    object.__setattr__(ops, "fwd", lambda *args, **kw: calls.append("fwd") or originals[0](*args, **kw))
    object.__setattr__(ops, "bwd", lambda *args, **kw: calls.append("bwd") or originals[1](*args, **kw))
    yield calls
    object.__setattr__(ops, "fwd", originals[0])
    object.__setattr__(ops, "bwd", originals[1])


# The Triton varlen kernels (grids from max_seqlen, offsets read from cu_seqlens) through the
# interpreter on tiny shapes: lengths 0 and 1, Lq_s != Lk_s, GQA/MQA, odd head dims, every feature.
TRITON_CASES = [
    pytest.param(dict(lens=([9, 1, 40, 0, 3], [25, 17, 30, 4, 0]), Hq=4, Hkv=2, D=16, causal=True),
                 id="Lq!=Lk-GQA-D16-causal"),
    pytest.param(dict(lens=([33, 2, 17], [20, 2, 50]), Hq=3, Hkv=1, D=24, Dv=40, window=(6, 3), softcap=2.0,
                      alibi_slopes=torch.tensor([0.3, 0.1, 0.02])), id="MQA-D24-Dv40-window-softcap-alibi"),
    pytest.param(dict(lens=([5, 30, 1], [9, 30, 1]), Hq=2, Hkv=2, D=16, lse_grad=True), id="H2-D16-lse-grad"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_varlen_kernel(case, triton_varlen_calls):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU through the Triton interpreter
    case = dict(case)
    lens_q, lens_k = case.pop("lens")
    _check("triton", lens_q, lens_k, device=device, **case)
    assert triton_varlen_calls == ["fwd", "bwd"], "the Triton varlen kernels did not run"


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_with_equal_offsets(backend):
    slopes = torch.rand(4) * 0.3
    _check(backend, [3, 50, 1], [3, 50, 1], alibi_slopes=slopes, causal=True, Hkv=1)
    # A first sequence without queries shifts every later one by 4 = total_k - total_q: still exact.
    _check(backend, [0, 50, 2], [4, 50, 2], alibi_slopes=slopes, window=(3, 3))


def test_alibi_per_sequence_offsets_on_the_varlen_kernel():
    # Lk_s - Lq_s differs between sequences: exact per sequence on the cpu varlen kernel.
    _check("cpu", [2, 30, 9, 1], [3, 20, 9, 40], alibi_slopes=torch.rand(4) * 0.3, causal=True)


def test_alibi_with_different_offsets_raises_on_the_block_mask_path():
    q, k = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="alibi_slopes with varlen_attention"):
        fastattn.varlen_attention(q, k, k, _cu([2, 2]), _cu([3, 3]), 2, 3, alibi_slopes=torch.ones(2),
                                  backend="reference")


def test_mqa_and_value_head_dim():
    _check("cpu", [17, 2, 97], [5, 40, 97], Hq=3, Hkv=1, D=8, Dv=24, causal=True, seed=1)


def _random_lengths(seed: int, n: int, longest: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, longest + 1, (n,), generator=g).tolist()
    return [*lengths[:-2], 0, 1]  # always a sequence of 0 and one of 1


# The cpu varlen kernel on random packings and odd shapes: head dims 40/72/24 (value 24/40), GQA 6:2 and
# 3:1, every feature; one long sequence whose key tiles the backward splits into several runs.
KERNEL_CASES = [
    pytest.param(dict(lens=(_random_lengths(1, 9, 90), _random_lengths(2, 9, 90)), Hq=6, Hkv=2, D=40, Dv=24,
                      causal=True), id="random-Hq6-Hkv2-D40-Dv24-causal"),
    pytest.param(dict(lens=(_random_lengths(3, 7, 120), _random_lengths(3, 7, 120)), Hq=3, Hkv=1, D=72, Dv=40,
                      window=(17, 5), softcap=3.0), id="random-Hq3-Hkv1-D72-window-softcap"),
    pytest.param(dict(lens=([97, 1, 0, 17], [97, 300, 3, 17]), Hq=2, Hkv=2, D=24, Dv=24, causal=True,
                      alibi_slopes=torch.tensor([0.5, 0.05])), id="Lq<Lk-H2-D24-causal-alibi"),
    pytest.param(dict(lens=([600, 3], [600, 3]), Hq=2, Hkv=1, D=16, Dv=16, causal=True),
                 id="long-sequence-split-backward"),
    pytest.param(dict(lens=([260, 5], [40, 5]), Hq=2, Hkv=1, D=16, Dv=16, causal=True, softcap=2.0),
                 id="Lq>Lk-rows-without-keys"),
]


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_cpu_varlen_kernel(case):
    case = dict(case)
    lens_q, lens_k = case.pop("lens")
    _check("cpu", lens_q, lens_k, **case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_cpu_varlen_kernel_dtypes(dtype):
    _check("cpu", [33, 0, 70], [40, 2, 70], Hq=4, Hkv=2, D=40, causal=True, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_varlen_kernel_lse_gradient(dtype):
    _check("cpu", [5, 70, 0, 1], [9, 70, 3, 0], window=(8, 2), lse_grad=True, dtype=dtype)


def test_varlen_kernel_op_checks_cu_seqlens():
    q = torch.randn(6, 2, 8)
    bad = torch.tensor([0, 2, 5], dtype=torch.int32)  # ends at 5, not at the 6 packed tokens
    good = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0 and end at the number of packed tokens 6"):
        torch.ops.fastattn.varlen_fwd(q, q, q, bad, good, 4, 4, None, 1.0, None, None, 0.0)
    with pytest.raises(RuntimeError, match="max_seqlen_k = 3 is shorter"):
        torch.ops.fastattn.varlen_fwd(q, q, q, good, good, 4, 3, None, 1.0, None, None, 0.0)


def test_varlen_kernel_opcheck():
    q, k, v = torch.randn(9, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    cu_q, cu_k = _cu([4, 0, 5]), _cu([2, 3, 6])
    args = (q, k, v, cu_q, cu_k, 5, 6, torch.rand(4), 0.3, None, 0, 0.0)
    torch.library.opcheck(torch.ops.fastattn.varlen_fwd.default, args)
    out, lse = torch.ops.fastattn.varlen_fwd(*args)
    torch.library.opcheck(torch.ops.fastattn.varlen_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, *args[3:], torch.randn(4, 9)))
    # With dropout (dropout_p, seed after dlse: the schema's defaulted tail).
    out, lse = torch.ops.fastattn.varlen_fwd(*args, 0.25, 77)
    torch.library.opcheck(torch.ops.fastattn.varlen_fwd.default, (*args, 0.25, 77))
    torch.library.opcheck(torch.ops.fastattn.varlen_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, *args[3:], None, 0.25, 77))


def test_varlen_cpp_schemas_equal_python_schemas():
    from fastattn.ops import VARLEN_BWD_SCHEMA, VARLEN_FWD_SCHEMA

    parse = torch._C.parse_schema
    assert str(torch.ops.fastattn.varlen_fwd.default._schema) == str(parse("fastattn::varlen_fwd" + VARLEN_FWD_SCHEMA))
    assert str(torch.ops.fastattn.varlen_bwd.default._schema) == str(parse("fastattn::varlen_bwd" + VARLEN_BWD_SCHEMA))


# ------------------------------------------------------------------------------------------ dropout
@pytest.fixture
def no_block_mask_path(monkeypatch):
    """Fails a call that leaves the varlen kernels for the block-mask path (fastattn.attention)."""
    def refuse(*args, **kwargs):
        raise AssertionError("varlen_attention took the block-mask path instead of a varlen kernel")

    monkeypatch.setattr("fastattn.varlen.attention", refuse)


# Lengths 0 and 1, Lq_s != Lk_s, GQA, causal, window, softcap, ALiBi with per-sequence offsets.
DROPOUT_CASES = [
    pytest.param(dict(lens=([9, 1, 0, 80, 30], [25, 1, 4, 66, 0]), causal=True), id="GQA-causal-0-1"),
    pytest.param(dict(lens=([37, 2, 70], [40, 1, 70]), Hq=3, Hkv=1, D=24, Dv=40, window=(9, 4), softcap=3.0,
                      alibi_slopes=torch.tensor([0.3, 0.1, 0.02])), id="MQA-window-softcap-alibi"),
    pytest.param(dict(lens=([300, 5], [300, 17]), Hq=2, Hkv=1, causal=True), id="long-sequence-split-backward"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_cpu_varlen_kernel_dropout(case, dtype, no_block_mask_path):
    """The cpu varlen kernels' dropout (forward and backward) against the per-sequence reference given
    the pattern the kernel reports for the seed (varlen_dropout_keep_mask)."""
    case = dict(case)
    lens_q, lens_k = case.pop("lens")
    _check("cpu", lens_q, lens_k, dtype=dtype, dropout_p=0.3, **case)


@pytest.mark.interpreter
def test_triton_varlen_kernel_dropout(triton_varlen_calls, no_block_mask_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU through the Triton interpreter
    _check("triton", [9, 1, 0, 40, 3], [25, 1, 4, 30, 0], device=device, causal=True, dropout_p=0.3)
    assert triton_varlen_calls == ["fwd", "bwd"], "the Triton varlen kernels did not run"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot needs a GPU (the interpreter lacks it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_varlen_kernel_dropout_gpu(dtype, triton_varlen_calls):
    _check("triton", [130, 1, 0, 77, 3], [200, 1, 4, 77, 0], Hq=6, Hkv=2, D=64, Dv=64, device="cuda", dtype=dtype,
           causal=True, dropout_p=0.2)
    _check("triton", [64, 33], [17, 90], Hq=4, Hkv=1, D=40, Dv=40, device="cuda", dtype=dtype, window=(7, 2),
           softcap=5.0, dropout_p=0.1)


def _dense_op_out(backend, q, k, v, seed, **kwargs):
    """The padded forward op of ``backend`` on one sequence ``(L, H, D)`` (batch 1) with an explicit seed."""
    fwd, _ = op_args(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2), backend=backend,
                     seed=seed, **kwargs)
    ops = fastattn.get_backend(backend).ops
    return ops.fwd(*fwd)[0][0].transpose(0, 1)


@pytest.mark.parametrize("backend", [
    "cpu", pytest.param("triton", marks=pytest.mark.interpreter),
])
def test_varlen_dropout_equals_each_sequence_alone_on_the_padded_kernel(backend):
    """Sequence s of a packed batch gets exactly the padded kernel's dropout of that sequence alone
    under seed + s: the varlen output equals the padded op's with that seed (the same pattern; the
    values agree to rounding)."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    lens_q, lens_k = [17, 1, 40], [17, 5, 33]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(n), h, 16, generator=g).to(device) for n, h in ((lens_q, 4), (lens_k, 2), (lens_k, 2)))
    torch.manual_seed(11)
    out = fastattn.varlen_attention(q, k, v, _cu(lens_q).to(device), _cu(lens_k).to(device), 40, 33, causal=True,
                                    dropout_p=0.4, backend=backend)
    torch.manual_seed(11)
    seed = reference.draw_seed()
    sq = sk = 0
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        want = _dense_op_out(backend, q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk], seed + s, causal=True,
                             dropout_p=0.4)
        torch.testing.assert_close(out[sq:sq + lq], want, atol=1e-5, rtol=1e-5)
        sq, sk = sq + lq, sk + lk
    # Without dropout the same call differs: the pattern above is not a no-op.
    assert not torch.allclose(out, fastattn.varlen_attention(q, k, v, _cu(lens_q).to(device), _cu(lens_k).to(device),
                                                             40, 33, causal=True, backend=backend))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_varlen_dropout_pattern_statistics_and_reproducibility(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    cu = _cu([97, 97, 0, 50]).to(device)
    keeps = varlen_dropout_keep_mask(backend, 1234, cu, cu, 3, 0.3)
    assert [tuple(m.shape) for m in keeps] == [(3, 97, 97), (3, 97, 97), (3, 0, 0), (3, 50, 50)]
    kept = torch.cat([m.flatten() for m in keeps]).float()
    assert abs(kept.mean().item() - 0.7) < 0.015
    # Two sequences of equal lengths draw different patterns (no shared random numbers), and so does another seed.
    assert not torch.equal(keeps[0], keeps[1])
    assert not torch.equal(keeps[0], varlen_dropout_keep_mask(backend, 1235, cu, cu, 3, 0.3)[0])
    # Reproducible under torch.manual_seed, different without it.
    q = torch.randn(244, 2, 16, device=device)
    torch.manual_seed(7)
    first = fastattn.varlen_attention(q, q, q, cu, cu, 97, 97, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    again = fastattn.varlen_attention(q, q, q, cu, cu, 97, 97, dropout_p=0.5, backend=backend)
    other = fastattn.varlen_attention(q, q, q, cu, cu, 97, 97, dropout_p=0.5, backend=backend)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_cpu_varlen_kernel_gradcheck_dropout():
    g = torch.Generator().manual_seed(4)
    lens_q, lens_k = [3, 0, 4, 1], [2, 1, 5, 1]
    q = torch.randn(8, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(9, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        torch.manual_seed(3)  # one seed, so every evaluation draws the same pattern
        return fastattn.varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), 4, 5, causal=True, dropout_p=0.3,
                                         backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_on_the_block_mask_path():
    """The reference backend (no varlen kernel) runs dropout on the block-mask path, seeded."""
    q = torch.randn(20, 2, 8, requires_grad=True)
    cu = _cu([12, 8])
    torch.manual_seed(0)
    out = fastattn.varlen_attention(q, q, q, cu, cu, 12, 12, causal=True, dropout_p=0.5, backend="reference")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    no_dropout = fastattn.varlen_attention(q, q, q, cu, cu, 12, 12, causal=True, backend="reference")
    assert not torch.allclose(out, no_dropout)


def test_block_mask_skips_other_sequences_tiles():
    # Two sequences of 128 tokens: the tiles pairing them are empty, those inside are full.
    mask = varlen_block_mask(_cu([128, 128]), _cu([128, 128]))
    layout = mask.layout[0, 0]
    assert layout.shape == (4, 4)
    assert (layout[:2, 2:] == EMPTY).all() and (layout[2:, :2] == EMPTY).all()
    assert mask.num_partial == 0


def test_all_sequences_empty():
    q, k = torch.randn(0, 2, 8), torch.randn(5, 2, 8)
    out, lse = fastattn.varlen_attention(q, k, k, _cu([0, 0]), _cu([2, 3]), 0, 3, return_lse=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    q = torch.randn(3, 2, 8)
    out, lse = fastattn.varlen_attention(q, k[:0], k[:0], _cu([3]), _cu([0]), 3, 0, return_lse=True)
    assert torch.equal(out, torch.zeros(3, 2, 8)) and torch.isneginf(lse).all()


@pytest.mark.parametrize(
    "args, error, match",
    [
        ({"cu_seqlens_q": torch.tensor([0, 2, 4])}, TypeError, "cu_seqlens_q must be an int32"),
        ({"cu_seqlens_q": torch.tensor([1, 2, 4], dtype=torch.int32)}, ValueError, "cu_seqlens_q must start at 0"),
        ({"cu_seqlens_k": torch.tensor([0, 5, 4], dtype=torch.int32)}, ValueError, "cu_seqlens_k must be non-decreasing"),
        ({"cu_seqlens_k": torch.tensor([0, 4], dtype=torch.int32)}, ValueError, "same number of sequences"),
        ({"max_seqlen_q": 1}, ValueError, "max_seqlen_q = 1 is shorter"),
        ({"max_seqlen_k": 2.0}, TypeError, "max_seqlen_k must be an int"),
        ({"q": torch.randn(1, 4, 2, 8)}, ValueError, "q must be 3-D"),
        ({"v": torch.randn(3, 2, 8)}, ValueError, "v must have k's number"),
        ({"window": (1, 2, 3)}, TypeError, "window"),
    ],
)
def test_bad_arguments_name_the_argument(args, error, match):
    kwargs = dict(q=torch.randn(4, 2, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8),
                  cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 1, 4], dtype=torch.int32), max_seqlen_q=2, max_seqlen_k=3)
    kwargs.update(args)
    window = kwargs.pop("window", None)
    with pytest.raises(error, match=match):
        fastattn.varlen_attention(**kwargs, window=window)


def test_cpu_varlen_kernel_gradcheck():
    # float64 end to end (the kernel keeps a float64 lse for float64 inputs), causal + window + softcap + ALiBi.
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [3, 0, 4], [2, 1, 5]
    q = torch.randn(7, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.4, 0.1])

    def fn(q, k, v):  # out only: the returned lse is float32, too coarse for finite differences
        return fastattn.varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), 4, 5, causal=True, window=(2, -1),
                                         softcap=3.0, alibi_slopes=slopes, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_cpu_varlen_kernel_keeps_hidden_nan_out_of_rows_that_cannot_see_it():
    """A NaN key and value on a causal diagonal (seen by later rows of its tile, hidden from earlier
    ones) reach exactly the rows that see them, as in the per-sequence reference: out and dq."""
    lens = [40, 70]
    q, k, v = (torch.randn(110, 2, 16).requires_grad_() for _ in range(3))
    with torch.no_grad():
        for t in (k, v):
            t[40 + 20, 1] = float("nan")  # sequence 1, local key 20, head 1: hidden from its rows 0..19
    out = fastattn.varlen_attention(q, k, v, _cu(lens), _cu(lens), 70, 70, causal=True, backend="cpu")
    want, _ = _loop(q.detach(), k.detach(), v.detach(), lens, lens, causal=True)
    assert torch.equal(out.isnan(), want.isnan())
    assert want[40:60].isfinite().all() and want[60:, 1].isnan().all()
    torch.testing.assert_close(out[want.isfinite()], want[want.isfinite()])
    dq, dk, dv = torch.autograd.grad(out[:60].sum(), (q, k, v))
    assert dq[:60].isfinite().all()  # rows that never see the NaN key
    assert dk[:40].isfinite().all() and dv[:40].isfinite().all()  # the other sequence's keys


# ------------------------------------------------------------------------------------------ cuda
def test_cuda_backend_refuses_varlen_with_its_reason(monkeypatch):
    """backend='cuda' (by argument or FASTATTN_BACKEND) raises, giving the varlen reason first."""
    q = torch.randn(6, 2, 64)
    cu = _cu([2, 4])
    with pytest.raises(fastattn.BackendNotSupportedError, match="varlen_attention has no CUDA kernel") as error:
        fastattn.varlen_attention(q, q, q, cu, cu, 4, 4, backend="cuda")
    assert "backend='triton'" in str(error.value)
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    with pytest.raises(fastattn.BackendNotSupportedError, match="varlen_attention has no CUDA kernel"):
        fastattn.varlen_attention(q, q, q, cu, cu, 4, 4)
    assert "varlen_attention has no CUDA kernel" in fastattn.info(print_out=False)


def test_automatic_choice_passes_over_cuda(monkeypatch):
    """Where the padded choice would be cuda (a GPU machine), varlen takes the next backend that serves it."""
    import fastattn.varlen as varlen

    cuda = fastattn.get_backend("cuda")
    chosen = []
    real = varlen.varlen_kernel_ops
    monkeypatch.setattr(varlen, "select_backend", lambda inputs, requested: cuda if requested is None else None)
    monkeypatch.setattr(varlen, "varlen_kernel_ops", lambda name: chosen.append(name) or real(name))
    q = torch.randn(6, 2, 16)
    out = fastattn.varlen_attention(q, q, q, _cu([2, 4]), _cu([2, 4]), 4, 4, causal=True)
    assert chosen[0] == "cpu"  # triton has no GPU here; cpu is next
    want, _ = _loop(q, q, q, [2, 4], [2, 4], causal=True)
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------------- compiled for sm_90a
@pytest.mark.slow
@pytest.mark.parametrize("dtype, head_dim, features", [
    pytest.param("bfloat16", 128, "varlen,causal,dropout,gqa", id="bf16-D128-causal-dropout-gqa"),
    pytest.param("float16", 64, "varlen,window,alibi,softcap", id="fp16-D64-window-alibi-softcap"),
])
def test_triton_varlen_kernels_compile_for_sm90(dtype, head_dim, features):
    """The Triton varlen kernels compile for Hopper (ptxas included, no GPU), fit shared memory and do
    exactly the tile's matmul work per inner-loop iteration (benchmarks/triton_static_report.py,
    feature ``varlen``). They load tiles through pointers, and with GQA and dropout their dK/dV
    kernel spills, as the padded kernels' pointer path does (docs/varlen-and-kvcache.md)."""
    pytest.importorskip("triton")
    from .test_triton_compile import SMEM_LIMIT, compile_case, report

    rows = [report.analyse(c) for c in compile_case(dtype, head_dim, features) if c["kernel"] in report.SHORT]
    assert {r["kernel"] for r in rows} == {"attention_varlen_fwd_kernel", "attention_varlen_bwd_dkdv_kernel",
                                           "attention_varlen_bwd_dq_kernel"}
    for r in rows:
        assert r["shared"] <= SMEM_LIMIT, r
        assert r["loop_macs"] and all(macs == r["ideal_macs"] for macs in r["loop_macs"]), r
