"""What the benchmarks measure: workloads, presets, and the one FLOP formula.

A :class:`Workload` is one attention shape plus one mask kind. :func:`make_case` turns it into
random inputs on a device (never zeros), the same inputs for every provider. :func:`flops`
counts the work as flash-attn does::

    forward  = 4 * B * Hq * Lq * Lk * D * visible_fraction
    backward = 2.5 * forward              (fwd+bwd = 3.5 * forward)

where ``visible_fraction`` is the exact fraction of (query, key) pairs a query may see
(:func:`visible_pairs`): 1 for dense, about 1/2 for causal, the exact count for a sliding
window or a block-sparse layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..block_mask import BlockMask

WORKLOAD_KINDS = ("dense", "causal", "window", "block_sparse", "gqa", "varlen", "linear")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Work of each mode in units of the forward FLOPs.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass(frozen=True)
class Workload:
    """One attention shape and mask kind (self-attention: ``Lq == Lk == seqlen``).

    Attributes:
        kind: one of :data:`WORKLOAD_KINDS`. ``gqa`` is dense attention with ``heads_kv < heads_q``.
            ``linear`` is causal attention done by linear attention (the ``linear-*`` providers); the
            softmax providers compute the exact causal attention it replaces (so FLOPs and ratios
            are those of exact causal attention).
        batch, heads_q, heads_kv, seqlen, head_dim: ``q (B, Hq, L, D)``, ``k``/``v (B, Hkv, L, D)``.
        window: ``(left, right)`` for ``kind="window"`` (``-1`` = unbounded), else None.
        density: fraction of visible tiles for ``kind="block_sparse"``, else None.
        block_size: tile size of the block-sparse layout.
        doc_lengths: for ``kind="varlen"``, the lengths of ``batch`` causal documents (each at most
            ``seqlen``): fastattn packs them into ``(total, H, D)`` for :func:`fastattn.varlen_attention`,
            the other providers get the padded batch ``(batch, H, seqlen, D)`` with a causal mask (right
            padding: the real tokens' outputs are exact, the padding is computed).
    """

    kind: str
    batch: int
    heads_q: int
    heads_kv: int
    seqlen: int
    head_dim: int
    window: tuple[int, int] | None = None
    density: float | None = None
    block_size: int = 128
    doc_lengths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"kind must be one of {WORKLOAD_KINDS}, got {self.kind!r}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q ({self.heads_q}) must be a multiple of heads_kv ({self.heads_kv})")
        if (self.kind == "window") != (self.window is not None):
            raise ValueError("window must be given exactly when kind == 'window'")
        if (self.kind == "block_sparse") != (self.density is not None):
            raise ValueError("density must be given exactly when kind == 'block_sparse'")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must lie in (0, 1], got {self.density}")
        if (self.kind == "varlen") != (self.doc_lengths is not None):
            raise ValueError("doc_lengths must be given exactly when kind == 'varlen'")
        if self.doc_lengths is not None and (
            len(self.doc_lengths) != self.batch or not all(0 < n <= self.seqlen for n in self.doc_lengths)
        ):
            raise ValueError(f"doc_lengths must be batch = {self.batch} lengths in [1, seqlen = {self.seqlen}], "
                             f"got {self.doc_lengths}")

    @property
    def causal(self) -> bool:
        return self.kind in ("causal", "varlen", "linear")

    @property
    def name(self) -> str:
        """Short id that reads like the shape, e.g. ``causal-B4-H16-L4096-D128``."""
        heads = f"H{self.heads_q}" if self.heads_kv == self.heads_q else f"H{self.heads_q}-Hkv{self.heads_kv}"
        extra = ""
        if self.window is not None:
            extra = f"-W{self.window[0]}_{self.window[1]}"
        if self.density is not None:
            extra = f"-density{self.density:g}-bs{self.block_size}"
        if self.doc_lengths is not None:
            extra = f"-tokens{sum(self.doc_lengths)}"
        return f"{self.kind}-B{self.batch}-{heads}-L{self.seqlen}-D{self.head_dim}{extra}"

    def block_layout(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Bool ``(nQB, nKB)`` tile layout of a block-sparse workload (None otherwise).

        The diagonal tiles are always visible (no query row is left without keys); the rest
        are drawn at random with a fixed seed until ``round(density * nQB * nKB)`` tiles are on.
        """
        if self.density is None:
            return None
        n = math.ceil(self.seqlen / self.block_size)
        layout = torch.eye(n, dtype=torch.bool)
        target = max(n, round(self.density * n * n))
        off_diagonal = (~layout).flatten().nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(0)
        chosen = off_diagonal[torch.randperm(off_diagonal.numel(), generator=generator)[: target - n]]
        layout.view(-1)[chosen] = True
        return layout.to(device)


@dataclass
class Case:
    """Inputs of one workload on one device and dtype, shared by every provider.

    ``q (B, Hq, L, D)``, ``k``/``v (B, Hkv, L, D)``, ``dout`` like ``q``: random normal, never zeros.
    """

    workload: Workload
    dtype: torch.dtype
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    block_mask: BlockMask | None
    _dense_mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def window(self) -> tuple[int, int] | None:
        return self.workload.window

    @property
    def causal(self) -> bool:
        return self.workload.causal

    def fastattn_kwargs(self) -> dict:
        """Keyword arguments of :func:`fastattn.attention` for this case."""
        return {"causal": self.causal, "window": self.window, "block_mask": self.block_mask}

    def packed(self, t: torch.Tensor) -> torch.Tensor:
        """The documents of a varlen case's padded ``(B, H, L, D)`` tensor packed into ``(total, H, D)``."""
        return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(self.workload.doc_lengths)])

    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``(B + 1,)`` document offsets of a varlen case, on its device."""
        lengths = torch.tensor((0, *self.workload.doc_lengths), dtype=torch.int32)
        return lengths.cumsum(0).to(torch.int32).to(self.device)

    def dense_mask(self) -> torch.Tensor | None:
        """Bool ``(1, 1, L, L)`` (True = attend) for window and block-sparse cases, for providers
        without a native form of them (SDPA takes it as ``attn_mask``). None for dense/causal/gqa."""
        if self.workload.kind not in ("window", "block_sparse"):
            return None
        if self._dense_mask is None:
            from .. import reference
            from .._inputs import normalize

            inputs = normalize(self.q, self.k, self.v, **self.fastattn_kwargs())
            self._dense_mask = reference.visible_mask(inputs)[:1, :1].contiguous()
        return self._dense_mask


def make_case(workload: Workload, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Case:
    """Random inputs for ``workload`` (seeded, so every run and provider sees the same numbers)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    w = workload

    def randn(heads: int) -> torch.Tensor:
        shape = (w.batch, heads, w.seqlen, w.head_dim)
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    layout = w.block_layout(device)
    block_mask = None
    if layout is not None:
        block_mask = BlockMask.from_layout(layout, block_size=w.block_size, seq_lens=(w.seqlen, w.seqlen))
    return Case(
        workload=w, dtype=dtype, q=randn(w.heads_q), k=randn(w.heads_kv), v=randn(w.heads_kv),
        dout=randn(w.heads_q), block_mask=block_mask,
    )


