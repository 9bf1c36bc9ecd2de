"""Attention sinks (``sinks=``): every backend that takes them against the reference, in values,
lse and gradients (q, k, v and the sinks), plus the edge cases: rows that see no key, ``-inf``
sinks, bad arguments, and the backends that must refuse them.

The reference (fastattn/reference.py) puts the sink into the softmax denominator directly; the
kernel backends fold it into their finished ``(out, lse)`` (fastattn.autograd.fold_sinks), so the
comparison checks the fold, its gradient path through the kernels' lse gradient, and the
hand-derived sink gradient ``d sinks[h] = -sum_rows exp(sinks[h] - lse) * (rowsum(dO * O) - dlse)``.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn._inputs import normalize
from fastattn.autograd import fold_sinks
from fastattn.backends import BackendNotSupportedError, get_backend

from .helpers import make_qkv
from .tolerance import ATOL_FLOOR, assert_close_to_reference, high_precision

F32, BF16 = torch.float32, torch.bfloat16


def make_sinks(Hq: int, requires_grad: bool = True) -> torch.Tensor:
    """Sinks around the size of the row log-sum-exps, so the sink takes a real share of each row."""
    return (torch.randn(Hq) + 2.0).requires_grad_(requires_grad)


def _detached(t, dtype=None):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)


def check_sinks(backend: str, q, k, v, sinks, **kwargs):
    """``fastattn.attention(..., sinks=sinks, return_lse=True)`` on ``backend`` against the reference:
    out, lse, and the gradients w.r.t. q, k, v and sinks of ``sum(out * dout) + sum(lse * dlse)``."""
    hp = high_precision(q.dtype)
    dropout_p = kwargs.get("dropout_p", 0.0)
    state = torch.random.get_rng_state()
    out, lse = fastattn.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend, **kwargs)
    ref_kwargs = dict(kwargs)
    if dropout_p > 0:  # give the reference the pattern the backend applied
        torch.random.set_rng_state(state)
        seed = reference.draw_seed()
        inputs = normalize(q, k, v, **kwargs)
        ref_kwargs["dropout_keep"] = get_backend(backend).dropout_keep_mask(inputs, seed)
    leaves = (q, k, v, sinks)
    hp_leaves = [_detached(t, hp) for t in leaves]
    lp_leaves = [_detached(t) for t in leaves]
    hp_kwargs = {name: _detached(t, hp) if name == "attn_mask" else t for name, t in ref_kwargs.items()}
    ref32, lse32 = reference.attention(*hp_leaves[:3], sinks=hp_leaves[3], return_lse=True, **hp_kwargs)
    ref_lp, lse_lp = reference.attention(*lp_leaves[:3], sinks=lp_leaves[3], return_lse=True, **ref_kwargs)
    assert_close_to_reference("out", out, ref32, ref_lp)
    assert_close_to_reference("lse", lse, lse32, lse_lp)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)

    def loss(o, s):
        return (o.to(dout.dtype) * dout).sum() + (s.float() * dlse).sum()

    got = torch.autograd.grad(loss(out, lse), leaves)
    want32 = torch.autograd.grad((ref32 * dout.to(hp)).sum() + (lse32 * dlse.to(hp)).sum(), hp_leaves)
    want_lp = torch.autograd.grad(loss(ref_lp, lse_lp), lp_leaves)
    for name, g, w32, wlp in zip(("dq", "dk", "dv"), got, want32, want_lp):
        assert_close_to_reference(name, g, w32, wlp)
    assert_close_to_reference("dsinks", got[3], want32[3], want_lp[3],
                              atol_floor=ATOL_FLOOR[F32] + _output_rounding_bound(ref32, lse32, hp_leaves[3], dout))
    return out, lse


def _output_rounding_bound(out, lse, sinks, dout) -> float:
    """What rounding ``out`` to its dtype alone can change in ``d sinks``, per head at most.

    ``d sinks[h]`` sums ``exp(sinks[h] - lse) * rowsum(dO * O)`` over every row of the batch, and every
    kernel (flash-attn's included) forms ``rowsum(dO * O)`` from the output it stored. In float32 that
    is negligible; in bfloat16/float16 the rounding of ``O`` (relative ``eps``) adds up over B * Lq rows
    beyond the rule's ``2 *`` the low-precision reference, whose gradient comes from ``P`` instead.
    """
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dout.dtype, 0.0)
    share = torch.exp(sinks.detach().view(1, -1, 1) - lse.detach())  # (B, Hq, Lq)
    worst = (dout.abs().to(out.dtype) * out.detach().abs()).sum(-1)  # (B, Hq, Lq)
    return eps * float((share * worst).sum(dim=(0, 2)).max())


CPU_CASES = [
    pytest.param(2, 2, 2, 1, 1, 16, {}, id="L1"),
    pytest.param(1, 4, 2, 17, 17, 40, {"causal": True}, id="L17-gqa-causal"),
    pytest.param(1, 2, 2, 97, 97, 64, {"window": (16, 8)}, id="L97-window"),
    pytest.param(1, 4, 1, 17, 97, 32, {"causal": True, "softcap": 5.0}, id="Lq17-Lk97-mqa-causal-softcap"),
    pytest.param(2, 2, 2, 97, 17, 16, {"causal": True}, id="Lq97-Lk17-causal-empty-rows"),
    pytest.param(2, 4, 2, 33, 20, 24, {"alibi": True}, id="alibi"),
    pytest.param(2, 2, 1, 17, 33, 16, {"bool_mask": True}, id="bool-mask"),
    pytest.param(2, 2, 2, 17, 33, 16, {"float_mask": True}, id="additive-mask"),
    pytest.param(2, 2, 2, 17, 33, 16, {"lengths": True, "causal": True}, id="lengths-causal"),
    pytest.param(1, 2, 2, 17, 33, 16, {"block_mask": True}, id="block-mask"),
    pytest.param(1, 2, 2, 17, 33, 16, {"dropout_p": 0.3}, id="dropout"),
]


def _kwargs(B, Hq, Lq, Lk, spec: dict, dtype) -> dict:
    """Turn a case's feature spec into attention keyword arguments on random data."""
    kwargs = {key: val for key, val in spec.items() if key in ("causal", "window", "softcap", "dropout_p")}
    if spec.get("alibi"):
        kwargs["alibi_slopes"] = torch.rand(Hq) * 0.5
    if spec.get("bool_mask"):
        mask = torch.rand(B, 1, Lq, Lk) > 0.4
        mask[0, 0, 3] = False  # one row sees nothing: only its sink
        kwargs["attn_mask"] = mask
    if spec.get("float_mask"):
        kwargs["attn_mask"] = torch.randn(B, Hq, Lq, Lk, dtype=dtype)
    if spec.get("lengths"):
        kwargs["key_lengths"] = torch.tensor([Lk, Lk // 3] * (B // 2) + [Lk] * (B % 2), dtype=torch.int32)
        kwargs["query_lengths"] = torch.tensor([Lq // 2, Lq] * (B // 2) + [Lq] * (B % 2), dtype=torch.int32)
    if spec.get("block_mask"):
        doc_q = torch.sort(torch.randint(0, 3, (Lq,))).values
        doc_k = torch.sort(torch.randint(0, 3, (Lk,))).values
        kwargs["block_mask"] = fastattn.masks.document(doc_q, doc_k, block_size=16)
    return kwargs


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, spec", CPU_CASES)
def test_cpu_matches_reference(B, Hq, Hkv, Lq, Lk, D, spec, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype)
    check_sinks("cpu", q, k, v, make_sinks(Hq), **_kwargs(B, Hq, Lq, Lk, spec, dtype))


def test_blhd_layout_and_head_dim_v():
    q, k, v = make_qkv(2, 4, 2, 17, 20, 16, Dv=24)
    sinks = make_sinks(4)
    out = fastattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="blhd", sinks=sinks,
                             causal=True, backend="cpu")
    want = reference.attention(q, k, v, sinks=sinks, causal=True)
    torch.testing.assert_close(out.transpose(1, 2), want, atol=1e-5, rtol=1e-5)


def test_reference_backend_is_the_reference_math_in_float64():
    q, k, v = make_qkv(1, 2, 1, 9, 13, 8, dtype=torch.float64)
    sinks = make_sinks(2).double().detach().requires_grad_()
    out, lse = fastattn.attention(q, k, v, sinks=sinks, causal=True, return_lse=True, backend="reference")
    want, want_lse = reference.attention(q, k, v, sinks=sinks, causal=True, return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse.float())
    dout = torch.randn_like(out)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v, sinks))
    want_grads = torch.autograd.grad((want * dout).sum(), (q, k, v, sinks))
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_gradcheck_reference_float64():
    """The ground truth's own gradients, sinks included, against finite differences (with a row
    that sees no key, a -inf sink and a differentiable lse)."""
    q, k, v = make_qkv(1, 3, 1, 5, 7, 4, dtype=torch.float64)
    sinks = torch.tensor([0.5, -1.0, float("-inf")], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 1, 5, 7, dtype=torch.bool)
    mask[..., 2, :] = False

    def f(q, k, v, s):
        out, lse = reference.attention(q, k, v, sinks=s, attn_mask=mask, softcap=3.0, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_gradcheck_fold_float64():
    """The fold's hand-written backward (fastattn.autograd.FoldSinksFunction) against finite
    differences, with rows of lse = -inf and a -inf sink."""
    out = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.randn(2, 3, 5, dtype=torch.float64)
    lse[0, 1, 2] = float("-inf")
    lse[1, 2] = float("-inf")  # meets the -inf sink of head 2: lse' = -inf there
    lse.requires_grad_()
    sinks = torch.tensor([0.3, -0.5, float("-inf")], dtype=torch.float64, requires_grad=True)

    def f(out, lse, sinks):
        out_new, lse_new = fold_sinks(out, lse, sinks)
        return out_new, torch.where(torch.isfinite(lse_new), lse_new, torch.zeros_like(lse_new))

    assert torch.autograd.gradcheck(f, (out, lse, sinks))


def test_sink_gradient_formula():
    """``d sinks[h] = -sum_rows exp(sinks[h] - lse) * (rowsum(dO * O) - dlse)``, lse including the sink."""
    q, k, v = make_qkv(2, 3, 3, 11, 13, 8, dtype=torch.float64)
    sinks = make_sinks(3).double().detach().requires_grad_()
    out, lse = reference.attention(q, k, v, sinks=sinks, causal=True, return_lse=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    (got,) = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), sinks)
    delta = (dout * out).sum(-1) - dlse  # (B, Hq, Lq)
    want = -(torch.exp(sinks.detach().view(1, -1, 1) - lse.detach()) * delta.detach()).sum(dim=(0, 2))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rows_that_see_no_key(backend):
    """A row that sees nothing returns 0 with lse = its head's sink, and every gradient is finite."""
    q, k, v = make_qkv(2, 2, 2, 6, 5, 8)
    sinks = make_sinks(2)
    mask = torch.ones(2, 2, 6, 5, dtype=torch.bool)
    mask[0, 1, 2] = False
    mask[1, :, 4:] = False
    out, lse = fastattn.attention(q, k, v, sinks=sinks, attn_mask=mask, return_lse=True, backend=backend)
    assert torch.equal(out[0, 1, 2], torch.zeros(8))
    assert torch.equal(out[1, :, 4:], torch.zeros(2, 2, 8))
    torch.testing.assert_close(lse[0, 1, 2], sinks[1].detach())
    torch.testing.assert_close(lse[1, :, 4], sinks.detach())
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, sinks))
    assert all(torch.isfinite(g).all() for g in grads)
    # Those rows' only gradient reaches the sinks, through lse: d lse / d sink = 1 there.
    q2, k2, v2 = (t.detach() for t in (q, k, v))
    _, lse2 = fastattn.attention(q2, k2, v2, sinks=sinks, attn_mask=mask, return_lse=True, backend=backend)
    (dsinks,) = torch.autograd.grad(lse2[1, :, 4].sum(), sinks)
    torch.testing.assert_close(dsinks, torch.ones(2))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_minus_inf_sinks_equal_no_sinks(backend):
    q, k, v = make_qkv(2, 4, 2, 17, 9, 16)
    kwargs = {"causal": True, "return_lse": True, "backend": backend}
    mask = torch.rand(2, 1, 17, 9) > 0.3
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, **kwargs)
    sinks = torch.full((4,), float("-inf"), requires_grad=True)
    out_s, lse_s = fastattn.attention(q, k, v, attn_mask=mask, sinks=sinks, **kwargs)
    torch.testing.assert_close(out_s, out, atol=0, rtol=0)
    torch.testing.assert_close(lse_s, lse, atol=0, rtol=0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    grads_s = torch.autograd.grad((out_s * dout).sum(), (q, k, v, sinks))
    for g, g_s in zip(grads, grads_s):
        torch.testing.assert_close(g_s, g)
    assert torch.equal(grads_s[3], torch.zeros(4))


def test_sinks_shrink_the_output():
    """A larger sink takes a larger share of every row: the output scales by 1 / (1 + exp(sink - lse))."""
    q, k, v = make_qkv(1, 1, 1, 7, 7, 8, requires_grad=False)
    out, lse = fastattn.attention(q, k, v, return_lse=True, backend="cpu")
    sink = torch.tensor([1.5])
    out_s = fastattn.attention(q, k, v, sinks=sink, backend="cpu")
    factor = torch.sigmoid(lse - sink)  # exp(lse) / (exp(lse) + exp(sink))
    torch.testing.assert_close(out_s, out * factor.unsqueeze(-1))


def test_bad_sinks_raise_naming_the_argument():
    q, k, v = make_qkv(1, 4, 2, 5, 5, 8, requires_grad=False)
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(4,\)"):
        fastattn.attention(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="sinks must have shape"):
        fastattn.attention(q, k, v, sinks=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="sinks must be a floating tensor"):
        fastattn.attention(q, k, v, sinks=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="sinks must be a torch.Tensor"):
        fastattn.attention(q, k, v, sinks=[0.0] * 4)
    with pytest.raises(ValueError, match="sinks must be on q's device"):
        fastattn.attention(q, k, v, sinks=torch.zeros(4, device="meta"))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sinks must not hold NaN or \\+inf"):
            fastattn.attention(q, k, v, sinks=torch.tensor([0.0, bad, 0.0, 0.0]))


def test_other_float_dtypes_are_cast():
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, dtype=BF16)
    sinks = make_sinks(2).to(BF16).detach().requires_grad_()
    out = fastattn.attention(q, k, v, sinks=sinks, backend="cpu")
    want = reference.attention(q.float(), k.float(), v.float(), sinks=sinks.float())
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    (g,) = torch.autograd.grad(out.float().sum(), sinks)
    assert g.dtype == BF16 and torch.isfinite(g).all()


