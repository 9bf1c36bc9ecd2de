"""The autograd Function of the kernel cores (feature-mapped ``q``/``k`` in, unnormalised output out)."""

from __future__ import annotations

import torch

from .ops import linear_ops


class LinearAttentionCore(torch.autograd.Function):
    """``(o, state) = core(q, k, v, initial_state)`` by one backend's ops (``"cpu"`` or ``"triton"``).

    ``q (B, Hq, L, M)``, ``k (B, Hkv, L, M)``, ``v (B, Hkv, L, Dv)`` of one dtype, ``initial_state
    (B, Hkv, M, Dv)`` in the backend's state dtype (:func:`fastattn.linear.ops.state_dtype`) or None.
    Gradients reach all four (the state's in its own dtype).
    """

    @staticmethod
    def forward(ctx, q, k, v, initial_state, causal: bool, chunk_size: int, backend: str):
        o, state = linear_ops(backend).fwd(q, k, v, initial_state, causal, chunk_size)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.causal, ctx.chunk_size, ctx.backend = causal, chunk_size, backend
        ctx.set_materialize_grads(False)
        return o, state

    @staticmethod
    def backward(ctx, do, d_state):
        q, k, v, initial_state = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        dq, dk, dv, ds0 = linear_ops(ctx.backend).bwd(do, q, k, v, initial_state, d_state, ctx.causal, ctx.chunk_size)
        return dq, dk, dv, None if initial_state is None else ds0, None, None, None


class LinearAttentionFusedCPU(torch.autograd.Function):
    """``(o, state, denom) = fused(q, k, v, initial_state)`` by the CPU kernels' fused ops.

    ``q (B, Hq, L, D)`` and ``k (B, Hkv, L, D)`` raw (the kernel applies ``sqrt(scale)`` and the
    feature map of code ``feature_map``), ``v (B, Hkv, L, Dv)``, ``initial_state (B, Hkv, D, Dv + normalize)``
    in the state dtype or None. ``denom`` is not differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, initial_state, causal: bool, chunk_size: int, feature_map: int, normalize: bool,
                scale: float):
        o, state, den = torch.ops.fastattn.linear_attention_fused_fwd(
            q, k, v, initial_state, causal, chunk_size, feature_map, normalize, scale)
        ctx.save_for_backward(q, k, v, initial_state, o, den)
        ctx.args = (causal, chunk_size, feature_map, normalize, scale)
        ctx.mark_non_differentiable(den)
        ctx.set_materialize_grads(False)
        return o, state, den

    @staticmethod
    def backward(ctx, do, d_state, _d_den):
        q, k, v, initial_state, o, den = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, ds0 = torch.ops.fastattn.linear_attention_fused_bwd(
            do, q, k, v, o, den, initial_state, d_state, *ctx.args)
        return dq, dk, dv, None if initial_state is None else ds0, None, None, None, None, None
