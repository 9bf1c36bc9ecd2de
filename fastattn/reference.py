"""Plain-PyTorch attention that materialises the scores: the ground truth of every semantic.

Not a fast path. It runs in any dtype (float64 for ``gradcheck``), and the tests and
benchmarks compare every backend with it.

Order of operations on the scores ``s = (scale * q) @ k^T`` (per batch b, head h)::

    s = softcap * tanh(s / softcap)          if softcap > 0
    s = s - slope[b, h] * |i + offset - j|   if alibi_slopes
    s = s + attn_mask                        if attn_mask is additive float
    s = -inf where not visible               window / causal, bool attn_mask, block_mask, lengths
    p = softmax(s)  (0 for a row that sees no key, lse = -inf)
        with sinks: p_ij = exp(s_ij) / (exp(sinks[h]) + sum_j exp(s_ij)), lse = log(that denominator)
    p = p * keep / (1 - dropout_p)           if dropout
    out = p @ v

What a row cannot see never influences it: masking is a selection, never a multiplication by
zero, so NaN or Inf stored in a key or value hidden from row i reaches no output, lse or
gradient of row i. A NaN (or an infinite score) that a row does see makes that row NaN.
"""

from __future__ import annotations

import torch

from ._inputs import AttentionInputs, normalize


def draw_seed() -> int:
    """A dropout seed drawn from torch's default generator, so ``torch.manual_seed`` reproduces it."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_keep_mask(seed: int, shape: tuple[int, ...], dropout_p: float, device: torch.device) -> torch.Tensor:
    """The reference backend's dropout pattern: bool ``shape``, True = keep. A function of ``seed`` only."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def query_key_offset(inputs: AttentionInputs) -> torch.Tensor:
    """``Lk - Lq`` per batch (from the lengths when given), shaped (B, 1, 1, 1) for broadcasting."""
    device = inputs.device
    klen = inputs.key_lengths if inputs.key_lengths is not None else torch.full((inputs.batch,), inputs.seqlen_k, device=device)
    qlen = inputs.query_lengths if inputs.query_lengths is not None else torch.full((inputs.batch,), inputs.seqlen_q, device=device)
    return (klen.long() - qlen.long()).view(-1, 1, 1, 1)


def visible_mask(inputs: AttentionInputs) -> torch.Tensor:
    """Bool ``(B, Hq or 1, Lq, Lk)``: which (query, key) pairs may attend. True = visible.

    A key hidden by an additive mask entry of ``-inf`` counts as not visible, like a False in a bool mask.
    """
    device = inputs.device
    i = torch.arange(inputs.seqlen_q, device=device).view(1, 1, -1, 1)
    j = torch.arange(inputs.seqlen_k, device=device).view(1, 1, 1, -1)
    diag = i + query_key_offset(inputs)  # the key index aligned with query i
    visible = torch.ones(inputs.batch, 1, inputs.seqlen_q, inputs.seqlen_k, dtype=torch.bool, device=device)
    if inputs.window_left is not None:
        visible = visible & (j >= diag - inputs.window_left)
    if inputs.window_right is not None:
        visible = visible & (j <= diag + inputs.window_right)
    if inputs.key_lengths is not None:
        visible = visible & (j < inputs.key_lengths.view(-1, 1, 1, 1))
    if inputs.query_lengths is not None:
        visible = visible & (i < inputs.query_lengths.view(-1, 1, 1, 1))
    if inputs.attn_mask is not None:
        mask = inputs.attn_mask.detach()
        visible = visible & (mask if mask.dtype == torch.bool else mask != float("-inf"))
    if inputs.block_mask is not None:
        visible = visible & inputs.block_mask.to_dense()
    return visible


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: what softmax, masks and bias are computed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with non-finite entries replaced by 0 (a select, so no NaN reaches a gradient)."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _expand_heads(t: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    return t.repeat_interleave(inputs.heads_q // inputs.heads_kv, dim=1)


