"""Drop-in attention modules and transformer building blocks that run on fastattn.

* :class:`MultiheadAttention` (alias ``MultiHeadAttention``): ``torch.nn.MultiheadAttention``'s
  interface and ``state_dict``.
"""

from .multihead import MultiheadAttention, MultiHeadAttention

__all__ = ["MultiHeadAttention", "MultiheadAttention"]
