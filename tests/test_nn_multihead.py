"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention: state_dict both ways,
outputs, attention weights and input gradients (float64, eval mode, so the comparison is tight)."""

import pytest
import torch

from fastattn.nn import MultiHeadAttention, MultiheadAttention

DT = torch.float64


def make_pair(E, H, **kwargs):
    theirs = torch.nn.MultiheadAttention(E, H, dtype=DT, **kwargs).eval()
    ours = MultiheadAttention(E, H, dtype=DT, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def run_both(theirs, ours, query, key, value, **kwargs):
    """Forward both modules on leaf copies of the inputs; compare outputs, weights and input gradients."""
    leaves = []
    outs = []
    for module in (theirs, ours):
        q, k, v = (t.detach().clone().requires_grad_() for t in (query, key, value))
        out, weights = module(q, k, v, **kwargs)
        leaves.append((q, k, v))
        outs.append((out, weights))
    (out_t, w_t), (out_o, w_o) = outs
    torch.testing.assert_close(out_o, out_t)
    if w_t is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_t)
    dout = torch.randn_like(out_t)
    grads_t = torch.autograd.grad(out_t, leaves[0], dout, allow_unused=True)
    grads_o = torch.autograd.grad(out_o, leaves[1], dout, allow_unused=True)
    for name, g_t, g_o in zip("qkv", grads_t, grads_o):
        torch.testing.assert_close(g_o, g_t, msg=lambda m, name=name: f"d{name}: {m}")
    return out_o, w_o


CASES = [
    pytest.param(dict(batch_first=False), 24, 3, 2, 7, 7, id="seqfirst-E24-H3-N2-L7-S7"),
    pytest.param(dict(batch_first=True), 24, 3, 3, 5, 11, id="batchfirst-E24-H3-N3-L5-S11"),
    pytest.param(dict(batch_first=True, kdim=10, vdim=14), 20, 5, 2, 9, 6, id="kdim10-vdim14-E20-H5-L9-S6"),
    pytest.param(dict(add_bias_kv=True), 16, 4, 2, 6, 9, id="bias_kv-E16-H4-L6-S9"),
    pytest.param(dict(add_zero_attn=True), 16, 2, 2, 6, 9, id="zero_attn-E16-H2-L6-S9"),
    pytest.param(dict(add_bias_kv=True, add_zero_attn=True, bias=False), 18, 3, 1, 4, 4, id="bias_kv-zero_attn-nobias-E18"),
]


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("kwargs, E, H, N, L, S", CASES)
def test_matches_torch(kwargs, E, H, N, L, S, need_weights):
    theirs, ours = make_pair(E, H, **kwargs)
    bf = kwargs.get("batch_first", False)
    shape = lambda n, length, dim: (n, length, dim) if bf else (length, n, dim)
    query = torch.randn(*shape(N, L, E), dtype=DT)
    key = torch.randn(*shape(N, S, kwargs.get("kdim") or E), dtype=DT)
    value = torch.randn(*shape(N, S, kwargs.get("vdim") or E), dtype=DT)
    run_both(theirs, ours, query, key, value, need_weights=need_weights)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per-head"])
@pytest.mark.parametrize(
    "mask_kind", ["bool-2d", "float-2d", "bool-3d", "float-3d", "causal-hint"], ids=lambda s: s
)
@pytest.mark.parametrize("padding", ["none", "right-bool", "scattered-bool", "float"], ids=lambda s: "kpm-" + s)
def test_masks_match_torch(mask_kind, padding, average):
    E, H, N, L, S = 20, 4, 3, 7, 7
    theirs, ours = make_pair(E, H, batch_first=True)
    x = torch.randn(N, L, E, dtype=DT)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)  # True = not allowed
    if mask_kind == "bool-2d":
        attn_mask = torch.rand(L, S) < 0.3
        attn_mask[:, 0] = False  # every query keeps one key: torch gives NaN on empty rows
    elif mask_kind == "float-2d":
        attn_mask = torch.randn(L, S, dtype=DT)
    elif mask_kind == "bool-3d":
        attn_mask = torch.rand(N * H, L, S) < 0.3
        attn_mask[..., 0] = False
    elif mask_kind == "float-3d":
        attn_mask = torch.randn(N * H, L, S, dtype=DT)
    else:
        attn_mask = torch.zeros(L, S, dtype=DT).masked_fill(causal, float("-inf"))
    kpm = None
    if padding == "right-bool":
        kpm = torch.arange(S)[None, :] >= torch.tensor([S, 4, 2])[:, None]
    elif padding == "scattered-bool":
        kpm = torch.rand(N, S) < 0.4
        kpm[:, 0] = False
    elif padding == "float":
        kpm = torch.randn(N, S, dtype=DT)
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=kpm, average_attn_weights=average,
                  is_causal=mask_kind == "causal-hint")
    for need_weights in (False, True):
        run_both(theirs, ours, x, x, x, need_weights=need_weights, **kwargs)


def test_self_attention_gradients_through_shared_input():
    """query is key is value (the fused in-projection path): gradients w.r.t. the one input and the weights."""
    theirs, ours = make_pair(12, 3, batch_first=True)
    x = torch.randn(2, 5, 12, dtype=DT)
    grads = []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_()
        out, _ = module(xi, xi, xi, need_weights=False)
        out.pow(2).sum().backward()
        grads.append((xi.grad, module.in_proj_weight.grad, module.out_proj.weight.grad))
    for g_t, g_o in zip(*grads):
        torch.testing.assert_close(g_o, g_t)


def test_unbatched_input():
    theirs, ours = make_pair(8, 2)
    q, k = torch.randn(3, 8, dtype=DT), torch.randn(5, 8, dtype=DT)
    kpm = torch.tensor([False, False, False, True, True])
    out, weights = run_both(theirs, ours, q, k, k, key_padding_mask=kpm, average_attn_weights=False)
    assert out.shape == (3, 8) and weights.shape == (2, 3, 5)


def test_state_dict_round_trip_and_alias():
    assert MultiHeadAttention is MultiheadAttention
    for kwargs in (dict(), dict(kdim=6, vdim=5, add_bias_kv=True), dict(bias=False)):
        ours = MultiheadAttention(10, 2, **kwargs)
        theirs = torch.nn.MultiheadAttention(10, 2, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())  # ours -> torch
        for name, tensor in ours.state_dict().items():
            assert torch.equal(theirs.state_dict()[name], tensor), name


def test_dropout_trains_and_eval_is_deterministic():
    ours = MultiheadAttention(16, 4, dropout=0.5, batch_first=True)
    x = torch.randn(2, 9, 16)
    ours.train()
    a, _ = ours(x, x, x, need_weights=False)
    b, _ = ours(x, x, x, need_weights=False)
    assert not torch.allclose(a, b)
    ours.eval()
    c, _ = ours(x, x, x, need_weights=False)
    d, _ = ours(x, x, x, need_weights=False)
    torch.testing.assert_close(c, d)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiheadAttention(10, 3)
    m = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="embed_dim"):
        m(torch.randn(2, 5, 6), x, x)