def scores(inputs: AttentionInputs, *, upcast: bool = False, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Scores after softcap, ALiBi, additive mask and masking: ``(B, Hq, Lq, Lk)``; -inf where not visible.

    Computed in q's dtype -- the low-precision reference the tolerance rule compares with; the scale
    is folded into q first, so large float16 inputs do not overflow -- or, with ``upcast``, in float32
    (float64 for float64 inputs). A non-finite key only reaches the rows that see it: its scores are
    NaN there and -inf elsewhere.
    """
    compute = compute_dtype(inputs.dtype) if upcast else inputs.dtype
    q = inputs.q.to(compute) * inputs.scale
    k = _expand_heads(inputs.k, inputs).to(compute)
    s = torch.matmul(q, _finite_or_zero(k).transpose(-1, -2))
    s = s.masked_fill(~torch.isfinite(k.detach()).all(dim=-1).unsqueeze(-2), float("nan"))
    if inputs.softcap > 0:
        s = inputs.softcap * torch.tanh(s / inputs.softcap)
    if inputs.alibi_slopes is not None:
        i = torch.arange(inputs.seqlen_q, device=s.device).view(1, 1, -1, 1)
        j = torch.arange(inputs.seqlen_k, device=s.device).view(1, 1, 1, -1)
        distance = (i + query_key_offset(inputs) - j).abs().to(compute)
        s = s - inputs.alibi_slopes.to(compute)[:, :, None, None] * distance
    if inputs.attn_mask is not None and inputs.attn_mask.dtype != torch.bool:
        s = s + inputs.attn_mask.to(compute)
    if visible is None:
        visible = visible_mask(inputs)
    return s.masked_fill(~visible, float("-inf"))


def probabilities(inputs: AttentionInputs, *, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of :func:`scores` (0 on rows that see no key) and the row log-sum-exp.

    With ``inputs.sinks`` each row's denominator also holds ``exp(sinks[h])``, so ``p`` sums to less
    than 1 and ``lse`` includes the sink (a row that sees no key has ``p = 0`` and ``lse = sinks[h]``).

    Returns ``p (B, Hq, Lq, Lk)`` in float32 (float64 for float64 inputs) and ``lse (B, Hq, Lq)``.
    A row with a NaN or +inf among its visible scores (a NaN or infinite visible input) is NaN at
    its visible keys, 0 elsewhere, and its lse is NaN.
    """
    visible = visible_mask(inputs)
    s = scores(inputs, upcast=upcast, visible=visible).to(compute_dtype(inputs.dtype))
    # Softmax is shift invariant, so the detached row max changes no gradient; rows that see
    # nothing get a max of 0 and a sum of 0, which yields p = 0 and lse = -inf without NaN.
    if s.shape[-1] == 0:
        row_max = s.new_full((*s.shape[:-1], 1), float("-inf"))
    else:
        row_max = s.detach().amax(dim=-1, keepdim=True)
    # A sink is one more logit in every row's denominator, with no value: (1, Hq, 1, 1).
    sink = None if inputs.sinks is None else inputs.sinks.to(s.dtype).view(1, -1, 1, 1)
    if sink is not None:
        row_max = torch.maximum(row_max, sink.detach())
    bad = (torch.isnan(s.detach()) | (s.detach() == float("inf"))).any(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(torch.where(bad, torch.zeros_like(s), s) - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    p_bad = torch.zeros_like(p).masked_fill(visible, float("nan"))
    p = torch.where(bad, p_bad, p)
    # lse = m + log(sum e) is differentiable (d lse / d s = p); rows that see nothing keep -inf
    # without a 1/0 in the gradient.
    lse = torch.where(denom > 0, row_max + torch.log(torch.where(denom > 0, denom, torch.ones_like(denom))),
                      torch.full_like(denom, float("-inf")))
    lse = lse.masked_fill(bad, float("nan")).squeeze(-1)
    return p, lse


def _weighted_values(p: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``p @ v`` where a non-finite value reaches exactly the rows that see it (as NaN), never the others."""
    out = torch.matmul(p, _finite_or_zero(v))
    bad_v = ~torch.isfinite(v.detach())
    if bad_v.any():
        hits = torch.matmul(visible.to(p.dtype), bad_v.to(p.dtype)) > 0  # (B, Hq, Lq, Dv)
        out = out.masked_fill(hits, float("nan"))
    return out


def attention_from_inputs(
    inputs: AttentionInputs, dropout_keep: torch.Tensor | None = None, *, upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention for normalised inputs. Returns ``(out, lse)``.

    ``dropout_keep`` (bool, broadcastable to ``(B, Hq, Lq, Lk)``, True = keep) applies dropout
    with ``inputs.dropout_p``; it is required when ``dropout_p > 0``. Without ``upcast`` the two
    matrix products run in q's dtype (the low-precision reference of the tolerance rule); with it
    everything runs in float32 (float64 for float64) and the output is rounded once.
    """
    p, lse = probabilities(inputs, upcast=upcast)
    if inputs.dropout_p > 0:
        if dropout_keep is None:
            raise ValueError("dropout_keep is required when dropout_p > 0")
        p = p * dropout_keep / (1.0 - inputs.dropout_p)
    v = _expand_heads(inputs.v, inputs)
    product_dtype = p.dtype if upcast else v.dtype
    out = _weighted_values(p.to(product_dtype), v.to(product_dtype), visible_mask(inputs))
    return out.to(inputs.dtype), lse


def attention_backward_from_inputs(
    inputs: AttentionInputs,
    dout: torch.Tensor,
    dropout_keep: torch.Tensor | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_from_inputs` written out by hand: ``(dq, dk, dv, dscores)``.

    ``dscores (B, Hq, Lq, Lk)`` is the gradient w.r.t. the scores after softcap and bias, which is
    also the gradient w.r.t. an additive ``attn_mask``. ``dlse (B, Hq, Lq)`` is the gradient
    w.r.t. the returned lse (``d lse / d s = P``). The math every kernel's backward implements::

        P  = softmax(S)                  D = rowsum(dP * P) - dlse  dS = P * (dP - D)
        dV = (P * keep / (1-p))^T dO     dP = dO V^T * keep / (1-p)
        dX = dS * (1 - tanh(X / softcap)^2)   (X = scale * Q K^T; dX = dS without softcap)
        dQ = scale * dX K                dK = scale * dX^T Q        (summed over a GQA group)

    Computed in float32 (float64 for float64 inputs), rounded once. Keys a row cannot see get
    ``dS = 0`` by selection, so a non-finite hidden key or value reaches no gradient of that row.
    """
    group = inputs.heads_q // inputs.heads_kv
    p, _ = probabilities(inputs, upcast=True)
    compute = p.dtype
    q, k, v = (t.to(compute) for t in (inputs.q, inputs.k, inputs.v))
    k = _finite_or_zero(k.repeat_interleave(group, dim=1))
    v = _finite_or_zero(v.repeat_interleave(group, dim=1))
    dout = dout.to(compute)
    p_dropped = p
    dp = torch.matmul(dout, v.transpose(-1, -2))
    if inputs.dropout_p > 0:
        p_dropped = p * dropout_keep / (1.0 - inputs.dropout_p)
        dp = dp * dropout_keep / (1.0 - inputs.dropout_p)
    dv = torch.matmul(p_dropped.transpose(-1, -2), dout)
    delta = (dp * p).sum(dim=-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(compute).unsqueeze(-1)
    dscores = torch.where(p == 0, torch.zeros_like(p), p * (dp - delta))
    dx = dscores
    if inputs.softcap > 0:
        x = torch.matmul(q, k.transpose(-1, -2)) * inputs.scale
        dx = dscores * (1 - torch.tanh(x / inputs.softcap) ** 2)
    dq = torch.matmul(dx, k) * inputs.scale
    dk = torch.matmul(dx.transpose(-1, -2), q) * inputs.scale

    def reduce_group(t: torch.Tensor) -> torch.Tensor:
        B, _, L, D = t.shape
        return t.view(B, inputs.heads_kv, group, L, D).sum(dim=2)

    dk, dv = reduce_group(dk), reduce_group(dv)
    return dq.to(inputs.q.dtype), dk.to(inputs.k.dtype), dv.to(inputs.v.dtype), dscores


def attention(
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
    return_lse=False,
    key_lengths=None,
    query_lengths=None,
    dropout_keep=None,
    upcast=False,
    sinks=None,
):
    """Reference attention with the public signature of :func:`fastattn.attention`.

    With ``dropout_p > 0`` and no ``dropout_keep`` mask, the mask is :func:`dropout_keep_mask` of a
    seed drawn from torch's generator -- the same pattern ``fastattn.attention(..., backend="reference")``
    draws after the same ``torch.manual_seed``. ``upcast``: see :func:`attention_from_inputs`.
    """
    inputs = normalize(
        q, k, v, causal=causal, window=window, block_mask=block_mask, attn_mask=attn_mask,
        alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, scale=scale,
        key_lengths=key_lengths, query_lengths=query_lengths, sinks=sinks,
    )
    if inputs.dropout_p > 0 and dropout_keep is None:
        shape = (inputs.batch, inputs.heads_q, inputs.seqlen_q, inputs.seqlen_k)
        dropout_keep = dropout_keep_mask(draw_seed(), shape, inputs.dropout_p, inputs.device)
    out, lse = attention_from_inputs(inputs, dropout_keep, upcast=upcast)
    return (out, lse) if return_lse else out
