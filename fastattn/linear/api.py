"""``linear_attention``: the public function (validation, feature maps, normalisation, dispatch)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import naive
from .features import PerformerFeatures, featurize, resolve_feature_map
from .ops import CPU_KERNELS_BUILT, FEATURE_CODES, state_dtype

DEFAULT_CHUNK_SIZE = 64


class LinearAttentionState(NamedTuple):
    """The recurrent state after a call, float32: ``kv = sum_j phi(k_j)^T v_j`` ``(B, Hkv, M, Dv)``
    and, with normalisation, ``k_sum = sum_j phi(k_j)`` ``(B, Hkv, M)`` (None without)."""

    kv: torch.Tensor
    k_sum: torch.Tensor | None


def _check_inputs(q, k, v, feature_map, chunk_size, scale, initial_state, normalize):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, L, D = q.shape
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, Hkv, L={L}, D={D}), got shape {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be (B, Hkv, L) = {tuple(k.shape[:3])} + (Dv,), got shape {tuple(v.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({k.shape[1]}) (GQA)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if isinstance(feature_map, PerformerFeatures) and feature_map.head_dim != D:
        raise ValueError(f"feature_map's head_dim ({feature_map.head_dim}) must equal q's head dim ({D})")
    if not isinstance(feature_map, PerformerFeatures) and feature_map != "performer":
        resolve_feature_map(feature_map)  # raises on unknown names
    if initial_state is not None:
        kv, k_sum = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
        if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or tuple(kv.shape[:2]) != (B, k.shape[1]) \
                or kv.shape[3] != v.shape[3]:
            raise ValueError(
                f"initial_state.kv must be (B={B}, Hkv={k.shape[1]}, M, Dv={v.shape[3]}), "
                f"got {tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}"
            )
        if normalize and (k_sum is None or tuple(k_sum.shape) != tuple(kv.shape[:3])):
            raise ValueError(
                f"initial_state.k_sum must be (B, Hkv, M) = {tuple(kv.shape[:3])} when normalize=True, "
                f"got {None if k_sum is None else tuple(k_sum.shape)}"
            )


BACKENDS = ("triton", "cpu", "reference")


def backend_reasons(backend: str, q: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run linear attention on ``q`` (empty when it can)."""
    if backend == "reference":
        return []
    if backend == "cpu":
        reasons = [] if q.device.type == "cpu" else [f"q is on {q.device}, the C++ kernels run on the CPU"]
        if not CPU_KERNELS_BUILT:
            reasons.append("fastattn._C has no linear attention kernels (build the extension from this source)")
        return reasons
    if backend == "triton":
        from ..backends.triton import _TRITON_INSTALLED, _in_interpreter

        if not _TRITON_INSTALLED:
            return ["triton is not installed"]
        if not q.is_cuda and not _in_interpreter():
            return [f"q is on {q.device}: the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"]
        return []
    raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def choose_backend(q: torch.Tensor, backend: str | None) -> str:
    """``backend`` if it can serve ``q`` (else a ValueError with its reasons); with None the first of
    triton (CUDA tensors), cpu (the C++ kernels), reference (the chunked PyTorch form) that can."""
    if backend is not None:
        reasons = backend_reasons(backend, q)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run this linear_attention call: " + "; ".join(reasons))
        return backend
    if q.is_cuda and not backend_reasons("triton", q):
        return "triton"
    return "cpu" if not backend_reasons("cpu", q) else "reference"


def default_chunk_size(dtype: torch.dtype, backend: str) -> int:
    """64 positions, or 32 for float32 on the Triton kernels: compiled for sm_90, their float32
    backward at 64 positions with D = 64 (plus the normaliser column) needs 256 KiB of shared
    memory, more than an SM has; at 32 it needs at most 192 KiB."""
    return 32 if backend == "triton" and dtype == torch.float32 else DEFAULT_CHUNK_SIZE


def core(phi_q, phi_k, v, causal: bool, initial_state, chunk_size: int | None, backend: str):
    """Unnormalised linear attention on features: a kernel backend's ops or the chunked torch form."""
    chunk = chunk_size or default_chunk_size(v.dtype, backend)
    if backend == "reference":
        o, state = naive.chunked(phi_q, phi_k, v, causal, initial_state, chunk)
        return o.to(v.dtype), state.to(torch.promote_types(v.dtype, torch.float32))
    from .autograd import LinearAttentionCore

    state0 = None if initial_state is None else initial_state.to(state_dtype(v.dtype, backend))
    # the kernels take one dtype: features are cast to the inputs' (they were made in float32)
    return LinearAttentionCore.apply(phi_q.to(v.dtype), phi_k.to(v.dtype), v, state0, causal, chunk, backend)


