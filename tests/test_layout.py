"""``fastattn.attention(..., layout="blhd")``: (B, L, H, D) tensors in and out, values and gradients."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from tests.tolerance import assert_close_to_reference, high_precision


def _backends():
    names = ["reference"]
    if not fastattn.get_backend("cpu").unavailable_reasons():
        names.append("cpu")
    return names


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, kwargs", [
    (1, 2, 2, 1, 1, 8, {}),
    (2, 4, 2, 17, 97, 16, dict(causal=True)),  # GQA, Lq != Lk
    (1, 3, 1, 97, 17, 32, dict(window=(5, 2))),  # MQA
    (2, 2, 2, 33, 33, 64, dict(key_lengths=torch.tensor([33, 20]), query_lengths=torch.tensor([33, 20]))),
])
def test_blhd_matches_the_reference_in_values_and_gradients(backend, B, Hq, Hkv, Lq, Lk, D, kwargs):
    q = torch.randn(B, Lq, Hq, D, requires_grad=True)  # (B, L, H, D): flash-attn's layout
    k = torch.randn(B, Lk, Hkv, D, requires_grad=True)
    v = torch.randn(B, Lk, Hkv, D, requires_grad=True)
    out, lse = fastattn.attention(q, k, v, layout="blhd", backend=backend, return_lse=True, **kwargs)
    assert out.shape == (B, Lq, Hq, D) and lse.shape == (B, Hq, Lq)

    hp = [t.detach().to(high_precision(t.dtype)).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    lp = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    ref32, ref_lp = reference.attention(*hp, **kwargs), reference.attention(*lp, **kwargs)
    assert_close_to_reference("out", out.transpose(1, 2), ref32, ref_lp)

    dout = torch.randn_like(out)  # (B, Lq, Hq, D)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref32, hp, dout.transpose(1, 2).to(ref32.dtype))
    lp_grads = torch.autograd.grad(ref_lp, lp, dout.transpose(1, 2))
    for name, g, r, lpg in zip("qkv", grads, ref_grads, lp_grads):
        assert g.shape == (q, k, v)["qkv".index(name)].shape
        assert_close_to_reference(f"d{name}", g.transpose(1, 2), r, lpg)


def test_blhd_is_bhld_transposed():
    q, k, v = (torch.randn(2, 9, 4, 8) for _ in range(3))
    a = fastattn.attention(q, k, v, layout="blhd", backend="reference", causal=True)
    b = fastattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="reference", causal=True)
    torch.testing.assert_close(a, b.transpose(1, 2), rtol=0, atol=0)
    # The default layout is (B, H, L, D): the same tensors mean something else there.
    assert fastattn.attention(q, k, v, backend="reference").shape == (2, 9, 4, 8)
    assert not torch.allclose(fastattn.attention(q, k, v, backend="reference", causal=True), a)


@pytest.mark.parametrize("layout", ["BLHD", "bshd", None, ""])
def test_bad_layout_is_named(layout):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="layout must be 'bhld' .* or 'blhd'"):
        fastattn.attention(q, q, q, layout=layout)


def test_blhd_needs_4d_tensors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="k must be a 4-D \\(B, L, H, D\\) tensor with layout='blhd', got \\(2, 4, 8\\)"):
        fastattn.attention(q, q[0], q, layout="blhd")
