"""How a sequence is split across the ranks of a process group, and back.

Two layouts, both with equal shards on every rank (collectives need equal sizes)::

    contiguous, W = 2:   rank 0 holds [c0 c1]      rank 1 holds [c2 c3]
    zigzag,     W = 2:   rank 0 holds [c0 c3]      rank 1 holds [c1 c2]

With ``2 * W`` equal chunks ``c0 .. c(2W-1)``, zigzag gives rank ``r`` chunks ``r`` and ``2W-1-r``,
so under causal masking every rank has the same number of visible (query, key) pairs; with the
contiguous layout the last rank does ``2W - 1`` times the work of the first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def segments(rank: int, world: int, local_len: int, layout: str) -> list[tuple[int, int]]:
    """``(global start, length)`` of the pieces rank ``rank`` holds, in the order its shard stores them."""
    if layout == "contiguous":
        return [(rank * local_len, local_len)]
    half = local_len // 2
    return [(rank * half, half), ((2 * world - 1 - rank) * half, half)]


def check_divisible(length: int, world: int, layout: str, name: str) -> None:
    """Raise unless a global sequence of ``length`` splits into equal shards for ``layout``."""
    parts = 2 * world if layout == "zigzag" else world
    if length % parts:
        raise ValueError(
            f"{name} = {length} must be divisible by {parts} ({'2 * ' if layout == 'zigzag' else ''}world size "
            f"{world}) for layout={layout!r}: pad the sequence to a multiple of {parts} and pass key_lengths "
            "so the padding is never attended"
        )


def local_shard(x: torch.Tensor, rank: int, world: int, layout: str, dim: int = 2) -> torch.Tensor:
    """The shard of the full tensor ``x`` that rank ``rank`` holds (a view for ``contiguous``)."""
    local_len = x.shape[dim] // world
    pieces = [x.narrow(dim, start, length) for start, length in segments(rank, world, local_len, layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def to_global_order(shards: list[torch.Tensor], layout: str, dim: int = 2) -> torch.Tensor:
    """Concatenate every rank's shard (``shards[r]`` is rank ``r``'s) into the global sequence order."""
    world = len(shards)
    if layout == "contiguous":
        return torch.cat(shards, dim)
    half = shards[0].shape[dim] // 2
    pieces = []
    for chunk in range(2 * world):
        owner, which = (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)
        pieces.append(shards[owner].narrow(dim, which * half, half))
    return torch.cat(pieces, dim)


def group_rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first "
            "(torchrun sets up the environment it reads)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of a full sequence, for :func:`context_parallel_attention`.

    Every rank calls it with the same full tensor (the same data: seeded, or loaded identically).

    Args:
        x: the full tensor, e.g. ``(B, H, L, D)`` with the sequence on ``dim``.
        group: the process group (default: the world).
        layout: ``"zigzag"`` (balanced causal work; needs ``L % (2 * world) == 0``) or
            ``"contiguous"`` (needs ``L % world == 0``).
        dim: the sequence dimension. Default 2.

    Returns:
        ``(B, H, L / world, D)``: a view for ``contiguous``, a copy for ``zigzag``.
    """
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rank, world = group_rank_world(group)
    check_divisible(x.shape[dim], world, layout, f"x.shape[{dim}]")
    return local_shard(x, rank, world, layout, dim)


def unshard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full sequence from every rank's shard (an all-gather; every rank gets it). Not differentiable.

    Args:
        x: this rank's shard, e.g. ``(B, H, L / world, D)``; the same shape on every rank.
        group: the process group (default: the world).
        layout: the layout the shards were made with.
        dim: the sequence dimension. Default 2.

    Returns:
        ``(B, H, L, D)`` in global sequence order.
    """
    check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _, world = group_rank_world(group)
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"x.shape[{dim}] = {x.shape[dim]} must be even for layout='zigzag' (two chunks per rank)")
    x = x.detach().contiguous()
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x, group=group)
    return to_global_order(shards, layout, dim)
