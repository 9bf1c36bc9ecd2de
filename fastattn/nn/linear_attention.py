"""``LinearAttention``, ``PerformerAttention`` and ``LSHAttention``: attention modules whose cost is
linear (or ``L * chunk``) in length, with :class:`fastattn.nn.Attention`'s constructor conventions
(projections, GQA, rotary)."""

from __future__ import annotations

import torch

import fastattn

from ..linear import LinearAttentionState, PerformerFeatures, linear_attention
from .attention import Attention


class LinearAttentionCache:
    """The recurrent state of one :class:`LinearAttention` layer for incremental decoding.

    Unlike a KV cache it does not grow: ``state`` is a float32 ``(B, Hkv, M, Dv)`` sum (and its
    ``(B, Hkv, M)`` normaliser), so each new token costs ``O(M * Dv)`` per head.
    """

    def __init__(self) -> None:
        self.state: LinearAttentionState | None = None
        self.length = 0


class LinearAttention(Attention):
    """Multi-head linear attention on batch-first ``(B, L, E)`` inputs.

    Projections, GQA, ``fused_qkv``, ``kdim`` and rotary positions are as in
    :class:`fastattn.nn.Attention` (it reuses that constructor); the attention itself is
    :func:`fastattn.linear_attention`. ALiBi, windows, masks, softcap and dropout do not apply.

    Args:
        embed_dim, num_heads, num_kv_heads, head_dim, bias, causal, position, rotary_dim,
            rotary_base, rotary_interleaved, fused_qkv, kdim, device, dtype: as
            :class:`fastattn.nn.Attention` (``position`` is ``"rotary"`` or None).
        feature_map: ``"elu+1"`` (default), ``"relu"``, a :class:`fastattn.linear.PerformerFeatures`
            or a callable, as :func:`fastattn.linear_attention`.
        normalize: divide by the feature-mass normaliser. Default True.
        chunk_size: positions per chunk of the causal computation. Default 64.

    Example::

        attn = fastattn.nn.LinearAttention(256, 8, causal=True)
        y = attn(x)                                           # (B, L, 256)
        cache = fastattn.nn.LinearAttentionCache()
        y0 = attn(prompt, cache=cache)                        # prefill
        y1 = attn(next_token, cache=cache)                    # one step, O(M * Dv) per head
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        causal: bool = False,
        feature_map="elu+1",
        normalize: bool = True,
        chunk_size: int | None = None,
        position: str | None = None,
        rotary_dim: int | None = None,
        rotary_base: float = 10000.0,
        rotary_interleaved: bool = False,
        fused_qkv: bool = True,
        kdim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        if position not in (None, "rotary"):
            raise ValueError(f"position must be 'rotary' or None for linear attention, got {position!r}")
        super().__init__(
            embed_dim, num_heads, num_kv_heads, head_dim, bias=bias, causal=causal, position=position,
            rotary_dim=rotary_dim, rotary_base=rotary_base, rotary_interleaved=rotary_interleaved,
            fused_qkv=fused_qkv, kdim=kdim, device=device, dtype=dtype,
        )
        self.feature_map, self.normalize, self.chunk_size = feature_map, normalize, chunk_size

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, *, cache: LinearAttentionCache | None = None,
        causal: bool | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to itself (or to ``context``).

        Args:
            x: ``(B, L, E)``.
            context: ``(B, S, kdim)`` for cross-attention (not causal, no rotary); needs ``fused_qkv=False``.
            cache: a :class:`LinearAttentionCache` (causal self-attention): the sequence continues
                the cached state, which is then replaced by the state after ``x``.
            causal: overrides the constructor's ``causal`` for this call. Default None (keep it).

        Returns:
            ``(B, L, E)``.
        """
        causal = self.causal if causal is None else causal
        q, k, v = self._project(x, context)  # (B, L, Hq, D), (B, S, Hkv, D)
        if cache is not None and (context is not None or not causal):
            raise ValueError("cache needs causal self-attention (causal=True, no context)")
        B, L = x.shape[:2]
        H, D = self.num_heads, self.head_dim
        if self.rotary is not None and context is None:
            q, k = self.rotary(q, k, cache.length if cache is not None else 0)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D): views
        out = linear_attention(
            q, k, v,
            causal=causal and context is None,
            feature_map=self.feature_map,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
            return_state=cache is not None,
            initial_state=None if cache is None else cache.state,
        )
        if cache is not None:
            out, cache.state = out
            cache.length += L
        return self.out_proj(out.transpose(1, 2).reshape(B, L, H * D))


