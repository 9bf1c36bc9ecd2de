"""The one runner: times every (workload, dtype, provider, mode) and profiles memory against length.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events after warm-up); on CPU one warm-up call,
then timed calls with ``time.perf_counter`` -- at least ``min_repeats``, more while under the
preset's time budget, at most ``max_repeats``. Each cell keeps the median and the spread of its
calls (min, quartiles, max; ``spread`` = interquartile range / median); a CPU cell whose spread
exceeds :data:`NOISY_SPREAD` is timed again: up to ``noisy_max_repeats`` calls in all, in at most as
much time again as it took (or the preset's time budget, if that is more).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .memory import is_out_of_memory, peak_memory
from .providers import BASELINE, Provider, Run, Unsupported, resolve
from .workloads import (
    DTYPES,
    MODES,
    WORKLOAD_KINDS,
    Preset,
    Workload,
    flops,
    make_case,
    preset,
    varlen_workload,
    workload_visible_fraction,
)

SCHEMA = "fastattn-bench/1"


@dataclass
class BenchConfig:
    """What one ``fastattn bench`` run measures (see :func:`bench_config` to build one from a preset)."""

    preset: Preset
    device: torch.device
    providers: list[str] | None = None  # None = every usable provider
    max_seconds: float | None = None  # start no measurement after this many seconds (None = no limit)


class Deadline:
    """``--max-seconds``: measurements not started before it passes are recorded as ``over_time``."""

    def __init__(self, max_seconds: float | None):
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"--max-seconds must be > 0, got {max_seconds}")
        self.max_seconds = max_seconds
        self.end = None if max_seconds is None else time.perf_counter() + max_seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end

    def row_update(self) -> dict:
        return {"status": "over_time", "reasons": [f"not measured: the time budget of {self.max_seconds:g} s "
                                                   "(--max-seconds) was spent"]}


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _device(device: str | None) -> torch.device:
    """The device to measure on: ``cpu`` or ``cuda`` (default: cuda when available)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    return device


