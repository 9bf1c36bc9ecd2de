"""Static proof from the SASS: the instruction mix of every CUDA kernel and of its hottest loop.

Compiles the kernel templates of ``attention_kernels.cuh`` alone (no torch headers, seconds per
architecture) with ``nvcc -cubin -Xptxas -v``, disassembles them with ``cuobjdump -sass``, and reports
per kernel: registers, spill bytes, and for the loop with the largest share of tensor-core
instructions (the interior key-tile loop of the forward, the interior query-tile loop of the
backward) its length in instructions,
its HMMA count and share, shared-memory matrix loads (LDSM), asynchronous copies (LDGSTS),
exponentials (MUFU.EX2), tanh (MUFU.TANH), global atomics (RED/ATOM) and predicated instructions.

Usage (from the repository root)::

    python csrc/cuda/sass_report.py                # sm_80 and sm_90a, markdown table
    python csrc/cuda/sass_report.py --arch sm_80 --json
    python csrc/cuda/sass_report.py --cubin some.cubin   # an existing cubin instead

tests/test_cuda_static.py runs it in CI where nvcc exists and checks the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHS = ("sm_80", "sm_90a")

# The kernels the report compiles: bf16 (fp16 differs only in the mma type) at both head dims, the
# forward in the flag combinations that matter most (plain, causal, softcap, bias, the generic
# 64-row block-list kernel), the backward plain, causal, with every flag, and the deterministic
# (generic, dQ added in key-block order) kernel; the names follow the host dispatch in
# attention_fwd.cu/attention_bwd.cu.
KERNELS = (
    "attention_fwd_kernel<__nv_bfloat16, FwdTraits<128, false, false, false, 128>>",
    "attention_fwd_kernel<__nv_bfloat16, FwdTraits<128, true, false, false, 128>>",
    "attention_fwd_kernel<__nv_bfloat16, FwdTraits<128, true, true, false, 128>>",
    "attention_fwd_kernel<__nv_bfloat16, FwdTraits<128, true, false, true, 128>>",
    "attention_fwd_kernel<__nv_bfloat16, FwdTraits<128, true, true, true, 64>>",
    "attention_fwd_kernel<__nv_bfloat16, FwdTraits<64, false, false, false, 128>>",
    "attention_bwd_kernel<__nv_bfloat16, BwdTraits<128, false, false, false, false>>",
    "attention_bwd_kernel<__nv_bfloat16, BwdTraits<128, true, false, false, false>>",
    "attention_bwd_kernel<__nv_bfloat16, BwdTraits<128, true, true, true, false>>",
    "attention_bwd_kernel<__nv_bfloat16, BwdTraits<128, true, true, true, true>>",
    "attention_bwd_kernel<__nv_bfloat16, BwdTraits<64, false, false, false, false>>",
    "attention_bwd_kernel<__nv_bfloat16, BwdTraits<64, true, true, true, true>>",
)
NVCC_FLAGS = ("-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-Xptxas", "-v")

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
FUNCTION = re.compile(r"Function : (\S+)")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers")


@dataclass
class Mix:
    """Instruction counts of one range of SASS."""

    instructions: int = 0
    hmma: int = 0
    ldsm: int = 0
    ldgsts: int = 0
    lds: int = 0
    ldg: int = 0
    ex2: int = 0
    tanh: int = 0
    ffma: int = 0
    atomic: int = 0
    i2f: int = 0
    predicated: int = 0

    @property
    def hmma_share(self) -> float:
        return self.hmma / self.instructions if self.instructions else 0.0

    def add(self, opcode: str, predicated: bool) -> None:
        self.instructions += 1
        self.predicated += predicated
        head = opcode.split(".")[0]
        self.hmma += head == "HMMA"
        self.ldsm += head == "LDSM"
        self.ldgsts += head == "LDGSTS"
        self.lds += head == "LDS"
        self.ldg += head == "LDG"
        self.ffma += head == "FFMA"
        self.atomic += head in ("RED", "REDG", "ATOM", "ATOMG")  # global reductions (float atomicAdd)
        # int -> float conversions: ALiBi's |i - j| (I2F.RP, the reciprocal of an integer division, is not one)
        self.i2f += head in ("I2F", "I2FP") and ".RP" not in opcode  # I2FP: sm_90's form
        self.ex2 += opcode.startswith("MUFU.EX2")
        self.tanh += opcode.startswith("MUFU.TANH")


@dataclass
class KernelReport:
    name: str
    arch: str
    registers: int = -1
    spill_bytes: int = -1
    whole: Mix = field(default_factory=Mix)
    hot_loop: Mix = field(default_factory=Mix)


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def short_name(demangled: str) -> str:
    name = demangled.split("(")[0].replace("fastattn::cuda::", "").removeprefix("void ")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def parse_sass(text: str) -> dict[str, list[tuple[int, str, bool, str]]]:
    """``{mangled kernel: [(address, opcode, predicated, operands)]}`` from ``cuobjdump -sass``."""
    kernels: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        if m := FUNCTION.search(line):
            current = kernels.setdefault(m.group(1), [])
        elif current is not None and (m := INSTRUCTION.search(line)):
            current.append((int(m.group(1), 16), m.group(3), m.group(2) is not None, m.group(4)))
    return kernels


def hot_loop(code: list[tuple[int, str, bool, str]]) -> Mix:
    """The mix of the loop (backward branch range) with the largest HMMA share: the interior-tile
    loop (the masked-tile loop holds the same HMMA in more instructions, and in the backward also the
    cold copy of dQ's product for a K holding NaN/Inf; the forward's selective second pass is
    another loop of the same HMMA)."""
    best: tuple[int, int, Mix] | None = None
    for addr, opcode, _, operands in code:
        if not opcode.startswith("BRA"):
            continue
        target = BRANCH_TARGET.search(operands)
        if target is None or int(target.group(1), 16) > addr:
            continue
        lo = int(target.group(1), 16)
        mix = Mix()
        for a, op, pred, _ in code:
            if lo <= a <= addr:
                mix.add(op, pred)
        if mix.hmma == 0:
            continue
        key = (mix.hmma_share, mix.hmma)
        if best is None or key > best[:2]:
            best = (*key, mix)
    return best[2] if best else Mix()


def parse_ptxas(text: str) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(mangled kernel, arch): (registers, spill store + load bytes)}`` from ``-Xptxas -v`` output."""
    out, current, spill = {}, None, 0
    for line in text.splitlines():
        if m := PTXAS_ENTRY.search(line):
            current, spill = (m.group(1), m.group(2)), 0
        elif current and (m := PTXAS_SPILL.search(line)):
            spill = int(m.group(2)) + int(m.group(3))
        elif current and (m := PTXAS_USED.search(line)):
            out[current] = (int(m.group(1)), spill)
    return out


