"""The reference implements every semantic of the public contract, and is differentiable (gradcheck)."""

import math

import pytest
import torch

import fastattn
from fastattn import BlockMask, reference

from .helpers import check_against_reference, make_qkv


def naive(q, k, v, visible, bias=None, scale=None):
    """An independent, loop-free restatement of attention for the semantic tests."""
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def grid(Lq, Lk):
    return torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)


@pytest.mark.parametrize("Lq,Lk", [(5, 5), (3, 7), (7, 3)], ids=["Lq5-Lk5", "Lq3-Lk7", "Lq7-Lk3"])
def test_causal_is_bottom_right(Lq, Lk):
    q, k, v = make_qkv(1, 2, 2, Lq, Lk, 8, dtype=torch.float64, requires_grad=False)
    i, j = grid(Lq, Lk)
    out = reference.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, naive(q, k, v, j <= i + (Lk - Lq)))


@pytest.mark.parametrize("window", [(2, 1), (0, 0), (-1, 2), (3, -1)], ids=["l2-r1", "l0-r0", "lInf-r2", "l3-rInf"])
def test_window(window):
    q, k, v = make_qkv(2, 2, 1, 9, 12, 8, dtype=torch.float64, requires_grad=False)
    i, j = grid(9, 12)
    diag = i + 3
    visible = torch.ones(9, 12, dtype=torch.bool)
    if window[0] >= 0:
        visible &= j >= diag - window[0]
    if window[1] >= 0:
        visible &= j <= diag + window[1]
    torch.testing.assert_close(reference.attention(q, k, v, window=window), naive(q, k, v, visible))


def test_causal_and_window_intersect():
    q, k, v = make_qkv(1, 1, 1, 6, 6, 4, dtype=torch.float64, requires_grad=False)
    a = reference.attention(q, k, v, causal=True, window=(2, 3))
    b = reference.attention(q, k, v, window=(2, 0))
    torch.testing.assert_close(a, b)


def test_sdpa_is_causal_is_top_left_and_matches_torch():
    q, k, v = make_qkv(2, 3, 3, 5, 9, 8, dtype=torch.float64, requires_grad=False)
    ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_masks_gqa_alibi_softcap_against_naive():
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 6, 10, 8
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64, requires_grad=False)
    bool_mask = torch.rand(B, 1, Lq, Lk) > 0.3
    add_mask = torch.randn(Lq, Lk, dtype=torch.float64)
    slopes = torch.rand(Hq, dtype=torch.float32)
    cap = 1.5
    i, j = grid(Lq, Lk)
    s_scale = 1 / math.sqrt(D)
    g = Hq // Hkv
    raw = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * s_scale
    capped = cap * torch.tanh(raw / cap)
    bias = capped - raw - slopes.double().view(1, Hq, 1, 1) * (i + (Lk - Lq) - j).abs() + add_mask
    want = naive(q, k, v, bool_mask.expand(B, Hq, Lq, Lk), bias=bias)
    got = reference.attention(q, k, v, attn_mask=bool_mask, alibi_slopes=slopes, softcap=cap)
    got2 = reference.attention(q, k, v, attn_mask=add_mask.masked_fill(~bool_mask, float("-inf")), alibi_slopes=slopes, softcap=cap)
    # bool and additive masks are combined through the score: check both spellings
    torch.testing.assert_close(got2, want)
    want_bool_only = naive(q, k, v, bool_mask.expand(B, Hq, Lq, Lk), bias=bias - add_mask)
    torch.testing.assert_close(got, want_bool_only)


def test_scale_and_lse():
    q, k, v = make_qkv(1, 2, 2, 4, 6, 8, dtype=torch.float64, requires_grad=False)
    out, lse = reference.attention(q, k, v, scale=0.3, return_lse=True)
    s = q @ k.transpose(-1, -2) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


def test_fully_masked_rows_give_zero_and_no_nan_gradients():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, return_lse=True, backend="reference")
    assert torch.all(out[:, :, 2] == 0)
    assert torch.all(lse[:, :, 2] == float("-inf"))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 2] == 0)


