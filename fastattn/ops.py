"""The custom-op contract every backend implements.

Each backend exposes a forward and a backward op with the schemas below (the C++
extension declares the same schemas in ``csrc/bindings.cpp``). Ops take only tensors
and scalars -- never Python objects -- so ``torch.compile(fullgraph=True)`` traces
through them, and one shared fake (meta) implementation describes every backend's
outputs.

Conventions of the op level (the public API normalises to them, see ``_inputs.py``):

* ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``, any strides.
* ``attn_mask``: bool (True = attend) or additive float, expanded to ``(B, Hq, Lq, Lk)`` (a
  stride-0 view on the dimensions the caller's mask broadcasts: never a dense copy).
* ``alibi_slopes``: float32 expanded to ``(B, Hq)``.
* ``key_lengths``/``query_lengths``: int32 ``(B,)``.
* block lists: see :class:`fastattn.BlockMask`; ``block_size_q``/``block_size_k`` are 0 without one.
* ``partial_masks``/``partial_tile_ids``: a BlockMask's per-tile element masks, bool
  ``(num_blocks, block_size_q, block_size_k)`` contiguous, and int32 ``(B or 1, Hq or 1, nQB, nKB)``
  (the row of ``partial_masks`` of each partial tile, -1 elsewhere). Given only without
  ``attn_mask``, to backends that read them tile by tile (``Backend.reads_partial_masks``); the
  others receive the same mask as a dense ``attn_mask``.
* ``window_left``/``window_right``: ``None`` = unbounded (bottom-right aligned offsets).
* ``seed``: dropout seed drawn from torch's generator (ignored when ``dropout_p == 0``).
* outputs: ``out (B, Hq, Lq, Dv)`` in q's dtype, in q's memory layout (every backend, see
  :func:`output_like_q`) and ``lse (B, Hq, Lq)`` float32 (natural log;
  ``-inf`` for rows that see no key). The backward returns ``dq, dk, dv`` (in the layouts of q, k,
  v, as ``empty_like`` gives them) and ``dbias``, the
  gradient w.r.t. an additive ``attn_mask`` when ``compute_dbias`` (an empty tensor otherwise):
  contiguous, in the mask's dtype and in the mask's own shape, :func:`dbias_shape` (size 1 on
  every dimension where ``attn_mask`` has size 1 or stride 0, i.e. summed over the dimensions the
  mask broadcasts). Backends accumulate it in float32 (float64 for float64 inputs) in that shape
  and round it once; no backend allocates a dense ``(B, Hq, Lq, Lk)`` buffer for a broadcast mask
  (except the CUDA and Triton kernels' documented deterministic mode).
* ``dlse`` (backward, optional): float32 ``(B, Hq, Lq)``, the gradient w.r.t. the returned ``lse``.
  Since ``d lse_i / d s_ij = P_ij``, it enters as ``delta = rowsum(dout * out) - dlse``
  (``dS = P * (dP - delta)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_BLOCK_ARGS = (
    "Tensor? kv_num_blocks, Tensor? kv_indices, Tensor? full_kv_num_blocks, Tensor? full_kv_indices, "
)
_PARTIAL_ARGS = "Tensor? partial_masks, Tensor? partial_tile_ids, "
_COMMON_TAIL = (
    "int block_size_q, int block_size_k, float scale, int? window_left, int? window_right, "
    "float softcap, float dropout_p, int seed"
)
FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes, Tensor? key_lengths, "
    "Tensor? query_lengths, " + _BLOCK_ARGS + _PARTIAL_ARGS + _COMMON_TAIL + ") -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
    "Tensor? alibi_slopes, Tensor? key_lengths, Tensor? query_lengths, " + _BLOCK_ARGS
    + "Tensor? q_num_blocks, Tensor? q_indices, Tensor? full_q_num_blocks, Tensor? full_q_indices, "
    + _PARTIAL_ARGS + _COMMON_TAIL + ", bool compute_dbias, Tensor? dlse=None) -> (Tensor, Tensor, Tensor, Tensor)"
)


def output_like_q(q: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """An empty ``out (B, Hq, Lq, Dv)`` in q's memory layout: ``(B, L, H, Dv)`` memory when q is a
    transposed ``(B, L, H, D)`` view (so a caller holding that layout needs no copy back), else contiguous.
    ``csrc/cpu/attention_ops.cpp`` applies the same rule."""
    B, Hq, Lq, _ = q.shape
    if Hq > 1 and Lq > 1 and q.stride(1) < q.stride(2):
        return q.new_empty((B, Lq, Hq, head_dim_v)).transpose(1, 2)
    return q.new_empty((B, Hq, Lq, head_dim_v))


def fwd_fake(q, k, v, *args, **kwargs):
    """A forward op's outputs: every backend writes ``out`` in q's layout (:func:`output_like_q`)."""
    out = output_like_q(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return out, lse


# Position of compute_dbias among the backward's arguments after lse (attn_mask ... seed come first).
_COMPUTE_DBIAS_INDEX = 22


def dbias_shape(attn_mask: torch.Tensor) -> tuple[int, ...]:
    """The shape of the backward's ``dbias`` for an expanded ``attn_mask (B, Hq, Lq, Lk)``: the
    mask's own shape, 1 where it has size 1 or stride 0 (the dimensions it broadcasts)."""
    return tuple(1 if size == 1 or stride == 0 else size for size, stride in zip(attn_mask.shape, attn_mask.stride()))


