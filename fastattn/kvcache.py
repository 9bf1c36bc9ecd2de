"""Attention against a key/value cache (decoding, chunked prefill): :func:`attention_with_kvcache`.

The new keys and values are written into the cache in place, then the queries attend to every
slot below each sequence's new length, so the slots at or past a sequence's length never reach a
result. What runs how:

* CPU calls without gradients and with short query blocks: one call of the C++ op
  ``fastattn::decode_attention`` (csrc/cpu/decode.cpp), which checks the index values, appends,
  and reads the cache in place (paged through ``block_table``), each key/value row once per GQA group;
* the triton backend (GPU default), no gradients, short query blocks: the append is an indexed
  write, then triton_kernels/decode_paged.py reads the cache in place through ``block_table``.
  Nothing is read on the host and no size depends on a value, so a step costs no device
  synchronisation and can be captured in a CUDA graph; index values are not checked there: a
  sequence with one out of range appends nothing, reads only in-bounds slots and returns NaN;
* otherwise the append is an indexed write and :func:`fastattn.attention` runs with
  ``key_lengths``: a contiguous cache through a ``(B, Hkv, L, D)`` transposed view, cropped to the
  longest sequence, without a copy (with ``cache_batch_idx`` the selected rows are gathered: a
  copy); a paged cache gathered into a contiguous ``(B, pages * page_size, Hkv, D)`` tensor.
  Outside a capture, ``cache_seqlens`` (and ``block_table``) are checked on the host (a device
  synchronisation on a GPU).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from . import _extension
from ._inputs import _check_bool, _check_number, _check_sinks, _check_tensor, _check_window
from .api import attention
from .backends import CALL_PLANS, dispatch_environment, remember_plan

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_4d(t, name: str, shape_name: str) -> None:
    _check_tensor(t, name)
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {shape_name}, got shape {tuple(t.shape)}")


def _check_index(t, name: str, shape: tuple[int, ...], device: torch.device) -> None:
    _check_tensor(t, name)
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


# The CPU decode kernel holds every query row of a GQA group in one task: Lq * (Hq / Hkv) rows at most.
_CPU_KERNEL_MAX_GROUP_ROWS = 64


@functools.cache
def _cpu_kernel_available() -> bool:
    """The C++ extension is built and has the decode op (a build from before it has not)."""
    module, _ = _extension.load()
    return module is not None and hasattr(torch.ops.fastattn, "decode_attention")


def _cpu_kernel_serves(q, k_cache, v_cache, k, v, alibi_slopes, backend, group_rows: int, sinks=None) -> bool:
    """Whether the CPU decode kernel (csrc/cpu/decode.cpp) runs this call: a CPU call on the cpu
    backend (asked for, or chosen automatically), a short query and no gradient to compute (the
    kernel is forward only; a call that needs gradients composes :func:`fastattn.attention`)."""
    if q.device.type != "cpu" or group_rows > _CPU_KERNEL_MAX_GROUP_ROWS:
        return False
    requested = backend or os.environ.get("FASTATTN_BACKEND") or "cpu"
    if requested != "cpu" or not _cpu_kernel_available():
        return False
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v, alibi_slopes, sinks)
    ):
        return False
    return True


def _kernel_options(q, causal, window, scale, softcap, alibi_slopes):
    """The decode kernels' options, checked: ``(window_left, window_right, scale, softcap, alibi_slopes)``
    with causal as a right bound of 0 (bottom-right aligned) and slopes expanded to ``(B, Hq)``."""
    _check_bool(causal, "causal")
    window_left, window_right = _check_window(window)
    if causal:
        window_right = 0 if window_right is None else min(window_right, 0)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else _check_number(scale, "scale")
    softcap = _check_number(softcap, "softcap", minimum=0.0)
    if alibi_slopes is not None:
        alibi_slopes = _check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    return window_left, window_right, scale, softcap, alibi_slopes


def _cpu_decode(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, *, causal, window,
                alibi_slopes, softcap, scale, return_lse, sinks=None, num_splits=0, plan_key=None):
    """Append and attend in one call of the CPU decode kernel, which reads the cache in place
    (paged through ``block_table``) and checks every index value before it writes or reads.
    With ``plan_key``, the checked options are kept for later calls with that key."""
    window_left, window_right, scale, softcap, alibi_slopes = _kernel_options(q, causal, window, scale, softcap,
                                                                               alibi_slopes)
    if plan_key is not None:
        remember_plan(plan_key, (scale, window_left, window_right, softcap, num_splits))
    out, lse = torch.ops.fastattn.decode_attention(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, sinks, scale,
        window_left, window_right, softcap, num_splits)
    return (out, lse) if return_lse else out


_Tensor = torch.Tensor


def _signature(t) -> tuple | None:
    """What the checks read of an optional tensor argument."""
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


def _plan_key(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, causal, window, softcap, scale,
              return_lse, backend, num_splits) -> tuple | None:
    """The key of a CPU-kernel call's cached plan (see :func:`attention_with_kvcache`), or None when the
    call takes the full path. Like :func:`fastattn.api._plan_key`: plain option values of the accepted
    types (``True == 1`` in a key), no gradient to compute, and every property the checks and the
    choice of path read in the key. The index *values* are not: the kernel checks them on every call."""
    if torch.compiler.is_compiling() or not (type(q) is _Tensor and type(k_cache) is _Tensor
                                             and type(v_cache) is _Tensor and type(cache_seqlens) is _Tensor):
        return None
    if not (causal.__class__ is bool and return_lse.__class__ is bool and softcap.__class__ is float
            and (scale is None or scale.__class__ is float) and (num_splits is None or num_splits.__class__ is int)):
        return None
    if window is not None and not (window.__class__ is tuple and len(window) == 2 and window[0].__class__ is int
                                   and window[1].__class__ is int):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad or (
            k is not None and k.requires_grad) or (v is not None and v.requires_grad)):
        return None
    return (q.shape, k_cache.shape, v_cache.shape, cache_seqlens.shape, q.dtype, k_cache.dtype, v_cache.dtype,
            cache_seqlens.dtype, q.device, k_cache.device, v_cache.device, cache_seqlens.device, _signature(k),
            _signature(v), _signature(block_table), _signature(cache_batch_idx), causal, window, softcap, scale,
            return_lse, backend, num_splits, *dispatch_environment())


# The Triton decode kernel's query tile holds a GQA group's rows (Lq * Hq / Hkv) and head dims up to this.
_TRITON_KERNEL_MAX_HEAD_DIM = 256


def _triton_kernel_serves(q, k_cache, v_cache, k, v, alibi_slopes, backend, group_rows: int) -> bool:
    """Whether the Triton decode kernel (triton_kernels/decode_paged.py) runs this call: the triton
    backend asked for (or, on a GPU, chosen automatically), usable here, a short query, no gradient."""
    requested = backend or os.environ.get("FASTATTN_BACKEND")
    if requested != "triton" and not (requested is None and q.device.type == "cuda"):
        return False
    if group_rows > _CPU_KERNEL_MAX_GROUP_ROWS or q.dtype == torch.float64:
        return False
    if max(q.shape[3], v_cache.shape[3]) > _TRITON_KERNEL_MAX_HEAD_DIM:
        return False
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return False
    from .backends import get_backend

    if get_backend("triton").unavailable_reasons():
        return False
    return not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v, alibi_slopes)))


def _triton_decode(q, k_cache, v_cache, seqlens, Lnew, table, rows, *, causal, window, alibi_slopes, softcap,
                   scale, return_lse, num_splits):
    """The attend step on the Triton decode kernel, which follows ``table`` (pages) or ``rows`` itself.
    The append has been done; the kernel reads the lengths on the device."""
    from .backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    from .triton_kernels.decode_paged import decode_paged

    window_left, window_right, scale, softcap, alibi_slopes = _kernel_options(q, causal, window, scale, softcap,
                                                                               alibi_slopes)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out, lse = decode_paged(q, k_cache, v_cache, seqlens, lnew=Lnew, block_table=table, cache_batch_idx=rows,
                            alibi_slopes=alibi_slopes, scale=scale, softcap=softcap, window_left=window_left,
                            window_right=window_right, num_splits=num_splits)
    return (out, lse) if return_lse else out


def _check_splits(num_splits) -> int:
    """``num_splits`` as the kernel takes it: 0 = automatic."""
    if num_splits is None:
        return 0
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    return num_splits


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (then nothing may read the host)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _bad_sequences(seqlens, Lnew: int, capacity: int, n_rows: int, rows, block_table, page_size: int):
    """``(B,)`` bool on the device: the sequences whose lengths, cache row or pages are out of range."""
    lengths = seqlens + Lnew
    bad = (seqlens < 0) | (lengths > capacity)
    if rows is not None:
        bad |= (rows < 0) | (rows >= n_rows)
    if block_table is not None:
        used = torch.arange(block_table.shape[1], device=seqlens.device) * page_size < lengths[:, None]
        bad |= (used & ((block_table < 0) | (block_table >= n_rows))).any(1)
    return bad


def _check_alibi(alibi_slopes, B: int, Hq: int, device) -> torch.Tensor:
    """float32 ``(Hq,)`` or ``(B, Hq)`` slopes, expanded to ``(B, Hq)``; checked finite unless a CUDA
    graph is being captured (a host read then would break the capture)."""
    _check_tensor(alibi_slopes, "alibi_slopes")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.shape not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({Hq},) or (B, Hq) = ({B}, {Hq}), "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on q's device {device}, got {alibi_slopes.device}")
    if not _capturing(alibi_slopes.device) and not bool(torch.isfinite(alibi_slopes).all()):
        raise ValueError("alibi_slopes must be finite, got NaN or Inf values")
    return alibi_slopes.expand(B, Hq)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
):
    """Append ``k``/``v`` to a KV cache in place, then attend to the cache (flash-attn's layout).

    Sequence ``b`` has ``L_b = cache_seqlens[b] + Lnew`` valid keys after the append. The queries are
    its last ``Lq`` positions (bottom-right aligned, as :func:`fastattn.attention`): query ``i`` sits
    at position ``L_b - Lq + i``, which is ``cache_seqlens[b] + i`` when the queries are the tokens
    just appended (``Lq == Lnew``, the usual decode / chunked-prefill call). ``causal``, ``window``
    and ALiBi use those positions. Slots at or past ``L_b`` are never read into a result, whatever
    they hold (NaN included).

    Args:
        q: ``(B, Lq, Hq, D)``.
        k_cache: contiguous ``(B_cache, L_max, Hkv, D)``, or paged ``(num_pages, page_size, Hkv, D)``
            when ``block_table`` is given (``page_size`` a multiple of 16). Written in place.
        v_cache: ``(B_cache, L_max, Hkv, Dv)`` or ``(num_pages, page_size, Hkv, Dv)``. Written in place.
        k: optional new keys ``(B, Lnew, Hkv, D)``, written at positions ``cache_seqlens[b] + t``.
        v: new values ``(B, Lnew, Hkv, Dv)``; given exactly when ``k`` is.
        cache_seqlens: int32/int64 ``(B,)``: valid keys per sequence before the append.
        block_table: int32/int64 ``(B, max_pages)``: page ``p`` of sequence ``b`` (positions
            ``[p * page_size, (p + 1) * page_size)``) is ``k_cache[block_table[b, p]]``. Entries past
            the pages a sequence uses are not read.
        cache_batch_idx: int32/int64 ``(B,)`` (contiguous cache only): sequence ``b`` lives in cache
            row ``cache_batch_idx[b]``; default row ``b`` (then ``B_cache`` must equal ``B``).
        causal, window, alibi_slopes, softcap, scale, backend, sinks: as in :func:`fastattn.attention`.
        return_lse: also return the float32 log-sum-exp ``(B, Hq, Lq)``.
        num_splits: how many slices of each sequence's keys the CPU decode kernel gives separate
            tasks (split-KV, merged by log-sum-exp); ``None`` chooses from the batch size and the
            thread count. Other paths choose their own split.

    Returns:
        ``out (B, Lq, Hq, Dv)`` in q's dtype, or ``(out, lse)`` with ``return_lse``.
    """
    # Per-call cost: a call for the CPU kernel without ALiBi or sinks whose signature (shapes, dtypes,
    # devices, options) has been checked before reuses that call's checked options; the kernel
    # checks the index values itself on every call (docs/varlen-and-kvcache.md, "Per-call cost").
    plan_key = None
    if alibi_slopes is None and sinks is None:
        plan_key = _plan_key(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, causal, window,
                             softcap, scale, return_lse, backend, num_splits)
        plan = CALL_PLANS.get(plan_key) if plan_key is not None else None
        if plan is not None:
            out, lse = torch.ops.fastattn.decode_attention(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                                                           cache_batch_idx, None, None, *plan)
            return (out, lse) if return_lse else out

    _check_bool(return_lse, "return_lse")
    splits = _check_splits(num_splits)
    _check_4d(q, "q", "(B, Lq, Hq, D)")
    B, Lq, Hq, D = q.shape
    paged = block_table is not None
    cache_shape = "(num_pages, page_size, Hkv, D)" if paged else "(B_cache, L_max, Hkv, D)"
    _check_4d(k_cache, "k_cache", cache_shape)
    _check_4d(v_cache, "v_cache", cache_shape)
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    n_rows, row_len, Hkv, Dk = k_cache.shape
    Dv = v_cache.shape[3]
    if Dk != D:
        raise ValueError(f"k_cache must have q's head_dim {D} (last dim), got {Dk}")
    if tuple(v_cache.shape[:3]) != (n_rows, row_len, Hkv):
        raise ValueError(f"v_cache must match k_cache in its first three dims {(n_rows, row_len, Hkv)}, "
                         f"got {tuple(v_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's number of heads ({Hq}) must be a multiple of the cache's ({Hkv}) for GQA/MQA")

    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append) or both be None")
    Lnew = 0
    if k is not None:
        _check_4d(k, "k", "(B, Lnew, Hkv, D)")
        _check_4d(v, "v", "(B, Lnew, Hkv, Dv)")
        Lnew = k.shape[1]
        for t, name, dim in ((k, "k", D), (v, "v", Dv)):
            if tuple(t.shape) != (B, Lnew, Hkv, dim):
                raise ValueError(f"{name} must have shape (B, Lnew, Hkv, {'D' if name == 'k' else 'Dv'}) = "
                                 f"{(B, Lnew, Hkv, dim)}, got {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")

    _check_index(cache_seqlens, "cache_seqlens", (B,), q.device)
    if _cpu_kernel_serves(q, k_cache, v_cache, k, v, alibi_slopes, backend, Lq * (Hq // Hkv), sinks):
        sinks = _check_sinks(sinks, Hq, q)
        return _cpu_decode(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, causal=causal,
                           window=window, alibi_slopes=alibi_slopes, softcap=softcap, scale=scale,
                           return_lse=return_lse, num_splits=splits,
                           sinks=None if sinks is None else sinks.to(torch.float32), plan_key=plan_key)
    seqlens = cache_seqlens.long()
    # The Triton decode kernel reads the lengths, pages and rows on the device. Eagerly, its path reads
    # the host once per call (is any index bad?) and only a bad call goes on to the detailed checks
    # below, which raise; while a CUDA graph is captured it reads nothing and a bad sequence is
    # contained instead (indices clamped, nothing appended, NaN out). The other paths check on the host.
    on_device = sinks is None and _triton_kernel_serves(q, k_cache, v_cache, k, v, alibi_slopes, backend,
                                                        Lq * (Hq // Hkv))
    capturing = _capturing(q.device)
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx applies to a contiguous cache; with block_table, map sequences to "
                             "pages through block_table instead")
        _check_tensor(block_table, "block_table")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape (B, max_pages) = ({B}, max_pages), got {tuple(block_table.shape)}")
        _check_index(block_table, "block_table", tuple(block_table.shape), q.device)
        page_size = row_len
        if page_size == 0 or page_size % 16 != 0:
            raise ValueError(f"the page size (k_cache.shape[1]) must be a positive multiple of 16, got {page_size}")
        capacity = block_table.shape[1] * page_size
    else:
        capacity = row_len
        if cache_batch_idx is None:
            if n_rows != B:
                raise ValueError(f"k_cache has {n_rows} rows but q has batch {B}; pass cache_batch_idx to pick rows")
            rows = torch.arange(B, device=q.device)
        else:
            _check_index(cache_batch_idx, "cache_batch_idx", (B,), q.device)
            rows = cache_batch_idx.long()
    invalid = None
    if on_device:
        invalid = _bad_sequences(seqlens, Lnew, capacity, n_rows, rows if cache_batch_idx is not None else None,
                                 block_table, row_len)  # (B,) on the device
    host_checks = B > 0 and not capturing and (invalid is None or bool(invalid.any()))
    if host_checks and cache_batch_idx is not None and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
        raise ValueError(f"cache_batch_idx must lie in [0, {n_rows}), got values in "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    lengths = seqlens + Lnew  # (B,) valid keys after the append
    if host_checks and (int(seqlens.min()) < 0 or int(lengths.max()) > capacity):
        raise ValueError(f"cache_seqlens + Lnew must lie in [{Lnew}, {capacity}] (the cache holds {capacity} "
                         f"positions per sequence), got cache_seqlens in [{int(seqlens.min())}, {int(seqlens.max())}] "
                         f"with Lnew = {Lnew}")
    max_len = int(lengths.max()) if host_checks else capacity  # sizes from shapes alone without host reads
    if paged:
        num_used = max(1, -(-max_len // page_size))  # pages of the longest sequence (>= 1, so Lk >= 1)
        table = block_table[:, :num_used].long()  # (B, num_used)
        used = torch.arange(num_used, device=q.device) * page_size < lengths[:, None]  # (B, num_used)
        bad = used & ((table < 0) | (table >= n_rows))
        if host_checks and bool(bad.any()):
            b, p = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {p}] = {int(table[b, p])} is not a page of k_cache (it has "
                             f"{n_rows} pages: valid entries lie in [0, {n_rows}))")
        table = torch.where(used & ~bad, table, 0)  # unused entries are never read, but must index something
    if on_device:
        # Reached with a bad index only while capturing: that sequence reads and writes only in-bounds
        # slots (its indices clamped; its "append" writes back what the slots hold) and returns NaN.
        if cache_batch_idx is not None:
            rows = rows.clamp(0, n_rows - 1)
        seqlens = torch.where(invalid, seqlens.clamp(0, max(capacity - Lnew, 0)), seqlens)
        lengths = seqlens + Lnew

    if Lnew:
        positions = seqlens[:, None] + torch.arange(Lnew, device=q.device)  # (B, Lnew)
        if paged:
            index = (table.gather(1, positions // page_size), positions % page_size)
        else:
            index = (rows[:, None].expand(B, Lnew), positions)
        if invalid is None:
            k_cache[index] = k
            v_cache[index] = v
        else:  # an invalid sequence writes back what its slots hold
            skip = invalid[:, None, None, None]
            k_cache[index] = torch.where(skip, k_cache[index], k)
            v_cache[index] = torch.where(skip, v_cache[index], v)

    if on_device:
        out, lse = _triton_decode(q, k_cache, v_cache, seqlens, Lnew, table if paged else None,
                                  None if cache_batch_idx is None else rows, causal=causal, window=window,
                                  alibi_slopes=alibi_slopes, softcap=softcap, scale=scale, return_lse=True,
                                  num_splits=splits or None)
        out = out.masked_fill(invalid[:, None, None, None], float("nan"))
        lse = lse.masked_fill(invalid[:, None, None], float("nan"))
        return (out, lse) if return_lse else out
    Lk = max(1, max_len) if capacity else 0
    if paged:
        keys = k_cache[table].reshape(B, num_used * page_size, Hkv, D)
        values = v_cache[table].reshape(B, num_used * page_size, Hkv, Dv)
    elif cache_batch_idx is None:
        keys, values = k_cache[:, :Lk], v_cache[:, :Lk]
    else:
        keys, values = k_cache[rows, :Lk], v_cache[rows, :Lk]
    return attention(q, keys, values, layout="blhd", causal=causal, window=window, alibi_slopes=alibi_slopes,
                     softcap=softcap, scale=scale, return_lse=return_lse, backend=backend,
                     key_lengths=lengths.to(torch.int32), sinks=sinks)
