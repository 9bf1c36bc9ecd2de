"""Positional encodings: sinusoidal, learned, rotary (fused Triton kernel), ALiBi slopes and
T5-style relative position bias.

Absolute encodings (:class:`SinusoidalPositionalEncoding`, :class:`LearnedPositionalEncoding`)
are added to batch-first embeddings ``(B, L, E)``. :class:`RotaryEmbedding` rotates queries and
keys ``(B, L, H, D)`` before attention. ALiBi is not a tensor op: :func:`alibi_slopes` gives the
per-head slopes that :func:`fastattn.attention` fuses into the kernel (``alibi_slopes=``).
:class:`RelativePositionBias` returns a learned additive ``attn_mask`` that receives a gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# --------------------------------------------------------------------------- absolute encodings


def sinusoidal_table(num_positions: int, dim: int, *, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """The "Attention is all you need" table ``(num_positions, dim)``, float32: ``sin`` on even
    features, ``cos`` on odd ones, at positions ``offset .. offset + num_positions - 1``."""
    position = torch.arange(offset, offset + num_positions, dtype=torch.float64)[:, None]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = position * inv_freq  # (num_positions, ceil(dim / 2))
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions added to embeddings (no parameters, nothing in ``state_dict``).

    Args:
        d_model: embedding size ``E``.
        max_len: positions kept precomputed; longer inputs are computed on the fly. Default 4096.
        dropout: dropout after the addition. Default 0.0.
        base: frequency base. Default 10000.
    """

    def __init__(self, d_model: int, max_len: int = 4096, dropout: float = 0.0, base: float = 10000.0) -> None:
        super().__init__()
        if d_model <= 0 or max_len <= 0:
            raise ValueError(f"d_model and max_len must be > 0, got d_model={d_model}, max_len={max_len}")
        self.d_model, self.base = d_model, base
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("table", sinusoidal_table(max_len, d_model, base=base), persistent=False)

    def get_positional_encoding(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        """The encodings of positions ``offset .. offset + seq_len - 1``: ``(seq_len, d_model)``, float32."""
        if offset + seq_len <= self.table.shape[0]:
            return self.table[offset : offset + seq_len]
        return sinusoidal_table(seq_len, self.d_model, base=self.base, offset=offset).to(self.table.device)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x (B, L, E)`` plus the encodings of positions ``offset ..``; same shape and dtype."""
        return self.dropout(x + self.get_positional_encoding(x.shape[1], offset).to(x.dtype))


class LearnedPositionalEncoding(nn.Module):
    """A learned embedding per position, added to embeddings (GPT-2, BERT, ViT).

    Args:
        max_len: number of positions. d_model: embedding size ``E``. dropout: after the addition.
    """

    def __init__(self, max_len: int, d_model: int, dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model, device=device, dtype=dtype)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x (B, L, E)`` plus the embeddings of positions ``offset .. offset + L - 1``."""
        L, max_len = x.shape[1], self.embedding.num_embeddings
        if offset < 0 or offset + L > max_len:
            raise ValueError(f"positions {offset}..{offset + L - 1} are outside the {max_len} learned positions")
        positions = torch.arange(offset, offset + L, device=x.device)
        return self.dropout(x + self.embedding(positions))


# --------------------------------------------------------------------------- rotary


def apply_rotary_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Plain-PyTorch rotary embedding, the ground truth of the Triton kernel (same arguments as
    :func:`fastattn.triton_kernels.rotary.apply_rotary`): ``x (B, L, H, D)``, tables
    ``(max_positions, rotary_dim // 2)``, int ``offsets (B,)``."""
    B, L, H, D = x.shape
    half = cos.shape[1]
    positions = offsets.long()[:, None] + torch.arange(L, device=x.device)  # (B, L)
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]  # (B, L, 1, half)
    rot, rest = x[..., : 2 * half].float(), x[..., 2 * half :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


class _RotaryFunction(torch.autograd.Function):
    """The Triton kernel with its backward (the rotation by the opposite angle)."""

    @staticmethod
    def forward(ctx, x, cos, sin, offsets, interleaved):
        from fastattn.triton_kernels.rotary import apply_rotary

        ctx.save_for_backward(cos, sin, offsets)
        ctx.interleaved = interleaved
        return apply_rotary(x, cos, sin, offsets, interleaved=interleaved)

    @staticmethod
    def backward(ctx, dout):
        from fastattn.triton_kernels.rotary import apply_rotary

        cos, sin, offsets = ctx.saved_tensors
        dx = apply_rotary(dout, cos, sin, offsets, interleaved=ctx.interleaved, conjugate=True)
        return dx, None, None, None, None


def _triton_usable(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offsets: torch.Tensor,
    *,
    interleaved: bool = False,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Rotary embedding of ``x (B, L, H, D)`` with a gradient; see :class:`RotaryEmbedding`.

    ``use_triton=None`` runs the fused Triton kernel on CUDA tensors and the PyTorch path
    elsewhere; ``True`` forces the kernel (on the CPU it needs ``TRITON_INTERPRET=1``).
    """
    if use_triton is None:
        use_triton = _triton_usable(x)
    if use_triton:
        return _RotaryFunction.apply(x, cos, sin, offsets, interleaved)
    return apply_rotary_reference(x, cos, sin, offsets, interleaved)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer / GPT-NeoX / Llama) applied to queries and keys.

    Args:
        dim: number of rotated features per head (``rotary_dim``, even); may be smaller than
            the head dim (partial rotary, GPT-NeoX style): the remaining features pass through.
        base: frequency base ``theta``. Default 10000.
        interleaved: rotate pairs ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + dim/2)`` (GPT-NeoX,
            Llama, the default).
        max_positions: size of the precomputed cos/sin tables; they grow on demand. Default 2048.
        use_triton: ``None`` (default) uses the fused Triton kernel on CUDA and PyTorch elsewhere.

    Position offsets make cached decoding work: rows of a new chunk sit at positions
    ``offset + 0 .. offset + L - 1``, where ``offset`` is an int or an int tensor ``(B,)``
    (the number of tokens already cached per sequence).
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        max_positions: int = 2048,
        use_triton: bool | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim (rotary_dim) must be a positive even number, got {dim}")
        self.dim, self.base, self.interleaved, self.use_triton = dim, base, interleaved, use_triton
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_positions, torch.device("cpu"))

    def _build(self, num_positions: int, device: torch.device) -> None:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim))
        angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv_freq  # (P, dim/2)
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)

    def tables(self, num_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``(>= num_positions, dim // 2)``, float32, on ``device``."""
        # Rebuilt in float32 also after ``module.to(torch.bfloat16)`` cast the buffers: angles need the precision.
        if self.cos.shape[0] < num_positions or self.cos.device != device or self.cos.dtype != torch.float32:
            self._build(max(num_positions, self.cos.shape[0]), device)
        return self.cos, self.sin

    def rotate(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate ``x (B, L, H, D)`` (``D >= dim``) at positions ``offset + 0 .. offset + L - 1``."""
        if x.dim() != 4 or x.shape[-1] < self.dim:
            raise ValueError(f"x must be (B, L, H, D) with D >= rotary dim {self.dim}, got shape {tuple(x.shape)}")
        B, L = x.shape[:2]
        if isinstance(offset, torch.Tensor):
            if offset.shape not in ((), (B,)) or offset.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"offset must be an int or an int tensor of shape (B,) = ({B},), got {offset!r}")
            offsets = offset.to(device=x.device, dtype=torch.int32).expand(B).contiguous()
            max_offset = int(offsets.max()) if B else 0
            if B and int(offsets.min()) < 0:
                raise ValueError("offset must be >= 0")
        else:
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(f"offset must be a non-negative int or an int tensor (B,), got {offset!r}")
            offsets = torch.full((B,), offset, dtype=torch.int32, device=x.device)
            max_offset = offset
        cos, sin = self.tables(max_offset + L, x.device)
        return apply_rotary(x, cos, sin, offsets, interleaved=self.interleaved, use_triton=self.use_triton)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: int | torch.Tensor = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q (B, L, Hq, D)`` and ``k (B, L, Hkv, D)`` at positions ``offset ..``."""
        return self.rotate(q, offset), self.rotate(k, offset)


# --------------------------------------------------------------------------- biases


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes ``(num_heads,)`` float32, as in Press et al. (and BLOOM, MPT).

    For a power of two ``n`` the slopes are ``2^(-8/n), 2^(-16/n), ...``; otherwise those of the
    closest smaller power of two followed by every other slope of twice that many heads. Pass them
    as ``fastattn.attention(..., alibi_slopes=...)``: the kernels add ``-slope * |i - j|`` to the scores.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucketing of ``relative_position = key_position - query_position`` (int tensor, any shape).

    Half the buckets (per direction when bidirectional) are exact small distances, the rest
    grow logarithmically up to ``max_distance``; farther distances share the last bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5-style learned relative position bias, one scalar per (bucket, head).

    Args:
        num_heads: heads ``H``. num_buckets: buckets (default 32). max_distance: default 128.
        bidirectional: encoder-style (True) or causal decoder-style (False) buckets.

    ``forward(Lq, Lk)`` returns a float bias ``(1, H, Lq, Lk)`` to pass as
    ``fastattn.attention(..., attn_mask=bias)``; the bias (and so ``weight``) gets a gradient
    through the kernels' ``dbias``. Queries sit at the last ``Lq`` positions of the ``Lk`` keys
    (bottom-right, as cached decoding needs).
    """

    def __init__(
        self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    def forward(self, query_length: int, key_length: int) -> torch.Tensor:
        device = self.relative_attention_bias.weight.device
        query_position = torch.arange(key_length - query_length, key_length, device=device)[:, None]
        key_position = torch.arange(key_length, device=device)[None, :]
        buckets = relative_position_bucket(
            key_position - query_position, bidirectional=self.bidirectional,
            num_buckets=self.num_buckets, max_distance=self.max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, Lq, Lk)
