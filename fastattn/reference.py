"""Plain-PyTorch attention that materialises the scores: the ground truth of every semantic.

Not a fast path. It runs in any dtype (float64 for ``gradcheck``), and the tests and
benchmarks compare every backend with it.

Order of operations on the scores ``s = scale * q @ k^T`` (per batch b, head h)::

    s = softcap * tanh(s / softcap)          if softcap > 0
    s = s - slope[b, h] * |i + offset - j|   if alibi_slopes
    s = s + attn_mask                        if attn_mask is additive float
    s = -inf where not visible               window / causal, bool attn_mask, block_mask, lengths
    p = softmax(s)  (0 for a row that sees no key, lse = -inf)
    p = p * keep / (1 - dropout_p)           if dropout
    out = p @ v
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
    """Bool ``(B, Hq or 1, Lq, Lk)``: which (query, key) pairs may attend. True = visible."""
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
    if inputs.attn_mask is not None and inputs.attn_mask.dtype == torch.bool:
        visible = visible & inputs.attn_mask
    if inputs.block_mask is not None:
        visible = visible & inputs.block_mask.to_dense()
    return visible


def scores(inputs: AttentionInputs) -> torch.Tensor:
    """Scores after softcap, ALiBi, additive mask and masking: ``(B, Hq, Lq, Lk)`` in q's dtype."""
    q, k = inputs.q, inputs.k
    group = inputs.heads_q // inputs.heads_kv
    k = k.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * inputs.scale
    if inputs.softcap > 0:
        s = inputs.softcap * torch.tanh(s / inputs.softcap)
    if inputs.alibi_slopes is not None:
        i = torch.arange(inputs.seqlen_q, device=q.device).view(1, 1, -1, 1)
        j = torch.arange(inputs.seqlen_k, device=q.device).view(1, 1, 1, -1)
        distance = (i + query_key_offset(inputs) - j).abs().to(s.dtype)
        s = s - inputs.alibi_slopes.to(s.dtype)[:, :, None, None] * distance
    if inputs.attn_mask is not None and inputs.attn_mask.dtype != torch.bool:
        s = s + inputs.attn_mask.to(s.dtype)
    return s.masked_fill(~visible_mask(inputs), float("-inf"))


def probabilities(inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of :func:`scores` (0 on rows that see no key) and the row log-sum-exp.

    Returns ``p (B, Hq, Lq, Lk)`` in float32 (float64 for float64 inputs) and ``lse (B, Hq, Lq)``.
    """
    s = scores(inputs)
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    # Softmax is shift invariant, so the detached row max changes no gradient; rows that see
    # nothing get a max of 0 and a sum of 0, which yields p = 0 and lse = -inf without NaN.
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom.detach())).squeeze(-1)
    return p, lse


def attention_from_inputs(
    inputs: AttentionInputs, dropout_keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention for normalised inputs. Returns ``(out, lse)``.

    ``dropout_keep`` (bool, broadcastable to ``(B, Hq, Lq, Lk)``, True = keep) applies dropout
    with ``inputs.dropout_p``; it is required when ``dropout_p > 0``.
    """
    p, lse = probabilities(inputs)
    if inputs.dropout_p > 0:
        if dropout_keep is None:
            raise ValueError("dropout_keep is required when dropout_p > 0")
        p = p * dropout_keep / (1.0 - inputs.dropout_p)
    v = inputs.v.repeat_interleave(inputs.heads_q // inputs.heads_kv, dim=1)
    out = torch.matmul(p.to(v.dtype), v)
    return out, lse


def attention_backward_from_inputs(
    inputs: AttentionInputs, dout: torch.Tensor, dropout_keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_from_inputs` written out by hand: ``(dq, dk, dv, dscores)``.

    ``dscores (B, Hq, Lq, Lk)`` is the gradient w.r.t. the scores after softcap and bias, which is
    also the gradient w.r.t. an additive ``attn_mask``. The math every kernel's backward implements::

        P  = softmax(S)                  D = rowsum(dP * P)        dS = P * (dP - D)
        dV = (P * keep / (1-p))^T dO     dP = dO V^T * keep / (1-p)
        dX = dS * (1 - tanh(X / softcap)^2)   (X = scale * Q K^T; dX = dS without softcap)
        dQ = scale * dX K                dK = scale * dX^T Q        (summed over a GQA group)
    """
    group = inputs.heads_q // inputs.heads_kv
    p, _ = probabilities(inputs)
    compute = p.dtype
    q, k, v = (t.to(compute) for t in (inputs.q, inputs.k, inputs.v))
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    dout = dout.to(compute)
    p_dropped = p
    dp = torch.matmul(dout, v.transpose(-1, -2))
    if inputs.dropout_p > 0:
        p_dropped = p * dropout_keep / (1.0 - inputs.dropout_p)
        dp = dp * dropout_keep / (1.0 - inputs.dropout_p)
    dv = torch.matmul(p_dropped.transpose(-1, -2), dout)
    dscores = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
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
):
    """Reference attention with the public signature of :func:`fastattn.attention`.

    With ``dropout_p > 0`` and no ``dropout_keep`` mask, the mask is :func:`dropout_keep_mask` of a
    seed drawn from torch's generator -- the same pattern ``fastattn.attention(..., backend="reference")``
    draws after the same ``torch.manual_seed``.
    """
    inputs = normalize(
        q, k, v, causal=causal, window=window, block_mask=block_mask, attn_mask=attn_mask,
        alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, scale=scale,
        key_lengths=key_lengths, query_lengths=query_lengths,
    )
    if inputs.dropout_p > 0 and dropout_keep is None:
        shape = (inputs.batch, inputs.heads_q, inputs.seqlen_q, inputs.seqlen_k)
        dropout_keep = dropout_keep_mask(draw_seed(), shape, inputs.dropout_p, inputs.device)
    out, lse = attention_from_inputs(inputs, dropout_keep)
    return (out, lse) if return_lse else out
