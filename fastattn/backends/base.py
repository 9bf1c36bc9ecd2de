"""What every backend declares: where it can run, what it supports, and its two ops."""

from __future__ import annotations

import functools

import torch

from .._inputs import AttentionInputs
from ..ops import BackendOps

# Called whenever an attribute of a backend instance is set or deleted: fastattn.backends drops its
# cached dispatch decisions then (tests replace ``reasons`` on an instance, for one).
CHANGE_HOOKS: list = []


class Backend:
    """A kernel family behind :func:`fastattn.attention`.

    Subclasses set ``name`` and ``description``, implement :meth:`unavailable_reasons`
    (why it cannot run on this machine at all: no GPU, extension not built, ...),
    :meth:`not_supported_reasons` (why it cannot serve one particular call) and :meth:`build_ops`.
    """

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        for hook in CHANGE_HOOKS:
            hook()

    def __delattr__(self, name):
        super().__delattr__(name)
        for hook in CHANGE_HOOKS:
            hook()

    name: str = ""
    description: str = ""
    # (BLOCK_Q, BLOCK_K): turn an attn_mask into a BlockMask of these tiles so the kernels skip the
    # tiles it hides entirely (fastattn.masks.block_mask_from_attn_mask, cached); None = do not.
    attn_mask_block_size: tuple[int, int] | None = None
    # True: the kernels read a BlockMask's per-tile element masks (``partial_masks``) on partial tiles
    # themselves; False: they get the same mask as a dense (B, H, Lq, Lk) attn_mask.
    reads_partial_masks: bool = False

    def unavailable_reasons(self) -> list[str]:
        return []

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        raise NotImplementedError

    def build_ops(self) -> BackendOps:
        raise NotImplementedError

    @functools.cached_property
    def ops(self) -> BackendOps:
        """The registered forward/backward ops, created on first use."""
        return self.build_ops()

    def dropout_keep_mask(self, inputs: AttentionInputs, seed: int) -> torch.Tensor:
        """The dropout pattern (bool ``(B, Hq, Lq, Lk)``, True = keep) this backend applies for ``seed``.

        For tests that compare a backend's dropout with the reference given the same mask.
        """
        raise NotImplementedError(f"backend {self.name!r} does not expose its dropout mask")

    def auto_select_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Why the automatic choice should pass over this backend although it could serve the call
        (the Triton interpreter, say: correct but far slower than the C++ CPU kernels)."""
        return []

    def reasons(self, inputs: AttentionInputs) -> list[str]:
        """Every reason this backend cannot serve ``inputs`` here (empty = it can)."""
        return self.unavailable_reasons() or self.not_supported_reasons(inputs)


def common_reasons(
    inputs: AttentionInputs,
    *,
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...],
    max_head_dim: int,
    features: dict[str, bool],
) -> list[str]:
    """Reasons shared by kernel backends: device, dtype, head dim, and unsupported features.

    ``features`` maps a feature name (see :func:`used_features`) to whether the backend supports it.
    """
    reasons = []
    if inputs.device.type not in devices:
        reasons.append(f"q is on {inputs.device.type}, this backend runs on {'/'.join(devices)}")
    if inputs.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        reasons.append(f"dtype {str(inputs.dtype).replace('torch.', '')} is not supported (supported: {names})")
    if inputs.head_dim > max_head_dim or inputs.head_dim_v > max_head_dim:
        reasons.append(f"head_dim {inputs.head_dim} (v: {inputs.head_dim_v}) exceeds this backend's maximum {max_head_dim}")
    for feature in used_features(inputs):
        if not features.get(feature, False):
            reasons.append(f"{feature} is not supported")
    return reasons


def used_features(inputs: AttentionInputs) -> list[str]:
    """Names of the optional features a call uses, for capability checks."""
    used = []
    if inputs.head_dim_v != inputs.head_dim:
        used.append("a value head_dim different from the query's")
    if inputs.window_left is not None or inputs.window_right is not None:
        used.append("causal" if inputs.is_causal else "window")
    if inputs.attn_mask is not None:
        used.append("attn_mask")
        if inputs.attn_mask.dtype != torch.bool and inputs.attn_mask.requires_grad and torch.is_grad_enabled():
            used.append("attn_mask gradient")
    if inputs.block_mask is not None:
        used.append("block_mask")
    if inputs.alibi_slopes is not None:
        used.append("alibi")
    if inputs.softcap > 0:
        used.append("softcap")
    if inputs.dropout_p > 0:
        used.append("dropout")
    if inputs.key_lengths is not None or inputs.query_lengths is not None:
        used.append("lengths")
    if inputs.heads_q != inputs.heads_kv:
        used.append("gqa")
    if inputs.sinks is not None:
        used.append("sinks")
    # With sinks the kernels' lse always feeds the result (fastattn.autograd.fold_sinks).
    if (inputs.return_lse or inputs.sinks is not None) and inputs.requires_grad:
        used.append("lse gradient")
    return used
