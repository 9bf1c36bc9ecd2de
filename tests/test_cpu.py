"""The C++ CPU backend (csrc/cpu) against the reference: values and gradients, every feature.

Also: dropout (given the kernels' own counter-based pattern), gradcheck in float64 on the kernel itself, bad input on the raw ops (RuntimeError naming the
argument), opcheck, torch.compile, the automatic choice, and a resident-memory check that the
kernels never allocate an (Lq, Lk) buffer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import BlockMask, _extension, masks
from fastattn.autograd import block_args
from fastattn.ops import BWD_SCHEMA, FWD_SCHEMA

from .helpers import bwd_op_args, check_against_reference, make_qkv, op_args

pytestmark = pytest.mark.skipif(_extension.load()[0] is None, reason="the C++ extension is not built")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# (B, Hq, Hkv, Lq, Lk, D): odd lengths, Lq != Lk both ways, GQA 4:1 and 2:1, every head dim.
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, 16, id="B1-H1-L1-D16"),
    pytest.param(2, 3, 3, 17, 17, 40, id="B2-H3-L17-D40"),
    pytest.param(1, 4, 1, 97, 257, 64, id="B1-Hq4-Hkv1-Lq97-Lk257-D64"),
    pytest.param(2, 4, 2, 257, 97, 96, id="B2-Hq4-Hkv2-Lq257-Lk97-D96"),
    pytest.param(1, 2, 2, 257, 257, 128, id="B1-H2-L257-D128"),
    pytest.param(1, 2, 1, 1, 97, 64, id="B1-Hq2-Hkv1-Lq1-Lk97-D64"),
]


def qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, **kwargs):
    return make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, **kwargs)


# ------------------------------------------------------------------------------------ values and grads
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D", SHAPES)
def test_dense(B, Hq, Hkv, Lq, Lk, D, dtype):
    check_against_reference("cpu", *qkv(B, Hq, Hkv, Lq, Lk, D, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D", SHAPES)
def test_causal(B, Hq, Hkv, Lq, Lk, D, dtype):
    check_against_reference("cpu", *qkv(B, Hq, Hkv, Lq, Lk, D, dtype), causal=True)


WINDOWS = [
    pytest.param((16, 0), id="left16-right0"),
    pytest.param((0, 16), id="left0-right16"),
    pytest.param((5, 3), id="left5-right3"),
    pytest.param((-1, 7), id="unbounded-right7"),
    pytest.param((7, -1), id="left7-unbounded"),
    pytest.param((300, 300), id="left300-right300"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize(
    "B, Hq, Hkv, Lq, Lk, D",
    [
        pytest.param(2, 4, 1, 97, 257, 40, id="B2-Hq4-Hkv1-Lq97-Lk257-D40"),
        pytest.param(1, 2, 2, 257, 97, 64, id="B1-H2-Lq257-Lk97-D64"),
    ],
)
def test_window(B, Hq, Hkv, Lq, Lk, D, window, dtype):
    check_against_reference("cpu", *qkv(B, Hq, Hkv, Lq, Lk, D, dtype), window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq, Lk", [pytest.param(97, 33, id="Lq97-Lk33"), pytest.param(33, 97, id="Lq33-Lk97")])
def test_sdpa_top_left_causal(Lq, Lk, dtype, monkeypatch):
    """SDPA's is_causal is top-left aligned: a negative window_right when Lq < Lk... and Lq > Lk."""
    monkeypatch.setenv("FASTATTN_BACKEND", "cpu")
    q, k, v = qkv(2, 4, 4, Lq, Lk, 40, dtype)
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q2, k2, v2), dout.double())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "mask_shape",
    [pytest.param((97, 257), id="mask-Lq-Lk"), pytest.param((2, 1, 97, 257), id="mask-B-1-Lq-Lk"),
     pytest.param((1, 4, 1, 257), id="mask-1-H-1-Lk")],
)
def test_bool_attn_mask(mask_shape, dtype):
    mask = torch.rand(mask_shape) > 0.3
    check_against_reference("cpu", *qkv(2, 4, 2, 97, 257, 64, dtype), attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [pytest.param(False, id="no-mask-grad"), pytest.param(True, id="mask-grad")])
