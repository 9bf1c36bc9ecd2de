"""The reference backend: fastattn/reference.py behind the op contract. Always available."""

from __future__ import annotations

import torch

from .. import reference
from .._inputs import AttentionInputs
from ..block_mask import FULL, PARTIAL, BlockMask, layout_from_kv_lists
from ..ops import BackendOps, dbias_shape, define_ops, output_like_q
from .base import Backend


def inputs_from_op_args(
    q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths,
    kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids,
    block_size_q, block_size_k, scale, window_left, window_right, softcap, dropout_p,
) -> AttentionInputs:
    """Rebuild :class:`AttentionInputs` from the flat op arguments (see fastattn/ops.py)."""
    block_mask = None
    if kv_num_blocks is not None:
        num_key_blocks = -(-k.shape[2] // block_size_k)
        layout = layout_from_kv_lists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, num_key_blocks)
        seq_lens, block_size = (q.shape[2], k.shape[2]), (block_size_q, block_size_k)
        if partial_masks is not None:
            block_mask = BlockMask(layout=layout.to(torch.int8), seq_lens=seq_lens, block_size=block_size,
                                   partial_masks=partial_masks, partial_tile_ids=partial_tile_ids)
        else:
            # Without partial_masks the element mask of partial tiles is already part of attn_mask.
            layout = torch.where(layout == PARTIAL, FULL, layout).to(torch.int8)
            block_mask = BlockMask(layout=layout, seq_lens=seq_lens, block_size=block_size)
    return AttentionInputs(
        q=q, k=k, v=v, scale=scale, window_left=window_left, window_right=window_right, attn_mask=attn_mask,
        block_mask=block_mask, alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
        key_lengths=key_lengths, query_lengths=query_lengths,
    )


def _keep_mask(inputs: AttentionInputs, seed: int) -> torch.Tensor | None:
    if inputs.dropout_p == 0:
        return None
    shape = (inputs.batch, inputs.heads_q, inputs.seqlen_q, inputs.seqlen_k)
    return reference.dropout_keep_mask(seed, shape, inputs.dropout_p, inputs.device)


def _fwd(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
         full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids, block_size_q, block_size_k, scale,
         window_left, window_right, softcap, dropout_p, seed):
    inputs = inputs_from_op_args(
        q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
        full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids, block_size_q, block_size_k, scale,
        window_left, window_right, softcap, dropout_p,
    )
    out, lse = reference.attention_from_inputs(inputs, _keep_mask(inputs, seed), upcast=True)
    return output_like_q(q, v.shape[-1]).copy_(out), lse.to(torch.float32).contiguous()


def _bwd(dout, q, k, v, out, lse, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
         full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
         partial_masks, partial_tile_ids, block_size_q, block_size_k, scale, window_left, window_right, softcap,
         dropout_p, seed, compute_dbias, dlse=None):
    inputs = inputs_from_op_args(
        q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
        full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids, block_size_q, block_size_k, scale,
        window_left, window_right, softcap, dropout_p,
    )
    dq, dk, dv, dscores = reference.attention_backward_from_inputs(inputs, dout, _keep_mask(inputs, seed), dlse)
    dbias = q.new_empty((0,))
    if compute_dbias:  # summed over the dimensions the mask broadcasts, in the compute dtype, rounded once
        dbias = dscores.sum_to_size(dbias_shape(attn_mask)).to(attn_mask.dtype).contiguous()
    # Gradients in the layouts of q, k, v, as the fake (empty_like) and the kernels give them: a transposed
    # (B, L, H, D) input then gets a gradient its leaf takes without a copy.
    grads = (torch.empty_like(t).copy_(g) for t, g in ((q, dq), (k, dk), (v, dv)))
    return (*grads, dbias)


class ReferenceBackend(Backend):
    name = "reference"
    description = "plain PyTorch, materialises the (Lq, Lk) scores; every feature, any device and dtype"

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        return []

    def build_ops(self) -> BackendOps:
        return define_ops("reference", _fwd, _bwd)

    def dropout_keep_mask(self, inputs: AttentionInputs, seed: int) -> torch.Tensor:
        return _keep_mask(inputs, seed)


BACKEND = ReferenceBackend()
