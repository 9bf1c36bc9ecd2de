"""Static performance report of the Triton kernels, compiled ahead of time for Hopper (sm_90a), no GPU.

The launchers run on CPU tensors with ``torch.library.wrap_triton`` replaced by an ahead-of-time
compile (``triton.compile`` of an ``ASTSource`` for ``GPUTarget("cuda", 90, 32)``) of exactly the
kernel variant each launch would run. Each compiled kernel is then read:

- registers and spill bytes from ``ptxas -v`` on its PTX (the flags Triton itself uses);
- shared memory from Triton's metadata;
- the tensor-core work of one inner-loop iteration: every ``wgmma`` in each innermost loop of the
  PTX, as ``64 * n * k`` multiply-adds times the number of warpgroups, against the ideal for the
  tile (``2``, ``4``, ``3`` and ``2`` matmuls of ``BLOCK_M * BLOCK_N * BLOCK_D`` for the forward, dK/dV
  and dQ kernels and the dQ kernel's delta pass): more than ideal means duplicated matmuls, fewer means no tensor cores;
- special-function ops (``ex2``, ``tanh``, ``rcp``, full-precision divisions) per score per iteration;
- tensor-memory-accelerator copies (``cp.async.bulk.tensor``, TMA) per inner-loop iteration: the
  launchers pass ``USE_TMA`` where a Hopper GPU would (16-byte aligned rows); feature ``notma``
  compiles the pointer path instead.

Usage (without ``TRITON_INTERPRET``)::

    python benchmarks/triton_static_report.py                      # markdown table, pinned configs
    python benchmarks/triton_static_report.py --json out.json      # also the raw rows
    python benchmarks/triton_static_report.py --features softcap,dropout --head-dims 128
    python benchmarks/triton_static_report.py --rows out.json      # the table of earlier rows
    python benchmarks/triton_static_report.py --features floatmask,dropout --length 320  # aligned mask rows

``tests/test_triton_compile.py`` uses the same functions to assert the static properties in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = 232448  # bytes of shared memory per block on H100 / H200
# The dQ kernel's delta pass (DELTA_PASS, 16-bit inputs: rowsum(P * dP), no dq matmul) is reported apart.
DELTA_PASS = "attention_bwd_dq_kernel[DELTA_PASS]"
# The redo launches (REDO_NONFINITE: rows whose output is NaN/Inf, computed again by selection) too;
# the forward's has a third matmul (which non-finite values each row sees).
FWD_REDO = "attention_fwd_kernel[REDO_NONFINITE]"
DQ_REDO = "attention_bwd_dq_kernel[REDO_NONFINITE]"
# The backward's row statistics with an additive mask (the forward kernel's ROW_STATS: Q K^T only).
ROW_STATS = "attention_fwd_kernel[ROW_STATS]"
MATMULS_PER_TILE = {"attention_fwd_kernel": 2, "attention_bwd_dkdv_kernel": 4, "attention_bwd_dq_kernel": 3,
                    DELTA_PASS: 2, FWD_REDO: 3, DQ_REDO: 3, ROW_STATS: 1}
SHORT = {"attention_fwd_kernel": "fwd", "attention_bwd_dkdv_kernel": "dK/dV", "attention_bwd_dq_kernel": "dQ",
         DELTA_PASS: "delta", FWD_REDO: "fwd redo", DQ_REDO: "dQ redo", ROW_STATS: "row stats"}
# The varlen kernels (feature "varlen": packed sequences through triton_kernels/attention_varlen.py).
MATMULS_PER_TILE.update({k.replace("attention_", "attention_varlen_"): n for k, n in MATMULS_PER_TILE.items()})
SHORT.update({k.replace("attention_", "attention_varlen_"): "varlen " + n for k, n in list(SHORT.items())})


# --------------------------------------------------------------------------- compiling the launches
def compile_launches(dtype_name: str, head_dim: int, features: set[str], length: int = 300) -> list[dict]:
    """Run the forward and backward launchers with every ``wrap_triton`` launch compiled for sm_90a, not run.

    Returns one dict per compiled kernel: ``kernel`` (name), ``meta`` (BLOCK_M, BLOCK_N, BLOCK_D,
    num_warps, num_stages), ``shared`` (bytes), ``ptx`` and ``ttir`` (Triton's first IR). Autotuned launches compile every config
    the tuner would try. Must run without ``TRITON_INTERPRET``.
    """
    import importlib

    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    sys.path.insert(0, str(ROOT))
    from fastattn import BlockMask, masks
    from fastattn.backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    fwd_module = importlib.import_module("fastattn.triton_kernels.attention_fwd")
    attention_fwd = fwd_module.attention_fwd
    # Compile what a Hopper GPU runs: tensor descriptors (TMA) where the inputs allow ("notma": pointers).
    fwd_module._tma_device = lambda device: "notma" not in features
    attention_bwd = importlib.import_module("fastattn.triton_kernels.attention_bwd").attention_bwd

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    compiled = []

    def compile_one(fn, kwargs):
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        k = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        meta = {key: kwargs.get(key) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")}
        meta.update(num_warps=options.num_warps, num_stages=options.num_stages)
        name = fn.__name__
        if kwargs.get("DELTA_PASS"):
            name = DELTA_PASS
        elif kwargs.get("REDO_NONFINITE"):
            name = f"{fn.__name__}[REDO_NONFINITE]"
        elif kwargs.get("ROW_STATS"):
            name = ROW_STATS
        compiled.append({
            "kernel": name, "meta": meta, "shared": k.metadata.shared, "ptx": k.asm["ptx"], "ttir": k.asm["ttir"],
        })

    class Compile:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(**kwargs):
                if hasattr(self.kernel, "configs"):  # an autotuner: compile every config it would try
                    kernel_configs = self.kernel.configs
                    if getattr(self.kernel, "prune_configs_by", None):
                        prune = self.kernel.prune_configs_by.get("early_config_prune")
                        if prune is not None:
                            kernel_configs = prune(kernel_configs, kwargs)
                    for config in kernel_configs:
                        meta = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                        compile_one(self.kernel.fn, meta)
                else:
                    compile_one(self.kernel, kwargs)

            return launch

    torch.library.wrap_triton = Compile
    dtype = getattr(torch, dtype_name)
    B, Hq, L = 1, 4, length
    Hkv = 1 if "gqa" in features else Hq
    q = torch.randn(B, Hq, L, head_dim, dtype=dtype)
    k = torch.randn(B, Hkv, L, head_dim, dtype=dtype)
    v = torch.randn(B, Hkv, L, head_dim, dtype=dtype)
    kwargs = {"scale": head_dim**-0.5}
    lists = {}
    if "causal" in features:
        kwargs["window_right"] = 0
    if "window" in features:
        kwargs.update(window_left=17, window_right=3)
    if "alibi" in features:
        kwargs["alibi_slopes"] = torch.rand(B, Hq)
    if "softcap" in features:
        kwargs["softcap"] = 20.0
    if "dropout" in features:
        kwargs.update(dropout_p=0.1, seed=2**40 + 7)
    if "lengths" in features:
        kwargs.update(
            key_lengths=torch.tensor([L - 50], dtype=torch.int32), query_lengths=torch.tensor([L - 100], dtype=torch.int32)
        )
    if "floatmask" in features:
        kwargs["attn_mask"] = torch.randn(L, L, dtype=dtype).expand(B, Hq, L, L)
    if "boolmask" in features:
        kwargs["attn_mask"] = (torch.rand(L, L) > 0.3).expand(B, Hq, L, L)
    mask = None
    if "block128" in features:
        mask = BlockMask.from_dense(torch.rand(L, L) > 0.5, block_size=128)
    if "docmask" in features:  # per-tile element masks (partial_masks) instead of a dense mask
        mask = masks.document((torch.arange(L) // 70)[None], causal=True, block_size=64)
        kwargs.update(partial_masks=mask.partial_masks, partial_tile_ids=mask.partial_tile_ids)
    if mask is not None:
        kwargs.update(zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"), mask.kv_lists))
        kwargs.update(block_size_q=mask.block_size[0], block_size_k=mask.block_size[1])
        lists = dict(zip(("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"), mask.q_lists))
    if "varlen" in features:  # the same features on packed sequences (lengths 0 and 1 among them)
        _compile_varlen(dtype, head_dim, Hq, Hkv, kwargs)
        return compiled
    # The launchers take the mask arguments as one MaskArgs, the scale and dropout as keywords.
    fields = fwd_module.MaskArgs._fields
    mask_args = fwd_module.MaskArgs(**{key: val for key, val in {**kwargs, **lists}.items() if key in fields})
    rest = {key: val for key, val in kwargs.items() if key not in fields}
    if "nofwd" not in features:
        attention_fwd(q, k, v, mask_args, **rest)
    out, lse = torch.zeros(B, Hq, L, head_dim, dtype=dtype), torch.zeros(B, Hq, L)
    dbias = "floatmask" in features and "nodbias" not in features
    attention_bwd(torch.randn_like(out), q, k, v, out, lse, mask_args, **rest, compute_dbias=dbias)
    return compiled


def _compile_varlen(dtype, head_dim: int, Hq: int, Hkv: int, kwargs: dict) -> None:
    """Run the varlen launchers (wrap_triton already patched to compile) on a packing of 5 sequences
    with ``kwargs``'s window, ALiBi, softcap and dropout; masks and lengths do not apply."""
    import importlib

    import torch

    varlen = importlib.import_module("fastattn.triton_kernels.attention_varlen")
    lengths = [130, 1, 0, 77, 300]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    q = torch.randn(total, Hq, head_dim, dtype=dtype)
    k, v = (torch.randn(total, Hkv, head_dim, dtype=dtype) for _ in range(2))
    alibi = kwargs.get("alibi_slopes")
    args = (cu, cu, max(lengths), max(lengths), None if alibi is None else alibi[0], kwargs["scale"],
            kwargs.get("window_left"), kwargs.get("window_right"), kwargs.get("softcap", 0.0))
    dropout = (kwargs.get("dropout_p", 0.0), kwargs.get("seed", 0))
    varlen.attention_varlen_fwd(q, k, v, *args, *dropout)
    out, lse = torch.zeros(total, Hq, head_dim, dtype=dtype), torch.zeros(Hq, total)
    varlen.attention_varlen_bwd(torch.randn_like(out), q, k, v, out, lse, *args, None, *dropout)


# --------------------------------------------------------------------------- reading the compiled code
def ptxas_usage(ptx: str) -> dict:
    """Registers, spill bytes and stack of ``ptx`` as ``ptxas -v`` reports them for sm_90a (cached by PTX hash)."""
    from triton import knobs

    cache_dir = Path(knobs.cache.dir or Path.home() / ".triton" / "cache") / "fastattn-ptxas"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / (hashlib.sha256(ptx.encode()).hexdigest() + ".json")
    if cached.exists():
        return json.loads(cached.read_text())
    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src), "-o", str(src) + ".o"],
            capture_output=True, text=True, check=True,
        )
    log = done.stderr + done.stdout

    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    usage = {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack": number(r"(\d+) bytes stack frame"),
    }
    cached.write_text(json.dumps(usage))
    return usage