def test_lengths_pad_keys_and_queries():
    q, k, v = make_qkv(2, 2, 2, 6, 8, 8, dtype=torch.float64, requires_grad=False)
    klen, qlen = torch.tensor([8, 5]), torch.tensor([6, 4])
    out = reference.attention(q, k, v, causal=True, key_lengths=klen, query_lengths=qlen)
    for b in range(2):
        lq, lk = int(qlen[b]), int(klen[b])
        want = reference.attention(q[b : b + 1, :, :lq], k[b : b + 1, :, :lk], v[b : b + 1, :, :lk], causal=True)
        torch.testing.assert_close(out[b : b + 1, :, :lq], want)
        assert torch.all(out[b, :, lq:] == 0)


def test_dropout_reproducible_and_unbiased():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, dtype=torch.float64, requires_grad=False)
    torch.manual_seed(3)
    a = fastattn.attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(3)
    b = reference.attention(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, reference.attention(q, k, v, dropout_p=0.3))
    keep = reference.dropout_keep_mask(7, (1, 2, 16, 16), 0.3, q.device)
    assert abs(keep.double().mean().item() - 0.7) < 0.1


def test_block_mask_equals_its_dense_mask():
    q, k, v = make_qkv(1, 2, 2, 37, 45, 8, dtype=torch.float64, requires_grad=False)
    dense = torch.rand(2, 37, 45) > 0.6
    bm = BlockMask.from_dense(dense, block_size=(16, 8))
    torch.testing.assert_close(reference.attention(q, k, v, block_mask=bm), reference.attention(q, k, v, attn_mask=dense))


def _gradcheck(**kwargs):
    q, k, v = make_qkv(1, 4, 2, 5, 7, 4, dtype=torch.float64)
    leaves = [q, k, v]
    mask = kwargs.pop("attn_mask", None)
    if mask is not None and mask.requires_grad:
        leaves.append(mask)

    def f(*xs):
        m = xs[3] if len(xs) == 4 else mask
        return fastattn.attention(*xs[:3], attn_mask=m, backend="reference", **kwargs)

    assert torch.autograd.gradcheck(f, tuple(leaves))


GRADCHECK_CASES = [
    pytest.param({}, id="dense"),
    pytest.param({"causal": True}, id="causal-Lq5-Lk7"),
    pytest.param({"window": (2, 1)}, id="window-l2-r1"),
    pytest.param({"block_mask": BlockMask.from_dense(torch.rand(5, 7) > 0.4, block_size=(2, 3))}, id="block-mask"),
    pytest.param({"attn_mask": torch.rand(1, 4, 5, 7) > 0.3}, id="bool-mask"),
    pytest.param({"attn_mask": torch.randn(5, 7, dtype=torch.float64, requires_grad=True)}, id="float-mask-with-grad"),
    pytest.param({"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}, id="alibi"),
    pytest.param({"softcap": 2.0}, id="softcap"),
    pytest.param({"causal": True, "key_lengths": torch.tensor([6]), "query_lengths": torch.tensor([4])}, id="lengths"),
]


@pytest.mark.parametrize("kwargs", GRADCHECK_CASES)
def test_gradcheck(kwargs):
    _gradcheck(**dict(kwargs))


def test_gradcheck_dropout_given_the_mask():
    q, k, v = make_qkv(1, 2, 1, 5, 6, 4, dtype=torch.float64)
    keep = reference.dropout_keep_mask(11, (1, 2, 5, 6), 0.25, q.device)
    f = lambda q, k, v: reference.attention(q, k, v, dropout_p=0.25, dropout_keep=keep)
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_reference_backend_against_reference_in_low_precision(dtype):
    q, k, v = make_qkv(2, 4, 2, 17, 23, 16, dtype=dtype)
    mask = torch.randn(17, 23, requires_grad=True)
    check_against_reference("reference", q, k, v, causal=True, attn_mask=mask, softcap=3.0, dropout_p=0.2)
