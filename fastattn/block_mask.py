"""Block-sparse attention masks.

A :class:`BlockMask` splits the ``(Lq, Lk)`` score matrix into tiles of
``block_size = (BLOCK_Q, BLOCK_K)`` and records, per batch and head, which tiles are

* **empty**   -- every element is masked: kernels never load the tile,
* **full**    -- every element is visible: kernels apply no element-wise mask,
* **partial** -- some elements are visible: kernels apply the element mask.

::

    key blocks ->     0   1   2   3
    query block 0   [ F   .   .   . ]      F = full, P = partial, . = empty
    query block 1   [ F   P   .   . ]      (a causal mask with BLOCK_Q == BLOCK_K,
    query block 2   [ F   F   P   . ]       diagonal tiles partial)
    query block 3   [ F   F   F   P ]

The tile lists are stored CSR-like, as FlexAttention does: for every query block the
number of partial key blocks and their indices (``kv_num_blocks``, ``kv_indices``),
and the same for full ones (``full_kv_num_blocks``, ``full_kv_indices``). The
transposed lists (for every key block, the query blocks that see it) drive the
backward pass (``q_num_blocks``, ``q_indices``, ``full_q_num_blocks``,
``full_q_indices``). Counts have shape ``(B, H, n_blocks)`` and indices
``(B, H, n_blocks, n_other_blocks)`` (int32; only the first ``count`` entries of each
row are meaningful, in increasing order). ``B`` and ``H`` may be 1 to broadcast.

The element mask of partial tiles comes from exactly one of three sources:

* ``element_mask``: a dense bool tensor broadcastable to ``(B, H, Lq, Lk)`` (True = attend);
* ``window=(left, right)``: query ``i`` sees key ``j`` iff
  ``i + (Lk - Lq) - left <= j <= i + (Lk - Lq) + right`` (``None`` = unbounded), the
  window rule of :func:`fastattn.attention`; nothing of size ``Lq * Lk`` is stored;
* ``partial_masks``: bool ``(num_blocks, BLOCK_Q, BLOCK_K)`` and ``partial_tile_ids``, int32
  ``(B, H, nQB, nKB)``: partial tile ``(b, h, qb, kb)`` has the element mask
  ``partial_masks[partial_tile_ids[b, h, qb, kb]]`` (-1 on other tiles). Tiles with the same
  contents may share a block (the builders share the blocks of periodic patterns), so memory is
  at most proportional to the number of partial tiles. Without ``partial_tile_ids`` there is one
  block per partial tile, in the row-major order of ``(layout == PARTIAL).nonzero()``.

Whatever the source, :attr:`BlockMask.element_mask` returns the dense mask (materialised
on first use; None without partial tiles) and :meth:`BlockMask.to_dense` the whole mask.
Invariant: the element mask is True on every full tile (builders guarantee it), so applying it
everywhere is harmless. BlockMasks combine with ``&`` (intersection) and ``|`` (union).
"""

from __future__ import annotations

import math

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2

# Tiles classified per chunk in from_dense, so temporaries stay near this many elements.
_CHUNK_ELEMENTS = 1 << 22


class _cached_property:
    """``functools.cached_property`` without its lock: Python < 3.12 takes an RLock there, which
    ``torch.compile(fullgraph=True)`` cannot trace (a BlockMask first used inside a compiled function)."""

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = self.fn(obj)
        obj.__dict__[self.name] = value  # an instance attribute shadows this non-data descriptor from now on
        return value


def _pair(block_size: int | tuple[int, int], name: str = "block_size") -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)
    ):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def _check_seq_lens(seq_lens) -> tuple[int, int]:
    if (
        not isinstance(seq_lens, (tuple, list))
        or len(seq_lens) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seq_lens)
    ):
        raise ValueError(f"seq_lens must be a pair (Lq, Lk) of non-negative ints, got {seq_lens!r}")
    return int(seq_lens[0]), int(seq_lens[1])


