"""Tile configurations of the attention kernels: pinned by default, autotuned on request.

Each kernel has its own pinned config per (head dim, element size), chosen from the compiled code
for Hopper (sm_90a, see ``docs/perf-notes.md``): no register spills at head dims 64 and 128, the
least spilling that fits shared memory at 256. Feature mixes that would spill at 64 and 128 (a
mask, dropout with softcap) take lean tiles, and the dK/dV kernel prefetches only when its tiles come
by TMA. Pinned tiles make results bit-reproducible across processes (the tile sizes fix the
order of every float32 sum).

``FASTATTN_AUTOTUNE=1`` opts into autotuning: the candidates are pruned *before* compiling (shared
memory estimate; no score tile with fewer than 16 rows per warp), the key holds the head-dim tiles,
every feature flag, a power-of-two bucket of Lk (``TUNE_LK``) and the GQA group size, and the
results are persisted in Triton's cache directory, so a later process reuses them. Tuned tiles
are picked by timing, so two machines may pick differently: bitwise reproducibility holds only
with the pinned configs. The Triton interpreter always uses small pinned tiles (it is slow and
the tile size only changes how many Python-level steps it takes).

Tile names follow the kernels: ``BLOCK_M`` is the query tile and ``BLOCK_N`` the key tile in all
three kernels. The M dimension of the matmuls (the rows a warp owns) is the query tile in the
forward and dQ kernels and the key tile in the dK/dV kernel.
"""

from __future__ import annotations

import os

import triton

# Keys of the autotuned kernels: tiles of the head dims and every constexpr feature flag.
FEATURE_FLAGS = [
    "HAS_WINDOW_LEFT", "HAS_WINDOW_RIGHT", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_MASK", "MASK_IS_BOOL",
    "HAS_LENGTHS", "HAS_DROPOUT",
]
HEAD_KEY = ["BLOCK_D", "BLOCK_DV", *FEATURE_FLAGS]
FWD_KEY = [*HEAD_KEY, "TUNE_LK", "GROUP"]
DQ_KEY = FWD_KEY
DKDV_KEY = [*DQ_KEY, "COMPUTE_DBIAS"]
BWD_KEY = DKDV_KEY  # the former name

SMEM_LIMIT = 232448  # bytes of shared memory per block on H100 / H200 (sm_90)
KINDS = ("fwd", "dkdv", "dq")


def in_interpreter() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled(head_dim: int = 0, elem_bytes: int = 2) -> bool:
    """Autotuning runs only when ``FASTATTN_AUTOTUNE=1`` on a GPU. Rows wider than 256 16-bit units
    (float32 with head_dim > 128) fit only the pinned config's small tiles, so they skip it."""
    if head_dim * elem_bytes // 2 > 256:
        return False
    return not in_interpreter() and os.environ.get("FASTATTN_AUTOTUNE", "0") == "1"


def tune_bucket(length: int) -> int:
    """The autotuning key's bucket of a sequence length: the next power of two, at least 64."""
    return max(64, triton.next_power_of_2(max(1, int(length))))


