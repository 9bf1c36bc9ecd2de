"""Packed documents with fastattn.varlen_attention against the padded batch, on the CPU backend.

All run in this process on the same data: the padded batch is ``fastattn.attention`` over
``(num_docs, H, max_len, D)``, once computing the padding (right padding under a causal mask: the
real tokens' outputs are still exact) and once with ``query_lengths``/``key_lengths`` (the kernels
then skip the tiles past each length); varlen packs the same documents
into ``(total, H, D)`` and runs the cpu backend's varlen kernel, which walks ``cu_seqlens`` itself.
Reported: the median of ``--repeats`` timed calls after one warm-up call, the runs interleaved.

    PYTHONPATH=$PWD python benchmarks/varlen_cpu.py [--repeats 5] [--backward] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastattn

# Eight documents, 4096 tokens in a padded batch of 8 x 1024: 50% padding.
LENGTHS = [1024, 960, 704, 576, 384, 256, 128, 64]


def _median_seconds(fns, repeats: int) -> list[float]:
    """Median time of each of ``fns``, timed in interleaved rounds (one call of each per round, after
    one warm-up call each), so a change in the machine's load hits every run alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    H, D, L = args.heads, args.head_dim, max(LENGTHS)
    torch.manual_seed(0)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    packed = [torch.randn(total, H, D, requires_grad=args.backward) for _ in range(3)]
    padded = [torch.zeros(len(LENGTHS), L, H, D) for _ in range(3)]
    for t, p in zip(padded, packed):
        for b, n in enumerate(LENGTHS):
            t[b, :n] = p.detach()[int(cu[b]):int(cu[b]) + n]
        t.requires_grad_(args.backward)

    def run(call):
        def timed():
            out = call()
            if args.backward:
                out.sum().backward()
        return timed

    def padded_call():
        return fastattn.attention(*padded, layout="blhd", causal=True, backend="cpu",
                                  query_lengths=lengths, key_lengths=lengths)

    def padded_dense_call():  # right padding + causal: real tokens never see the padding, but it is computed
        return fastattn.attention(*padded, layout="blhd", causal=True, backend="cpu")

    def varlen_call():
        return fastattn.varlen_attention(*packed, cu, cu, L, L, causal=True, backend="cpu")

    padded_s, dense_s, varlen_s = _median_seconds([run(padded_call), run(padded_dense_call), run(varlen_call)],
                                                  args.repeats)
    # Same result on the real tokens.
    with torch.no_grad():
        out_padded = torch.cat([padded_call()[b, :n] for b, n in enumerate(LENGTHS)])
        torch.testing.assert_close(varlen_call(), out_padded, atol=1e-4, rtol=1e-4)
        out_dense = torch.cat([padded_dense_call()[b, :n] for b, n in enumerate(LENGTHS)])
        torch.testing.assert_close(out_dense, out_padded, atol=1e-4, rtol=1e-4)
    what = "forward+backward" if args.backward else "forward"
    print(f"causal {what}, {len(LENGTHS)} documents, {total} tokens, padded batch {len(LENGTHS)}x{L} "
          f"({100 * (1 - total / (len(LENGTHS) * L)):.0f}% padding), H={H}, D={D}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"padded batch, no lengths (padding computed)  : {1e3 * dense_s:8.1f} ms")
    print(f"padded batch, query/key lengths (tiles skipped): {1e3 * padded_s:8.1f} ms")
    print(f"varlen packed (varlen kernel)                   : {1e3 * varlen_s:8.1f} ms  "
          f"({dense_s / varlen_s:.2f}x / {padded_s / varlen_s:.2f}x the two padded runs)")


if __name__ == "__main__":
    main()
