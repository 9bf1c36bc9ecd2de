"""Helpers of benchmarks/gpu_check.sh: merge a run's results into one file, and print the summary table.

    python benchmarks/gpu_summary.py assemble --work DIR --out OUT [--results-dir benchmarks/results]
    python benchmarks/gpu_summary.py summary --out OUT --stages build=ok,tests=fail,...

``assemble`` folds ``DIR/memory/memory.json`` into ``DIR/bench/bench.json`` (key ``memory_profile``),
writes it as ``OUT/bench.json``, and copies it (plus the TFLOP/s and memory plots) to
``benchmarks/results/<YYYY-MM-DD>-<gpu>.json`` / ``-tflops.png`` / ``-memory.png`` for a human to commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def assemble(work: Path, out: Path, results_dir: Path | None) -> int:
    bench_path = work / "bench" / "bench.json"
    if not bench_path.exists():
        print(f"assemble: no benchmark results at {bench_path}", file=sys.stderr)
        return 1
    doc = json.loads(bench_path.read_text())
    memory_path = work / "memory" / "memory.json"
    if memory_path.exists():
        memory = json.loads(memory_path.read_text())
        doc["memory_profile"] = {k: memory[k] for k in ("memory", "budget_bytes", "results", "wall_time_s") if k in memory}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    for name in ("bench.csv", "bench_tflops.png", "bench_density.png"):
        if (work / "bench" / name).exists():
            shutil.copy(work / "bench" / name, out / name)
    if (work / "memory" / "memory.png").exists():
        shutil.copy(work / "memory" / "memory.png", out / "memory.png")
    if results_dir is not None:
        env = doc["environment"]
        date = env["created_utc"][:10] if env.get("created_utc") else datetime.date.today().isoformat()
        stem = f"{date}-{env.get('device_slug', 'gpu')}"
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
        for src, suffix in ((work / "bench" / "bench_tflops.png", "tflops"), (work / "memory" / "memory.png", "memory")):
            if src.exists():
                shutil.copy(src, results_dir / f"{stem}-{suffix}.png")
        print(f"copied the results to {results_dir / (stem + '.json')} (commit it, then run "
              f"python benchmarks/update_readme_table.py)")
    return 0


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def summary(out: Path, stages: str) -> int:
    lines = ["", "=" * 78, "gpu_check summary", "=" * 78]
    for item in filter(None, stages.split(",")):
        name, _, status = item.partition("=")
        lines.append(f"  stage {name:<12} {status}")
    bench_path = out / "bench.json"
    if bench_path.exists():
        doc = json.loads(bench_path.read_text())
        env = doc["environment"]
        lines.append(f"  device {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
                     f"CUDA {env['cuda']} | commit {(env.get('commit') or '?')[:10]}")
        ceil = doc.get("ceilings", {})
        peak = ceil.get("matmul_bf16_tflops")
        lines.append(f"  ceilings: bf16 matmul {_fmt(peak, '.1f')} TFLOP/s, d2d copy {_fmt(ceil.get('copy_gbps'), '.0f')} GB/s"
                     + (f" ({ceil['error']})" if "error" in ceil else ""))
        rows = doc["results"]
        configs = list(dict.fromkeys((r["name"], r["dtype"], r["mode"]) for r in rows))
        width = max([len(f"{n} {d} {m}") for n, d, m in configs] + [13])
        header = f"  {'configuration':<{width}} {'best fastattn':<14} {'TFLOP/s':>8} {'%peak':>6} {'sdpa':>8} {'x sdpa':>7}"
        lines += ["", header, "  " + "-" * (len(header) - 2)]
        for name, dtype, mode in configs:
            group = [r for r in rows if (r["name"], r["dtype"], r["mode"]) == (name, dtype, mode)]
            ours = [r for r in group if r["provider"].startswith("fastattn-") and r["provider"] != "fastattn-reference"
                    and r["status"] == "ok"]
            sdpa = next((r for r in group if r["provider"] == "sdpa" and r["status"] == "ok"), None)
            best = max(ours, key=lambda r: r["tflops"], default=None)
            lines.append(
                f"  {f'{name} {dtype} {mode}':<{width}} {(best['provider'][9:] if best else 'none ok'):<14} "
                f"{_fmt(best and best['tflops'], '8.3g'):>8} "
                f"{_fmt(best and peak and 100 * best['tflops'] / peak, '5.0f'):>6} "
                f"{_fmt(sdpa and sdpa['tflops'], '8.3g'):>8} {_fmt(best and best['speedup_vs_sdpa'], '6.2f'):>7}"
            )
    else:
        lines.append("  no benchmark results (see gpu_check.log)")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("assemble")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    a.add_argument("--no-results-copy", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--stages", default="")
    args = parser.parse_args(argv)
    if args.command == "assemble":
        return assemble(args.work, args.out, None if args.no_results_copy else args.results_dir)
    return summary(args.out, args.stages)


if __name__ == "__main__":
    sys.exit(main())
