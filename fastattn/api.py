"""The public functional API."""

from __future__ import annotations

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

from ._inputs import AttentionInputs, InputValueError, _check_bool, _check_tensor, normalize
from .autograd import block_args, effective_attn_mask, run
from .backends import CALL_PLANS, Backend, dispatch_environment, remember_plan, select_backend

_Tensor = torch.Tensor


def _plan_key(q, k, v, causal, window, softcap, scale, return_lse, backend, layout) -> tuple | None:
    """The key of a call's cached plan (see :func:`attention`), or None when the call takes the full path.

    Calls qualify when the caller has checked that they use no tensor option (mask, lengths, ALiBi,
    sinks) and no dropout. The rest must be plain values of the accepted types -- ``True`` equals ``1``
    in a key, so a type check here keeps ``causal=1`` on the path that rejects it -- and tensors
    with rows of unit stride (others are copied by :func:`fastattn._inputs.normalize`). Every property
    the full path checks or dispatches on is in the key: shapes, dtypes, devices, the options,
    the requested backend and the environment variables that steer the choice.
    """
    if torch.compiler.is_compiling() or not (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor):
        return None
    if not (causal.__class__ is bool and return_lse.__class__ is bool and softcap.__class__ is float
            and (scale is None or scale.__class__ is float)):
        return None
    if window is not None and not (window.__class__ is tuple and len(window) == 2 and window[0].__class__ is int
                                   and window[1].__class__ is int):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if not all(t.is_contiguous() or t.stride()[-1] == 1 for t in (q, k, v)):
        return None
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, causal, window,
            softcap, scale, return_lse, backend, layout, *dispatch_environment())


