"""fastattn.attention_with_kvcache against a per-sequence loop over the reference."""

from __future__ import annotations

import pytest
import torch

import fastattn

from .tolerance import assert_close_to_reference

BACKENDS = ["reference", "cpu"]


def _reference(q, keys, values, lengths, dtype=torch.float64, **kwargs):
    """Per sequence: reference attention of ``q[b]`` (Lq, Hq, D) on its valid keys, in ``dtype``."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        L = int(lengths[b])
        qb = q[b:b + 1].transpose(1, 2).to(dtype)
        kb, vb = (t[b][:L][None].transpose(1, 2).to(dtype) for t in (keys, values))
        slopes = kwargs.get("alibi_slopes")
        extra = dict(kwargs, alibi_slopes=None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b]))
        if L == 0:  # nothing to see: zeros, lse -inf
            outs.append(torch.zeros(q.shape[1], q.shape[2], values.shape[-1], dtype=dtype))
            lses.append(torch.full((q.shape[2], q.shape[1]), float("-inf"), dtype=dtype))
            continue
        out, lse = fastattn.attention(qb, kb, vb, backend="reference", return_lse=True, **extra)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def _case(seed, *, B, Lq, Lnew, Hq, Hkv, D, paged, poison, max_len=40, page_size=16):
    """Random caches holding each sequence's history, the rest filled with ``poison``."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randint(0, max_len - Lnew + 1, (B,), generator=g)
    old[0] = 0  # lengths 0 and 1 always appear
    if B > 1:
        old[1] = min(1, max_len - Lnew)
    # Each sequence's full key/value history after the append: (B, max_len, Hkv, D).
    hist_k = torch.randn(B, max_len, Hkv, D, generator=g)
    hist_v = torch.randn(B, max_len, Hkv, D, generator=g)
    q = torch.randn(B, Lq, Hq, D, generator=g)
    k_new = torch.stack([hist_k[b, int(old[b]):int(old[b]) + Lnew] for b in range(B)]) if Lnew else None
    v_new = torch.stack([hist_v[b, int(old[b]):int(old[b]) + Lnew] for b in range(B)]) if Lnew else None
    args = {}
    if paged:
        pages_per_seq = -(-max_len // page_size)
        num_pages = B * pages_per_seq + 3  # spare pages stay poisoned
        k_cache = torch.full((num_pages, page_size, Hkv, D), poison)
        v_cache = torch.full((num_pages, page_size, Hkv, D), poison)
        table = torch.randperm(num_pages, generator=g)[:B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
        for b in range(B):
            for pos in range(int(old[b])):
                page = int(table[b, pos // page_size])
                k_cache[page, pos % page_size] = hist_k[b, pos]
                v_cache[page, pos % page_size] = hist_v[b, pos]
            # Pages the sequence never reaches are not read: mark them out of range.
            used = -(-(int(old[b]) + Lnew) // page_size)
            table[b, used:] = -1
        args["block_table"] = table
    else:
        rows = torch.randperm(B + 2, generator=g)[:B]
        k_cache = torch.full((B + 2, max_len, Hkv, D), poison)
        v_cache = torch.full((B + 2, max_len, Hkv, D), poison)
        for b in range(B):
            k_cache[rows[b], :int(old[b])] = hist_k[b, :int(old[b])]
            v_cache[rows[b], :int(old[b])] = hist_v[b, :int(old[b])]
        args["cache_batch_idx"] = rows.to(torch.int32)
    return q, k_cache, v_cache, k_new, v_new, old.to(torch.int32), hist_k, hist_v, args


def _check(backend, seed, *, B=3, Lq=1, Lnew=1, Hq=4, Hkv=2, D=16, paged=False, poison=1e4, device="cpu", max_len=40,
           num_splits=None, **kwargs):
    q, k_cache, v_cache, k_new, v_new, old, hist_k, hist_v, args = _case(
        seed, B=B, Lq=Lq, Lnew=Lnew, Hq=Hq, Hkv=Hkv, D=D, paged=paged, poison=poison, max_len=max_len)
    before_k = k_cache.clone()

    def dev(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    caches = [dev(k_cache), dev(v_cache)]
    out, lse = fastattn.attention_with_kvcache(
        dev(q), *caches, dev(k_new), dev(v_new), cache_seqlens=dev(old), backend=backend, return_lse=True,
        num_splits=num_splits,
        **{name: dev(x) for name, x in args.items()}, **{name: dev(x) for name, x in kwargs.items()})
    out, lse, k_cache = out.cpu(), lse.cpu(), caches[0].cpu()
    lengths = old + Lnew
    ref64, lse64 = _reference(q, hist_k, hist_v, lengths, **kwargs)
    ref32, _ = _reference(q, hist_k, hist_v, lengths, dtype=torch.float32, **kwargs)
    assert out.shape == (B, Lq, Hq, D) and lse.shape == (B, Hq, Lq)
    assert_close_to_reference("out", out, ref64, ref32.float())
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), lse64[finite].double(), atol=1e-4, rtol=1e-4)
    # The append wrote exactly the new positions and nothing else.
    changed = (k_cache != before_k) & ~(torch.isnan(k_cache) & torch.isnan(before_k))
    assert int(changed.any(-1).any(-1).sum()) <= B * Lnew
    for b in range(B):
        for t in range(Lnew):
            pos = int(old[b]) + t
            if paged:
                slot = k_cache[int(args["block_table"][b, pos // 16]), pos % 16]
            else:
                slot = k_cache[int(args["cache_batch_idx"][b]), pos]
            assert torch.equal(slot, k_new[b, t])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize(
    "Lq, Lnew, kwargs",
    [
        (1, 1, {}),  # decode
        (1, 1, {"causal": True, "softcap": 5.0}),
        (5, 5, {"causal": True}),  # chunked prefill, crosses a 16-slot page for some sequences
        (17, 17, {"causal": True, "window": (6, 0)}),  # a chunk that always crosses a page
        (3, 0, {"causal": True}),  # no append: queries at the end of the cached sequence
        (2, 2, {"causal": True, "alibi": True}),
    ],
)
def test_matches_reference(backend, paged, Lq, Lnew, kwargs):
    kwargs = dict(kwargs)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = torch.rand(4) * 0.5
    for seed in range(2):
        _check(backend, seed, Lq=Lq, Lnew=Lnew, paged=paged, **kwargs)


@pytest.mark.parametrize(
    "backend",
    ["reference", "cpu"],
)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_nan_poison_never_reaches_output(backend, paged):
    out = _check(backend, 3, Lq=4, Lnew=4, paged=paged, poison=float("nan"), causal=True)
    assert torch.isfinite(out).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_triton_backend(paged):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU through the Triton interpreter
    _check("triton", 1, B=2, Lq=3, Lnew=3, paged=paged, causal=True, device=device)
    # Unused cache slots holding NaN never reach a result.
    out = _check("triton", 2, B=2, Lq=3, Lnew=3, paged=paged, poison=float("nan"), causal=True, device=device)
    assert torch.isfinite(out).all()


def test_mqa_and_no_batch_idx():
    B, L, Hkv, D = 2, 32, 1, 8
    k_cache, v_cache = torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
    q = torch.randn(B, 1, 3, D)
    lengths = torch.tensor([5, 32], dtype=torch.int32)
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, backend="cpu")
    ref, _ = _reference(q, k_cache, v_cache, lengths)
    ref32, _ = _reference(q, k_cache, v_cache, lengths, dtype=torch.float32)
    assert_close_to_reference("out", out, ref, ref32.float())


def _valid(**over):
    base = dict(q=torch.randn(2, 1, 4, 16), k_cache=torch.zeros(2, 32, 2, 16), v_cache=torch.zeros(2, 32, 2, 16),
                k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16), cache_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over, error, match",
    [
        ({"q": torch.randn(2, 4, 16)}, ValueError, "q must be 4-D"),
        ({"k_cache": torch.zeros(2, 32, 2, 16, dtype=torch.float64)}, TypeError, "k_cache must have q's dtype"),
        ({"v_cache": torch.zeros(2, 31, 2, 16)}, ValueError, "v_cache must match k_cache"),
        ({"k_cache": torch.zeros(2, 32, 3, 16), "v_cache": torch.zeros(2, 32, 3, 16)}, ValueError, "multiple"),
        ({"v": None}, ValueError, "k and v must be given together"),
        ({"k": torch.randn(2, 1, 2, 8)}, ValueError, "k must have shape"),
        ({"cache_seqlens": torch.tensor([0, 3])[:1].int()}, ValueError, "cache_seqlens must have shape"),
        ({"cache_seqlens": torch.tensor([0.0, 3.0])}, TypeError, "cache_seqlens must be an int32"),
        ({"cache_seqlens": torch.tensor([0, 32], dtype=torch.int32)}, ValueError, "cache_seqlens \\+ Lnew"),
        ({"cache_seqlens": torch.tensor([-1, 3], dtype=torch.int32)}, ValueError, "cache_seqlens \\+ Lnew"),
        ({"cache_batch_idx": torch.tensor([0, 2], dtype=torch.int32)}, ValueError, "cache_batch_idx must lie"),
        ({"k_cache": torch.zeros(3, 32, 2, 16), "v_cache": torch.zeros(3, 32, 2, 16)}, ValueError, "cache_batch_idx"),
        ({"block_table": torch.zeros(2, 2, dtype=torch.int32), "k_cache": torch.zeros(4, 8, 2, 16),
          "v_cache": torch.zeros(4, 8, 2, 16)}, ValueError, "page size"),
        ({"block_table": torch.tensor([[0, 1], [4, 1]], dtype=torch.int32), "k_cache": torch.zeros(4, 16, 2, 16),
          "v_cache": torch.zeros(4, 16, 2, 16)}, ValueError, "block_table\\[1, 0\\] = 4"),
        ({"block_table": torch.zeros(2, dtype=torch.int32), "k_cache": torch.zeros(4, 16, 2, 16),
          "v_cache": torch.zeros(4, 16, 2, 16)}, ValueError, "block_table must have shape"),
        ({"block_table": torch.zeros(2, 1, dtype=torch.int32), "cache_seqlens": torch.tensor([0, 16], dtype=torch.int32),
          "k_cache": torch.zeros(4, 16, 2, 16), "v_cache": torch.zeros(4, 16, 2, 16)}, ValueError, "holds 16 positions"),
        ({"block_table": torch.zeros(2, 1, dtype=torch.int32), "cache_batch_idx": torch.zeros(2, dtype=torch.int32),
          "k_cache": torch.zeros(4, 16, 2, 16), "v_cache": torch.zeros(4, 16, 2, 16)}, ValueError, "cache_batch_idx applies"),
    ],
)
def test_bad_arguments_name_the_argument(over, error, match):
    kwargs = _valid(**over)
    q, k_cache, v_cache, k, v = (kwargs.pop(n) for n in ("q", "k_cache", "v_cache", "k", "v"))
    with pytest.raises(error, match=match):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, k, v, **kwargs)


# The CPU decode kernel (csrc/cpu/decode.cpp): the cpu backend runs it for calls without gradients.
def _kernel_available():
    from fastattn.kvcache import _cpu_kernel_available

    return _cpu_kernel_available()


needs_kernel = pytest.mark.skipif(not _kernel_available(), reason="fastattn._C was built without the decode op")


@needs_kernel
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize(
    "Lq, Lnew, num_splits, kwargs",
    [
        (1, 1, 3, {}),  # uneven splits over lengths 1..97
        (1, 1, 5, {"causal": True, "softcap": 3.0, "alibi": True}),
        (4, 4, 2, {"causal": True, "window": (9, 0)}),
        (3, 0, 4, {"window": (5, 2)}),  # queries see keys after their position (right > 0)
    ],
)
def test_cpu_kernel_gqa_splits(paged, Lq, Lnew, num_splits, kwargs):
    kwargs = dict(kwargs)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = torch.rand(2, 8) * 0.3  # per (batch, head)
    out = _check("cpu", 7, B=2, Lq=Lq, Lnew=Lnew, Hq=8, Hkv=2, D=40, paged=paged, max_len=97,
                 poison=float("nan"), num_splits=num_splits, **kwargs)
    assert torch.isfinite(out).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_low_precision(dtype):
    g = torch.Generator().manual_seed(0)
    B, L, Hq, Hkv, D = 2, 70, 8, 2, 64
    q = torch.randn(B, 1, Hq, D, generator=g)
    k_cache, v_cache = torch.randn(B, L, Hkv, D, generator=g), torch.randn(B, L, Hkv, D, generator=g)
    lengths = torch.tensor([70, 33], dtype=torch.int32)
    out = fastattn.attention_with_kvcache(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), cache_seqlens=lengths,
                                          backend="cpu", num_splits=2)
    ref64, _ = _reference(q, k_cache, v_cache, lengths)
    ref_lp, _ = _reference(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), lengths, dtype=dtype)
    assert out.dtype == dtype
    assert_close_to_reference("out", out, ref64, ref_lp)


@needs_kernel
@pytest.mark.parametrize(
    "D, Dv, dtype, lengths",
    [
        (128, 128, torch.float32, [200, 1]),  # blocks of 32 keys, tails of 16 and 8: requests clamp at the split's end
        (32, 48, torch.float32, [97, 17]),  # Dv != D: value rows requested on their own
        (24, 24, torch.float64, [97, 0]),  # the scalar dot products, a sequence with no keys
    ],
)
def test_cpu_kernel_prefetch_paths(D, Dv, dtype, lengths):
    """A GQA group of 4 query heads per key head, uneven splits: the key/value row requests carried
    by the score loop (or issued on their own) never change a result."""
    g = torch.Generator().manual_seed(2)
    B, L, Hq, Hkv = 2, max(lengths), 8, 2
    q = torch.randn(B, 1, Hq, D, generator=g, dtype=dtype)
    k_cache = torch.randn(B, L, Hkv, D, generator=g, dtype=dtype)
    v_cache = torch.randn(B, L, Hkv, Dv, generator=g, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out, lse = torch.ops.fastattn.decode_attention(q, k_cache, v_cache, None, None, seqlens, None, None, None, None,
                                                   D ** -0.5, None, None, 0.0, 3)
    ref, ref_lse = _reference(q, k_cache, v_cache, seqlens)
    ref_lp, _ = _reference(q, k_cache, v_cache, seqlens, dtype=dtype)
    assert_close_to_reference("out", out, ref, ref_lp)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize(
    "dtype, Hq, Hkv, D, Dv, paged",
    [
        (torch.float32, 8, 2, 64, 40, False),  # 12 rows per key head; Dv = 32 + 8: a column tail
        (torch.float32, 2, 2, 32, 32, True),  # 3 rows per key head: no 4-row tile
        (torch.bfloat16, 8, 2, 64, 64, True),
        (torch.float64, 4, 1, 24, 24, False),
    ],
)
def test_cpu_kernel_value_requests_across_blocks(dtype, Hq, Hkv, D, Dv, paged, window):
    """One task walks several key blocks and requests each later block's value rows during the
    previous block's P V (register tiles, or row by row where a window's edge cuts the block): the
    requests never change a result. Three query positions, bottom-right aligned, each seeing the
    keys [pos - window, pos] (or [0, pos])."""
    g = torch.Generator().manual_seed(5)
    B, L, Lq, page = 1, 304, 3, 16
    q = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    k_cache = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64)
    v_cache = torch.randn(B, L, Hkv, Dv, generator=g, dtype=torch.float64)
    seqlens = torch.tensor([L], dtype=torch.int32)
    kc, vc, table = k_cache.to(dtype), v_cache.to(dtype), None
    if paged:  # the same rows as shuffled pages
        order = torch.randperm(L // page, generator=g)
        kc, vc = (torch.empty_like(c).view(-1, page, *c.shape[2:]) for c in (kc, vc))
        kc[order], vc[order] = k_cache.to(dtype).view(-1, page, Hkv, D), v_cache.to(dtype).view(-1, page, Hkv, Dv)
        table = order[None].to(torch.int32)
    out, _ = torch.ops.fastattn.decode_attention(q.to(dtype), kc, vc, None, None, seqlens, table, None, None, None,
                                                 D ** -0.5, window, 0, 0.0, 1)
    for i in range(Lq):  # query i on its own keys
        pos = L - Lq + i
        lo = 0 if window is None else max(0, pos - window)
        keys, values = k_cache[:, lo:pos + 1], v_cache[:, lo:pos + 1]
        n = torch.tensor([pos + 1 - lo], dtype=torch.int32)
        ref, _ = _reference(q[:, i:i + 1], keys, values, n)
        ref_lp, _ = _reference(q[:, i:i + 1].to(dtype), keys.to(dtype), values.to(dtype), n, dtype=dtype)
        assert_close_to_reference("out", out[:, i:i + 1], ref, ref_lp)


@needs_kernel
def test_cpu_kernel_sinks():
    """The op's sink: one more logit per head in each row's softmax (no value); a row without keys gets lse = sink."""
    g = torch.Generator().manual_seed(1)
    B, L, Hq, Hkv, D = 2, 50, 4, 1, 16
    q = torch.randn(B, 1, Hq, D, generator=g)
    k_cache, v_cache = torch.randn(B, L, Hkv, D, generator=g), torch.randn(B, L, Hkv, D, generator=g)
    lengths = torch.tensor([50, 0], dtype=torch.int32)
    sinks = torch.randn(Hq, generator=g)
    out, lse = torch.ops.fastattn.decode_attention(q, k_cache, v_cache, None, None, lengths, None, None, None, sinks,
                                                   D ** -0.5, None, None, 0.0, 3)
    ref, ref_lse = _reference(q, k_cache, v_cache, lengths)
    with_sink = torch.logaddexp(ref_lse, sinks.double()[None, :, None])  # (B, Hq, 1)
    expected = ref * torch.exp(ref_lse - with_sink).transpose(1, 2).nan_to_num(0.0)[..., None]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), with_sink, atol=1e-5, rtol=1e-5)


def test_gradients_take_the_differentiable_path():
    """The decode kernel is forward only: a call that needs gradients composes fastattn.attention."""
    g = torch.Generator().manual_seed(2)
    B, L, Hq, Hkv, D = 2, 20, 4, 2, 8
    q = torch.randn(B, 1, Hq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k_cache = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64)
    v_cache = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([20, 7], dtype=torch.int32)
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, backend="cpu")
    out.sum().backward()
    q_ref = q.detach().clone().requires_grad_(True)
    ref, _ = _reference(q_ref, k_cache, v_cache, lengths)
    ref.sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad)