def test_additive_attn_mask(grad, dtype):
    mask = torch.randn(1, 4, 97, 33, dtype=dtype)
    mask[..., 5] = float("-inf")
    mask.requires_grad_(grad)
    check_against_reference("cpu", *qkv(2, 4, 1, 97, 33, 40, dtype), attn_mask=mask, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "block_size",
    [pytest.param((7, 13), id="block7x13"), pytest.param((16, 16), id="block16"), pytest.param((64, 8), id="block64x8"),
     pytest.param(128, id="block128")],
)
def test_block_mask_from_dense(block_size, dtype):
    Lq, Lk = 97, 257
    dense = torch.rand(2, 1, Lq, Lk) > 0.5
    dense[:, :, :, 100:200] = False  # whole empty tiles
    dense[:, :, 40:60, :] = True  # and whole full ones
    dense[0, 0, 3, :] = False  # a row that sees nothing
    block_mask = BlockMask.from_dense(dense, block_size=block_size)
    check_against_reference("cpu", *qkv(2, 4, 2, Lq, Lk, 64, dtype), block_mask=block_mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "block_mask",
    [
        pytest.param(masks.causal(257, 257, block_size=32), id="causal-L257-block32"),
        pytest.param(masks.sliding_window(257, 257, left=40, block_size=(16, 32)), id="window40-L257-block16x32"),
        pytest.param(BlockMask.from_layout(torch.rand(3, 5) > 0.4, block_size=(90, 60), seq_lens=(257, 257)),
                     id="layout-L257-block90x60"),
    ],
)
def test_block_mask_builders(block_mask, dtype):
    check_against_reference("cpu", *qkv(1, 2, 1, 257, 257, 40, dtype), block_mask=block_mask)


def test_block_mask_with_attn_mask_and_window():
    block_mask = BlockMask.from_dense(torch.rand(97, 97) > 0.2, block_size=(16, 32))
    attn_mask = torch.randn(97, 97)
    check_against_reference("cpu", *qkv(1, 2, 2, 97, 97, 64), block_mask=block_mask, attn_mask=attn_mask, window=(30, 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [pytest.param(False, id="dense"), pytest.param(True, id="causal")])
def test_lengths(causal, dtype):
    key_lengths = torch.tensor([257, 100, 0], dtype=torch.int32)
    query_lengths = torch.tensor([97, 30, 50], dtype=torch.int32)
    check_against_reference(
        "cpu", *qkv(3, 4, 2, 97, 257, 64, dtype), causal=causal, key_lengths=key_lengths, query_lengths=query_lengths
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "slopes_shape", [pytest.param((4,), id="slopes-H"), pytest.param((2, 4), id="slopes-B-H")]
)
def test_alibi(slopes_shape, dtype):
    slopes = torch.rand(slopes_shape) * 0.5
    check_against_reference("cpu", *qkv(2, 4, 2, 97, 257, 64, dtype), alibi_slopes=slopes, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype):
    q, k, v = qkv(2, 4, 1, 257, 97, 96, dtype)
    with torch.no_grad():
        q.mul_(4)  # push scores past the cap so tanh bends
    check_against_reference("cpu", q, k, v, softcap=3.0, window=(50, 10))


def test_everything_at_once():
    block_mask = BlockMask.from_dense(torch.rand(2, 4, 97, 257) > 0.3, block_size=(32, 48))
    check_against_reference(
        "cpu", *qkv(2, 4, 2, 97, 257, 40), block_mask=block_mask, attn_mask=torch.randn(97, 257), causal=True,
        alibi_slopes=torch.rand(4), softcap=5.0, key_lengths=torch.tensor([200, 257], dtype=torch.int32),
        query_lengths=torch.tensor([97, 60], dtype=torch.int32),
    )


def test_float16_and_float64():
    check_against_reference("cpu", *qkv(1, 2, 1, 97, 33, 64, torch.float16), causal=True)
    check_against_reference("cpu", *qkv(1, 2, 1, 33, 97, 40, torch.float64), window=(10, 2))


def test_value_head_dim_differs():
    check_against_reference("cpu", *qkv(1, 4, 2, 97, 65, 40, Dv=24), causal=True)


def test_strided_inputs_without_copy():
    """(B, L, H, D) tensors seen through .transpose(1, 2), and a broadcast (stride 0) dout."""
    q = torch.randn(2, 97, 4, 64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 33, 2, 64).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 33, 2, 64).transpose(1, 2).requires_grad_()
    check_against_reference("cpu", q, k, v, causal=True)
    out = fastattn.attention(q, k, v, backend="cpu")
    out.sum().backward()
    want = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fastattn.reference.attention(*want).sum().backward()
    for got, ref in zip((q, k, v), want):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-4, rtol=1e-4)


