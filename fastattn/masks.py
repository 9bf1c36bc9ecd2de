"""Builders of :class:`fastattn.BlockMask` for the common sparse attention patterns.

Every builder classifies the tiles from the pattern's definition, per tile, and evaluates the
element-wise predicate only on tiles that may be partial -- once per distinct tile contents where
the pattern repeats, a chunk of tiles at a time. Memory is ``O(number of tiles)`` for the layout
and its lists plus ``O(distinct partial tiles * BLOCK_Q * BLOCK_K)`` for their element masks, never
``O(Lq * Lk)``. (:func:`from_function` knows nothing of its predicate and evaluates every tile: its
*time* is ``O(Lq * Lk)``, its memory is not.)

Builders, the pairs ``(i, j)`` they let attend, and how the element mask of partial tiles is kept
(see :class:`fastattn.BlockMask`)::

    causal                      j <= i + Lk - Lq                                  window (None, 0)
    sliding_window              i + Lk - Lq - left <= j <= i + Lk - Lq + right    window (left, right)
    local_global                window, or i or j a global token (Longformer)     blocks per partial tile
    strided                     Sparse Transformer "strided" / "fixed" (causal)   blocks, shared by period
    bigbird                     window + global + random blocks (BigBird)         none: whole tiles
    document                    same document id, optionally causal               blocks per partial tile
    prefix_lm                   j < prefix_len or j <= i                          blocks, shared
    from_function               fn(b, h, i, j)                                    blocks per partial tile
    block_mask_from_attn_mask   attn_mask (bool, or float != -inf), cached        blocks per partial tile
"""

from __future__ import annotations

import collections
import math
import weakref
from collections.abc import Callable, Sequence

import torch

from .block_mask import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockMask,
    _as_4d,
    _pair,
    block_extents,
    classify_dense,
    window_layout,
    window_visible,
)

__all__ = [
    "bigbird",
    "block_mask_from_attn_mask",
    "causal",
    "clear_attn_mask_cache",
    "document",
    "from_function",
    "local_global",
    "prefix_lm",
    "sliding_window",
    "strided",
]

# Predicate evaluations per chunk of tiles: bounds the temporaries of the tile-wise evaluation.
_CHUNK_ELEMENTS = 1 << 21