def instantiation_source() -> str:
    """A translation unit with the explicit instantiations of :data:`KERNELS` (no torch headers)."""
    lines = ['#include "attention_kernels.cuh"', "namespace fastattn {", "namespace cuda {"]
    lines += [f"template __global__ void {k}(const AttentionParams);" for k in KERNELS]
    lines += ["}  // namespace cuda", "}  // namespace fastattn", ""]
    return "\n".join(lines)


def compile_cubin(arch: str, workdir: Path, nvcc: str = "nvcc") -> tuple[Path, str]:
    src = workdir / "report.cu"
    src.write_text(instantiation_source())
    cubin = workdir / f"report_{arch}.cubin"
    cmd = [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, f"-I{HERE}", str(src), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return cubin, proc.stderr + proc.stdout


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, next to nvcc, under $CUDA_HOME, or the copy Triton ships."""
    import os

    candidates = [shutil.which("cuobjdump")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent / "cuobjdump"))
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def report_cubin(cubin: Path, arch: str, ptxas_log: str = "") -> list[KernelReport]:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (PATH, next to nvcc, $CUDA_HOME/bin, or triton's backends/nvidia/bin)")
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    kernels = parse_sass(sass)
    usage = parse_ptxas(ptxas_log)
    reports = []
    names = list(kernels)
    for mangled, pretty in zip(names, demangle(names)):
        code = kernels[mangled]
        r = KernelReport(name=short_name(pretty), arch=arch)
        for _, op, pred, _ in code:
            r.whole.add(op, pred)
        r.hot_loop = hot_loop(code)
        if (mangled, arch) in usage:
            r.registers, r.spill_bytes = usage[(mangled, arch)]
        reports.append(r)
    return sorted(reports, key=lambda r: r.name)


def markdown(reports: list[KernelReport]) -> str:
    lines = [
        "| kernel | arch | regs | spill bytes | hot loop: instr | HMMA | HMMA share | LDSM | LDGSTS | LDS | MUFU.EX2 "
        "| MUFU.TANH | RED | predicated |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in reports:
        h = r.hot_loop
        lines.append(
            f"| `{r.name}` | {r.arch} | {r.registers} | {r.spill_bytes} | {h.instructions} | {h.hmma} | "
            f"{100 * h.hmma_share:.1f}% | {h.ldsm} | {h.ldgsts} | {h.lds} | {h.ex2} | {h.tanh} | {h.atomic} | "
            f"{h.predicated} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=ARCHS, help="architecture (repeatable; default: both)")
    ap.add_argument("--cubin", type=Path, help="report an existing cubin instead of compiling")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of markdown")
    args = ap.parse_args(argv)
    reports: list[KernelReport] = []
    if args.cubin:
        reports = report_cubin(args.cubin, (args.arch or ["?"])[0])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in args.arch or ARCHS:
                cubin, log = compile_cubin(arch, Path(tmp))
                reports += report_cubin(cubin, arch, log)
    if args.json:
        print(json.dumps([{**asdict(r), "hot_loop_hmma_share": r.hot_loop.hmma_share} for r in reports], indent=1))
    else:
        print(markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