def test_rows_that_see_nothing_give_zeros_and_no_nan():
    q, k, v = qkv(1, 2, 2, 17, 33, 16)
    mask = torch.ones(17, 33, dtype=torch.bool)
    mask[4] = False
    # window_right = -20: rows 0..3 see no key at all (i + 16 - 20 < 0); the mask hides row 4 entirely.
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, window=(-1, 0), return_lse=True, backend="cpu")
    inputs = fastattn._inputs.normalize(q, k, v, attn_mask=mask)
    lists, _, _ = block_args(inputs)
    raw_out, raw_lse = torch.ops.fastattn.attention_fwd(
        q, k, v, None, None, None, None, *lists[:4], None, None, 0, 0, 0.25, None, -20, 0.0, 0.0, 0
    )
    assert torch.all(raw_out[:, :, :4] == 0) and torch.all(raw_lse[:, :, :4] == float("-inf"))
    assert torch.all(raw_out[:, :, 4:].abs().sum(-1) > 0) and torch.isfinite(raw_lse[:, :, 4:]).all()
    assert torch.all(out[:, :, 4] == 0) and torch.all(lse[:, :, 4] == float("-inf"))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 4] == 0)


def test_backward_is_deterministic():
    q, k, v = qkv(1, 4, 1, 257, 257, 64)
    dout = torch.randn(1, 4, 257, 64)
    first = torch.autograd.grad(fastattn.attention(q, k, v, causal=True, backend="cpu"), (q, k, v), dout)
    second = torch.autograd.grad(fastattn.attention(q, k, v, causal=True, backend="cpu"), (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_thread_count_is_honoured_and_changes_nothing_material():
    q, k, v = qkv(1, 4, 2, 257, 257, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastattn.attention(q, k, v, causal=True, backend="cpu")
        torch.set_num_threads(2)
        two = fastattn.attention(q, k, v, causal=True, backend="cpu")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="dense"),
        pytest.param({"causal": True, "alibi_slopes": torch.rand(4)}, id="causal-alibi"),
        pytest.param({"block_mask": BlockMask.from_dense(torch.rand(97, 257) > 0.4, block_size=(16, 32)),
                      "softcap": 4.0}, id="block-mask-softcap"),
    ],
)
def test_dropout_given_the_kernel_pattern(kwargs, dtype):
    """The kernels' dropout against the reference given the pattern the backend reports for the seed."""
    check_against_reference("cpu", *qkv(2, 4, 2, 97, 257, 64, dtype), dropout_p=0.3, **kwargs)


def test_dropout_pattern_statistics_and_reproducibility():
    from fastattn.backends.cpu import dropout_keep_mask

    keep = dropout_keep_mask(12345, (2, 3, 97, 257), 0.3, "cpu")
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    # No visible structure: rows and columns keep about as often as the whole.
    assert keep.float().mean(-1).std().item() < 0.06 and keep.float().mean(-2).std().item() < 0.08
    assert not torch.equal(keep, dropout_keep_mask(12346, (2, 3, 97, 257), 0.3, "cpu"))
    q, k, v = qkv(1, 2, 1, 33, 65, 16)
    torch.manual_seed(7)
    first = fastattn.attention(q, k, v, dropout_p=0.5, backend="cpu")
    torch.manual_seed(7)
    again = fastattn.attention(q, k, v, dropout_p=0.5, backend="cpu")
    other = fastattn.attention(q, k, v, dropout_p=0.5, backend="cpu")
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_gradcheck_float64_dropout():
    q, k, v = qkv(1, 2, 1, 7, 9, 5, torch.float64)

    def f(q, k, v):
        torch.manual_seed(3)  # one seed, so every evaluation draws the same pattern
        return fastattn.attention(q, k, v, dropout_p=0.3, causal=True, backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------- gradcheck
GRADCHECK_CASES = [
    pytest.param({}, id="dense"),
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"window": (3, 1)}, id="window3-1"),
    pytest.param({"alibi_slopes": torch.tensor([0.3, 0.7]), "causal": True}, id="alibi-causal"),
    pytest.param({"softcap": 1.5}, id="softcap"),
    pytest.param({"attn_mask": torch.rand(7, 9) > 0.3}, id="bool-mask"),
    pytest.param({"block_mask": BlockMask.from_dense(torch.rand(7, 9) > 0.4, block_size=(3, 4))}, id="block-mask"),
    pytest.param({"key_lengths": torch.tensor([6], dtype=torch.int32), "causal": True}, id="lengths-causal"),
]


