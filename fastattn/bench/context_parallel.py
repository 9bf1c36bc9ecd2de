"""``fastattn bench --context-parallel``: context-parallel attention across processes.

For each world size it starts that many processes (gloo on CPU, NCCL on GPUs: one GPU per rank)
and measures, per scheme, on a causal self-attention of ``L`` tokens sharded zigzag:

* time of forward + backward per call (median over repeats, after a warm-up);
* per ring step: compute time (the local op calls) and the time spent waiting for the transfer
  that should have overlapped it ("exposed" communication), plus the time one K/V shard transfer
  takes on its own (no compute to hide it);
* per-rank peak memory of forward + backward (:func:`fastattn.bench.memory.peak_memory`: the
  allocator's peak on CUDA, torch.profiler's allocation trace on CPU), which should scale as
  ``L / world`` for ``ring``.

Python use::

    from fastattn.bench.context_parallel import run_context_parallel
    doc = run_context_parallel(world_sizes=[1, 2, 4], seq_len=4096)
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

SCHEMES = ("ring", "allgather", "ulysses")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_rank(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    """One rank: every scheme's timings, step records and peak memory, written as JSON."""
    from ..distributed import attention as cp
    from ..distributed import context_parallel_attention, shard
    from .memory import peak_memory

    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(cfg["threads"])
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=world, timeout=timedelta(seconds=300),
    )
    dtype = getattr(torch, cfg["dtype"])
    B, H, L, D = cfg["batch"], cfg["heads"], cfg["seq_len"], cfg["head_dim"]
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(B, H, L, D, generator=generator) for _ in range(4)]  # q, k, v, dout
    q, k, v, dout = (shard(t, layout="zigzag").to(device=device, dtype=dtype).contiguous() for t in full)
    del full
    rows = []
    for scheme in cfg["schemes"]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def step(leaves=leaves, scheme=scheme):
            out = context_parallel_attention(*leaves, scheme=scheme, layout="zigzag", causal=True, backend=cfg["backend"])
            out.backward(dout)
            return out

        row = {"scheme": scheme, "world": world, "rank": rank, "seq_len": L, "status": "ok"}
        try:
            step()  # warm-up
            times = []
            for _ in range(cfg["repeats"]):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            row["fwd_bwd_ms"] = 1e3 * statistics.median(times)
            cp.step_timings = []
            dist.barrier()
            step()
            row["steps"] = cp.step_timings
            cp.step_timings = None
            dist.barrier()
            row["peak_bytes"] = peak_memory(step, device)
        except Exception as exc:  # noqa: BLE001 -- recorded in the results
            cp.step_timings = None
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
    rows.append({"scheme": "kv_transfer", "world": world, "rank": rank, "seq_len": L, "status": "ok",
                 "transfer_ms": _transfer_ms(k, v, world, cfg["repeats"])})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def _transfer_ms(k: torch.Tensor, v: torch.Tensor, world: int, repeats: int) -> float | None:
    """Median time of one ring hop of a K/V shard with nothing to overlap it."""
    if world == 1:
        return None
    rank = dist.get_rank()
    times = []
    for _ in range(repeats + 1):
        received = [torch.empty_like(k), torch.empty_like(v)]
        dist.barrier()
        start = time.perf_counter()
        ops = [dist.P2POp(dist.isend, t, (rank + 1) % world) for t in (k, v)]
        ops += [dist.P2POp(dist.irecv, t, (rank - 1) % world) for t in received]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if k.is_cuda:
            torch.cuda.synchronize(k.device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:])


def run_context_parallel(
    world_sizes=(1, 2, 4), seq_len: int = 4096, *, schemes=SCHEMES, device: str | None = None, dtype: str | None = None,
    batch: int = 1, heads: int = 8, head_dim: int = 64, repeats: int = 3, backend: str | None = None,
) -> dict:
    """Measure every scheme at each world size; returns ``{"environment", "config", "results"}``.

    ``results`` has one row per (world size, scheme, rank) with ``fwd_bwd_ms``, ``peak_bytes`` and
    ``steps`` (per ring step: ``compute_s`` and exposed ``wait_s``), plus one ``kv_transfer`` row per
    rank with ``transfer_ms``.
    """
    import torch.multiprocessing as mp

    from .report import environment

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and max(world_sizes) > torch.cuda.device_count():
        raise ValueError(f"world size {max(world_sizes)} needs as many GPUs; {torch.cuda.device_count()} visible")
    for world in world_sizes:
        if seq_len % (2 * world):
            raise ValueError(f"seq_len {seq_len} must be divisible by 2 * world size {world} (zigzag)")
    cfg = {
        "device": device, "dtype": dtype or ("float32" if device == "cpu" else "bfloat16"), "batch": batch,
        "heads": heads, "seq_len": seq_len, "head_dim": head_dim, "schemes": list(schemes), "repeats": repeats,
        "backend": backend, "threads": 1,
    }
    results = []
    for world in world_sizes:
        with tempfile.TemporaryDirectory() as out_dir:
            mp.start_processes(_measure_rank, args=(world, _free_port(), cfg, out_dir), nprocs=world, start_method="spawn")
            for rank in range(world):
                results += json.loads(Path(out_dir, f"rank{rank}.json").read_text())
    return {"environment": environment(torch.device(device)), "config": cfg, "results": results}


