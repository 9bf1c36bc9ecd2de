"""Every bad input raises TypeError/ValueError naming the argument; good input reaches the backends."""

import pytest
import torch

import fastattn
from fastattn import BlockMask

from .helpers import make_qkv


def qkv(B=2, Hq=4, Hkv=2, Lq=5, Lk=7, D=8, dtype=torch.float32):
    return make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, requires_grad=False)


def call(q=None, k=None, v=None, **kwargs):
    q0, k0, v0 = qkv()
    return fastattn.attention(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v, **kwargs)


BAD_INPUTS = [
    pytest.param({"q": [[1.0]]}, TypeError, "q", id="q-not-tensor"),
    pytest.param({"k": torch.randn(2, 2, 7)}, ValueError, "k", id="k-3d"),
    pytest.param({"q": torch.randint(0, 3, (2, 4, 5, 8))}, TypeError, "q", id="q-int-dtype"),
    pytest.param({"k": torch.randn(2, 2, 7, 8, dtype=torch.float64)}, TypeError, "k", id="k-dtype-mismatch"),
    pytest.param({"v": torch.randn(2, 2, 7, 8, dtype=torch.float16)}, TypeError, "v", id="v-dtype-mismatch"),
    pytest.param({"k": torch.randn(3, 2, 7, 8)}, ValueError, "batch", id="k-batch"),
    pytest.param({"k": torch.randn(2, 2, 7, 6)}, ValueError, "head_dim", id="k-head-dim"),
    pytest.param({"v": torch.randn(2, 2, 6, 8)}, ValueError, "v", id="v-seqlen"),
    pytest.param({"k": torch.randn(2, 3, 7, 8), "v": torch.randn(2, 3, 7, 8)}, ValueError, "multiple", id="gqa-not-divisible"),
    pytest.param({"causal": 1}, TypeError, "causal", id="causal-int"),
    pytest.param({"window": 5}, TypeError, "window", id="window-int"),
    pytest.param({"window": (1, 2, 3)}, TypeError, "window", id="window-triple"),
    pytest.param({"window": (-2, 0)}, ValueError, "window left", id="window-left-negative"),
    pytest.param({"window": (0, 1.5)}, TypeError, "window right", id="window-right-float"),
    pytest.param({"scale": float("nan")}, ValueError, "scale", id="scale-nan"),
    pytest.param({"scale": "0.1"}, TypeError, "scale", id="scale-str"),
    pytest.param({"softcap": -1.0}, ValueError, "softcap", id="softcap-negative"),
    pytest.param({"dropout_p": 1.0}, ValueError, "dropout_p", id="dropout-one"),
    pytest.param({"dropout_p": -0.1}, ValueError, "dropout_p", id="dropout-negative"),
    pytest.param({"attn_mask": torch.ones(5, 8, dtype=torch.bool)}, ValueError, "attn_mask", id="mask-shape"),
    pytest.param({"attn_mask": torch.ones(5, 7, dtype=torch.int64)}, TypeError, "attn_mask", id="mask-int-dtype"),
    pytest.param({"attn_mask": torch.ones(1, 1, 1, 5, 7, dtype=torch.bool)}, ValueError, "attn_mask", id="mask-5d"),
    pytest.param({"attn_mask": "mask"}, TypeError, "attn_mask", id="mask-str"),
    pytest.param({"alibi_slopes": torch.ones(4, dtype=torch.float64)}, TypeError, "alibi_slopes", id="alibi-dtype"),
    pytest.param({"alibi_slopes": torch.ones(3)}, ValueError, "alibi_slopes", id="alibi-shape"),
    pytest.param({"block_mask": torch.ones(5, 7, dtype=torch.bool)}, TypeError, "block_mask", id="block-mask-tensor"),
    pytest.param({"block_mask": BlockMask.from_dense(torch.ones(6, 7, dtype=torch.bool), 4)}, ValueError, "block_mask", id="block-mask-seqlens"),
    pytest.param({"block_mask": BlockMask.from_dense(torch.ones(3, 5, 7, dtype=torch.bool), 4)}, ValueError, "block_mask", id="block-mask-heads"),
    pytest.param({"key_lengths": torch.tensor([7, 8])}, ValueError, "key_lengths", id="key-lengths-range"),
    pytest.param({"key_lengths": torch.tensor([7.0, 3.0])}, TypeError, "key_lengths", id="key-lengths-float"),
    pytest.param({"query_lengths": torch.tensor([5])}, ValueError, "query_lengths", id="query-lengths-shape"),
    pytest.param({"return_lse": "yes"}, TypeError, "return_lse", id="return-lse-str"),
    pytest.param({"backend": "nope"}, ValueError, "backend", id="backend-unknown"),
    pytest.param({"backend": 3}, TypeError, "backend", id="backend-int"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_INPUTS)
def test_bad_input_names_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        call(**kwargs)


@pytest.mark.parametrize("name", ["k", "v", "alibi_slopes", "key_lengths"])
def test_device_mismatch_is_named(name):
    q, k, v = qkv()
    args = {"k": k, "v": v, "alibi_slopes": torch.ones(4), "key_lengths": torch.tensor([7, 7])}
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} must be on q's device"):
        fastattn.attention(q, args["k"], args["v"], alibi_slopes=args["alibi_slopes"], key_lengths=args["key_lengths"])