def test_cuda_backend_refuses_sinks():
    """The CUDA kernels are not validated with sinks: the automatic choice never picks them for such a
    call, and asking for them names ``sinks``."""
    q, k, v = make_qkv(1, 2, 2, 5, 5, 64, dtype=BF16, requires_grad=False)
    inputs = normalize(q, k, v, sinks=torch.zeros(2))
    assert "sinks is not supported" in get_backend("cuda").not_supported_reasons(inputs)
    assert "sinks is not supported" not in get_backend("cuda").not_supported_reasons(normalize(q, k, v))
    assert not get_backend("cpu").not_supported_reasons(inputs)
    if torch.cuda.is_available():
        gq, gk, gv = (t.cuda() for t in (q, k, v))
        with pytest.raises(BackendNotSupportedError, match="sinks"):
            fastattn.attention(gq, gk, gv, sinks=torch.zeros(2, device="cuda"), backend="cuda")


def test_cpu_refuses_float64_sinks_and_dispatch_goes_to_reference():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, dtype=torch.float64, requires_grad=False)
    sinks = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match="sinks with float64"):
        fastattn.attention(q, k, v, sinks=sinks, backend="cpu")
    out = fastattn.attention(q, k, v, sinks=sinks)
    torch.testing.assert_close(out, reference.attention(q, k, v, sinks=sinks), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- Triton (interpreter on CPU)
TRITON_CASES = [
    pytest.param(2, 2, 2, 1, 1, 16, F32, {}, id="L1-fp32"),
    pytest.param(1, 4, 2, 17, 33, 16, F32, {"causal": True}, id="gqa-Lq17-Lk33-causal-fp32"),
    pytest.param(1, 2, 1, 33, 17, 16, BF16, {"causal": True, "softcap": 5.0}, id="mqa-Lq33-Lk17-causal-softcap-bf16"),
    pytest.param(2, 2, 2, 17, 20, 16, F32, {"bool_mask": True, "alibi": True}, id="mask-alibi-fp32"),
    pytest.param(2, 2, 2, 17, 20, 16, F32, {"lengths": True, "window": (4, 2)}, id="lengths-window-fp32"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, dtype, spec", TRITON_CASES)
def test_triton_matches_reference(B, Hq, Hkv, Lq, Lk, D, dtype, spec, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device=device)
    kwargs = {key: val.to(device) if isinstance(val, torch.Tensor) else val
              for key, val in _kwargs(B, Hq, Lq, Lk, spec, dtype).items()}
    sinks = make_sinks(Hq).detach().to(device).requires_grad_()
    check_sinks("triton", q, k, v, sinks, **kwargs)


# --------------------------------------------------------------------------- Hugging Face gpt-oss (s_aux)
def _gpt_oss(implementation: str, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    from fastattn.integrations import transformers as fastattn_hf

    fastattn_hf.register()
    config = transformers.GptOssConfig(
        vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64, pad_token_id=0,
        experts_implementation="eager",  # a loop over experts, which runs in float64 too
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.layers:  # sinks large enough to take a real share of each row
            layer.self_attn.sinks.copy_(torch.randn(4, dtype=dtype) + 1.0)
    return model.eval()


def test_gpt_oss_logits_match_eager(monkeypatch):
    """gpt-oss passes its sinks as ``s_aux``: fastattn's logits (float32) against the eager attention in
    float64, within twice the eager float32 error; left padding included."""
    ids = torch.randint(3, 101, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    ref64 = logits(_gpt_oss("eager", torch.float64))
    model = _gpt_oss("eager")
    eager = logits(model)
    calls = []
    real = fastattn.attention
    monkeypatch.setattr(fastattn, "attention", lambda *a, **kw: calls.append(kw.get("sinks")) or real(*a, **kw))
    model.set_attn_implementation("fastattn")
    ours = logits(model)
    assert calls and all(s is not None for s in calls), "gpt-oss did not reach fastattn with its sinks"
    keep = mask.bool()  # padded query rows see nothing: fastattn returns 0 there, eager does not
    assert_close_to_reference("logits", ours[keep], ref64[keep], eager[keep])


def test_gpt_oss_greedy_generate_matches_eager():
    """Decoding with the cache (one query row per step, sliding-window layers) picks eager's tokens,
    with eager's per-step logits."""
    ids = torch.randint(3, 101, (2, 7))
    model = _gpt_oss("eager")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.set_attn_implementation("fastattn")
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=1e-4)


def test_gpt_oss_sink_gradient_matches_eager():
    """A training step's gradients of the sinks parameters equal the eager model's."""
    ids = torch.randint(3, 101, (2, 11))
    grads = []
    for implementation in ("eager", "fastattn"):
        model = _gpt_oss(implementation)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.stack([layer.self_attn.sinks.grad for layer in model.model.layers]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().max() > 0


# --------------------------------------------------------------------------- varlen and KV cache
def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_varlen_sinks_match_per_sequence_reference(backend):
    """Packed sequences (lengths 0 and 1, Lq_s != Lk_s, a sequence with queries but no keys) with
    sinks equal the reference on each sequence alone, in out, lse and the sink gradient."""
    lens_q, lens_k = [1, 0, 17, 9, 4], [1, 3, 20, 9, 0]
    Hq, Hkv, D = 4, 2, 16
    q, k, v = (torch.randn(sum(n), h, D) for n, h in ((lens_q, Hq), (lens_k, Hkv), (lens_k, Hkv)))
    sinks = make_sinks(Hq)
    out, lse = fastattn.varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=True,
                                         sinks=sinks, return_lse=True, backend=backend)
    sinks64 = sinks.detach().double().requires_grad_()
    outs, lses = [], []
    sq = sk = 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = (t.double().transpose(0, 1)[None] for t in (q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk]))
        sq, sk = sq + lq, sk + lk
        if lq == 0:
            continue
        if lk == 0:  # the reference of a sequence without keys: zeros, lse = sink
            outs.append(torch.zeros(lq, Hq, D, dtype=torch.float64))
            lses.append(sinks64[:, None].expand(Hq, lq))
            continue
        o, s = reference.attention(qs, ks, vs, causal=True, sinks=sinks64, return_lse=True)
        outs.append(o[0].transpose(0, 1))
        lses.append(s[0])
    want, want_lse = torch.cat(outs), torch.cat(lses, dim=1)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    (got,) = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), sinks)
    (ref,) = torch.autograd.grad((want * dout.double()).sum() + (want_lse * dlse.double()).sum(), sinks64)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_varlen_without_keys_gives_the_sink_as_lse():
    q, k = torch.randn(3, 2, 8), torch.zeros(0, 2, 8)
    sinks = torch.tensor([0.25, -1.0])
    out, lse = fastattn.varlen_attention(q, k, k, _cu([3]), _cu([0]), 3, 0, sinks=sinks, return_lse=True)
    assert torch.equal(out, torch.zeros(3, 2, 8))
    assert torch.equal(lse, sinks[:, None].expand(2, 3))
    with pytest.raises(ValueError, match="sinks must have shape"):
        fastattn.varlen_attention(q, k, k, _cu([3]), _cu([0]), 3, 0, sinks=torch.zeros(3))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_sinks_match_reference(paged):
    """Decoding two tokens against a cache with sinks equals the reference on the valid cache slots."""
    B, Hq, Hkv, D, Lnew = 2, 4, 2, 16, 2
    seqlens = torch.tensor([5, 30], dtype=torch.int32)
    if paged:
        k_cache, v_cache = torch.randn(6, 16, Hkv, D), torch.randn(6, 16, Hkv, D)
        block_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    else:
        k_cache, v_cache = torch.randn(B, 40, Hkv, D), torch.randn(B, 40, Hkv, D)
        block_table = None
    q, k, v = torch.randn(B, Lnew, Hq, D), torch.randn(B, Lnew, Hkv, D), torch.randn(B, Lnew, Hkv, D)
    sinks = make_sinks(Hq)
    out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                               block_table=block_table, causal=True, sinks=sinks, return_lse=True,
                                               backend="cpu")
    for b in range(B):
        n = int(seqlens[b]) + Lnew
        if paged:
            keys = k_cache[block_table[b]].reshape(-1, Hkv, D)[:n]
            values = v_cache[block_table[b]].reshape(-1, Hkv, D)[:n]
        else:
            keys, values = k_cache[b, :n], v_cache[b, :n]
        want, want_lse = reference.attention(q[b:b + 1].transpose(1, 2), keys[None].transpose(1, 2),
                                             values[None].transpose(1, 2), causal=True, sinks=sinks, return_lse=True)
        torch.testing.assert_close(out[b], want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b], want_lse[0], atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("Lq", [1, 3])
def test_triton_split_kv_decode(Lq, monkeypatch):
    """The Triton split-KV (flash-decoding) forward merges sink-free splits; the sink is added once
    after the merge. Splits are forced, as no GPU sets their number in the interpreter."""
    pytest.importorskip("triton")
    from fastattn.backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    from fastattn.triton_kernels import attention_fwd as triton_fwd

    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")
    calls = []
    monkeypatch.setattr(triton_fwd, "choose_num_splits", lambda *args: calls.append(args) or 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = make_qkv(2, 4, 2, Lq, 70, 16, device=device)
    sinks = make_sinks(4).detach().to(device).requires_grad_()
    lengths = torch.tensor([70, 9], dtype=torch.int32, device=device)  # the short one leaves splits empty
    check_sinks("triton", q, k, v, sinks, causal=True, key_lengths=lengths)
    assert calls, "the forward did not take the split-KV path"


def test_compile_fullgraph_with_sinks():
    q, k, v = make_qkv(2, 4, 2, 9, 11, 8)
    sinks = make_sinks(4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, sinks):
        return fastattn.attention(q, k, v, causal=True, sinks=sinks, backend="cpu")

    out = f(q, k, v, sinks)
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=True, sinks=sinks))
    out.sum().backward()
    assert sinks.grad is not None and torch.isfinite(sinks.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nan_reaches_only_the_rows_that_see_it(backend):
    """A NaN key makes the rows that see it NaN (sink or not) and no other row."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, requires_grad=False)
    k[0, :, 3] = float("nan")  # seen by causal rows 3..5 only
    out, lse = fastattn.attention(q, k, v, causal=True, sinks=make_sinks(2, False), return_lse=True, backend=backend)
    assert torch.isnan(out[0, :, 3:]).all() and torch.isnan(lse[0, :, 3:]).all()
    assert torch.isfinite(out[0, :, :3]).all() and torch.isfinite(lse[0, :, :3]).all()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, Hq, Hkv, Lq, Lk, D, kwargs",
    [
        pytest.param(2, 8, 2, 1000, 1000, 128, {"causal": True}, id="prefill-L1000-D128-causal"),
        pytest.param(4, 32, 8, 1, 4096, 64, {"lengths": True}, id="decode-Lk4096-split-kv"),
    ],
)
def test_gpu_triton_realistic(B, Hq, Hkv, Lq, Lk, D, kwargs):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=BF16, device="cuda")
    sinks = make_sinks(Hq).detach().cuda().requires_grad_()
    kwargs = dict(kwargs)
    if kwargs.pop("lengths", False):
        kwargs["key_lengths"] = torch.tensor([Lk, 1000, 17, 3000], dtype=torch.int32, device="cuda")
    check_sinks("triton", q, k, v, sinks, **kwargs)
    torch.cuda.empty_cache()
