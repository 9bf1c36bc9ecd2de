"""Validation and normalisation of the public arguments.

Every public entry point funnels its arguments through :func:`normalize`, which checks them
(raising ``TypeError``/``ValueError`` that name the argument) and turns the user-facing
spellings (``causal``, ``window``, SDPA's ``is_causal``) into one description,
:class:`AttentionInputs`, that backends and the reference share.

Visibility rule (bottom-right aligned, as flash-attn): with ``offset = Lk - Lq`` (per batch,
``key_lengths[b] - query_lengths[b]`` when lengths are given), query ``i`` sees key ``j`` iff
``i + offset - window_left <= j <= i + offset + window_right``, where ``None`` means unbounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .block_mask import BlockMask

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class InputValueError(ValueError, RuntimeError):
    """A bad argument value. Also a ``RuntimeError``, which torch's SDPA raises for the same
    mistakes, so code written against torch catches it."""


class InputTypeError(TypeError, RuntimeError):
    """A bad argument type (also a ``RuntimeError``, as torch's SDPA raises)."""


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """Checked, normalised arguments of one attention call.

    Shapes: ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``.
    ``attn_mask`` is bool (True = attend) or additive float, expanded (without a copy) to
    ``(B, Hq, Lq, Lk)``; ``attn_mask_own`` is the same mask 4-D in its own shape (size 1 on the
    dimensions it broadcasts), the tensor the autograd Function differentiates, so that the mask's
    gradient is accumulated in that shape and never as a dense ``(B, Hq, Lq, Lk)`` tensor.
    ``alibi_slopes`` is float32 expanded to ``(B, Hq)``.
    ``key_lengths``/``query_lengths`` are int32 ``(B,)``. ``sinks`` is floating ``(Hq,)`` (see
    :func:`_check_sinks`).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    window_left: int | None = None
    window_right: int | None = None
    attn_mask: torch.Tensor | None = None
    block_mask: BlockMask | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    key_lengths: torch.Tensor | None = None
    query_lengths: torch.Tensor | None = None
    return_lse: bool = False  # the caller receives lse, which then carries a gradient
    sinks: torch.Tensor | None = None  # per-head sink logits (Hq,), applied by fastattn.autograd.fold_sinks
    attn_mask_own: torch.Tensor | None = None  # attn_mask before the expand, 4-D (see above)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[2]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.q, self.k, self.v, self.attn_mask, self.sinks)
        )

    @property
    def is_causal(self) -> bool:
        """True when the window is exactly bottom-right causal (no left bound, right = 0)."""
        return self.window_left is None and self.window_right == 0


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_number(x, name: str, *, minimum: float | None = None, below: float | None = None) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InputTypeError(f"{name} must be a float, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise InputValueError(f"{name} must be finite, got {x}")
    if minimum is not None and x < minimum:
        raise InputValueError(f"{name} must be >= {minimum}, got {x}")
    if below is not None and x >= below:
        raise InputValueError(f"{name} must be < {below}, got {x}")
    return x


def _check_bool(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise InputTypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def _check_qkv(q, k, v) -> None:
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, name)
        if t.dim() != 4:
            raise InputValueError(f"{name} must be 4-D (batch, heads, seqlen, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise InputTypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise InputValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise InputValueError(f"k and v must have q's batch size {B}, got k {Bk} and v {v.shape[0]}")
    if Dk != D:
        raise InputValueError(f"k must have q's head_dim {D} (last dim), got {Dk}")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise InputValueError(
            f"v must match k in heads and seqlen (k: {Hkv} heads, {Lk} keys), got v shape {tuple(v.shape)}"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise InputValueError(
            f"the number of query heads ({Hq}, q.shape[1]) must be a multiple of the number of key/value heads "
            f"({Hkv}, k.shape[1]) for GQA/MQA"
        )
    if D == 0:
        raise InputValueError("q must have a non-zero head_dim")


def _check_window(window) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise InputTypeError(f"window must be a pair (left, right) of ints, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if isinstance(w, bool) or not isinstance(w, int):
            raise InputTypeError(f"window {side} must be an int (-1 = unbounded), got {w!r}")
        if w < -1:
            raise InputValueError(f"window {side} must be >= -1 (-1 = unbounded), got {w}")
        out.append(None if w == -1 else w)
    return out[0], out[1]


def _broadcast_mask(
    mask, B: int, H: int, Lq: int, Lk: int, q: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expanded, own)``: ``mask`` expanded without a copy to ``(B, H, Lq, Lk)``, and the 4-D view
    it is expanded from (its own shape, size 1 on the dimensions it broadcasts)."""
    _check_tensor(mask, name)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise InputTypeError(f"{name} must be bool (True = attend) or a floating additive mask, got {mask.dtype}")
    if mask.device != q.device:
        raise InputValueError(f"{name} must be on q's device {q.device}, got {mask.device}")
    target = (B, H, Lq, Lk)
    if mask.dim() > 4 or any(s not in (1, t) for s, t in zip(mask.shape[::-1], target[::-1])):
        raise InputValueError(f"{name} of shape {tuple(mask.shape)} is not broadcastable to (B, Hq, Lq, Lk) = {target}")
    own = mask[(None,) * (4 - mask.dim())] if mask.dim() < 4 else mask  # a view, leading size-1 dims
    if mask.requires_grad and torch.is_grad_enabled():
        if any(stride == 0 and size > 1 for stride, size in zip(own.stride(), own.shape)):
            # An already expanded mask that wants a gradient: that gradient has the expanded shape, but
            # the ops reduce their dbias over every stride-0 dimension. A copy gives each element its own
            # gradient (the caller's expand then sums them); pass the unexpanded mask to avoid it.
            own = own.contiguous()
        if own.dtype in (torch.float16, torch.bfloat16):
            # The ops accumulate the gradient in float32 and round it to the mask's dtype once: cast
            # (a copy of the mask's own size, never the expanded one) so that rounding is the cast's
            # backward. The forward is unchanged: kernels add masks in float32, and the cast is exact.
            own = own.float()
    return own.expand(target), own


def _check_lengths(lengths, name: str, B: int, max_len: int, q: torch.Tensor) -> torch.Tensor | None:
    if lengths is None:
        return None
    _check_tensor(lengths, name)
    if lengths.dtype not in (torch.int32, torch.int64):
        raise InputTypeError(f"{name} must be an int32 or int64 tensor, got {lengths.dtype}")
    if lengths.shape != (B,):
        raise InputValueError(f"{name} must have shape (batch,) = ({B},), got {tuple(lengths.shape)}")
    if lengths.device != q.device:
        raise InputValueError(f"{name} must be on q's device {q.device}, got {lengths.device}")
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > max_len):
        raise InputValueError(f"{name} must lie in [0, {max_len}], got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.to(torch.int32)


def _check_sinks(sinks, Hq: int, q: torch.Tensor) -> torch.Tensor | None:
    """``sinks``: a floating ``(Hq,)`` tensor on q's device, no NaN and no +inf (-inf = no sink).
    Kept in its dtype (so float64 sinks keep float64 gradients); computed in float32 or wider."""
    if sinks is None:
        return None
    _check_tensor(sinks, "sinks")
    if not sinks.is_floating_point():
        raise InputTypeError(f"sinks must be a floating tensor (float32 preferred), got {sinks.dtype}")
    if sinks.shape != (Hq,):
        raise InputValueError(f"sinks must have shape (Hq,) = ({Hq},), one logit per query head, got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise InputValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    if not torch.compiler.is_compiling() and not bool((sinks < math.inf).all()):  # False for NaN and +inf
        raise InputValueError("sinks must not hold NaN or +inf (-inf means no sink for that head)")
    return sinks


def block_mask_window(block_mask, key_lengths, query_lengths) -> tuple[int | None, int | None] | None:
    """The window that stands for ``block_mask``'s element mask at the op level, or None.

    A BlockMask built by ``fastattn.masks.causal``/``sliding_window`` carries its element mask as a
    window aligned at ``Lk - Lq``. With lengths the op's offset is per batch, so the window cannot
    stand in for it and the dense element mask is used instead.
    """
    if block_mask is None or block_mask.window is None or key_lengths is not None or query_lengths is not None:
        return None
    return block_mask.window


def _tighter(a: int | None, b: int | None) -> int | None:
    """The tighter of two window bounds (None = unbounded)."""
    return b if a is None else a if b is None else min(a, b)


def normalize(
    q,
    k,
    v,
    *,
    causal=False,
    window=None,
    block_mask=None,
    attn_mask=None,
    alibi_slopes=None,
    softcap=0.0,
    dropout_p=0.0,
    scale=None,
    key_lengths=None,
    query_lengths=None,
    window_override: tuple[int | None, int | None] | None = None,
    return_lse: bool = False,
    sinks=None,
) -> AttentionInputs:
    """Check the public arguments of :func:`fastattn.attention` and normalise them.

    ``window_override`` is for :func:`fastattn.scaled_dot_product_attention`, whose top-left
    ``is_causal`` is a window whose right bound may be negative (``Lq - Lk``).
    """
    _check_qkv(q, k, v)
    # Kernels read rows with a unit stride; a tensor whose last dimension is strided (a transposed
    # (B, H, D, L) key, say) is the one case that needs a copy, made once here, before any op.
    # (clone, not contiguous(): torch calls an empty tensor contiguous whatever its strides.)
    q, k, v = (
        t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)
        for t in (q, k, v)
    )
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]

    _check_bool(causal, "causal")
    if window_override is not None:
        window_left, window_right = window_override
    else:
        window_left, window_right = _check_window(window)
    if causal:
        window_right = 0 if window_right is None else min(window_right, 0)

    scale = 1.0 / math.sqrt(D) if scale is None else _check_number(scale, "scale")
    softcap = _check_number(softcap, "softcap", minimum=0.0)
    dropout_p = _check_number(dropout_p, "dropout_p", minimum=0.0, below=1.0)

    attn_mask_own = None
    if attn_mask is not None:
        attn_mask, attn_mask_own = _broadcast_mask(attn_mask, B, Hq, Lq, Lk, q, "attn_mask")

    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise InputTypeError(f"block_mask must be a fastattn.BlockMask, got {type(block_mask).__name__}")
        if block_mask.seq_lens != (Lq, Lk):
            raise InputValueError(f"block_mask was built for seq_lens {block_mask.seq_lens}, but (Lq, Lk) = {(Lq, Lk)}")
        mb, mh = block_mask.layout.shape[:2]
        if mb not in (1, B) or mh not in (1, Hq):
            raise InputValueError(f"block_mask has (B, H) = {(mb, mh)}, not broadcastable to (B, Hq) = {(B, Hq)}")
        if block_mask.device != q.device:
            raise InputValueError(f"block_mask must be on q's device {q.device}, got {block_mask.device}")

    if alibi_slopes is not None:
        _check_tensor(alibi_slopes, "alibi_slopes")
        if alibi_slopes.dtype != torch.float32:
            raise InputTypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.shape not in ((Hq,), (B, Hq)):
            raise InputValueError(f"alibi_slopes must have shape (Hq,) = ({Hq},) or (B, Hq) = ({B}, {Hq}), got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise InputValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(alibi_slopes).all()):
            raise InputValueError("alibi_slopes must be finite, got NaN or Inf values")
        alibi_slopes = alibi_slopes.expand(B, Hq)

    key_lengths = _check_lengths(key_lengths, "key_lengths", B, Lk, q)
    query_lengths = _check_lengths(query_lengths, "query_lengths", B, Lq, q)
    sinks = _check_sinks(sinks, Hq, q)

    block_window = block_mask_window(block_mask, key_lengths, query_lengths)
    if block_window is not None:
        # The block mask's element mask is a window: kernels apply it as the call's own window,
        # intersected with it, and no (Lq, Lk) element mask is built (see effective_attn_mask).
        window_left = _tighter(window_left, block_window[0])
        window_right = _tighter(window_right, block_window[1])

    return AttentionInputs(
        q=q,
        k=k,
        v=v,
        scale=scale,
        window_left=window_left,
        window_right=window_right,
        attn_mask=attn_mask,
        attn_mask_own=attn_mask_own,
        block_mask=block_mask,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        dropout_p=dropout_p,
        key_lengths=key_lengths,
        query_lengths=query_lengths,
        return_lse=return_lse,
        sinks=sinks,
    )
