"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` that runs on fastattn.

Same constructor, forward signature, return values, mask polarity and ``state_dict`` keys as
torch's module, so weights load both ways and outputs match. Masks follow torch's polarity here
(bool ``True`` = *not* allowed, float = additive), the opposite of :func:`fastattn.attention`'s
bool masks (``True`` = attend); the conversion happens in this file only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn import reference
from fastattn._inputs import normalize


def padding_to_lengths(key_padding_mask: torch.Tensor) -> torch.Tensor | None:
    """Key lengths ``(B,)`` if a bool ``(B, S)`` padding mask (True = pad) is right padding, else None.

    Right padding is what :func:`fastattn.attention`'s ``key_lengths`` expresses (kernels skip
    the padded tail); any other pattern has to travel as an element mask.
    """
    lengths = (~key_padding_mask).sum(dim=-1)
    positions = torch.arange(key_padding_mask.shape[-1], device=key_padding_mask.device)
    if torch.equal(positions[None, :] >= lengths[:, None], key_padding_mask):
        return lengths
    return None


class MultiheadAttentionError(ValueError, AssertionError, RuntimeError):
    """Bad arguments of :class:`MultiheadAttention`: also an ``AssertionError`` and a ``RuntimeError``,
    the types torch's ``nn.MultiheadAttention`` raises for the same mistakes, so code written against
    torch catches it."""


