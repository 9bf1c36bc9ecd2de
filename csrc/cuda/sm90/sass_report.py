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


def feature_bits() -> dict[str, int]:
    """The Feature enum of attention_fwd_sm90.h: {"kWindow": 1, "kSoftcap": 2, ...}."""
    text = open(os.path.join(HERE, "attention_fwd_sm90.h")).read()
    body = re.search(r"enum Feature : int \{([^}]*)\}", text).group(1)
    return {name: int(value) for name, value in re.findall(r"(\w+) = (\d+)", body)}


def instantiated_features() -> list[int]:
    """The feature sets of kInstantiated in attention_fwd_sm90.h, evaluated (e.g. [0, 1, 29, 31])."""
    text = open(os.path.join(HERE, "attention_fwd_sm90.h")).read()
    names = dict(feature_bits())
    for name, expr in re.findall(r"constexpr int (k\w+) = ([\w |]+);", text):
        if all(term.strip() in names for term in expr.split("|")):
            names[name] = _or(expr, names)
    listed = re.search(r"constexpr int kInstantiated\[\] = \{([^}]*)\}", text).group(1)
    return [_or(item, names) for item in listed.split(",")]


def _or(expr: str, names: dict[str, int]) -> int:
    value = 0
    for term in expr.split("|"):
        term = term.strip()
        value |= int(term) if term.isdigit() else names[term]
    return value


def feature_name(flags: int) -> str:
    """``window+alibi`` for the set bits of ``flags``; ``plain`` for none."""
    short = {"kWindow": "window", "kSoftcap": "softcap", "kAlibi": "alibi", "kLengths": "lengths", "kBlockLists": "lists"}
    names = [short.get(name, name) for name, bit in feature_bits().items() if flags & bit]
    return "+".join(names) or "plain"


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


def kernel_key(mangled: str) -> tuple[str, int, int] | None:
    """(dtype, head dim, features) of attention_fwd_sm90_kernel<Traits<...>> from its mangled name."""
    m = re.search(r"Traits<cutlass::(\w+), (\d+), (\d+)>", _demangled([mangled])[0])
    if not m:
        return None
    return {"half_t": "fp16", "bfloat16_t": "bf16"}.get(m.group(1), m.group(1)), int(m.group(2)), int(m.group(3))


# The kernel's tiles (Traits): 128 keys per tile, 64 query rows per consumer warpgroup.
BLOCK_N = 128
ROWS_PER_WARPGROUP = 64


def _issue_batches(chunk: str) -> list[int]:
    """HGMMA counts of each issue batch (the HGMMAs after one WARPGROUP.ARRIVE), in code order."""
    batches = []
    for line in chunk.splitlines():
        if "WARPGROUP.ARRIVE" in line:
            batches.append(0)
        elif re.search(r"\bHGMMA\.", line) and batches:
            batches[-1] += 1
    return [b for b in batches if b]


def _ex2_between_waits(chunk: str) -> int:
    """MUFU.EX2 between a ``wgmma.wait_group 1`` (S is in, P V still running) and the next
    ``wait_group 0``: the softmax exponentials that overlap the consumer's own P V matmul."""
    count, inside = 0, False
    for line in chunk.splitlines():
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line:
            inside = True
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            inside = False
        elif inside and "MUFU.EX2" in line:
            count += 1
    return count


