"""Linear attention and LSH attention (:func:`lsh_attention`, Reformer): :func:`linear_attention`, its feature maps (:class:`PerformerFeatures`, FAVOR+)
and the plain-PyTorch reference (:mod:`fastattn.linear.naive`: parallel, recurrent, chunked)."""

from . import naive
from .api import LinearAttentionState, linear_attention
from .features import PerformerFeatures, elu_plus_one
from .lsh import lsh_attention

__all__ = ["LinearAttentionState", "PerformerFeatures", "elu_plus_one", "linear_attention", "lsh_attention", "naive"]
