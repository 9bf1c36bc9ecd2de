"""The C++ CPU backend: fused tiled kernels of csrc/cpu/ behind ``fastattn::attention_fwd``/``_bwd``.

The kernels walk (query tile, key tile) pairs with an online softmax and never allocate an
``(Lq, Lk)`` buffer; matrix products on tiles go through BLAS, threads through
``at::parallel_for`` (``torch.set_num_threads`` applies). Every feature, dropout included.
"""

from __future__ import annotations

import torch

from .. import _extension
from .._inputs import AttentionInputs
from ..ops import BackendOps
from .base import Backend, common_reasons

# Loaded when the backend registry imports this module, not inside unavailable_reasons: torch.compile
# traces through lru_cache wrappers, and loading registers the ops' fakes, which dynamo cannot trace.
_MODULE, _LOAD_ERROR = _extension.load()

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Tiles are heap buffers sized from the head dim, so there is no hard limit; this bound only keeps
# the per-thread scratch (a few tiles of 128-256 rows x head_dim) reasonable.
MAX_HEAD_DIM = 1024
FEATURES = {
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


_MASK32 = 0xFFFFFFFF


def _hash32(x):
    """csrc/cpu/attention_cpu.h's hash32 on int64 tensors (or ints) holding values in [0, 2^32):
    both multipliers are below 2^31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def dropout_keep_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float, device) -> torch.Tensor:
    """The CPU kernels' dropout pattern, bool ``(B, Hq, Lq, Lk)`` (True = keep): a pure function of
    ``(seed, b, h, i, j)``, the same arithmetic as ``dropout_factors`` in csrc/cpu/attention_cpu.h::

        key      = hash32(seed_lo ^ hash32(seed_hi))
        row_key  = hash32(key ^ ((b * Hq + h) * Lq + i))            (mod 2^32)
        keep     = hash32(row_key + j * 0x61C88647) >> 8 >= threshold,  threshold = max(1, floor(p * 2^24))
    """
    B, H, Lq, Lk = shape
    seed = int(seed) & ((1 << 64) - 1)
    key = _hash32((seed & _MASK32) ^ _hash32(seed >> 32))
    threshold = max(1, int(dropout_p * 16777216.0))
    rows = torch.arange(B * H * Lq, dtype=torch.int64, device=device).view(B, H, Lq, 1) & _MASK32
    row_key = _hash32(key ^ rows)
    cols = (torch.arange(Lk, dtype=torch.int64, device=device) * 0x61C88647) & _MASK32
    bits = _hash32((row_key + cols) & _MASK32)
    return (bits >> 8) >= threshold


class CpuBackend(Backend):
    name = "cpu"
    description = "C++ fused tiled kernels for the CPU (BLAS on tiles, online softmax, at::parallel_for)"
    reads_partial_masks = True

    def unavailable_reasons(self) -> list[str]:
        return [_LOAD_ERROR] if _LOAD_ERROR else []

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = common_reasons(inputs, devices=("cpu",), dtypes=DTYPES, max_head_dim=MAX_HEAD_DIM, features=FEATURES)
        if inputs.sinks is not None and inputs.dtype == torch.float64:
            # fold_sinks rescales by the op's float32 lse: float32 accuracy, too coarse for float64.
            reasons.append("sinks with float64 inputs are not supported (the reference backend serves them exactly)")
        return reasons

    def build_ops(self) -> BackendOps:
        if _MODULE is None:
            raise RuntimeError(_LOAD_ERROR)
        return BackendOps(fwd=torch.ops.fastattn.attention_fwd.default, bwd=torch.ops.fastattn.attention_bwd.default)

    def dropout_keep_mask(self, inputs: AttentionInputs, seed: int) -> torch.Tensor:
        shape = (inputs.batch, inputs.heads_q, inputs.seqlen_q, inputs.seqlen_k)
        return dropout_keep_mask(seed, shape, inputs.dropout_p, inputs.device)


BACKEND = CpuBackend()
