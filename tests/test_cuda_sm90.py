"""The Hopper forward (csrc/cuda/sm90): static proof without a GPU, values on one.

* Static proof (runs where nvcc, cuobjdump and the CUTLASS headers are, no GPU needed): the kernel
  file compiled alone for sm_90a has, in every instantiation, wgmma (HGMMA) in whole matmuls, TMA
  loads (UTMALDG), register reallocation to the design's split (USETMAXREG), the softmax between
  the two matmul waits, and ptxas spills nothing; the tile schedule runs on the CPU against a
  brute force.
* ``gpu`` tests (an sm_90 GPU and an extension built with the Hopper kernel): every compile-time
  feature (window, ALiBi, softcap, lengths, BlockMask tile lists) alone and combined, against the
  reference, values and gradients (the backward is the sm80
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
    """Every instantiation holds HGMMA in whole matmuls (2 x the ideal per tile: each matmul at two
    issue sites), UTMALDG, setmaxnreg to the declared split, one MUFU.TANH per score only with
    softcap, no LDG without lengths / lists / ALiBi, the whole softmax between the waits for S and
    for P V (intra-warpgroup overlap), no register above the consumers' ceiling, no spills and no
    serialized wgmma."""
    assert sass_report.failures(sass_rows) == []


def test_instantiations_are_the_declared_feature_sets(sass_rows):
    """The kernels compiled are {fp16, bf16} x {64, 128} x kInstantiated, the plain one included."""
    flags = sass_report.instantiated_features()
    assert 0 in flags  # the feature-free instantiation
    found = {(r["kernel"].split(",")[0], r["head_dim"], r["features"]) for r in sass_rows}
    assert found == {(f"kernel<{t}", d, f) for t in ("fp16", "bf16") for d in (64, 128) for f in flags}


def test_plain_instantiation_carries_no_feature_code(sass_rows):
    """The plain kernel: no tanh, no global loads (lengths, lists, slopes), and fewer instructions
    than the window kernel, which has fewer than the all-features one."""
    for dtype in ("fp16", "bf16"):
        for d in (64, 128):
            by_features = {r["features"]: r for r in sass_rows if r["kernel"].startswith(f"kernel<{dtype}, D{d},")}
            plain = by_features[0]
            assert plain["TANH"] == 0 and plain["LDG"] == 0, plain
            window = by_features[sass_report.feature_bits()["kWindow"]]
            general = by_features[max(by_features)]
            assert plain["instructions"] < window["instructions"] < general["instructions"]
            assert plain["HGMMA"] == general["HGMMA"]  # the matmuls are the same code in every kernel


def test_tile_schedule_on_the_cpu(tmp_path):
    """The kernel's schedule and masking decisions (csrc/cuda/sm90/schedule.h), run on the CPU by
    tests/cuda/sm90_schedule_check.cu for random shapes, lengths, windows and BlockMask lists: every
    tile with a visible pair visited once, no tile without one loaded, tiles taken without element
    checks entirely visible, and the element check equal to the brute force elsewhere."""
    nvcc = sass_report.find_tool("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    exe = tmp_path / "sm90_schedule_check"
    build = subprocess.run(
        [nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-O1", f"-I{ROOT}/csrc/cuda",
         f"{ROOT}/tests/cuda/sm90_schedule_check.cu", "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout[-4000:]


def test_register_split_fits_the_register_file():
    producer, consumer, groups, threads = sass_report.design_registers()
    assert (producer, consumer, groups, threads) == (24, 240, 2, 384)
    assert 128 * producer + 128 * groups * consumer <= sass_report.REGISTER_FILE


def test_sass_analysis_catches_departures_from_the_design():
    """The checker fails a kernel whose SASS lacks wgmma or TMA, splits a matmul, reallocates to
    other counts, spills, or carries tanh / global loads it should not."""
    good = {"head_dim": 64, "features": 0, "HGMMA": 24, "batches": [4, 4, 8, 8], "UTMALDG": 3, "TANH": 0, "LDG": 0,
            "EX2_overlapped": 66, "registers_touched": 163, "dealloc": [24], "alloc": [240], "spill": 0,
            "registers": 168, "serialized": False}
    rows = [
        {**good, "kernel": "k", "HGMMA": 0, "batches": []},
        {**good, "kernel": "k2", "UTMALDG": 0, "dealloc": [40], "alloc": [232], "spill": 8},
        {**good, "kernel": "k3", "HGMMA": 28, "batches": [4, 4, 4, 8, 8]},
        {**good, "kernel": "k4", "TANH": 128, "LDG": 2, "serialized": True},
        {**good, "kernel": "k5", "EX2_overlapped": 0, "registers_touched": 250},
        {**good, "kernel": "ok"},
    ]
    problems = "\n".join(sass_report.failures(rows))
    assert "k: no HGMMA" in problems and "k2: no UTMALDG" in problems
    assert "k2: setmaxnreg [40] / [232]" in problems and "k2: ptxas spills 8" in problems
    assert "k3: HGMMA 28" in problems
    assert "k4: 128 MUFU.TANH" in problems and "k4: 2 LDG" in problems and "k4: ptxas serialized" in problems
    assert "k5: 0 of 66 EX2 overlap" in problems and "k5: touches 250 registers" in problems
    assert not any(line.startswith("ok:") for line in problems.splitlines())


# ---------------------------------------------------------------- dispatch rule (no GPU) ----


def _inputs_for(**kwargs):
    q, k, v = make_qkv(1, 2, 1, 17, 33, 64, dtype=torch.float16, requires_grad=False)
    return _inputs.normalize(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        pytest.param({"attn_mask": torch.ones(17, 33, dtype=torch.bool)}, "element mask", id="attn_mask"),
        pytest.param({"dropout_p": 0.1}, "dropout", id="dropout"),
        pytest.param(
            {"block_mask": fastattn.BlockMask.from_layout(torch.ones(1, 1, dtype=torch.bool), 64, seq_lens=(17, 33))},
            "not a multiple of 128",
            id="block_mask-64",
        ),
        pytest.param(
            # with lengths, a causal BlockMask's element mask is dense (the offset is per batch)
            {"block_mask": fastattn.masks.causal(17, 33), "key_lengths": torch.tensor([30], dtype=torch.int32)},
            "element mask",
            id="block_mask-element-mask",
        ),
    ],
)
def test_hopper_reasons_name_what_it_lacks(kwargs, reason):
    assert any(reason in r for r in cuda_backend.hopper_reasons(_inputs_for(**kwargs)))


@pytest.mark.parametrize(
    "kwargs, path",
    [
        pytest.param({}, "sm90", id="plain"),
        pytest.param({"causal": True, "key_lengths": torch.tensor([30], dtype=torch.int32)}, "sm90", id="causal-lengths"),
        pytest.param({"attn_mask": torch.ones(17, 33, dtype=torch.bool)}, "sm80", id="bool-mask"),
        pytest.param({"attn_mask": torch.zeros(17, 33)}, "sm80", id="additive-mask"),
        pytest.param({"dropout_p": 0.1}, "sm80", id="dropout"),
        pytest.param({"block_mask": fastattn.masks.causal(17, 33), "key_lengths": torch.tensor([30], dtype=torch.int32)},
                     "sm80", id="block_mask-element-mask"),
    ],
)
def test_forward_path_sends_element_masks_and_dropout_to_sm80(monkeypatch, kwargs, path):
    """The routing decision itself, without a GPU: in a build with the Hopper kernel (simulated), a
    call with an element mask or dropout takes the sm80 forward, a plain one the Hopper kernel."""
    monkeypatch.setattr(cuda_backend, "HOPPER_BUILT", True)
    assert cuda_backend.forward_path(_inputs_for(**kwargs)) == path


# Calls the Hopper kernel serves (its compile-time features), as keyword arguments of attention().
SERVED = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (8, 3)},
    "window-left-only": {"window": (20, -1)},
    "alibi": {"alibi_slopes": torch.tensor([0.5, 0.25])},
    "softcap": {"softcap": 5.0},
    "lengths": {"key_lengths": torch.tensor([20], dtype=torch.int32), "query_lengths": torch.tensor([9], dtype=torch.int32)},
    "block_mask-128": {"block_mask": fastattn.BlockMask.from_layout(torch.ones(1, 1, dtype=torch.bool), 128, seq_lens=(17, 33))},
    "causal-block_mask": {"block_mask": fastattn.masks.causal(17, 33, block_size=128)},
    "all": {"window": (8, 3), "alibi_slopes": torch.tensor([0.5, 0.25]), "softcap": 5.0,
            "key_lengths": torch.tensor([20], dtype=torch.int32)},
}


@pytest.mark.parametrize("name", list(SERVED))
def test_hopper_reasons_accept_its_features_apart_from_the_machine(name):
    """Without a GPU only machine reasons remain for the calls the kernel covers."""
    machine = ("built without the Hopper kernel", "not sm_90")
    reasons = cuda_backend.hopper_reasons(_inputs_for(**SERVED[name]))
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


def _lengths(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, L + 1, (B,), generator=g, dtype=torch.int32).clamp_(min=1).to("cuda")


def _layout_mask(B, Hq, Lq, Lk, block=(128, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(B, Hq, -(-Lq // block[0]), -(-Lk // block[1]), generator=g) > 0.4
    return fastattn.BlockMask.from_layout(layout.to("cuda"), block, seq_lens=(Lq, Lk))


# Every compile-time feature of the kernel alone, and combined (keyword arguments of attention()
# as a function of the shape). Windows: both edges, the left only (sliding window), a right edge
# ahead of the diagonal, and the diagonal alone (with Lq > Lk, rows whose band is empty).
FEATURES = {
    "window": lambda B, Hq, Lq, Lk: {"window": (40, 3)},
    "window-left": lambda B, Hq, Lq, Lk: {"window": (70, -1)},
    "window-right-only": lambda B, Hq, Lq, Lk: {"window": (-1, 130)},
    "window-diagonal": lambda B, Hq, Lq, Lk: {"window": (0, 0)},
    "alibi": lambda B, Hq, Lq, Lk: {"alibi_slopes": torch.rand(B, Hq, device="cuda")},
    "softcap": lambda B, Hq, Lq, Lk: {"softcap": 20.0},
    "lengths": lambda B, Hq, Lq, Lk: {"key_lengths": _lengths(B, Lk, 1), "query_lengths": _lengths(B, Lq, 2)},
    "causal-lengths": lambda B, Hq, Lq, Lk: {"causal": True, "key_lengths": _lengths(B, Lk, 3)},
    "block_mask": lambda B, Hq, Lq, Lk: {"block_mask": _layout_mask(B, Hq, Lq, Lk)},
    "block_mask-256x128": lambda B, Hq, Lq, Lk: {"block_mask": _layout_mask(B, Hq, Lq, Lk, block=(256, 128))},
    "causal-block_mask": lambda B, Hq, Lq, Lk: {"block_mask": fastattn.masks.causal(Lq, Lk, device="cuda")},
    "sliding-block_mask": lambda B, Hq, Lq, Lk: {"block_mask": fastattn.masks.sliding_window(Lq, Lk, 100, device="cuda")},
    "softcap-alibi-window-lengths": lambda B, Hq, Lq, Lk: {
        "window": (90, 10), "softcap": 15.0, "alibi_slopes": torch.rand(B, Hq, device="cuda"),
        "key_lengths": _lengths(B, Lk, 4), "query_lengths": _lengths(B, Lq, 5),
    },
    "block_mask-alibi-softcap": lambda B, Hq, Lq, Lk: {
        "block_mask": _layout_mask(B, Hq, Lq, Lk, seed=6), "alibi_slopes": torch.rand(B, Hq, device="cuda"),
        "softcap": 30.0, "causal": True,
    },
}
FEATURE_SHAPES = [
    pytest.param(2, 4, 2, 257, 97, id="B2-Hq4-Hkv2-Lq257-Lk97"),
    pytest.param(2, 2, 1, 97, 300, id="B2-Hq2-Hkv1-Lq97-Lk300"),
    pytest.param(1, 2, 2, 600, 600, id="B1-H2-L600"),
]


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk", FEATURE_SHAPES)
def test_features_against_reference(B, Hq, Hkv, Lq, Lk, D, dtype, feature):
    _check(*make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device="cuda"), **FEATURES[feature](B, Hq, Lq, Lk))


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"attn_mask": torch.ones(150, 150, dtype=torch.bool).tril()}, id="attn_mask"),
        pytest.param({"block_mask": "64"}, id="block_mask-64"),
    ],
)
def test_uncovered_calls_fall_back_to_sm80(kwargs):
    """The op hands calls the Hopper kernel lacks to the sm80 kernels, with the same results."""
    q, k, v = make_qkv(1, 2, 1, 150, 150, 64, dtype=torch.float16, device="cuda")
    if kwargs.get("block_mask") == "64":
        kwargs = {"block_mask": _layout_mask(1, 2, 150, 150, block=(64, 64))}
    kwargs = {key: val.to("cuda") if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()}
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
