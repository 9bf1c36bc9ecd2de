"""Tabulate nvcc's ``--resource-usage`` report (ptxas registers, spills, static shared memory) per
kernel instantiation and architecture, as markdown for docs/cuda-resource-usage.md.

Usage (from the repository root; the build goes out of tree, the in-place extension is untouched)::

    FASTATTN_CUDA=1 FASTATTN_RESOURCE_USAGE=1 FASTATTN_NVCC_THREADS=1 TORCH_CUDA_ARCH_LIST="8.0;9.0a" \\
        python setup.py build_ext --build-temp /tmp/cuda_build --build-lib /tmp/cuda_lib > /tmp/build.log 2>&1
    python csrc/cuda/resource_usage.py /tmp/build.log

ninja only prints ptxas output for objects it rebuilds: remove /tmp/cuda_build/csrc/cuda first.
"""

from __future__ import annotations

import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(.*)")
SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse(text: str) -> list[dict]:
    rows, current = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "stack": "?", "spill_st": "?", "spill_ld": "?"}
            rows.append(current)
        elif current is not None and (m := SPILLS.search(line)):
            current["stack"], current["spill_st"], current["spill_ld"] = m.groups()
        elif current is not None and (m := USED.search(line)):
            current["registers"] = m.group(1)
            smem = SMEM.search(m.group(2))
            current["static_smem"] = smem.group(1) if smem else "0"
    return rows


def short_name(demangled: str) -> str:
    # fastattn::cuda::attention_fwd_kernel<__half, 64, 64, 64>(fastattn::cuda::AttentionParams) -> kernel<...>
    name = demangled.split("(")[0].replace("fastattn::cuda::", "").removeprefix("void ")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def main() -> None:
    text = open(sys.argv[1]).read()
    rows = parse(text)
    if not rows:
        raise SystemExit("no ptxas entries found: build with FASTATTN_RESOURCE_USAGE=1 after removing the cached objects")
    names = demangle([r["kernel"] for r in rows])
    print("| kernel | arch | registers | spill stores / loads (bytes) | stack (bytes) | static smem (bytes) |")
    print("| --- | --- | --- | --- | --- | --- |")
    seen = set()
    for row, name in sorted(zip(rows, names), key=lambda rn: (short_name(rn[1]), rn[0]["arch"])):
        key = (name, row["arch"])
        if key in seen:
            continue
        seen.add(key)
        print(
            f"| `{short_name(name)}` | {row['arch']} | {row.get('registers', '?')} | "
            f"{row['spill_st']} / {row['spill_ld']} | {row['stack']} | {row.get('static_smem', '?')} |"
        )


if __name__ == "__main__":
    main()