def tables(doc: dict) -> str:
    """Markdown tables: per-rank peak memory and time per world size; per-step compute vs communication."""
    rows = [r for r in doc["results"] if r["scheme"] != "kv_transfer"]
    transfer = {r["world"]: r["transfer_ms"] for r in doc["results"] if r["scheme"] == "kv_transfer" and r["rank"] == 0}
    out = ["| scheme | world | L / world | fwd+bwd ms (rank 0) | peak MiB per rank (max over ranks) |",
           "|---|---|---|---|---|"]
    for scheme in doc["config"]["schemes"]:
        for world in sorted({r["world"] for r in rows}):
            group = [r for r in rows if r["scheme"] == scheme and r["world"] == world]
            if not group:
                continue
            if any(r["status"] != "ok" for r in group):
                out.append(f"| {scheme} | {world} | {group[0]['seq_len'] // world} | {group[0].get('error', 'error')} | |")
                continue
            peak = max(r["peak_bytes"] for r in group) / 2**20
            out.append(f"| {scheme} | {world} | {group[0]['seq_len'] // world} | {group[0]['fwd_bwd_ms']:.1f} | {peak:.1f} |")
    out += ["", "| scheme | world | pass | compute ms per step (mean over steps, ranks) | exposed wait ms per step | "
            "one K/V hop alone ms |", "|---|---|---|---|---|---|"]
    for scheme in doc["config"]["schemes"]:
        for world in sorted({r["world"] for r in rows}):
            group = [r for r in rows if r["scheme"] == scheme and r["world"] == world and r["status"] == "ok"]
            for pass_name in ("forward", "backward"):
                steps = [s for r in group for s in r["steps"] if s["pass"] == pass_name]
                if not steps:
                    continue
                compute = 1e3 * statistics.mean(s["compute_s"] for s in steps)
                wait = 1e3 * statistics.mean(s["wait_s"] for s in steps)
                hop = transfer.get(world)
                out.append(f"| {scheme} | {world} | {pass_name} | {compute:.2f} | {wait:.2f} | "
                           f"{'' if hop is None else format(hop, '.2f')} |")
    return "\n".join(out)


def add_cli_mode(parser) -> None:
    """Add ``--context-parallel`` (and its options) to the ``fastattn bench`` parser."""
    parser.add_argument("--context-parallel", action="store_true",
                        help="time context-parallel attention (ring/allgather/ulysses) across processes: compute vs "
                        "communication per step and per-rank peak memory; uses --seq-lens (first), --device, --out")
    parser.add_argument("--world-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4],
                        help="comma-separated process counts for --context-parallel (default 1,2,4)")
    parser.add_argument("--schemes", type=lambda s: [x.strip() for x in s.split(",")], default=list(SCHEMES),
                        help="comma-separated schemes for --context-parallel (default ring,allgather,ulysses)")
    bench = parser.get_default("func")
    parser.set_defaults(func=lambda args: _cli(args) if args.context_parallel else bench(args))


def _cli(args) -> int:
    import sys

    seq_len = args.seq_lens[0] if args.seq_lens else 4096
    head_dim = args.head_dims[0] if args.head_dims else 64
    try:
        doc = run_context_parallel(args.world_sizes, seq_len, schemes=args.schemes, device=args.device, head_dim=head_dim)
    except ValueError as exc:
        print(f"fastattn bench: error: {exc}", file=sys.stderr)
        return 2
    path = Path(args.out) / "context_parallel.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(tables(doc))
    print(f"\nwrote {path}")
    return 1 if any(r["status"] != "ok" for r in doc["results"]) else 0