def fused_cpu(q, k, v, causal: bool, feature_map: str, normalize: bool, scale: float | None, initial_state,
              chunk_size: int | None):
    """The CPU kernels' fused form (feature map, scale and normaliser in the kernel): ``(out, kv, k_sum)``."""
    from .autograd import LinearAttentionFusedCPU

    sdtype = state_dtype(v.dtype, "cpu")
    state0 = None
    if initial_state is not None:
        kv0, k_sum0 = initial_state
        state0 = kv0.to(sdtype)
        if normalize:
            state0 = torch.cat([state0, k_sum0.to(sdtype).unsqueeze(-1)], dim=-1)  # (B, Hkv, M, Dv + 1)
    out, state, _ = LinearAttentionFusedCPU.apply(
        q, k, v, state0, causal, chunk_size or DEFAULT_CHUNK_SIZE, FEATURE_CODES[feature_map], normalize,
        1.0 if scale is None else float(scale))
    if normalize:
        return out, state[..., :-1], state[..., -1]
    return out, state, None


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    feature_map="elu+1",
    normalize: bool = True,
    chunk_size: int | None = None,
    scale: float | None = None,
    return_state: bool = False,
    initial_state: LinearAttentionState | tuple | torch.Tensor | None = None,
    backend: str | None = None,
):
    """Linear attention: ``out_i = phi(q_i) S_i / (phi(q_i) . z_i)`` with ``S_i = sum_j phi(k_j)^T v_j``
    and ``z_i = sum_j phi(k_j)`` over the keys ``j`` query ``i`` sees (all, or ``j <= i`` when causal).

    Cost is linear in ``L``: causal attention runs chunk by chunk (a small quadratic block per chunk
    plus a float32 ``(M, Dv)`` state carried between chunks). On CUDA tensors this is the Triton
    kernels; on the CPU the C++ kernels (when the extension is built), else the chunked PyTorch form.

    Args:
        q: ``(B, Hq, L, D)``.
        k: ``(B, Hkv, L, D)``; ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h`` uses ``h // (Hq // Hkv)``).
        v: ``(B, Hkv, L, Dv)``.
        causal: query ``i`` sees keys ``j <= i``. Default False.
        feature_map: ``"elu+1"`` (default), ``"relu"``, ``"performer"`` (a fresh
            :class:`PerformerFeatures` draw with ``2 * D`` features per call; pass a
            ``PerformerFeatures`` module to keep one), a ``PerformerFeatures``, or a callable
            ``(..., D) -> (..., M)`` applied to queries and keys.
        normalize: divide by ``phi(q_i) . z_i`` (a query whose normaliser is exactly 0 outputs 0). Default True. Performer's stabiliser is only
            exact with normalisation, so without it Performer features are not stabilised.
        chunk_size: positions per chunk. Default 64 (32 for float32 on the Triton kernels). The
            Triton kernels need a power of two >= 16, and wide features in float32 may need 16.
        scale: ``q`` and ``k`` are each multiplied by ``sqrt(scale)`` before the feature map.
            Default ``D ** -0.5`` for Performer (softmax's temperature), 1 otherwise.
        return_state: also return the :class:`LinearAttentionState` after the last position.
        initial_state: a state returned by an earlier call (the sequence continues it);
            ``(kv, k_sum)``, or ``kv`` alone when ``normalize=False``. Decoding one token with
            ``L = 1`` costs ``O(M * Dv)`` per head.
        backend: ``"triton"``, ``"cpu"`` (the C++ kernels), ``"reference"`` (the chunked PyTorch
            form, differentiable by autograd) or None (default: the first of these that can run here;
            Triton only for CUDA tensors). An explicit backend that cannot run raises ValueError.

    Returns:
        ``out (B, Hq, L, Dv)`` in q's dtype, and the state if ``return_state``.
    """
    _check_inputs(q, k, v, feature_map, chunk_size, scale, initial_state, normalize)
    backend = choose_backend(q, backend)
    if backend == "triton" and chunk_size is not None:
        from ..backends.triton import ensure_kernels_importable

        ensure_kernels_importable()
        from ..triton_kernels.linear_attention import check_chunk_size

        check_chunk_size(chunk_size)
    if isinstance(initial_state, torch.Tensor):
        initial_state = (initial_state, None)
    if backend == "cpu" and isinstance(feature_map, str) and feature_map in FEATURE_CODES:
        out, kv, k_sum = fused_cpu(q, k, v, causal, feature_map, normalize, scale, initial_state, chunk_size)
        return (out, LinearAttentionState(kv, k_sum)) if return_state else out
    phi_q, phi_k = featurize(q, k, feature_map, scale, normalize)
    if normalize:
        v_aug, state_aug = naive.with_normalizer(v, initial_state)
        o_aug, state_out = core(phi_q, phi_k, v_aug, causal, state_aug, chunk_size, backend)
        out, (kv, k_sum) = naive.split_normalizer(o_aug.float(), state_out)
        out = out.to(q.dtype)
    else:
        out, kv = core(phi_q, phi_k, v, causal, None if initial_state is None else initial_state[0],
                       chunk_size, backend)
        k_sum = None
    if return_state:
        return out, LinearAttentionState(kv, k_sum)
    return out