_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_WGMMA = re.compile(r"wgmma\.mma_async\S*\.m(\d+)n(\d+)k(\d+)")


def innermost_loops(ptx: str) -> list[str]:
    """The text of every innermost loop (a backward branch's span that holds no other loop)."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        found = _LABEL.match(line)
        if found:
            labels[found.group(1)] = i
    spans = []
    for i, line in enumerate(lines):
        found = _BRANCH.search(line)
        if found and found.group(1) in labels and labels[found.group(1)] <= i:
            spans.append((labels[found.group(1)], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return ["\n".join(lines[a:b + 1]) for a, b in sorted(set(inner))]


_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)? = ([\w.]+) (.*)$")


def int32_pointer_products(ttir: str) -> list[str]:
    """Products computed in int32 that reach a tensor of pointers (``tt.addptr`` offsets), from Triton's IR.

    Follows each pointer offset back through adds, broadcasts and casts; an ``arith.muli`` on i32
    of two runtime values on the way (a row index times a stride) overflows once it passes 2**31.
    A block index times a constant tile is a row index, bounded by the int32 lengths.
    """
    defs = {}
    for line in ttir.splitlines():
        found = _DEF.match(line)
        if found:
            defs[found.group(1)] = (found.group(2), found.group(3))
    bad = []
    for line in ttir.splitlines():
        if "tt.addptr" not in line or "tensor<" not in line:
            continue
        operands = re.findall(r"%[\w.#]+", line.split("tt.addptr", 1)[1].split(":")[0])
        stack, seen = operands[1:2], set()
        while stack:
            name = stack.pop()
            if name in seen or name not in defs:
                continue
            seen.add(name)
            op, rest = defs[name]
            constant = re.search(r"%c(st)?\d*(_i32)?\b", rest.split(":")[0])  # block index * tile: a row index
            if op == "arith.muli" and not constant and re.search(r":\s*(tensor<[^>]*xi32>|i32)\s*(loc|$)", rest):
                bad.append(f"{name} = {op} {rest.split(' loc(')[0]}")
            if op in ("arith.addi", "arith.subi", "arith.muli", "tt.broadcast", "tt.expand_dims", "tt.splat",
                      "arith.extsi", "arith.extui", "tt.trans", "tt.reshape"):
                stack.extend(re.findall(r"%[\w.#]+", rest.split(":")[0]))
    return sorted(set(bad))


def count_ops(text: str) -> dict:
    """Tensor-core multiply-adds per warpgroup and special-function ops in ``text`` (PTX)."""
    return {
        "wgmma": len(_WGMMA.findall(text)),
        "wgmma_macs": sum(int(m) * int(n) * int(k) for m, n, k in _WGMMA.findall(text)),
        "mma_sync": len(re.findall(r"\bmma\.sync\b", text)),
        "ex2": len(re.findall(r"\bex2\.approx", text)),
        "tanh": len(re.findall(r"\btanh\.approx", text)),
        "rcp": len(re.findall(r"\brcp\.", text)),
        "div": len(re.findall(r"\bdiv\.(?:rn|full)\.f32", text)),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor\b", text)),
    }


def analyse(entry: dict) -> dict:
    """One report row for a compiled kernel (see the module docstring)."""
    meta = entry["meta"]
    warpgroups = max(1, meta["num_warps"] // 4)
    block_d = max(meta.get("BLOCK_D") or 0, meta.get("BLOCK_DV") or 0)
    ideal = MATMULS_PER_TILE[entry["kernel"]] * meta["BLOCK_M"] * meta["BLOCK_N"] * block_d
    loops = [count_ops(body) for body in innermost_loops(entry["ptx"])]
    loops = [c for c in loops if c["wgmma"] or c["mma_sync"]]  # the tile loops (others: index lists, ...)
    scores_per_thread = meta["BLOCK_M"] * meta["BLOCK_N"] / (32 * meta["num_warps"])
    row = {"kernel": entry["kernel"], "meta": meta, "shared": entry["shared"], **ptxas_usage(entry["ptx"])}
    row["ideal_macs"] = ideal
    row["loop_macs"] = [c["wgmma_macs"] * warpgroups for c in loops]
    row["loop_wgmma"] = [c["wgmma"] for c in loops]
    row["loop_mma_sync"] = [c["mma_sync"] for c in loops]
    row["loop_tma"] = [c["tma"] for c in loops]
    worst = max(loops, key=lambda c: c["ex2"] + c["tanh"] + c["rcp"] + c["div"]) if loops else count_ops("")
    row["sfu_per_score"] = {op: round(worst[op] / scores_per_thread, 2) for op in ("ex2", "tanh", "rcp", "div")}
    return row


# --------------------------------------------------------------------------- the report
def report_rows(dtypes, head_dims, features: set[str], length: int = 300) -> list[dict]:
    """Compile (in a subprocess each: the launchers patch torch) and analyse every kernel of each case."""
    rows = []
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("FASTATTN_AUTOTUNE", "0")
    for dtype in dtypes:
        for head_dim in head_dims:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", dtype, str(head_dim), ",".join(sorted(features)) or "-", str(length)],
                env=env, capture_output=True, text=True, check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{dtype} D={head_dim}: {done.stderr[-3000:]}")
            for entry in json.loads(done.stdout.strip().splitlines()[-1]):
                if entry["kernel"] not in MATMULS_PER_TILE:
                    continue  # the backward's preprocess: no tile loop
                row = analyse(entry)
                row.update(dtype=dtype, head_dim=head_dim)
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (tiles as queries x keys per step)."""
    head = (
        "| kernel | dtype | D | BLOCK_M×BLOCK_N (queries×keys), warps, stages | registers | spill B (st/ld) "
        "| shared KiB | tensor-core work per iteration / ideal | wgmma per iteration | ex2 / tanh / rcp / div per score "
        "| TMA copies per iteration |"
    )
    out = [head, "|" + "---|" * 11]
    for r in rows:
        m = r["meta"]
        if any(r["loop_macs"]):
            ratio = ", ".join(f"{x / r['ideal_macs']:.2f}" for x in sorted(set(r["loop_macs"])))
            wgmma = ", ".join(map(str, sorted(set(r["loop_wgmma"]))))
        else:
            ratio, wgmma = "mma.sync only", "0"
        sfu = r["sfu_per_score"]
        tma = ", ".join(map(str, sorted(set(r["loop_tma"])))) if "loop_tma" in r else "–"
        out.append(
            f"| {SHORT[r['kernel']]} | {r['dtype']} | {r['head_dim']} | {m['BLOCK_M']}×{m['BLOCK_N']}, "
            f"{m['num_warps']}, {m['num_stages']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} "
            f"| {r['shared'] / 1024:.1f} | {ratio} | {wgmma} | {sfu['ex2']} / {sfu['tanh']} / {sfu['rcp']} / {sfu['div']} "
            f"| {tma} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--features", default="",
                        help="comma list: causal,softcap,dropout,alibi,lengths,... (varlen: the varlen kernels)")
    parser.add_argument("--length", type=int, default=300,
                        help="sequence length (a mask's rows are 16-byte aligned when it is a multiple of 8)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--rows", help="print the table of rows written by --json earlier (no compiling)")
    args = parser.parse_args(argv)
    if args.rows:
        print(markdown(json.loads(Path(args.rows).read_text())))
        return 0
    features = set(filter(None, args.features.split(",")))
    rows = report_rows(args.dtypes.split(","), [int(d) for d in args.head_dims.split(",")], features, args.length)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        length = int(sys.argv[5]) if len(sys.argv) > 5 else 300
        result = compile_launches(sys.argv[2], int(sys.argv[3]), set(sys.argv[4].split(",")) - {"-"}, length)
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