@pytest.mark.parametrize("kwargs", GRADCHECK_CASES)
def test_gradcheck_float64(kwargs):
    q, k, v = qkv(1, 2, 1, 7, 9, 5, torch.float64)

    def f(q, k, v):
        return fastattn.attention(q, k, v, backend="cpu", **kwargs)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5)


def test_gradcheck_float64_additive_mask_gradient():
    q, k, v = qkv(1, 2, 2, 7, 9, 5, torch.float64)
    mask = torch.randn(1, 2, 7, 9, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, mask):
        return fastattn.attention(q, k, v, attn_mask=mask, backend="cpu", window=(4, 2))

    assert torch.autograd.gradcheck(f, (q, k, v, mask), eps=1e-6, atol=1e-5)


# -------------------------------------------------------------------------------- the ops themselves
OPCHECK_CASES = [
    pytest.param({}, id="dense"),
    pytest.param({"causal": True, "alibi_slopes": torch.tensor([0.5, 0.25])}, id="causal-alibi"),
    pytest.param({"window": (2, 1), "softcap": 2.0}, id="window-softcap"),
    pytest.param({"attn_mask": torch.randn(5, 7)}, id="float-mask"),
    pytest.param({"block_mask": BlockMask.from_dense(torch.rand(5, 7) > 0.5, block_size=(2, 4))}, id="block-mask"),
    pytest.param({"dropout_p": 0.25}, id="dropout"),
    pytest.param({"block_mask": masks.document(torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([[0, 0, 0, 1, 1, 1, 1]]),
                                               causal=True, block_size=2)}, id="per-tile-masks"),
]


@pytest.mark.parametrize("kwargs", OPCHECK_CASES)
def test_opcheck(kwargs):
    q, k, v = qkv(1, 2, 1, 5, 7, 8, requires_grad=False)
    fwd, lists = op_args(q, k, v, backend="cpu", **kwargs)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, tuple(fwd))
    out, lse = torch.ops.fastattn.attention_fwd(*fwd)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, tuple(bwd_op_args(fwd, lists, out, lse)))


def test_compile_fullgraph():
    q, k, v = qkv(2, 4, 2, 17, 33, 16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return fastattn.attention(q, k, v, causal=True, softcap=5.0, backend="cpu")

    out = f(q, k, v)
    torch.testing.assert_close(out, fastattn.reference.attention(q, k, v, causal=True, softcap=5.0))
    out.sum().backward()
    want = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fastattn.reference.attention(*want, causal=True, softcap=5.0).sum().backward()
    for got, ref in zip((q, k, v), want):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="dense"), pytest.param({"dropout_p": 0.1}, id="dropout")])
def test_automatic_choice_is_cpu_for_cpu_float32(kwargs, monkeypatch):
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    q, k, v = qkv(1, 2, 2, 17, 17, 16)
    inputs = fastattn._inputs.normalize(q, k, v, causal=True, **kwargs)
    assert fastattn.backends.select_backend(inputs).name == "cpu"


def test_declines_other_devices():
    q, k, v = qkv(1, 2, 2, 17, 17, 16, device="meta")
    reasons = fastattn.get_backend("cpu").not_supported_reasons(fastattn._inputs.normalize(q, k, v))
    assert any("meta" in r for r in reasons)


# --------------------------------------------------------------------------------------- bad inputs
def _valid():
    q, k, v = qkv(2, 4, 2, 9, 11, 8, requires_grad=False)
    block_mask = BlockMask.from_dense(torch.rand(9, 11) > 0.5, block_size=(4, 4))
    fwd, lists = op_args(q, k, v, block_mask=block_mask)
    return lists, fwd


def _arg_names(schema: str) -> list[str]:
    return [a.name for a in torch._C.parse_schema("f" + schema).arguments]


FWD_INDEX = {name: i for i, name in enumerate(_arg_names(FWD_SCHEMA))}
BWD_NAMES = _arg_names(BWD_SCHEMA)

