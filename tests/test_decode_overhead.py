"""The lean per-call path of fastattn.attention / attention_with_kvcache (cached call plans) and the
Triton decode path's freedom from host reads (CUDA-graph capturable by construction).

The per-call cost itself is measured by benchmarks/decode_cpu.py (--only overhead), not timed here.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import backends as registry
from fastattn import kvcache

from .test_kvcache import _case, _reference
from .tolerance import assert_close_to_reference


def _qkv(B=1, H=2, L=5, D=8, dtype=torch.float32):
    return (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_cached_plan_gives_the_full_paths_result(layout):
    """A repeated call (served by its plan) equals the first (the full path), with new tensor values."""
    registry.clear_dispatch_caches()
    with torch.no_grad():
        for causal in (False, True):
            q, k, v = _qkv()
            first = fastattn.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
            assert len(registry.CALL_PLANS) >= 1
            q2, k2, v2 = _qkv()
            again = fastattn.attention(q2, k2, v2, causal=causal, layout=layout, return_lse=True)
            registry.clear_dispatch_caches()
            full = fastattn.attention(q2, k2, v2, causal=causal, layout=layout, return_lse=True)
            assert not torch.equal(first[0], again[0])
            torch.testing.assert_close(again, full, rtol=0, atol=0)


@pytest.mark.parametrize("bad, error, match", [
    ({"causal": 1}, TypeError, "causal must be a bool"),
    ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
    ({"softcap": True}, TypeError, "softcap must be a float"),
    ({"scale": True}, TypeError, "scale must be a float"),
    ({"window": (True, 0)}, TypeError, "window left must be an int"),
    ({"scale": float("nan")}, ValueError, "scale must be finite"),
    ({"layout": "bhdl"}, ValueError, "layout must be"),
])
def test_cached_plan_never_hides_a_bad_argument(bad, error, match):
    """``True == 1`` and ``hash(True) == hash(1)``: a plan cached for valid options must not serve a call
    whose option only compares equal to them."""
    q, k, v = _qkv()
    good = {"causal": True, "return_lse": False, "softcap": 1.0, "scale": 1.0, "window": (1, 0), "layout": "bhld"}
    with torch.no_grad():
        fastattn.attention(q, k, v, **good)
        fastattn.attention(q, k, v, **good)
        with pytest.raises(error, match=match):
            fastattn.attention(q, k, v, **dict(good, **bad))


def test_cached_plan_follows_a_backend_swap(monkeypatch):
    """Swapping a backend (or replacing its reasons) drops the plans: the next call is dispatched anew."""
    q, k, v = _qkv()
    with torch.no_grad():
        fastattn.attention(q, k, v)
        assert registry.CALL_PLANS
        monkeypatch.setattr(registry.get_backend("cpu"), "reasons", lambda inputs: ["refused for the test"])
        assert not registry.CALL_PLANS
        with pytest.raises(registry.BackendNotSupportedError, match="refused for the test"):
            fastattn.attention(q, k, v, backend="cpu")
        monkeypatch.undo()
        assert fastattn.attention(q, k, v, backend="cpu").shape == q.shape


def test_cached_plan_not_used_with_gradients():
    q, k, v = _qkv()
    with torch.no_grad():
        fastattn.attention(q, k, v)
    q.requires_grad_(True)
    out = fastattn.attention(q, k, v)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_plan_still_checks_index_values(paged):
    """A plan keeps the checked options only: the kernel checks every index value of every call."""
    q, k_cache, v_cache, k_new, v_new, old, hist_k, hist_v, args = _case(
        1, B=2, Lq=1, Lnew=1, Hq=4, Hkv=2, D=16, paged=paged, poison=float("nan"), max_len=32)
    registry.clear_dispatch_caches()
    with torch.no_grad():
        for _ in range(2):  # the second call is served by the plan
            out = fastattn.attention_with_kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new,
                                                  cache_seqlens=old, causal=True, **args)
        assert len(registry.CALL_PLANS) == 1
        ref, _ = _reference(q, hist_k, hist_v, old + 1, causal=True)
        assert_close_to_reference("out", out, ref, ref.float())
        too_long = torch.full_like(old, 32)
        with pytest.raises(ValueError, match="cache_seqlens \\+ Lnew must lie"):
            fastattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=too_long,
                                            causal=True, **args)


def _forbid_host_reads(monkeypatch):
    """Make every read of a tensor's values on the host raise (what a device synchronisation needs)."""
    def host_read(*args, **kwargs):
        raise AssertionError("the decode path read a tensor value on the host")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)


@pytest.mark.parametrize("paged, rows", [(False, False), (False, True), (True, False)],
                         ids=["contiguous", "cache_batch_idx", "paged"])
