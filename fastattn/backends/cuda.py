"""The CUDA backend: tensor-core C++ kernels (``csrc/cuda/``) behind ``torch.ops.fastattn.attention_fwd/bwd``.

The kernels use ``mma.sync`` m16n8k16 (sm_80 and newer), float16 and bfloat16, head dims 64 and
128. The forward is FlashAttention-2 style (online softmax over the visible band of key tiles);
the backward is deterministic (dK/dV per key tile looping over the GQA group, dQ in its own kernel,
no atomics). Design notes: ``docs/cuda-kernels.md``.
"""

from __future__ import annotations

import torch

from .. import _extension
from .._inputs import AttentionInputs
from ..ops import BackendOps
from .base import Backend, common_reasons

HEAD_DIMS = (64, 128)
"""Head dims instantiated in csrc/cuda (the host dispatch in attention_host.h)."""

MASK_TILE_MULTIPLE = 64
"""BlockMask block sizes must be multiples of this (kMaskTileMultiple in attention_host.h)."""

MIN_CAPABILITY = (8, 0)
MAX_SEQLEN = 2**29
MAX_GRID_DIM = 65535

_DTYPES = (torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32)
_FEATURES = {
    "a value head_dim different from the query's": False,
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
    "lse gradient": False,
}


def _build_reason() -> str | None:
    """Why the installed extension has no CUDA kernels to run (None when it has them)."""
    module, why = _extension.load()
    if module is None:
        return why
    if not _extension.build_info().get("cuda", False):
        return (
            "fastattn._C was built without its CUDA kernels (no usable nvcc at install; "
            "reinstall with FASTATTN_CUDA=1 to force them)"
        )
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attention_fwd", "CUDA"):
        return (
            "fastattn._C was built with CUDA but registers no CUDA kernels (built before csrc/cuda/*.cu "
            "existed?); rebuild the extension"
        )
    return None


# Decided when the backend registry imports this module, not inside unavailable_reasons: under
# torch.compile dynamo traces through the extension loader (its cache included), and loading
# registers the ops' fakes, which dynamo cannot trace.
_BUILD_REASON = _build_reason()


def _capability_reason(device: torch.device) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"GPU {name} is sm_{major}{minor}; the CUDA kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or newer"
    return None


class CudaBackend(Backend):
    name = "cuda"
    description = "CUDA C++ tensor-core kernels (mma.sync, sm_80+): fp16/bf16, head dims 64 and 128"

    def unavailable_reasons(self) -> list[str]:
        if _BUILD_REASON:
            return [_BUILD_REASON]
        if not torch.cuda.is_available():
            return ["no CUDA GPU"]
        reason = _capability_reason(torch.device("cuda", torch.cuda.current_device()))
        return [reason] if reason else []

    def reasons(self, inputs: AttentionInputs) -> list[str]:
        # Both lists, so a refusal on a machine without the kernels still says what else is wrong
        # with the call (a CPU tensor, say).
        return self.unavailable_reasons() + self.not_supported_reasons(inputs)

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = common_reasons(
            inputs, devices=("cuda",), dtypes=_DTYPES, max_head_dim=max(HEAD_DIMS), features=_FEATURES
        )
        if inputs.head_dim not in HEAD_DIMS:
            dims = ", ".join(str(d) for d in HEAD_DIMS)
            reasons.append(f"head_dim {inputs.head_dim} is not compiled into the CUDA kernels (head dims: {dims})")
        if inputs.device.type == "cuda" and torch.cuda.is_available():
            reason = _capability_reason(inputs.device)
            if reason:
                reasons.append(reason)
        if inputs.attn_mask is not None and inputs.attn_mask.dtype not in _MASK_DTYPES:
            reasons.append(
                f"attn_mask dtype {str(inputs.attn_mask.dtype).replace('torch.', '')} is not supported "
                "(bool, float16, bfloat16 or float32)"
            )
        block_mask = inputs.block_mask
        if block_mask is not None:
            bq, bk = block_mask.block_size
            if bq % MASK_TILE_MULTIPLE or bk % MASK_TILE_MULTIPLE:
                reasons.append(
                    f"block_mask block_size {(bq, bk)} is not supported: the CUDA kernels need multiples of "
                    f"{MASK_TILE_MULTIPLE} (their tile size)"
                )
        if inputs.seqlen_q >= MAX_SEQLEN or inputs.seqlen_k >= MAX_SEQLEN:
            reasons.append(f"sequence lengths must be below {MAX_SEQLEN}, got Lq={inputs.seqlen_q}, Lk={inputs.seqlen_k}")
        if inputs.batch > MAX_GRID_DIM or inputs.heads_q > MAX_GRID_DIM:
            reasons.append(f"batch and heads must be at most {MAX_GRID_DIM}, got {inputs.batch} and {inputs.heads_q}")
        return reasons

    def build_ops(self) -> BackendOps:
        if _BUILD_REASON:
            raise RuntimeError(_BUILD_REASON)
        return BackendOps(fwd=torch.ops.fastattn.attention_fwd.default, bwd=torch.ops.fastattn.attention_bwd.default)


BACKEND = CudaBackend()
