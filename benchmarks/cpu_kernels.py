"""Evidence for the C++ CPU kernels: fastattn's "cpu" backend against torch SDPA on the same inputs.

Cases (float32, B=1, H=4 unless said):
* dense, causal and not, forward and forward+backward, L in {1024, 2048} (+4096 with --long), D in {64, 128};
* sliding window (left 256, causal) at L = 16384, forward, against SDPA given the equivalent bool mask;
* block-sparse (random tile layouts, block 128) at densities 50/25/10 %, forward and forward+backward,
  against density x the time of our own dense kernel (and of SDPA).

Times are medians of wall-clock repeats after a warm-up, with torch.set_num_threads(--threads).
Writes benchmarks/results/cpu-<date>.json with torch version, commit and CPU model.

    python benchmarks/cpu_kernels.py [--threads 2] [--long] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn import BlockMask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make(B, H, L, D, requires_grad):
    return [torch.randn(B, H, L, D, requires_grad=requires_grad) for _ in range(3)]


def fwd_bwd(call, q, k, v, dout):
    out = call(q, k, v)
    torch.autograd.grad(out, (q, k, v), dout)


def cpu_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"model": model, "logical_cpus": os.cpu_count(), "torch_capability": torch.backends.cpu.get_cpu_capability()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def dense_cases(args, results):
    lengths = [1024, 2048] + ([4096] if args.long else [])
    for L in lengths:
        for D in (64, 128):
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    grad = mode == "fwd+bwd"
                    q, k, v = make(1, args.heads, L, D, grad)
                    dout = torch.randn_like(q)

                    def ours(q, k, v):
                        return fastattn.attention(q, k, v, causal=causal, backend="cpu")

                    def sdpa(q, k, v):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                    if grad:
                        t_ours = median_time(lambda: fwd_bwd(ours, q, k, v, dout), args.repeats)
                        t_sdpa = median_time(lambda: fwd_bwd(sdpa, q, k, v, dout), args.repeats)
                    else:
                        with torch.no_grad():
                            t_ours = median_time(lambda: ours(q, k, v), args.repeats)
                            t_sdpa = median_time(lambda: sdpa(q, k, v), args.repeats)
                    row = {"case": "dense", "causal": causal, "mode": mode, "B": 1, "H": args.heads, "L": L, "D": D,
                           "fastattn_cpu_s": t_ours, "torch_sdpa_s": t_sdpa, "ratio_ours_over_sdpa": t_ours / t_sdpa}
                    results.append(row)
                    print(json.dumps(row), flush=True)


def window_case(args, results):
    L, D, left = 16384, 64, 256
    q, k, v = make(1, args.heads, L, D, False)
    i = torch.arange(L)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left)  # (L, L) bool, 256 MiB
    with torch.no_grad():
        t_ours = median_time(lambda: fastattn.attention(q, k, v, window=(left, 0), backend="cpu"), args.repeats)
        t_sdpa = median_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 1, warmup=0)
        torch.testing.assert_close(
            fastattn.attention(q[:, :, :2048], k[:, :, :2048], v[:, :, :2048], window=(left, 0), backend="cpu"),
            F.scaled_dot_product_attention(q[:, :, :2048], k[:, :, :2048], v[:, :, :2048],
                                           attn_mask=mask[:2048, :2048]),
            atol=1e-4, rtol=1e-4,
        )
    row = {"case": "sliding_window", "window": [left, 0], "mode": "fwd", "B": 1, "H": args.heads, "L": L, "D": D,
           "fastattn_cpu_s": t_ours, "torch_sdpa_bool_mask_s": t_sdpa, "speedup_over_sdpa": t_sdpa / t_ours}
    results.append(row)
    print(json.dumps(row), flush=True)


def block_sparse_cases(args, results):
    L, D, block = 4096 if args.long else 2048, 64, 128
    n = L // block
    generator = torch.Generator().manual_seed(0)
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        q, k, v = make(1, args.heads, L, D, grad)
        dout = torch.randn_like(q)

        def timed(**kwargs):
            def call(q, k, v):
                return fastattn.attention(q, k, v, backend="cpu", **kwargs)

            if grad:
                return median_time(lambda: fwd_bwd(call, q, k, v, dout), args.repeats)
            with torch.no_grad():
                return median_time(lambda: call(q, k, v), args.repeats)

        t_dense = timed()
        if grad:
            t_sdpa = median_time(lambda: fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout), args.repeats)
        else:
            with torch.no_grad():
                t_sdpa = median_time(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        for density in (0.5, 0.25, 0.1):
            layout = torch.rand(n, n, generator=generator) < density
            layout[torch.arange(n), torch.arange(n)] = True  # every query block sees something
            block_mask = BlockMask.from_layout(layout, block_size=block)
            t = timed(block_mask=block_mask)
            actual = block_mask.density
            row = {"case": "block_sparse", "mode": mode, "B": 1, "H": args.heads, "L": L, "D": D, "block": block,
                   "density": actual, "fastattn_cpu_s": t, "density_x_dense_s": actual * t_dense,
                   "ratio_over_density_x_dense": t / (actual * t_dense), "density_x_sdpa_dense_s": actual * t_sdpa}
            results.append(row)
            print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long", action="store_true", help="add L=4096 dense cases and block-sparse at L=4096")
    parser.add_argument("--only", choices=("dense", "window", "block"), default=None)
    parser.add_argument("--out", default=None, help="output JSON (default benchmarks/results/cpu-<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    if args.only in (None, "dense"):
        dense_cases(args, results)
    if args.only in (None, "window"):
        window_case(args, results)
    if args.only in (None, "block"):
        block_sparse_cases(args, results)
    doc = {
        "benchmark": "cpu_kernels",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "fastattn_commit": commit(),
        "cpu": cpu_info(),
        "threads": args.threads,
        "timing": f"median of {args.repeats} wall-clock repeats after one warm-up",
        "results": results,
    }
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"cpu-{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
