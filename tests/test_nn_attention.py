"""fastattn.nn.Attention: GQA + rotary/ALiBi against a plain PyTorch computation, and the KV cache
(prefill + one-token steps give the full-sequence output)."""

import copy
import math

import pytest
import torch

import fastattn
from fastattn.nn import Attention, KVCache, alibi_slopes
from fastattn.nn.positional import apply_rotary_reference

from .tolerance import assert_close_to_reference

DT = torch.float64


def plain_attention(module, x, *, causal, bias=None):
    """The module's computation spelled out with torch ops: projections, rotary, repeat kv, softmax."""
    H, Hkv, D = module.num_heads, module.num_kv_heads, module.head_dim
    q, k, v = module.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))
    if module.rotary is not None:
        cos, sin = module.rotary.tables(x.shape[1], x.device)
        zeros = torch.zeros(x.shape[0], dtype=torch.long)
        q = apply_rotary_reference(q, cos, sin, zeros, module.rotary.interleaved)
        k = apply_rotary_reference(k, cos, sin, zeros, module.rotary.interleaved)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if bias is not None:
        s = s + bias
    if causal:
        L = x.shape[1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, dim=-1) @ v
    return module.out_proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize(
    "E, H, Hkv, L, position, causal",
    [
        pytest.param(24, 4, 2, 13, "rotary", True, id="E24-H4-Hkv2-L13-rotary-causal"),
        pytest.param(36, 6, 1, 9, "rotary", False, id="E36-H6-Hkv1-L9-rotary-MQA"),
        pytest.param(24, 6, 3, 11, "alibi", True, id="E24-H6-Hkv3-L11-alibi-causal"),
        pytest.param(16, 2, 2, 7, None, False, id="E16-H2-L7-plain"),
    ],
)
def test_matches_plain_pytorch(E, H, Hkv, L, position, causal):
    module = Attention(E, H, Hkv, causal=causal, position=position, bias=True).to(DT)
    x = torch.randn(2, L, E, dtype=DT, requires_grad=True)
    bias = None
    if position == "alibi":
        i = torch.arange(L)
        bias = -alibi_slopes(H).to(DT)[:, None, None] * (i[:, None] - i[None, :]).abs()
    got = module(x)
    want = plain_attention(module, x, causal=causal, bias=bias)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, dout)[0], torch.autograd.grad(want, x, dout)[0])