def test_device_mismatch_of_mask_on_meta():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask must be on q's device"):
        fastattn.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta"))


def test_head_dim_a_backend_cannot_take_is_named():
    from fastattn.backends.base import common_reasons

    q, k, v = make_qkv(1, 1, 1, 3, 3, 8, dtype=torch.float64, requires_grad=False)
    inputs = fastattn._inputs.normalize(q, k, v)
    reasons = common_reasons(inputs, devices=("cpu",), dtypes=(torch.float64,), max_head_dim=4, features={})
    assert any("head_dim 8" in r for r in reasons)


def test_sdpa_bad_inputs():
    q, k, v = qkv(Hq=4, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastattn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True, enable_gqa=True)
    with pytest.raises(TypeError, match="is_causal"):
        fastattn.scaled_dot_product_attention(q, k, v, is_causal="yes", enable_gqa=True)
    with pytest.raises(TypeError, match="query"):
        fastattn.scaled_dot_product_attention(None, k, v)


@pytest.mark.parametrize(
    "shape_q,shape_kv",
    [((5, 8), (7, 8)), ((3, 5, 8), (3, 7, 8)), ((2, 3, 5, 8), (2, 3, 7, 8)), ((2, 2, 3, 5, 8), (2, 2, 3, 7, 8))],
    ids=["2d", "3d", "4d", "5d"],
)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_sdpa_matches_torch_for_any_batch_dims(shape_q, shape_kv, is_causal):
    q, k, v = torch.randn(shape_q), torch.randn(shape_kv), torch.randn(shape_kv)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal), want)


def test_sdpa_masks_gqa_scale_value_dim():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 7, 8)
    v = torch.randn(2, 2, 7, 6)
    bool_mask = torch.rand(2, 1, 5, 7) > 0.2
    bool_mask[..., 0] = True  # no fully masked rows: torch gives NaN there, fastattn 0
    float_mask = torch.randn(5, 7)
    for mask in (bool_mask, float_mask):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
        got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
        torch.testing.assert_close(got, want)


def test_sdpa_fully_masked_row_is_zero_not_nan():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.all(out[0, 0, 1] == 0)
    assert torch.isfinite(out).all()


def test_non_unit_last_stride_is_accepted():
    base = torch.randn(2, 4, 8, 5)  # (B, H, D, L) -> a (B, H, L, D) view with last stride 5
    q = base.transpose(-1, -2)
    out = fastattn.attention(q, q, q, backend="reference")
    torch.testing.assert_close(out, fastattn.reference.attention(q.contiguous(), q.contiguous(), q.contiguous()))


def test_transposed_blhd_layout():
    x = torch.randn(2, 9, 4, 8)  # (B, L, H, D)
    q = x.transpose(1, 2)
    out = fastattn.attention(q, q, q, causal=True)
    torch.testing.assert_close(out, fastattn.reference.attention(q.contiguous(), q.contiguous(), q.contiguous(), causal=True))


def test_attention_on_cpu_returns_the_reference_result():
    q, k, v = qkv()
    torch.testing.assert_close(fastattn.attention(q, k, v, causal=True), fastattn.reference.attention(q, k, v, causal=True))
