"""Where results go: the environment record, JSON, CSV and the terminal tables."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .runner import NOISY_SPREAD

CSV_COLUMNS = (
    "provider", "workload", "name", "dtype", "mode", "batch", "heads_q", "heads_kv", "seqlen", "head_dim",
    "window", "density", "block_size", "visible_fraction", "flops", "status", "time_ms", "time_min_ms",
    "time_q1_ms", "time_q3_ms", "time_max_ms", "spread", "repeats", "tflops",
    "peak_mem_bytes", "speedup_vs_sdpa", "reasons", "error",
)


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(env: dict) -> str:
    """Short lowercase name of the device for file names: ``h100``, ``h200``, ``a100``, ``cpu``."""
    if env["device"] != "cuda":
        return "cpu"
    name = env["device_name"].lower()
    match = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, averaged), or None where the OS has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict:
    """Device, host, versions, commit and fastattn's backend status: what every result carries."""
    from .. import __version__
    from ..info import info_dict

    info = info_dict()
    cuda = device.type == "cuda"
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes competing for the cores make CPU timings noisy; the record says how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "triton": info["triton"],
        "fastattn": __version__,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "extension": info["extension"],
        "backends": info["backends"],
    }
    env["device_slug"] = device_slug(env)
    return env


def write_json(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def write_csv(doc: dict, path: str | Path) -> Path:
    """One row per configuration; list fields as JSON text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in doc["results"]:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path


def _cell(row: dict | None, field: str, fmt: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return {"unsupported": "n/a", "oom": "oom", "over_budget": "budget", "over_time": "time"}.get(row["status"], "error")
    value = row.get(field)
    return "" if value is None else format(value, fmt)


def _time_cell(row: dict | None) -> str:
    """``median ±spread%`` (the spread: interquartile range / median), ``!`` marking a noisy cell."""
    text = _cell(row, "time_ms", ".3g")
    if row is None or row["status"] != "ok" or row.get("spread") is None:
        return text
    return f"{text} ±{100 * row['spread']:.0f}%" + ("!" if row["spread"] > NOISY_SPREAD else "")


def _grid(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) if i >= 1 else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(c.rjust(w) if i >= 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


# A headline needs most cells steady: at most this fraction of timed cells may be noisy.
MAX_NOISY_FRACTION = 0.25


def headline_blockers(doc: dict) -> list[str]:
    """Why the speedup summary of ``doc`` cannot be trusted (empty: it can).

    CPU runs: the machine was oversubscribed -- the 1-minute load average, at the start or the end of
    the run, exceeded the core count by more than one half (the benchmark's own threads count up to one
    core each, so a quiet machine reads about its thread count). Any device: more than
    :data:`MAX_NOISY_FRACTION` of the timed cells have a spread above :data:`NOISY_SPREAD` even after
    the extra calls.
    """
    env = doc["environment"]
    why = []
    if env.get("device") == "cpu":
        cores = env.get("cpu_count") or 1
        loads = [x for x in (doc.get("load_average_start"), (env.get("load_average") or [None])[0]) if x is not None]
        if loads and max(loads) > cores + 0.5:
            why.append(f"the machine was oversubscribed: load average {max(loads):.1f} on {cores} cores "
                       "(other processes took the CPU for part of the run)")
    timed = [r for r in doc["results"] if r["status"] == "ok" and r.get("spread") is not None]
    noisy = [r for r in timed if r["spread"] > NOISY_SPREAD]
    if timed and len(noisy) > MAX_NOISY_FRACTION * len(timed):
        why.append(f"{len(noisy)} of {len(timed)} cells are noisy (interquartile range over "
                   f"{100 * NOISY_SPREAD:.0f}% of the median, marked !)")
    return why


def bench_table(doc: dict) -> str:
    """Median milliseconds ± spread per configuration (rows) and provider (columns), then the
    geometric-mean speedup over torch SDPA per provider and mode -- or, when
    :func:`headline_blockers` finds the run untrustworthy, why there is none and how to re-run.
    ``n/a`` = the provider cannot serve it."""
    rows = doc["results"]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    configs = list(dict.fromkeys((r["name"], r["dtype"], r["mode"]) for r in rows))
    index = {(r["name"], r["dtype"], r["mode"], r["provider"]): r for r in rows}
    lines = [[f"{name} {dtype} {mode}", *(_time_cell(index.get((name, dtype, mode, p))) for p in providers)]
             for name, dtype, mode in configs]
    text = ["median time (ms) ± spread (interquartile range of the repeats as % of the median; ! = noisy)",
            _grid(["configuration", *providers], lines), ""]
    blockers = headline_blockers(doc)
    if blockers:
        cores = doc["environment"].get("cpu_count") or 1
        text += ["no speedup summary: " + "; ".join(blockers) + ".",
                 "The cells above are medians of what ran, but ratios between them would mostly measure the other load.",
                 f"Re-run the same command (e.g. `fastattn bench --quick`) when the machine is quiet: `uptime` showing a "
                 f"1-minute load average below {cores + 0.5:g} for these {cores} cores, with nothing else running."]
        return "\n".join(text)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    summary = []
    for p in providers:
        cells = []
        for mode in modes:
            s = [r["speedup_vs_sdpa"] for r in rows if r["provider"] == p and r["mode"] == mode and r["speedup_vs_sdpa"]]
            cells.append(f"{math.exp(sum(math.log(x) for x in s) / len(s)):.2f}x ({len(s)})" if s else "")
        best = max((r["tflops"] for r in rows if r["provider"] == p and r["tflops"]), default=None)
        summary.append([p, *cells, "" if best is None else f"{best:.3g}"])
    text += ["speedup over torch SDPA (geometric mean over configurations, count in brackets); best TFLOP/s",
             _grid(["provider", *modes, "best TFLOP/s"], summary)]
    return "\n".join(text)


def skipped_providers(doc: dict) -> str:
    """One line per provider that was not measured, and why (empty when every known one ran)."""
    lines = [f"  {name}: {'; '.join(s['reasons']) or 'not asked for (--providers)'}"
             for name, s in doc.get("providers", {}).items() if not s["selected"]]
    return "not measured here:\n" + "\n".join(lines) if lines else ""


def memory_table(doc: dict) -> str:
    """Peak MiB per provider and mode (rows) and sequence length (columns)."""
    rows = doc["results"]
    lens = sorted({r["seqlen"] for r in rows})
    keys = list(dict.fromkeys((r["provider"], r["mode"]) for r in rows))
    index = {(r["provider"], r["mode"], r["seqlen"]): r for r in rows}
    lines = []
    for provider, mode in keys:
        cells = []
        for L in lens:
            r = index.get((provider, mode, L))
            if r is not None and r["status"] == "ok":
                cells.append(f"{r['peak_mem_bytes'] / 2**20:.1f}")
            else:
                cells.append(_cell(r, "peak_mem_bytes", ""))
        lines.append([f"{provider} {mode}", *cells])
    return "peak memory (MiB) above the inputs\n" + _grid(["provider mode", *(f"L={L}" for L in lens)], lines)
