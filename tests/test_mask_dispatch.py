"""BlockMask windows fold into the op window; attn_mask-derived BlockMasks are cached and exact."""

import torch

import fastattn
from fastattn import masks, reference
from fastattn._inputs import normalize


def test_window_folds_and_never_materialises():
    bm = masks.sliding_window(45, 37, 7, 2, (16, 8))
    q, k, v = (torch.randn(2, 2, L, 16, dtype=torch.float64, requires_grad=True) for L in (45, 37, 37))
    inputs = normalize(q, k, v, block_mask=bm, window=(3, -1))
    assert (inputs.window_left, inputs.window_right) == (3, 2)
    out = fastattn.attention(q, k, v, block_mask=bm, backend="reference")
    assert "element_mask" not in bm.__dict__
    dense = bm.to_dense()
    torch.testing.assert_close(out, reference.attention(q, k, v, attn_mask=dense))
    # with lengths: dense fallback, still right
    kl = torch.tensor([37, 30])
    ql = torch.tensor([45, 40])
    out = fastattn.attention(q, k, v, block_mask=bm, backend="reference", key_lengths=kl, query_lengths=ql)
    torch.testing.assert_close(out, reference.attention(q, k, v, attn_mask=dense, key_lengths=kl, query_lengths=ql))


def test_derived_block_mask(monkeypatch):
    be = fastattn.get_backend("reference")
    monkeypatch.setattr(type(be), "attn_mask_block_size", (8, 16), raising=False)
    masks.clear_attn_mask_cache()
    mask = torch.randn(1, 1, 41, 29, dtype=torch.float64).masked_fill(torch.rand(41, 29) > 0.5, float("-inf"))
    mask[..., :16, :] = float("-inf")
    q, k, v = (torch.randn(2, 3, L, 16, dtype=torch.float64, requires_grad=True) for L in (41, 29, 29))
    out = fastattn.attention(q, k, v, attn_mask=mask, backend="reference")
    assert len(masks._ATTN_MASK_CACHE) == 1
    out2 = fastattn.attention(q, k, v, attn_mask=mask, backend="reference")
    assert len(masks._ATTN_MASK_CACHE) == 1, "the same mask tensor must hit the cache"
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(out, reference.attention(q, k, v, attn_mask=mask))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    r = torch.autograd.grad(reference.attention(q, k, v, attn_mask=mask).sum(), (q, k, v))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b)