# --------------------------------------------------------------------------------------- FLOPs
def visible_pairs(
    seqlen_q: int,
    seqlen_k: int,
    *,
    window: tuple[int | None, int | None] | None = None,
    causal: bool = False,
    block_layout: torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
) -> int:
    """Exact number of visible (query, key) pairs of one (batch, head), by fastattn's rules.

    Causal and window are bottom-right aligned (query ``i`` sees key ``j`` iff
    ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``; ``-1``/None = unbounded); ``block_layout``
    is a bool ``(nQB, nKB)`` tile layout. All given masks intersect. Counted in chunks of query rows,
    so it is exact for any mask and never builds the whole ``(Lq, Lk)`` matrix.
    """
    left, right = window if window is not None else (None, None)
    left = None if left is None or left < 0 else left
    right = None if right is None or right < 0 else right
    if causal:
        right = 0 if right is None else min(right, 0)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    offset = seqlen_k - seqlen_q
    j = torch.arange(seqlen_k)
    layout = None if block_layout is None else block_layout.cpu()
    total = 0
    chunk = max(1, (1 << 22) // max(seqlen_k, 1))
    for start in range(0, seqlen_q, chunk):
        i = torch.arange(start, min(start + chunk, seqlen_q))[:, None]
        visible = torch.ones(i.shape[0], seqlen_k, dtype=torch.bool)
        if left is not None:
            visible &= j >= i + offset - left
        if right is not None:
            visible &= j <= i + offset + right
        if layout is not None:
            visible &= layout[i // bq, j // bk]
        total += int(visible.sum())
    return total


def workload_visible_fraction(workload: Workload) -> float:
    """Fraction of the ``L x L`` (query, key) pairs that are visible in ``workload`` (for varlen: the
    documents' causal pairs over the padded batch's ``B x L x L``)."""
    L = workload.seqlen
    if workload.doc_lengths is not None:
        return sum(n * (n + 1) // 2 for n in workload.doc_lengths) / (workload.batch * L * L)
    pairs = visible_pairs(
        L, L, window=workload.window, causal=workload.causal,
        block_layout=workload.block_layout(), block_size=workload.block_size,
    )
    return pairs / (L * L)


def flops(workload: Workload, mode: str, visible_fraction: float | None = None) -> float:
    """FLOPs of one call: ``4 * B * Hq * Lq * Lk * D * visible_fraction`` times the mode's factor
    (fwd 1, bwd 2.5, fwd+bwd 3.5). The one formula every benchmark number uses."""
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if visible_fraction is None:
        visible_fraction = workload_visible_fraction(workload)
    w = workload
    forward = 4.0 * w.batch * w.heads_q * w.seqlen * w.seqlen * w.head_dim * visible_fraction
    return forward * MODE_FLOP_FACTOR[mode]


# --------------------------------------------------------------------------------------- presets
@dataclass
class Preset:
    """A named set of benchmark configurations: workloads x modes x dtypes."""

    name: str
    workloads: list[Workload]
    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    # CPU timing: at least min_repeats timed calls after one warm-up, more while under time_budget_s;
    # a noisy cell (see runner.NOISY_SPREAD) up to noisy_max_repeats calls.
    min_repeats: int = 3
    max_repeats: int = 10
    time_budget_s: float = 0.2
    noisy_max_repeats: int = 15
    # Providers measured when the caller names none (None = every usable one).
    providers: tuple[str, ...] | None = None


# Document lengths of the varlen workloads, as fractions of the padded length: eight documents filling
# half of an 8 x L batch (50% padding), as benchmarks/varlen_cpu.py.
VARLEN_DOC_FRACTIONS = (1.0, 0.9375, 0.6875, 0.5625, 0.375, 0.25, 0.125, 0.0625)


def varlen_workload(seqlen: int, heads: int, head_dim: int) -> Workload:
    """Eight causal documents (:data:`VARLEN_DOC_FRACTIONS` of ``seqlen``), packed against the padded batch."""
    docs = tuple(max(1, round(f * seqlen)) for f in VARLEN_DOC_FRACTIONS)
    return Workload("varlen", len(docs), heads, heads, seqlen, head_dim, doc_lengths=docs)


def _sweep(kinds, seq_lens, head_dims, *, tokens=None, batch=1, heads=4, heads_kv_gqa=1, window=(128, 0),
           densities=(0.1, 0.25, 0.5), density_seqlen=None, default_density=0.25, block_size=128,
           window_seqlens=None) -> list[Workload]:
    """Workloads of ``kinds`` over ``seq_lens`` x ``head_dims``.

    ``tokens`` fixes ``B * L`` (batch = tokens // L). ``heads`` is ``Hq`` (or ``hidden // D`` when
    ``heads`` is a callable of D). Block-sparse runs at ``default_density`` over ``seq_lens`` plus a
    density sweep at ``density_seqlen``; window runs at ``window_seqlens`` (default: all).
    """
    out: list[Workload] = []
    for D in head_dims:
        H = heads(D) if callable(heads) else heads
        for L in seq_lens:
            B = max(1, tokens // L) if tokens else batch
            for kind in kinds:
                if kind == "gqa":
                    out.append(Workload("gqa", B, H, max(1, H // 4) if heads_kv_gqa is None else heads_kv_gqa, L, D))
                elif kind == "window":
                    if window_seqlens is None or L in window_seqlens:
                        out.append(Workload("window", B, H, H, L, D, window=window))
                elif kind == "varlen":
                    out.append(varlen_workload(L, H, D))
                elif kind == "block_sparse":
                    if density_seqlen is None:
                        out.append(Workload("block_sparse", B, H, H, L, D, density=default_density, block_size=block_size))
                else:
                    out.append(Workload(kind, B, H, H, L, D))
        if "block_sparse" in kinds and density_seqlen is not None:
            B = max(1, tokens // density_seqlen) if tokens else batch
            for density in densities:
                out.append(Workload("block_sparse", B, H, H, density_seqlen, D, density=density, block_size=block_size))
    return out


def preset(name: str, device: str) -> Preset:
    """The named preset (``quick``, ``full``, ``cpu``, ``gpu`` or ``linear``) for ``device`` (``cpu`` or ``cuda``).

    * ``quick`` -- under two minutes on a 2-core CPU: tiny shapes (fp32, L 128..512, D 64, modes
      fwd and fwd+bwd); on a GPU a small slice of the ``gpu`` preset.
    * ``full``  -- head dims 64 and 128, both low-precision dtypes (CPU: fp32 and bf16), longer sweeps.
    * ``cpu``   -- the C++ CPU kernels' targets against torch SDPA (fastattn-cpu and SDPA only, fp32,
      B=1, H=4): dense and causal at L 1k/2k/4k, D 64/128; sliding window (256, 0) at L=16k
      (H=1, so SDPA's dense mask fits in memory); block-sparse at densities 50/25/10% at L=2k, D=64.
    * ``gpu``   -- the speed targets: bf16, ``B * L = 16k`` tokens, hidden 2048 (D=128, H=16),
      L 2k..16k dense and causal, sliding window (1024, 0) and block-sparse 5..50% at L=16k, GQA.
    * ``linear`` -- causal linear attention (elu+1) against exact causal attention, fp32 forward,
      B=1, H=1, D=32, L 4k..64k (on CPU: linear-cpu, linear-reference and SDPA, the exact baseline).
    """
    all_kinds = tuple(kind for kind in WORKLOAD_KINDS if kind != "linear")  # linear has its own preset
    on_gpu = device.startswith("cuda")
    if name == "quick" and not on_gpu:
        return Preset(
            "quick",
            _sweep([k for k in all_kinds if k != "varlen"], (128, 256, 512), (64,), batch=1, heads=4, window=(64, 0),
                   densities=(0.1, 0.25, 0.5), density_seqlen=512, block_size=64)
            + [varlen_workload(256, 4, 64)],
            ("fwd", "fwd+bwd"), ("fp32",), min_repeats=3, max_repeats=5, time_budget_s=0.1,
        )
    if name == "full" and not on_gpu:
        return Preset(
            "full",
            _sweep(all_kinds, (256, 512, 1024, 2048, 4096), (64, 128), batch=1, heads=8, heads_kv_gqa=2,
                   window=(256, 0), densities=(0.05, 0.1, 0.25, 0.5), density_seqlen=4096, block_size=128),
            MODES, ("fp32", "bf16"), min_repeats=5, max_repeats=30, time_budget_s=1.0, noisy_max_repeats=60,
        )
    if name == "cpu":
        if on_gpu:
            raise ValueError("the cpu preset (--cpu) measures the C++ CPU kernels: run it with --device cpu")
        workloads = _sweep(("dense", "causal"), (1024, 2048, 4096), (64, 128), batch=1, heads=4)
        workloads.append(Workload("window", 1, 1, 1, 16384, 64, window=(256, 0)))
        workloads += _sweep(("block_sparse",), (2048,), (64,), batch=1, heads=4, densities=(0.5, 0.25, 0.1),
                            density_seqlen=2048, block_size=128)
        workloads.append(varlen_workload(1024, 4, 64))
        return Preset("cpu", workloads, ("fwd", "fwd+bwd"), ("fp32",), min_repeats=3, max_repeats=5,
                      time_budget_s=2.0, noisy_max_repeats=10, providers=("fastattn-cpu", "sdpa"))
    if name == "linear":
        # linear attention's scaling from 4k to 64k, and exact causal attention of the same shapes. One
        # head, so the exact attention at 64k stays seconds on 2 cores; a cell slower than the time
        # budget is timed once after its warm-up.
        from ..linear.ops import CPU_KERNELS_BUILT

        workloads = [Workload("linear", 1, 1, 1, L, 32) for L in (4096, 8192, 16384, 32768, 65536)]
        cpu_providers = ("linear-cpu", "linear-reference") if CPU_KERNELS_BUILT else ("linear-reference",)
        return Preset("linear", workloads, ("fwd",), ("fp32",), min_repeats=1, max_repeats=9, time_budget_s=2.0,
                      noisy_max_repeats=10,
                      providers=("linear-triton",) if on_gpu else cpu_providers)
    if name == "gpu" and not on_gpu:
        raise ValueError("the gpu preset (--gpu) needs a CUDA device: its 16k-token shapes are for GPUs")
    hidden = 2048
    gpu_kw = dict(tokens=16384, heads=lambda D: hidden // D, heads_kv_gqa=None, window=(1024, 0), block_size=128,
                  window_seqlens=(16384,))
    if name == "gpu":
        workloads = _sweep(("dense", "causal"), (2048, 4096, 8192, 16384), (128,), **gpu_kw)
        workloads += _sweep(("window",), (16384,), (128,), **gpu_kw)
        workloads += _sweep(("block_sparse",), (16384,), (128,), densities=(0.05, 0.1, 0.2, 0.5),
                            density_seqlen=16384, **gpu_kw)
        workloads += _sweep(("gqa",), (4096, 16384), (128,), **gpu_kw)
        return Preset("gpu", workloads, MODES, ("bf16",))
    if name == "quick":
        workloads = _sweep(("dense", "causal"), (2048, 8192), (128,), **gpu_kw)
        workloads += _sweep(("window",), (16384,), (128,), **gpu_kw)
        workloads += _sweep(("block_sparse",), (16384,), (128,), densities=(0.1,), density_seqlen=16384, **gpu_kw)
        return Preset("quick", workloads, ("fwd", "fwd+bwd"), ("bf16",))
    if name == "full":
        workloads = _sweep(all_kinds, (1024, 2048, 4096, 8192, 16384), (64, 128), densities=(0.05, 0.1, 0.2, 0.5),
                           density_seqlen=16384, **gpu_kw)
        return Preset("full", workloads, MODES, ("fp16", "bf16"))
    raise ValueError(f"preset must be 'quick', 'full', 'cpu', 'gpu' or 'linear', got {name!r}")