def _registers_touched(chunk: str) -> int:
    """Highest register any instruction touches, + 1: the consumers' real footprint under their
    setmaxnreg ceiling (ptxas reports only the launch allocation). An HGMMA 64xNx16 accumulator
    spans N / 2 registers from the one named, a register A operand 4."""
    top = 0
    for line in chunk.splitlines():
        for r in re.findall(r"\bR(\d+)\b", line):
            top = max(top, int(r) + 1)
        if m := re.search(r"HGMMA\.64x(\d+)x16\.F32\S* R(\d+), (?:R(\d+))?", line):
            top = max(top, int(m.group(2)) + int(m.group(1)) // 2)
            if m.group(3):
                top = max(top, int(m.group(3)) + 4)
    return top


def analyse(sass: str, ptxas: str) -> list[dict]:
    """One row per kernel: instruction counts, setmaxnreg targets, registers and spills."""
    rows = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        key = kernel_key(name)
        if key is None:
            continue
        dtype, d, flags = key
        rows[name] = {
            "kernel": f"kernel<{dtype}, D{d}, {feature_name(flags)}>",
            "head_dim": d,
            "features": flags,
            "HGMMA": len(re.findall(r"\bHGMMA\.", chunk)),
            "batches": _issue_batches(chunk),
            "UTMALDG": len(re.findall(r"\bUTMALDG\b", chunk)),
            "instructions": len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?!NOP)\S", chunk)),
            "TANH": len(re.findall(r"\bMUFU\.TANH\b", chunk)),
            "LDG": len(re.findall(r"\bLDG\.", chunk)),
            "EX2_overlapped": _ex2_between_waits(chunk),
            "registers_touched": _registers_touched(chunk),
            "dealloc": sorted({int(v, 16) for v in re.findall(r"USETMAXREG\.DEALLOC\S*\s+(0x[0-9a-f]+)", chunk)}),
            "alloc": sorted({int(v, 16) for v in re.findall(r"USETMAXREG\.TRY_ALLOC\S*\s+\S+\s+(0x[0-9a-f]+)", chunk)}),
            "serialized": False,
        }
    current = None
    for line in ptxas.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_90a'", line):
            current = rows.get(m.group(1))
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current["spill"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
        elif current is not None and "wgmma.mma_async instructions are serialized" in line:
            current["serialized"] = True
    return sorted(rows.values(), key=lambda r: r["kernel"])


def ideal_hgmma_per_tile(head_dim: int) -> int:
    """k-steps of one key tile's two matmuls: Q K^T is D / 16 of 64 x kBlockN x 16, P V is
    kBlockN / 16 of 64 x D x 16."""
    return head_dim // 16 + BLOCK_N // 16


def failures(rows: list[dict]) -> list[str]:
    """Every way the SASS departs from the design (empty: it matches)."""
    producer, consumer, groups, threads = design_registers()
    bits = feature_bits()
    problems = []
    if 128 * producer + 128 * groups * consumer > REGISTER_FILE:
        problems.append(f"register split {producer}/{consumer} overflows the {REGISTER_FILE}-register file")
    expected = 4 * len(instantiated_features())
    if len(rows) != expected:
        problems.append(f"expected {expected} kernels ({{fp16, bf16}} x {{64, 128}} x kInstantiated), found {len(rows)}")
    for r in rows:
        k, d, flags = r["kernel"], r.get("head_dim", 128), r.get("features", 0)
        if r["HGMMA"] == 0:
            problems.append(f"{k}: no HGMMA (wgmma)")
        # Each matmul is issued at two sites (S: first tile and loop; P V: loop and drain), each
        # site one batch of all its k-steps: 2 x the ideal per tile, nothing split or repeated.
        elif r["HGMMA"] != 2 * ideal_hgmma_per_tile(d) or sorted(r.get("batches", [])) != sorted(
            [d // 16, d // 16, BLOCK_N // 16, BLOCK_N // 16]
        ):
            problems.append(f"{k}: HGMMA {r['HGMMA']} in batches {r.get('batches')}, design 2 x {ideal_hgmma_per_tile(d)}")
        if r["UTMALDG"] == 0:
            problems.append(f"{k}: no UTMALDG (TMA load)")
        if r["dealloc"] != [producer] or r["alloc"] != [consumer]:
            problems.append(f"{k}: setmaxnreg {r['dealloc']} / {r['alloc']}, design {producer} / {consumer}")
        if r.get("spill") != 0:
            problems.append(f"{k}: ptxas spills {r.get('spill')} bytes")
        if r.get("serialized"):
            problems.append(f"{k}: ptxas serialized the wgmma instructions")
        # Intra-warpgroup overlap: the whole softmax (one EX2 per score and one per row correction)
        # sits between the wait for S (wait_group 1) and the wait for P V (wait_group 0).
        exps = ROWS_PER_WARPGROUP * BLOCK_N // 128 + 2
        if "EX2_overlapped" in r and r["EX2_overlapped"] != exps:
            problems.append(f"{k}: {r['EX2_overlapped']} of {exps} EX2 overlap the warpgroup's own P V")
        if r.get("registers_touched", 0) > consumer:
            problems.append(f"{k}: touches {r['registers_touched']} registers, above the consumers' {consumer}")
        # __launch_bounds__(threads, 1): ptxas must fit every thread's start in an even share.
        if r.get("registers", REGISTER_FILE) * threads > REGISTER_FILE:
            problems.append(f"{k}: {r.get('registers')} registers x {threads} threads overflow the register file")
        # Softcap: one MUFU.TANH per score (64 x kBlockN / 128 threads per tile, at the two softmax
        # sites); none without it.
        tanh = 2 * ROWS_PER_WARPGROUP * BLOCK_N // 128 if flags & bits["kSoftcap"] else 0
        if r.get("TANH", 0) != tanh:
            problems.append(f"{k}: {r.get('TANH')} MUFU.TANH, design {tanh}")
        # Q, K and V arrive by TMA; only lengths, BlockMask lists and ALiBi slopes are read with LDG.
        reads = bits["kLengths"] | bits["kBlockLists"] | bits["kAlibi"]
        if not flags & reads and r.get("LDG", 0):
            problems.append(f"{k}: {r['LDG']} LDG in a kernel without lengths, lists or ALiBi")
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
    print("| kernel | HGMMA (ideal per tile) | issue batches | UTMALDG | TANH | LDG | EX2 under own P V "
          "| setmaxnreg dealloc / alloc | registers at launch / touched | spill bytes | instructions |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['kernel']}` | {r['HGMMA']} ({ideal_hgmma_per_tile(r['head_dim'])}) | {r['batches']} | "
              f"{r['UTMALDG']} | {r['TANH']} | {r['LDG']} | {r['EX2_overlapped']} | {r['dealloc']} / {r['alloc']} | "
              f"{r.get('registers', '?')} / {r['registers_touched']} | {r.get('spill', '?')} | {r['instructions']} |")
    problems = failures(rows)
    for p in problems:
        print(f"FAIL: {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
