"""Measured evidence for the automatic choice between the two GPU backends.

The automatic dispatch must never hand a user a slower path than the one it could have picked.
The CUDA C++ kernels and the Triton kernels both serve most GPU calls; which is faster depends on
the GPU architecture and the kind of call. :data:`TABLE` records, per architecture (``"sm_90"``)
and workload class (``"causal-D128-bf16"``, see :func:`workload_class`), the backend a committed
GPU results file (``benchmarks/results/*.json``) measured faster. Where the table says nothing,
``triton`` goes first; ``cuda`` goes first only where the table says ``"cuda"``. An explicit
``backend="cuda"`` (or ``FASTATTN_BACKEND=cuda``) always reaches the CUDA kernels.

The table is generated, never typed by hand::

    python -m fastattn.backends.evidence benchmarks/results/*.json          # print it
    python -m fastattn.backends.evidence --write benchmarks/results/*.json  # rewrite this file

A class prefers ``cuda`` only when, in every row of that class in the newest results file of that
architecture (every sequence length and mode: fwd, bwd, fwd_bwd), ``fastattn-cuda`` was measured
and was at least as fast as ``fastattn-triton``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from .._inputs import AttentionInputs

# BEGIN GENERATED (python -m fastattn.backends.evidence --write benchmarks/results/*.json)
TABLE: dict[str, dict[str, str]] = {}
SOURCES: tuple[str, ...] = ()
# END GENERATED

GPU_BACKENDS = ("cuda", "triton")
"""The two backends the table orders; the others keep their place in the priority order."""

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# GPU names of results files that predate the recorded compute capability, by architecture.
_ARCH_BY_NAME = (
    (r"\b(h100|h200|h800|h20|gh200)\b", "sm_90"),
    (r"\b(a100|a800|a30)\b", "sm_80"),
    (r"\b(a10|a10g|a40|a16|a2|rtx 30\d\d|rtx a\d000)\b", "sm_86"),
    (r"\b(l4|l40|l40s|rtx 40\d\d|rtx \d000 ada)\b", "sm_89"),
    (r"\b(b100|b200|gb200)\b", "sm_100"),
)


def arch_of(capability: tuple[int, int]) -> str:
    """``(9, 0) -> "sm_90"``."""
    return f"sm_{capability[0]}{capability[1]}"


def arch_from_environment(env: dict) -> str | None:
    """The architecture a results file was measured on: its recorded capability, else its GPU name."""
    capability = env.get("cuda_capability")
    if capability:
        return arch_of(tuple(capability))
    name = (env.get("device_name") or "").lower()
    for pattern, arch in _ARCH_BY_NAME:
        if re.search(pattern, name):
            return arch
    return None


def workload_class(inputs: AttentionInputs) -> str:
    """The benchmark class of a call: ``<kind>-D<head_dim>-<dtype>``, ``kind`` as the benchmark's
    workload kinds (dense, causal, window, block_sparse, gqa), or ``other`` for calls using a feature
    the benchmark does not measure (attn_mask, ALiBi, softcap, dropout, lengths, Dv != D)."""
    if (
        inputs.attn_mask is not None
        or inputs.alibi_slopes is not None
        or inputs.softcap > 0
        or inputs.dropout_p > 0
        or inputs.key_lengths is not None
        or inputs.query_lengths is not None
        or inputs.head_dim_v != inputs.head_dim
    ):
        kind = "other"
    elif inputs.block_mask is not None:
        kind = "block_sparse"
    elif inputs.window_left is not None or inputs.window_right is not None:
        kind = "causal" if inputs.is_causal else "window"
    elif inputs.heads_q != inputs.heads_kv:
        kind = "gqa"
    else:
        kind = "dense"
    return f"{kind}-D{inputs.head_dim}-{DTYPE_NAMES.get(inputs.dtype, str(inputs.dtype))}"


_ARCH_CACHE: dict[int, str] = {}


def device_arch(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_CACHE:
        _ARCH_CACHE[index] = arch_of(torch.cuda.get_device_capability(index))
    return _ARCH_CACHE[index]


def preferred(inputs: AttentionInputs) -> str:
    """The GPU backend the evidence prefers for ``inputs`` (``triton`` where it says nothing)."""
    if inputs.device.type != "cuda":
        return "triton"
    return TABLE.get(device_arch(inputs.device), {}).get(workload_class(inputs), "triton")


def order(names: Iterable[str], inputs: AttentionInputs) -> list[str]:
    """``names`` (priority order) with ``cuda`` and ``triton`` placed as the evidence says."""
    names = list(names)
    if not all(n in names for n in GPU_BACKENDS):
        return names
    first = preferred(inputs)
    second = GPU_BACKENDS[1] if first == GPU_BACKENDS[0] else GPU_BACKENDS[0]
    slots = sorted(names.index(n) for n in GPU_BACKENDS)
    names[slots[0]], names[slots[1]] = first, second
    return names


def describe() -> str:
    """One line for ``fastattn info``: which evidence the automatic choice uses."""
    if not TABLE:
        return (
            "dispatch evidence: none committed -> triton goes before cuda on every GPU "
            "(backend='cuda' still selects the CUDA kernels)"
        )
    classes = sum(len(v) for v in TABLE.values())
    cuda = sum(1 for v in TABLE.values() for b in v.values() if b == "cuda")
    return (
        f"dispatch evidence: {', '.join(SOURCES)} -> cuda first for {cuda} of {classes} measured classes "
        f"on {', '.join(sorted(TABLE))}; triton first elsewhere"
    )


# ------------------------------------------------------------------------------------------------
# Generator: results files -> TABLE.

_KIND_OF_NAME = re.compile(r"^([a-z_]+)-")


def _row_class(row: dict) -> str | None:
    kind = row.get("workload") or (m.group(1) if (m := _KIND_OF_NAME.match(row.get("name", ""))) else None)
    if kind is None or row.get("head_dim") is None or row.get("dtype") is None:
        return None
    return f"{kind}-D{row['head_dim']}-{row['dtype']}"


def table_from_results(docs: list[tuple[str, dict]]) -> tuple[dict[str, dict[str, str]], tuple[str, ...]]:
    """``(TABLE, SOURCES)`` from ``(file name, results document)`` pairs.

    Per architecture only the newest file (by its ``created_utc``) counts. A class prefers
    ``cuda`` when every configuration of it has an ``ok`` time for both providers and cuda's is
    not larger; a class where triton was measured and cuda lost or was not measured prefers triton.
    """
    newest: dict[str, tuple[str, str, dict]] = {}
    for name, doc in docs:
        env = doc.get("environment", {})
        if env.get("device") != "cuda":
            continue
        arch = arch_from_environment(env)
        if arch is None:
            continue
        created = env.get("created_utc") or ""
        if arch not in newest or created > newest[arch][0]:
            newest[arch] = (created, name, doc)
    table: dict[str, dict[str, str]] = {}
    for arch, (_, _, doc) in sorted(newest.items()):
        times: dict[tuple[str, str, str], dict[str, float | None]] = {}
        for row in doc.get("results", []):
            provider = row.get("provider", "")
            if provider not in ("fastattn-cuda", "fastattn-triton"):
                continue
            cls = _row_class(row)
            if cls is None:
                continue
            key = (cls, row.get("name", ""), row.get("mode", ""))
            ok = row.get("status") == "ok" and row.get("time_ms") is not None
            times.setdefault(key, {})[provider.removeprefix("fastattn-")] = row["time_ms"] if ok else None
        verdicts: dict[str, bool] = {}
        for (cls, _, _), t in times.items():
            if t.get("triton") is None and t.get("cuda") is None:
                continue
            cuda_wins = t.get("cuda") is not None and (t.get("triton") is None or t["cuda"] <= t["triton"])
            verdicts[cls] = verdicts.get(cls, True) and cuda_wins
        if verdicts:
            table[arch] = {cls: "cuda" if wins else "triton" for cls, wins in sorted(verdicts.items())}
    sources = tuple(sorted(newest[arch][1] for arch in table))
    return table, sources


def render(table: dict[str, dict[str, str]], sources: tuple[str, ...]) -> str:
    """The generated block of this file."""
    lines = ["# BEGIN GENERATED (python -m fastattn.backends.evidence --write benchmarks/results/*.json)"]
    if not table:
        lines.append("TABLE: dict[str, dict[str, str]] = {}")
    else:
        lines.append("TABLE: dict[str, dict[str, str]] = {")
        for arch, classes in table.items():
            lines.append(f"    {arch!r}: {{")
            lines.extend(f"        {cls!r}: {backend!r}," for cls, backend in classes.items())
            lines.append("    },")
        lines.append("}")
    lines.append(f"SOURCES: tuple[str, ...] = {sources!r}")
    lines.append("# END GENERATED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the dispatch evidence table from GPU results files.")
    ap.add_argument("files", nargs="*", type=Path, help="benchmarks/results/*.json")
    ap.add_argument("--write", action="store_true", help="rewrite the generated block of this module")
    args = ap.parse_args(argv)
    docs = []
    for path in args.files:
        doc = json.loads(path.read_text())
        if doc.get("kind", "bench") == "bench" and "results" in doc:
            docs.append((path.name, doc))
    block = render(*table_from_results(docs))
    if not args.write:
        print(block)
        return 0
    source = Path(__file__).read_text()
    start, end = source.index("# BEGIN GENERATED"), source.index("# END GENERATED") + len("# END GENERATED")
    Path(__file__).write_text(source[:start] + block + source[end:])
    print(f"wrote {Path(__file__).name}: {block.count(chr(10)) + 1} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
