"""The Triton backend: fused forward and backward kernels (``triton_kernels/attention_{fwd,bwd}.py``).

Runs on CUDA GPUs, and on the CPU through the Triton interpreter when ``TRITON_INTERPRET=1``
(correct but slow, so automatic selection passes over it there). On a GPU its ops are registered
with ``torch.library.triton_op`` and launch through ``wrap_triton``, so ``torch.compile(fullgraph=True)``
sees the kernels themselves; in the interpreter they are opaque custom ops with the shared fakes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from .._inputs import AttentionInputs
from ..ops import VARLEN_BWD_SCHEMA, VARLEN_FWD_SCHEMA, BackendOps, define_ops, varlen_bwd_fake, varlen_fwd_fake
from .base import Backend, common_reasons

_FEATURES = {
    "a value head_dim different from the query's": True,
    "causal": True,
    "window": True,
    "attn_mask": True,
    "attn_mask gradient": True,
    "block_mask": True,
    "alibi": True,
    "softcap": True,
    "dropout": True,
    "lengths": True,
    "gqa": True,
    "lse gradient": True,
    "sinks": True,  # applied to the kernels' (out, lse) by fastattn.autograd.fold_sinks
}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_BLOCK_SIZES = (16, 32, 64, 128)  # = triton_kernels.attention_fwd.BLOCK_MASK_SIZES (not imported: triton may be absent)


def _in_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, at import: under torch.compile the backend's reasons are traced, and dynamo
# (torch 2.11, the GPU machine's) refuses to trace importlib.util.find_spec.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def ensure_kernels_importable() -> None:
    """Make ``fastattn.triton_kernels`` importable from a source tree that was only built in place.

    An installed fastattn maps the top-level ``triton_kernels/`` folder to ``fastattn.triton_kernels``
    (setup.py ``package_dir``). A checkout used after ``setup.py build_ext --inplace`` (the GPU
    check) has no such mapping, so the folder is registered under that name here.
    """
    if "fastattn.triton_kernels" in sys.modules or importlib.util.find_spec("fastattn.triton_kernels") is not None:
        return
    root = Path(__file__).resolve().parents[2] / "triton_kernels"
    if not (root / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "fastattn.triton_kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastattn.triton_kernels"] = module
    spec.loader.exec_module(module)
    sys.modules["fastattn"].triton_kernels = module


def _mask_args(attn_mask, alibi_slopes, key_lengths, query_lengths, kv_lists, q_lists, partial_masks,
               partial_tile_ids, block_size_q, block_size_k, window_left, window_right, softcap):
    """The op's mask arguments as the launchers take them (``MaskArgs``), built once per call."""
    from ..triton_kernels.attention_fwd import MaskArgs

    return MaskArgs(
        attn_mask=attn_mask, alibi_slopes=alibi_slopes, key_lengths=key_lengths, query_lengths=query_lengths,
        kv_num_blocks=kv_lists[0], kv_indices=kv_lists[1], full_kv_num_blocks=kv_lists[2], full_kv_indices=kv_lists[3],
        q_num_blocks=q_lists[0], q_indices=q_lists[1], full_q_num_blocks=q_lists[2], full_q_indices=q_lists[3],
        partial_masks=partial_masks, partial_tile_ids=partial_tile_ids, block_size_q=block_size_q,
        block_size_k=block_size_k, window_left=window_left, window_right=window_right, softcap=softcap,
    )


def _fwd(q, k, v, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
         full_kv_num_blocks, full_kv_indices, partial_masks, partial_tile_ids, block_size_q, block_size_k, scale,
         window_left, window_right, softcap, dropout_p, seed):
    from ..triton_kernels.attention_fwd import attention_fwd

    masks = _mask_args(attn_mask, alibi_slopes, key_lengths, query_lengths,
                       (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), (None,) * 4,
                       partial_masks, partial_tile_ids, block_size_q, block_size_k, window_left, window_right, softcap)
    return attention_fwd(q, k, v, masks, scale=scale, dropout_p=dropout_p, seed=seed)


