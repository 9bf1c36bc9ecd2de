"""fastattn.varlen_attention against a per-sequence loop over the reference, values and gradients."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.block_mask import EMPTY
from fastattn.varlen import varlen_block_mask

from .tolerance import assert_close_to_reference

BACKENDS = ["reference", "cpu"]


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _loop(q, k, v, lens_q, lens_k, **kwargs):
    """Reference attention of each sequence alone, packed back: ``out (total_q, Hq, Dv)``, ``lse (Hq, total_q)``."""
    outs, lses = [], []
    sq = sk = 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk]
        sq, sk = sq + lq, sk + lk
        if lq == 0:
            continue
        if lk == 0:  # no key: zeros, lse -inf
            outs.append(torch.zeros(lq, q.shape[1], v.shape[2], dtype=q.dtype))
            lses.append(torch.full((q.shape[1], lq), float("-inf")))
            continue
        out, lse = fastattn.attention(qs[None], ks[None], vs[None], layout="blhd", backend="reference",
                                      return_lse=True, **kwargs)
        outs.append(out[0])
        lses.append(lse[0].float())
    return torch.cat(outs), torch.cat(lses, dim=1)


def _check(backend, lens_q, lens_k, *, Hq=4, Hkv=2, D=16, Dv=16, seed=0, device="cpu", **kwargs):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((tq, Hq, D), (tk, Hkv, D), (tk, Hkv, Dv)))
    dout = torch.randn(tq, Hq, Dv, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    device_kwargs = {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in kwargs.items()}
    out, lse = fastattn.varlen_attention(*leaves, _cu(lens_q).to(device), _cu(lens_k).to(device), max(lens_q),
                                         max(lens_k), backend=backend, return_lse=True, **device_kwargs)
    grads = torch.autograd.grad((out * dout.to(device)).sum(), leaves)
    out, lse = out.cpu(), lse.cpu()
    results = {}
    for dtype in (torch.float64, torch.float32):
        ref_leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        ref, ref_lse = _loop(*ref_leaves, lens_q, lens_k, **kwargs)
        ref_grads = torch.autograd.grad((ref * dout.to(dtype)).sum(), ref_leaves)
        results[dtype] = (ref, ref_lse, ref_grads)
    (ref64, lse64, grads64), (ref32, _, grads32) = results[torch.float64], results[torch.float32]
    assert out.shape == (tq, Hq, Dv) and lse.shape == (Hq, tq) and lse.dtype == torch.float32
    assert_close_to_reference("out", out, ref64, ref32)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), lse64[finite].double(), atol=1e-4, rtol=1e-4)
    for name, grad, g64, g32 in zip(("dq", "dk", "dv"), grads, grads64, grads32):
        assert_close_to_reference(name, grad, g64, g32)


# Lengths: 0 and 1, Lq_s > Lk_s and Lq_s < Lk_s, sequences that straddle the 64-token tiles.
LENGTHS = [
    ([1, 0, 37, 70, 5], [1, 3, 37, 70, 0]),  # equal lengths, an empty query side, an empty key side
    ([9, 1, 80, 0, 30], [25, 17, 66, 4, 30]),  # Lq_s < Lk_s and Lq_s > Lk_s
]
FEATURES = [
    {},
    {"causal": True},
    {"window": (5, 3)},
    {"causal": True, "window": (20, -1), "softcap": 4.0},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=["equal", "unequal"])
@pytest.mark.parametrize("kwargs", FEATURES, ids=["plain", "causal", "window", "causal-window-softcap"])
def test_matches_per_sequence_reference(backend, lengths, kwargs):
    _check(backend, *lengths, **kwargs)


@pytest.mark.interpreter
def test_triton_backend():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU through the Triton interpreter
    _check("triton", [9, 1, 40, 0], [25, 17, 30, 4], causal=True, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_with_equal_offsets(backend):
    slopes = torch.rand(4) * 0.3
    _check(backend, [3, 50, 1], [3, 50, 1], alibi_slopes=slopes, causal=True, Hkv=1)
    # A first sequence without queries shifts every later one by 4 = total_k - total_q: still exact.
    _check(backend, [0, 50, 2], [4, 50, 2], alibi_slopes=slopes, window=(3, 3))


def test_alibi_per_sequence_offsets_on_the_varlen_kernel():
    # Lk_s - Lq_s differs between sequences: exact per sequence on the cpu varlen kernel.
    _check("cpu", [2, 30, 9, 1], [3, 20, 9, 40], alibi_slopes=torch.rand(4) * 0.3, causal=True)


def test_alibi_with_different_offsets_raises_on_the_block_mask_path():
    q, k = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="alibi_slopes with varlen_attention"):
        fastattn.varlen_attention(q, k, k, _cu([2, 2]), _cu([3, 3]), 2, 3, alibi_slopes=torch.ones(2),
                                  backend="reference")


def test_mqa_and_value_head_dim():
    _check("cpu", [17, 2, 97], [5, 40, 97], Hq=3, Hkv=1, D=8, Dv=24, causal=True, seed=1)


def test_block_mask_skips_other_sequences_tiles():
    # Two sequences of 128 tokens: the tiles pairing them are empty, those inside are full.
    mask = varlen_block_mask(_cu([128, 128]), _cu([128, 128]))
    layout = mask.layout[0, 0]
    assert layout.shape == (4, 4)
    assert (layout[:2, 2:] == EMPTY).all() and (layout[2:, :2] == EMPTY).all()
    assert mask.num_partial == 0


def test_all_sequences_empty():
    q, k = torch.randn(0, 2, 8), torch.randn(5, 2, 8)
    out, lse = fastattn.varlen_attention(q, k, k, _cu([0, 0]), _cu([2, 3]), 0, 3, return_lse=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    q = torch.randn(3, 2, 8)
    out, lse = fastattn.varlen_attention(q, k[:0], k[:0], _cu([3]), _cu([0]), 3, 0, return_lse=True)
    assert torch.equal(out, torch.zeros(3, 2, 8)) and torch.isneginf(lse).all()


@pytest.mark.parametrize(
    "args, error, match",
    [
        ({"cu_seqlens_q": torch.tensor([0, 2, 4])}, TypeError, "cu_seqlens_q must be an int32"),
        ({"cu_seqlens_q": torch.tensor([1, 2, 4], dtype=torch.int32)}, ValueError, "cu_seqlens_q must start at 0"),
        ({"cu_seqlens_k": torch.tensor([0, 5, 4], dtype=torch.int32)}, ValueError, "cu_seqlens_k must be non-decreasing"),
        ({"cu_seqlens_k": torch.tensor([0, 4], dtype=torch.int32)}, ValueError, "same number of sequences"),
        ({"max_seqlen_q": 1}, ValueError, "max_seqlen_q = 1 is shorter"),
        ({"max_seqlen_k": 2.0}, TypeError, "max_seqlen_k must be an int"),
        ({"q": torch.randn(1, 4, 2, 8)}, ValueError, "q must be 3-D"),
        ({"v": torch.randn(3, 2, 8)}, ValueError, "v must have k's number"),
        ({"window": (1, 2, 3)}, TypeError, "window"),
    ],
)
def test_bad_arguments_name_the_argument(args, error, match):
    kwargs = dict(q=torch.randn(4, 2, 8), k=torch.randn(4, 2, 8), v=torch.randn(4, 2, 8),
                  cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 1, 4], dtype=torch.int32), max_seqlen_q=2, max_seqlen_k=3)
    kwargs.update(args)
    window = kwargs.pop("window", None)
    with pytest.raises(error, match=match):
        fastattn.varlen_attention(**kwargs, window=window)