def bwd_fake(dout, q, k, v, out, lse, *args, dlse=None):
    attn_mask, compute_dbias = args[0], args[_COMPUTE_DBIAS_INDEX]
    dbias = attn_mask.new_empty(dbias_shape(attn_mask)) if compute_dbias else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


@dataclass(frozen=True)
class BackendOps:
    """A backend's forward and backward ops (callables with FWD_SCHEMA / BWD_SCHEMA)."""

    fwd: Callable
    bwd: Callable


def define_ops(name: str, fwd_impl: Callable, bwd_impl: Callable, *, use_triton_op: bool = False) -> BackendOps:
    """Register ``fastattn::{name}_fwd`` and ``fastattn::{name}_bwd`` with the shared schemas and fakes.

    ``use_triton_op`` registers them with ``torch.library.triton_op``, whose implementations launch
    kernels through ``torch.library.wrap_triton`` so torch.compile sees the Triton kernels themselves.
    """
    register = torch.library.triton_op if use_triton_op else torch.library.custom_op
    fwd = register(f"fastattn::{name}_fwd", fwd_impl, mutates_args=(), schema=FWD_SCHEMA)
    bwd = register(f"fastattn::{name}_bwd", bwd_impl, mutates_args=(), schema=BWD_SCHEMA)
    if not use_triton_op:  # triton_op traces its implementation for fake tensors itself
        fwd.register_fake(fwd_fake)
        bwd.register_fake(bwd_fake)
    return BackendOps(fwd=fwd, bwd=bwd)


def register_extension_fakes() -> None:
    """Fakes for the C++ ops ``fastattn::attention_fwd``/``attention_bwd`` (declared in csrc/bindings.cpp)."""
    torch.library.register_fake("fastattn::attention_fwd", fwd_fake)
    torch.library.register_fake("fastattn::attention_bwd", bwd_fake)
    if hasattr(torch.ops.fastattn, "varlen_fwd"):  # absent from an extension built before the varlen kernels
        torch.library.register_fake("fastattn::varlen_fwd", varlen_fwd_fake)
        torch.library.register_fake("fastattn::varlen_bwd", varlen_bwd_fake)
    if hasattr(torch.ops.fastattn, "decode_attention"):  # an extension built before the op has none
        torch.library.register_fake("fastattn::decode_attention", decode_fake)


def decode_fake(q, k_cache, v_cache, *args):
    """``fastattn::decode_attention``'s outputs: ``out (B, Lq, Hq, Dv)``, ``lse (B, Hq, Lq)`` float32."""
    B, Lq, Hq, _ = q.shape
    return q.new_empty((B, Lq, Hq, v_cache.shape[3])), q.new_empty((B, Hq, Lq), dtype=torch.float32)


# ---- Packed variable-length sequences (fastattn.varlen_attention) -------------------------------
#
# ``q (total_q, Hq, D)``, ``k (total_k, Hkv, D)``, ``v (total_k, Hkv, Dv)``, ``cu_seqlens_q/k`` int32
# ``(num_seqs + 1,)``; ``max_seqlen_q/k`` bound the sequence lengths (a kernel sizes its grid from them
# instead of reading cu_seqlens on the host). Outputs: ``out (total_q, Hq, Dv)`` contiguous in q's dtype
# and ``lse (Hq, total_q)`` in the accumulation dtype (float64 for float64 inputs, else float32), which
# the backward takes back as is. The C++ extension declares the same schemas (csrc/bindings.cpp).
VARLEN_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
    "Tensor? alibi_slopes, float scale, int? window_left, int? window_right, float softcap, float dropout_p=0., "
    "int seed=0) -> (Tensor, Tensor)"
)
VARLEN_BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, Tensor? alibi_slopes, float scale, int? window_left, int? window_right, "
    "float softcap, Tensor? dlse=None, float dropout_p=0., int seed=0) -> (Tensor, Tensor, Tensor)"
)


def varlen_lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the varlen ops' lse for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def varlen_fwd_fake(q, k, v, *args, **kwargs):
    total_q, Hq, _ = q.shape
    return q.new_empty((total_q, Hq, v.shape[2])), q.new_empty((Hq, total_q), dtype=varlen_lse_dtype(q.dtype))


def varlen_bwd_fake(dout, q, k, v, *args, **kwargs):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)
