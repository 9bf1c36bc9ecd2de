"""The Hopper forward (csrc/cuda/sm90): static proof without a GPU, values on one.

* Static proof (runs where nvcc, cuobjdump and the CUTLASS headers are, no GPU needed): the kernel
  file compiled alone for sm_90a has, in every instantiation, wgmma (HGMMA), TMA loads (UTMALDG)
  and register reallocation to the design's split (USETMAXREG), and ptxas spills nothing.
* ``gpu`` tests (an sm_90 GPU and an extension built with the Hopper kernel): every flag
  combination it covers against the reference, values and gradients (the backward is the sm80
  kernel's, fed the Hopper forward's output and lse), which calls fall back to the sm80 kernels,
  and the three compute-sanitizer tools over csrc/cuda/sm90/sanitize_case.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _inputs, reference
from fastattn.backends import cuda as cuda_backend

from .helpers import check_against_reference, make_qkv
from .tolerance import assert_close_to_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sass_report", os.path.join(ROOT, "csrc/cuda/sm90/sass_report.py"))
sass_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_report)

# ---------------------------------------------------------------- static proof (no GPU) ----


@pytest.fixture(scope="module")
def sass_rows(tmp_path_factory):
    missing = [
        name
        for name, found in (
            ("nvcc", sass_report.find_tool("nvcc")),
            ("cuobjdump", sass_report.find_tool("cuobjdump")),
            ("CUTLASS headers (pip install --no-deps nvidia-cutlass)", sass_report.cutlass_include()),
        )
        if found is None
    ]
    if missing:
        pytest.skip(f"cannot compile the Hopper kernel here: no {', '.join(missing)}")
    sass, ptxas, _ = sass_report.compile_kernels(str(tmp_path_factory.mktemp("sm90")))
    return sass_report.analyse(sass, ptxas)


def test_sass_has_the_design(sass_rows):
    """Each of the 8 kernels holds HGMMA, UTMALDG, setmaxnreg to the declared split, no spills."""
    assert sass_report.failures(sass_rows) == []


def test_sass_counts_follow_the_tiles(sass_rows):
    """Per kernel, HGMMA instructions come in whole matmuls: Q K^T is D / 16 k-steps of
    64 x kBlockN x 16, P V is kBlockN / 16 k-steps of 64 x D x 16; the compiler may replicate a
    matmul (masked and unmasked tile paths) but never emit a fraction of one."""
    for row in sass_rows:
        d = 128 if "D128" in row["kernel"] else 64
        per_tile = d // 16 + 128 // 16  # k-steps of both matmuls of one key tile
        assert row["HGMMA"] >= per_tile, row
        # one Q box plus one K and one V box per issue site; TMA boxes are 64 elements wide (128 bytes)
        assert row["UTMALDG"] % (d // 64) == 0, row


def test_register_split_fits_the_register_file():
    producer, consumer, groups, threads = sass_report.design_registers()
    assert (producer, consumer, groups, threads) == (24, 240, 2, 384)
    assert 128 * producer + 128 * groups * consumer <= sass_report.REGISTER_FILE


def test_sass_analysis_catches_a_missing_instruction():
    """The checker fails a kernel whose SASS lacks wgmma or TMA or reallocates to other counts."""
    rows = [
        {"kernel": "k", "HGMMA": 0, "UTMALDG": 4, "dealloc": [24], "alloc": [240], "spill": 0, "registers": 168},
        {"kernel": "k2", "HGMMA": 16, "UTMALDG": 0, "dealloc": [40], "alloc": [232], "spill": 8, "registers": 168},
    ]
    problems = "\n".join(sass_report.failures(rows))
    assert "k: no HGMMA" in problems and "k2: no UTMALDG" in problems
    assert "k2: setmaxnreg [40] / [232]" in problems and "k2: ptxas spills 8" in problems


# ---------------------------------------------------------------- dispatch rule (no GPU) ----


def _inputs_for(**kwargs):
    q, k, v = make_qkv(1, 2, 1, 17, 33, 64, dtype=torch.float16, requires_grad=False)
    return _inputs.normalize(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        pytest.param({"softcap": 5.0}, "softcap", id="softcap"),
        pytest.param({"window": (8, 0)}, "window other than bottom-right causal", id="window"),
        pytest.param({"alibi_slopes": torch.ones(2)}, "alibi", id="alibi"),
        pytest.param({"attn_mask": torch.ones(17, 33, dtype=torch.bool)}, "attn_mask", id="attn_mask"),
    ],
)
def test_hopper_reasons_name_what_it_lacks(kwargs, reason):
    assert any(reason in r for r in cuda_backend.hopper_reasons(_inputs_for(**kwargs)))


def test_hopper_reasons_accept_plain_and_causal_apart_from_the_machine():
    """Without a GPU only machine reasons remain for the calls the kernel covers."""
    machine = ("built without the Hopper kernel", "not sm_90")
    for kwargs in ({}, {"causal": True}):
        reasons = cuda_backend.hopper_reasons(_inputs_for(**kwargs))
        assert all(any(m in r for m in machine) for r in reasons), reasons


# ---------------------------------------------------------------- on an sm_90 GPU ----


def _hopper_here() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return "needs an sm_90 GPU"
    if not cuda_backend.HOPPER_BUILT:
        return "the extension was built without the Hopper kernel"
    return None


requires_hopper = pytest.mark.skipif(_hopper_here() is not None, reason=str(_hopper_here()))
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
# (B, Hq, Hkv, Lq, Lk): odd lengths below, at and across the 128-row/128-key tiles, Lq != Lk both
# ways, GQA and MQA.
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, id="B1-H1-L1"),
    pytest.param(2, 3, 3, 17, 17, id="B2-H3-L17"),
    pytest.param(1, 2, 2, 97, 257, id="B1-H2-Lq97-Lk257"),
    pytest.param(2, 4, 2, 257, 97, id="B2-Hq4-Hkv2-Lq257-Lk97"),
    pytest.param(1, 4, 1, 128, 128, id="B1-Hq4-Hkv1-L128"),
    pytest.param(1, 2, 1, 1000, 1000, id="B1-Hq2-Hkv1-L1000"),
    pytest.param(1, 2, 2, 1, 1000, id="B1-H2-Lq1-Lk1000"),
]


def _check(q, k, v, **kwargs):
    assert cuda_backend.forward_path(_inputs.normalize(q, k, v, **kwargs)) == "sm90"
    check_against_reference("cuda", q, k, v, **kwargs)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk", SHAPES)
def test_against_reference(B, Hq, Hkv, Lq, Lk, D, dtype, causal):
    _check(*make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device="cuda"), causal=causal)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("D", [64, 128])
def test_strided_and_offset_inputs(D):
    """(B, L, H, D) memory seen through transpose (no copy), and an offset q (copied for TMA)."""
    q, k, v = (torch.randn(2, 130, 4, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    _check(*(t.requires_grad_() for t in (q, k, v)), causal=True)
    base = torch.randn(2 * 4 * 77 * D + 1, device="cuda", dtype=torch.float16)
    q = base[1:].view(2, 4, 77, D).requires_grad_()
    _, k, v = make_qkv(2, 4, 4, 77, 77, D, dtype=torch.float16, device="cuda")
    _check(q, k, v)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_and_rows_that_see_nothing(dtype):
    """Causal with Lq > Lk: the first Lq - Lk rows see no key -> 0 and lse = -inf, never NaN."""
    q, k, v = make_qkv(1, 2, 2, 300, 90, 128, dtype=dtype, device="cuda", requires_grad=False)
    assert cuda_backend.forward_path(_inputs.normalize(q, k, v, causal=True)) == "sm90"
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    _, lse32 = reference.attention(q.float(), k.float(), v.float(), causal=True, return_lse=True)
    _, lse_lp = reference.attention(q, k, v, causal=True, return_lse=True)
    blind = 300 - 90  # rows i < Lq - Lk see no key (bottom-right causal)
    assert torch.isfinite(out).all() and (out[:, :, :blind] == 0).all()
    assert torch.isneginf(lse[:, :, :blind]).all()
    assert_close_to_reference("lse", lse[:, :, blind:], lse32[:, :, blind:], lse_lp[:, :, blind:].float())


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize(
    "kwargs", [pytest.param({"softcap": 20.0}, id="softcap"), pytest.param({"window": (40, 3)}, id="window")]
)
def test_uncovered_calls_fall_back_to_sm80(kwargs):
    """The op hands calls the Hopper kernel lacks to the sm80 kernels, with the same results."""
    q, k, v = make_qkv(1, 2, 1, 150, 150, 64, dtype=torch.float16, device="cuda")
    assert cuda_backend.forward_path(_inputs.normalize(q, k, v, **kwargs)) == "sm80"
    check_against_reference("cuda", q, k, v, **kwargs)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool):
    sanitizer = shutil.which("compute-sanitizer") or sass_report.find_tool("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    result = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, "csrc/cuda/sm90/sanitize_case.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sanitize case done" in result.stdout
