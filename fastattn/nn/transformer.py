"""Transformer building blocks on fastattn, mirroring ``torch.nn.Transformer*``.

:class:`TransformerEncoderLayer`, :class:`TransformerDecoderLayer`, :class:`TransformerEncoder`,
:class:`TransformerDecoder` and :class:`Transformer` take torch's arguments and have torch's
parameter names (``self_attn.*``, ``multihead_attn.*``, ``linear1``, ``linear2``, ``norm1..3``,
``encoder.norm``, ``decoder.norm``), so their ``state_dict`` loads from and into torch's modules
and, with dropout off, they compute the same function. On top of torch: ``activation="swiglu"``,
``encode``/``decode`` on :class:`Transformer`, and :class:`Seq2SeqTransformer`, the token-level
model (embeddings, positions, output projection, greedy ``generate``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .multihead import MultiheadAttention
from .positional import SinusoidalPositionalEncoding

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _check_activation(activation) -> None:
    if not (callable(activation) or activation in (*_ACTIVATIONS, "swiglu")):
        raise ValueError(f"activation must be 'relu', 'gelu', 'swiglu' or a callable, got {activation!r}")


def _feed_forward(x, linear1: nn.Linear, linear2: nn.Linear, dropout: nn.Dropout, activation) -> torch.Tensor:
    """``linear2(dropout(act(linear1(x))))``; for SwiGLU, ``linear1`` yields ``[gate, up]`` and act is ``silu(gate) * up``."""
    h = linear1(x)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = _ACTIVATIONS[activation](h) if isinstance(activation, str) else activation(h)
    return linear2(dropout(h))


def _ff_hidden(activation, dim_feedforward: int) -> int:
    return 2 * dim_feedforward if activation == "swiglu" else dim_feedforward


class FeedForward(nn.Module):
    """Position-wise feed-forward block ``linear2(dropout(act(linear1(x))))``.

    Args:
        d_model: input and output size. dim_feedforward: hidden size.
        activation: ``"relu"``, ``"gelu"``, ``"swiglu"`` (``linear1`` then has ``2 * dim_feedforward``
            outputs, gate and up, as in Llama) or a callable. Default ``"gelu"``.
        dropout: on the hidden activations. Default 0.0. bias: default True.
    """

    def __init__(self, d_model: int, dim_feedforward: int, activation="gelu", dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_activation(activation)
        self.activation = activation
        self.linear1 = nn.Linear(d_model, _ff_hidden(activation, dim_feedforward), bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d_model)`` to ``(..., d_model)``."""
        return _feed_forward(x, self.linear1, self.linear2, self.dropout, self.activation)


ATTENTION_KINDS = ("softmax", "linear", "performer", "lsh")


class EfficientSelfAttention(nn.Module):
    """A linear, Performer or LSH attention module behind :class:`MultiheadAttention`'s call
    signature, so the Transformer layers can use it as ``self_attn`` (``attention=``).

    Self-attention only (``key`` and ``value`` must be ``query``); causal through ``is_causal``
    (a given ``attn_mask`` is then taken to be the causal mask, as torch's ``is_causal`` hint
    says); no ``key_padding_mask`` and no other ``attn_mask``; attention weights are never returned.

    Args:
        attention: ``"linear"`` (:class:`~fastattn.nn.LinearAttention`), ``"performer"``
            (:class:`~fastattn.nn.PerformerAttention`) or ``"lsh"`` (:class:`~fastattn.nn.LSHAttention`).
        embed_dim, num_heads, bias, batch_first: as :class:`MultiheadAttention`.
        attention_kwargs: more constructor arguments of that module (``num_kv_heads``,
            ``num_features``, ``n_buckets``, ``chunk_size``, ``position``, ...).
    """

    def __init__(self, attention: str, embed_dim: int, num_heads: int, *, bias: bool = True, batch_first: bool = False,
                 attention_kwargs: dict | None = None, device=None, dtype=None) -> None:
        super().__init__()
        from .linear_attention import LinearAttention, LSHAttention, PerformerAttention

        modules = {"linear": LinearAttention, "performer": PerformerAttention, "lsh": LSHAttention}
        if attention not in modules:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.kind, self.batch_first = attention, batch_first
        self.attn = modules[attention](embed_dim, num_heads, bias=bias, device=device, dtype=dtype,
                                       **(attention_kwargs or {}))

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, need_weights: bool = False,
                is_causal: bool = False):
        """``query (L, N, E)`` (``(N, L, E)`` with batch_first, or unbatched ``(L, E)``); returns ``(out, None)``."""
        if key is not query or value is not query:
            raise ValueError(f"key and value must be query: attention={self.kind!r} is self-attention only")
        if key_padding_mask is not None:
            raise ValueError(f"key_padding_mask is not supported with attention={self.kind!r}")
        if attn_mask is not None and not is_causal:
            raise ValueError(f"attn_mask is not supported with attention={self.kind!r} (only causal, via is_causal)")
        if need_weights:
            raise ValueError(f"need_weights=True is not supported with attention={self.kind!r}")
        unbatched = query.dim() == 2
        x = query.unsqueeze(0) if unbatched else query if self.batch_first else query.transpose(0, 1)  # (N, L, E)
        y = self.attn(x, causal=is_causal)
        y = y.squeeze(0) if unbatched else y if self.batch_first else y.transpose(0, 1)
        return y, None


