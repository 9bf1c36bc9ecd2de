"""The autograd Function of the Triton core (feature-mapped ``q``/``k`` in, unnormalised output out)."""

from __future__ import annotations

import torch


class LinearAttentionCore(torch.autograd.Function):
    """``(o, state) = core(q, k, v, initial_state)`` by the chunked Triton kernels.

    ``q (B, Hq, L, M)``, ``k (B, Hkv, L, M)``, ``v (B, Hkv, L, Dv)``, ``initial_state
    (B, Hkv, M, Dv)`` float32 or None. Gradients reach all four (the state's as float32).
    """

    @staticmethod
    def forward(ctx, q, k, v, initial_state, causal: bool, chunk_size: int):
        from ..backends.triton import ensure_kernels_importable

        ensure_kernels_importable()
        from ..triton_kernels.linear_attention import linear_attention_fwd

        o, state = linear_attention_fwd(q, k, v, initial_state, causal, chunk_size)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.causal, ctx.chunk_size = causal, chunk_size
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return o, state

    @staticmethod
    def backward(ctx, do, d_state):
        from ..triton_kernels.linear_attention import linear_attention_bwd

        q, k, v, initial_state = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        dq, dk, dv, ds0 = linear_attention_bwd(q, k, v, do, initial_state, d_state, ctx.causal, ctx.chunk_size)
        ds0 = None if initial_state is None else ds0.to(ctx.state_dtype)
        return dq, dk, dv, ds0, None, None
