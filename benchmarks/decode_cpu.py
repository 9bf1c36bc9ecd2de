"""Decoding on the CPU: fastattn.attention_with_kvcache against torch SDPA, and per-call overhead.

Two measurements, all in this process:

* ``decode``: one decode step (Lq = 1) against a cache of ``--lk`` keys, B=1, Hq=32, Hkv=8, D=128
  by default. fastattn reads the flash-attn cache layout ``(B, L, Hkv, D)`` (contiguous) or a paged
  cache with shuffled pages; torch SDPA gets its own preferred layout, contiguous
  ``(B, Hkv, L, D)`` keys and values with ``enable_gqa=True``. Same data, same threads.
  A last row times ``torch.sum`` over a copy of the same bytes: about the fastest this machine reads
  them in this rotation (each contender reads its own copy in turn, so a call finds its cache partly
  or wholly evicted from L3, as a real decode step whose cache outgrows L3 does).
* ``overhead``: the CPU time of a 1 x 1 call (B=1, H=1, Lq=Lk=1, D=8), where the kernel's work is
  nil and what remains is the Python path from the public function to the kernel (validation,
  normalisation, dispatch) plus the op's own cost: ``fastattn.attention`` and
  ``fastattn.attention_with_kvcache`` (no append / with a one-token append) against
  ``torch.nn.functional.scaled_dot_product_attention``. fastattn's *own cost* is a call's time minus
  that of the C++ op it ends in, called directly with the same arguments (also reported).

Reported: the median of ``--repeats`` timed calls (decode) or of ``--repeats`` batches of 200 calls
(overhead), after warm-up; the contenders take turns within each repeat.

    PYTHONPATH=$PWD python benchmarks/decode_cpu.py [--threads 2] [--lk 8192] [--dtype float32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn


def _median_seconds(fns, repeats: int, inner: int = 1, clock=time.perf_counter) -> list[float]:
    """Median seconds per call of each function; the functions take turns within each repeat, so
    a change of load on a shared machine hits them alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = clock()
            for _ in range(inner):
                fn()
            ts.append((clock() - start) / inner)
    return [statistics.median(ts) for ts in times]


def paged_copy(caches, page_size: int, generator: torch.Generator):
    """Contiguous caches ``(B, L, H, D)`` as shuffled pages ``(num_pages, page_size, H, D)`` (the same
    pages for each), and the ``block_table`` ``(B, pages per sequence)``."""
    B, L = caches[0].shape[:2]
    per_seq = -(-L // page_size)
    order = torch.randperm(B * per_seq, generator=generator)
    paged = []
    for cache in caches:
        padded = cache.new_zeros(B, per_seq * page_size, *cache.shape[2:])
        padded[:, :L] = cache
        pages = torch.empty_like(padded).view(B * per_seq, page_size, *cache.shape[2:])
        pages[order] = padded.view(B * per_seq, page_size, *cache.shape[2:])
        paged.append(pages)
    return paged, order.view(B, per_seq).to(torch.int32)


def decode(args) -> None:
    dtype = getattr(torch, args.dtype)
    B, Hq, Hkv, D, L = args.batch, args.hq, args.hkv, 128, args.lk
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype)
    k_cache = torch.randn(B, L, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(B, L, Hkv, D, generator=g).to(dtype)
    lengths = torch.full((B,), L, dtype=torch.int32)
    (k_pages, v_pages), table = paged_copy((k_cache, v_cache), 256, g)
    q_sdpa = q.transpose(1, 2).contiguous()
    k_sdpa, v_sdpa = (t.transpose(1, 2).contiguous() for t in (k_cache, v_cache))

    out_sdpa = F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, enable_gqa=True).transpose(1, 2)
    out_fa = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    out_paged = fastattn.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, block_table=table)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, out in (("contiguous", out_fa), ("paged", out_paged)):
        err = (out.float() - out_sdpa.float()).abs().max().item()
        if err > tol:
            raise SystemExit(f"fastattn {name} differs from SDPA by {err}")

    bytes_kv = 2 * B * L * Hkv * D * k_cache.element_size()
    flat = torch.cat([k_sdpa.flatten(), v_sdpa.flatten()])  # the cache's bytes once more, for the read ceiling
    rows = [
        ("torch SDPA (B, Hkv, L, D), enable_gqa", lambda: F.scaled_dot_product_attention(
            q_sdpa, k_sdpa, v_sdpa, enable_gqa=True)),
        ("fastattn contiguous cache", lambda: fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)),
        ("fastattn paged cache (256-slot pages, shuffled)", lambda: fastattn.attention_with_kvcache(
            q, k_pages, v_pages, cache_seqlens=lengths, block_table=table)),
        ("read ceiling: torch.sum over as many bytes", lambda: flat.sum()),
    ]
    print(f"decode: B={B} Hq={Hq} Hkv={Hkv} D={D} Lk={L} {args.dtype}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    times = _median_seconds([fn for _, fn in rows], args.repeats)
    for (name, _), t in zip(rows, times):
        print(f"  {name:50s} {t * 1e3:8.3f} ms  {bytes_kv / t / 1e9:6.1f} GB/s  {times[0] / t:5.2f}x SDPA")


def overhead(args) -> None:
    torch.set_num_threads(1)  # CPU time of idle OpenMP workers would count otherwise
    q, k, v = (torch.randn(1, 1, 1, 8) for _ in range(3))
    k_cache, v_cache = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    seqlens = torch.ones(1, dtype=torch.int32)
    ops = torch.ops.fastattn
    scale = 8 ** -0.5
    rows = [
        ("torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("op attention_fwd alone", lambda: ops.attention_fwd(
            q, k, v, None, None, None, None, None, None, None, None, None, None, 0, 0, scale, None, None, 0.0, 0.0, 0)),
        ("fastattn.attention", lambda: fastattn.attention(q, k, v)),
        ("op attention_fwd alone, causal", lambda: ops.attention_fwd(
            q, k, v, None, None, None, None, None, None, None, None, None, None, 0, 0, scale, None, 0, 0.0, 0.0, 0)),
        ("fastattn.attention causal", lambda: fastattn.attention(q, k, v, causal=True)),
        ("op decode_attention alone", lambda: ops.decode_attention(
            q, k_cache, v_cache, None, None, seqlens, None, None, None, None, scale, None, None, 0.0, 0)),
        ("attention_with_kvcache (no append)", lambda: fastattn.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=seqlens)),
        ("op decode_attention alone, append 1, causal", lambda: ops.decode_attention(
            q, k_cache, v_cache, k, v, seqlens, None, None, None, None, scale, None, 0, 0.0, 0)),
        ("attention_with_kvcache (append 1, causal)", lambda: fastattn.attention_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True)),
    ]
    print(f"per-call cost of a 1 x 1 call (B=1, H=1, Lq=Lk=1, D=8), CPU time; load average {os.getloadavg()[0]:.2f}")
    # CPU time of this process (one thread): on a shared machine, time spent descheduled is not ours.
    times = _median_seconds([fn for _, fn in rows], args.repeats, inner=200, clock=time.process_time)
    for i, ((name, _), t) in enumerate(zip(rows, times)):
        own = f"   own cost {(t - times[i - 1]) * 1e6:5.1f} us" if not name.startswith(("op ", "torch")) else ""
        print(f"  {name:45s} {t * 1e6:7.1f} us{own}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--lk", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", choices=["decode", "overhead"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        if args.only in (None, "decode"):
            decode(args)
        if args.only in (None, "overhead"):
            overhead(args)


if __name__ == "__main__":
    main()