class PerformerAttention(LinearAttention):
    """:class:`LinearAttention` with FAVOR+ features (Performer): approximates softmax attention.

    Args:
        num_features: random features per head. Default ``2 * head_dim``.
        orthogonal: orthogonal random features. Default True.
        Other arguments as :class:`LinearAttention` (``feature_map`` is set here).

    The projection is a buffer of ``self.features`` (saved in ``state_dict``, so a loaded model
    attends the same way); call :meth:`redraw_features` to draw a new one (e.g. every few hundred
    training steps).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, num_features: int | None = None, orthogonal: bool = True, **kwargs) -> None:
        if "feature_map" in kwargs:
            raise ValueError("PerformerAttention sets feature_map itself; use LinearAttention for another map")
        super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kwargs)
        self.features = PerformerFeatures(self.head_dim, num_features, orthogonal=orthogonal)
        if kwargs.get("device") is not None:
            self.features.to(kwargs["device"])
        self.feature_map = self.features

    def redraw_features(self) -> None:
        """Draw a new random projection (from the global RNG)."""
        self.features.redraw()


class LSHAttention(Attention):
    """Reformer's LSH self-attention (:func:`fastattn.lsh_attention`) on batch-first ``(B, L, E)`` inputs.

    Args:
        embed_dim, num_heads, num_kv_heads, head_dim, bias, causal, position, rotary_dim,
            rotary_base, rotary_interleaved, device, dtype: as :class:`fastattn.nn.Attention`
            (GQA: ``num_heads`` a multiple of ``num_kv_heads``).
        n_buckets: hash buckets (1 or even). Default 8.
        n_hashes: hash rounds. Default 1.
        chunk_size: sorted positions per chunk. Default 64.
        shared_qk: keys are the unit-normalised queries (Reformer; the key projection is then
            unused). Default True.

    The rotations are drawn afresh on every forward (from the global RNG), as in Reformer.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, bias: bool = False, causal: bool = False, n_buckets: int = 8, n_hashes: int = 1,
                 chunk_size: int = 64, shared_qk: bool = True, position: str | None = None,
                 rotary_dim: int | None = None, rotary_base: float = 10000.0, rotary_interleaved: bool = False,
                 device=None, dtype=None) -> None:
        if position not in (None, "rotary"):
            raise ValueError(f"position must be 'rotary' or None for LSH attention, got {position!r}")
        super().__init__(
            embed_dim, num_heads, num_kv_heads, head_dim, bias=bias, causal=causal, position=position,
            rotary_dim=rotary_dim, rotary_base=rotary_base, rotary_interleaved=rotary_interleaved,
            fused_qkv=True, device=device, dtype=dtype,
        )
        self.n_buckets, self.n_hashes, self.chunk_size, self.shared_qk = n_buckets, n_hashes, chunk_size, shared_qk

    def forward(self, x: torch.Tensor, *, causal: bool | None = None) -> torch.Tensor:
        """Self-attention of ``x (B, L, E)``; returns ``(B, L, E)``. ``causal`` overrides the
        constructor's for this call (default None: keep it)."""
        q, k, v = self._project(x, None)  # (B, L, Hq, D), (B, L, Hkv, D)
        B, L = x.shape[:2]
        if self.rotary is not None:
            q, k = self.rotary(q, k, 0)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        out = fastattn.lsh_attention(
            q, None if self.shared_qk else k, v, n_buckets=self.n_buckets, n_hashes=self.n_hashes,
            chunk_size=self.chunk_size, causal=self.causal if causal is None else causal, shared_qk=self.shared_qk,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))
