"""Linear attention's op level: the schema pair every kernel backend implements, its fakes, and the ops.

The core takes feature-mapped queries and keys (the feature map and the normaliser column are
applied before, in :func:`fastattn.linear_attention`) and one dtype for ``q``, ``k`` and ``v``:

* forward ``(q (B, Hq, L, M), k (B, Hkv, L, M), v (B, Hkv, L, Dv), initial_state (B, Hkv, M, Dv) or None,
  causal, chunk_size) -> (out (B, Hq, L, Dv) in v's dtype, state (B, Hkv, M, Dv))``;
* backward ``(dout, q, k, v, initial_state, dstate, causal, chunk_size) -> (dq, dk, dv, d_initial_state)``,
  ``dstate`` the gradient of the returned state (None: zero).

The CPU kernels also have a fused pair, ``fastattn::linear_attention_fused_fwd/bwd``
(:data:`FUSED_FWD_SCHEMA`, :data:`FUSED_BWD_SCHEMA`): raw ``q``/``k`` in, the feature map
(:data:`FEATURE_CODES`; 0 for none) applied to tiles after the ``sqrt(scale)`` factor, and with
``normalize`` the normaliser ``z = sum phi(k)`` carried as an extra state column ``(B, Hkv, M, Dv + 1)``
and the division done in the kernel; the forward also returns the denominators ``(B, Hq, L)``
(``(B, Hq, 0)`` without normalisation), which the backward reads with the output.

The state is float32 (float64 for float64 inputs on the CPU kernels). Two backends implement
the pair: ``"cpu"``, the C++ kernels ``fastattn::linear_attention_fwd/bwd`` (csrc/cpu/linear_attention.cpp,
schemas declared in csrc/bindings.cpp) and ``"triton"``, ``fastattn::linear_attention_triton_fwd/bwd``
(``torch.library.triton_op`` launching through ``wrap_triton`` on a GPU, so torch.compile sees the
kernels; opaque custom ops under the interpreter). Both have fakes, so ``torch.compile(fullgraph=True)``
traces through them.
"""

from __future__ import annotations

import functools

import torch

from .._extension import load as load_extension
from ..ops import BackendOps

FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, Tensor? initial_state, bool causal, int chunk_size) -> (Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? initial_state, Tensor? dstate, bool causal, "
    "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor)"
)


# The CPU kernels' fused form: the feature map (by code), sqrt(scale) and the normaliser applied in the kernel.
FEATURE_CODES = {"elu+1": 1, "relu": 2}
FUSED_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? initial_state, bool causal, int chunk_size, int feature_map, "
    "bool normalize, float scale) -> (Tensor, Tensor, Tensor)"
)
FUSED_BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor denom, Tensor? initial_state, Tensor? dstate, "
    "bool causal, int chunk_size, int feature_map, bool normalize, float scale) -> (Tensor, Tensor, Tensor, Tensor)"
)


def state_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """The state's dtype on a backend: float32, or float64 for float64 inputs on the CPU kernels."""
    return torch.promote_types(dtype, torch.float32) if backend == "cpu" else torch.float32


def fwd_fake(q, k, v, initial_state, causal, chunk_size, *, backend: str):
    B, Hq, L, M = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    state = q.new_empty((B, k.shape[1], M, v.shape[-1]), dtype=state_dtype(q.dtype, backend))
    return out, state


def bwd_fake(dout, q, k, v, initial_state, dstate, causal, chunk_size, *, backend: str):
    B, Hkv, _, M = k.shape
    ds0 = q.new_empty((B, Hkv, M, v.shape[-1]), dtype=state_dtype(q.dtype, backend))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds0


def fused_fwd_fake(q, k, v, initial_state, causal, chunk_size, feature_map, normalize, scale):
    B, Hq, L, M = q.shape
    sdtype = state_dtype(q.dtype, "cpu")
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    state = q.new_empty((B, k.shape[1], M, v.shape[-1] + int(normalize)), dtype=sdtype)
    return out, state, q.new_empty((B, Hq, L if normalize else 0), dtype=sdtype)


def fused_bwd_fake(dout, q, k, v, out, denom, initial_state, dstate, causal, chunk_size, feature_map, normalize,
                   scale):
    B, Hkv, _, M = k.shape
    ds0 = q.new_empty((B, Hkv, M, v.shape[-1] + int(normalize)), dtype=state_dtype(q.dtype, "cpu"))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds0


def _cpu_kernels_built() -> bool:
    module, _ = load_extension()
    return module is not None and hasattr(torch.ops.fastattn, "linear_attention_fused_fwd")


# Decided once, at import: torch.compile traces the dispatch, and the fakes must exist before it does.
CPU_KERNELS_BUILT = _cpu_kernels_built()
if CPU_KERNELS_BUILT:
    torch.library.register_fake("fastattn::linear_attention_fwd", functools.partial(fwd_fake, backend="cpu"))
    torch.library.register_fake("fastattn::linear_attention_bwd", functools.partial(bwd_fake, backend="cpu"))
    torch.library.register_fake("fastattn::linear_attention_fused_fwd", fused_fwd_fake)
    torch.library.register_fake("fastattn::linear_attention_fused_bwd", fused_bwd_fake)


def _triton_fwd(q, k, v, initial_state, causal, chunk_size):
    from ..triton_kernels.linear_attention import linear_attention_fwd

    return linear_attention_fwd(q, k, v, initial_state, causal, chunk_size)


def _triton_bwd(dout, q, k, v, initial_state, dstate, causal, chunk_size):
    from ..triton_kernels.linear_attention import linear_attention_bwd

    return linear_attention_bwd(q, k, v, dout, initial_state, dstate, causal, chunk_size)


def _build_triton() -> BackendOps:
    from ..backends.triton import _in_interpreter, ensure_kernels_importable

    ensure_kernels_importable()
    # Interpreted kernels cannot be traced (wrap_triton hands them back as they are): opaque ops there.
    use_triton_op = not _in_interpreter()
    register = torch.library.triton_op if use_triton_op else torch.library.custom_op
    fwd = register("fastattn::linear_attention_triton_fwd", _triton_fwd, mutates_args=(), schema=FWD_SCHEMA)
    bwd = register("fastattn::linear_attention_triton_bwd", _triton_bwd, mutates_args=(), schema=BWD_SCHEMA)
    if not use_triton_op:
        fwd.register_fake(functools.partial(fwd_fake, backend="triton"))
        bwd.register_fake(functools.partial(bwd_fake, backend="triton"))
    return BackendOps(fwd=fwd, bwd=bwd)


_OPS: dict[str, BackendOps] = {}
if CPU_KERNELS_BUILT:
    _OPS["cpu"] = BackendOps(fwd=torch.ops.fastattn.linear_attention_fwd.default,
                             bwd=torch.ops.fastattn.linear_attention_bwd.default)


def linear_ops(backend: str) -> BackendOps:
    """The forward/backward ops of ``"cpu"`` or ``"triton"`` (the Triton ones registered on first use)."""
    if backend not in _OPS:
        if backend != "triton":
            raise ValueError(f"backend {backend!r} has no linear attention ops (CPU kernels built: {CPU_KERNELS_BUILT})")
        _OPS[backend] = _build_triton()
    return _OPS[backend]
