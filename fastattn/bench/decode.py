"""``fastattn bench --decode``: one decoding step against a KV cache, fastattn against torch SDPA.

A decode workload is ``B`` sequences, each with a cache of ``Lk`` tokens (GQA: ``Hq`` query heads,
``Hkv`` key/value heads, 4:1 by default), and one new query token per sequence (``Lq = 1``). It is
memory-bound: each step reads the whole cache once. Reported per workload and provider:

* ``time_ms``: median time of one step (CPU: wall time, the contenders taking turns within each
  repeat so a change of load hits them alike; CUDA: ``triton.testing.do_bench``);
* ``tokens_per_s``: ``B / time`` (one new token per sequence per step);
* ``bandwidth_gb_s``: the cache bytes a step must read, ``B * Lk * Hkv * (D + Dv) * itemsize``,
  over the time (the queries and outputs are negligible next to it).

Providers:

* ``fastattn``: :func:`fastattn.attention_with_kvcache` on the flash-attn cache layout
  ``(B, Lk, Hkv, D)`` (``contiguous``), or on the same tokens in shuffled pages of ``page_size``
  slots through a ``block_table`` (``paged``);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`` on its own
  preferred layout, contiguous ``(B, Hkv, Lk, D)``; it has no paged form, so the ``paged`` rows
  compare with the same contiguous call.

Python use::

    from fastattn.bench.decode import decode_workloads, run_decode
    doc = run_decode(decode_workloads(batches=[1, 8], cache_lens=[1024, 4096]))
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LAYOUTS = ("contiguous", "paged")


@dataclass(frozen=True)
class DecodeWorkload:
    """One decoding step: ``q (B, 1, Hq, D)`` against ``B`` caches of ``cache_len`` tokens."""

    batch: int
    cache_len: int
    layout: str = "contiguous"
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    page_size: int = 256

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q ({self.heads_q}) must be a multiple of heads_kv ({self.heads_kv})")
        if self.page_size % 16:
            raise ValueError(f"page_size must be a multiple of 16, got {self.page_size}")

    @property
    def name(self) -> str:
        return f"decode-{self.layout}-B{self.batch}-H{self.heads_q}-Hkv{self.heads_kv}-Lk{self.cache_len}-D{self.head_dim}"

    def cache_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of keys and values one step reads."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.batch * self.cache_len * self.heads_kv * 2 * self.head_dim * itemsize


def decode_workloads(batches=(1, 4, 16, 64), cache_lens=(1024, 4096, 8192, 16384, 32768), layouts=LAYOUTS,
                     *, dtype: torch.dtype = torch.float32, max_cache_gib: float = 1.0, **shape) -> list[DecodeWorkload]:
    """Every (batch, cache length, layout) whose cache fits in ``max_cache_gib`` (a 64 x 32k fp32
    cache is 16 GiB: on a CPU the sweep keeps to what the machine holds)."""
    out = []
    for layout in layouts:
        for B in batches:
            for L in cache_lens:
                w = DecodeWorkload(B, L, layout, **shape)
                if w.cache_bytes(dtype) <= max_cache_gib * 2**30:
                    out.append(w)
    return out


@dataclass
class _Case:
    q: torch.Tensor  # (B, 1, Hq, D)
    k_cache: torch.Tensor  # (B, L, Hkv, D) or paged (num_pages, page_size, Hkv, D)
    v_cache: torch.Tensor
    lengths: torch.Tensor  # int32 (B,)
    block_table: torch.Tensor | None
    q_sdpa: torch.Tensor  # (B, Hq, 1, D)
    k_sdpa: torch.Tensor  # (B, Hkv, L, D)
    v_sdpa: torch.Tensor


def _paged(cache: torch.Tensor, page_size: int, order: torch.Tensor) -> torch.Tensor:
    """``cache (B, L, H, D)`` cut into pages of ``page_size`` slots, page ``i`` stored at ``order[i]``."""
    B, L, H, D = cache.shape
    per_seq = -(-L // page_size)
    padded = cache.new_zeros(B, per_seq * page_size, H, D)
    padded[:, :L] = cache
    pages = torch.empty_like(padded).view(B * per_seq, page_size, H, D)
    pages[order] = padded.view(B * per_seq, page_size, H, D)
    return pages


def make_decode_case(w: DecodeWorkload, dtype: torch.dtype, device: torch.device, seed: int = 0) -> _Case:
    """Random inputs (seeded); the paged cache holds the same tokens as the contiguous one."""
    g = torch.Generator().manual_seed(seed)
    B, L, Hq, Hkv, D = w.batch, w.cache_len, w.heads_q, w.heads_kv, w.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = randn(B, 1, Hq, D), randn(B, L, Hkv, D), randn(B, L, Hkv, D)
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)
    sdpa = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    if w.layout == "contiguous":
        return _Case(q, k, v, lengths, None, *sdpa)
    per_seq = -(-L // w.page_size)
    order = torch.randperm(B * per_seq, generator=g).to(device)
    table = order.view(B, per_seq).to(torch.int32)
    return _Case(q, _paged(k, w.page_size, order), _paged(v, w.page_size, order), lengths, table, *sdpa)


def _providers(case: _Case, backend: str | None) -> dict:
    import torch.nn.functional as F

    from .. import attention_with_kvcache

    return {
        "fastattn": lambda: attention_with_kvcache(case.q, case.k_cache, case.v_cache, cache_seqlens=case.lengths,
                                                   block_table=case.block_table, backend=backend),
        "sdpa": lambda: F.scaled_dot_product_attention(case.q_sdpa, case.k_sdpa, case.v_sdpa, enable_gqa=True),
    }


def _time(fns: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function."""
    if device.type == "cuda":
        import triton.testing

        return {name: [float(t) for t in triton.testing.do_bench(fn, return_mode="all")] for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def run_decode(workloads: list[DecodeWorkload], *, dtype: torch.dtype = torch.float32, device: str | None = None,
               repeats: int = 10, backend: str | None = None, progress: bool = True) -> dict:
    """Time every workload on both providers; returns a results document (environment + rows).

    Before timing, each workload's fastattn output is checked against SDPA's (a wrong result is
    recorded as an error, not a time).
    """
    from .report import environment

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    rows = []
    with torch.inference_mode():
        for n, w in enumerate(workloads):
            if progress:
                print(f"[{n + 1}/{len(workloads)}] {w.name}", flush=True)
            case = make_decode_case(w, dtype, device)
            fns = _providers(case, backend)
            err = (fns["fastattn"]().float() - fns["sdpa"]().transpose(1, 2).float()).abs().max().item()
            base = {**asdict(w), "name": w.name, "dtype": str(dtype).replace("torch.", ""),
                    "cache_bytes": w.cache_bytes(dtype)}
            if not err <= tol:
                rows.append({**base, "provider": "fastattn", "status": "error",
                             "error": f"differs from SDPA by {err} (tolerance {tol})"})
                continue
            times = _time(fns, device, repeats)
            medians = {name: statistics.median(ts) for name, ts in times.items()}
            for name, ms in medians.items():
                rows.append({**base, "provider": name, "status": "ok", "time_ms": ms, "repeats": len(times[name]),
                             "tokens_per_s": w.batch / (ms / 1e3), "bandwidth_gb_s": base["cache_bytes"] / (ms / 1e3) / 1e9,
                             "speedup_vs_sdpa": medians["sdpa"] / ms})
            del case, fns
    return {"kind": "decode", "environment": environment(device), "results": rows}


def decode_table(doc: dict) -> str:
    """A Markdown table: one row per workload, fastattn against SDPA."""
    lines = ["| workload | fastattn ms | tokens/s | GB/s | SDPA ms | SDPA GB/s | speedup |", "|---|---|---|---|---|---|---|"]
    by_name: dict[str, dict] = {}
    for r in doc["results"]:
        by_name.setdefault(r["name"], {})[r["provider"]] = r
    for name, cell in by_name.items():
        fa, sd = cell.get("fastattn"), cell.get("sdpa")
        if fa is None or fa["status"] != "ok" or sd is None:
            lines.append(f"| {name} | {fa['error'] if fa else 'missing'} | | | | | |")
            continue
        lines.append(f"| {name} | {fa['time_ms']:.3f} | {fa['tokens_per_s']:.0f} | {fa['bandwidth_gb_s']:.1f} | "
                     f"{sd['time_ms']:.3f} | {sd['bandwidth_gb_s']:.1f} | {fa['speedup_vs_sdpa']:.2f}x |")
    return "\n".join(lines)


def add_cli_mode(parser) -> None:
    """Add ``--decode`` (and its options) to the ``fastattn bench`` parser."""
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--decode", action="store_true",
                        help="time one decoding step against a KV cache (contiguous and paged), fastattn vs SDPA: "
                        "tokens/s and achieved bandwidth; uses --device, --dtypes (first), --out")
    parser.add_argument("--batches", type=ints, default=[1, 4, 16, 64], help="--decode batch sizes (default 1,4,16,64)")
    parser.add_argument("--cache-lens", type=ints, default=[1024, 4096, 8192, 16384, 32768],
                        help="--decode cache lengths (default 1024,...,32768)")
    parser.add_argument("--max-cache-gib", type=float, default=None,
                        help="--decode: skip workloads whose cache is larger (default 1 on CPU, 16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=10, help="--decode timed calls per workload on CPU (default 10)")
    parser.add_argument("--decode-threads", type=int, default=2,
                        help="--decode on CPU: torch.set_num_threads for both providers (default 2)")
    bench = parser.get_default("func")
    parser.set_defaults(func=lambda args: _cli(args) if args.decode else bench(args))


def _cli(args) -> int:
    from .workloads import DTYPES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.decode_threads)
    dtype = DTYPES[args.dtypes[0]] if args.dtypes else torch.float32
    budget = args.max_cache_gib if args.max_cache_gib is not None else (16.0 if device == "cuda" else 1.0)
    workloads = decode_workloads(args.batches, args.cache_lens, dtype=dtype, max_cache_gib=budget)
    doc = run_decode(workloads, dtype=dtype, device=device, repeats=args.repeats, progress=not args.no_progress)
    path = Path(args.out) / "decode.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(decode_table(doc))
    print(f"\nwrote {path}")
    return 1 if any(r["status"] != "ok" for r in doc["results"]) else 0
