"""Linear attention: the reference's three forms against each other, the state round-trip, the
public function (CPU path), the Triton kernels through the interpreter (values and gradients),
Performer's random features, and validation errors."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.linear import LinearAttentionState, PerformerFeatures, linear_attention, naive
from fastattn.linear.naive import linear_attention_reference
from fastattn.linear.ops import CPU_KERNELS_BUILT

from .tolerance import assert_close_to_reference, high_precision

F16, F32, F64 = torch.float16, torch.float32, torch.float64


def _inputs(B, Hq, Hkv, L, D, Dv, dtype=F64, positive=False):
    make = torch.rand if positive else torch.randn
    q = make(B, Hq, L, D, dtype=dtype)
    k = make(B, Hkv, L, D, dtype=dtype)
    v = torch.randn(B, Hkv, L, Dv, dtype=dtype)
    return q, k, v


def _check(name, run, reference, inputs):
    """``run(*inputs)`` against ``reference`` (same signature) by the tolerance rule, in values and
    in the gradients of every floating input under one random cotangent per output."""
    dtype = inputs[0].dtype
    hp = high_precision(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    leaves_hp = [t.detach().to(hp).requires_grad_() for t in inputs]
    leaves_lp = [t.detach().clone().requires_grad_() for t in inputs]
    outs, outs_hp, outs_lp = run(*leaves), reference(*leaves_hp), reference(*leaves_lp)
    cotangents = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    for i, (o, o_hp, o_lp) in enumerate(zip(outs, outs_hp, outs_lp)):
        assert_close_to_reference(f"{name} output {i}", o, o_hp, o_lp)
    for os_ in (outs, outs_hp, outs_lp):
        sum((o.to(torch.float64) * c).sum() for o, c in zip(os_, cotangents)).backward()
    for i, (a, b, c) in enumerate(zip(leaves, leaves_hp, leaves_lp)):
        assert_close_to_reference(f"{name} grad {i}", a.grad, b.grad, c.grad)


# --------------------------------------------------------------------------- reference forms agree
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "B, Hq, Hkv, L, M, Dv, chunk",
    [
        pytest.param(2, 2, 2, 1, 8, 8, 1, id="B2-H2-L1-M8-chunk1"),
        pytest.param(1, 4, 2, 17, 8, 5, 5, id="B1-Hq4-Hkv2-L17-M8-Dv5-chunk5"),
        pytest.param(1, 3, 1, 97, 6, 7, 16, id="B1-Hq3-Hkv1-L97-M6-Dv7-chunk16"),
        pytest.param(1, 2, 2, 97, 4, 4, 128, id="B1-H2-L97-M4-chunk128"),
    ],
)
def test_forms_agree(B, Hq, Hkv, L, M, Dv, chunk, causal):
    q, k, v = _inputs(B, Hq, Hkv, L, M, Dv, positive=True)
    s0 = torch.randn(B, Hkv, M, Dv, dtype=F64)
    o_par, s_par = naive.parallel(q, k, v, causal, s0)
    o_rec, s_rec = naive.recurrent(q, k, v, causal, s0)
    o_chk, s_chk = naive.chunked(q, k, v, causal, s0, chunk_size=chunk)
    torch.testing.assert_close(o_rec, o_par, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o_chk, o_par, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_rec, s_par, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_chk, s_par, rtol=1e-12, atol=1e-12)


def test_parallel_matches_definition():
    # causal normalised elu+1 attention, written out for one head: an independent check of the forms
    q, k, v = _inputs(1, 1, 1, 9, 4, 3)
    phi = torch.nn.functional.elu
    fq, fk = phi(q[0, 0]) + 1, phi(k[0, 0]) + 1
    rows = []
    for i in range(9):
        w = fq[i] @ fk[: i + 1].T  # (i + 1,)
        rows.append((w[:, None] * v[0, 0, : i + 1]).sum(0) / w.sum())
    expected = torch.stack(rows)
    for form in ("parallel", "recurrent", "chunked"):
        out, _ = linear_attention_reference(q, k, v, causal=True, form=form, chunk_size=4)
        torch.testing.assert_close(out[0, 0], expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- public function (CPU path)
@pytest.mark.parametrize(
    "causal, feature_map, normalize, chunk",
    [
        pytest.param(True, "elu+1", True, 7, id="causal-elu-chunk7"),
        pytest.param(False, "elu+1", True, None, id="full-elu"),
        pytest.param(True, "relu", False, 16, id="causal-relu-unnormalised"),
        pytest.param(True, torch.sigmoid, True, 5, id="causal-callable"),
    ],
)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_path_against_reference(backend, causal, feature_map, normalize, chunk):
    if backend == "cpu" and not CPU_KERNELS_BUILT:
        pytest.skip("fastattn._C was built without the linear kernels")
    q, k, v = _inputs(1, 4, 2, 17, 8, 6, dtype=F32)

    def run(q, k, v):
        return (linear_attention(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                 chunk_size=chunk, backend=backend),)

    def ref(q, k, v):
        return (linear_attention_reference(q, k, v, causal=causal, feature_map=feature_map,
                                           normalize=normalize)[0],)

    _check("cpu linear_attention", run, ref, (q, k, v))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "unnormalised"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_state_round_trip(causal, normalize):
    q, k, v = _inputs(2, 4, 2, 23, 8, 5)
    kwargs = {"causal": causal, "normalize": normalize, "chunk_size": 4}
    whole, state = linear_attention(q, k, v, return_state=True, **kwargs)
    first, mid = linear_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], return_state=True, **kwargs)
    assert isinstance(mid, LinearAttentionState) and mid.kv.shape == (2, 2, 8, 5)
    second, end = linear_attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], return_state=True,
                                   initial_state=mid, **kwargs)
    torch.testing.assert_close(end.kv, state.kv, rtol=1e-12, atol=1e-12)
    if normalize:
        torch.testing.assert_close(end.k_sum, state.k_sum, rtol=1e-12, atol=1e-12)
    else:
        assert end.k_sum is None
    if causal:  # non-causal pieces see different keys than the whole sequence does
        torch.testing.assert_close(torch.cat([first, second], dim=2), whole, rtol=1e-12, atol=1e-12)


def test_decode_token_by_token():
    q, k, v = _inputs(1, 2, 1, 12, 8, 4)
    whole = linear_attention(q, k, v, causal=True)
    state, outs = None, []
    for t in range(12):
        out, state = linear_attention(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], causal=True,
                                      return_state=True, initial_state=state)
        outs.append(out)
    assert state.kv.dtype == F64 and state.k_sum.shape == (1, 1, 8)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-12, atol=1e-12)


def test_state_is_float32_for_half_inputs():
    q, k, v = _inputs(1, 2, 2, 9, 8, 8, dtype=torch.bfloat16)
    out, state = linear_attention(q, k, v, causal=True, return_state=True)
    assert out.dtype == torch.bfloat16 and state.kv.dtype == F32 and state.k_sum.dtype == F32


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param({"q": torch.randn(2, 9, 8)}, "q must be 4-D", id="q-3d"),
        pytest.param({"k": torch.randn(1, 3, 9, 8), "v": torch.randn(1, 3, 9, 4)}, r"multiple of k's heads", id="heads"),
        pytest.param({"k": torch.randn(1, 2, 10, 8)}, "k must be", id="k-length"),
        pytest.param({"v": torch.randn(1, 2, 8, 4)}, "v must be", id="v-length"),
        pytest.param({"v": torch.randn(1, 2, 9, 4, dtype=F64)}, "share a dtype", id="dtype"),
        pytest.param({"feature_map": "softmax"}, "feature_map", id="feature-map-name"),
        pytest.param({"feature_map": 3}, "feature_map", id="feature-map-type"),
        pytest.param({"feature_map": PerformerFeatures(16)}, "head_dim", id="performer-dim"),
        pytest.param({"chunk_size": 0}, "chunk_size", id="chunk-size"),
        pytest.param({"scale": -1.0}, "scale", id="scale"),
        pytest.param({"initial_state": (torch.zeros(1, 2, 8, 5), torch.zeros(1, 2, 8))}, "initial_state.kv",
                     id="state-kv"),
        pytest.param({"initial_state": (torch.zeros(1, 2, 8, 4), None)}, "initial_state.k_sum", id="state-k-sum"),
    ],
)
def test_errors_name_the_argument(change, match):
    args = {"q": torch.randn(1, 4, 9, 8), "k": torch.randn(1, 2, 9, 8), "v": torch.randn(1, 2, 9, 4)}
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError), match=match):
        linear_attention(q, k, v, **args)


def test_exported():
    assert fastattn.linear_attention is linear_attention


# --------------------------------------------------------------------------- Triton kernels (interpreter on CPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_core(monkeypatch):
    pytest.importorskip("triton")
    from fastattn.linear.autograd import LinearAttentionCore

    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")
    return LinearAttentionCore


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "B, Hq, Hkv, L, M, Dv, dtype, causal, chunk, with_state",
    [
        pytest.param(1, 2, 2, 1, 16, 16, F32, True, 16, False, id="B1-H2-L1-M16-fp32-causal"),
        pytest.param(1, 4, 2, 17, 8, 5, F16, True, 16, True, id="B1-Hq4-Hkv2-L17-M8-Dv5-fp16-causal-state"),
        pytest.param(1, 2, 2, 97, 16, 24, F32, True, 32, True, id="B1-H2-L97-M16-Dv24-fp32-causal-chunk32-state"),
        pytest.param(1, 3, 1, 97, 8, 8, F16, True, 16, False, id="B1-Hq3-Hkv1-L97-M8-fp16-causal"),
        pytest.param(2, 2, 1, 97, 8, 8, F16, False, 16, False, id="B2-Hq2-Hkv1-L97-M8-fp16-full"),
        pytest.param(1, 2, 2, 17, 40, 16, F32, False, 16, True, id="B1-H2-L17-M40-Dv16-fp32-full-state"),
    ],
)
def test_triton_core_against_reference(triton_core, B, Hq, Hkv, L, M, Dv, dtype, causal, chunk, with_state):
    q, k, v = (t.to(DEVICE) for t in _inputs(B, Hq, Hkv, L, M, Dv, dtype=dtype, positive=True))
    inputs = (q, k, v, torch.randn(B, Hkv, M, Dv, dtype=dtype, device=DEVICE)) if with_state else (q, k, v)

    def run(q, k, v, s0=None):
        return triton_core.apply(q, k, v, None if s0 is None else s0.float(), causal, chunk, "triton")

    def ref(q, k, v, s0=None):
        return naive.parallel(q, k, v, causal, s0)

    _check("triton core", run, ref, inputs)


@pytest.mark.interpreter
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_public_path_performer_state(triton_core, causal):
    # the whole public function on the kernels: features, normaliser column, state in and out
    features = PerformerFeatures(16, num_features=16)
    q, k, v = (t.to(DEVICE) for t in _inputs(1, 2, 1, 33, 16, 8, dtype=F32))
    s0 = (torch.rand(1, 1, 16, 8, dtype=F32, device=DEVICE), torch.rand(1, 1, 16, dtype=F32, device=DEVICE))
    kwargs = {"causal": causal, "feature_map": features, "initial_state": s0}

    def run(q, k, v):
        out, state = linear_attention(q, k, v, chunk_size=16, return_state=True, backend="triton", **kwargs)
        return out, state.kv, state.k_sum

    def ref(q, k, v):
        out, (kv, k_sum) = linear_attention_reference(q, k, v, **kwargs)
        return out, kv, k_sum

    _check("triton linear_attention", run, ref, (q, k, v))


@pytest.mark.interpreter
def test_triton_chunk_size_must_be_a_tile():
    pytest.importorskip("triton")
    q, k, v = (t.to(DEVICE) for t in _inputs(1, 2, 2, 9, 8, 8, dtype=F32))
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        linear_attention(q, k, v, chunk_size=24, backend="triton")


# --------------------------------------------------------------------------- C++ CPU kernels
cpu_kernels = pytest.mark.skipif(not CPU_KERNELS_BUILT, reason="fastattn._C was built without the linear kernels")
BF16 = torch.bfloat16


@cpu_kernels
@pytest.mark.parametrize(
    "B, Hq, Hkv, L, M, Dv, dtype, causal, chunk, with_state",
    [
        pytest.param(1, 2, 2, 1, 16, 16, F32, True, 64, False, id="B1-H2-L1-M16-fp32-causal"),
        pytest.param(1, 4, 2, 17, 8, 5, F32, True, 5, True, id="B1-Hq4-Hkv2-L17-M8-Dv5-fp32-causal-chunk5-state"),
        pytest.param(2, 3, 1, 97, 6, 7, F64, True, 16, True, id="B2-Hq3-Hkv1-L97-M6-Dv7-fp64-causal-chunk16-state"),
        pytest.param(1, 2, 2, 97, 40, 24, F16, True, 32, False, id="B1-H2-L97-M40-Dv24-fp16-causal-chunk32"),
        pytest.param(1, 4, 1, 33, 16, 9, BF16, True, 8, True, id="B1-Hq4-Hkv1-L33-M16-Dv9-bf16-causal-chunk8-state"),
        pytest.param(2, 2, 1, 97, 8, 8, F32, False, 16, False, id="B2-Hq2-Hkv1-L97-M8-fp32-full"),
        pytest.param(1, 2, 2, 17, 40, 16, F64, False, 7, True, id="B1-H2-L17-M40-Dv16-fp64-full-chunk7-state"),
        pytest.param(1, 2, 1, 23, 12, 5, BF16, False, 64, True, id="B1-Hq2-Hkv1-L23-M12-Dv5-bf16-full-state"),
    ],
)
def test_cpu_core_against_reference(B, Hq, Hkv, L, M, Dv, dtype, causal, chunk, with_state):
    from fastattn.linear.autograd import LinearAttentionCore

    q, k, v = _inputs(B, Hq, Hkv, L, M, Dv, dtype=dtype, positive=True)
    inputs = (q, k, v, torch.randn(B, Hkv, M, Dv, dtype=dtype)) if with_state else (q, k, v)
    state_dtype = torch.promote_types(dtype, F32)

    def run(q, k, v, s0=None):
        return LinearAttentionCore.apply(q, k, v, None if s0 is None else s0.to(state_dtype), causal, chunk, "cpu")

    def ref(q, k, v, s0=None):
        return naive.parallel(q, k, v, causal, s0)

    _check("cpu core", run, ref, inputs)


@cpu_kernels
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_public_path_performer_state_strided(causal):
    # the whole public function on the C++ kernels, on (B, L, H, D) memory seen as (B, H, L, D)
    features = PerformerFeatures(16, num_features=24)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(1, 2, 1, 33, 16, 8, dtype=F32))
    s0 = (torch.rand(1, 1, 24, 8, dtype=F32), torch.rand(1, 1, 24, dtype=F32))
    kwargs = {"causal": causal, "feature_map": features, "initial_state": s0}

    def run(q, k, v):
        out, state = linear_attention(q, k, v, chunk_size=8, return_state=True, backend="cpu", **kwargs)
        return out, state.kv, state.k_sum

    def ref(q, k, v):
        out, (kv, k_sum) = linear_attention_reference(q, k, v, **kwargs)
        return out, kv, k_sum

    _check("cpu linear_attention", run, ref, (q, k, v))


@cpu_kernels
def test_cpu_kernels_empty_sequence_keeps_the_state():
    q, k, v = _inputs(1, 2, 1, 0, 8, 4, dtype=F32)
    s0 = torch.randn(1, 1, 8, 4)
    out, state = torch.ops.fastattn.linear_attention_fwd(q, k, v, s0, True, 64)
    assert out.shape == (1, 2, 0, 4)
    torch.testing.assert_close(state, s0, rtol=0, atol=0)


@cpu_kernels
@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param({"k": torch.randn(1, 2, 10, 8)}, "k must be", id="k-length"),
        pytest.param({"v": torch.randn(1, 3, 9, 4)}, "v must be", id="v-heads"),
        pytest.param({"v": torch.randn(1, 2, 9, 4, dtype=F64)}, "v must have q's dtype", id="dtype"),
        pytest.param({"initial_state": torch.zeros(1, 2, 8, 5)}, "initial_state must have shape", id="state"),
        pytest.param({"chunk_size": 0}, "chunk_size", id="chunk"),
    ],
)
def test_cpu_op_errors_name_the_argument(change, match):
    args = {"q": torch.randn(1, 4, 9, 8), "k": torch.randn(1, 2, 9, 8), "v": torch.randn(1, 2, 9, 4),
            "initial_state": None, "causal": True, "chunk_size": 4}
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn.linear_attention_fwd(*args.values())


@cpu_kernels
def test_cpu_schemas_equal_python_schemas():
    from fastattn.linear.ops import BWD_SCHEMA, FUSED_BWD_SCHEMA, FUSED_FWD_SCHEMA, FWD_SCHEMA

    assert str(torch.ops.fastattn.linear_attention_fwd.default._schema) == "fastattn::linear_attention_fwd" + FWD_SCHEMA
    assert str(torch.ops.fastattn.linear_attention_bwd.default._schema) == "fastattn::linear_attention_bwd" + BWD_SCHEMA
    fused = {"fwd": FUSED_FWD_SCHEMA, "bwd": FUSED_BWD_SCHEMA}
    for kind, schema in fused.items():
        op = getattr(torch.ops.fastattn, f"linear_attention_fused_{kind}").default
        assert str(op._schema) == f"fastattn::linear_attention_fused_{kind}" + schema


@cpu_kernels
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cpu_opcheck(causal, dtype):
    # the fakes (shapes, dtypes, strides) against the kernels, and the ops' registration
    from fastattn.linear.ops import linear_ops

    ops = linear_ops("cpu")
    q, k, v = _inputs(1, 4, 2, 11, 8, 5, dtype=dtype, positive=True)
    s0 = torch.randn(1, 2, 8, 5)
    torch.library.opcheck(ops.fwd, (q, k, v, s0, causal, 4))
    do = torch.randn(1, 4, 11, 5, dtype=dtype)
    torch.library.opcheck(ops.bwd, (do, q, k, v, s0, torch.randn(1, 2, 8, 5), causal, 4))
    torch.library.opcheck(ops.bwd, (do, q, k, v, None, None, causal, 4))


@cpu_kernels
@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "unnormalised"])
@pytest.mark.parametrize("feature_map", ["elu+1", "relu"])
@pytest.mark.parametrize(
    "B, Hq, Hkv, L, D, Dv, dtype, causal, chunk, scale, with_state",
    [
        pytest.param(1, 2, 2, 1, 8, 8, F32, True, None, None, False, id="L1-fp32-causal"),
        pytest.param(1, 4, 2, 17, 8, 5, F32, True, 5, 0.3, True, id="Hq4-Hkv2-L17-Dv5-fp32-causal-chunk5-state"),
        pytest.param(2, 3, 1, 97, 6, 7, F64, True, 16, None, True, id="Hq3-Hkv1-L97-fp64-causal-chunk16-state"),
        pytest.param(1, 4, 1, 33, 16, 9, BF16, True, 8, 2.0, True, id="Hq4-Hkv1-L33-bf16-causal-chunk8-state"),
        pytest.param(1, 2, 2, 40, 12, 6, F16, True, 32, None, False, id="L40-fp16-causal-chunk32"),
        pytest.param(2, 2, 1, 97, 8, 8, F32, False, 16, 0.5, True, id="Hq2-Hkv1-L97-fp32-full-state"),
        pytest.param(1, 2, 1, 23, 12, 5, BF16, False, None, None, False, id="Hq2-Hkv1-L23-bf16-full"),
    ],
)
def test_cpu_fused_path_against_reference(B, Hq, Hkv, L, D, Dv, dtype, causal, chunk, scale, with_state,
                                          feature_map, normalize):
    # elu+1 / relu on the CPU kernels: feature map, scale and normaliser inside the kernel
    q, k, v = _inputs(B, Hq, Hkv, L, D, Dv, dtype=dtype)
    inputs = (q, k, v)
    if with_state:
        inputs += (torch.randn(B, Hkv, D, Dv, dtype=dtype),)
        if normalize:
            inputs += (torch.rand(B, Hkv, D, dtype=dtype) + 0.5,)
    kwargs = {"causal": causal, "feature_map": feature_map, "normalize": normalize, "scale": scale}

    def state_arg(s0):
        return None if not s0 else (tuple(s0) if normalize else s0[0])

    def run(q, k, v, *s0):
        out, state = linear_attention(q, k, v, chunk_size=chunk, return_state=True, initial_state=state_arg(s0),
                                      backend="cpu", **kwargs)
        assert (state.k_sum is None) != normalize
        return (out, state.kv) + ((state.k_sum,) if normalize else ())

    def ref(q, k, v, *s0):
        out, state = linear_attention_reference(q, k, v, initial_state=state_arg(s0), **kwargs)
        return (out,) + (tuple(state) if normalize else (state,))

    _check("cpu fused linear_attention", run, ref, inputs)


@cpu_kernels
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_fused_zero_normaliser_row_outputs_zero(causal):
    # relu features of an all-negative query are 0: its normaliser is exactly 0, and so is its output
    q, k, v = _inputs(1, 2, 1, 13, 8, 4, dtype=F32)
    q[:, :, 5] = -q[:, :, 5].abs() - 0.1
    kwargs = {"causal": causal, "feature_map": "relu"}

    def run(q, k, v):
        return (linear_attention(q, k, v, chunk_size=4, backend="cpu", **kwargs),)

    def ref(q, k, v):
        return (linear_attention_reference(q, k, v, **kwargs)[0],)

    out = run(q, k, v)[0]
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    assert torch.isfinite(out).all()
    _check("cpu fused relu zero row", run, ref, (q, k, v))


@cpu_kernels
@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "unnormalised"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_fused_opcheck(causal, normalize):
    q, k, v = _inputs(1, 4, 2, 11, 8, 5, dtype=F32)
    s0 = torch.rand(1, 2, 8, 5 + normalize)
    out, state, den = torch.ops.fastattn.linear_attention_fused_fwd(q, k, v, s0, causal, 4, 1, normalize, 0.7)
    torch.library.opcheck(torch.ops.fastattn.linear_attention_fused_fwd.default,
                          (q, k, v, s0, causal, 4, 1, normalize, 0.7))
    do = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastattn.linear_attention_fused_bwd.default,
                          (do, q, k, v, out, den, s0, torch.randn_like(state), causal, 4, 2, normalize, 0.7))


@cpu_kernels
def test_cpu_fused_op_errors_name_the_argument():
    q, k, v = _inputs(1, 2, 1, 9, 8, 4, dtype=F32)
    with pytest.raises(RuntimeError, match="feature_map must be"):
        torch.ops.fastattn.linear_attention_fused_fwd(q, k, v, None, True, 4, 7, True, 1.0)
    with pytest.raises(RuntimeError, match="initial_state must have shape"):
        torch.ops.fastattn.linear_attention_fused_fwd(q, k, v, torch.zeros(1, 1, 8, 4), True, 4, 1, True, 1.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph_matches_eager(backend):
    # aot_eager: dynamo and AOT autograd trace through the public function (fakes of the C++ ops
    # included) without inductor's slow C++ code generation
    if backend == "cpu" and not CPU_KERNELS_BUILT:
        pytest.skip("fastattn._C was built without the linear kernels")

    def f(q, k, v, kv, k_sum):
        out, state = linear_attention(q, k, v, causal=True, chunk_size=8, return_state=True,
                                      initial_state=(kv, k_sum), backend=backend)
        return out, state.kv

    q, k, v = _inputs(1, 4, 2, 19, 8, 5, dtype=F32)
    state = (torch.rand(1, 2, 8, 5), torch.rand(1, 2, 8))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_c = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = f(*leaves, *state)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves_c, *state)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sum(o.sum() for o in eager).backward()
    sum(o.sum() for o in compiled).backward()
    for a, b in zip(leaves_c, leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_backend_choice():
    from fastattn.linear.api import choose_backend, default_chunk_size

    q = torch.randn(1, 2, 5, 8)
    assert choose_backend(q, None) == ("cpu" if CPU_KERNELS_BUILT else "reference")
    assert choose_backend(q, "reference") == "reference"
    assert default_chunk_size(F32, "triton") == 32 and default_chunk_size(F16, "triton") == 64
    assert default_chunk_size(F32, "cpu") == 64
    with pytest.raises(ValueError, match="backend must be"):
        linear_attention(q, q, q, backend="cuda")
    if not CPU_KERNELS_BUILT:
        with pytest.raises(ValueError, match="backend='cpu' cannot run"):
            linear_attention(q, q, q, backend="cpu")


# --------------------------------------------------------------------------- benchmarks
def test_bench_linear_providers_compute_linear_attention():
    from fastattn.bench.providers import LinearProvider, Unsupported
    from fastattn.bench.workloads import Workload, make_case, preset

    p = preset("linear", "cpu")
    assert [w.seqlen for w in p.workloads] == [4096, 8192, 16384, 32768, 65536]
    assert all(w.kind == "linear" and w.causal for w in p.workloads)
    case = make_case(Workload("linear", 1, 2, 2, 33, 8), F32, "cpu")
    expected, _ = linear_attention_reference(case.q.double(), case.k.double(), case.v.double(), causal=True)
    for backend in (["cpu"] if CPU_KERNELS_BUILT else []) + ["reference", "naive"]:
        run = LinearProvider(backend).build(case, explicit=True)
        torch.testing.assert_close(run.fn().double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(Unsupported, match="linear"):
        LinearProvider("reference").build(make_case(Workload("causal", 1, 2, 2, 33, 8), F32, "cpu"))


def _linear_scaling_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "linear_scaling.py"
    spec = importlib.util.spec_from_file_location("linear_scaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_scaling_summary():
    script = _linear_scaling_script()
    rows = []
    for L in (4096, 8192, 32768):
        for provider, time_ms, memory in (("linear-cpu", 1e-3 * L, 10 * L), ("sdpa", 1e-6 * L * L, 3 * L)):
            rows.append({"workload": "linear", "mode": "fwd", "status": "ok", "provider": provider, "seqlen": L,
                         "time_ms": time_ms, "peak_mem_bytes": memory})
    rows.append({"workload": "causal", "mode": "fwd", "status": "ok", "provider": "sdpa", "seqlen": 4096,
                 "time_ms": 1.0, "peak_mem_bytes": 1})  # another workload: ignored
    s = script.summary({"results": rows})
    assert s["exponents"]["linear-cpu"]["time"] == pytest.approx(1.0)
    assert s["exponents"]["sdpa"]["time"] == pytest.approx(2.0)
    assert s["exponents"]["linear-cpu"]["memory"] == pytest.approx(1.0)
    assert s["speedup_at"]["linear-cpu"]["sdpa"] == pytest.approx(32.768)
    with pytest.raises(ValueError, match="two lengths"):
        script.fit_exponent([4096], [1.0])


def test_bench_linear_preset_runs():
    # the runner end to end on tiny lengths: every provider of the preset measured
    from fastattn.bench import bench_config, run_bench

    doc = run_bench(bench_config("linear", "cpu", seq_lens=[64, 128]), progress=False)
    ok = {(r["provider"], r["seqlen"]) for r in doc["results"] if r["status"] == "ok"}
    providers = (["linear-cpu"] if CPU_KERNELS_BUILT else []) + ["linear-reference", "sdpa"]
    assert ok == {(p, L) for p in providers for L in (64, 128)}, doc["results"]


# --------------------------------------------------------------------------- Performer (FAVOR+)
def test_performer_deterministic_and_redraw():
    torch.manual_seed(3)
    a = PerformerFeatures(8, 20)
    torch.manual_seed(3)
    b = PerformerFeatures(8, 20)
    assert torch.equal(a.projection, b.projection) and a.projection.shape == (20, 8)
    before = a.projection.clone()
    a.redraw()
    assert not torch.equal(a.projection, before)
    block = a.projection[:8].double()
    gram = block @ block.T  # rows of one block are orthogonal
    torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(8, 8, dtype=F64),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_performer_stabiliser_is_exact_when_normalised(causal):
    features = PerformerFeatures(8, 32).double()
    q, k, v = _inputs(1, 2, 2, 17, 8, 4)
    v_aug, _ = naive.with_normalizer(v, None)
    outs = []
    for stabilize in (True, False):
        phi_q, phi_k = features(q, True, stabilize), features(k, False, stabilize)
        outs.append(naive.split_normalizer(*naive.parallel(phi_q, phi_k, v_aug, causal))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-12)
    assert features(q * 30, True).max() <= 1 / 32**0.5 + 1e-12  # large inputs stay bounded


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_performer_error_falls_with_num_features(causal):
    from fastattn.linear.features import softmax_approximation_error

    errors = [softmax_approximation_error(16, 48, m, seeds=range(3), causal=causal, input_std=0.5)
              for m in (16, 256, 4096)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors


# --------------------------------------------------------------------------- modules
@pytest.mark.parametrize("module", ["linear", "performer"])
def test_module_matches_functional_and_decodes(module):
    from fastattn.nn import LinearAttention, LinearAttentionCache, PerformerAttention

    if module == "linear":
        attn = LinearAttention(32, 4, num_kv_heads=2, causal=True, chunk_size=4, position="rotary")
    else:
        attn = PerformerAttention(32, 4, num_kv_heads=2, causal=True, num_features=12)
    attn = attn.double()
    x = torch.randn(2, 11, 32, dtype=F64, requires_grad=True)
    y = attn(x)
    assert y.shape == (2, 11, 32)
    if module == "performer":  # the functional form by hand: projections, features, output projection
        q, k, v = attn.qkv_proj(x).split([32, 16, 16], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, 8)).transpose(1, 2) for t in (q, k, v))
        out = linear_attention(q, k, v, causal=True, feature_map=attn.features)
        torch.testing.assert_close(y, attn.out_proj(out.transpose(1, 2).reshape(2, 11, 32)))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    cache = LinearAttentionCache()
    steps = [attn(x[:, :5].detach(), cache=cache)] + [attn(x[:, t : t + 1].detach(), cache=cache) for t in range(5, 11)]
    assert cache.length == 11 and cache.state.kv.shape == (2, 2, 12 if module == "performer" else 8, 8)
    torch.testing.assert_close(torch.cat(steps, dim=1), y.detach(), rtol=1e-10, atol=1e-10)


def test_performer_module_state_dict_and_redraw():
    from fastattn.nn import PerformerAttention

    torch.manual_seed(1)
    a = PerformerAttention(16, 2, num_features=8)
    b = PerformerAttention(16, 2, num_features=8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    b.redraw_features()
    assert not torch.allclose(a(x), b(x))


def test_module_errors():
    from fastattn.nn import LinearAttention, LinearAttentionCache, PerformerAttention

    with pytest.raises(ValueError, match="position"):
        LinearAttention(16, 2, position="alibi")
    with pytest.raises(ValueError, match="feature_map"):
        PerformerAttention(16, 2, feature_map="relu")
    with pytest.raises(ValueError, match="cache"):
        LinearAttention(16, 2)(torch.randn(1, 3, 16), cache=LinearAttentionCache())
    with pytest.raises(ValueError, match="x must be"):
        LinearAttention(16, 2)(torch.randn(1, 3, 8))


# --------------------------------------------------------------------------- LSH attention (Reformer)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared-qk", "separate-k"])
def test_lsh_one_bucket_is_exact_attention(causal, shared_qk):
    q, k, v = _inputs(1, 2, 2, 37, 16, 8, dtype=F32)
    keys = q / q.norm(dim=-1, keepdim=True) if shared_qk else k
    out = fastattn.lsh_attention(q, None if shared_qk else k, v, n_buckets=1, chunk_size=64, causal=causal,
                                 shared_qk=shared_qk)
    torch.testing.assert_close(out, fastattn.attention(q, keys, v, causal=causal), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "L, n_buckets, n_hashes, chunk, causal",
    [
        pytest.param(37, 4, 2, 8, True, id="L37-buckets4-hashes2-chunk8-causal"),
        pytest.param(17, 2, 1, 16, False, id="L17-buckets2-hashes1-chunk16"),
        pytest.param(41, 6, 3, 16, False, id="L41-buckets6-hashes3-chunk16"),
    ],
)
def test_lsh_against_reference(L, n_buckets, n_hashes, chunk, causal):
    from fastattn.linear.lsh import lsh_attention_reference

    q, k, v = _inputs(1, 2, 2, L, 16, 8, dtype=F32)
    rotations = torch.randn(n_hashes, 16, n_buckets // 2)
    kwargs = {"n_buckets": n_buckets, "n_hashes": n_hashes, "chunk_size": chunk, "causal": causal,
              "shared_qk": False, "rotations": rotations}

    def run(q, k, v):
        return (fastattn.lsh_attention(q, k, v, **kwargs),)

    def ref(q, k, v):
        return (lsh_attention_reference(q, k, v, **kwargs),)

    _check("lsh_attention", run, ref, (q, k, v))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"n_buckets": 3}, "n_buckets", id="odd-buckets"),
        pytest.param({"n_buckets": 2, "n_hashes": 0}, "n_hashes", id="hashes"),
        pytest.param({"n_buckets": 2, "chunk_size": 0}, "chunk_size", id="chunk"),
        pytest.param({"n_buckets": 2, "rotations": torch.randn(1, 8, 2)}, "rotations", id="rotations"),
    ],
)
def test_lsh_errors(kwargs, match):
    q, _, v = _inputs(1, 2, 2, 9, 16, 8, dtype=F32)
    with pytest.raises(ValueError, match=match):
        fastattn.lsh_attention(q, None, v, **kwargs)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lsh_module_one_bucket_is_attention_module(causal):
    from fastattn.nn import Attention, LSHAttention

    lsh = LSHAttention(32, 4, causal=causal, n_buckets=1, chunk_size=64, shared_qk=False)
    exact = Attention(32, 4, causal=causal)
    exact.load_state_dict(lsh.state_dict())
    x = torch.randn(2, 19, 32, requires_grad=True)
    y = lsh(x)
    torch.testing.assert_close(y, exact(x), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert LSHAttention(32, 4, n_buckets=4, chunk_size=8)(x).shape == (2, 19, 32)


@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared-qk", "separate-k"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lsh_gqa_against_reference_on_repeated_heads(causal, shared_qk):
    # GQA (Hq = 6, Hkv = 2) against the reference given every query head its own copy of k and v
    from fastattn.linear.lsh import lsh_attention_reference

    q, k, v = _inputs(1, 6, 2, 29, 16, 8, dtype=F32)
    kwargs = {"n_buckets": 4, "n_hashes": 2, "chunk_size": 8, "causal": causal, "shared_qk": shared_qk,
              "rotations": torch.randn(2, 16, 2)}

    def run(q, v, k=None):
        return (fastattn.lsh_attention(q, k, v, **kwargs),)

    def ref(q, v, k=None):
        k_rep = None if k is None else k.repeat_interleave(3, dim=1)
        return (lsh_attention_reference(q, k_rep, v.repeat_interleave(3, dim=1), **kwargs),)

    _check("lsh_attention gqa", run, ref, (q, v) if shared_qk else (q, v, k))


def test_lsh_gqa_errors():
    q, k, v = _inputs(1, 6, 4, 9, 16, 8, dtype=F32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        fastattn.lsh_attention(q, k, v, n_buckets=2, shared_qk=False)
    with pytest.raises(ValueError, match="same heads"):
        fastattn.lsh_attention(q, k[:, :2], v[:, :3], n_buckets=2, shared_qk=False)


def test_lsh_module_gqa_one_bucket_is_attention_module():
    from fastattn.nn import Attention, LSHAttention

    lsh = LSHAttention(32, 4, 2, causal=True, n_buckets=1, chunk_size=64, shared_qk=False)
    exact = Attention(32, 4, 2, causal=True)
    exact.load_state_dict(lsh.state_dict())
    x = torch.randn(2, 19, 32)
    torch.testing.assert_close(lsh(x), exact(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Transformer blocks: attention=
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("attention", ["linear", "performer", "lsh"])
def test_transformer_layers_attention_kind(attention, batch_first):
    from fastattn.nn import LinearAttention, LSHAttention, TransformerDecoderLayer, TransformerEncoderLayer
    from fastattn.nn.transformer import EfficientSelfAttention

    torch.manual_seed(0)
    kwargs = {"n_buckets": 1, "chunk_size": 64, "shared_qk": False} if attention == "lsh" else {}
    enc = TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, attention=attention,
                                  attention_kwargs=kwargs)
    assert isinstance(enc.self_attn, EfficientSelfAttention)
    assert isinstance(enc.self_attn.attn, LSHAttention if attention == "lsh" else LinearAttention)
    x = torch.randn(2, 13, 32) if batch_first else torch.randn(13, 2, 32)
    for is_causal in (False, True):
        y = enc(x, is_causal=is_causal)
        # the layer by hand: post-norm, the attention module on (B, L, E), the feed-forward
        xb = x if batch_first else x.transpose(0, 1)
        h = enc.norm1(xb + enc.self_attn.attn(xb, causal=is_causal))
        expected = enc.norm2(h + enc.linear2(torch.relu(enc.linear1(h))))
        torch.testing.assert_close(y, expected if batch_first else expected.transpose(0, 1))
    if attention == "lsh":  # one bucket: exact attention, so the causal flag must reach the kernel
        assert not torch.allclose(enc(x, is_causal=True), enc(x, is_causal=False))
    dec = TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, attention=attention,
                                  attention_kwargs=kwargs)
    memory = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    out = dec(x, memory, tgt_is_causal=True)
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None for p in dec.self_attn.parameters())


def test_transformer_linear_attention_is_causal_in_the_decoder():
    from fastattn.nn import Transformer

    torch.manual_seed(0)
    model = Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True, attention="linear")
    src, tgt = torch.randn(2, 9, 32), torch.randn(2, 11, 32)
    out = model(src, tgt, tgt_is_causal=True)
    changed = tgt.clone()
    changed[:, 6:] += 1.0  # a causal decoder's first 6 positions cannot see this
    out2 = model(src, changed, tgt_is_causal=True)
    torch.testing.assert_close(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_transformer_attention_errors():
    from fastattn.nn import TransformerEncoderLayer

    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerEncoderLayer(32, 4, attention="flash")
    with pytest.raises(ValueError, match="attention_kwargs"):
        TransformerEncoderLayer(32, 4, attention_kwargs={"num_features": 8})
    layer = TransformerEncoderLayer(32, 4, batch_first=True, attention="linear")
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, src_key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, src_mask=torch.zeros(5, 5, dtype=torch.bool))


def test_decode_step_costs_o_of_m_times_dv():
    from torch.utils.flop_counter import FlopCounterMode

    B, H, M, Dv = 1, 2, 16, 8
    q, k, v = _inputs(B, H, H, 300, M, Dv, dtype=F32)
    # the reference backend: FlopCounterMode counts torch's matmuls, not the C++ kernels' BLAS calls
    _, state = linear_attention(q, k, v, causal=True, return_state=True, backend="reference")
    step = [t[:, :, -1:] for t in (q, k, v)]
    with FlopCounterMode(display=False) as counter:
        linear_attention(*step, causal=True, initial_state=state, backend="reference")
    # q @ S, k^T v and the 1x1 intra-chunk block, each 2 * M * (Dv + 1) per head: independent of the prefix
    assert 0 < counter.get_total_flops() <= 8 * B * H * M * (Dv + 1)