@pytest.mark.parametrize(
    "H, Hkv, position, window",
    [
        pytest.param(4, 2, "rotary", None, id="H4-Hkv2-rotary"),
        pytest.param(6, 3, "alibi", None, id="H6-Hkv3-alibi"),
        pytest.param(4, 4, "rotary", (5, 0), id="H4-rotary-window5"),
    ],
)
def test_kv_cache_decoding_matches_full_sequence(H, Hkv, position, window):
    torch.manual_seed(1)
    module = Attention(24, H, Hkv, causal=True, window=window, position=position).to(DT).eval()
    x = torch.randn(3, 12, 24, dtype=DT)
    full = module(x)
    cache = KVCache()
    chunks = [module(x[:, :7], cache=cache)]  # prefill
    for t in range(7, 12):  # one token at a time
        chunks.append(module(x[:, t : t + 1], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(chunks, dim=1), full)


def test_unfused_cross_attention_and_masks():
    module = Attention(16, 4, 2, fused_qkv=False, kdim=10).to(DT)
    x, context = torch.randn(2, 5, 16, dtype=DT), torch.randn(2, 8, 10, dtype=DT)
    lengths = torch.tensor([8, 3])
    out = module(x, context, key_lengths=lengths)
    # Right padding given as key_lengths is the same as a bool mask hiding the padded keys.
    mask = (torch.arange(8)[None] < lengths[:, None])[:, None, None, :]
    torch.testing.assert_close(module(x, context, attn_mask=mask), out)
    # And the same as dropping the padded keys of sequence 1 altogether.
    torch.testing.assert_close(module(x[1:], context[1:, :3]), out[1:])


def test_block_mask_and_softcap_reach_the_kernel():
    module = Attention(16, 2, position="rotary").to(DT)
    x = torch.randn(1, 9, 16, dtype=DT)
    dense = torch.rand(9, 9) < 0.5
    dense |= torch.eye(9, dtype=torch.bool)
    block_mask = fastattn.BlockMask.from_dense(dense, block_size=4)
    torch.testing.assert_close(module(x, block_mask=block_mask), module(x, attn_mask=dense))
    plain, capped = Attention(16, 2).to(DT), Attention(16, 2, softcap=0.5).to(DT)
    capped.load_state_dict(plain.state_dict())
    q, k, v = plain.qkv_proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
    want = plain.out_proj(fastattn.reference.attention(q, k, v, softcap=0.5).transpose(1, 2).flatten(2))
    torch.testing.assert_close(capped(x), want)
    assert not torch.allclose(capped(x), plain(x))


def test_bad_configuration():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(24, 4, 3)
    with pytest.raises(ValueError, match="position"):
        Attention(24, 4, position="learned")
    with pytest.raises(ValueError, match="fused_qkv"):
        Attention(24, 4)(torch.randn(1, 3, 24), torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="embed_dim"):
        Attention(24, 4)(torch.randn(1, 3, 20))


# ------------------------------------------------------------------------------------------- sinks
def _reference_forward(module, x):
    """The module's forward with attention on the reference backend: ``fastattn.attention(..., sinks=...)``."""
    q, k, v = module._project(x, None)
    if module.rotary is not None:
        q, k = module.rotary(q, k, 0)
    out = fastattn.attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=module.causal, window=module.window,
        alibi_slopes=None if module.alibi_slopes is None else module.alibi_slopes.float(), softcap=module.softcap,
        sinks=module.sinks, backend="reference",
    )
    return module.out_proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize(
    "H, Hkv, position, window, softcap",
    [
        pytest.param(4, 2, "rotary", None, 0.0, id="H4-Hkv2-rotary"),
        pytest.param(6, 3, "alibi", (4, 0), 0.0, id="H6-Hkv3-alibi-window"),
        pytest.param(4, 1, None, None, 2.0, id="H4-MQA-softcap"),
    ],
)
def test_sinks_values_and_gradients_against_the_reference(H, Hkv, position, window, softcap):
    """A float32 module with learned sinks (the default backend, the cpu kernels here) against the
    reference backend in float64 and float32, by the tolerance rule: output and the gradients of the
    input, the sinks and the projection weights."""
    torch.manual_seed(2)
    module = Attention(24, H, Hkv, causal=True, position=position, window=window, softcap=softcap, sinks=True)
    assert module.sinks.shape == (H,) and module.sinks.dtype == torch.float32 and "sinks" in module.state_dict()
    with torch.no_grad():
        module.sinks.copy_(torch.randn(H) * 2)  # some sinks dominate their rows, some barely count
    x = torch.randn(2, 11, 24)

    def run(mod, forward):
        xi = x.detach().to(mod.sinks.dtype, copy=True).requires_grad_()
        out = forward(mod, xi)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        return out, xi.grad, mod.sinks.grad, mod.qkv_proj.weight.grad

    runs = {
        "got": run(module, Attention.__call__),
        "ref32": run(copy.deepcopy(module).to(DT), _reference_forward),
        "ref_lp": run(copy.deepcopy(module), _reference_forward),
    }
    for i, label in enumerate(("out", "dx", "dsinks", "dqkv_weight")):
        assert_close_to_reference(label, runs["got"][i], runs["ref32"][i], runs["ref_lp"][i])
    assert runs["got"][2].abs().min() > 0  # every head's sink gets a gradient


def test_sinks_change_the_output_and_zero_sinks_are_not_a_no_op():
    torch.manual_seed(0)
    plain, sunk = Attention(16, 2, causal=True).to(DT), Attention(16, 2, causal=True, sinks=True).to(DT)
    sunk.load_state_dict({**plain.state_dict(), "sinks": torch.zeros(2)})
    x = torch.randn(1, 6, 16, dtype=DT)
    # A sink of logit 0 still adds exp(0) to every denominator: the output shrinks.
    assert not torch.allclose(sunk(x), plain(x))
    with torch.no_grad():
        sunk.sinks.fill_(-float("inf"))  # exp(-inf) = 0: the plain softmax again
    torch.testing.assert_close(sunk(x), plain(x))
    assert plain.sinks is None and "sinks" not in plain.state_dict()


@pytest.mark.parametrize("position, window", [("rotary", None), ("alibi", (5, 0))])
def test_sinks_kv_cache_decoding_matches_full_sequence(position, window):
    torch.manual_seed(1)
    module = Attention(24, 4, 2, causal=True, window=window, position=position, sinks=True).to(DT).eval()
    with torch.no_grad():
        module.sinks.copy_(torch.randn(4))
    x = torch.randn(3, 12, 24, dtype=DT)
    full = module(x)
    cache = KVCache()
    chunks = [module(x[:, :7], cache=cache)] + [module(x[:, t:t + 1], cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full)


def test_sinks_bad_configuration():
    with pytest.raises(TypeError, match="sinks must be a bool"):
        Attention(16, 2, sinks=torch.zeros(2))
