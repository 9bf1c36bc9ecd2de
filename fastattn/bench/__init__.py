"""fastattn's benchmark suite and memory profiler (``fastattn bench``, ``fastattn memory``).

One runner (:mod:`.runner`), one FLOP formula (:func:`.workloads.flops`), one memory helper
(:func:`.memory.peak_memory`). Every results document carries the device, versions and commit.

Python use::

    from fastattn import bench
    doc = bench.run_bench(bench.bench_config("quick", seq_lens=[256]))
    bench.save_bench(doc, "bench_out")
"""

from __future__ import annotations

from pathlib import Path

from .memory import peak_memory
from .plots import plot_memory, plot_tflops_vs_seqlen, plot_time_vs_density, plotting_unavailable
from .providers import all_providers, resolve
from .report import bench_table, environment, headline_blockers, memory_table, skipped_providers, write_csv, write_json
from .runner import BenchConfig, MemoryConfig, bench_config, memory_config, run_bench, run_memory
from .workloads import Workload, flops, make_case, preset, visible_pairs, workload_visible_fraction


def save_bench(doc: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.csv`` and the plots (``bench_tflops.png``, ``bench_density.png``;
    none without matplotlib: :func:`plotting_unavailable` says so)."""
    out = Path(out_dir)
    paths = {"json": write_json(doc, out / "bench.json"), "csv": write_csv(doc, out / "bench.csv")}
    if plots and plotting_unavailable() is None:
        for key, fn, name in (("tflops_plot", plot_tflops_vs_seqlen, "bench_tflops.png"),
                              ("density_plot", plot_time_vs_density, "bench_density.png")):
            path = fn(doc, out / name)
            if path is not None:
                paths[key] = path
    return paths


def save_memory(doc: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write ``memory.json``, ``memory.csv`` and ``memory.png`` (no plot without matplotlib)."""
    out = Path(out_dir)
    paths = {"json": write_json(doc, out / "memory.json"), "csv": write_csv(doc, out / "memory.csv")}
    if plots and plotting_unavailable() is None:
        path = plot_memory(doc, out / "memory.png")
        if path is not None:
            paths["plot"] = path
    return paths


__all__ = [
    "BenchConfig", "MemoryConfig", "Workload", "all_providers", "bench_config", "bench_table", "environment",
    "flops", "headline_blockers", "make_case", "memory_config", "memory_table", "peak_memory", "plot_memory",
    "plot_time_vs_density", "plot_tflops_vs_seqlen", "plotting_unavailable", "preset", "resolve", "run_bench",
    "run_memory", "save_bench", "save_memory", "skipped_providers",
    "visible_pairs", "workload_visible_fraction",
]
