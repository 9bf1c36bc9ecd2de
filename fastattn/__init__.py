"""fastattn: fused attention kernels for PyTorch.

Functional API: :func:`attention`, :func:`scaled_dot_product_attention`; masks:
:class:`BlockMask`; which backend runs here and why: :func:`info`.
"""

from . import reference
from .api import attention, scaled_dot_product_attention
from .backends import BackendNotSupportedError, backends, get_backend
from .block_mask import BlockMask
from .info import info

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "BlockMask",
    "attention",
    "backends",
    "get_backend",
    "info",
    "reference",
    "scaled_dot_product_attention",
]
