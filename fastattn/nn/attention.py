"""``Attention``: fastattn's native attention module for new models (batch-first, GQA, rotary or
ALiBi, every mask kind of :func:`fastattn.attention`, and a KV cache for incremental decoding)."""

from __future__ import annotations

import torch
from torch import nn

import fastattn

from .cache import PagedKVCache, StaticKVCache, _PreallocatedKVCache
from .positional import RotaryEmbedding, alibi_slopes


class KVCache:
    """Keys and values of the tokens seen so far, for one :class:`Attention` layer.

    ``k``, ``v``: ``(B, Hkv, length, D)`` after rotary (or None before the first call). Each
    forward with ``cache=`` appends the new keys and values and attends over all of them; with
    bottom-right causal alignment the new queries see exactly the cached prefix and themselves.
    Use one cache per layer (``[KVCache() for _ in layers]``). Growth is by concatenation.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v (B, Hkv, L, D)``; returns all keys and values so far."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head self-attention (or cross-attention) on batch-first ``(B, L, E)`` inputs.

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (GQA; 1 is MQA). Default ``num_heads``.
        head_dim: per-head size ``D``. Default ``embed_dim // num_heads``.
        bias: biases on the projections. Default False.
        dropout: attention dropout (training only). Default 0.0.
        causal: bottom-right causal self-attention. Default False.
        window: ``(left, right)`` sliding window, as :func:`fastattn.attention`. Default None.
        position: ``"rotary"``, ``"alibi"`` or None (positions handled outside). Default None.
        rotary_dim: rotated features per head (partial rotary). Default ``D``.
        rotary_base: rotary frequency base. Default 10000. rotary_interleaved: GPT-J pairs. Default False.
        softcap: score soft-capping (Gemma 2). Default 0 (off).
        sinks: a learned attention-sink logit per query head (gpt-oss, StreamingLLM): the parameter
            ``sinks`` (float32 ``(num_heads,)``, initialised to 0) joins every row's softmax
            denominator with no value vector, in training and with every cache. Default False.
        fused_qkv: one ``(Hq + 2 Hkv) D x E`` input projection (``qkv_proj``) instead of
            ``q_proj``/``k_proj``/``v_proj``. Self-attention only. Default True.
        kdim: feature size of the cross-attention context (non-fused only). Default ``E``.
        context_parallel_group: a ``torch.distributed`` process group: ``x`` is then this rank's shard
            ``(B, L / world, E)`` of the sequence and attention runs through
            :func:`fastattn.distributed.context_parallel_attention` (positions, rotary included, are
            global). Default None (no context parallelism); may also be set as an attribute later.
        context_parallel_scheme: ``"ring"``, ``"allgather"`` or ``"ulysses"``. Default ``"ring"``.
        context_parallel_layout: how ``x`` was sharded, ``"zigzag"`` or ``"contiguous"``. Default ``"zigzag"``.

    Example::

        attn = fastattn.nn.Attention(256, 8, num_kv_heads=2, causal=True, position="rotary")
        y = attn(x)                                           # (B, L, 256)
        cache = KVCache()                                     # or StaticKVCache / PagedKVCache (inference)
        y0 = attn(prompt, cache=cache)                        # prefill
        y1 = attn(next_token, cache=cache)                    # one step, positions continue
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        causal: bool = False,
        window: tuple[int, int] | None = None,
        position: str | None = None,
        rotary_dim: int | None = None,
        rotary_base: float = 10000.0,
        rotary_interleaved: bool = False,
        softcap: float = 0.0,
        sinks: bool = False,
        fused_qkv: bool = True,
        kdim: int | None = None,
        context_parallel_group=None,
        context_parallel_scheme: str = "ring",
        context_parallel_layout: str = "zigzag",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), or give head_dim")
            head_dim = embed_dim // num_heads
        if position not in (None, "rotary", "alibi"):
            raise ValueError(f"position must be 'rotary', 'alibi' or None, got {position!r}")
        if fused_qkv and kdim is not None:
            raise ValueError("kdim (cross-attention) needs fused_qkv=False")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if context_parallel_scheme not in ("ring", "allgather", "ulysses"):
            raise ValueError(f"context_parallel_scheme must be 'ring', 'allgather' or 'ulysses', got {context_parallel_scheme!r}")
        if context_parallel_layout not in ("zigzag", "contiguous"):
            raise ValueError(f"context_parallel_layout must be 'zigzag' or 'contiguous', got {context_parallel_layout!r}")
        self.context_parallel_group = context_parallel_group
        self.context_parallel_scheme, self.context_parallel_layout = context_parallel_scheme, context_parallel_layout
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.dropout, self.causal, self.window, self.softcap = dropout, causal, window, softcap
        self.position = position
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        if fused_qkv:
            self.qkv_proj = nn.Linear(embed_dim, q_size + 2 * kv_size, bias=bias, **factory)
        else:
            kdim = embed_dim if kdim is None else kdim
            self.q_proj = nn.Linear(embed_dim, q_size, bias=bias, **factory)
            self.k_proj = nn.Linear(kdim, kv_size, bias=bias, **factory)
            self.v_proj = nn.Linear(kdim, kv_size, bias=bias, **factory)
        self.fused_qkv = fused_qkv
        self.out_proj = nn.Linear(q_size, embed_dim, bias=bias, **factory)
        self.rotary = (
            RotaryEmbedding(rotary_dim or head_dim, base=rotary_base, interleaved=rotary_interleaved)
            if position == "rotary" else None
        )
        if position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(num_heads), persistent=False)
        else:
            self.alibi_slopes = None
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be a bool, got {type(sinks).__name__}")
        # float32 whatever the module's dtype (the attention functions take float32 sinks).
        self.sinks = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32, device=device)) if sinks else None

    def _sinks(self) -> torch.Tensor | None:
        """The sink logits as the attention functions take them (float32 even after ``module.to(dtype)``)."""
        return None if self.sinks is None else self.sinks.float()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        block_mask=None,
        key_lengths: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | PagedKVCache | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to itself (or to ``context``).

        Args:
            x: ``(B, L, E)``.
            context: ``(B, S, kdim)`` for cross-attention (no rotary, not causal); needs ``fused_qkv=False``.
            attn_mask: bool (True = attend) or additive float, broadcastable to ``(B, Hq, L, S)``
                where ``S`` counts cached keys too.
            block_mask: a :class:`fastattn.BlockMask` for ``(L, S)``.
            key_lengths: int ``(B,)``: keys at ``j >= key_lengths[b]`` are padding (right padding).
            cache: a :class:`KVCache`: the new keys/values are appended and the queries sit after
                the cached positions (rotary offsets and causal alignment follow). Or, for
                inference (no gradients), a preallocated :class:`StaticKVCache` or
                :class:`PagedKVCache`: the same, appended in place per sequence through
                :func:`fastattn.attention_with_kvcache` (self-attention; no ``attn_mask``,
                ``block_mask``, ``key_lengths``, or dropout in training).

        Returns:
            ``(B, L, E)``.
        """
        q, k, v = self._project(x, context)  # (B, L, Hq, D), (B, S, Hkv, D)
        B, L = x.shape[:2]
        H, D = self.num_heads, self.head_dim
        if self.context_parallel_group is not None:
            return self._context_parallel(q, k, v, context, attn_mask, block_mask, key_lengths, cache)
        if isinstance(cache, _PreallocatedKVCache):
            return self._preallocated(q, k, v, context, attn_mask, block_mask, key_lengths, cache)
        offset = cache.length if cache is not None else 0
        if self.rotary is not None and context is None:
            q, k = self.rotary(q, k, offset)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D): views
        if cache is not None:
            k, v = cache.update(k, v)
        out = fastattn.attention(
            q, k, v,
            causal=self.causal and context is None,
            window=self.window,
            block_mask=block_mask,
            attn_mask=attn_mask,
            alibi_slopes=None if self.alibi_slopes is None else self.alibi_slopes.float(),  # .to(dtype) casts buffers
            softcap=self.softcap,
            dropout_p=self.dropout if self.training else 0.0,
            key_lengths=key_lengths,
            sinks=self._sinks(),
        )  # (B, Hq, L, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * D))

    def _preallocated(self, q, k, v, context, attn_mask, block_mask, key_lengths, cache) -> torch.Tensor:
        """Self-attention of ``q (B, L, Hq, D)`` against a preallocated cache after appending ``k``/``v (B, L, Hkv, D)``."""
        name = type(cache).__name__
        for value, arg in ((context, "context"), (attn_mask, "attn_mask"), (block_mask, "block_mask"),
                           (key_lengths, "key_lengths")):
            if value is not None:
                raise ValueError(f"{arg} is not supported with a {name} (cached self-attention); use KVCache")
        if self.training and self.dropout > 0:
            raise ValueError(f"dropout is not supported with a {name}; call .eval() (or set dropout=0.0)")
        cache._check(q, k, v)
        B, L = q.shape[:2]
        if self.rotary is not None:
            q, k = self.rotary(q, k, cache.positions())  # each sequence continues at its own length
        out = cache.attend(
            q, k, v,
            causal=self.causal,
            window=self.window,
            alibi_slopes=None if self.alibi_slopes is None else self.alibi_slopes.float(),
            softcap=self.softcap,
            sinks=self._sinks(),
        )  # (B, L, Hq, D)
        return self.out_proj(out.reshape(B, L, self.num_heads * self.head_dim))

    def _project(self, x: torch.Tensor, context: torch.Tensor | None):
        """The input projections: ``q (B, L, Hq, D)`` from ``x (B, L, E)`` and ``k``, ``v (B, S, Hkv, D)``
        from ``x`` or the cross-attention ``context (B, S, kdim)``. Shared by the attention modules
        of :mod:`fastattn.nn.linear_attention`."""
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, embed_dim={self.embed_dim}), got shape {tuple(x.shape)}")
        if context is not None:
            if self.fused_qkv:
                raise ValueError(f"context (cross-attention) needs a {type(self).__name__} built with fused_qkv=False")
            q, k, v = self.q_proj(x), self.k_proj(context), self.v_proj(context)
        elif self.fused_qkv:
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))

    def _context_parallel(self, q, k, v, context, attn_mask, block_mask, key_lengths, cache) -> torch.Tensor:
        """Attention of this rank's shard ``q (B, l, Hq, D)``, ``k``/``v (B, l, Hkv, D)`` over the sharded sequence."""
        from ..distributed import context_parallel_attention
        from ..distributed.layout import group_rank_world, segments

        for value, name in ((context, "context"), (attn_mask, "attn_mask"), (block_mask, "block_mask"), (cache, "cache")):
            if value is not None:
                raise ValueError(f"{name} is not supported with context_parallel_group (self-attention on shards only)")
        if self.sinks is not None:
            raise ValueError("sinks are not supported with context_parallel_group (context_parallel_attention "
                             "takes no sinks); build the module with sinks=False")
        if self.training and self.dropout > 0:
            raise ValueError("dropout is not supported with context_parallel_group; set dropout=0.0")
        B, L = q.shape[:2]
        if self.rotary is not None:  # rotate each piece of the shard at its global positions
            rank, world = group_rank_world(self.context_parallel_group)
            pieces, start = [], 0
            for position, length in segments(rank, world, L, self.context_parallel_layout):
                pieces.append(self.rotary(q[:, start:start + length], k[:, start:start + length], position))
                start += length
            q, k = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 1)
        out = context_parallel_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            group=self.context_parallel_group,
            scheme=self.context_parallel_scheme,
            layout=self.context_parallel_layout,
            causal=self.causal,
            window=self.window,
            alibi_slopes=None if self.alibi_slopes is None else self.alibi_slopes.float(),
            softcap=self.softcap,
            key_lengths=key_lengths,
        )  # (B, Hq, l, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))