# --------------------------------------------------------------------------- pinned configs
def _config(block_m: int, block_n: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


# (kind, head-dim width in 16-bit units) -> config; widths are the padded head dim (max of q's and v's).
_PINNED = {
    ("fwd", 64): _config(128, 64, 4, 3),
    ("fwd", 128): _config(128, 64, 8, 3),
    ("fwd", 256): _config(64, 32, 4, 2),
    ("fwd", 512): _config(32, 32, 4, 1),
    # dK/dV: 128 keys (the M dimension, two warpgroups of 64 rows) x 64 queries per step; at 128 a
    # 32-query step is what keeps dK, dV, S^T and dP^T in registers without spilling (64 spills
    # 80 B); it prefetches the next step only with TMA (USE_TMA, see _TMA_STAGES: the pointer
    # path's prefetch spills 4 B).
    ("dkdv", 64): _config(64, 128, 8, 2),
    ("dkdv", 128): _config(32, 128, 8, 1),
    # At 256 dK and dV alone fill the registers of a 64-row warpgroup tile: 32 x 32 tiles with warps
    # split over the head dim (mma.sync, no wgmma) are the only spill-free choice.
    ("dkdv", 256): _config(32, 32, 4, 1),
    ("dkdv", 512): _config(16, 32, 2, 1),
    # dQ: 128 queries (M, two warpgroups) x 64 keys per step.
    ("dq", 64): _config(128, 64, 8, 2),
    ("dq", 128): _config(128, 64, 8, 2),
    ("dq", 256): _config(32, 32, 4, 1),
    ("dq", 512): _config(32, 16, 2, 1),
}
# Lean tiles at 64 and 128 for the feature mixes that keep extra tiles live next to the scores (a
# mask tile, dS for dbias, Philox draws with the softcap's tanh): the configs above spill there
# (at 128 dK/dV 28-700 B, dQ 48-550 B; at 64 forward 884 B, dK/dV 48-412 B); these spill at most
# 72 B at 16-byte aligned mask rows (docs/perf-notes.md).
_LEAN = {
    ("fwd", 64): _config(128, 64, 8, 3),
    ("dkdv", 64): _config(32, 128, 8, 2),
    ("dq", 64): _config(128, 32, 8, 2),
    ("fwd", 128): _config(128, 32, 8, 2),
    ("dkdv", 128): _config(16, 128, 8, 3),
    ("dq", 128): _config(64, 32, 4, 2),
}
# With tensor descriptors (USE_TMA) the staged tiles live in shared memory, not registers.
_TMA_STAGES = {("dkdv", 128): 2}
_INTERPRETER = {
    "fwd": _config(64, 32, 1, 1),
    "dkdv": _config(32, 64, 1, 1),
    "dq": _config(64, 32, 1, 1),
}


def _kind(kind: str) -> str:
    if kind == "bwd":  # the former name of the dK/dV kernel's config
        return "dkdv"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def lean_features(flags: dict | None) -> bool:
    """Whether the kernels' feature flags need the lean tiles: any element mask, or dropout with softcap."""
    if not flags:
        return False
    return bool(flags.get("HAS_MASK")) or bool(flags.get("HAS_DROPOUT") and flags.get("HAS_SOFTCAP"))


def pinned_config(kind: str, head_dim: int, elem_bytes: int = 2, flags: dict | None = None) -> dict:
    """The config used without autotuning: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``.

    Args:
        kind: ``"fwd"``, ``"dkdv"`` or ``"dq"`` (``"bwd"``: the dK/dV kernel).
        head_dim: the padded (power of two) head dim, the larger of q's and v's.
        elem_bytes: bytes per element (4 for float32 doubles what shared memory sees).
        flags: the launch's constexpr flags (``HAS_MASK``, ``HAS_DROPOUT``, ..., ``USE_TMA``); mixes
            that would spill take lean tiles (``lean_features``).
    """
    kind = _kind(kind)
    if in_interpreter():
        return dict(_INTERPRETER[kind])
    width = head_dim * elem_bytes // 2  # the head dim in 16-bit units: what shared memory sees
    for bound in (64, 128, 256, 512):
        if width <= bound:
            if (kind, bound) in _LEAN and lean_features(flags):
                return dict(_LEAN[(kind, bound)])
            meta = dict(_PINNED[(kind, bound)])
            if flags and flags.get("USE_TMA") and (kind, bound) in _TMA_STAGES:
                meta["num_stages"] = _TMA_STAGES[(kind, bound)]
            return meta
    raise ValueError(f"head_dim {head_dim} with {elem_bytes}-byte elements is wider than the kernels' tiles")


def tma_tiles(kind: str, head_dim: int, elem_bytes: int = 2) -> bool:
    """Whether ``kind``'s kernel may load its tiles through tensor descriptors (TMA) at this head dim.
    Not the backward wider than 128 16-bit units: its tiles run on mma.sync there, which reads its
    operands from registers, and TMA-staged tiles made those kernels spill (1-2 KB per thread)."""
    return _kind(kind) == "fwd" or head_dim * elem_bytes // 2 <= 128


def m_dim(kind: str, meta: dict) -> int:
    """The M dimension of a kernel's matmuls (rows owned by warps): the key tile for dK/dV, else the query tile."""
    return meta["BLOCK_N"] if _kind(kind) == "dkdv" else meta["BLOCK_M"]


def block_mask_config(
    kind: str, head_dim: int, block_size_q: int, block_size_k: int, elem_bytes: int = 2, flags: dict | None = None
) -> dict:
    """With a BlockMask each kernel tile lies inside one mask block: the tiles are the mask's blocks,
    capped at the pinned config's tiles (both powers of two, so a mask block is a whole number of
    tiles), with at most one warp per 16 rows of the M dimension (more warps would repeat work)."""
    meta = dict(pinned_config(kind, head_dim, elem_bytes, flags))
    meta["BLOCK_M"] = min(block_size_q, meta["BLOCK_M"])
    meta["BLOCK_N"] = min(block_size_k, meta["BLOCK_N"])
    meta["num_warps"] = max(1, min(meta["num_warps"], m_dim(kind, meta) // 16))
    return meta


# --------------------------------------------------------------------------- autotuning
def _candidates(kind: str, tiles) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples as configs, those with at least 16 rows of the
    M dimension per warp (fewer would make warps repeat each other's rows)."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
    return [c for c in configs if m_dim(kind, c.kwargs) >= 16 * c.num_warps]


def fwd_configs() -> list[triton.Config]:
    """Forward candidates: the query tile ``BLOCK_M`` is a program, the key tile ``BLOCK_N`` one loop step."""
    tiles = [(bm, bn, w, 3) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)]
    return _candidates("fwd", [t for t in tiles if not (t[0] * t[1] >= 128 * 128 and t[2] < 8)])


def dkdv_configs() -> list[triton.Config]:
    """dK/dV candidates: the key tile ``BLOCK_N`` (the M dimension) is a program, ``BLOCK_M`` queries a step."""
    return _candidates("dkdv", [
        (32, 128, 8, 1), (32, 128, 8, 2), (64, 128, 8, 1), (64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 4, 2),
    ])


def dq_configs() -> list[triton.Config]:
    """dQ candidates: the query tile ``BLOCK_M`` (the M dimension) is a program, ``BLOCK_N`` keys a step."""
    return _candidates("dq", [
        (128, 64, 8, 1), (128, 64, 8, 2), (128, 32, 8, 2), (128, 128, 8, 1), (64, 64, 4, 2), (64, 32, 4, 2),
    ])


def shared_memory_estimate(kind: str, meta: dict, block_d: int, block_dv: int, elem_bytes: int) -> int:
    """Bytes of shared memory a config needs, estimated before compiling.

    The tiles loaded once per program stay resident, those loaded every step are buffered
    ``num_stages`` times, and one 16-bit score tile passes through shared memory between matmuls.
    """
    kind = _kind(kind)
    bm, bn, stages = meta["BLOCK_M"], meta["BLOCK_N"], max(1, meta["num_stages"])
    width = (block_d + block_dv) * elem_bytes
    score = bm * bn * 2
    if kind == "fwd":
        return bm * block_d * elem_bytes + stages * bn * width + score
    if kind == "dkdv":
        return bn * width + stages * bm * width + score
    return bm * width + stages * bn * width + score


def device_shared_memory() -> int:
    """The current GPU's shared memory per block (opt-in maximum), or the H100's without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin)
    except (ImportError, RuntimeError, AttributeError):
        pass
    return SMEM_LIMIT


def prune(kind: str):
    """An ``early_config_prune`` for ``kind``: drops configs that do not fit shared memory or that put
    fewer than 16 rows of the M dimension on each warp, before any of them is compiled."""

    def early_config_prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d, block_dv = args["BLOCK_D"], args["BLOCK_DV"]
        elem_bytes = args["p_q"].element_size()
        limit = device_shared_memory()
        kept = []
        for config in configs:
            meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            if m_dim(kind, meta) < 16 * config.num_warps:
                continue
            if shared_memory_estimate(kind, meta, block_d, block_dv, elem_bytes) > limit:
                continue
            kept.append(config)
        if not kept:  # nothing fits the estimate: the pinned config is known to
            pinned = pinned_config(kind, max(block_d, block_dv), elem_bytes)
            kept = [triton.Config({"BLOCK_M": pinned["BLOCK_M"], "BLOCK_N": pinned["BLOCK_N"]},
                                  num_warps=pinned["num_warps"], num_stages=pinned["num_stages"])]
        return kept

    return early_config_prune


def autotune(kind: str, key: list[str]):
    """The autotune decorator of ``kind``'s kernel (``"fwd"``, ``"dkdv"``, ``"dq"``): its candidates,
    pruned before compiling, keyed on ``key`` (kernel argument names), persisted across processes."""
    candidates = {"fwd": fwd_configs, "dkdv": dkdv_configs, "dq": dq_configs}[_kind(kind)]()
    return triton.autotune(
        configs=candidates, key=key, prune_configs_by={"early_config_prune": prune(kind)}, cache_results=True
    )