def bench_config(
    name: str = "quick",
    device: str | None = None,
    *,
    providers: list[str] | None = None,
    workloads: list[str] | None = None,
    modes: list[str] | None = None,
    dtypes: list[str] | None = None,
    seq_lens: list[int] | None = None,
    head_dims: list[int] | None = None,
    max_seconds: float | None = None,
) -> BenchConfig:
    """A preset narrowed or changed by the CLI flags.

    ``seq_lens``/``head_dims`` replace the preset's lengths/head dims: every distinct workload
    shape of the preset is re-made at each given value (keeping ``B * L`` fixed where the preset
    fixes the token count).
    """
    device = _device(device)
    p = preset(name, device.type)
    items = p.workloads
    if workloads is not None:
        unknown = set(workloads) - set(WORKLOAD_KINDS)
        if unknown:
            raise ValueError(f"--workloads: unknown {sorted(unknown)}; choose from {', '.join(WORKLOAD_KINDS)}")
        items = [w for w in items if w.kind in workloads]
    if seq_lens is not None or head_dims is not None:
        if any(not isinstance(x, int) or x < 1 for x in (seq_lens or []) + (head_dims or [])):
            raise ValueError("--seq-lens and --head-dims must be positive integers")
        tokens = {w.batch * w.seqlen for w in items}
        fixed_tokens = len(tokens) == 1 and len({w.seqlen for w in items}) > 1
        token_count = tokens.pop() if fixed_tokens else None
        remade: list[Workload] = []
        for w in items:
            for L in seq_lens or [w.seqlen]:
                for D in head_dims or [w.head_dim]:
                    B = max(1, token_count // L) if token_count else w.batch
                    if w.kind == "varlen":  # its documents scale with the padded length
                        new = varlen_workload(L, w.heads_q, D)
                    else:
                        new = dataclasses.replace(w, seqlen=L, head_dim=D, batch=B)
                    if new not in remade:
                        remade.append(new)
        items = remade
    if modes is not None:
        bad = set(modes) - set(MODES)
        if bad:
            raise ValueError(f"--modes: unknown {sorted(bad)}; choose from {', '.join(MODES)}")
    if dtypes is not None:
        bad = set(dtypes) - set(DTYPES)
        if bad:
            raise ValueError(f"--dtypes: unknown {sorted(bad)}; choose from {', '.join(DTYPES)}")
    if not items:
        raise ValueError("no workload left after applying --workloads/--seq-lens")
    p = dataclasses.replace(
        p, workloads=items, modes=tuple(modes) if modes else p.modes, dtypes=tuple(dtypes) if dtypes else p.dtypes
    )
    if providers is None and p.providers is not None:
        providers = list(p.providers)
    Deadline(max_seconds)  # validates it
    return BenchConfig(preset=p, device=device, providers=providers, max_seconds=max_seconds)


# --------------------------------------------------------------------------------------- timing
NOISY_SPREAD = 0.2  # a cell whose interquartile range exceeds 20% of its median counts as noisy


def timing_stats(times_ms: list[float]) -> dict:
    """Median, min, quartiles and max of the timed calls (ms), their count, and ``spread`` = IQR / median."""
    ordered = sorted(times_ms)
    median = statistics.median(ordered)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2 else ordered * 3
    return {"time_ms": median, "time_min_ms": ordered[0], "time_q1_ms": q1, "time_q3_ms": q3,
            "time_max_ms": ordered[-1], "spread": (q3 - q1) / median if median > 0 else 0.0,
            "repeats": len(ordered)}


def time_call(fn: Callable[[], object], device: torch.device, p: Preset) -> dict:
    """Time ``fn()`` (already warmed up once): :func:`timing_stats` of its calls."""
    if device.type == "cuda":
        import triton.testing

        quick = p.name == "quick"
        times = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="all")
        return timing_stats([float(t) for t in times])
    times: list[float] = []
    start = time.perf_counter()

    def timed() -> None:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)

    while len(times) < p.max_repeats and (len(times) < p.min_repeats or time.perf_counter() - start < p.time_budget_s):
        timed()
    # A noisy cell (other processes took the cores for some calls): more calls, so the median holds --
    # at most as much time again as spent so far, or the preset's time budget if that is more.
    spent = time.perf_counter() - start
    while (len(times) < p.noisy_max_repeats and timing_stats(times)["spread"] > NOISY_SPREAD
           and time.perf_counter() - start < spent + max(spent, p.time_budget_s)):
        timed()
    return timing_stats(times)