def _forward_plan(inputs: AttentionInputs, backend: Backend):
    """The forward op of ``backend`` and its arguments after ``q, k, v``, exactly as
    :func:`fastattn.autograd.run` passes them for ``inputs`` without gradients (seed 0: no dropout)."""
    name = backend.name
    lists, block_size_q, block_size_k = block_args(inputs, name)
    return backend.ops.fwd, (
        effective_attn_mask(inputs, name), inputs.alibi_slopes, inputs.key_lengths, inputs.query_lengths,
        *lists[:4], *lists[8:], block_size_q, block_size_k, inputs.scale, inputs.window_left, inputs.window_right,
        inputs.softcap, inputs.dropout_p, 0,
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    block_mask=None,
    attn_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    key_lengths: torch.Tensor | None = None,
    query_lengths: torch.Tensor | None = None,
    layout: str = "bhld",
    sinks: torch.Tensor | None = None,
):
    """Fused scaled dot-product attention.

    Args:
        q: ``(B, Hq, Lq, D)``. Any strides with a unit last stride are used without a copy, so a
            ``(B, L, H, D)`` tensor ``.transpose(1, 2)`` is free.
        k: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (GQA/MQA).
        v: ``(B, Hkv, Lk, Dv)``.
        causal: query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)`` (bottom-right aligned, as flash-attn)::

                Lq = 3, Lk = 5 (x = visible)
                    k0 k1 k2 k3 k4
                q0 [ x  x  x  .  . ]
                q1 [ x  x  x  x  . ]
                q2 [ x  x  x  x  x ]

        window: ``(left, right)``: query ``i`` sees key ``j`` iff
            ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right``; ``-1`` means unbounded.
            Combined with ``causal``, ``right`` becomes ``min(right, 0)``.
        block_mask: a :class:`fastattn.BlockMask`; empty tiles are never computed.
        attn_mask: bool (True = attend) or additive float, broadcastable to ``(B, Hq, Lq, Lk)``,
            as in ``torch.nn.functional.scaled_dot_product_attention``. All masks intersect.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``; adds ``-slope * |i + (Lk - Lq) - j|``.
        softcap: if ``> 0``, scores become ``softcap * tanh(scores / softcap)`` before masks and bias.
        dropout_p: dropout probability on the attention probabilities; reproducible under ``torch.manual_seed``.
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the float32 row log-sum-exp ``(B, Hq, Lq)`` (``-inf`` where a row sees no key).
            It carries a gradient (``d lse_i / d s_ij`` is the probability ``p_ij``).
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"reference"`` or ``None`` (the first that fits;
            ``FASTATTN_BACKEND`` overrides that choice). An explicit backend that cannot serve raises
            :class:`fastattn.BackendNotSupportedError` listing why.
        key_lengths: int ``(B,)``: keys ``j >= key_lengths[b]`` are padding. With lengths the causal,
            window and ALiBi offsets use ``key_lengths[b] - query_lengths[b]``.
        query_lengths: int ``(B,)``: query rows ``i >= query_lengths[b]`` are padding and return 0.
        layout: ``"bhld"`` (default): q, k, v and out are ``(B, H, L, D)`` as above; ``"blhd"``:
            they are ``(B, L, H, D)`` (flash-attn's layout), read without a copy, and ``out`` is
            ``(B, Lq, Hq, Dv)`` (a transposed view). Masks, lengths and ``lse`` keep their shapes.
        sinks: float32 ``(Hq,)`` learned per-head logits that join every row's softmax denominator
            (gpt-oss, StreamingLLM): ``p_ij = exp(s_ij) / (exp(sinks[h]) + sum_j exp(s_ij))``. A sink has
            no value, so it only scales a row's output down; it receives a gradient. ``-inf`` = no sink.
            With sinks, ``lse`` includes the sink term (a row that sees no key has ``lse = sinks[h]``).
            Not on the cuda backend (docs/sinks.md).

    Returns:
        ``out (B, Hq, Lq, Dv)`` in q's dtype (in q's memory layout on the cpu and reference backends:
        a transposed ``(B, L, H, D)`` q gives a transposed ``(B, L, H, Dv)`` out), or ``(out, lse)``
        with ``return_lse``. A query row that can see no key returns 0 -- never NaN, in the output or
        any gradient. NaN/Inf in keys or values a row cannot see never reaches it; a NaN the row does
        see makes it NaN (docs/design.md, "Non-finite inputs").
    """
    # Per-call cost: a CPU call without tensor options, gradients or dropout whose signature (shapes,
    # dtypes, options, backend) has been checked and dispatched before reuses that call's plan -- the
    # op and its arguments -- and skips validation, normalisation and dispatch
    # (docs/varlen-and-kvcache.md, "Per-call cost").
    key = None
    if (attn_mask is None and block_mask is None and alibi_slopes is None and key_lengths is None
            and query_lengths is None and sinks is None and dropout_p.__class__ is float and not dropout_p):
        key = _plan_key(q, k, v, causal, window, softcap, scale, return_lse, backend, layout)
        plan = CALL_PLANS.get(key) if key is not None else None
        if plan is not None:
            fwd, args, blhd = plan
            if blhd:
                out, lse = fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *args)
                out = out.transpose(1, 2)
            else:
                out, lse = fwd(q, k, v, *args)
            return (out, lse) if return_lse else out

    _check_bool(return_lse, "return_lse")
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout must be 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D), got {layout!r}")
    blhd = layout == "blhd"
    if blhd:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D (B, L, H, D) tensor with layout='blhd', got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    inputs = normalize(
        q, k, v, causal=causal, window=window, block_mask=block_mask, attn_mask=attn_mask,
        alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, scale=scale,
        key_lengths=key_lengths, query_lengths=query_lengths, return_lse=return_lse, sinks=sinks,
    )
    chosen = select_backend(inputs, backend)
    if key is not None and inputs.device.type == "cpu" and not inputs.requires_grad:
        remember_plan(key, (*_forward_plan(inputs, chosen), blhd))
    result = run(inputs, chosen.name, return_lse)
    if blhd:
        return (result[0].transpose(1, 2), result[1]) if return_lse else result.transpose(1, 2)
    return result


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention``.

    Same signature and semantics: inputs ``(..., H, L, E)`` with any number of leading batch
    dimensions (or ``(..., L, E)``), ``is_causal`` is top-left aligned (query ``i`` sees keys
    ``j <= i``) as in torch, bool masks are True = attend. The one documented difference: a
    query row that sees no key returns 0 instead of NaN. Bad arguments raise exceptions that are
    also ``RuntimeError`` (what torch raises), and torch's ``CausalBias`` masks
    (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``) are applied as the
    matching causal alignment, without building a mask.
    """
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
        if t.dim() < 2:
            raise InputValueError(f"{name} must have at least 2 dimensions (..., L, E), got shape {tuple(t.shape)}")
    _check_bool(is_causal, "is_causal")
    _check_bool(enable_gqa, "enable_gqa")
    if is_causal and attn_mask is not None:
        raise InputValueError("attn_mask must be None when is_causal=True (as in torch's scaled_dot_product_attention)")
    if query.dim() != key.dim() or query.dim() != value.dim():
        raise InputValueError(
            f"query, key and value must have the same number of dimensions, got {query.dim()}, {key.dim()}, {value.dim()}"
        )
    # torch's CausalBias masks (torch.nn.attention.bias.causal_upper_left / causal_lower_right) stand for a
    # causal alignment: used as such, never materialised.
    bottom_right_causal = False
    if isinstance(attn_mask, CausalBias):
        if attn_mask.variant == CausalVariant.UPPER_LEFT:
            is_causal = True
        else:
            bottom_right_causal = True
        attn_mask = None

    # Bring (..., H, L, E) to (B, H, L, E): leading dims fold into the batch, a missing head dim becomes 1.
    out_shape = (*query.shape[:-1], value.shape[-1])
    if query.dim() < 4:
        query, key, value = (t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    elif query.dim() > 4:
        batch_shape = query.shape[:-3]
        if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
            raise InputValueError(f"key and value must have query's batch dimensions {tuple(batch_shape)}")
        if attn_mask is not None:
            _check_tensor(attn_mask, "attn_mask")
            try:
                attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
            except RuntimeError as exc:
                raise InputValueError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                    f"{(*query.shape[:-1], key.shape[-2])}"
                ) from exc
            attn_mask = attn_mask.reshape(-1, *attn_mask.shape[-3:])
        query, key, value = (t.reshape(-1, *t.shape[-3:]) for t in (query, key, value))
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise InputValueError(
            f"query has {query.shape[1]} heads but key/value have {key.shape[1]}; pass enable_gqa=True for GQA"
        )

    window = (None, 0) if bottom_right_causal else None
    if is_causal:  # top-left: j <= i, i.e. a right bound of -(Lk - Lq) in bottom-right terms
        window = (None, query.shape[-2] - key.shape[-2])
    inputs = normalize(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, window_override=window)
    out = run(inputs, select_backend(inputs).name, return_lse=False)
    return out.reshape(out_shape)
