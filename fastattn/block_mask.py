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

The element mask of partial tiles is ``element_mask``: a bool tensor broadcastable to
``(B, H, Lq, Lk)`` (True = attend), or ``None`` when every non-empty tile is full.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


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


def _as_4d(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() > 4 or t.dim() < 2:
        raise ValueError(f"{name} must have 2 to 4 dimensions (..., rows, cols), got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _sorted_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a bool tensor (..., n, m): the count of True per row and their column indices, in order."""
    counts = selected.sum(-1, dtype=torch.int32)
    m = selected.shape[-1]
    # A stable sort of "not selected" moves the selected columns to the front, keeping their order.
    order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices
    columns = torch.arange(m, device=selected.device).expand_as(order)
    indices = torch.where(torch.arange(m, device=selected.device) < counts.unsqueeze(-1), order, columns)
    return counts, indices.to(torch.int32).contiguous()


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which tiles of the attention matrix are empty, partial or full. See the module docstring.

    Build one with :meth:`from_dense`, :meth:`from_layout` or a builder of :mod:`fastattn.masks`;
    pass it as ``fastattn.attention(..., block_mask=mask)``.
    """

    layout: torch.Tensor  # (B, H, nQB, nKB) int8: EMPTY / PARTIAL / FULL
    seq_lens: tuple[int, int]  # (Lq, Lk)
    block_size: tuple[int, int]  # (BLOCK_Q, BLOCK_K)
    element_mask: torch.Tensor | None = None  # bool, broadcastable to (B, H, Lq, Lk)

    def __post_init__(self):
        layout = self.layout
        if layout.dim() != 4 or layout.dtype != torch.int8:
            raise ValueError(f"layout must be an int8 tensor (B, H, nQB, nKB), got {layout.dtype} {tuple(layout.shape)}")
        Lq, Lk = self.seq_lens
        bq, bk = self.block_size
        expected = (math.ceil(Lq / bq), math.ceil(Lk / bk))
        if tuple(layout.shape[2:]) != expected:
            raise ValueError(
                f"layout has {tuple(layout.shape[2:])} tiles, expected {expected} for seq_lens={self.seq_lens} "
                f"and block_size={self.block_size}"
            )
        if bool((layout == PARTIAL).any()) and self.element_mask is None:
            raise ValueError("a BlockMask with partial tiles needs element_mask")

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
        nqb, nkb = math.ceil(Lq / bq), math.ceil(Lk / bk)
        padded = torch.zeros(B, H, nqb * bq, nkb * bk, dtype=torch.int32, device=mask.device)
        padded[:, :, :Lq, :Lk] = mask4.to(torch.int32)
        visible = padded.view(B, H, nqb, bq, nkb, bk).sum(dim=(3, 5))
        rows = torch.full((nqb,), bq, device=mask.device)
        rows[-1] = Lq - (nqb - 1) * bq if nqb else bq
        cols = torch.full((nkb,), bk, device=mask.device)
        cols[-1] = Lk - (nkb - 1) * bk if nkb else bk
        capacity = rows[:, None] * cols[None, :]
        layout = torch.full(visible.shape, PARTIAL, dtype=torch.int8, device=mask.device)
        layout[visible == 0] = EMPTY
        layout[visible == capacity] = FULL
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
        Lq, Lk = seq_lens
        if not (math.ceil(Lq / bq) == nqb and math.ceil(Lk / bk) == nkb):
            raise ValueError(
                f"seq_lens={tuple(seq_lens)} does not fit layout of {nqb}x{nkb} tiles of block_size={(bq, bk)}"
            )
        codes = torch.where(layout4, FULL, EMPTY).to(torch.int8)
        return cls(layout=codes, seq_lens=(int(Lq), int(Lk)), block_size=(bq, bk))

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
    def density(self) -> float:
        """Fraction of tiles that are not empty (what the kernels visit)."""
        return float((self.layout != EMPTY).float().mean()) if self.layout.numel() else 0.0

    @functools.cached_property
    def kv_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward lists ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)``."""
        return (*_sorted_lists(self.layout == PARTIAL), *_sorted_lists(self.layout == FULL))

    @functools.cached_property
    def q_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transposed lists ``(q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)`` for the backward."""
        t = self.layout.transpose(-1, -2)
        return (*_sorted_lists(t == PARTIAL), *_sorted_lists(t == FULL))

    def to_dense(self) -> torch.Tensor:
        """The bool mask ``(B, H, Lq, Lk)`` (True = attend) this BlockMask stands for."""
        Lq, Lk = self.seq_lens
        bq, bk = self.block_size
        tiles = self.layout.repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)[:, :, :Lq, :Lk]
        dense = tiles == FULL
        if self.element_mask is not None:
            dense = dense | ((tiles == PARTIAL) & self.element_mask)
        return dense

    def to(self, device: torch.device | str) -> BlockMask:
        em = None if self.element_mask is None else self.element_mask.to(device)
        return BlockMask(layout=self.layout.to(device), seq_lens=self.seq_lens, block_size=self.block_size, element_mask=em)

    def __repr__(self) -> str:
        counts = {name: int((self.layout == code).sum()) for name, code in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, tiles={counts}, "
            f"density={self.density:.3f})"
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
