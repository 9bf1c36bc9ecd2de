"""fastattn: fused attention kernels for PyTorch.

Functional API: :func:`attention`, :func:`scaled_dot_product_attention`,
:func:`varlen_attention` (packed sequences), :func:`attention_with_kvcache` (decoding); masks:
:class:`BlockMask`; which backend runs here and why: :func:`info`.
"""

from . import reference
from .api import attention, scaled_dot_product_attention
from .backends import BackendNotSupportedError, get_backend
from .backends import backends as list_backends
from .block_mask import BlockMask
from .info import info
from .kvcache import attention_with_kvcache
from .linear import linear_attention, lsh_attention
from .varlen import varlen_attention

__version__ = "0.1.0"

# Heavier parts load on first use, so `import fastattn` stays cheap.
_LAZY = {
    "nn": ("fastattn.nn", None),
    "masks": ("fastattn.masks", None),
    "distributed": ("fastattn.distributed", None),
    "analysis": ("fastattn.analysis", None),
    "integrations": ("fastattn.integrations", None),
    "patch_model": ("fastattn.patching", "patch_model"),
    "sdpa_override": ("fastattn.patching", "sdpa_override"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")


__all__ = [
    "BackendNotSupportedError",
    "analysis",
    "distributed",
    "integrations",
    "list_backends",
    "masks",
    "nn",
    "patch_model",
    "sdpa_override",
    "BlockMask",
    "attention",
    "attention_with_kvcache",
    "get_backend",
    "info",
    "linear_attention",
    "lsh_attention",
    "reference",
    "scaled_dot_product_attention",
    "varlen_attention",
]

# Import every backend module now rather than on the first call: under torch.compile that first
# call is traced, and dynamo cannot trace imports (nor the extension loader's registration).
list_backends()
