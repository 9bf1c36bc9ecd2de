"""Regenerate the README's performance table from the newest ``benchmarks/results/*.json``.

The table lives between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->`` in README.md
and is never typed by hand::

    python benchmarks/update_readme_table.py            # rewrite the table in README.md
    python benchmarks/update_readme_table.py --check    # exit 1 if README.md is out of date
    python benchmarks/update_readme_table.py --results benchmarks/results/2026-11-25-h100.json

"Newest" is the latest ``environment.created_utc`` among the results files that time dense or causal
attention (ties: file name); runs of one other workload family alone (varlen, linear) are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def newest_results(results_dir: Path) -> Path:
    candidates = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        # A headline run times plain attention (dense or causal workloads): a run of one workload
        # family alone (--workloads varlen, the --linear preset) has its own page in docs/.
        headline = any(r.get("workload") in ("dense", "causal") for r in doc.get("results") or ())
        if doc.get("kind") == "bench" and headline:
            candidates.append((doc["environment"].get("created_utc") or "", path.name, path))
    if not candidates:
        raise SystemExit(f"update_readme_table: no benchmark results (*.json with kind 'bench') in {results_dir}")
    return max(candidates)[2]


def _speedup(r: dict) -> str:
    return f" ({r['speedup_vs_sdpa']:.2f}x)" if r.get("speedup_vs_sdpa") else ""


def render_table(doc: dict, source: str) -> str:
    """Markdown: one row per workload and dtype, one column per mode; each cell the fastest fastattn
    backend (the reference excluded when a kernel backend ran), its TFLOP/s and its speedup over
    torch SDPA measured in the same run."""
    env = doc["environment"]
    rows = [r for r in doc["results"] if r["status"] == "ok"]
    kernel_backends = {r["provider"] for r in rows if r["provider"].startswith("fastattn-")} - {"fastattn-reference"}
    ours = kernel_backends or {"fastattn-reference"}
    modes = list(dict.fromkeys(r["mode"] for r in doc["results"]))
    configs = list(dict.fromkeys((r["name"], r["dtype"]) for r in doc["results"]))
    lines = [
        f"Measured on **{env['device_name']}** ({env['device']}, {env.get('torch_threads', '?')} threads)"
        if env["device"] == "cpu" else f"Measured on **{env['device_name']}**",
        f"with torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, fastattn {env['fastattn']} "
        f"at commit `{(env.get('commit') or 'unknown')[:10]}`, {env['created_utc'][:10]} "
        f"(`{source}`, preset `{doc.get('preset')}`).",
    ]
    ceilings = doc.get("ceilings") or {}
    if "matmul_bf16_tflops" in ceilings:
        lines.append(f"Ceilings measured in the same run: bf16 matmul {ceilings['matmul_bf16_tflops']} TFLOP/s, "
                     f"device-to-device copy {ceilings['copy_gbps']} GB/s.")
    lines += [
        "Each cell: the fastest fastattn backend, its FLOP rate (forward `4·B·Hq·L²·D` × visible fraction, "
        "backward 2.5×) and its speedup over torch SDPA (default backend) in the same run.",
        "",
        "| workload | dtype | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for name, dtype in configs:
        cells = []
        for mode in modes:
            candidates = [r for r in rows if r["name"] == name and r["dtype"] == dtype and r["mode"] == mode
                          and r["provider"] in ours]
            best = min(candidates, key=lambda r: r["time_ms"], default=None)
            if best is None:
                cells.append("—")
            else:
                rate = f"{best['tflops'] * 1e3:.3g} GFLOP/s" if env["device"] == "cpu" else f"{best['tflops']:.3g} TFLOP/s"
                cells.append(f"{best['provider'].removeprefix('fastattn-')} {rate}{_speedup(best)}")
        lines.append(f"| `{name}` | {dtype} | " + " | ".join(cells) + " |")
    plots = (("tflops", "FLOP rate against sequence length"), ("memory", "peak memory against sequence length"))
    for suffix, title in plots:
        plot = source.removesuffix(".json") + f"-{suffix}.png"
        if (ROOT / plot).exists():
            lines += ["", f"![{title}]({plot})"]
    return "\n".join(lines)


def update(readme: Path, table: str) -> tuple[str, str]:
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"update_readme_table: {readme} needs exactly one '{START}' followed by one '{END}'")
    before, rest = text.split(START)
    _, after = rest.split(END)
    return text, f"{before}{START}\n{table}\n{END}{after}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--results", type=Path, help="use this results file instead of the newest")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the README is out of date")
    args = parser.parse_args(argv)
    path = args.results or newest_results(args.results_dir)
    doc = json.loads(path.read_text())
    try:
        source = str(path.resolve().relative_to(ROOT))
    except ValueError:
        source = path.name
    old, new = update(args.readme, render_table(doc, source))
    if args.check:
        if old != new:
            print(f"{args.readme} is out of date with {source}; run python benchmarks/update_readme_table.py",
                  file=sys.stderr)
            return 1
        print(f"{args.readme} is up to date with {source}")
        return 0
    if old != new:
        args.readme.write_text(new)
        print(f"updated the performance table in {args.readme} from {source}")
    else:
        print(f"{args.readme} already up to date with {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
