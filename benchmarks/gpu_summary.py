"""Helpers of benchmarks/gpu_check.sh: merge a run's results into one file, and print the summary table.

    python benchmarks/gpu_summary.py assemble --work DIR --out OUT [--results-dir benchmarks/results]
    python benchmarks/gpu_summary.py summary --out OUT --stages env=ok,tests=FAILED,... [--planned "env ..."] [--running NAME]

``summary`` writes ``OUT/summary.txt`` from the stages' statuses and whichever of ``OUT/smoke.json``,
``OUT/speed.json`` and ``OUT/bench.json`` exist; gpu_check.sh calls it after every stage, so a run cut off
anywhere leaves a summary of what it learned (planned stages it never began read ``not reached``).
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
    if (work / "bench" / "bench_tflops.png").exists():  # $OUT keeps to 8 files: no csv, no density plot
        shutil.copy(work / "bench" / "bench_tflops.png", out / "bench_tflops.png")
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


def _load(path: Path) -> dict | None:
    """A results file, or None when it is missing or unreadable (a run cut off mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_lines(planned: str, stages: str, running: str | None) -> list[str]:
    """One line per stage: its status, ``running`` for the one in flight, ``not reached`` for the rest."""
    done = {}
    for item in filter(None, stages.split(",")):
        name, _, status = item.partition("=")
        done[name] = status
    names = list(dict.fromkeys([*done, *planned.split()]))
    lines = []
    for name in names:
        status = done.get(name) or ("running (cut off here if this is the last summary)" if name == running
                                    else "not reached")
        lines.append(f"  stage {name:<12} {status}")
    return lines


def smoke_lines(doc: dict) -> list[str]:
    """Correctness: per backend the count of each status, then every case that did not pass."""
    rows = doc.get("results", [])
    lines = ["", "correctness (benchmarks/gpu_smoke.py correctness; forward + backward vs the reference)"]
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        counts = {s: sum(r["status"] == s for r in mine) for s in ("ok", "FAIL", "ERROR", "skipped", "not run")}
        lines.append(f"  {backend:<10} " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                     + f"  ({sum(r.get('seconds', 0) for r in mine):.0f}s)")
        for r in mine:
            if r["status"] != "ok":
                lines.append(f"    {r['status']:<7} {r['case']}: {r.get('detail', '')[:200]}")
    if not rows:
        lines.append("  no case finished")
    return lines


def speed_lines(doc: dict) -> list[str]:
    """Speed: per case and mode the median ms and TFLOP/s of every provider, and % of the matmul ceiling."""
    ceil = doc.get("ceilings", {})
    peak = ceil.get("matmul_bf16_tflops")
    lines = ["", "speed (benchmarks/gpu_smoke.py speed): median ms, TFLOP/s (T) and % of the bf16 matmul ceiling; decode GB/s"]
    if ceil:
        lines.append(f"  ceilings: bf16 matmul {_fmt(peak, '.1f')} TFLOP/s, copy {_fmt(ceil.get('copy_gbps'), '.0f')} GB/s"
                     + (f" ({ceil['error']})" if "error" in ceil else ""))
    rows = doc.get("results", [])
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    keys = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    if not keys:
        return [*lines, "  no measurement finished"]
    width = max(len(f"{c} {m}") for c, m in keys)
    lines.append(f"  {'case mode':<{width}} " + " ".join(f"{p:>17}" for p in providers))
    for case, mode in keys:
        cells = []
        for provider in providers:
            r = next((r for r in rows if (r["case"], r["mode"], r["provider"]) == (case, mode, provider)), None)
            if r is None:
                cells.append(f"{'-':>17}")
            elif r["status"] != "ok":
                cells.append(f"{r['status']:>17}")
            elif r["shape"][3] == 1 and "gbps" in r:  # decode: memory bound, GB/s is the measure
                cells.append(f"{r['ms']:.3g}ms {r['gbps']:.0f}GB/s".rjust(17))
            else:
                share = f" {100 * r['tflops'] / peak:.0f}%" if peak else ""
                cells.append(f"{r['ms']:.3g}ms {r['tflops']:.0f}T{share}".rjust(17))
        lines.append(f"  {f'{case} {mode}':<{width}} " + " ".join(cells))
    problems = [r for r in rows if r["status"] != "ok"]
    for r in problems:
        lines.append(f"    {r['status']:<7} {r['provider']} {r['case']} {r['mode']}: {r.get('detail', '')[:160]}")
    return lines


def bench_lines(doc: dict) -> list[str]:
    """The wider benchmark: per configuration the best fastattn backend against SDPA."""
    env = doc["environment"]
    lines = ["", "benchmark (fastattn bench)",
             f"  device {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
             f"CUDA {env['cuda']} | commit {(env.get('commit') or '?')[:10]}"]
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
    return lines


def summary(out: Path, stages: str, planned: str = "", running: str | None = None) -> int:
    """Writes ``out/summary.txt`` from the stages so far and whichever results files exist, and prints it."""
    lines = ["", "=" * 78, "gpu_check summary", "=" * 78, *stage_lines(planned, stages, running)]
    smoke = _load(out / "smoke.json")
    if smoke is not None:
        env = smoke.get("environment", {})
        lines.insert(4, f"  {env.get('device_name', env.get('device', '?'))} | torch {env.get('torch')} | "
                        f"triton {env.get('triton')} | CUDA {env.get('cuda')} | python {env.get('python')}")
        lines += smoke_lines(smoke)
    speed = _load(out / "speed.json")
    if speed is not None:
        lines += speed_lines(speed)
    bench = _load(out / "bench.json")
    if bench is not None:
        lines += bench_lines(bench)
    if smoke is None and speed is None and bench is None:
        lines.append("  no results yet (see gpu_check.log)")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.txt.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.txt")
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
    s.add_argument("--stages", default="", help="NAME=STATUS,... of the stages that ended")
    s.add_argument("--planned", default="", help="the stages of the run, space-separated, in order")
    s.add_argument("--running", default=None, help="the stage in flight")
    args = parser.parse_args(argv)
    if args.command == "assemble":
        return assemble(args.work, args.out, None if args.no_results_copy else args.results_dir)
    return summary(args.out, args.stages, args.planned, args.running)


if __name__ == "__main__":
    sys.exit(main())
