"""The ``fastattn`` command (also ``python -m fastattn``)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .info import info, info_dict

    if args.json:
        print(json.dumps(info_dict(), indent=2))
    else:
        info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn: fused attention kernels for PyTorch")
    parser.add_argument("--version", action="version", version=f"fastattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and which backends are usable here (and why not)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a report")
    p.set_defaults(func=_cmd_info)
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


def _csv(kind):
    """argparse type: a comma-separated list of ``kind``."""

    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from exc

    return parse


def _cmd_bench(args) -> int:
    import time

    from . import bench

    name = "full" if args.full else "gpu" if args.gpu else "cpu" if args.cpu else "linear" if args.linear else "quick"
    try:
        config = bench.bench_config(
            name, args.device, providers=args.providers, workloads=args.workloads, modes=args.modes,
            dtypes=args.dtypes, seq_lens=args.seq_lens, head_dims=args.head_dims, max_seconds=args.max_seconds,
        )
    except ValueError as exc:
        print(f"fastattn bench: error: {exc}", file=sys.stderr)
        return 2
    _warn_if_busy(config.device)
    start = time.perf_counter()
    doc = bench.run_bench(config, progress=not args.no_progress)
    print(bench.bench_table(doc))
    print(f"\n{len(doc['results'])} configurations in {time.perf_counter() - start:.1f}s on {doc['environment']['device_name']}")
    return _finish(doc, bench.save_bench(doc, args.out, plots=not args.no_plots), args)


def _finish(doc: dict, paths: dict, args) -> int:
    """After the table: the providers not measured and why, the files written, a missing plotter."""
    from .bench import plotting_unavailable, skipped_providers

    skipped = skipped_providers(doc)
    if skipped:
        print(skipped)
    for path in paths.values():
        print(f"wrote {path}")
    if not args.no_plots and plotting_unavailable():
        print(f"no plots: {plotting_unavailable()}")
    return _report_errors(doc)


def _report_errors(doc: dict) -> int:
    """Exit status 1 when a fastattn backend failed (not: declined, or ran out of memory); other
    providers' failures are recorded in the results but are not ours to fail on."""
    errors = [r for r in doc["results"] if r["status"] == "error" and r["provider"].startswith("fastattn-")]
    for r in errors:
        print(f"error: {r['provider']} {r['name']} {r['dtype']} {r['mode']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


def _warn_if_busy(device) -> None:
    """CPU timings on a machine busier than its core count are mostly waiting: say so up front."""
    import os

    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            print(f"warning: load average {load:.1f} on {cores} cores -- other processes compete for the CPU, "
                  "so these timings are slower and noisier than the kernels are", file=sys.stderr)


def _cmd_memory(args) -> int:
    import time

    from . import bench

    try:
        config = bench.memory_config(
            not args.full, args.device, providers=args.providers, kind=args.workload, seq_lens=args.seq_lens,
            dtype=args.dtype, budget_gib=args.memory_budget, max_seconds=args.max_seconds,
        )
    except ValueError as exc:
        print(f"fastattn memory: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    doc = bench.run_memory(config, progress=not args.no_progress)
    print(bench.memory_table(doc))
    print(f"\n{len(doc['results'])} measurements in {time.perf_counter() - start:.1f}s on {doc['environment']['device_name']}")
    return _finish(doc, bench.save_memory(doc, args.out, plots=not args.no_plots), args)


def _cmd_attention_map(args) -> int:
    from . import analysis

    return analysis.cli_main(args)


def _add_common(p, out_default: str) -> None:
    p.add_argument("--providers", type=_csv(str), help="comma-separated providers (default: every usable one); "
                   "fastattn backends as fastattn-<name> or <name>, sdpa, sdpa-flash, sdpa-efficient, sdpa-cudnn, "
                   "sdpa-math, flex, flash-attn, xformers. torch SDPA is always measured as the baseline")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--seq-lens", type=_csv(int), help="comma-separated sequence lengths (replace the preset's)")
    p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-seconds", type=float, metavar="S",
                   help="start no measurement after S seconds; the rest are recorded as over_time (default: no limit)")


def _register_bench(sub) -> None:
    from .bench.workloads import WORKLOAD_KINDS

    p = sub.add_parser("bench", help="time every usable provider on dense/causal/window/block-sparse/GQA/varlen "
                                     "workloads (and linear attention, KV-cache decoding)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick preset (default; minutes at most)")
    which.add_argument("--full", action="store_true", help="the full preset: more lengths, head dims, dtypes")
    which.add_argument("--gpu", action="store_true", help="the GPU speed-target preset (bf16, 16k tokens, D=128)")
    which.add_argument("--cpu", action="store_true",
                       help="the C++ CPU kernels' target preset (fastattn-cpu vs SDPA, fp32, L 1k..16k; about a minute on 2 cores)")
    which.add_argument("--linear", action="store_true",
                       help="causal linear attention vs exact causal attention, L 4k..64k (a few minutes on 2 cores)")
    _add_common(p, "bench_out")
    p.add_argument("--workloads", type=_csv(str), help="comma-separated: " + ",".join(WORKLOAD_KINDS))
    p.add_argument("--modes", type=_csv(str), help="comma-separated: fwd,bwd,fwd+bwd")
    p.add_argument("--dtypes", type=_csv(str), help="comma-separated: fp16,bf16,fp32")
    p.add_argument("--head-dims", type=_csv(int), help="comma-separated head dims (replace the preset's)")
    p.set_defaults(func=_cmd_bench)
    from .bench.context_parallel import add_cli_mode  # fastattn bench --context-parallel

    add_cli_mode(p)
    from .bench.decode import add_cli_mode as add_decode_mode  # fastattn bench --decode

    add_decode_mode(p)


def _register_memory(sub) -> None:
    p = sub.add_parser("memory", help="peak memory of forward and forward+backward against sequence length")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the quick preset (default; well under a minute on CPU)")
    which.add_argument("--full", action="store_true", help="longer lengths, up to out-of-memory or the budget")
    _add_common(p, "memory_out")
    p.add_argument("--workload", default="dense", choices=("dense", "causal", "window", "gqa"),
                   help="the attention pattern profiled (default dense)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--memory-budget", type=float, metavar="GIB",
                   help="stop a provider's sweep before its predicted peak exceeds this (default: 4 GiB on CPU, "
                   "90%% of the card on CUDA)")
    p.set_defaults(func=_cmd_memory)


def _register_attention_map(sub) -> None:
    p = sub.add_parser("attention-map", help="attention heatmaps and per-head statistics of a small example model")
    p.add_argument("--layers", type=_csv(int), help="layer indices to capture (default: all)")
    p.add_argument("--heads", type=_csv(int), help="head indices to plot (default: all)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens in the example input (default 64)")
    p.add_argument("--num-layers", type=int, default=2, help="layers of the example model (default 2)")
    p.add_argument("--num-heads", type=int, default=4, help="heads of the example model (default 4)")
    p.add_argument("--causal", action="store_true", help="a causal (decoder-style) example model")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the example model's random weights and input tokens (default 0)")
    p.add_argument("--out", default="attention_maps", help="output folder (default attention_maps)")
    p.set_defaults(func=_cmd_attention_map)


_SUBCOMMANDS: list = [_register_bench, _register_memory, _register_attention_map]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `fastattn`: what it can do
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