def _self_attention(attention: str, d_model: int, nhead: int, dropout: float, bias: bool, batch_first: bool,
                    attention_kwargs: dict | None, factory: dict) -> nn.Module:
    if attention == "softmax":
        if attention_kwargs:
            raise ValueError("attention_kwargs is for attention='linear', 'performer' or 'lsh'")
        return MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory)
    return EfficientSelfAttention(attention, d_model, nhead, bias=bias, batch_first=batch_first,
                                  attention_kwargs=attention_kwargs, **factory)


class TransformerEncoderLayer(nn.Module):
    """Self-attention and feed-forward, as ``torch.nn.TransformerEncoderLayer`` (same arguments,
    parameter names and forward), with :class:`MultiheadAttention` inside.

    Args:
        d_model, nhead, dim_feedforward (2048), dropout (0.1), activation (``"relu"``; also
        ``"gelu"``, ``"swiglu"`` or a callable), layer_norm_eps (1e-5), batch_first (False),
        norm_first (False), bias (True), device, dtype: as torch's.
        attention: the self-attention: ``"softmax"`` (default, :class:`MultiheadAttention`, torch's
            parameter names), ``"linear"``, ``"performer"`` or ``"lsh"`` (:class:`EfficientSelfAttention`).
        attention_kwargs: constructor arguments of the efficient module (e.g. ``{"num_features": 64}``).
    """

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
        activation: str | Callable = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = False,
        norm_first: bool = False, bias: bool = True, device=None, dtype=None, *, attention: str = "softmax",
        attention_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        _check_activation(activation)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = _self_attention(attention, d_model, nhead, dropout, bias, batch_first, attention_kwargs, factory)
        self.linear1 = nn.Linear(d_model, _ff_hidden(activation, dim_feedforward), bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False) -> torch.Tensor:
        """``src (L, N, E)`` (``(N, L, E)`` with batch_first); masks in torch's polarity
        (bool True = not allowed). ``is_causal=True`` needs no ``src_mask``."""
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(_feed_forward(x, self.linear1, self.linear2, self.dropout, self.activation))


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over ``memory`` and feed-forward, as
    ``torch.nn.TransformerDecoderLayer`` (same arguments, parameter names and forward).

    Self-attention is causal when ``tgt_is_causal=True`` (no ``tgt_mask`` needed) or through a
    ``tgt_mask``, exactly as in torch. ``attention``/``attention_kwargs`` choose the self-attention
    as in :class:`TransformerEncoderLayer`; the cross-attention over ``memory`` stays softmax attention.
    """

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
        activation: str | Callable = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = False,
        norm_first: bool = False, bias: bool = True, device=None, dtype=None, *, attention: str = "softmax",
        attention_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        _check_activation(activation)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = _self_attention(attention, d_model, nhead, dropout, bias, batch_first, attention_kwargs, factory)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory)
        self.linear1 = nn.Linear(d_model, _ff_hidden(activation, dim_feedforward), bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = activation

    def forward(
        self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
        memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """``tgt (T, N, E)``, ``memory (S, N, E)`` (batch first with batch_first); torch's masks."""
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                need_weights=False, is_causal=is_causal)[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(_feed_forward(x, self.linear1, self.linear2, self.dropout, self.activation))


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    return x.shape[1] if (x.dim() == 3 and batch_first) else x.shape[0]


def _resolve_is_causal(mask: torch.Tensor | None, is_causal: bool | None, size: int) -> bool:
    """torch's rule: an explicit flag wins; otherwise a float mask equal to the causal mask means causal."""
    if is_causal is not None:
        return is_causal
    if mask is None or mask.shape != (size, size) or not mask.is_floating_point():
        return False
    return torch.equal(mask, Transformer.generate_square_subsequent_mask(size, device=mask.device, dtype=mask.dtype))


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of ``encoder_layer``, as ``torch.nn.TransformerEncoder``.

    ``enable_nested_tensor`` and ``mask_check`` are accepted for torch compatibility and unused:
    padding goes to the kernels as key lengths or masks, never as nested tensors.
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal: bool | None = None) -> torch.Tensor:
        batch_first = self.layers[0].self_attn.batch_first if self.layers else False
        is_causal = _resolve_is_causal(mask, is_causal, _seq_len(src, batch_first))
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        return self.norm(output) if self.norm is not None else output