def _check_window(window) -> tuple[int | None, int | None]:
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right) of ints or None (unbounded), got {window!r}")
    for side, w in zip(("left", "right"), window):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int)):
            raise TypeError(f"window {side} must be an int or None (unbounded), got {w!r}")
        if w is not None and w < 0:
            raise ValueError(f"window {side} must be >= 0 or None (unbounded), got {w}")
    return window[0], window[1]


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() > 4 or t.dim() < 2:
        raise ValueError(f"{name} must have 2 to 4 dimensions (..., rows, cols), got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _sorted_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a bool tensor (..., n, m): the count of True per row and their column indices, in order.

    Entries past a row's count hold their own column index (any valid index would do). Linear in the
    number of tiles: each selected column is scattered to its rank in the row, no sort.
    """
    counts = selected.sum(-1, dtype=torch.int32)
    m = selected.shape[-1]
    columns = torch.arange(m, device=selected.device, dtype=torch.int32).expand(selected.shape)
    rank = torch.cumsum(selected, dim=-1, dtype=torch.int32) - 1
    # One spare slot at position m takes every unselected column's write, then is cut off.
    indices = torch.arange(m + 1, device=selected.device, dtype=torch.int32).expand(*selected.shape[:-1], m + 1).clone()
    target = torch.where(selected, rank, m).long()
    indices.scatter_(-1, target, columns)
    return counts, indices[..., :m].contiguous()


def block_extents(length: int, block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last (inclusive) index of every block of ``block`` elements in ``range(length)``.

    Returns two int64 tensors ``(ceil(length / block),)``; the last block is cropped to ``length``.
    """
    first = torch.arange(0, length, block, device=device, dtype=torch.int64)
    return first, torch.clamp(first + block - 1, max=length - 1)


def window_layout(
    seq_lens: tuple[int, int], block_size: tuple[int, int], window: tuple[int | None, int | None], device=None
) -> torch.Tensor:
    """The int8 ``(1, 1, nQB, nKB)`` layout of a window mask, computed per tile without any ``Lq * Lk`` tensor.

    With ``offset = Lk - Lq`` a tile of rows ``[q0, q1]`` and columns ``[k0, k1]`` is full when its corners
    lie inside the window (``k0 >= q1 + offset - left`` and ``k1 <= q0 + offset + right``), and empty when the
    union of its rows' intervals, ``[q0 + offset - left, q1 + offset + right]``, misses ``[k0, k1]``.
    """
    (Lq, Lk), (bq, bk) = seq_lens, block_size
    left, right = window
    offset = Lk - Lq
    q0, q1 = (t[:, None] for t in block_extents(Lq, bq, device))
    k0, k1 = (t[None, :] for t in block_extents(Lk, bk, device))
    nonempty = torch.ones(q0.shape[0], k0.shape[1], dtype=torch.bool, device=device)
    full = nonempty.clone()
    if left is not None:
        nonempty &= k1 >= q0 + offset - left
        full &= k0 >= q1 + offset - left
    if right is not None:
        nonempty &= k0 <= q1 + offset + right
        full &= k1 <= q0 + offset + right
    layout = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)
    return layout[None, None]


def window_visible(
    rows: torch.Tensor, cols: torch.Tensor, seq_lens: tuple[int, int], window: tuple[int | None, int | None]
) -> torch.Tensor:
    """Whether query ``rows`` sees key ``cols`` (broadcasting int tensors) under ``window``, offset ``Lk - Lq``."""
    Lq, Lk = seq_lens
    left, right = window
    diag = rows + (Lk - Lq)
    if left is None and right is None:
        return torch.ones(torch.broadcast_shapes(rows.shape, cols.shape), dtype=torch.bool, device=rows.device)
    if left is None:
        return cols <= diag + right
    if right is None:
        return cols >= diag - left
    return (cols >= diag - left) & (cols <= diag + right)


