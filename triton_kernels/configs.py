"""Tuning configurations of the attention kernels.

Autotuning keys never include sequence lengths (a new length must not re-tune); they are the
head-dim tiles, the feature flags and (implicitly) the dtypes. ``FASTATTN_AUTOTUNE=0`` pins one
config per kernel; the Triton interpreter always uses one small config (it is slow and the tile
size only changes how many Python-level steps it takes).
"""

from __future__ import annotations

import os

import triton

# Keys of the autotuned kernels: tiles of the head dims and every constexpr feature flag.
FEATURE_FLAGS = [
    "HAS_WINDOW_LEFT", "HAS_WINDOW_RIGHT", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_MASK", "MASK_IS_BOOL",
    "HAS_LENGTHS", "HAS_DROPOUT",
]
FWD_KEY = ["BLOCK_D", "BLOCK_DV", *FEATURE_FLAGS]
BWD_KEY = ["BLOCK_D", "BLOCK_DV", *FEATURE_FLAGS, "COMPUTE_DBIAS"]


def in_interpreter() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled(head_dim: int = 0, elem_bytes: int = 2) -> bool:
    """Autotuning runs on a GPU unless ``FASTATTN_AUTOTUNE=0``. Rows wider than 256 16-bit units
    (float32 with head_dim > 128) fit only the pinned config's small tiles, so they skip it."""
    if head_dim * elem_bytes // 2 > 256:
        return False
    return not in_interpreter() and os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"


def keep(config: triton.Config) -> bool:
    """Drop configs that are wasteful everywhere: tiny tiles with many warps, huge tiles with few."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if block_m * block_n < 64 * 64 and config.num_warps > 4:
        return False
    if block_m * block_n >= 128 * 128 and config.num_warps < 8:
        return False
    return True


def fwd_configs() -> list[triton.Config]:
    """Forward configs: the query tile ``BLOCK_M`` is a program, the key tile ``BLOCK_N`` one loop step."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (3,)
    ]
    return [c for c in configs if keep(c)]


def bwd_configs() -> list[triton.Config]:
    """Backward configs (dK/dV and dQ kernels): smaller tiles, the backward holds more live tiles."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2,)
        if bm * bn <= 64 * 128
    ]
    return [c for c in configs if keep(c)]


def pinned_config(kind: str, head_dim: int, elem_bytes: int = 2) -> dict:
    """The one config used without autotuning: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``.

    Args:
        kind: ``"fwd"`` or ``"bwd"``.
        head_dim: the padded (power of two) head dim, the larger of q's and v's.
        elem_bytes: bytes per element (4 for float32 halves the tiles that fit in shared memory).
    """
    if in_interpreter():
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 1, "num_stages": 1}
    width = head_dim * elem_bytes // 2  # the head dim in 16-bit units: what shared memory sees
    if kind == "fwd":
        if width <= 64:
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
        if width <= 128:
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        if width <= 256:
            return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if width <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if width <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    if width <= 256:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def block_mask_config(kind: str, head_dim: int, block_size_q: int, block_size_k: int, elem_bytes: int = 2) -> dict:
    """With a BlockMask each kernel tile lies inside one mask block: the tiles are the mask's blocks,
    capped at the pinned config's tiles (both powers of two, so a mask block is a whole number of tiles)."""
    meta = dict(pinned_config(kind, head_dim, elem_bytes))
    meta["BLOCK_M"] = min(block_size_q, meta["BLOCK_M"])
    meta["BLOCK_N"] = min(block_size_k, meta["BLOCK_N"])
    return meta