class TransformerDecoder(nn.Module):
    """A stack of ``num_layers`` copies of ``decoder_layer``, as ``torch.nn.TransformerDecoder``."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
        memory_key_padding_mask=None, tgt_is_causal: bool | None = None, memory_is_causal: bool = False,
    ) -> torch.Tensor:
        batch_first = self.layers[0].self_attn.batch_first if self.layers else False
        tgt_is_causal = _resolve_is_causal(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        output = tgt
        for layer in self.layers:
            output = layer(
                output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
            )
        return self.norm(output) if self.norm is not None else output


class Transformer(nn.Module):
    """Encoder-decoder transformer, as ``torch.nn.Transformer`` (same arguments, parameter names
    and ``forward``), plus :meth:`encode` and :meth:`decode` for step-wise use.

    Works on embeddings ``(S, N, E)`` / ``(N, S, E)``; :class:`Seq2SeqTransformer` adds token
    embeddings, positions, an output projection and ``generate``. ``attention``/``attention_kwargs``
    choose every layer's self-attention (see :class:`TransformerEncoderLayer`).
    """

    def __init__(
        self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
        dim_feedforward: int = 2048, dropout: float = 0.1, activation: str | Callable = "relu",
        custom_encoder: nn.Module | None = None, custom_decoder: nn.Module | None = None,
        layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False, bias: bool = True,
        device=None, dtype=None, *, attention: str = "softmax", attention_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        layer_args = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                          layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
                          attention=attention, attention_kwargs=attention_kwargs)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            layer = TransformerEncoderLayer(d_model, nhead, **layer_args, **factory)
            norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
            self.encoder = TransformerEncoder(layer, num_encoder_layers, norm)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            layer = TransformerDecoderLayer(d_model, nhead, **layer_args, **factory)
            norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
            self.decoder = TransformerDecoder(layer, num_decoder_layers, norm)
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        for p in self.parameters():  # torch's initialisation
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src, src_mask=None, src_key_padding_mask=None, src_is_causal: bool | None = None) -> torch.Tensor:
        """The encoder's output (``memory``), shaped like ``src``."""
        return self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)

    def decode(
        self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
        memory_key_padding_mask=None, tgt_is_causal: bool = True, memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """The decoder's output for ``tgt`` given ``memory``. Causal by default (autoregressive
        decoding needs no ``tgt_mask``); pass ``tgt_is_causal=False`` to use ``tgt_mask`` instead."""
        return self.decoder(
            tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )

    def forward(
        self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
        tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None, memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """torch's ``Transformer.forward``: ``tgt`` self-attention is causal only through
        ``tgt_mask`` or ``tgt_is_causal=True``, as in torch."""
        batch_dim = 0 if self.batch_first else 1
        if src.dim() == 3 and src.shape[batch_dim] != tgt.shape[batch_dim]:
            raise ValueError(f"src and tgt must have the same batch size, got {src.shape[batch_dim]} and {tgt.shape[batch_dim]}")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ValueError(f"src and tgt must have d_model={self.d_model} features")
        memory = self.encode(src, src_mask, src_key_padding_mask, src_is_causal)
        return self.decode(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                           tgt_is_causal, memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> torch.Tensor:
        """torch's causal float mask ``(sz, sz)``: 0 on and below the diagonal, ``-inf`` above."""
        return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype or torch.float32, device=device), diagonal=1)


class Seq2SeqTransformer(nn.Module):
    """A token-to-token encoder-decoder: embeddings, sinusoidal positions, a batch-first
    :class:`Transformer` (pre-norm) and an output projection, with greedy :meth:`generate`.

    Args:
        vocab_size: source vocabulary (and target vocabulary unless ``tgt_vocab_size``).
        d_model: width. Default 128. num_heads: default 4. num_layers: encoder and decoder layers. Default 2.
        dim_feedforward: default ``4 * d_model``. dropout: default 0.1. activation: default ``"gelu"``.
        tgt_vocab_size: target vocabulary. Default ``vocab_size``.
        pad_id: token id of padding; its positions are masked as keys. Default None (no padding).
        max_len: positions precomputed. Default 1024.

    Tokens are int ``(B, L)``; logits are ``(B, T, tgt_vocab_size)``.
    """

    def __init__(
        self, vocab_size: int, d_model: int = 128, num_heads: int = 4, num_layers: int = 2,
        dim_feedforward: int | None = None, dropout: float = 0.1, activation: str | Callable = "gelu",
        tgt_vocab_size: int | None = None, pad_id: int | None = None, max_len: int = 1024,
    ) -> None:
        super().__init__()
        tgt_vocab_size = tgt_vocab_size or vocab_size
        self.pad_id = pad_id
        self.src_embedding = nn.Embedding(vocab_size, d_model)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, d_model)
        self.positions = SinusoidalPositionalEncoding(d_model, max_len=max_len, dropout=dropout)
        self.transformer = Transformer(
            d_model, num_heads, num_layers, num_layers, dim_feedforward or 4 * d_model, dropout, activation,
            batch_first=True, norm_first=True,
        )
        self.generator = nn.Linear(d_model, tgt_vocab_size)
        self.embed_scale = math.sqrt(d_model)

    def _padding(self, tokens: torch.Tensor) -> torch.Tensor | None:
        return None if self.pad_id is None else tokens == self.pad_id

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """Source tokens ``(B, S)`` to memory ``(B, S, d_model)``."""
        x = self.positions(self.src_embedding(src) * self.embed_scale)
        return self.transformer.encode(x, src_key_padding_mask=self._padding(src))

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        """Target tokens ``(B, T)`` and memory to next-token logits ``(B, T, tgt_vocab_size)``
        (causal; ``src`` gives the memory's padding when ``pad_id`` is set)."""
        y = self.positions(self.tgt_embedding(tgt) * self.embed_scale)
        memory_padding = self._padding(src) if src is not None else None
        h = self.transformer.decode(y, memory, tgt_key_padding_mask=self._padding(tgt),
                                    memory_key_padding_mask=memory_padding)
        return self.generator(h)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits ``(B, T, tgt_vocab_size)`` for target tokens ``tgt`` given ``src``."""
        return self.decode(tgt, self.encode(src), src)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, bos_id: int, eos_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: ``(B, 1 + n)`` tokens starting with ``bos_id``; stops early once every
        sequence has produced ``eos_id``. The encoder runs once; the decoder re-reads the prefix each step."""
        memory = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            next_token = self.decode(out, memory, src)[:, -1].argmax(-1)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
                finished |= next_token == eos_id
            out = torch.cat([out, next_token[:, None]], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return out