def classify_dense(mask4: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """The int8 layout ``(B, H, nQB, nKB)`` of a bool mask ``(B, H, Lq, Lk)``, a few query blocks at a time.

    Only elements inside the sequences count: a cropped last tile is full when all its in-range
    elements are visible.
    """
    B, H, Lq, Lk = mask4.shape
    bq, bk = block_size
    nqb, nkb = math.ceil(Lq / bq), math.ceil(Lk / bk)
    layout = torch.empty(B, H, nqb, nkb, dtype=torch.int8, device=mask4.device)
    _, k_last = block_extents(Lk, bk, mask4.device)
    cols = (k_last - torch.arange(0, Lk, bk, device=mask4.device) + 1)
    rows_per_chunk = max(bq, (_CHUNK_ELEMENTS // max(1, B * H * nkb * bk)) // bq * bq)
    for start in range(0, Lq, rows_per_chunk):
        stop = min(Lq, start + rows_per_chunk)
        chunk = mask4[:, :, start:stop]
        n_rows = stop - start
        nblocks = math.ceil(n_rows / bq)
        padded = torch.zeros(B, H, nblocks * bq, nkb * bk, dtype=torch.int32, device=mask4.device)
        padded[:, :, :n_rows, :Lk] = chunk
        visible = padded.view(B, H, nblocks, bq, nkb, bk).sum(dim=(3, 5))
        rows = torch.full((nblocks,), bq, device=mask4.device)
        rows[-1] = n_rows - (nblocks - 1) * bq
        capacity = rows[:, None] * cols[None, :]
        qb = start // bq
        layout[:, :, qb:qb + nblocks] = torch.where(
            visible == capacity, FULL, torch.where(visible == 0, EMPTY, PARTIAL)
        ).to(torch.int8)
    return layout


class BlockMask:
    """Which tiles of the attention matrix are empty, partial or full. See the module docstring.

    Build one with :meth:`from_dense`, :meth:`from_layout` or a builder of :mod:`fastattn.masks`;
    pass it as ``fastattn.attention(..., block_mask=mask)``.

    Args:
        layout: int8 ``(B, H, nQB, nKB)`` of EMPTY / PARTIAL / FULL; ``B`` and ``H`` may be 1 to broadcast.
        seq_lens: ``(Lq, Lk)``; ``nQB = ceil(Lq / BLOCK_Q)`` and ``nKB = ceil(Lk / BLOCK_K)``.
        block_size: ``(BLOCK_Q, BLOCK_K)`` (or an int for both).
        element_mask: bool, broadcastable to ``(B, H, Lq, Lk)``, True = attend: the dense element mask.
        window: ``(left, right)``, ints >= 0 or None (unbounded): the element mask is this window
            (bottom-right aligned, as :func:`fastattn.attention`'s ``window``).
        partial_masks: bool ``(num_blocks, BLOCK_Q, BLOCK_K)``: element masks of partial tiles; rows/columns
            past the sequence ends are ignored.
        partial_tile_ids: int32 ``(B, H, nQB, nKB)`` (with ``partial_masks`` only): the row of
            ``partial_masks`` of each partial tile, -1 elsewhere. Default: one block per partial tile, in
            the order of ``(layout == PARTIAL).nonzero()``.

    At most one of ``element_mask``, ``window`` and ``partial_masks`` may be given, and one is required
    when the layout has partial tiles.
    """

    def __init__(
        self,
        layout: torch.Tensor,
        seq_lens: tuple[int, int],
        block_size: int | tuple[int, int],
        element_mask: torch.Tensor | None = None,
        *,
        window: tuple[int | None, int | None] | None = None,
        partial_masks: torch.Tensor | None = None,
        partial_tile_ids: torch.Tensor | None = None,
    ):
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"layout must be a torch.Tensor, got {type(layout).__name__}")
        if layout.dtype != torch.int8:
            raise TypeError(f"layout must be an int8 tensor of EMPTY / PARTIAL / FULL codes, got dtype {layout.dtype}")
        if layout.dim() != 4:
            raise ValueError(f"layout must be 4-D (B, H, nQB, nKB), got shape {tuple(layout.shape)}")
        if layout.device.type == "meta":
            raise ValueError("a BlockMask needs a real device: its tile lists are computed from values, got meta")
        if layout.numel() and (int(layout.min()) < EMPTY or int(layout.max()) > FULL):
            raise ValueError(f"layout codes must be EMPTY ({EMPTY}), PARTIAL ({PARTIAL}) or FULL ({FULL})")
        Lq, Lk = _check_seq_lens(seq_lens)
        bq, bk = _pair(block_size)
        expected = (math.ceil(Lq / bq), math.ceil(Lk / bk))
        if tuple(layout.shape[2:]) != expected:
            raise ValueError(
                f"layout has {tuple(layout.shape[2:])} tiles, expected {expected} for seq_lens={(Lq, Lk)} "
                f"and block_size={(bq, bk)}"
            )
        given = [name for name, x in (("element_mask", element_mask), ("window", window), ("partial_masks", partial_masks)) if x is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of element_mask, window and partial_masks, got {', '.join(given)}")
        if element_mask is not None:
            if not isinstance(element_mask, torch.Tensor):
                raise TypeError(f"element_mask must be a torch.Tensor, got {type(element_mask).__name__}")
            if element_mask.dtype != torch.bool:
                raise TypeError(f"element_mask must be a bool tensor (True = attend), got dtype {element_mask.dtype}")
            target = (*layout.shape[:2], Lq, Lk)
            if element_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(element_mask.shape[::-1], target[::-1])) or (
                element_mask.dim() >= 2 and tuple(element_mask.shape[-2:]) != (Lq, Lk)
            ):
                raise ValueError(
                    f"element_mask of shape {tuple(element_mask.shape)} is not broadcastable to (B, H, Lq, Lk) = {target}"
                )
            if element_mask.device != layout.device:
                raise ValueError(f"element_mask must be on layout's device {layout.device}, got {element_mask.device}")
        if window is not None:
            window = _check_window(window)
        num_partial = int((layout == PARTIAL).sum())
        if partial_masks is not None:
            if not isinstance(partial_masks, torch.Tensor):
                raise TypeError(f"partial_masks must be a torch.Tensor, got {type(partial_masks).__name__}")
            if partial_masks.dtype != torch.bool:
                raise TypeError(f"partial_masks must be a bool tensor (True = attend), got dtype {partial_masks.dtype}")
            if partial_masks.device != layout.device:
                raise ValueError(f"partial_masks must be on layout's device {layout.device}, got {partial_masks.device}")
            if partial_tile_ids is None and tuple(partial_masks.shape) != (num_partial, bq, bk):
                raise ValueError(
                    f"partial_masks must have shape (num_partial, BLOCK_Q, BLOCK_K) = {(num_partial, bq, bk)}, "
                    f"got {tuple(partial_masks.shape)}"
                )
            if partial_tile_ids is not None:
                if partial_masks.dim() != 3 or tuple(partial_masks.shape[1:]) != (bq, bk):
                    raise ValueError(
                        f"partial_masks must have shape (num_blocks, BLOCK_Q, BLOCK_K) = (n, {bq}, {bk}), "
                        f"got {tuple(partial_masks.shape)}"
                    )
                self._check_tile_ids(partial_tile_ids, layout, partial_masks.shape[0])
        elif partial_tile_ids is not None:
            raise ValueError("partial_tile_ids needs partial_masks")
        if num_partial and not given:
            raise ValueError("a BlockMask with partial tiles needs element_mask, window or partial_masks")
        self._layout = layout
        self._seq_lens = (Lq, Lk)
        self._block_size = (bq, bk)
        self._dense_element_mask = element_mask
        self._window = window
        self._partial_masks = partial_masks
        self._num_partial = num_partial
        if partial_tile_ids is not None:
            self.__dict__["partial_tile_ids"] = partial_tile_ids  # fills the cached property

    @staticmethod
    def _check_tile_ids(ids, layout: torch.Tensor, num_blocks: int) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"partial_tile_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype != torch.int32:
            raise TypeError(f"partial_tile_ids must be an int32 tensor, got dtype {ids.dtype}")
        if ids.shape != layout.shape or ids.device != layout.device:
            raise ValueError(
                f"partial_tile_ids must have layout's shape {tuple(layout.shape)} and device {layout.device}, "
                f"got {tuple(ids.shape)} on {ids.device}"
            )
        on_partial = ids[layout == PARTIAL]
        if on_partial.numel() and (int(on_partial.min()) < 0 or int(on_partial.max()) >= num_blocks):
            raise ValueError(f"partial_tile_ids must lie in [0, {num_blocks}) on partial tiles (rows of partial_masks)")
        if bool((ids[layout != PARTIAL] != -1).any()):
            raise ValueError("partial_tile_ids must be -1 on tiles that are not partial")

    # ------------------------------------------------------------------ stored fields (read-only)
    @property
    def layout(self) -> torch.Tensor:
        """int8 ``(B, H, nQB, nKB)``: EMPTY / PARTIAL / FULL per tile."""
        return self._layout

    @property
    def seq_lens(self) -> tuple[int, int]:
        """``(Lq, Lk)``."""
        return self._seq_lens

    @property
    def block_size(self) -> tuple[int, int]:
        """``(BLOCK_Q, BLOCK_K)``."""
        return self._block_size

    @property
    def window(self) -> tuple[int | None, int | None] | None:
        """``(left, right)`` when the element mask of partial tiles is a window, else None."""
        return self._window

    @property
    def partial_masks(self) -> torch.Tensor | None:
        """bool ``(num_blocks, BLOCK_Q, BLOCK_K)`` when the element mask is stored per partial tile (rows
        indexed by :attr:`partial_tile_ids`), else None."""
        return self._partial_masks

    @_cached_property
    def element_mask(self) -> torch.Tensor | None:
        """The dense element mask, bool broadcastable to ``(B, H, Lq, Lk)``; None when no tile is partial
        and none was given. A window or per-tile mask is materialised here, on first use only."""
        if self._dense_element_mask is not None:
            return self._dense_element_mask
        if self._num_partial == 0:
            return None  # nothing to mask: a window or per-tile source only matters on partial tiles
        if self._window is not None:
            Lq, Lk = self.seq_lens
            rows = torch.arange(Lq, device=self.device)[:, None]
            cols = torch.arange(Lk, device=self.device)[None, :]
            return window_visible(rows, cols, self.seq_lens, self._window)[None, None]
        if self._partial_masks is not None:
            return self.to_dense()  # full tiles are True, as the element mask must be there
        return None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_size: int | tuple[int, int] = 128) -> BlockMask:
        """Classify the tiles of a dense bool mask.

        Args:
            mask: bool ``(Lq, Lk)``, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)``; True = attend.
                Kept (not copied) as the element mask of partial tiles.
            block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``. Default 128.
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}")
        bq, bk = _pair(block_size)
        mask4 = _as_4d(mask, "mask")
        B, H, Lq, Lk = mask4.shape
        layout = classify_dense(mask4, (bq, bk))
        element_mask = mask4 if bool((layout == PARTIAL).any()) else None
        return cls(layout=layout, seq_lens=(Lq, Lk), block_size=(bq, bk), element_mask=element_mask)

    @classmethod
    def from_layout(
        cls,
        layout: torch.Tensor,
        block_size: int | tuple[int, int],
        seq_lens: tuple[int, int] | None = None,
    ) -> BlockMask:
        """A mask made of whole tiles.

        Args:
            layout: bool ``(nQB, nKB)``, ``(H, nQB, nKB)`` or ``(B, H, nQB, nKB)``; True = the tile is visible.
            block_size: tile size, an int or ``(BLOCK_Q, BLOCK_K)``.
            seq_lens: ``(Lq, Lk)``; default ``(nQB * BLOCK_Q, nKB * BLOCK_K)``. Shorter lengths crop the
                last tiles (kernels mask the sequence ends anyway, so those tiles stay full).
        """
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"layout must be a torch.Tensor, got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"layout must be a bool tensor (True = visible tile), got dtype {layout.dtype}")
        bq, bk = _pair(block_size)
        layout4 = _as_4d(layout, "layout")
        nqb, nkb = layout4.shape[2:]
        if seq_lens is None:
            seq_lens = (nqb * bq, nkb * bk)
        Lq, Lk = _check_seq_lens(seq_lens)
        if not (math.ceil(Lq / bq) == nqb and math.ceil(Lk / bk) == nkb):
            raise ValueError(
                f"seq_lens={tuple(seq_lens)} does not fit layout of {nqb}x{nkb} tiles of block_size={(bq, bk)}"
            )
        codes = torch.where(layout4, FULL, EMPTY).to(torch.int8)
        return cls(layout=codes, seq_lens=(Lq, Lk), block_size=(bq, bk))

    # ------------------------------------------------------------------ derived views
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Lq, Lk)``, with 1 where the mask broadcasts."""
        return (self.layout.shape[0], self.layout.shape[1], *self.seq_lens)

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def num_blocks(self) -> tuple[int, int]:
        return tuple(self.layout.shape[2:])

    @property
    def num_partial(self) -> int:
        """Number of partial tiles (over every batch and head of the layout)."""
        return self._num_partial

    @property
    def density(self) -> float:
        """Fraction of tiles that are not empty (what the kernels visit)."""
        return float((self.layout != EMPTY).float().mean()) if self.layout.numel() else 0.0

    @_cached_property
    def kv_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward lists ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)``."""
        return (*_sorted_lists(self.layout == PARTIAL), *_sorted_lists(self.layout == FULL))

    @_cached_property
    def q_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transposed lists ``(q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)`` for the backward."""
        t = self.layout.transpose(-1, -2)
        return (*_sorted_lists(t == PARTIAL), *_sorted_lists(t == FULL))

    @_cached_property
    def all_partial_lists(self) -> tuple[torch.Tensor, ...]:
        """The eight forward and transposed lists with every non-empty tile listed as partial (none full):
        for a call that also has an ``attn_mask``, which must apply on every tile the kernels visit."""
        visible = self.layout != EMPTY
        none = torch.zeros_like(visible)
        t = visible.transpose(-1, -2)
        return (*_sorted_lists(visible), *_sorted_lists(none), *_sorted_lists(t), *_sorted_lists(none.transpose(-1, -2)))

    @_cached_property
    def partial_tile_ids(self) -> torch.Tensor:
        """int32 ``(B, H, nQB, nKB)``: for a partial tile its row in :attr:`partial_masks`, -1 elsewhere."""
        ids = torch.full(self.layout.shape, -1, dtype=torch.int32, device=self.device)
        ids[self.layout == PARTIAL] = torch.arange(self._num_partial, dtype=torch.int32, device=self.device)
        return ids

    def _scatter_tiles(self) -> torch.Tensor:
        """Dense ``(B, H, Lq, Lk)``: full tiles True, partial tiles from ``partial_masks``, empty tiles False."""
        B, H, nqb, nkb = self.layout.shape
        (Lq, Lk), (bq, bk) = self.seq_lens, self.block_size
        tiles = (self.layout == FULL)[..., None, None].expand(B, H, nqb, nkb, bq, bk).clone()
        partial = self.layout == PARTIAL
        tiles[partial] = self._partial_masks[self.partial_tile_ids[partial].long()]
        return tiles.permute(0, 1, 2, 4, 3, 5).reshape(B, H, nqb * bq, nkb * bk)[:, :, :Lq, :Lk]

    def tile_masks(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Whether query ``q_idx`` sees key ``kv_idx`` in batch ``b``, head ``h``, as a mask predicate.

        Args:
            b, h: int64 ``(n, 1, 1)``: batch and head of ``n`` tiles (taken modulo a broadcast layout).
            q_idx: int64 ``(n, BLOCK_Q, 1)``: query indices, all inside one query block per tile.
            kv_idx: int64 ``(n, 1, BLOCK_K)``: key indices, all inside one key block per tile.

        Returns:
            bool ``(n, BLOCK_Q, BLOCK_K)``, read from the layout and the element-mask source of each tile
            (no ``Lq * Lk`` tensor is built unless the source is a dense ``element_mask``).
        """
        (bq, bk), (B, H) = self.block_size, self.layout.shape[:2]
        b = b if B > 1 else torch.zeros_like(b)
        h = h if H > 1 else torch.zeros_like(h)
        qb, kb = q_idx[:, :1, :] // bq, kv_idx[:, :, :1] // bk  # (n, 1, 1)
        code = self.layout[b, h, qb, kb]  # (n, 1, 1)
        shape = (q_idx.shape[0], q_idx.shape[1], kv_idx.shape[2])
        visible = (code == FULL).expand(shape)
        if self._num_partial == 0:
            return visible
        if self._window is not None:
            element = window_visible(q_idx, kv_idx, self.seq_lens, self._window)
        elif self._partial_masks is not None:
            ids = self.partial_tile_ids[b, h, qb, kb].long().clamp(min=0)  # (n, 1, 1); -1 outside partial tiles
            element = self._partial_masks[ids, q_idx - qb * bq, kv_idx - kb * bk]
        else:
            em = self._dense_element_mask
            em = em.reshape((1,) * (4 - em.dim()) + tuple(em.shape))
            eb = b if em.shape[0] > 1 else torch.zeros_like(b)
            eh = h if em.shape[1] > 1 else torch.zeros_like(h)
            rows = q_idx if em.shape[2] > 1 else torch.zeros_like(q_idx)
            cols = kv_idx if em.shape[3] > 1 else torch.zeros_like(kv_idx)
            element = em[eb, eh, rows, cols]
        return visible | ((code == PARTIAL) & element)

    def _combine(self, other: BlockMask, op: str) -> BlockMask:
        if not isinstance(other, BlockMask):
            return NotImplemented
        if other.seq_lens != self.seq_lens or other.block_size != self.block_size:
            raise ValueError(
                f"cannot combine BlockMasks of seq_lens {self.seq_lens} / {other.seq_lens} and block_size "
                f"{self.block_size} / {other.block_size}: they must be equal"
            )
        if other.device != self.device:
            raise ValueError(f"cannot combine BlockMasks on {self.device} and {other.device}")
        try:
            batch_heads = torch.broadcast_shapes(self.layout.shape[:2], other.layout.shape[:2])
        except RuntimeError as error:
            raise ValueError(
                f"cannot combine BlockMasks of (B, H) {tuple(self.layout.shape[:2])} and {tuple(other.layout.shape[:2])}"
            ) from error
        if op == "and" and self._window is not None and other._window is not None:
            # Two windows intersect into a window: the result stays free of per-tile blocks.
            window = tuple(b if a is None else a if b is None else min(a, b) for a, b in zip(self._window, other._window))
            layout = window_layout(self.seq_lens, self.block_size, window, self.device)
            return BlockMask(layout=layout.expand(*batch_heads, -1, -1).contiguous(), seq_lens=self.seq_lens,
                             block_size=self.block_size, window=window)
        a = self.layout.expand(*batch_heads, -1, -1)
        b = other.layout.expand(*batch_heads, -1, -1)
        if op == "and":
            guess = torch.where((a == EMPTY) | (b == EMPTY), EMPTY, torch.where((a == FULL) & (b == FULL), FULL, PARTIAL))

            def predicate(bi, hi, qi, ki):
                return self.tile_masks(bi, hi, qi, ki) & other.tile_masks(bi, hi, qi, ki)
        else:
            guess = torch.where((a == FULL) | (b == FULL), FULL, torch.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL))

            def predicate(bi, hi, qi, ki):
                return self.tile_masks(bi, hi, qi, ki) | other.tile_masks(bi, hi, qi, ki)

        from .masks import _evaluate  # the builders' tile-wise evaluation; masks imports this module

        return _evaluate(predicate, guess.to(torch.int8), self.seq_lens, self.block_size)

    def __and__(self, other: BlockMask) -> BlockMask:
        """The intersection: visible where both masks are. Tiles empty in either stay empty, so the
        predicate is evaluated only on tiles that are non-empty in both and not full in both."""
        return self._combine(other, "and")

    def __or__(self, other: BlockMask) -> BlockMask:
        """The union: visible where either mask is."""
        return self._combine(other, "or")

    def to_dense(self) -> torch.Tensor:
        """The bool mask ``(B, H, Lq, Lk)`` (True = attend) this BlockMask stands for."""
        if self._partial_masks is not None:
            return self._scatter_tiles()
        Lq, Lk = self.seq_lens
        bq, bk = self.block_size
        tiles = self.layout.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)[:, :, :Lq, :Lk]
        dense = tiles == FULL
        element_mask = self.element_mask
        if element_mask is not None:
            dense = dense | ((tiles == PARTIAL) & element_mask)
        return dense

    def to(self, device: torch.device | str) -> BlockMask:
        """A copy on ``device`` (the tile lists are recomputed there on first use)."""
        moved = BlockMask.__new__(BlockMask)
        moved._layout = self._layout.to(device)
        moved._seq_lens, moved._block_size, moved._window = self._seq_lens, self._block_size, self._window
        moved._num_partial = self._num_partial
        moved._dense_element_mask = None if self._dense_element_mask is None else self._dense_element_mask.to(device)
        moved._partial_masks = None if self._partial_masks is None else self._partial_masks.to(device)
        if self._partial_masks is not None:
            moved.__dict__["partial_tile_ids"] = self.partial_tile_ids.to(device)
        return moved

    def plot(self, path=None, b: int = 0, h: int = 0, show_elements: bool | None = None):
        """Draw the tile layout of batch ``b``, head ``h`` (and the element mask) with matplotlib.

        Args:
            path: where to save the image (format from the suffix, e.g. ``.png``); None = only return the figure.
            b: batch index into the layout (0 when the layout broadcasts over batches).
            h: head index into the layout (0 when the layout broadcasts over heads).
            show_elements: also draw the element-level mask; default: when ``Lq * Lk <= 2**22``.

        Returns:
            The ``matplotlib.figure.Figure``.
        """
        try:
            from matplotlib.colors import ListedColormap
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError as error:
            raise ImportError("BlockMask.plot needs matplotlib: pip install matplotlib") from error
        B, H = self.layout.shape[:2]
        for name, index, size in (("b", b, B), ("h", h, H)):
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"{name} must be an int, got {type(index).__name__}")
            if not (0 <= index < size):
                raise ValueError(f"{name} must lie in [0, {size}) for this layout, got {index}")
        Lq, Lk = self.seq_lens
        if show_elements is None:
            show_elements = Lq * Lk <= 1 << 22
        panels = 2 if show_elements else 1
        figure = Figure(figsize=(5 * panels, 5))
        axes = figure.subplots(1, panels, squeeze=False)[0]
        colours = ListedColormap(["white", "orange", "tab:blue"])
        axes[0].imshow(self.layout[b, h].cpu().numpy(), cmap=colours, vmin=EMPTY, vmax=FULL, interpolation="nearest")
        counts = {name: int((self.layout[b, h] == code).sum()) for name, code in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
        axes[0].set_title(f"tiles {self.block_size}: full {counts['full']}, partial {counts['partial']}, empty {counts['empty']}")
        axes[0].set_xlabel("key block (blue full, orange partial, white empty)")
        axes[0].set_ylabel("query block")
        axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
        if show_elements:
            dense = self.to_dense()[b, h].cpu().numpy()
            axes[1].imshow(dense, cmap=ListedColormap(["white", "black"]), vmin=0, vmax=1, interpolation="nearest")
            axes[1].set_title(f"element mask (density {dense.mean():.3f})")
            axes[1].set_xlabel("key")
            axes[1].set_ylabel("query")
        if path is not None:
            figure.savefig(path, bbox_inches="tight")
        return figure

    def __repr__(self) -> str:
        counts = {name: int((self.layout == code).sum()) for name, code in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
        source = "window" if self._window is not None else "partial_masks" if self._partial_masks is not None else (
            "element_mask" if self._dense_element_mask is not None else "none"
        )
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, tiles={counts}, "
            f"density={self.density:.3f}, element_mask_source={source})"
        )


def layout_from_kv_lists(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    num_key_blocks: int,
) -> torch.Tensor:
    """Rebuild the ``(B, H, nQB, nKB)`` int8 layout from the forward lists (inverse of ``kv_lists``)."""
    B, H, nqb = kv_num_blocks.shape
    layout = torch.full((B, H, nqb, num_key_blocks), EMPTY, dtype=torch.int8, device=kv_num_blocks.device)
    for num, idx, code in ((kv_num_blocks, kv_indices, PARTIAL), (full_kv_num_blocks, full_kv_indices, FULL)):
        valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
        # scatter_add, not scatter: padding entries may repeat a valid column index.
        hits = torch.zeros(layout.shape, dtype=torch.int32, device=layout.device)
        hits.scatter_add_(-1, idx.long(), valid.to(torch.int32))
        layout[hits > 0] = code
    return layout