def mode_fn(run: Run, mode: str) -> Callable[[], object]:
    """The call timed for ``mode``: forward without autograd, backward of a kept graph, or both."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return run.fn()
        return fwd
    if mode == "bwd":
        out = run.fn()
        return lambda: torch.autograd.grad(out, run.leaves, run.dout, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(run.fn(), run.leaves, run.dout)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --------------------------------------------------------------------------------------- progress
class Progress:
    """tqdm when importable, else one line per step on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        self._bar = None
        self._last_print = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self._bar = None

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60], refresh=False)
            self._bar.update(1)
        elif time.monotonic() - self._last_print > 1.0 or self.done == self.total:
            self._last_print = time.monotonic()
            print(f"{self.desc}: {self.done}/{self.total} {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- bench
def _workload_fields(w: Workload) -> dict:
    return {
        "workload": w.kind, "name": w.name, "batch": w.batch, "heads_q": w.heads_q, "heads_kv": w.heads_kv,
        "seqlen": w.seqlen, "head_dim": w.head_dim, "window": list(w.window) if w.window else None,
        "density": w.density, "block_size": w.block_size if w.kind == "block_sparse" else None,
        "doc_lengths": list(w.doc_lengths) if w.doc_lengths else None,
    }


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    """Run every configuration of ``config``; return the results document (see docs/benchmarks.md).

    A configuration a provider cannot serve is recorded with ``status="unsupported"`` and the
    reasons; a failure with ``status="error"`` (or ``"oom"``) and the message -- never fatal. Once
    ``config.max_seconds`` have passed, the configurations left are recorded as ``"over_time"``.
    """
    from .report import environment, load_average

    p, device = config.preset, config.device
    deadline = Deadline(config.max_seconds)
    explicit = config.providers is not None
    providers, status = resolve(config.providers, device)
    total = len(p.dtypes) * len(p.workloads) * len(providers) * len(p.modes)
    bar = Progress(total, "fastattn bench", progress)
    rows: list[dict] = []
    load_at_start = load_average()
    started = time.perf_counter()
    try:
        for dtype_name in p.dtypes:
            for w in p.workloads:
                visible_fraction = workload_visible_fraction(w)
                if deadline.passed():
                    for provider in providers:
                        for mode in p.modes:
                            rows.append({**_bench_row(provider, w, dtype_name, visible_fraction, mode),
                                         **deadline.row_update()})
                            bar.step(f"{provider.name} {w.name} {mode} (over time)")
                    continue
                case = make_case(w, DTYPES[dtype_name], device)
                for provider in providers:
                    rows += _bench_provider(provider, case, dtype_name, visible_fraction, p, device,
                                            explicit and provider.name != BASELINE, bar)
                del case
                _free(device)
    finally:
        bar.close()
    add_speedups(rows)
    doc = {
        "schema": SCHEMA,
        "kind": "bench",
        "preset": p.name,
        "environment": environment(device),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "flop_formula": "fwd = 4*B*Hq*Lq*Lk*D*visible_fraction; bwd = 2.5*fwd; fwd+bwd = 3.5*fwd",
        "timing": "triton.testing.do_bench, every call (CUDA events): median, min, quartiles, max" if device.type == "cuda"
        else f"time.perf_counter of {p.min_repeats}..{p.max_repeats} calls after 1 warm-up (the memory call), up to "
        f"{p.noisy_max_repeats} when their spread (IQR / median) exceeds {NOISY_SPREAD:g}: median, min, quartiles, max",
        "load_average_start": load_at_start,
        "memory": "peak bytes allocated during the call above what was live before it "
        + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(torch.profiler profile_memory)"),
        "max_seconds": config.max_seconds,
        "providers": status,
        "results": rows,
    }
    if device.type == "cuda":
        from .ceilings import measure_ceilings

        try:
            doc["ceilings"] = measure_ceilings(device)
        except Exception as exc:  # noqa: BLE001 -- recorded, never fatal
            doc["ceilings"] = {"error": _short_error(exc)}
    return doc


def _bench_row(provider: Provider, w: Workload, dtype_name: str, visible_fraction: float, mode: str) -> dict:
    """One result row before measuring: the configuration, its FLOPs, status ok and no numbers yet."""
    return {"provider": provider.name, **_workload_fields(w), "dtype": dtype_name, "visible_fraction": visible_fraction,
            "mode": mode, "flops": flops(w, mode, visible_fraction), "status": "ok", "time_ms": None, "time_min_ms": None,
            "time_q1_ms": None, "time_q3_ms": None, "time_max_ms": None, "spread": None, "repeats": None, "tflops": None, "peak_mem_bytes": None, "speedup_vs_sdpa": None}


def _bench_provider(provider: Provider, case, dtype_name: str, visible_fraction: float, p: Preset,
                    device: torch.device, explicit: bool, bar: Progress) -> list[dict]:
    w = case.workload
    rows = []
    run = None
    build_failure: dict | None = None
    try:
        run = provider.build(case, explicit=explicit)
    except Unsupported as exc:
        build_failure = {"status": "unsupported", "reasons": exc.reasons}
    except Exception as exc:  # noqa: BLE001 -- recorded, never fatal
        build_failure = {"status": "oom" if is_out_of_memory(exc) else "error", "error": _short_error(exc)}
    for mode in p.modes:
        row = _bench_row(provider, w, dtype_name, visible_fraction, mode)
        if build_failure is not None:
            row.update(build_failure)
        elif mode != "fwd" and run.no_backward:
            row.update(status="unsupported", reasons=run.no_backward)
        else:
            fn = None
            try:
                fn = mode_fn(run, mode)
                if device.type == "cuda":
                    fn()  # warm-up: compilation, autotuning and workspaces stay out of the peak
                # On CPU the profiled call is the warm-up (it counts tensor allocations only).
                row["peak_mem_bytes"] = peak_memory(fn, device)
                row.update(time_call(fn, device, p))
                row["tflops"] = row["flops"] / (row["time_ms"] * 1e-3) / 1e12
            except Exception as exc:  # noqa: BLE001 -- recorded, never fatal
                row.update(status="oom" if is_out_of_memory(exc) else "error", error=_short_error(exc),
                           peak_mem_bytes=None)
            del fn
            _free(device)
        rows.append(row)
        bar.step(f"{provider.name} {w.name} {mode}")
    del run
    return rows


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_sdpa = time(sdpa) / time(provider)`` for the same workload, dtype and mode (>1 = faster)."""
    def key(r):
        return (r["name"], r["dtype"], r["mode"])

    baseline = {key(r): r["time_ms"] for r in rows if r["provider"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        ref = baseline.get(key(r))
        if r["status"] == "ok" and ref:
            r["speedup_vs_sdpa"] = ref / r["time_ms"]


# --------------------------------------------------------------------------------------- memory
@dataclass
class MemoryConfig:
    """What one ``fastattn memory`` run measures."""

    device: torch.device
    kind: str = "dense"
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "fp32"
    seq_lens: tuple[int, ...] = (128, 256, 512, 1024)
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    budget_bytes: int = 4 << 30
    providers: list[str] | None = None
    max_seconds: float | None = None  # start no measurement after this many seconds (None = no limit)


def memory_config(quick: bool = True, device: str | None = None, *, providers=None, kind: str = "dense",
                  seq_lens: list[int] | None = None, dtype: str | None = None,
                  budget_gib: float | None = None, max_seconds: float | None = None) -> MemoryConfig:
    """The memory-profile preset (``quick`` or full) for ``device``, with the CLI's overrides."""
    device = _device(device)
    if kind not in WORKLOAD_KINDS or kind == "block_sparse":
        raise ValueError(f"--workloads for memory must be one of dense, causal, window, gqa; got {kind!r}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        lens = (1024, 4096, 16384) if quick else tuple(1024 << i for i in range(8))  # 1k .. 128k
        cfg = MemoryConfig(device, kind, 1, 16, 128, "bf16", lens, budget_bytes=int(total * 0.9))
    else:
        lens = (128, 256, 512, 1024) if quick else tuple(256 << i for i in range(9))  # 256 .. 64k
        cfg = MemoryConfig(device, kind, 1, 4, 64, "fp32", lens, budget_bytes=4 << 30)
    if seq_lens:
        cfg.seq_lens = tuple(sorted(seq_lens))
    if dtype:
        if dtype not in DTYPES:
            raise ValueError(f"--dtypes: unknown {dtype!r}; choose from {', '.join(DTYPES)}")
        cfg.dtype = dtype
    if budget_gib is not None:
        if budget_gib <= 0:
            raise ValueError(f"--memory-budget must be > 0 GiB, got {budget_gib}")
        cfg.budget_bytes = int(budget_gib * (1 << 30))
    Deadline(max_seconds)  # validates it
    cfg.providers = providers
    cfg.max_seconds = max_seconds
    return cfg


def _memory_workload(cfg: MemoryConfig, L: int) -> Workload:
    heads_kv = max(1, cfg.heads // 4) if cfg.kind == "gqa" else cfg.heads
    window = (min(256, L), 0) if cfg.kind == "window" else None
    return Workload(cfg.kind, cfg.batch, cfg.heads, heads_kv, L, cfg.head_dim, window=window)


def run_memory(cfg: MemoryConfig, progress: bool = True) -> dict:
    """Peak memory of each provider's forward and forward+backward against sequence length.

    Lengths go up in ``cfg.seq_lens`` until one runs out of memory (recorded as ``"oom"``) or,
    extrapolating the growth of the last two lengths (quadratic until two are known), would exceed
    ``cfg.budget_bytes`` (recorded as ``"over_budget"``) -- so a CPU run never eats the machine.
    Once ``cfg.max_seconds`` have passed, the measurements left are recorded as ``"over_time"``.
    """
    from .report import environment

    deadline = Deadline(cfg.max_seconds)
    providers, status = resolve(cfg.providers, cfg.device)
    explicit = cfg.providers is not None
    total = len(providers) * len(cfg.modes) * len(cfg.seq_lens)
    bar = Progress(total, "fastattn memory", progress)
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        for provider in providers:
            for mode in cfg.modes:
                history: list[tuple[int, int]] = []
                stop: dict | None = None
                for L in cfg.seq_lens:
                    w = _memory_workload(cfg, L)
                    row = {"provider": provider.name, **_workload_fields(w), "dtype": cfg.dtype, "mode": mode,
                           "status": "ok", "peak_mem_bytes": None}
                    predicted = _predict(history, L)
                    if stop is None and predicted is not None and predicted > cfg.budget_bytes:
                        stop = {"status": "over_budget",
                                "reasons": [f"predicted peak {predicted / 2**30:.2f} GiB exceeds the budget "
                                            f"{cfg.budget_bytes / 2**30:.2f} GiB (--memory-budget)"]}
                    if stop is not None:
                        row.update(stop)
                    elif deadline.passed():
                        row.update(deadline.row_update())
                    else:
                        row.update(_measure_memory(provider, w, cfg, mode, explicit and provider.name != BASELINE))
                        if row["status"] == "ok":
                            history.append((L, row["peak_mem_bytes"]))
                        elif row["status"] == "oom":
                            stop = {"status": "oom", "reasons": [f"ran out of memory at L={L}"]}
                    rows.append(row)
                    bar.step(f"{provider.name} L={L} {mode}")
            _free(cfg.device)
    finally:
        bar.close()
    return {
        "schema": SCHEMA,
        "kind": "memory",
        "preset": "memory",
        "environment": environment(cfg.device),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "memory": "peak bytes allocated during the call above what was live before it "
        + ("(torch.cuda.max_memory_allocated)" if cfg.device.type == "cuda" else "(torch.profiler profile_memory)"),
        "budget_bytes": cfg.budget_bytes,
        "max_seconds": cfg.max_seconds,
        "providers": status,
        "results": rows,
    }


def _predict(history: list[tuple[int, int]], L: int) -> float | None:
    """Peak bytes expected at length ``L`` from the measured ``(length, bytes)`` points."""
    if not history:
        return None
    L1, m1 = history[-1]
    if len(history) >= 2:
        L0, m0 = history[-2]
        exponent = math.log(max(m1, 1) / max(m0, 1)) / math.log(L1 / L0) if m0 > 0 and L1 != L0 else 2.0
        exponent = min(max(exponent, 1.0), 2.0)
    else:
        exponent = 2.0
    return m1 * (L / L1) ** exponent


def _measure_memory(provider: Provider, w: Workload, cfg: MemoryConfig, mode: str, explicit: bool) -> dict:
    case = run = fn = None
    try:
        case = make_case(w, DTYPES[cfg.dtype], cfg.device)
        run = provider.build(case, explicit=explicit)
        if mode != "fwd" and run.no_backward:
            return {"status": "unsupported", "reasons": run.no_backward}
        fn = mode_fn(run, mode)
        if cfg.device.type == "cuda":
            fn()  # warm-up: one-time workspaces and compilation are not the attention's memory
        return {"peak_mem_bytes": peak_memory(fn, cfg.device)}
    except Unsupported as exc:
        return {"status": "unsupported", "reasons": exc.reasons}
    except Exception as exc:  # noqa: BLE001 -- recorded, never fatal
        return {"status": "oom" if is_out_of_memory(exc) else "error", "error": _short_error(exc)}
    finally:
        del case, run, fn
        _free(cfg.device)
