"""Static proof of the Hopper forward without a GPU: compile ``attention_fwd_sm90_kernel.cu`` alone
for sm_90a, then count in each kernel's SASS the instructions the design rests on and read ptxas's
resource report.

* ``HGMMA``: warpgroup tensor-core matmuls (wgmma), both S = Q K^T and O += P V.
* ``UTMALDG``: TMA bulk tensor loads (Q, K, V).
* ``USETMAXREG``: register reallocation -- ``DEALLOC`` to the producer's count, ``TRY_ALLOC`` to
  the consumers' -- compared with ``kProducerRegisters`` / ``kConsumerRegisters`` in the source.
* ptxas: registers at launch, spill bytes (must be 0).

Usage (from the repository root; needs nvcc, cuobjdump and the CUTLASS headers)::

    python csrc/cuda/sm90/sass_report.py            # markdown table; exit 1 if a check fails

tests/test_cuda_sm90.py runs the same checks in CI.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_SOURCE = os.path.join(HERE, "attention_fwd_sm90_kernel.cu")
REGISTER_FILE = 65536  # 32-bit registers per SM on sm_90
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda"]


def cutlass_include() -> str | None:
    """CUTLASS/CuTe headers: FASTATTN_CUTLASS_DIR or the nvidia-cutlass wheel (as setup.py finds them)."""
    candidates = []
    if os.environ.get("FASTATTN_CUTLASS_DIR"):
        root = os.environ["FASTATTN_CUTLASS_DIR"]
        candidates += [root, os.path.join(root, "include")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "source", "include"))
    return next((p for p in candidates if os.path.exists(os.path.join(p, "cute", "tensor.hpp"))), None)


def find_tool(name: str) -> str | None:
    """A CUDA tool on the PATH, in the toolkit (CUDA_HOME, /usr/local/cuda*) or bundled with Triton."""
    found = shutil.which(name)
    if found:
        return found
    folders = [os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    folders += ["/usr/local/cuda/bin", *sorted(glob.glob("/usr/local/cuda-*/bin"), reverse=True)]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        folders.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin"))
    return next((os.path.join(f, name) for f in folders if os.access(os.path.join(f, name), os.X_OK)), None)


def design_registers() -> tuple[int, int, int, int]:
    """(producer registers, consumer registers, consumer warpgroups, threads) declared in the kernel source."""
    text = open(KERNEL_SOURCE).read()

    def constant(name: str) -> int:
        return int(re.search(rf"{name} = (\d+);", text).group(1))

    groups = constant("kConsumerWarpgroups")
    return constant("kProducerRegisters"), constant("kConsumerRegisters"), groups, 128 * (1 + groups)


def compile_kernels(workdir: str) -> tuple[str, str, float]:
    """Compile the kernel file for sm_90a into ``workdir``; returns (SASS, ptxas report, seconds)."""
    include = cutlass_include()
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if include is None or nvcc is None or cuobjdump is None:
        raise FileNotFoundError(f"need nvcc ({nvcc}), cuobjdump ({cuobjdump}) and CUTLASS headers ({include})")
    cubin = os.path.join(workdir, "attention_fwd_sm90.cubin")
    start = time.perf_counter()
    build = subprocess.run(
        [nvcc, *NVCC_FLAGS, "-gencode", "arch=compute_90a,code=sm_90a", "--resource-usage", "-cubin",
         f"-I{include}", "-o", cubin, KERNEL_SOURCE],
        capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    if build.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{build.stderr[-4000:]}")
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return sass, build.stdout + build.stderr, seconds


def _demangled(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def short_name(mangled: str) -> str:
    """``kernel<fp16, D128, causal>`` from the mangled name of attention_fwd_sm90_kernel<Traits<...>>."""
    demangled = _demangled([mangled])[0]
    m = re.search(r"Traits<cutlass::(\w+), (\d+), (true|false)>", demangled)
    if not m:
        return demangled
    dtype = {"half_t": "fp16", "bfloat16_t": "bf16"}.get(m.group(1), m.group(1))
    return f"kernel<{dtype}, D{m.group(2)}, {'causal' if m.group(3) == 'true' else 'full'}>"


def analyse(sass: str, ptxas: str) -> list[dict]:
    """One row per kernel: instruction counts, setmaxnreg targets, registers and spills."""
    rows = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        rows[name] = {
            "kernel": short_name(name),
            "HGMMA": len(re.findall(r"\bHGMMA\.", chunk)),
            "UTMALDG": len(re.findall(r"\bUTMALDG\b", chunk)),
            "dealloc": sorted({int(v, 16) for v in re.findall(r"USETMAXREG\.DEALLOC\S*\s+(0x[0-9a-f]+)", chunk)}),
            "alloc": sorted({int(v, 16) for v in re.findall(r"USETMAXREG\.TRY_ALLOC\S*\s+\S+\s+(0x[0-9a-f]+)", chunk)}),
        }
    current = None
    for line in ptxas.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_90a'", line):
            current = rows.get(m.group(1))
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current["spill"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
    return sorted(rows.values(), key=lambda r: r["kernel"])


def failures(rows: list[dict]) -> list[str]:
    """Every way the SASS departs from the design (empty: it matches)."""
    producer, consumer, groups, threads = design_registers()
    problems = []
    if 128 * producer + 128 * groups * consumer > REGISTER_FILE:
        problems.append(f"register split {producer}/{consumer} overflows the {REGISTER_FILE}-register file")
    if len(rows) != 8:
        problems.append(f"expected 8 kernels ({{fp16, bf16}} x {{64, 128}} x {{causal, full}}), found {len(rows)}")
    for r in rows:
        k = r["kernel"]
        if r["HGMMA"] == 0:
            problems.append(f"{k}: no HGMMA (wgmma)")
        if r["UTMALDG"] == 0:
            problems.append(f"{k}: no UTMALDG (TMA load)")
        if r["dealloc"] != [producer] or r["alloc"] != [consumer]:
            problems.append(f"{k}: setmaxnreg {r['dealloc']} / {r['alloc']}, design {producer} / {consumer}")
        if r.get("spill") != 0:
            problems.append(f"{k}: ptxas spills {r.get('spill')} bytes")
        # __launch_bounds__(threads, 1): ptxas must fit every thread's start in an even share.
        if r.get("registers", REGISTER_FILE) * threads > REGISTER_FILE:
            problems.append(f"{k}: {r.get('registers')} registers x {threads} threads overflow the register file")
    return problems


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        sass, ptxas, seconds = compile_kernels(workdir)
    rows = analyse(sass, ptxas)
    producer, consumer, groups, threads = design_registers()
    print(f"sm_90a compile of {os.path.basename(KERNEL_SOURCE)}: {seconds:.0f} s")
    print(f"design: {threads} threads; producer warpgroup {producer} registers/thread, "
          f"{groups} consumer warpgroups {consumer}; total {128 * producer + 128 * groups * consumer} of {REGISTER_FILE}")
    print()
    print("| kernel | HGMMA | UTMALDG | setmaxnreg dealloc / alloc | registers at launch | spill bytes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['kernel']}` | {r['HGMMA']} | {r['UTMALDG']} | {r['dealloc']} / {r['alloc']} | "
              f"{r.get('registers', '?')} | {r.get('spill', '?')} |")
    problems = failures(rows)
    for p in problems:
        print(f"FAIL: {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