BAD_FWD = [
    pytest.param("q", torch.randn(2, 4, 9), "q must be 4-D", id="q-rank3"),
    pytest.param("k", torch.randn(2, 2, 11, 8, 1), "k must be 4-D", id="k-rank5"),
    pytest.param("v", torch.randn(2, 2, 11, 8, dtype=torch.float64), "v must have q's dtype", id="v-dtype"),
    pytest.param("q", torch.randn(2, 3, 9, 8), "multiple of the number of key/value heads", id="q-heads"),
    pytest.param("k", torch.randn(2, 2, 11, 6), "k must have q's head_dim", id="k-head-dim"),
    pytest.param("v", torch.randn(2, 2, 10, 8), "v must match k", id="v-seqlen"),
    pytest.param("q", torch.randn(2, 4, 8, 9).transpose(-1, -2), "q must have a unit stride", id="q-strided"),
    pytest.param("attn_mask", torch.ones(2, 4, 9, 10, dtype=torch.bool), "attn_mask must be expanded", id="mask-shape"),
    pytest.param("attn_mask", torch.ones(2, 4, 9, 11, dtype=torch.int32), "attn_mask must be bool or", id="mask-dtype"),
    pytest.param("alibi_slopes", torch.ones(4), "alibi_slopes must be expanded to (B, Hq)", id="alibi-rank"),
    pytest.param("alibi_slopes", torch.ones(2, 4, dtype=torch.float64), "alibi_slopes must be float32",
                 id="alibi-dtype"),
    pytest.param("key_lengths", torch.ones(3, dtype=torch.int32), "key_lengths must have shape", id="klen-shape"),
    pytest.param("key_lengths", torch.ones(2, dtype=torch.int64), "key_lengths must be int32", id="klen-dtype"),
    pytest.param("key_lengths", torch.tensor([11, 12], dtype=torch.int32), "key_lengths must lie in [0, 11]",
                 id="klen-too-long"),
    pytest.param("query_lengths", torch.tensor([-1, 3], dtype=torch.int32), "query_lengths must lie in [0, 9]",
                 id="qlen-negative"),
    pytest.param("kv_num_blocks", torch.zeros(2, 4, 2, dtype=torch.int32), "kv_num_blocks must have shape",
                 id="kv-num-rows"),
    pytest.param("kv_num_blocks", torch.full((1, 1, 3), 4, dtype=torch.int32), "kv_num_blocks must lie in [0, 3]",
                 id="kv-num-too-many"),
    pytest.param("kv_indices", torch.full((1, 1, 3, 3), 7, dtype=torch.int32), "kv_indices must hold block indices",
                 id="kv-index-out-of-range"),
    pytest.param("full_kv_indices", torch.full((1, 1, 3, 3), -1, dtype=torch.int32),
                 "full_kv_indices must hold block indices", id="full-kv-index-negative"),
    pytest.param("kv_indices", None, "kv_num_blocks and kv_indices must be given together", id="kv-indices-missing"),
    pytest.param("kv_num_blocks", torch.zeros(3, 1, 3, dtype=torch.int32), "kv_num_blocks must have",
                 id="kv-num-batch"),
    pytest.param("block_size_q", 0, "block_size_q and block_size_k must be > 0", id="block-size-zero"),
    pytest.param("scale", float("nan"), "scale must be finite", id="scale-nan"),
    pytest.param("softcap", -1.0, "softcap must be finite and >= 0", id="softcap-negative"),
    pytest.param("dropout_p", 1.0, "dropout_p must lie in", id="dropout-one"),
]


