"""The C++ CPU backend: fused tiled kernels of csrc/cpu/ behind ``fastattn::attention_fwd``/``_bwd``.

The kernels walk (query tile, key tile) pairs with an online softmax and never allocate an
``(Lq, Lk)`` buffer; matrix products on tiles go through BLAS, threads through
``at::parallel_for`` (``torch.set_num_threads`` applies). Every feature except dropout.
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
    "dropout": False,
    "lengths": True,
    "gqa": True,
}


class CpuBackend(Backend):
    name = "cpu"
    description = "C++ fused tiled kernels for the CPU (BLAS on tiles, online softmax, at::parallel_for)"

    def unavailable_reasons(self) -> list[str]:
        return [_LOAD_ERROR] if _LOAD_ERROR else []

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        return common_reasons(inputs, devices=("cpu",), dtypes=DTYPES, max_head_dim=MAX_HEAD_DIM, features=FEATURES)

    def build_ops(self) -> BackendOps:
        if _MODULE is None:
            raise RuntimeError(_LOAD_ERROR)
        return BackendOps(fwd=torch.ops.fastattn.attention_fwd.default, bwd=torch.ops.fastattn.attention_bwd.default)


BACKEND = CpuBackend()