def _to_fastattn_mask(mask: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """torch polarity (bool True = masked out, float additive) to fastattn's (bool True = attend, float additive)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = not allowed) or a float additive mask, got {mask.dtype}")
    return mask.to(dtype)


def _merge_masks(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Intersect two fastattn-polarity masks (bool True = attend, or additive float)."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    if a.dtype == torch.bool:
        a, b = b, a
    if b.dtype == torch.bool:
        return a.masked_fill(~b, float("-inf"))
    return a + b


class MultiheadAttention(nn.Module):
    """Multi-head attention with the interface of ``torch.nn.MultiheadAttention``, computed by fastattn.

    Args:
        embed_dim: total model dimension ``E``.
        num_heads: number of heads; ``E`` must be divisible by it.
        dropout: dropout probability on the attention weights (training only). Default 0.0.
        bias: add biases to the input and output projections. Default True.
        add_bias_kv: learn a bias key and value appended to the keys/values. Default False.
        add_zero_attn: append a zero key and value. Default False.
        kdim: key feature size (default ``E``). vdim: value feature size (default ``E``).
        batch_first: inputs are ``(N, L, E)`` instead of ``(L, N, E)``. Default False.
        device, dtype: factory arguments for the parameters.

    Parameters and ``state_dict`` keys are torch's: ``in_proj_weight`` ``(3E, E)`` (or
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``E``),
    ``in_proj_bias`` ``(3E,)``, ``out_proj.weight``, ``out_proj.bias``, ``bias_k``, ``bias_v`` ``(1, 1, E)``.
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got embed_dim={embed_dim}, num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise MultiheadAttentionError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """A fastattn copy of a ``torch.nn.MultiheadAttention``: same configuration, weights,
        device, dtype and train/eval mode."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        reference_weight = module.out_proj.weight
        new = cls(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
            vdim=module.vdim, batch_first=module.batch_first, device=reference_weight.device,
            dtype=reference_weight.dtype,
        )
        new.load_state_dict(module.state_dict())
        frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
        for name, p in new.named_parameters():
            p.requires_grad_(name not in frozen)
        return new.train(module.training)

    def _reset_parameters(self) -> None:
        # torch's initialisation, so a freshly built module is distributed like torch's.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    @staticmethod
    def _linear(x, weight, bias):
        """``F.linear``, where a bias of another dtype than ``x`` is added after the product and cast to its
        dtype: torch's module runs such a bias (a float16 ``in_proj_bias`` with float64 inputs, say) the same
        way, as a matmul and an in-place add."""
        if bias is None or bias.dtype == x.dtype:
            return F.linear(x, weight, bias)
        return F.linear(x, weight).add_(bias)

    def _project(self, query, key, value):
        """Input projections of batch-first inputs: ``(N, L, E)``, ``(N, S, E)``, ``(N, S, E)``."""
        E = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(E)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one (3E, E) matmul
                return self._linear(query, self.in_proj_weight, self.in_proj_bias).split(E, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return self._linear(query, w_q, b_q), self._linear(key, w_k, b_k), self._linear(value, w_v, b_v)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``torch.nn.MultiheadAttention.forward``.

        Args:
            query: ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``, or unbatched ``(L, E)``.
            key: ``(S, N, kdim)`` (``(N, S, kdim)`` with ``batch_first``) or ``(S, kdim)``.
            value: ``(S, N, vdim)`` (``(N, S, vdim)`` with ``batch_first``) or ``(S, vdim)``.
            key_padding_mask: ``(N, S)`` (or ``(S,)``): bool, True = ignore this key; or float, added.
                Right padding runs as ``key_lengths`` (padded keys are skipped, not masked).
            need_weights: also return the attention weights. **The slow path**: the weights are the
                exact probabilities from :mod:`fastattn.reference`, which materialises the
                ``(N, H, L, S)`` scores. Pass ``need_weights=False`` for the fused kernels.
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``: bool, True = not allowed; or float, added.
            average_attn_weights: average the returned weights over heads. Default True.
            is_causal: apply a causal mask (top-left: query ``i`` sees keys ``j <= i``). torch treats
                it as a hint that ``attn_mask`` is the causal mask; here ``attn_mask`` may be omitted,
                and when given it is not read.

        Returns:
            ``(attn_output, attn_weights)``: ``attn_output`` shaped like ``query`` (with ``E`` features);
            ``attn_weights`` ``(N, L, S)`` averaged or ``(N, num_heads, L, S)`` per head (batch dim
            dropped for unbatched input), or None without ``need_weights``. A query that sees no key
            gets weights 0 and output ``out_proj.bias`` (torch returns NaN there).
        """
        is_batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise MultiheadAttentionError(
                "query, key and value must all be 3-D (batched) or 2-D (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Now batch first: query (N, L, E), key (N, S, kdim), value (N, S, vdim).
        N, L, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim:
            raise MultiheadAttentionError(f"query must have embed_dim={self.embed_dim} features, got {E}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise MultiheadAttentionError(
                f"key and value must have kdim={self.kdim} and vdim={self.vdim} features, "
                f"got {key.shape[-1]} and {value.shape[-1]}"
            )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != N:
            raise MultiheadAttentionError(
                f"key and value must share batch size {N} and length, got {tuple(key.shape)} and {tuple(value.shape)}"
            )

        # Masks in fastattn polarity, broadcastable to (N, H, L, S).
        mask = None
        if is_causal:
            # Top-left causal is the kernels' bottom-right causal only when L == S and no key
            # lengths shift the diagonal; otherwise it is spelled out as a mask.
            if L != S or key_padding_mask is not None or self.bias_k is not None or self.add_zero_attn:
                mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        elif attn_mask is not None:
            mask = _to_fastattn_mask(attn_mask, "attn_mask", query.dtype)
            if mask.dim() == 3:
                if mask.shape != (N * self.num_heads, L, S):
                    raise MultiheadAttentionError(
                        f"3-D attn_mask must have shape (N * num_heads, L, S) = {(N * self.num_heads, L, S)}, "
                        f"got {tuple(mask.shape)}"
                    )
                mask = mask.view(N, self.num_heads, L, S)
            elif mask.shape != (L, S):
                raise MultiheadAttentionError(f"2-D attn_mask must have shape (L, S) = {(L, S)}, got {tuple(mask.shape)}")
        padding = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise MultiheadAttentionError(
                    f"key_padding_mask must have shape (N, S) = {(N, S)}, got {tuple(key_padding_mask.shape)}"
                )
            padding = _to_fastattn_mask(key_padding_mask, "key_padding_mask", query.dtype)

        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
        extra = k.shape[1] - S  # appended keys are always visible
        if extra:
            visible = lambda m: True if m.dtype == torch.bool else 0.0
            if mask is not None:
                mask = F.pad(mask, (0, extra), value=visible(mask))
            if padding is not None:
                padding = F.pad(padding, (0, extra), value=visible(padding))
        causal = is_causal and mask is None

        key_lengths = None
        if padding is not None and padding.dtype == torch.bool:
            key_lengths = padding_to_lengths(~padding)
        if padding is not None and key_lengths is None:
            mask = _merge_masks(mask, padding[:, None, None, :])

        H, D = self.num_heads, self.head_dim
        # (N, L, E) -> (N, H, L, D): a view, fastattn reads the strides.
        q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            inputs = normalize(q, k, v, causal=causal, attn_mask=mask, key_lengths=key_lengths)
            probs, _ = reference.probabilities(inputs)
            probs = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
            weights = probs.to(q.dtype)  # (N, H, L, S')
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            out = fastattn.attention(
                q, k, v, causal=causal, attn_mask=mask, key_lengths=key_lengths, dropout_p=dropout_p
            )
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if not is_batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


MultiHeadAttention = MultiheadAttention
