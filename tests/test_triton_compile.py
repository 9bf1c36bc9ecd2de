"""The Triton kernels compile for a Hopper GPU (sm_90a) and meet their static performance targets, checked without one.

Each case runs the launchers in a subprocess without TRITON_INTERPRET, with ``wrap_triton``
replaced by an ahead-of-time compile (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, ptxas
included) of exactly the kernel variant the launcher would launch (``benchmarks/triton_static_report.py``
does the compiling and reading; Triton's cache and a ptxas cache make reruns fast). This catches
what the interpreter cannot: type errors in compiled code, unsupported ops, ptxas failures, tiles
that overflow shared memory, register spills, duplicated matmuls and int32 offset arithmetic.
The launches are compiled as a Hopper GPU would launch them: tiles through tensor descriptors
(TMA) where the inputs allow, the pointer path with the feature ``notma``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_static_report.py"
_spec = importlib.util.spec_from_file_location("triton_static_report", _SCRIPT)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

SMEM_LIMIT = report.SMEM_LIMIT
KERNELS = {"attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
# 16-bit inputs that ask for the mask's gradient also run the dQ kernel's delta pass (delta = rowsum(P * dP)
# in float32, two matmuls per tile).
KERNELS_DBIAS_16 = KERNELS | {report.DELTA_PASS}

CASES = [
    pytest.param("bfloat16", 128, "causal,alibi,softcap,floatmask,dropout,lengths", id="bf16-D128-all-features"),
    pytest.param("float16", 256, "block128,gqa", id="fp16-D256-block128-gqa"),
    pytest.param("float32", 40, "window", id="fp32-D40-window"),
    pytest.param("bfloat16", 64, "docmask,gqa", id="bf16-D64-docmask-gqa"),
    pytest.param("float16", 96, "window,lengths,boolmask,dropout", id="fp16-D96-window-lengths-boolmask-dropout"),
    pytest.param("bfloat16", 256, "causal,softcap", id="bf16-D256-causal-softcap"),
    pytest.param("float16", 64, "notma,causal,lengths,gqa", id="fp16-D64-pointer-loads"),
    # Every autotuning candidate left after pruning: a config that does not compile would not be
    # skipped by the autotuner on the GPU (only running out of resources is), it would fail the call.
    pytest.param("bfloat16", 128, "autotune,causal", id="bf16-D128-causal-every-tuned-config"),
    pytest.param("float16", 64, "autotune", id="fp16-D64-every-tuned-config"),
]


def compile_case(dtype: str, head_dim: int, features: str, length: int = 300) -> list[dict]:
    """The compiled kernels of one launcher case (a subprocess: the launchers are patched there)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["FASTATTN_AUTOTUNE"] = "1" if "autotune" in features else "0"
    done = subprocess.run(
        [sys.executable, str(_SCRIPT), "--worker", dtype, str(head_dim), features, str(length)], env=env,
        capture_output=True,
        text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dtype, head_dim, features", CASES)
def test_kernels_compile_for_sm90(dtype, head_dim, features):
    compiled = compile_case(dtype, head_dim, features)
    names = {c["kernel"] for c in compiled}
    assert KERNELS <= names
    for c in compiled:
        # Autotuning candidates are pruned by a shared-memory estimate before compiling: all must fit.
        assert c["shared"] <= SMEM_LIMIT, f"{c['kernel']} {c['meta']} needs {c['shared']} bytes of shared memory"


# --------------------------------------------------------------------------- static performance proof
def assert_spill_free_with_ideal_tensor_core_work(rows: list[dict]) -> None:
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        where = f"{r['kernel']} {r['meta']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills: {r}"
        assert r["shared"] <= SMEM_LIMIT, where
        assert r["loop_macs"], f"{where}: no inner loop with tensor-core instructions"
        assert all(macs == r["ideal_macs"] for macs in r["loop_macs"]), (
            f"{where}: wgmma multiply-adds per iteration {r['loop_macs']} (x warpgroups), ideal {r['ideal_macs']}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pinned_configs_are_spill_free_with_ideal_tensor_core_work(dtype, head_dim):
    """Every pinned config: 0 spill bytes, shared memory within the H100's, per inner-loop iteration
    exactly the tile's matmul work in wgmma instructions (more = duplicated matmuls), and the two
    tiles streamed per iteration (K and V; Q and dO in dK/dV) each one TMA copy."""
    rows = [report.analyse(c) for c in compile_case(dtype, head_dim, "-") if c["kernel"] in KERNELS_DBIAS_16]
    assert_spill_free_with_ideal_tensor_core_work(rows)
    for r in rows:
        assert r["loop_tma"] and all(n == 2 for n in r["loop_tma"]), f"{r['kernel']}: TMA copies {r['loop_tma']}"


@pytest.mark.slow
def test_pointer_path_is_spill_free_with_ideal_tensor_core_work():
    """The pointer loads (GPUs before Hopper, unaligned inputs) meet the same targets, without TMA."""
    rows = [report.analyse(c) for c in compile_case("bfloat16", 128, "notma") if c["kernel"] in KERNELS_DBIAS_16]
    assert_spill_free_with_ideal_tensor_core_work(rows)
    assert all(n == 0 for r in rows for n in r["loop_tma"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "head_dim, features, spill_bound",
    [
        pytest.param(128, "softcap,dropout", {}, id="D128-softcap-dropout"),
        # A mask tile, Philox draws and dbias's dS tile together: at 128 dK/dV and dQ keep a small
        # spill (was 704 and 388 bytes with the plain tiles); at 64 dK/dV (was 412 B, forward 884 B).
        # The case's (L, L) mask broadcasts over B and Hq, so dK/dV adds its dS tile with float32
        # atomics into the mask's own shape (104 B stored, 120 B loaded; at most 80 B when it stored a
        # dense dbias), and the natural-unit scores of additive masks (huge mask values) add a little:
        # 132 B stored, 148 B loaded.
        pytest.param(128, "floatmask,lengths,dropout",
                     {"attention_bwd_dkdv_kernel": 160, "attention_bwd_dq_kernel": 80}, id="D128-float-mask-dropout"),
        pytest.param(64, "floatmask,lengths,dropout", {"attention_bwd_dkdv_kernel": 16}, id="D64-float-mask-dropout"),
    ],
)
def test_feature_mixes_that_spilled_take_lean_tiles(head_dim, features, spill_bound):
    """bf16 with 16-byte aligned mask rows (L = 320): the lean tiles (configs.lean_features) are
    spill-free, or within the bytes given, with ideal tensor-core work per iteration."""
    rows = [
        report.analyse(c) for c in compile_case("bfloat16", head_dim, features, length=320)
        if c["kernel"] in KERNELS_DBIAS_16
    ]
    assert {r["kernel"] for r in rows} == (KERNELS_DBIAS_16 if "floatmask" in features else KERNELS)
    for r in rows:
        bound = spill_bound.get(r["kernel"], 0)
        assert r["spill_stores"] <= bound and r["spill_loads"] <= bound, f"{r['kernel']} {r['meta']}: {r}"
        assert r["loop_macs"] and all(macs == r["ideal_macs"] for macs in r["loop_macs"]), r["kernel"]


@pytest.mark.slow
def test_head_dim_256_fits_shared_memory_and_is_reported():
    rows = [report.analyse(c) for c in compile_case("bfloat16", 256, "-") if c["kernel"] in KERNELS]
    for r in rows:
        assert r["shared"] <= SMEM_LIMIT, r["kernel"]
        # At 256 the pinned backward tiles trade tensor-core instructions for no spills (docs/perf-notes.md).
        print(r["kernel"], r["meta"], "registers", r["registers"], "spills", r["spill_stores"], r["spill_loads"])
    assert all(r["spill_stores"] == 0 for r in rows)
    # The backward's mma.sync tiles load through pointers here (TMA-staged tiles made them spill KBs).
    assert all(n == 0 for r in rows if r["kernel"] != "attention_fwd_kernel" for n in r["loop_tma"])
    assert all(n == 2 for r in rows if r["kernel"] == "attention_fwd_kernel" for n in r["loop_tma"])


@pytest.mark.slow
def test_backward_offsets_are_int64():
    """No int32 product of runtime values reaches a pointer in the backward kernels (q/k/v/do rows,
    dq/dk/dv rows, the mask, dbias, with GQA, lengths and dropout): any stride, any length."""
    compiled = compile_case("bfloat16", 64, "floatmask,lengths,dropout,gqa,nofwd")
    backward = [c for c in compiled if c["kernel"].startswith("attention_bwd")]
    assert {c["kernel"] for c in backward} >= {"attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
    for c in backward:
        assert report.int32_pointer_products(c["ttir"]) == [], c["kernel"]


def test_int32_pointer_products_are_found():
    """The IR check above can fail: a row index times a stride in int32 is reported."""
    ttir = "\n".join([
        "    %row = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32>",
        "    %off = arith.muli %row, %stride : tensor<64xi32> loc(#loc1)",
        "    %off64 = arith.muli %row64, %stride64 : tensor<64xi64> loc(#loc2)",
        "    %p = tt.addptr %base, %off : tensor<64x!tt.ptr<bf16>>, tensor<64xi32> loc(#loc3)",
        "    %p2 = tt.addptr %base, %off64 : tensor<64x!tt.ptr<bf16>>, tensor<64xi64> loc(#loc4)",
    ])
    assert report.int32_pointer_products(ttir) == ["%off = arith.muli %row, %stride : tensor<64xi32>"]


def test_innermost_loops_and_wgmma_count():
    ptx = "\n".join([
        "$L__BB0_1:", "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {};",
        "$L__BB0_2:", "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {};", "ex2.approx.f32 %f1, %f2;",
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];",
        "@%p1 bra $L__BB0_2;", "bra.uni $L__BB0_1;",
    ])
    loops = report.innermost_loops(ptx)
    assert len(loops) == 1
    ops = report.count_ops(loops[0])
    assert ops["wgmma"] == 1 and ops["wgmma_macs"] == 64 * 128 * 16 and ops["ex2"] == 1 and ops["tma"] == 1
