"""Drop-in attention modules and transformer building blocks that run on fastattn.

* :class:`MultiheadAttention` (alias ``MultiHeadAttention``): ``torch.nn.MultiheadAttention``'s
  interface and ``state_dict``; :class:`Attention` (+ :class:`KVCache`, and the preallocated
  inference caches :class:`StaticKVCache`, :class:`PagedKVCache`): the native batch-first module
  (GQA, rotary/ALiBi, every mask kind, cached decoding).
* Positions: :class:`SinusoidalPositionalEncoding`, :class:`LearnedPositionalEncoding`,
  :class:`RotaryEmbedding` (fused Triton kernel on CUDA), :func:`alibi_slopes`,
  :class:`RelativePositionBias`.
* Blocks mirroring ``torch.nn``: :class:`FeedForward`, :class:`TransformerEncoderLayer`,
  :class:`TransformerDecoderLayer`, :class:`TransformerEncoder`, :class:`TransformerDecoder`,
  :class:`Transformer`; and :class:`Seq2SeqTransformer`, the token-level encoder-decoder.
"""

from .attention import Attention, KVCache
from .cache import PagedKVCache, StaticKVCache
from .linear_attention import LinearAttention, LinearAttentionCache, LSHAttention, PerformerAttention
from .multihead import MultiHeadAttention, MultiheadAttention
from .positional import (
    LearnedPositionalEncoding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    apply_rotary,
)
from .transformer import (
    FeedForward,
    Seq2SeqTransformer,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "Attention",
    "FeedForward",
    "KVCache",
    "LearnedPositionalEncoding",
    "LinearAttention",
    "LinearAttentionCache",
    "LSHAttention",
    "MultiHeadAttention",
    "MultiheadAttention",
    "PagedKVCache",
    "PerformerAttention",
    "RelativePositionBias",
    "RotaryEmbedding",
    "Seq2SeqTransformer",
    "SinusoidalPositionalEncoding",
    "StaticKVCache",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "alibi_slopes",
    "apply_rotary",
]