@needs_kernel
def test_cpu_kernel_bad_values_raise_before_writing():
    """Index values are checked by the kernel before the append writes anything."""
    k_cache, v_cache = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"block_table\[1, 1\] = 9"):
        fastattn.attention_with_kvcache(torch.randn(2, 1, 4, 16), k_cache, v_cache, torch.ones(2, 1, 2, 16),
                                        torch.ones(2, 1, 2, 16), cache_seqlens=torch.tensor([3, 16], dtype=torch.int32),
                                        block_table=table, backend="cpu")
    assert not k_cache.any()
    with pytest.raises(ValueError, match="num_splits"):
        fastattn.attention_with_kvcache(torch.randn(2, 1, 4, 16), k_cache, v_cache,
                                        cache_seqlens=torch.tensor([3, 1], dtype=torch.int32), block_table=table,
                                        num_splits=0)


# The Triton decode kernel that walks block_table itself (triton_kernels/decode_paged.py), on tiny
# shapes through the interpreter: shuffled pages, NaN in every unused slot, uneven splits.
@pytest.mark.interpreter
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize(
    "Lq, Lnew, num_splits, kwargs",
    [
        (1, 0, 3, {}),
        (1, 0, 2, {"softcap": 4.0, "alibi": True}),
        (3, 0, 2, {"causal": True}),
        (2, 0, 3, {"window": (7, 1)}),
    ],
)
def test_triton_paged_kernel(paged, Lq, Lnew, num_splits, kwargs):
    pytest.importorskip("triton")
    from fastattn.backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    from fastattn.triton_kernels.decode_paged import decode_paged

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(kwargs)
    B, Hq, Hkv, D = 3, 4, 2, 16
    slopes = torch.rand(B, Hq) * 0.3 if kwargs.pop("alibi", False) else None
    q, k_cache, v_cache, _, _, old, hist_k, hist_v, args = _case(
        11, B=B, Lq=Lq, Lnew=Lnew, Hq=Hq, Hkv=Hkv, D=D, paged=paged, poison=float("nan"), max_len=45)
    left, right = kwargs.get("window", (None, None))
    if kwargs.get("causal"):
        right = 0
    out, lse = decode_paged(
        q.to(device), k_cache.to(device), v_cache.to(device), old.to(device), block_table=args.get("block_table"),
        cache_batch_idx=args.get("cache_batch_idx"), alibi_slopes=None if slopes is None else slopes.to(device),
        scale=D ** -0.5, softcap=kwargs.get("softcap", 0.0), window_left=left, window_right=right,
        num_splits=num_splits)
    ref_kwargs = dict(kwargs, alibi_slopes=slopes)
    ref64, lse64 = _reference(q, hist_k, hist_v, old, **ref_kwargs)
    ref32, _ = _reference(q, hist_k, hist_v, old, dtype=torch.float32, **ref_kwargs)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all()
    assert_close_to_reference("out", out, ref64, ref32.float())
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_step_replays_in_a_cuda_graph(paged):
    """The Triton decode path reads nothing on the host while captured: a graph replayed after the
    lengths, the new token and the query change in place gives what an eager call gives."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    q, k_cache, v_cache, k_new, v_new, old, _, _, args = _case(5, B=2, Lq=1, Lnew=1, Hq=8, Hkv=2, D=64, paged=paged,
                                                              poison=0.0, max_len=64)
    old.clamp_(max=48)  # room for the two replayed steps
    dev = {name: t.cuda() for name, t in args.items()}
    q, k_cache, v_cache, k_new, v_new, old = (t.cuda() for t in (q, k_cache, v_cache, k_new, v_new, old))
    eager_k, eager_v = k_cache.clone(), v_cache.clone()

    def step(kc, vc):
        return fastattn.attention_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=old, causal=True,
                                               backend="triton", **dev)

    with torch.no_grad():
        step(k_cache.clone(), v_cache.clone())  # compile the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(k_cache, v_cache)
        for _ in range(2):  # decode two more tokens: new inputs written into the captured tensors
            old += 1
            q.normal_()
            k_new.normal_()
            v_new.normal_()
            graph.replay()
            expected = step(eager_k, eager_v)
            torch.testing.assert_close(out, expected)


@needs_kernel
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cpu_kernel_opcheck(paged):
    """The op's schema (the caches mutated in place), its fake and its dispatch agree (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, 2, Hq, D, generator=g)
    k_new, v_new = torch.randn(B, 2, Hkv, D, generator=g), torch.randn(B, 2, Hkv, D, generator=g)
    seqlens = torch.tensor([5, 17], dtype=torch.int32)
    if paged:
        k_cache, v_cache = torch.randn(5, 16, Hkv, D, generator=g), torch.randn(5, 16, Hkv, D, generator=g)
        table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
    else:
        k_cache, v_cache = torch.randn(B, 32, Hkv, D, generator=g), torch.randn(B, 32, Hkv, D, generator=g)
        table = None
    args = (q, k_cache, v_cache, k_new, v_new, seqlens, table, None, None, None, D ** -0.5, None, 0, 0.0, 0)
    torch.library.opcheck(torch.ops.fastattn.decode_attention.default, args)


@needs_kernel
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cpu_kernel_with_sinks_matches_the_reference_backend(paged):
    """sinks through the public function: the CPU kernel (no gradient) against the reference backend."""
    q, k_cache, v_cache, k_new, v_new, old, _, _, args = _case(4, B=3, Lq=2, Lnew=2, Hq=4, Hkv=2, D=16, paged=paged,
                                                              poison=float("nan"), max_len=50)
    sinks = torch.randn(4)
    sinks[1] = float("-inf")  # no sink for that head
    results = []
    for backend in ("cpu", "reference"):
        caches = (k_cache.clone(), v_cache.clone())
        with torch.no_grad():
            results.append(fastattn.attention_with_kvcache(q, *caches, k_new, v_new, cache_seqlens=old, causal=True,
                                                           sinks=sinks, return_lse=True, backend=backend, **args))
    (out, lse), (ref, ref_lse) = results
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
