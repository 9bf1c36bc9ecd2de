"""One autograd Function for every backend: it calls the chosen backend's forward and backward ops."""

from __future__ import annotations

import torch

from ._inputs import AttentionInputs, block_mask_window
from .backends import get_backend
from .ops import output_like_q
from .reference import attention_from_inputs, draw_seed, dropout_keep_mask

# kv_num_blocks, kv_indices, full_kv_*, q_num_blocks, q_indices, full_q_*, partial_masks, partial_tile_ids
_NUM_BLOCK_LISTS = 10


def partial_mask_args(inputs: AttentionInputs, backend_name: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(partial_masks, partial_tile_ids)`` when ``backend_name``'s kernels read the BlockMask's
    per-tile element masks themselves (so no dense ``(Lq, Lk)`` mask is built), else None."""
    block_mask = inputs.block_mask
    if (
        backend_name is None
        or block_mask is None
        or block_mask.partial_masks is None
        or inputs.attn_mask is not None
        or not get_backend(backend_name).reads_partial_masks
    ):
        return None
    return block_mask.partial_masks, block_mask.partial_tile_ids


def effective_attn_mask(inputs: AttentionInputs, backend_name: str | None = None) -> torch.Tensor | None:
    """``attn_mask`` intersected with the block mask's element mask, as the ops take it.

    Ops see one element mask: partial tiles are masked by it, full tiles are not. Only when the
    caller gives both an ``attn_mask`` and a BlockMask with an element mask is a combined
    ``(B, Hq, Lq, Lk)`` mask materialised. A per-tile element mask goes to the ops as
    ``partial_masks`` instead when the backend reads it (see :func:`partial_mask_args`).
    """
    mask = inputs.attn_mask
    block_mask = inputs.block_mask
    if block_mask is None or block_mask_window(block_mask, inputs.key_lengths, inputs.query_lengths) is not None:
        return mask  # no block mask, or its element mask is already the op's window (see normalize)
    if partial_mask_args(inputs, backend_name) is not None:
        return mask
    if block_mask.element_mask is None:
        return mask
    shape = (inputs.batch, inputs.heads_q, inputs.seqlen_q, inputs.seqlen_k)
    element = block_mask.element_mask.expand(shape)
    if mask is None:
        return element
    if mask.dtype == torch.bool:
        return mask & element
    return mask.masked_fill(~element, float("-inf"))


def function_attn_mask(inputs: AttentionInputs, backend_name: str | None = None) -> torch.Tensor | None:
    """The mask :class:`AttentionFunction` takes: :func:`effective_attn_mask` in its own 4-D shape
    when that is the caller's ``attn_mask`` (``inputs.attn_mask_own``), so its gradient is accumulated
    in that shape; the Function expands it (a stride-0 view) for the ops."""
    mask = effective_attn_mask(inputs, backend_name)
    if mask is inputs.attn_mask and inputs.attn_mask_own is not None:
        return inputs.attn_mask_own
    return mask


def block_args(inputs: AttentionInputs, backend_name: str | None = None) -> tuple[list, int, int]:
    """The ten block-list tensors (or Nones): forward lists, backward lists, ``partial_masks`` and
    ``partial_tile_ids``; and the block sizes (0 without a BlockMask).

    Without a BlockMask, an ``attn_mask`` is turned into one (cached per mask tensor) when the backend
    asks for it (``Backend.attn_mask_block_size``), so its kernels skip the tiles the mask hides
    entirely; the mask itself still reaches the op as ``attn_mask``.
    """
    block_mask = inputs.block_mask
    if block_mask is None and inputs.attn_mask is not None and backend_name and not torch.compiler.is_compiling():
        tile = get_backend(backend_name).attn_mask_block_size
        if tile is not None:
            from .masks import block_mask_from_attn_mask

            block_mask = block_mask_from_attn_mask(inputs.attn_mask, tile)
    if block_mask is None:
        return [None] * _NUM_BLOCK_LISTS, 0, 0
    bq, bk = block_mask.block_size
    if inputs.attn_mask is not None and inputs.block_mask is not None:
        # Ops apply their element mask on partial tiles only, and the caller's attn_mask must reach
        # every tile the block mask lets through: so every such tile is passed as partial.
        return [*block_mask.all_partial_lists, None, None], bq, bk
    partial = partial_mask_args(inputs, backend_name) or (None, None)
    return [*block_mask.kv_lists, *block_mask.q_lists, *partial], bq, bk


class AttentionFunction(torch.autograd.Function):
    """The op pair of one backend as a differentiable function.

    ``attn_mask`` is 4-D and broadcastable to ``(B, Hq, Lq, Lk)``; the ops receive it expanded
    (stride 0 on the dimensions it broadcasts) and return its gradient ``dbias`` in its own shape.
    """

    @staticmethod
    def forward(ctx, backend_name, lse_differentiable, q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths,
                *rest):
        if attn_mask is not None:
            attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # no copy
        lists, (block_size_q, block_size_k, scale, window_left, window_right, softcap, dropout_p, seed) = (
            rest[:_NUM_BLOCK_LISTS],
            rest[_NUM_BLOCK_LISTS:],
        )
        ops = get_backend(backend_name).ops
        scalars = (block_size_q, block_size_k, scale, window_left, window_right, softcap, dropout_p, seed)
        # The forward takes the forward lists and the per-tile masks (see FWD_SCHEMA).
        fwd_lists = (*lists[:4], *lists[8:])
        out, lse = ops.fwd(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, *fwd_lists, *scalars)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, alibi_slopes, key_lengths, query_lengths, *lists)
        ctx.backend_name = backend_name
        ctx.scalars = scalars
        ctx.lse_differentiable = lse_differentiable
        if not lse_differentiable:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, attn_mask, alibi_slopes, key_lengths, query_lengths, *lists = ctx.saved_tensors
        compute_dbias = bool(ctx.needs_input_grad[5])
        # The lse gradient only reaches the op when the caller holds lse (return_lse=True).
        dlse = dlse.float().contiguous() if ctx.lse_differentiable and dlse is not None else None
        dq, dk, dv, dbias = get_backend(ctx.backend_name).ops.bwd(
            dout, q, k, v, out, lse, attn_mask, alibi_slopes, key_lengths, query_lengths, *lists,
            *ctx.scalars, compute_dbias, dlse,
        )
        # One gradient per forward input: backend_name, lse_differentiable, q, k, v, attn_mask, then none.
        no_grads = (None,) * (3 + _NUM_BLOCK_LISTS + len(ctx.scalars))
        return (None, None, dq, dk, dv, dbias if compute_dbias else None, *no_grads)


class FoldSinksFunction(torch.autograd.Function):
    """:func:`fold_sinks` with its gradient written out (a few row-sized operations each way).

    With ``f = exp(lse - lse')`` (the share the keys keep), ``s = exp(sink - lse')`` (the sink's share,
    ``f + s = 1``) and ``D' = rowsum(dout' * out') - dlse'`` per row::

        d sinks[h] = -sum over batch and rows of s * D'
        d out      = f * dout'
        d lse      = s * rowsum(dout' * out') + f * dlse'

    (the sink is one more softmax column with score ``sinks[h]`` and no value, so its ``dP`` is 0 and
    its score gradient is ``s * (0 - D')``; ``d lse`` follows from ``lse' = logaddexp(lse, sink)`` and
    ``out' = f * out``). Rows where both ``lse`` and the sink are ``-inf`` have ``f = s = 0``.
    """

    @staticmethod
    def forward(ctx, out, lse, sinks):
        compute = torch.promote_types(torch.promote_types(lse.dtype, sinks.dtype), torch.float32)
        lse_c = lse.to(compute)
        sink = sinks.to(compute).view(1, -1, 1)  # (1, Hq, 1)
        lse_new = torch.logaddexp(lse_c, sink)  # (B, Hq, Lq); -inf only where both are -inf
        # A finite stand-in for lse' = -inf, so that both shares are exp(-inf) = 0 there, not NaN.
        floor = lse_new.clamp(min=torch.finfo(compute).min)
        keys_share = torch.exp(lse_c - floor)  # f, (B, Hq, Lq) in [0, 1]
        sink_share = torch.exp(sink - floor)  # s = 1 - f
        out_new = (out * keys_share.unsqueeze(-1)).to(out.dtype)  # the product in the compute dtype, rounded once
        ctx.save_for_backward(out_new, keys_share, sink_share)
        ctx.dtypes = (out.dtype, lse.dtype, sinks.dtype)
        return out_new, lse_new.to(lse.dtype)

    @staticmethod
    def backward(ctx, dout, dlse):
        out_new, keys_share, sink_share = ctx.saved_tensors
        out_dtype, lse_dtype, sinks_dtype = ctx.dtypes
        compute = keys_share.dtype
        dlse = dlse.to(compute)
        row_dot = (dout.to(compute) * out_new.to(compute)).sum(-1)  # rowsum(dout' * out'), (B, Hq, Lq)
        dsinks = -(sink_share * (row_dot - dlse)).sum(dim=(0, 2))  # (Hq,)
        dout_in = (dout * keys_share.unsqueeze(-1)).to(out_dtype)
        dlse_in = sink_share * row_dot + keys_share * dlse
        return dout_in, dlse_in.to(lse_dtype), dsinks.to(sinks_dtype)


def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add per-head sink logits to the softmax denominator of a finished attention result.

    A sink adds ``exp(sinks[h])`` to every row's denominator and has no value, so it only rescales
    the row: with ``lse`` the sink-free log-sum-exp, ``lse' = log(exp(lse) + exp(sinks[h]))`` and
    ``out' = out * exp(lse - lse')``. This is exact; the gradient reaches the kernels as a gradient of
    their own ``(out, lse)`` (``d lse`` included), and the sinks get theirs
    (:class:`FoldSinksFunction`). Rows with ``lse = -inf`` (no visible key) get ``out' = 0`` and
    ``lse' = sinks[h]``; a ``-inf`` sink changes nothing. No NaN reaches a value or a gradient.

    Args:
        out: ``(B, Hq, Lq, Dv)`` in any dtype.
        lse: float32 ``(B, Hq, Lq)``, natural log, ``-inf`` for rows that see no key.
        sinks: floating ``(Hq,)``; computed in float32 (float64 when ``lse`` or ``sinks`` is float64).

    Returns:
        ``(out', lse')`` of the same shapes and dtypes.
    """
    return FoldSinksFunction.apply(out, lse, sinks)


def _reference_with_sinks(inputs: AttentionInputs, return_lse: bool):
    """The reference backend with sinks: the reference math itself, differentiated by autograd (exact
    in float64, where :func:`fold_sinks` on the op's float32 lse would not be)."""
    keep = None
    if inputs.dropout_p > 0:
        shape = (inputs.batch, inputs.heads_q, inputs.seqlen_q, inputs.seqlen_k)
        keep = dropout_keep_mask(draw_seed(), shape, inputs.dropout_p, inputs.device)
    out, lse = attention_from_inputs(inputs, keep, upcast=True)
    out = output_like_q(inputs.q, inputs.head_dim_v).copy_(out)  # the reference op's layout rule
    return (out, lse.to(torch.float32)) if return_lse else out


def run(inputs: AttentionInputs, backend_name: str, return_lse: bool):
    """Run attention on ``backend_name`` through the autograd Function (then :func:`fold_sinks`)."""
    if inputs.sinks is not None and backend_name == "reference":
        return _reference_with_sinks(inputs, return_lse)
    lists, block_size_q, block_size_k = block_args(inputs, backend_name)
    seed = draw_seed() if inputs.dropout_p > 0 else 0
    if not inputs.requires_grad:
        # Nothing to differentiate: call the forward op itself (the autograd Function's own cost
        # is most of a small call's overhead).
        out, lse = get_backend(backend_name).ops.fwd(
            inputs.q, inputs.k, inputs.v, effective_attn_mask(inputs, backend_name), inputs.alibi_slopes,
            inputs.key_lengths, inputs.query_lengths, *lists[:4], *lists[8:], block_size_q, block_size_k,
            inputs.scale, inputs.window_left, inputs.window_right, inputs.softcap, inputs.dropout_p, seed,
        )
        if inputs.sinks is not None:
            out, lse = fold_sinks(out, lse, inputs.sinks)
        return (out, lse) if return_lse else out
    # With sinks the kernels' lse feeds the result, so its gradient must reach their backward.
    lse_differentiable = return_lse or inputs.sinks is not None
    out, lse = AttentionFunction.apply(
        backend_name, lse_differentiable, inputs.q, inputs.k, inputs.v, function_attn_mask(inputs, backend_name),
        inputs.alibi_slopes,
        inputs.key_lengths, inputs.query_lengths, *lists, block_size_q, block_size_k, inputs.scale,
        inputs.window_left, inputs.window_right, inputs.softcap, inputs.dropout_p, seed,
    )
    if inputs.sinks is not None:
        out, lse = fold_sinks(out, lse, inputs.sinks)
    return (out, lse) if return_lse else out