def _bwd(dout, q, k, v, out, lse, attn_mask, alibi_slopes, key_lengths, query_lengths, kv_num_blocks, kv_indices,
         full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
         partial_masks, partial_tile_ids, block_size_q, block_size_k, scale, window_left, window_right, softcap,
         dropout_p, seed, compute_dbias, dlse=None):
    from ..triton_kernels.attention_bwd import attention_bwd

    masks = _mask_args(attn_mask, alibi_slopes, key_lengths, query_lengths,
                       (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices),
                       (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices),
                       partial_masks, partial_tile_ids, block_size_q, block_size_k, window_left, window_right, softcap)
    return attention_bwd(dout, q, k, v, out, lse, masks, scale=scale, dropout_p=dropout_p, seed=seed,
                         compute_dbias=compute_dbias, dlse=dlse)


class TritonBackend(Backend):
    name = "triton"
    description = "Triton fused kernels (FlashAttention-2 style forward and deterministic backward)"
    reads_partial_masks = True

    def unavailable_reasons(self) -> list[str]:
        if not _TRITON_INSTALLED:
            return ["triton is not installed (pip install triton)"]
        if not torch.cuda.is_available() and not _in_interpreter():
            return ["no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)"]
        return []

    def auto_select_reasons(self, inputs: AttentionInputs) -> list[str]:
        if _in_interpreter():
            return ["the Triton interpreter is slow; request backend='triton' explicitly"]
        return []

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        devices = ("cuda", "cpu") if _in_interpreter() else ("cuda",)
        reasons = common_reasons(
            inputs, devices=devices, dtypes=_DTYPES, max_head_dim=_MAX_HEAD_DIM, features=_FEATURES
        )
        block_mask = inputs.block_mask
        if block_mask is not None:
            bq, bk = block_mask.block_size
            if bq not in _BLOCK_SIZES or bk not in _BLOCK_SIZES:
                reasons.append(
                    f"block_mask block_size {(bq, bk)} is not supported: the kernels' tiles are the mask's "
                    f"blocks, each a power of two in {list(_BLOCK_SIZES)}"
                )
        return reasons

    def build_ops(self) -> BackendOps:
        # torch.compile traces a triton_op into its wrap_triton launches; interpreted kernels cannot
        # be traced (wrap_triton hands them back as they are), so there the ops are opaque custom ops.
        return define_ops("triton", _fwd, _bwd, use_triton_op=not _in_interpreter())

    def dropout_keep_mask(self, inputs: AttentionInputs, seed: int) -> torch.Tensor:
        from ..triton_kernels.attention_fwd import dropout_keep_mask

        return dropout_keep_mask(
            inputs.batch, inputs.heads_q, inputs.seqlen_q, inputs.seqlen_k, inputs.dropout_p, seed, inputs.device
        )


ensure_kernels_importable()
BACKEND = TritonBackend()


# ---- Packed variable-length sequences (fastattn.varlen_attention) ----
def _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, scale, window_left,
                window_right, softcap, dropout_p=0.0, seed=0):
    from ..triton_kernels.attention_varlen import attention_varlen_fwd

    return attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, scale,
                                window_left, window_right, softcap, dropout_p, seed)


def _varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, scale,
                window_left, window_right, softcap, dlse=None, dropout_p=0.0, seed=0):
    from ..triton_kernels.attention_varlen import attention_varlen_bwd

    return attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                alibi_slopes, scale, window_left, window_right, softcap, dlse, dropout_p, seed)


@functools.cache
def varlen_ops() -> BackendOps:
    """The Triton varlen ops ``fastattn::triton_varlen_fwd``/``_bwd`` (VARLEN_FWD_SCHEMA/VARLEN_BWD_SCHEMA),
    registered on first use; opaque custom ops in the interpreter, as :meth:`TritonBackend.build_ops`."""
    if _in_interpreter():
        fwd = torch.library.custom_op("fastattn::triton_varlen_fwd", _varlen_fwd, mutates_args=(),
                                      schema=VARLEN_FWD_SCHEMA)
        bwd = torch.library.custom_op("fastattn::triton_varlen_bwd", _varlen_bwd, mutates_args=(),
                                      schema=VARLEN_BWD_SCHEMA)
        fwd.register_fake(varlen_fwd_fake)
        bwd.register_fake(varlen_bwd_fake)
    else:
        fwd = torch.library.triton_op("fastattn::triton_varlen_fwd", _varlen_fwd, mutates_args=(),
                                      schema=VARLEN_FWD_SCHEMA)
        bwd = torch.library.triton_op("fastattn::triton_varlen_bwd", _varlen_bwd, mutates_args=(),
                                      schema=VARLEN_BWD_SCHEMA)
    return BackendOps(fwd=fwd, bwd=bwd)
