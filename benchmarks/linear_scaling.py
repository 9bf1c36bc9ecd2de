"""Linear attention's scaling and speed from a ``fastattn bench --linear`` results file.

    python benchmarks/linear_scaling.py benchmarks/results/<date>-cpu-linear.json

For each provider on the ``linear`` workload: the exponent ``p`` of ``time ~ L^p`` (and of peak
memory) fitted by least squares on log-log between the shortest and the longest length, and at
L = 32768 the time of exact causal attention (``fastattn-cpu``, ``sdpa``) over linear attention's.
"""

from __future__ import annotations

import argparse
import json
import math


def fit_exponent(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of ``log(value)`` against ``log(length)``."""
    if len(lengths) < 2:
        raise ValueError(f"need at least two lengths to fit an exponent, got {lengths}")
    xs, ys = [math.log(x) for x in lengths], [math.log(y) for y in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summary(doc: dict, at_length: int = 32768, mode: str = "fwd") -> dict:
    """``{"exponents": {provider: {"time": p, "memory": p or None, "lengths": [...]}},
    "speedup_at": {linear provider: {exact provider: ratio}}}`` of the ``linear`` rows that ran."""
    rows = [r for r in doc["results"] if r["workload"] == "linear" and r["mode"] == mode and r["status"] == "ok"]
    by_provider: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_provider.setdefault(r["provider"], {})[r["seqlen"]] = r
    exponents = {}
    for provider, cells in by_provider.items():
        lengths = sorted(cells)
        if len(lengths) < 2:
            continue
        memory = [cells[L]["peak_mem_bytes"] for L in lengths]
        exponents[provider] = {
            "lengths": lengths,
            "time": fit_exponent(lengths, [cells[L]["time_ms"] for L in lengths]),
            "memory": fit_exponent(lengths, memory) if all(m for m in memory) else None,
        }
    speedups = {}
    for linear in (p for p in by_provider if p.startswith("linear-")):
        if at_length not in by_provider[linear]:
            continue
        base = by_provider[linear][at_length]["time_ms"]
        speedups[linear] = {
            exact: cells[at_length]["time_ms"] / base
            for exact, cells in by_provider.items() if not exact.startswith("linear-") and at_length in cells
        }
    return {"exponents": exponents, "speedup_at": speedups, "length": at_length, "mode": mode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a fastattn bench --linear JSON file")
    parser.add_argument("--length", type=int, default=32768, help="length of the speed comparison (default 32768)")
    args = parser.parse_args()
    with open(args.results) as f:
        s = summary(json.load(f), args.length)
    for provider, e in s["exponents"].items():
        memory = "n/a" if e["memory"] is None else f"{e['memory']:.2f}"
        print(f"{provider:20s} time ~ L^{e['time']:.2f}, peak memory ~ L^{memory} "
              f"(L {e['lengths'][0]}..{e['lengths'][-1]})")
    for linear, ratios in s["speedup_at"].items():
        for exact, ratio in ratios.items():
            print(f"L={s['length']}: {exact} (exact causal) takes {ratio:.1f}x the time of {linear}")


if __name__ == "__main__":
    main()
