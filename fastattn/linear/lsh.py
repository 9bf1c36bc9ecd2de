"""Reformer-style LSH attention: hash, sort by bucket, attend within chunks of the sorted order.

For each of ``n_hashes`` rounds, queries and keys are hashed by a random rotation
(``bucket = argmax([x R, -x R])``, ``R (D, n_buckets / 2)``) and each is sorted by
``(bucket, position)``. Sorted query chunk ``c`` (``chunk_size`` positions) attends to sorted key
chunks ``c - 1`` and ``c``, only to keys of its own bucket (and, when causal, at positions ``<=`` its
own). The rounds are combined through their log-sum-exps (a key seen in several rounds counts once
per round; Reformer's duplicate correction is not applied). A query that sees no key in any round
outputs 0.
"""

from __future__ import annotations

import math

import torch

from ..block_mask import PARTIAL, BlockMask


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket ids ``(n_hashes, B, H, L)`` of ``x (B, H, L, D)`` under ``rotations (n_hashes, D, n_buckets // 2)``."""
    if rotations.shape[-1] == 0:  # one bucket
        return torch.zeros(rotations.shape[0], *x.shape[:-1], dtype=torch.long, device=x.device)
    rotated = torch.einsum("bhld,rdn->rbhln", x.to(rotations.dtype), rotations)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def _sorted_order(buckets: torch.Tensor) -> torch.Tensor:
    # sort by (bucket, position): positions are < L, so bucket * L + position is a unique key
    L = buckets.shape[-1]
    key = buckets * L + torch.arange(L, device=buckets.device)
    return key.argsort(dim=-1)


def _chunk_visibility(bq, bk, pq, pk, chunk_size: int, causal: bool) -> torch.Tensor:
    """Bool ``(B, H, N, T, 2T)``: sorted query chunk ``c`` against sorted key chunks ``c - 1`` and ``c``."""
    T = chunk_size
    L = bq.shape[-1]
    N = math.ceil(L / T)
    pad = N * T - L

    def chunks(t, fill):
        return torch.nn.functional.pad(t, (0, pad), value=fill).unflatten(-1, (N, T))  # (B, H, N, T)

    bq, pq = chunks(bq, -1), chunks(pq, -1)
    bk, pk = chunks(bk, -2), chunks(pk, L)
    bk2 = torch.cat([torch.roll(bk, 1, dims=2), bk], dim=-1)  # (B, H, N, 2T): previous chunk, then own
    pk2 = torch.cat([torch.roll(pk, 1, dims=2), pk], dim=-1)
    bk2[:, :, 0, :T] = -2  # chunk 0 has no previous chunk
    visible = bq[..., :, None] == bk2[..., None, :]
    if causal:
        visible &= pk2[..., None, :] <= pq[..., :, None]
    return visible


def _round_inputs(q, k, v, rotations, chunk_size, causal):
    """Per round: the sort orders and the chunk visibility."""
    bq_all, bk_all = lsh_buckets(q, rotations), lsh_buckets(k, rotations)
    for bq, bk in zip(bq_all, bk_all):
        order_q, order_k = _sorted_order(bq), _sorted_order(bk)
        visible = _chunk_visibility(bq.gather(-1, order_q), bk.gather(-1, order_k), order_q, order_k, chunk_size, causal)
        yield order_q, order_k, visible


def _gather(x, order):
    return x.gather(2, order.unsqueeze(-1).expand(*order.shape, x.shape[-1]))


def _tile_scores(q_s, k_s, visible, scale, chunk_size):
    """Scores ``(B, H, N, T, 2T)`` of sorted query chunks against their two key chunks, masked to -inf."""
    T = chunk_size
    B, H, L, D = q_s.shape
    N = visible.shape[2]
    pad = N * T - L
    qc = torch.nn.functional.pad(q_s, (0, 0, 0, pad)).unflatten(2, (N, T))  # (B, H, N, T, D)
    kc = torch.nn.functional.pad(k_s, (0, 0, 0, pad)).unflatten(2, (N, T))
    k2 = torch.cat([torch.roll(kc, 1, dims=2), kc], dim=3)  # (B, H, N, 2T, D)
    scores = (qc @ k2.transpose(-1, -2)) * scale
    return scores.masked_fill(~visible, float("-inf")), N, pad


def _finite(lse: torch.Tensor) -> torch.Tensor:
    # -inf (no visible key) -> 0, so that exp(x - lse) is 0 rather than NaN, in values and gradients
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _combine(outs, lses):
    """Rounds ``(R, B, H, L, Dv)`` / ``(R, B, H, L)`` combined through their log-sum-exps."""
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - _finite(lse))  # exp(-inf) = 0 for rounds (or queries) that saw nothing
    return (weights.unsqueeze(-1) * outs).sum(0)


