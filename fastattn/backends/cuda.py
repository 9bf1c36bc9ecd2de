"""The CUDA backend: tensor-core C++ kernels (``csrc/cuda/``) behind ``torch.ops.fastattn.attention_fwd/bwd``.

The kernels use ``mma.sync`` m16n8k16 (sm_80 and newer, for the architectures the extension was
built for), float16 and bfloat16, head dims 64 and 128. The forward is FlashAttention-2 style
(128-row query tiles, Q in registers, ``ldmatrix`` fragments, ``cp.async`` double-buffered K/V,
features as template flags); the backward is FlashAttention-2's (one kernel per key block and query
head doing the five products, dK/dV in registers, dQ summed with float32 atomics), and under
``torch.use_deterministic_algorithms(True)`` bit-reproducible (the same five products, dQ added in
a fixed key-block order instead of by atomics). The automatic choice puts these kernels before
Triton only where measured evidence says so (:mod:`fastattn.backends.evidence`). Design notes:
``docs/cuda-kernels.md``.
"""

from __future__ import annotations

import torch

from .. import _extension
from .._inputs import AttentionInputs
from ..ops import BackendOps, fwd_fake
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
    # A gradient flowing into the returned lse (issue 16 item 15): the CUDA backward does not take
    # dlse; declined here so such calls go to a backend that does.
    "lse gradient": False,
    # Attention sinks (fastattn.autograd.fold_sinks) are not validated on the CUDA kernels: calls with
    # sinks go to triton/cpu/reference, and backend="cuda" with sinks raises naming "sinks".
    "sinks": False,
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


_IMAGE_REASONS: dict[int, str | None] = {}


def _kernel_image_reason(index: int) -> str | None:
    """Why the built kernels have no image for GPU ``index`` (None when they have one), asked once.

    sm_XY code runs only on GPUs of major version X (and sm_90a only on sm_90), so a GPU newer than
    the build's ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``) cannot launch them; the extension
    asks the CUDA runtime (``cudaFuncGetAttributes``) instead of failing at the first launch.
    """
    if index not in _IMAGE_REASONS:
        module, _ = _extension.load()
        error = module.cuda_kernel_image_error(index) if hasattr(module, "cuda_kernel_image_error") else None
        if error is not None:
            major, minor = torch.cuda.get_device_capability(index)
            error = (
                f"fastattn._C has no CUDA kernel image for this GPU (sm_{major}{minor}): {error}; rebuild with "
                f"TORCH_CUDA_ARCH_LIST including {major}.{minor}"
            )
        _IMAGE_REASONS[index] = error
    return _IMAGE_REASONS[index]


def _capability_reason(device: torch.device) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"GPU {name} is sm_{major}{minor}; the CUDA kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or newer"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _kernel_image_reason(index)


# ---- Hopper (sm_90a) forward: csrc/cuda/sm90, the op fastattn::attention_fwd_sm90 (docs/cuda-hopper.md) ----
# It takes attention_fwd's arguments and hands the calls it does not cover on to attention_fwd, so
# the backend's forward is this op whenever the extension was built with it.


def _hopper_built() -> bool:
    """Whether the extension registers the Hopper forward (built with a 9.0a target and CUTLASS headers)."""
    if _extension.load()[0] is None or not hasattr(torch.ops.fastattn, "attention_fwd_sm90"):
        return False  # no extension, or one built before the op existed
    # The schema is in every build; out in q's layout, as attention_fwd's (ops.output_like_q).
    torch.library.register_fake("fastattn::attention_fwd_sm90", fwd_fake)
    return _BUILD_REASON is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastattn::attention_fwd_sm90", "CUDA"
    )


HOPPER_BUILT = _hopper_built()


# The Hopper kernel's tile (query rows and keys): a BlockMask's blocks must be multiples of it.
HOPPER_TILE = 128


def hopper_reasons(inputs: AttentionInputs) -> list[str]:
    """Why the Hopper kernel does not serve this forward (empty: it does). The same rule as
    ``hopper_serves`` in csrc/cuda/sm90/attention_fwd_sm90.cpp; the sm80 kernels serve the rest.
    Causal, windows, ALiBi, softcap, lengths, GQA and BlockMask tile lists are compile-time
    features of the Hopper kernel; an element mask (``attn_mask``, or a BlockMask's element mask
    other than a window) and dropout are not."""
    from ..autograd import effective_attn_mask  # imports the backends: here, not at module level

    reasons = []
    if not HOPPER_BUILT:
        reasons.append("the extension was built without the Hopper kernel (needs a 9.0a target and CUTLASS headers)")
    if inputs.device.type == "cuda" and torch.cuda.get_device_capability(inputs.device) != (9, 0):
        reasons.append("the GPU is not sm_90")
    if inputs.dtype not in _DTYPES:
        reasons.append("dtype is not float16/bfloat16")
    if inputs.head_dim not in HEAD_DIMS or inputs.head_dim_v != inputs.head_dim:
        reasons.append("head_dim is not 64 or 128 (for q, k and v)")
    if inputs.seqlen_q == 0 or inputs.seqlen_k == 0:
        reasons.append("an empty sequence")
    if inputs.scale <= 0:
        reasons.append("scale <= 0")
    if effective_attn_mask(inputs, "cuda") is not None:
        reasons.append("an element mask (attn_mask, or a BlockMask's element mask) is not implemented in the Hopper kernel")
    if inputs.block_mask is not None and any(b % HOPPER_TILE for b in inputs.block_mask.block_size):
        reasons.append(f"block_mask block_size {inputs.block_mask.block_size} is not a multiple of {HOPPER_TILE}")
    if inputs.dropout_p > 0:
        reasons.append("dropout is not implemented in the Hopper kernel")
    return reasons


def forward_path(inputs: AttentionInputs) -> str:
    """Which CUDA kernel runs this call's forward: ``"sm90"`` (wgmma + TMA) or ``"sm80"`` (mma.sync)."""
    return "sm90" if HOPPER_BUILT and not hopper_reasons(inputs) else "sm80"


class CudaBackend(Backend):
    name = "cuda"
    description = "CUDA C++ tensor-core kernels (mma.sync, sm_80+): fp16/bf16, head dims 64 and 128" + (
        "; on sm_90 the forward of calls without an element mask or dropout runs the Hopper "
        "wgmma+TMA kernel (cuda.forward_path tells)" if HOPPER_BUILT else ""
    )

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
        fwd = torch.ops.fastattn.attention_fwd_sm90 if HOPPER_BUILT else torch.ops.fastattn.attention_fwd
        return BackendOps(fwd=fwd.default, bwd=torch.ops.fastattn.attention_bwd.default)


BACKEND = CudaBackend()