@pytest.mark.parametrize("name, value, message", BAD_FWD)
def test_bad_forward_input_raises(name, value, message):
    _, fwd = _valid()
    fwd[FWD_INDEX[name]] = value
    if name == "kv_num_blocks":
        fwd[FWD_INDEX["kv_indices"]] = torch.zeros(*value.shape, 3, dtype=torch.int32)
    if name in ("kv_indices", "full_kv_indices") and value is not None:
        fwd[FWD_INDEX[name.replace("indices", "num_blocks")]] = torch.full((1, 1, 3), 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        torch.ops.fastattn.attention_fwd(*fwd)


_MASKS = torch.ones(2, 4, 4, dtype=torch.bool)
_IDS = torch.full((1, 1, 3, 3), -1, dtype=torch.int32)
BAD_PARTIAL = [
    pytest.param({"partial_masks": _MASKS}, "given together", id="ids-missing"),
    pytest.param({"partial_masks": _MASKS.int(), "partial_tile_ids": _IDS}, "partial_masks must be bool", id="masks-int"),
    pytest.param({"partial_masks": torch.ones(2, 4, 5, dtype=torch.bool), "partial_tile_ids": _IDS},
                 "partial_masks must be contiguous with shape", id="masks-shape"),
    pytest.param({"partial_masks": _MASKS, "partial_tile_ids": _IDS.long()}, "partial_tile_ids must be int32",
                 id="ids-int64"),
    pytest.param({"partial_masks": _MASKS, "partial_tile_ids": _IDS[:, :, :2]}, "partial_tile_ids must have shape",
                 id="ids-shape"),
    pytest.param({"partial_masks": _MASKS, "partial_tile_ids": torch.full_like(_IDS, 2)},
                 "partial_tile_ids must lie in", id="ids-out-of-range"),
    pytest.param({"partial_masks": _MASKS, "partial_tile_ids": _IDS,
                  "attn_mask": torch.ones(9, 11, dtype=torch.bool).expand(2, 4, 9, 11)}, "not both", id="with-attn-mask"),
    pytest.param({"partial_masks": _MASKS, "partial_tile_ids": _IDS, "kv_num_blocks": None, "kv_indices": None,
                  "full_kv_num_blocks": None, "full_kv_indices": None}, "needs the block lists", id="no-lists"),
]


@pytest.mark.parametrize("args, message", BAD_PARTIAL)
def test_bad_partial_masks_raise(args, message):
    _, fwd = _valid()
    fwd[FWD_INDEX["attn_mask"]] = None  # the per-tile masks replace the dense element mask
    for name, value in args.items():
        fwd[FWD_INDEX[name]] = value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastattn.attention_fwd(*fwd)


def test_integer_inputs_raise():
    _, fwd = _valid()
    fwd[:3] = [t.to(torch.int32) for t in fwd[:3]]
    with pytest.raises(RuntimeError, match="q must be float32, float64, bfloat16 or float16"):
        torch.ops.fastattn.attention_fwd(*fwd)


BAD_BWD = [
    pytest.param("dout", torch.randn(2, 4, 9, 7), "dout must have shape", id="dout-shape"),
    pytest.param("out", torch.randn(2, 4, 9, 8, dtype=torch.float64), "out must have q's dtype", id="out-dtype"),
    pytest.param("lse", torch.randn(2, 4, 9, dtype=torch.float64), "lse must be float32", id="lse-dtype"),
    pytest.param("lse", torch.randn(2, 4, 8), "lse must have shape", id="lse-shape"),
    pytest.param("q_indices", torch.full((1, 1, 3, 3), 5, dtype=torch.int32), "q_indices must hold block indices",
                 id="q-index-out-of-range"),
    pytest.param("q_num_blocks", None, "q_num_blocks and q_indices must be given together", id="q-num-missing"),
    pytest.param("compute_dbias", True, "compute_dbias needs a floating", id="dbias-without-mask"),
]


@pytest.mark.parametrize("name, value, message", BAD_BWD)
def test_bad_backward_input_raises(name, value, message):
    lists, fwd = _valid()
    bwd = bwd_op_args(fwd, lists, *torch.ops.fastattn.attention_fwd(*fwd))
    bwd[BWD_NAMES.index(name)] = value
    if name == "q_indices":
        bwd[BWD_NAMES.index("q_num_blocks")] = torch.full((1, 1, 3), 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastattn.attention_bwd(*bwd)


def test_backward_needs_transposed_lists():
    lists, fwd = _valid()
    bwd = bwd_op_args(fwd, lists, *torch.ops.fastattn.attention_fwd(*fwd))
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        bwd[BWD_NAMES.index(name)] = None
    with pytest.raises(RuntimeError, match="transposed block lists"):
        torch.ops.fastattn.attention_bwd(*bwd)


# ------------------------------------------------------------------------------------------- memory
_RSS_SCRIPT = r"""
import json, resource, sys, torch, fastattn
L = int(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(2)
q, k, v = (torch.randn(1, 1, L, 64, requires_grad=True) for _ in range(3))
dout = torch.randn(1, 1, L, 64)
fastattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True, backend="cpu").backward(dout[:, :, :64])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fastattn.attention(q, k, v, causal=True, backend="cpu")
out.backward(dout)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_bytes": (after - before) * 1024}))
"""


def test_peak_resident_memory_is_linear_in_length():
    """Peak RSS (ru_maxrss, in a fresh process so nothing else counts) over forward + backward at
    L = 8192: one float32 (L, L) buffer would be 256 MiB; the kernels' own tensors and scratch are
    O(L * D) (out, lse, dq accumulators) plus per-thread tiles, a few MiB. RSS also sees std::vector
    scratch, which torch's allocator profiler does not."""
    L = 8192
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(L)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth_bytes"]
    quadratic = L * L * 4
    assert growth < quadratic / 8, f"peak RSS grew by {growth / 2**20:.1f} MiB at L={L}"