def _check(q, k, v, n_buckets, n_hashes, chunk_size, rotations):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D), got {getattr(t, 'shape', type(t).__name__)}")
    B, Hq, L, D = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:] or k.shape[1] < 1 or Hq % k.shape[1]:
        raise ValueError(f"k must be (B={B}, Hkv, L={L}, D={D}) with Hq={Hq} a multiple of Hkv (GQA), "
                         f"got {tuple(k.shape)}")
    if v.shape[0] != B or v.shape[2] != L or v.shape[1] < 1 or Hq % v.shape[1]:
        raise ValueError(f"v must be (B={B}, Hkv, L={L}, Dv) with Hq={Hq} a multiple of Hkv, got {tuple(v.shape)}")
    if not isinstance(n_buckets, int) or n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
        raise ValueError(f"n_buckets must be 1 or an even int >= 2, got {n_buckets!r}")
    if not isinstance(n_hashes, int) or n_hashes < 1:
        raise ValueError(f"n_hashes must be a positive int, got {n_hashes!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if rotations is not None and tuple(rotations.shape) != (n_hashes, q.shape[-1], n_buckets // 2):
        raise ValueError(
            f"rotations must have shape (n_hashes, D, n_buckets // 2) = {(n_hashes, q.shape[-1], n_buckets // 2)}, "
            f"got {tuple(rotations.shape)}"
        )


def _prepare(q, k, v, n_buckets, n_hashes, chunk_size, shared_qk, rotations):
    if shared_qk:
        if k is not None:
            raise ValueError("k must be None with shared_qk=True (keys are the unit-normalised queries)")
        k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    elif k is not None and v is not None and k.dim() == v.dim() == 4 and k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same heads, got {k.shape[1]} and {v.shape[1]}")
    _check(q, k, v, n_buckets, n_hashes, chunk_size, rotations)
    if rotations is None:
        rotations = torch.randn(n_hashes, q.shape[-1], n_buckets // 2, device=q.device)
    Hq = q.shape[1]
    return _repeat_heads(k, Hq // k.shape[1]), _repeat_heads(v, Hq // v.shape[1]), rotations


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """``(B, Hkv, L, D)`` to ``(B, Hkv * group, L, D)``: under GQA every query head sorts the shared
    keys and values into its own order, so each needs its own gathered copy anyway."""
    if group == 1:
        return x
    B, Hkv, L, D = x.shape
    return x[:, :, None].expand(B, Hkv, group, L, D).reshape(B, Hkv * group, L, D)


def lsh_attention_reference(q, k, v, *, n_buckets, n_hashes=1, chunk_size=64, causal=False, shared_qk=True,
                            scale=None, rotations=None):
    """LSH attention in plain PyTorch (chunk tiles materialised, softmax by torch), same arguments as
    :func:`lsh_attention`."""
    k, v, rotations = _prepare(q, k, v, n_buckets, n_hashes, chunk_size, shared_qk, rotations)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for order_q, order_k, visible in _round_inputs(q, k, v, rotations, chunk_size, causal):
        q_s, k_s, v_s = _gather(q, order_q), _gather(k, order_k), _gather(v, order_k)
        scores, N, pad = _tile_scores(q_s, k_s, visible, scale, chunk_size)
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, N, T)
        p = torch.exp(scores - _finite(lse).unsqueeze(-1))
        vc = torch.nn.functional.pad(v_s, (0, 0, 0, pad)).unflatten(2, (N, chunk_size))
        v2 = torch.cat([torch.roll(vc, 1, dims=2), vc], dim=3)  # (B, H, N, 2T, Dv)
        out_s = (p @ v2).flatten(2, 3)[:, :, : q.shape[2]]
        lse_s = lse.flatten(2, 3)[:, :, : q.shape[2]]
        inverse = order_q.argsort(dim=-1)
        outs.append(_gather(out_s, inverse))
        lses.append(lse_s.gather(-1, inverse))
    return _combine(torch.stack(outs), torch.stack(lses))


def lsh_attention(q, k, v, *, n_buckets, n_hashes=1, chunk_size=64, causal=False, shared_qk=True, scale=None,
                  rotations=None):
    """Reformer's LSH attention on :func:`fastattn.attention` with a block-sparse mask over the sorted order.

    Args:
        q: ``(B, H, L, D)``.
        k: ``(B, Hkv, L, D)`` with ``H`` a multiple of ``Hkv`` (GQA), or None with ``shared_qk=True``
            (keys are then ``q / |q|``, as in Reformer).
        v: ``(B, Hkv, L, Dv)`` (with ``shared_qk``, any ``Hkv`` dividing ``H``).
        n_buckets: hash buckets, 1 or even.
        n_hashes: hash rounds, combined through their log-sum-exps. Default 1.
        chunk_size: sorted positions per chunk; a chunk attends to itself and the previous chunk. Default 64.
        causal: a query sees keys at original positions ``<=`` its own. Default False.
        shared_qk: derive keys from queries. Default True.
        scale: score scale. Default ``D ** -0.5``.
        rotations: ``(n_hashes, D, n_buckets // 2)`` random rotations; drawn from the global RNG if None.

    Returns:
        ``(B, H, L, Dv)``. Gradients flow to ``q``, ``k`` and ``v`` (hashes are piecewise constant).

    The attention of each round runs in fastattn's fused kernels with a :class:`fastattn.BlockMask`
    whose only tiles are the ``(c, c - 1)`` and ``(c, c)`` chunk pairs, each with its element mask
    (same bucket, causal), so memory is ``O(L * chunk_size)``. With several rounds their
    log-sum-exps are recomputed on the chunk tiles with torch ops (the fused op's lse carries no
    gradient).
    """
    import fastattn

    k, v, rotations = _prepare(q, k, v, n_buckets, n_hashes, chunk_size, shared_qk, rotations)
    scale_value = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, L, _ = q.shape
    T = chunk_size
    outs, lses = [], []
    for order_q, order_k, visible in _round_inputs(q, k, v, rotations, chunk_size, causal):
        q_s, k_s, v_s = _gather(q, order_q), _gather(k, order_k), _gather(v, order_k)
        N = visible.shape[2]
        layout = torch.zeros(B, H, N, N, dtype=torch.int8, device=q.device)
        diag = torch.arange(N, device=q.device)
        layout[:, :, diag, diag] = PARTIAL
        layout[:, :, diag[1:], diag[:-1]] = PARTIAL
        # partial tiles in row-major order: (0, 0), (1, 0), (1, 1), (2, 1), (2, 2), ...
        prev, own = visible[..., :T], visible[..., T:]  # (B, H, N, T, T)
        tiles = torch.cat([own[:, :, :1], torch.stack([prev[:, :, 1:], own[:, :, 1:]], dim=3).flatten(2, 3)], dim=2)
        block_mask = BlockMask(layout, (L, L), T, partial_masks=tiles.flatten(0, 2).contiguous())
        out_s = fastattn.attention(q_s, k_s, v_s, block_mask=block_mask, scale=scale)
        inverse = order_q.argsort(dim=-1)
        outs.append(_gather(out_s, inverse))
        if n_hashes > 1:
            scores, _, _ = _tile_scores(q_s, k_s, visible, scale_value, chunk_size)
            lses.append(torch.logsumexp(scores, dim=-1).flatten(2, 3)[:, :, :L].gather(-1, inverse))
    if n_hashes == 1:
        return outs[0]
    return _combine(torch.stack(outs), torch.stack(lses))