# ---------------------------------------------------------------------------------------------- checks
def _check_int(x, name: str, minimum: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def _check_bound(x, name: str) -> int | None:
    """A window side: an int >= 0, or -1 for unbounded (as fastattn.attention's window)."""
    x = _check_int(x, name, minimum=-1)
    return None if x == -1 else x


def _check_device(device) -> torch.device:
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from error
    if device.type == "meta":
        raise ValueError(
            "device='meta' is not supported: a BlockMask's tile lists are computed from values, so build it "
            "on a real device (the CPU is cheap: the layout has one entry per tile)"
        )
    return device


def _check_index_tensor(t, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    return t.long()


# ------------------------------------------------------------------------------ tile-wise evaluation
Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TileKey = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _evaluate(
    predicate: Predicate,
    guess: torch.Tensor,
    seq_lens: tuple[int, int],
    block_size: tuple[int, int],
    tile_key: TileKey | None = None,
) -> BlockMask:
    """Exact BlockMask of ``predicate`` from a ``guess`` layout ``(B, H, nQB, nKB)``.

    ``guess`` says EMPTY (certainly empty), FULL (certainly full) or PARTIAL (unknown: the predicate is
    evaluated on the tile). ``predicate(b, h, q_idx, kv_idx)`` takes broadcasting int64 tensors of
    shapes ``(n, 1, 1)``, ``(n, 1, 1)``, ``(n, BLOCK_Q, 1)``, ``(n, 1, BLOCK_K)`` and returns bool
    broadcastable to ``(n, BLOCK_Q, BLOCK_K)``.

    ``tile_key(b, h, qb, kb)`` (int64 ``(n,)`` each) may return int64 ``(n, K)`` keys such that tiles with
    equal keys have equal contents: the predicate is then evaluated once per key and the tiles share
    their block of ``partial_masks`` -- what keeps periodic patterns (strided, ...) small.
    """
    (Lq, Lk), (bq, bk) = seq_lens, block_size
    device = guess.device
    layout = guess.clone()
    unknown = (guess == PARTIAL).nonzero()  # (n, 4): b, h, qb, kb in row-major order
    if tile_key is not None and unknown.shape[0]:
        keys = tile_key(*unknown.unbind(1))
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)
        n_unique = int(inverse.max()) + 1
        # One representative tile per key: the first with it.
        first = torch.full((n_unique,), unknown.shape[0], dtype=torch.int64, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(unknown.shape[0], device=device), reduce="amin")
        representatives = unknown[first]
    else:
        inverse = torch.arange(unknown.shape[0], device=device)
        representatives = unknown
    rows = torch.arange(bq, device=device)
    cols = torch.arange(bk, device=device)
    per_chunk = max(1, _CHUNK_ELEMENTS // (bq * bk))
    blocks, codes = [], []
    for start in range(0, representatives.shape[0], per_chunk):
        b, h, qb, kb = representatives[start:start + per_chunk].unbind(1)
        # Indices past the sequence ends repeat the last row / column: any() and all() over a tile are
        # then those of its in-range part, and the predicate never sees an out-of-range index.
        q_idx = ((qb * bq)[:, None, None] + rows[None, :, None]).clamp_(max=Lq - 1)  # (n, bq, 1)
        kv_idx = ((kb * bk)[:, None, None] + cols[None, None, :]).clamp_(max=Lk - 1)  # (n, 1, bk)
        result = predicate(b[:, None, None], h[:, None, None], q_idx, kv_idx)
        if not isinstance(result, torch.Tensor) or result.dtype != torch.bool:
            got = result.dtype if isinstance(result, torch.Tensor) else type(result).__name__
            raise TypeError(f"the mask predicate must return a bool tensor, got {got}")
        shape = (q_idx.shape[0], bq, bk)
        try:
            visible = torch.broadcast_to(result, shape)
        except RuntimeError as error:
            raise ValueError(
                f"the mask predicate returned shape {tuple(result.shape)}, not broadcastable to the tiles' {shape}"
            ) from error
        flat = visible.reshape(shape[0], -1)
        code = torch.where(flat.all(1), FULL, torch.where(flat.any(1), PARTIAL, EMPTY)).to(torch.int8)
        codes.append(code)
        blocks.append(visible[code == PARTIAL])
    if not codes:
        partial_masks = torch.zeros(0, bq, bk, dtype=torch.bool, device=device)
        return BlockMask(layout=layout, seq_lens=(Lq, Lk), block_size=(bq, bk), partial_masks=partial_masks)
    unique_codes = torch.cat(codes)
    partial_masks = torch.cat(blocks)
    b, h, qb, kb = unknown.unbind(1)
    tile_codes = unique_codes[inverse]
    layout[b, h, qb, kb] = tile_codes
    # Row of partial_masks of each representative that turned out partial.
    block_row = torch.cumsum(unique_codes == PARTIAL, 0) - 1
    ids = torch.full(layout.shape, -1, dtype=torch.int32, device=device)
    is_partial = tile_codes == PARTIAL
    ids[b[is_partial], h[is_partial], qb[is_partial], kb[is_partial]] = block_row[inverse[is_partial]].to(torch.int32)
    return BlockMask(
        layout=layout, seq_lens=(Lq, Lk), block_size=(bq, bk), partial_masks=partial_masks, partial_tile_ids=ids
    )


def _guess(nonempty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """int8 guess layout: FULL where ``full``, PARTIAL (evaluate) where ``nonempty`` only, else EMPTY."""
    return torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)


def _tile_grid(seq_lens, block_size, device):
    """Block extents shaped for broadcasting: ``q0, q1`` ``(nQB, 1)`` and ``k0, k1`` ``(1, nKB)``."""
    (Lq, Lk), (bq, bk) = seq_lens, block_size
    q0, q1 = (t[:, None] for t in block_extents(Lq, bq, device))
    k0, k1 = (t[None, :] for t in block_extents(Lk, bk, device))
    return q0, q1, k0, k1


def _crop_flags(qb: torch.Tensor, kb: torch.Tensor, guess: torch.Tensor) -> list[torch.Tensor]:
    """Whether each tile is in the last query / key block: cropped tiles differ from their peers."""
    return [(qb == guess.shape[2] - 1).long(), (kb == guess.shape[3] - 1).long()]


def _blocks_any(flags: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For bool ``(..., L)``: per block of ``block`` elements, whether any / all of them are set."""
    L = flags.shape[-1]
    n = math.ceil(L / block)
    pad = n * block - L
    # Pad with the last element so the cropped last block's any/all are those of its real elements.
    padded = torch.cat([flags, flags[..., -1:].expand(*flags.shape[:-1], pad)], dim=-1) if pad else flags
    blocks = padded.view(*flags.shape[:-1], n, block)
    return blocks.any(-1), blocks.all(-1)


# ------------------------------------------------------------------------------------- window masks
def causal(Lq: int, Lk: int, block_size: int | tuple[int, int] = 128, *, device=None) -> BlockMask:
    """Causal mask, bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)``.

    ::

        Lq = 3, Lk = 5 (x = visible)          tiles with block_size 2 (F full, P partial, . empty)
            k0 k1 k2 k3 k4                        kb0 kb1 kb2
        q0 [ x  x  x  .  . ]                 qb0 [ F   P   .  ]
        q1 [ x  x  x  x  . ]                 qb1 [ F   F   F  ]
        q2 [ x  x  x  x  x ]

    The element mask of partial tiles is the window ``(None, 0)``: nothing of size ``Lq * Lk`` is stored.

    Args:
        Lq: number of queries, >= 1.
        Lk: number of keys, >= 1.
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.
        device: where the layout lives (q's device). Default CPU.

    Returns:
        A BlockMask with ``window == (None, 0)``, layout ``(1, 1, nQB, nKB)``.
    """
    return sliding_window(Lq, Lk, left=-1, right=0, block_size=block_size, device=device)


def sliding_window(
    Lq: int, Lk: int, left: int, right: int = 0, block_size: int | tuple[int, int] = 128, *, device=None
) -> BlockMask:
    """Sliding-window (local) mask: query ``i`` sees key ``j`` iff
    ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right`` -- the ``window`` rule of :func:`fastattn.attention`.

    ::

        Lq = Lk = 6, left = 2, right = 0 (x = visible)
            k0 k1 k2 k3 k4 k5
        q0 [ x  .  .  .  .  . ]
        q1 [ x  x  .  .  .  . ]
        q2 [ x  x  x  .  .  . ]
        q3 [ .  x  x  x  .  . ]
        q4 [ .  .  x  x  x  . ]
        q5 [ .  .  .  x  x  x ]

    Tiles are classified analytically from their corners, in ``O(nQB * nKB)`` time and memory; the
    element mask is the window itself, so a mask for ``L = 65536`` costs a few hundred KiB.

    Args:
        Lq: number of queries, >= 1.
        Lk: number of keys, >= 1.
        left: keys visible before the aligned diagonal, >= 0, or -1 for unbounded.
        right: keys visible after it, >= 0, or -1 for unbounded. Default 0 (causal).
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.
        device: where the layout lives. Default CPU.

    Returns:
        A BlockMask with ``window == (left, right)`` (None for unbounded), layout ``(1, 1, nQB, nKB)``.
    """
    Lq, Lk = _check_int(Lq, "Lq", 1), _check_int(Lk, "Lk", 1)
    window = (_check_bound(left, "left"), _check_bound(right, "right"))
    block_size = _pair(block_size)
    layout = window_layout((Lq, Lk), block_size, window, _check_device(device))
    return BlockMask(layout=layout, seq_lens=(Lq, Lk), block_size=block_size, window=window)


# ------------------------------------------------------------------------- Longformer local + global
def local_global(
    L: int,
    window: int | tuple[int, int],
    global_tokens: Sequence[int] | torch.Tensor,
    block_size: int | tuple[int, int] = 128,
    *,
    device=None,
) -> BlockMask:
    """Longformer's mask: a sliding window plus global tokens that attend everywhere and are attended by all.

    ::

        L = 7, window = 1, global_tokens = [0] (x = visible, g = from the global token)
            k0 k1 k2 k3 k4 k5 k6
        q0 [ x  g  g  g  g  g  g ]      query 0 is global: it sees every key
        q1 [ x  x  x  .  .  .  . ]
        q2 [ g  x  x  x  .  .  . ]      key 0 is global: every query sees it
        q3 [ g  .  x  x  x  .  . ]
        q4 [ g  .  .  x  x  x  . ]
        q5 [ g  .  .  .  x  x  x ]
        q6 [ g  .  .  .  .  x  x ]

    Args:
        L: sequence length (queries and keys), >= 1.
        window: ``w`` for ``|i - j| <= w``, or ``(left, right)`` as in :func:`sliding_window`.
        global_tokens: indices in ``[0, L)`` of the global tokens: a sequence of ints or a 1-D int tensor.
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.
        device: where the mask lives; default the device of ``global_tokens`` if a tensor, else CPU.

    Returns:
        A BlockMask ``(1, 1, L, L)``; partial tiles carry their element masks.
    """
    L = _check_int(L, "L", 1)
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or a pair (left, right), got {window!r}")
        left, right = _check_bound(window[0], "window left"), _check_bound(window[1], "window right")
    else:
        left = right = _check_bound(window, "window")
    if isinstance(global_tokens, torch.Tensor):
        device = global_tokens.device if device is None else device
        tokens = _check_index_tensor(global_tokens, "global_tokens", (1,))
    elif isinstance(global_tokens, (list, tuple)):
        tokens = torch.tensor([_check_int(t, "global_tokens entry") for t in global_tokens], dtype=torch.long)
    else:
        raise TypeError(f"global_tokens must be a sequence of ints or a 1-D int tensor, got {type(global_tokens).__name__}")
    device = _check_device(device)
    tokens = tokens.to(device)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= L):
        raise ValueError(f"global_tokens must lie in [0, {L}), got values in [{int(tokens.min())}, {int(tokens.max())}]")
    block_size = _pair(block_size)
    bq, bk = block_size
    is_global = torch.zeros(L, dtype=torch.bool, device=device)
    is_global[tokens] = True

    base = window_layout((L, L), block_size, (left, right), device)[0, 0]
    row_any, row_all = _blocks_any(is_global, bq)
    col_any, col_all = _blocks_any(is_global, bk)
    nonempty = (base != EMPTY) | row_any[:, None] | col_any[None, :]
    full = (base == FULL) | row_all[:, None] | col_all[None, :]

    def predicate(b, h, i, j):
        return window_visible(i, j, (L, L), (left, right)) | is_global[i] | is_global[j]

    guess = _guess(nonempty, full)[None, None]

    def tile_key(b, h, qb, kb):
        # Far from the band the window part is all False, whatever the exact distance.
        shift = (kb * bk - qb * bq).clamp(
            min=None if left is None else -left - bk, max=None if right is None else right + bq
        )
        rows = torch.where(row_any[qb], qb, -1)  # tiles without global rows/columns share patterns
        columns = torch.where(col_any[kb], kb, -1)
        return torch.stack([shift, rows, columns, *_crop_flags(qb, kb, guess)], dim=1)

    return _evaluate(predicate, guess, (L, L), block_size, tile_key)


# ------------------------------------------------------------------------- Sparse Transformer patterns
def strided(
    L: int,
    stride: int,
    block_size: int | tuple[int, int] = 128,
    kind: str = "strided",
    *,
    summary: int = 1,
    device=None,
) -> BlockMask:
    """The causal factorised patterns of the Sparse Transformer (Child et al., 2019), both heads in one mask.

    ``kind="strided"``: ``0 <= i - j <= stride`` (the previous ``stride`` keys) or ``(i - j) % stride == 0``::

        L = 8, stride = 3
            k0 k1 k2 k3 k4 k5 k6 k7
        q0 [ x  .  .  .  .  .  .  . ]
        q1 [ x  x  .  .  .  .  .  . ]
        q2 [ x  x  x  .  .  .  .  . ]
        q3 [ x  x  x  x  .  .  .  . ]
        q4 [ .  x  x  x  x  .  .  . ]
        q5 [ .  .  x  x  x  x  .  . ]
        q6 [ x  .  .  x  x  x  x  . ]
        q7 [ .  x  .  .  x  x  x  x ]

    ``kind="fixed"``: ``j <= i`` and (``j // stride == i // stride`` or ``j % stride >= stride - summary``)::

        L = 8, stride = 3, summary = 1
            k0 k1 k2 k3 k4 k5 k6 k7
        q0 [ x  .  .  .  .  .  .  . ]
        q1 [ x  x  .  .  .  .  .  . ]
        q2 [ x  x  x  .  .  .  .  . ]
        q3 [ .  .  x  x  .  .  .  . ]
        q4 [ .  .  x  x  x  .  .  . ]
        q5 [ .  .  x  x  x  x  .  . ]
        q6 [ .  .  x  .  .  x  x  . ]
        q7 [ .  .  x  .  .  x  x  x ]

    Args:
        L: sequence length (queries and keys), >= 1.
        stride: the pattern's period ``l``, >= 1.
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.
        kind: ``"strided"`` or ``"fixed"``.
        summary: for ``"fixed"``, how many last positions ``c`` of each period every later query sees,
            in ``[1, stride]``. Default 1.
        device: where the mask lives. Default CPU.

    Returns:
        A BlockMask ``(1, 1, L, L)``; partial tiles carry their element masks.
    """
    L = _check_int(L, "L", 1)
    stride = _check_int(stride, "stride", 1)
    if kind not in ("strided", "fixed"):
        raise ValueError(f"kind must be 'strided' or 'fixed', got {kind!r}")
    summary = _check_int(summary, "summary", 1)
    if summary > stride:
        raise ValueError(f"summary must be <= stride ({stride}), got {summary}")
    block_size = _pair(block_size)
    bq, bk = block_size
    device = _check_device(device)
    q0, q1, k0, k1 = _tile_grid((L, L), block_size, device)
    if kind == "strided":
        # The differences d = i - j of a tile fill [q0 - k1, q1 - k0]; only d >= 0 is causal.
        lo, hi = torch.clamp(q0 - k1, min=0), q1 - k0
        local = (hi >= lo) & (lo <= stride)
        periodic = (hi >= lo) & (torch.div(lo + stride - 1, stride, rounding_mode="floor") * stride <= hi)
        nonempty = local | periodic
        full = (q0 - k1 >= 0) & (q1 - k0 <= stride)
        guess = _guess(nonempty, full)[None, None]

        def predicate(b, h, i, j):
            d = i - j
            return (d >= 0) & ((d <= stride) | (d % stride == 0))

        def tile_key(b, h, qb, kb):  # contents depend on i - j only
            return torch.stack([qb * bq - kb * bk, *_crop_flags(qb, kb, guess)], dim=1)

    else:
        # Same period: some period t in both blocks' ranges (then a causal pair exists iff k0 <= q1).
        same_period = (k0 <= q1) & (q0 // stride <= k1 // stride) & (k0 // stride <= q1 // stride)
        # Summary columns: the first j >= k0 with j % stride >= stride - summary must be <= min(k1, q1).
        first = torch.where(k0 % stride >= stride - summary, k0, k0 // stride * stride + stride - summary)
        summary_hit = first <= torch.minimum(k1, q1)
        nonempty = same_period | summary_hit
        full = (q0 // stride == k1 // stride) & (q1 // stride == k0 // stride) & (k1 <= q0)

        def predicate(b, h, i, j):
            return (j <= i) & ((i // stride == j // stride) | (j % stride >= stride - summary))

        def tile_key(b, h, qb, kb):
            # Shifting a tile by whole periods along the diagonal keeps its contents; a tile at least a
            # period below the diagonal sees only the summary columns, which depend on k0 % stride.
            q0, k0 = qb * bq, kb * bk
            far = (q0 - (k0 + bk - 1) >= stride).long()
            shift = torch.where(far == 1, 0, q0 - k0)
            phase = torch.where(far == 1, k0 % stride, q0 % stride)
            return torch.stack([far, shift, phase, *_crop_flags(qb, kb, guess)], dim=1)

    guess = _guess(nonempty, full)[None, None]
    return _evaluate(predicate, guess, (L, L), block_size, tile_key)


# ----------------------------------------------------------------------------------------- BigBird
def bigbird(
    L: int,
    window: int,
    num_global: int,
    num_random: int,
    block_size: int | tuple[int, int] = 128,
    seed: int = 0,
    *,
    num_heads: int = 1,
    device=None,
) -> BlockMask:
    """BigBird's block-sparse mask (Zaheer et al., 2020): window + global + random, counted in blocks.

    As in BigBird's block-sparse implementation every part is made of whole tiles, so the mask has no
    partial tiles. Query block ``qb`` sees key block ``kb`` iff ``|qb - kb| <= window``, or either is one
    of the first ``num_global`` blocks, or ``kb`` is one of the ``num_random`` blocks drawn for ``qb``
    (uniformly among the blocks it does not already see, independently per head)::

        6 blocks, window = 1, num_global = 1, num_random = 1 (G global, W window, R random)
               kb0 kb1 kb2 kb3 kb4 kb5
        qb0  [  G   G   G   G   G   G ]
        qb1  [  G   W   W   .   R   . ]
        qb2  [  G   W   W   W   .   R ]
        qb3  [  G   R   W   W   W   . ]
        qb4  [  G   .   R   W   W   W ]
        qb5  [  G   .   R   .   W   W ]

    The random blocks are drawn by a CPU ``torch.Generator`` seeded with ``seed``: the same arguments
    give the same mask on every device.

    Args:
        L: sequence length (queries and keys), >= 1.
        window: key blocks visible on each side of the diagonal block, >= 0.
        num_global: leading global blocks, >= 0.
        num_random: random key blocks per query block, >= 0.
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``; block-level patterns assume square
            tiles but any pair works (block indices are compared as they are). Default 128.
        seed: seed of the random blocks. Default 0.
        num_heads: draw ``num_heads`` independent random patterns, layout ``(1, num_heads, nQB, nKB)``. Default 1.
        device: where the mask lives. Default CPU.

    Returns:
        A BlockMask ``(1, num_heads, L, L)`` made of whole tiles.
    """
    L = _check_int(L, "L", 1)
    window = _check_int(window, "window", 0)
    num_global = _check_int(num_global, "num_global", 0)
    num_random = _check_int(num_random, "num_random", 0)
    seed = _check_int(seed, "seed")
    num_heads = _check_int(num_heads, "num_heads", 1)
    bq, bk = _pair(block_size)
    device = _check_device(device)
    nqb, nkb = math.ceil(L / bq), math.ceil(L / bk)
    qb = torch.arange(nqb)[:, None]
    kb = torch.arange(nkb)[None, :]
    visible = ((qb - kb).abs() <= window) | (qb < num_global) | (kb < num_global)  # (nQB, nKB)
    visible = visible.expand(num_heads, nqb, nkb).clone()
    if num_random and nkb:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        scores = torch.rand(num_heads, nqb, nkb, generator=generator)
        scores[visible] = 2.0  # never drawn: already visible
        values, picks = torch.topk(scores, min(num_random, nkb), dim=-1, largest=False)
        drawn = torch.zeros_like(visible)
        drawn.scatter_(-1, picks, values < 2.0)
        visible |= drawn
    return BlockMask.from_layout(visible[None].to(device), block_size=(bq, bk), seq_lens=(L, L))


# ---------------------------------------------------------------------------- document / prefix-LM
def document(
    doc_ids_q: torch.Tensor,
    doc_ids_k: torch.Tensor | None = None,
    causal: bool = False,
    block_size: int | tuple[int, int] = 128,
) -> BlockMask:
    """Packed sequences: a query sees a key iff both belong to the same document.

    ::

        doc_ids = [0, 0, 0, 1, 1, 2], causal = True
            k0 k1 k2 k3 k4 k5
        q0 [ x  .  .  .  .  . ]
        q1 [ x  x  .  .  .  . ]
        q2 [ x  x  x  .  .  . ]
        q3 [ .  .  .  x  .  . ]
        q4 [ .  .  .  x  x  . ]
        q5 [ .  .  .  .  .  x ]

    A negative id marks padding: such a query sees nothing and such a key is seen by nobody.
    Tiles are classified from each block's smallest and largest id, so for sorted ids (packed
    sequences) only tiles that straddle a document boundary are evaluated element-wise; unsorted
    ids are still exact, only slower to build.

    Args:
        doc_ids_q: int ``(Lq,)`` or ``(B, Lq)``: the document of every query.
        doc_ids_k: int ``(Lk,)`` or ``(B, Lk)``, same number of dimensions and batch; default ``doc_ids_q``.
        causal: also require ``j <= i + (Lk - Lq)`` (bottom-right aligned, as :func:`causal`). Default False.
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.

    Returns:
        A BlockMask ``(B or 1, 1, Lq, Lk)`` on the ids' device; partial tiles carry their element masks.
    """
    dq = _check_index_tensor(doc_ids_q, "doc_ids_q", (1, 2))
    dk = dq if doc_ids_k is None else _check_index_tensor(doc_ids_k, "doc_ids_k", (1, 2))
    if dk.dim() != dq.dim() or (dq.dim() == 2 and dk.shape[0] != dq.shape[0]):
        raise ValueError(
            f"doc_ids_k must have doc_ids_q's number of dimensions and batch, got {tuple(dk.shape)} and {tuple(dq.shape)}"
        )
    if dk.device != dq.device:
        raise ValueError(f"doc_ids_k must be on doc_ids_q's device {dq.device}, got {dk.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if dq.dim() == 1:
        dq, dk = dq[None], dk[None]
    B, Lq = dq.shape
    Lk = dk.shape[1]
    if Lq == 0 or Lk == 0:
        raise ValueError(f"document ids must not be empty, got Lq={Lq} and Lk={Lk}")
    block_size = _pair(block_size)
    bq, bk = block_size
    device = dq.device

    def extremes(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = math.ceil(ids.shape[1] / block)
        pad = n * block - ids.shape[1]
        padded = torch.cat([ids, ids[:, -1:].expand(B, pad)], dim=1).view(B, n, block)
        return padded.amin(-1), padded.amax(-1)

    qmin, qmax = (t[:, :, None] for t in extremes(dq, bq))  # (B, nQB, 1)
    kmin, kmax = (t[:, None, :] for t in extremes(dk, bk))  # (B, 1, nKB)
    nonempty = (qmax >= kmin) & (kmax >= qmin) & (qmax >= 0) & (kmax >= 0)
    full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin) & (qmin >= 0)
    if causal:
        win = window_layout((Lq, Lk), block_size, (None, 0), device)[0, 0]
        nonempty &= win != EMPTY
        full &= win == FULL

    def predicate(b, h, i, j):
        same = (dq[b, i] == dk[b, j]) & (dq[b, i] >= 0)
        return same & (j <= i + (Lk - Lq)) if causal else same

    return _evaluate(predicate, _guess(nonempty, full)[:, None], (Lq, Lk), block_size)


def prefix_lm(
    L: int, prefix_len: int | torch.Tensor, block_size: int | tuple[int, int] = 128, *, device=None
) -> BlockMask:
    """Prefix-LM mask: bidirectional over the prefix, causal after it: ``j < prefix_len or j <= i``.

    ::

        L = 6, prefix_len = 3
            k0 k1 k2 k3 k4 k5
        q0 [ x  x  x  .  .  . ]
        q1 [ x  x  x  .  .  . ]
        q2 [ x  x  x  .  .  . ]
        q3 [ x  x  x  x  .  . ]
        q4 [ x  x  x  x  x  . ]
        q5 [ x  x  x  x  x  x ]

    Args:
        L: sequence length (queries and keys), >= 1.
        prefix_len: an int in ``[0, L]``, or an int tensor ``(B,)`` of per-sequence prefix lengths.
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.
        device: where the mask lives; default ``prefix_len``'s device if a tensor, else CPU.

    Returns:
        A BlockMask ``(B or 1, 1, L, L)``; partial tiles carry their element masks.
    """
    L = _check_int(L, "L", 1)
    if isinstance(prefix_len, torch.Tensor):
        device = prefix_len.device if device is None else device
        prefix = _check_index_tensor(prefix_len, "prefix_len", (1,))
    else:
        prefix = torch.tensor([_check_int(prefix_len, "prefix_len")])
    device = _check_device(device)
    prefix = prefix.to(device)
    if prefix.numel() == 0:
        raise ValueError("prefix_len must not be empty")
    if int(prefix.min()) < 0 or int(prefix.max()) > L:
        raise ValueError(f"prefix_len must lie in [0, {L}], got values in [{int(prefix.min())}, {int(prefix.max())}]")
    block_size = _pair(block_size)
    q0, q1, k0, k1 = _tile_grid((L, L), block_size, device)
    p = prefix[:, None, None]  # (B, 1, 1)
    nonempty = (k0 < p) | (k0 <= q1)
    full = (k1 < p) | (k1 <= q0)

    def predicate(b, h, i, j):
        return (j < prefix[b]) | (j <= i)

    guess = _guess(nonempty, full)[:, None]
    bq, bk = block_size

    def tile_key(b, h, qb, kb):
        # Contents depend on where the diagonal and the prefix end cross the tile, clamped to it.
        q0, k0 = qb * bq, kb * bk
        diagonal = (q0 - k0).clamp(min=-bq, max=bk)
        prefix_end = (prefix[b] - k0).clamp(min=0, max=bk)
        return torch.stack([diagonal, prefix_end, *_crop_flags(qb, kb, guess)], dim=1)

    return _evaluate(predicate, guess, (L, L), block_size, tile_key)


# ------------------------------------------------------------------------------- user predicates
def from_function(
    fn: Predicate,
    B: int | None,
    H: int | None,
    Lq: int,
    Lk: int,
    block_size: int | tuple[int, int] = 128,
    device=None,
) -> BlockMask:
    """A BlockMask from a vectorised predicate, like FlexAttention's ``mask_mod``.

    ``fn(b, h, q_idx, kv_idx)`` receives broadcasting int64 tensors (batch, head, query and key
    indices; their shapes are ``(n, 1, 1)``, ``(n, 1, 1)``, ``(n, BLOCK_Q, 1)``, ``(n, 1, BLOCK_K)``
    for ``n`` tiles at a time) and returns a bool tensor broadcastable to ``(n, BLOCK_Q, BLOCK_K)``,
    True = attend. Write it with elementwise operations and indexing, e.g.::

        def sliding_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < 256)

    The predicate is evaluated on every tile, a chunk at a time: time ``O(B * H * Lq * Lk)``, memory
    ``O(tiles + partial tiles * BLOCK_Q * BLOCK_K)``. Prefer a dedicated builder where one exists.

    Args:
        fn: the predicate.
        B: batch size, or None (or 1) for a mask that is the same for every batch (``b`` is then 0).
        H: number of heads, or None (or 1) for a mask shared by the heads (``h`` is then 0).
        Lq: number of queries, >= 1.
        Lk: number of keys, >= 1.
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.
        device: where the index tensors and the mask live. Default CPU.

    Returns:
        A BlockMask ``(B or 1, H or 1, Lq, Lk)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(fn).__name__}")
    B = 1 if B is None else _check_int(B, "B", 1)
    H = 1 if H is None else _check_int(H, "H", 1)
    Lq, Lk = _check_int(Lq, "Lq", 1), _check_int(Lk, "Lk", 1)
    bq, bk = _pair(block_size)
    device = _check_device(device)
    guess = torch.full((B, H, math.ceil(Lq / bq), math.ceil(Lk / bk)), PARTIAL, dtype=torch.int8, device=device)
    return _evaluate(fn, guess, (Lq, Lk), (bq, bk))


# ------------------------------------------------------------------------- attn_mask -> BlockMask
_ATTN_MASK_CACHE: collections.OrderedDict = collections.OrderedDict()
_ATTN_MASK_CACHE_SIZE = 16


def clear_attn_mask_cache() -> None:
    """Forget every BlockMask cached by :func:`block_mask_from_attn_mask`."""
    _ATTN_MASK_CACHE.clear()


def _cache_key(mask: torch.Tensor, block_size: tuple[int, int]):
    """Key of ``mask``'s contents, or None when they cannot be tracked (inference tensors, fake tensors)."""
    if mask.is_inference():
        return None, None
    try:
        base = mask if mask._base is None else mask._base
        key = (
            id(base), mask._version, mask.data_ptr(), mask.storage_offset(), tuple(mask.shape), mask.stride(),
            mask.dtype, str(mask.device), block_size,
        )
    except (RuntimeError, NotImplementedError):
        return None, None
    return key, base


def _classify_attn_mask(mask4: torch.Tensor, block_size: tuple[int, int]) -> BlockMask:
    """Layout and partial tiles of a ``(B, H, Lq, Lk)`` bool or additive mask, a few query blocks at a time."""
    B, H, Lq, Lk = mask4.shape
    bq, bk = block_size
    nqb, nkb = math.ceil(Lq / bq), math.ceil(Lk / bk)
    layout = torch.empty(B, H, nqb, nkb, dtype=torch.int8, device=mask4.device)
    blocks, where = [], []
    rows_per_chunk = max(bq, (_CHUNK_ELEMENTS // max(1, B * H * nkb * bk)) // bq * bq)
    for start in range(0, Lq, rows_per_chunk):
        chunk = mask4[:, :, start:start + rows_per_chunk]
        visible = chunk if chunk.dtype == torch.bool else chunk != float("-inf")
        part = classify_dense(visible, block_size)  # (B, H, nb, nKB)
        qb = start // bq
        layout[:, :, qb:qb + part.shape[2]] = part
        is_partial = part == PARTIAL
        if bool(is_partial.any()):
            n_rows, nb = visible.shape[2], part.shape[2]
            padded = torch.zeros(B, H, nb * bq, nkb * bk, dtype=torch.bool, device=mask4.device)
            padded[:, :, :n_rows, :Lk] = visible
            tiles = padded.view(B, H, nb, bq, nkb, bk).permute(0, 1, 2, 4, 3, 5)
            blocks.append(tiles[is_partial])
            index = is_partial.nonzero()
            index[:, 2] += qb
            where.append(index)
    if blocks:
        index = torch.cat(where)
        b, h, qb, kb = index.unbind(1)
        order = torch.argsort(((b * H + h) * nqb + qb) * nkb + kb)  # row-major, as layout.nonzero()
        partial_masks = torch.cat(blocks)[order]
    else:
        partial_masks = None
    return BlockMask(layout=layout, seq_lens=(Lq, Lk), block_size=block_size, partial_masks=partial_masks)


def _classify_repeated(mask4: torch.Tensor, block_size: tuple[int, int], dim: int) -> BlockMask:
    """A mask whose every row (``dim=2``) or column (``dim=3``) is the same, as a key padding mask
    ``(B, 1, 1, Lk)`` expanded to ``(B, H, Lq, Lk)``: classified from one row/column in ``O(Lk)``,
    every tile of a column/row sharing one block."""
    B, H, Lq, Lk = mask4.shape
    bq, bk = block_size
    nqb, nkb = math.ceil(Lq / bq), math.ceil(Lk / bk)
    if dim == 2:
        line = _classify_attn_mask(mask4[:, :, :1], (1, bk))  # layout (B, H, 1, nKB)
    else:
        line = _classify_attn_mask(mask4[:, :, :, :1], (bq, 1))  # layout (B, H, nQB, 1)
    layout = line.layout.expand(B, H, nqb, nkb).contiguous()
    if line.partial_masks is None:
        return BlockMask(layout=layout, seq_lens=(Lq, Lk), block_size=block_size)
    partial_masks = line.partial_masks.expand(-1, bq, bk).contiguous()
    ids = line.partial_tile_ids.expand(B, H, nqb, nkb).contiguous()
    return BlockMask(layout=layout, seq_lens=(Lq, Lk), block_size=block_size, partial_masks=partial_masks,
                     partial_tile_ids=ids)


def block_mask_from_attn_mask(mask: torch.Tensor, block_size: int | tuple[int, int] = 128) -> BlockMask:
    """Derive a BlockMask from an ``attn_mask``: tiles entirely masked out are empty, entirely visible
    full, the others partial with the mask's elements as their element mask.

    Dimensions the mask broadcasts over (size 1, or stride 0 as after ``expand``) stay size 1 in the
    layout; a mask repeated along the queries (a key padding mask ``(B, 1, 1, Lk)``, expanded) or the
    keys is read once per row, in ``O(B * Lk)``. The result is cached: passing the same tensor again (the same storage, shape, strides and
    version counter, the base tensor still alive) returns the same BlockMask without reading the mask;
    an in-place change bumps the version counter and the mask is read again. Changes that bypass the
    version counter (writes through ``.data`` or from outside PyTorch) are not seen: call
    :func:`clear_attn_mask_cache` after those.

    ::

        attn_mask (bool, x = attend), block_size 2        tiles
            k0 k1 k2 k3                                         kb0 kb1
        q0 [ x  x  .  . ]                                  qb0 [ F   .  ]
        q1 [ x  x  .  . ]                                  qb1 [ P   P  ]
        q2 [ x  .  .  x ]
        q3 [ x  x  .  . ]

    Args:
        mask: bool (True = attend) or float additive (``-inf`` = masked), ``(Lq, Lk)``, ``(H, Lq, Lk)``
            or ``(B, H, Lq, Lk)`` (size-1 dimensions broadcast).
        block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.

    Returns:
        A BlockMask ``(B or 1, H or 1, Lq, Lk)`` holding no reference to ``mask``. Its element mask says
        only where the mask is ``-inf``: pass an additive mask's values as ``attn_mask`` as well.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = attend) or a floating additive mask, got dtype {mask.dtype}")
    block_size = _pair(block_size)
    mask4 = _as_4d(mask.detach(), "mask")
    key, base = _cache_key(mask, block_size)
    if key is not None:
        entry = _ATTN_MASK_CACHE.get(key)
        if entry is not None and entry[0]() is base:
            _ATTN_MASK_CACHE.move_to_end(key)
            return entry[1]
    # Broadcast dimensions (stride 0 after expand) are classified once.
    index = tuple(slice(0, 1) if mask4.stride(d) == 0 else slice(None) for d in range(2))
    mask4 = mask4[index]
    if mask4.shape[2] > 1 and mask4.stride(2) == 0:  # the same row for every query: key padding
        block_mask = _classify_repeated(mask4, block_size, dim=2)
    elif mask4.shape[3] > 1 and mask4.stride(3) == 0:  # the same column for every key: query padding
        block_mask = _classify_repeated(mask4, block_size, dim=3)
    else:
        block_mask = _classify_attn_mask(mask4, block_size)
    if key is not None:
        ref = weakref.ref(base, lambda _ref, key=key: _ATTN_MASK_CACHE.pop(key, None))
        _ATTN_MASK_CACHE[key] = (ref, block_mask)
        while len(_ATTN_MASK_CACHE) > _ATTN_MASK_CACHE_SIZE:
            _ATTN_MASK_CACHE.popitem(last=False)
    return block_mask
