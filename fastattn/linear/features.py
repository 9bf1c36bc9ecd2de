"""Feature maps of linear attention: ``phi`` such that ``phi(q) . phi(k)`` stands in for a similarity.

``"elu+1"`` (Katharopoulos et al.) and ``"relu"`` are fixed maps; :class:`PerformerFeatures` is
FAVOR+ (Choromanski et al.): positive orthogonal random features whose inner products estimate
``exp(q . k)`` without bias, so that normalised linear attention approximates softmax attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``: positive everywhere, linear for ``x > 0``."""
    return F.elu(x) + 1.0


def orthogonal_gaussian(num_features: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(num_features, dim)`` float32 rows that are orthogonal within each block of ``dim`` rows,
    each with the norm of a standard Gaussian vector (so every row is marginally ``N(0, I)``)."""
    blocks = []
    for start in range(0, num_features, dim):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # the sign fix makes Q Haar-distributed
        blocks.append(q.T[: min(dim, num_features - start)])
    rows = torch.cat(blocks)  # (num_features, dim), unit rows
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).float()


class PerformerFeatures(nn.Module):
    """FAVOR+ positive orthogonal random features for ``exp(q . k)``.

    ``phi(x)_r = exp(w_r . x - |x|^2 / 2 - c) / sqrt(m)`` with ``m = num_features`` rows ``w_r`` of
    ``projection``; then ``E[phi(q) . phi(k)] = exp(q . k) * exp(-c_q - c_k)``. Queries subtract their
    own row max ``c_q = max_r w_r . x``: a per-query constant, which cancels exactly under linear
    attention's normalisation and keeps every query feature at most ``1 / sqrt(m)``. Keys subtract
    nothing (``c_k = 0``): a data-dependent key stabiliser would not cancel (each key would be weighted
    differently) and would break states carried across calls, and a data-independent bound such as
    ``max_r |w_r|^2 / 2`` (which ``w . x - |x|^2 / 2`` never exceeds) shrinks every feature by
    ``exp(-D / 2)``, which underflows (float16 features, or float32 beyond ``D`` ~ 170). Without a stabiliser the key exponent is still at
    most ``|w_r|^2 / 2`` (about ``D / 2``), far from float32's overflow for the usual head dims.

    Args:
        head_dim: input feature size ``D``.
        num_features: random features ``m``. Default ``2 * D``.
        orthogonal: draw orthogonal blocks (FAVOR+) instead of i.i.d. Gaussian rows. Default True.
        generator: optional ``torch.Generator`` for the draws; the global RNG otherwise, so the
            projection is deterministic under ``torch.manual_seed``.

    Attributes:
        projection: ``(m, D)`` float32 buffer; :meth:`redraw` replaces it in place.
    """

    def __init__(
        self,
        head_dim: int,
        num_features: int | None = None,
        *,
        orthogonal: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        num_features = 2 * head_dim if num_features is None else num_features
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.head_dim, self.num_features, self.orthogonal = head_dim, num_features, orthogonal
        self.register_buffer("projection", torch.empty(num_features, head_dim))
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection (e.g. every few hundred training steps, as Performer does)."""
        if self.orthogonal:
            w = orthogonal_gaussian(self.num_features, self.head_dim, generator)
        else:
            w = torch.randn(self.num_features, self.head_dim, generator=generator)
        self.projection.copy_(w.to(self.projection.device))

    def forward(self, x: torch.Tensor, is_query: bool, stabilize: bool = True) -> torch.Tensor:
        """Features of ``x (..., D)`` as ``(..., m)`` in float32 (float64 for float64 ``x``).

        Args:
            x: queries or keys, already scaled (the estimate is of ``exp(q . k)``).
            is_query: picks the stabiliser (see the class docstring).
            stabilize: subtract the query stabiliser; only exact when the attention is normalised.
        """
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x must end in head_dim={self.head_dim}, got shape {tuple(x.shape)}")
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        w = self.projection.to(device=x.device, dtype=x.dtype)
        proj = x @ w.T  # (..., m)
        exponent = proj - 0.5 * (x * x).sum(-1, keepdim=True)
        if stabilize:
            if is_query:
                exponent = exponent - proj.amax(-1, keepdim=True).detach()
        return torch.exp(exponent) / math.sqrt(self.num_features)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, orthogonal={self.orthogonal}"


def featurize(
    q: torch.Tensor, k: torch.Tensor, feature_map, scale: float | None, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi(q), phi(k))`` in float32 (float64 for float64 inputs) after scaling ``q`` and ``k`` by ``sqrt(scale)`` each.

    ``scale`` defaults to ``D ** -0.5`` for Performer (so the kernel estimated is softmax's
    ``exp(q . k / sqrt(D))``) and to 1 for the other maps.
    """
    D = q.shape[-1]
    if scale is None:
        scale = D**-0.5 if _is_performer(feature_map) else 1.0
    root = math.sqrt(scale)
    dtype = torch.promote_types(q.dtype, torch.float32)
    qs, ks = (q.to(dtype), k.to(dtype)) if root == 1.0 else (q.to(dtype) * root, k.to(dtype) * root)
    if isinstance(feature_map, PerformerFeatures):
        return feature_map(qs, True, normalize), feature_map(ks, False, normalize)
    if feature_map == "performer":
        performer = PerformerFeatures(D).to(q.device)  # a fresh draw; pass a module to keep one
        return performer(qs, True, normalize), performer(ks, False, normalize)
    fn = resolve_feature_map(feature_map)
    return fn(qs).to(dtype), fn(ks).to(dtype)


def _is_performer(feature_map) -> bool:
    return isinstance(feature_map, PerformerFeatures) or (isinstance(feature_map, str) and feature_map == "performer")


def resolve_feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable of a fixed feature map name (``"elu+1"``, ``"relu"``) or a user callable."""
    if isinstance(feature_map, str):
        if feature_map == "elu+1":
            return elu_plus_one
        if feature_map == "relu":
            return F.relu
        raise ValueError(
            f"feature_map must be 'elu+1', 'relu', 'performer', a PerformerFeatures or a callable, got {feature_map!r}"
        )
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map must be a string, a PerformerFeatures or a callable, got {type(feature_map).__name__}")


def softmax_approximation_error(
    head_dim: int, length: int, num_features: int, seeds=range(5), causal: bool = False, orthogonal: bool = True,
    input_std: float = 1.0,
) -> float:
    """How far Performer linear attention is from exact softmax attention, averaged over ``seeds``.

    For each seed: ``q``, ``k`` normal with standard deviation ``input_std`` and ``v`` standard
    normal, float64 ``(1, 2, length, head_dim)``, a fresh
    :class:`PerformerFeatures` draw, and the relative Frobenius error ``|approx - exact| / |exact|``
    against ``softmax(q k^T / sqrt(D)) v``. The numbers in docs/linear-attention.md come from here.
    """
    from .api import linear_attention

    errors = []
    for seed in seeds:
        torch.manual_seed(seed)
        q, k, v = (torch.randn(1, 2, length, head_dim, dtype=torch.float64) for _ in range(3))
        q, k = q * input_std, k * input_std
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if causal:
            visible = torch.ones(length, length, dtype=torch.bool).tril()
            scores = scores.masked_fill(~visible, float("-inf"))
        exact = scores.softmax(-1) @ v
        features = PerformerFeatures(head_dim, num_features, orthogonal=orthogonal)
        approx = linear_attention(q, k, v, causal=causal, feature_map=features)
        errors.append(((approx - exact).norm() / exact.norm()).item())
    return sum(errors) / len(errors)