def test_triton_decode_path_reads_nothing_on_the_host(monkeypatch, paged, rows):
    """The Python side of the triton decode path (append, index sanitising, launch) on CPU tensors as
    while a CUDA graph is captured, with the kernel launch replaced by a recorder and every host read
    of a tensor value raising: nothing there waits for the device, so the step can be captured
    (the GPU itself: tests/test_kvcache.py::test_decode_step_replays_in_a_cuda_graph)."""
    pytest.importorskip("triton")
    from fastattn.backends.triton import ensure_kernels_importable

    if registry.get_backend("triton").unavailable_reasons():
        pytest.skip("triton backend not usable here")
    ensure_kernels_importable()
    import fastattn.triton_kernels.decode_paged as decode_module

    q, k_cache, v_cache, k_new, v_new, old, _, _, args = _case(
        2, B=2, Lq=1, Lnew=1, Hq=4, Hkv=2, D=16, paged=paged, poison=0.0, max_len=32)
    if rows:
        k_cache, v_cache = (torch.cat([t.flip(0), t]) for t in (k_cache, v_cache))
        args = {"cache_batch_idx": torch.tensor([3, 0], dtype=torch.int32)}
    launches = []

    def recorder(q, k_cache, v_cache, cache_seqlens, **kwargs):
        launches.append((cache_seqlens, kwargs))
        B, Lq, Hq, _ = q.shape
        return q.new_zeros(B, Lq, Hq, v_cache.shape[3]), q.new_zeros(B, Hq, Lq, dtype=torch.float32)

    monkeypatch.setattr(decode_module, "decode_paged", recorder)
    monkeypatch.setattr(kvcache, "_capturing", lambda device: True)
    with torch.no_grad():
        _forbid_host_reads(monkeypatch)
        try:
            fastattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=old, causal=True,
                                            backend="triton", alibi_slopes=torch.ones(4), **args)
        finally:
            for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy",
                         "nonzero"):
                monkeypatch.setattr(torch.Tensor, name, getattr(torch._C.TensorBase, name))
    assert len(launches) == 1
    seqlens, kwargs = launches[0]
    assert torch.equal(seqlens, old.long())
    if paged:  # the whole table, its size from the shape (not from the longest sequence)
        assert kwargs["block_table"].shape == args["block_table"].shape


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_triton_decode_path_contains_bad_index_values_while_capturing(monkeypatch, paged):
    """Unchecked while a CUDA graph is captured (no host read), an out-of-range index still never
    reaches memory outside the caches: that sequence appends nothing and returns NaN; the others are
    unaffected. (Eagerly the same call raises: the next test.)"""
    pytest.importorskip("triton")
    if registry.get_backend("triton").unavailable_reasons():
        pytest.skip("triton backend not usable here")
    monkeypatch.setattr(kvcache, "_capturing", lambda device: True)
    q, k_cache, v_cache, k_new, v_new, old, hist_k, hist_v, args = _case(
        3, B=2, Lq=1, Lnew=1, Hq=4, Hkv=2, D=16, paged=paged, poison=0.0, max_len=32)
    old[1] = 40  # past the cache's 32 positions
    before_k, before_v = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=old, causal=True,
                                                   backend="triton", return_lse=True, **args)
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    ref, _ = _reference(q[:1], hist_k[:1], hist_v[:1], old[:1] + 1, causal=True)
    assert_close_to_reference("out", out[:1], ref, ref.float())
    written_k = (k_cache != before_k).any(-1).any(-1)  # slots that changed: sequence 0's new one only
    if paged:
        page, slot = int(args["block_table"][0, int(old[0]) // 16]), int(old[0]) % 16
    else:
        page, slot = int(args.get("cache_batch_idx", torch.arange(2))[0]), int(old[0])
    assert written_k.sum() == 1 and written_k[page, slot]
    assert torch.equal(v_cache != before_v, k_cache != before_k)


@pytest.mark.parametrize("bad", ["cache_seqlens", "block_table", "cache_batch_idx"])
def test_triton_decode_path_raises_on_bad_index_values_eagerly(bad):
    """Outside a CUDA graph capture the triton decode path reads the host once, and a bad index raises
    the same clear error as the other paths, before anything is appended."""
    pytest.importorskip("triton")
    if registry.get_backend("triton").unavailable_reasons():
        pytest.skip("triton backend not usable here")
    q, k_cache, v_cache, k_new, v_new, old, _, _, args = _case(
        3, B=2, Lq=1, Lnew=1, Hq=4, Hkv=2, D=16, paged=bad == "block_table", poison=0.0, max_len=32)
    if bad == "cache_seqlens":
        old[1] = 40  # past the cache's 32 positions
    elif bad == "block_table":
        args["block_table"][1, int(old[1]) // 16] = k_cache.shape[0]  # a page the cache does not have
    else:
        args = {"cache_batch_idx": torch.tensor([0, k_cache.shape[0]], dtype=torch.int32)}  # past the last row
    before = k_cache.clone()
    with torch.no_grad(), pytest.raises(ValueError, match=bad):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=old, causal=True,
                                        backend="triton", **args)
    assert torch.equal(k_cache, before)
