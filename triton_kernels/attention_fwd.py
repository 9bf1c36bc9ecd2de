"""Fused attention forward: online softmax over key tiles (FlashAttention-2 style), with split-KV.

Read top to bottom: the score tile (every feature applied to one ``[BLOCK_M, BLOCK_N]`` tile of
``q @ k^T``), the visible band of key blocks, one key-block step of the online softmax, the kernel,
and its launcher. The split-KV combine kernel is in ``attention_combine.py``.

Semantics (see ``fastattn/ops.py``): with ``offset = klen - qlen`` (``Lk - Lq`` without lengths),
query ``i`` sees key ``j`` iff ``i + offset - window_left <= j <= i + offset + window_right`` and
``j < klen``. Scores are ``scale * q.k``, then softcap, then ALiBi, then the additive mask; a row
that sees nothing outputs 0 with ``lse = -inf``. What a row cannot see stays out of it: keys past
``klen`` (and values no row of a tile can see) are never loaded, and hidden scores are selected
away (``tl.where``), never multiplied by 0. A value that some rows of a tile see and others do not
(a causal diagonal, a False in a bool mask) would reach the others as ``0 * value`` in the tile's
``P @ V``; that only happens when the value is NaN/Inf, and then those rows' output is non-finite,
so a second launch (``REDO_NONFINITE``) computes exactly such rows again with ``P V`` by selection.
The first launch's loop carries no check.

Scores are kept in log2 units (``s * log2(e)``) so the softmax uses ``exp2``; without softcap,
ALiBi or an additive mask, ``scale * log2(e)`` is folded into one multiply. With an additive mask
they stay in natural units (``NATURAL = HAS_MASK and not MASK_IS_BOOL`` in every kernel) and
``log2(e)`` enters after the row max is subtracted:
a mask at ``torch.finfo(float32).min`` (Hugging Face's padding value) would overflow to ``-inf`` in
log2 units, and clamping it there changed the row's ``lse``.

Every pointer offset that grows with a sequence length or a stride is computed in int64, so any
strides and masks with ``Lq * Lk >= 2**31`` are addressed correctly.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs
from .attention_combine import attention_combine

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Above this |lse| (a row whose visible scores all sit at a mask value such as finfo(float32).min or
# -1e9), float32 lse = m + log(l) resolves log(l) to no better than 2^-9, so exp(s - lse) is not the
# backward's P; the backward recomputes such rows' (m, l) instead (``attention_row_stats``).
LARGE_LSE = tl.constexpr(1024.0)

# HAS_SOFTCAP values: how tanh is computed (see softcap_flag).
SOFTCAP_EXACT = tl.constexpr(1)
SOFTCAP_HW_TANH = tl.constexpr(2)


# --------------------------------------------------------------------------- shared device helpers
@triton.jit
def _tanh(x):
    # Portable tanh (no libdevice in the interpreter): one exp2 and one fast (2 ulp) division;
    # saturates to +-1 without NaN. 2 * log2(e) = 2.885390081777927.
    return 1.0 - tl.fdiv(tl.full(x.shape, 2.0, tl.float32), tl.exp2(x * 2.885390081777927) + 1.0)


@triton.jit
def _tanh_hw(x):
    # One MUFU.TANH per element (relative error 2**-11; used for 16-bit inputs on a GPU only).
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rows_desc(p_head, rows, cols, stride_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tensor descriptor (TMA) of one head's ``[rows, cols]`` matrix at ``p_head`` (unit column
    stride), read and written in ``[BLOCK_R, BLOCK_C]`` tiles; rows and columns past the shape read as 0
    and are not written."""
    return tl.make_tensor_descriptor(p_head, shape=[rows, cols], strides=[stride_row, 1],
                                     block_shape=[BLOCK_R, BLOCK_C])


@triton.jit
def _dropout_keep(seed, i_b, i_h, o_m, o_n, Hq, Lq, Lk, dropout_p):
    """Keep pattern of one tile, four keep bits per Philox call.

    Key columns ``4c .. 4c + 3`` of row ``i`` of head ``(b, h)`` take, in order, the four outputs of
    Philox at counter ``((b * Hq + h) * Lq + i) * ceil(Lk / 4) + c``. ``o_n`` is a run of key
    positions starting at a multiple of 4; ``i_h`` a scalar or a ``[BLOCK_M, 1]`` column.
    """
    BLOCK_M: tl.constexpr = o_m.shape[0]
    BLOCK_N: tl.constexpr = o_n.shape[0]
    # [BLOCK_N // 4] the Philox counter column of each group of four keys
    o_c = tl.min(o_n, 0) // 4 + tl.arange(0, BLOCK_N // 4)
    # [BLOCK_M, BLOCK_N // 4]
    o_rand = ((i_b * Hq + i_h).to(tl.int64) * Lq + o_m[:, None].to(tl.int64)) * ((Lk + 3) // 4) + o_c[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, o_rand)
    # Keep iff the uint32 draw >= p * 2**32 (compared before the shuffle below: it moves bits, not words).
    threshold = tl.cast(dropout_p * 4294967296.0, tl.uint32)
    # [BLOCK_M, BLOCK_N // 4, 2, 2] -> [BLOCK_M, BLOCK_N]: column 4c + t holds output t
    b_keep = tl.join(tl.join(r0 >= threshold, r2 >= threshold), tl.join(r1 >= threshold, r3 >= threshold))
    return tl.reshape(b_keep, [BLOCK_M, BLOCK_N])


@triton.jit
def _score_tile(
    b_qk,  # [BLOCK_M, BLOCK_N] float32, q @ k^T
    o_m, o_n,  # [BLOCK_M], [BLOCK_N] query / key positions
    offset, qlen, klen, window_left, window_right,
    slope, sm_scale, softcap,
    p_mask_bh, stride_mask_m, stride_mask_n, Lq, Lk,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, APPLY_INDEX_MASK: tl.constexpr, APPLY_ATTN_MASK: tl.constexpr,
):
    """Scores of one tile with every mask applied (-inf where not visible), in log2 units, or in
    natural units in kernels with an additive mask (``NATURAL``, see the module docstring).

    Returns the scores and ``tanh(x / softcap)`` (for the softcap gradient; unused otherwise).
    ``APPLY_INDEX_MASK`` masks sequence ends, lengths and the window; tiles wholly inside the
    visible band skip it. ``APPLY_ATTN_MASK`` reads ``attn_mask`` for this tile. ``HAS_SOFTCAP`` is
    ``SOFTCAP_EXACT`` or ``SOFTCAP_HW_TANH`` (see ``softcap_flag``). ``slope`` and ``p_mask_bh`` are
    scalars or ``[BLOCK_M, 1]`` columns (one head per row).
    """
    NATURAL: tl.constexpr = HAS_MASK and not MASK_IS_BOOL
    USE_NATURAL: tl.constexpr = HAS_SOFTCAP or HAS_ALIBI or NATURAL
    # [BLOCK_M, BLOCK_N]
    b_tanh = b_qk
    if USE_NATURAL:
        if HAS_SOFTCAP:
            # Pre-scaled: one multiply and one tanh per score, no division.
            if HAS_SOFTCAP == SOFTCAP_HW_TANH:
                b_tanh = _tanh_hw(b_qk * (sm_scale / softcap))
            else:
                b_tanh = _tanh(b_qk * (sm_scale / softcap))
            b_s = softcap * b_tanh
        else:
            b_s = b_qk * sm_scale
        if HAS_ALIBI:
            b_dist = tl.abs(o_m[:, None] + offset - o_n[None, :]).to(tl.float32)
            b_s = b_s - slope * b_dist
        if HAS_MASK and APPLY_ATTN_MASK and not MASK_IS_BOOL:
            o_mask = o_m[:, None].to(tl.int64) * stride_mask_m + o_n[None, :].to(tl.int64) * stride_mask_n
            m_load = (o_m[:, None] < Lq) & (o_n[None, :] < Lk)
            # [BLOCK_M, BLOCK_N]
            b_bias = tl.load(p_mask_bh + o_mask, mask=m_load, other=0.0).to(tl.float32)
            # A -inf bias hides the key (selected, so a NaN score stays out); finite biases such as
            # finfo.min are added as they are (natural units: no overflow), as the reference does.
            b_s = tl.where(b_bias == float("-inf"), float("-inf"), b_s + b_bias)
        if not NATURAL:
            b_s = b_s * 1.4426950408889634
    else:
        b_s = b_qk * (sm_scale * 1.4426950408889634)
    if APPLY_INDEX_MASK:
        m_visible = o_n[None, :] < klen
        if HAS_LENGTHS:
            m_visible = m_visible & (o_m[:, None] < qlen)
        if HAS_WINDOW_LEFT:
            m_visible = m_visible & (o_n[None, :] >= o_m[:, None] + offset - window_left)
        if HAS_WINDOW_RIGHT:
            m_visible = m_visible & (o_n[None, :] <= o_m[:, None] + offset + window_right)
        b_s = tl.where(m_visible, b_s, float("-inf"))
    if HAS_MASK and APPLY_ATTN_MASK and MASK_IS_BOOL:
        o_mask = o_m[:, None].to(tl.int64) * stride_mask_m + o_n[None, :].to(tl.int64) * stride_mask_n
        m_load = (o_m[:, None] < Lq) & (o_n[None, :] < Lk)
        b_attend = tl.load(p_mask_bh + o_mask, mask=m_load, other=0) != 0
        b_s = tl.where(b_attend, b_s, float("-inf"))
    return b_s, b_tanh


@triton.jit
def _partial_tile_mask(p_mask, p_mask_bh, p_tile_ids, i_b, i_h, i_qb, i_kb,
                       stride_tid_b, stride_tid_h, stride_tid_m, stride_tid_n,
                       PARTIAL_MASKS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The element-mask pointer for partial BlockMask tile ``(i_qb, i_kb)``: the dense mask's
    ``p_mask_bh``, or with ``PARTIAL_MASKS`` the tile's row of ``partial_masks (num_blocks, BLOCK_Q,
    BLOCK_K)``, offset so that ``base + i * BLOCK_K + j`` addresses query row ``i``, key ``j``
    (absolute positions inside the tile): the tile is read like a dense mask with strides ``(BLOCK_K, 1)``."""
    base = p_mask_bh
    if PARTIAL_MASKS:
        p_tid = p_tile_ids + i_b.to(tl.int64) * stride_tid_b + i_h.to(tl.int64) * stride_tid_h
        tid = tl.load(p_tid + i_qb * stride_tid_m + i_kb * stride_tid_n).to(tl.int64)
        base = p_mask + (tid - i_qb.to(tl.int64)) * (BLOCK_Q * BLOCK_K) - i_kb.to(tl.int64) * BLOCK_K
    return base


@triton.jit
def _key_block_range(
    m0, qlen, klen, offset, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
):
    """Key blocks a query block ``[m0, m0 + BLOCK_M)`` must visit, split by whether they need masks.

    Returns ``(n_lo, n_mid_lo, n_mid_hi, n_hi)`` (block indices): blocks in ``[n_lo, n_mid_lo)``
    and ``[n_mid_hi, n_hi)`` need the index mask, blocks in ``[n_mid_lo, n_mid_hi)`` lie wholly
    inside every valid row's window and before ``klen``. Rows ``>= qlen`` are ignored (their
    output is zeroed), so a block with no valid row visits nothing.
    """
    m_last = tl.minimum(m0 + BLOCK_M, qlen) - 1
    lo = 0
    hi = klen
    if HAS_WINDOW_LEFT:
        lo = tl.maximum(m0 + offset - window_left, 0)
    if HAS_WINDOW_RIGHT:
        hi = tl.minimum(m_last + offset + window_right + 1, klen)
    n_lo = lo // BLOCK_N
    n_hi = tl.where((hi > lo) & (m_last >= m0), (hi + BLOCK_N - 1) // BLOCK_N, n_lo)
    # Blocks needing no index mask: every key >= each valid row's left bound, <= its right bound, < klen.
    full_lo = n_lo
    full_hi = klen // BLOCK_N
    if HAS_WINDOW_LEFT:
        full_lo = (tl.maximum(m_last + offset - window_left, 0) + BLOCK_N - 1) // BLOCK_N
    if HAS_WINDOW_RIGHT:
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + offset + window_right + 1, 0) // BLOCK_N)
    n_mid_lo = tl.minimum(tl.maximum(full_lo, n_lo), n_hi)
    n_mid_hi = tl.minimum(tl.maximum(full_hi, n_mid_lo), n_hi)
    return n_lo, n_mid_lo, n_mid_hi, n_hi


@triton.jit
def _fwd_key_block(
    b_acc, b_l, b_m,  # [BLOCK_M, BLOCK_DV], [BLOCK_M], [BLOCK_M] running state
    b_q,  # [BLOCK_M, BLOCK_D]
    i_n, o_m, o_d, o_dv, k_bh, v_bh, stride_kn, stride_vn,
    i_b, i_h, Hq, Lq, Lk, D, DV,
    offset, qlen, klen, window_left, window_right, slope, sm_scale, softcap, dropout_p, seed,
    p_mask_bh, stride_mask_m, stride_mask_n, row_lo, row_hi,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    APPLY_INDEX_MASK: tl.constexpr, APPLY_ATTN_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr, NONFINITE_V: tl.constexpr = False,
    STATS_ONLY: tl.constexpr = False,
):
    """One step of the online softmax over the key block ``i_n`` (``row_lo``, ``row_hi``: the first
    and last valid query position of the tile). With ``USE_TMA``, ``k_bh`` and ``v_bh`` are tensor
    descriptors of the head's rows up to the logical length (TMA loads; rows past it read as 0).

    ``NONFINITE_V`` (the redo launch, see ``attention_fwd_kernel``) computes ``P V`` by selection:
    the product runs on V without its NaN/Inf entries, and a row that sees key ``j`` (its score is
    not -inf) gets NaN in the columns where ``V[j]`` is not finite, so a value hidden from some rows
    of the tile reaches only the others (one more matmul, of 0/1 tiles, counts the hits).

    ``STATS_ONLY`` (the backward's row statistics, see ``attention_fwd_kernel``) updates ``b_m`` and
    ``b_l`` only: no V is loaded and ``b_acc`` is returned as it came."""
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Keys at or past the logical length are never loaded (an unused KV-cache slot may hold NaN).
    m_n = o_n < klen
    if HAS_LENGTHS:
        m_n = m_n & (o_n < Lk)
    # Nor are values of keys outside every row's band: P = 0 there, and 0 * NaN would be NaN.
    m_nv = m_n
    if APPLY_INDEX_MASK and HAS_WINDOW_LEFT:
        m_nv = m_nv & (o_n >= row_lo + offset - window_left)
    if APPLY_INDEX_MASK and HAS_WINDOW_RIGHT:
        m_nv = m_nv & (o_n <= row_hi + offset + window_right)
    if USE_TMA:
        # [BLOCK_D, BLOCK_N]
        b_kt = tl.trans(k_bh.load([i_n * BLOCK_N, 0]))
        if not STATS_ONLY:
            # [BLOCK_N, BLOCK_DV]
            b_v = v_bh.load([i_n * BLOCK_N, 0])
            if APPLY_INDEX_MASK and (HAS_WINDOW_LEFT or HAS_WINDOW_RIGHT):
                b_v = tl.where(m_nv[:, None], b_v, 0.0)
    else:
        o_n64 = o_n.to(tl.int64)
        # [BLOCK_D, BLOCK_N]
        b_kt = tl.load(k_bh + (o_n64[None, :] * stride_kn + o_d[:, None]), mask=m_n[None, :] & (o_d[:, None] < D),
                       other=0.0)
        if not STATS_ONLY:
            # [BLOCK_N, BLOCK_DV]
            b_v = tl.load(v_bh + (o_n64[:, None] * stride_vn + o_dv[None, :]),
                          mask=m_nv[:, None] & (o_dv[None, :] < DV), other=0.0)
    if DOT_FP32:
        b_kt = b_kt.to(tl.float32)
        if not STATS_ONLY:
            b_v = b_v.to(tl.float32)
    # [BLOCK_M, BLOCK_N]
    b_qk = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)
    b_s, _ = _score_tile(
        b_qk=b_qk, o_m=o_m, o_n=o_n, offset=offset, qlen=qlen, klen=klen, window_left=window_left,
        window_right=window_right, slope=slope, sm_scale=sm_scale, softcap=softcap,
        p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, Lq=Lq, Lk=Lk,
        HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
        APPLY_INDEX_MASK=APPLY_INDEX_MASK, APPLY_ATTN_MASK=APPLY_ATTN_MASK,
    )
    # [BLOCK_M]
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows that have seen no key yet
    if HAS_MASK and not MASK_IS_BOOL:
        # Natural units: the difference first (exact for scores at the same magnitude), then log2(e).
        b_alpha = tl.exp2((b_m - b_m_safe) * 1.4426950408889634)
        # [BLOCK_M, BLOCK_N]
        b_p = tl.exp2((b_s - b_m_safe[:, None]) * 1.4426950408889634)
    else:
        b_alpha = tl.exp2(b_m - b_m_safe)
        # [BLOCK_M, BLOCK_N]
        b_p = tl.exp2(b_s - b_m_safe[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if not STATS_ONLY:
        if HAS_MASK and APPLY_ATTN_MASK:
            # Values of keys the mask hides from every row of the tile are selected away (0 * NaN is NaN).
            # [BLOCK_N]
            m_seen = tl.max(tl.where(b_s == float("-inf"), 0, 1), 0) > 0
            b_v = tl.where(m_seen[:, None], b_v, 0.0)
        if HAS_DROPOUT:
            b_keep = _dropout_keep(
                seed=seed, i_b=i_b, i_h=i_h, o_m=o_m, o_n=o_n, Hq=Hq, Lq=Lq, Lk=Lk, dropout_p=dropout_p,
            )
            b_p = tl.where(b_keep, b_p * (1.0 / (1.0 - dropout_p)), 0.0)
        if NONFINITE_V:
            # [BLOCK_N, BLOCK_DV] NaN/Inf entries (x - x is 0 exactly for finite x)
            m_bad = (b_v - b_v) != 0.0
            b_pv = tl.dot(b_p.to(b_v.dtype), tl.where(m_bad, 0.0, b_v), input_precision=DOT_PRECISION)
            # [BLOCK_M, BLOCK_DV] how many non-finite values of each column the row sees
            b_hits = tl.dot((b_s != float("-inf")).to(b_v.dtype), m_bad.to(b_v.dtype), input_precision=DOT_PRECISION)
            b_acc = b_acc * b_alpha[:, None] + tl.where(b_hits > 0.0, float("nan"), b_pv)
        else:
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_acc, b_l, b_m_new


# --------------------------------------------------------------------------- the kernel
@triton.jit(do_not_specialize=["Lq", "Lk", "window_left", "window_right", "seed", "TUNE_LK"])
def attention_fwd_kernel(
    # pointers
    p_q, p_k, p_v, p_out, p_lse, p_mask, p_alibi, p_klen, p_qlen,
    p_kv_num, p_kv_idx, p_full_num, p_full_idx, p_tile_ids, p_counter,
    # sizes
    Hq, GROUP, Lq, Lk, D, DV,
    # strides (the last dim of q, k, v, out is contiguous; lse is (splits, B, Hq, Lq) contiguous)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_os, stride_ob, stride_oh, stride_om,
    stride_lse_s,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_alibi_b, stride_alibi_h,
    stride_num_b, stride_num_h, stride_num_m,
    stride_idx_b, stride_idx_h, stride_idx_m,
    stride_tid_b, stride_tid_h, stride_tid_m, stride_tid_n,
    # scalars
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    TUNE_LK,  # the autotuning key's power-of-two bucket of Lk (unused by the kernel)
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GQA_PACK: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, USE_BLOCK_MASK: tl.constexpr, MASK_SUB_M: tl.constexpr, MASK_SUB_N: tl.constexpr,
    PARTIAL_MASKS: tl.constexpr, HAS_DROPOUT: tl.constexpr, COUNT_BLOCKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr, REDO_NONFINITE: tl.constexpr,
    ROW_STATS: tl.constexpr = False, LSE_PAIRS: tl.constexpr = False,
):
    """Grid ``(cdiv(rows, BLOCK_M), B * heads, splits)``: one program per block of query rows of one
    (batch, head) and one share of its key blocks.

    q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, DV)``. Head ``h`` reads kv head
    ``h // GROUP`` (GQA by index). With ``GQA_PACK == GROUP > 1`` (decoding) a program serves one
    kv head and all GROUP query heads that read it, so K and V are read once per group: row ``r``
    of the ``GROUP * Lq`` rows is query ``r // GROUP`` of head ``kv_head * GROUP + r % GROUP``, and
    the rows of a tile span at most ``SPAN_M`` query positions. With one split, out is
    ``(B, Hq, Lq, DV)`` and lse ``(B, Hq, Lq)``; with S splits, split ``s`` of the key blocks writes
    its normalised partial result to ``out[s]`` (float32) and ``lse[s]`` for ``attention_combine``
    (with ``LSE_PAIRS``, an additive mask: the rows' max and log2 sum, ``lse (S, 2, B, Hq, Lq)``).
    ``p_counter`` (with ``COUNT_BLOCKS``) receives the number of key blocks each program visited.
    ``USE_TMA`` (Hopper and later, 16-byte aligned rows, see ``use_tensor_descriptors``) moves the
    K and V tiles, and the Q and O tiles of an unpacked program, through tensor descriptors (TMA).

    ``REDO_NONFINITE`` (one split, launched after the others): a program whose rows of ``out`` hold
    no NaN/Inf does nothing; the others compute their rows again with ``P V`` by selection (see
    ``_fwd_key_block``) and overwrite them. A NaN or Inf value that some rows of a tile see reaches
    the tile's other rows in the plain ``P V`` (0 * NaN), and only then is the output non-finite;
    the hot loop of the first launch carries no check.

    ``ROW_STATS`` (the backward's, with an additive mask; one split, no packing, no dropout): ``p_lse``
    is ``stats (B, Hq, 2, Lq)`` float32, per head a row of shifts then a row of log2 normalisers,
    given as ``(lse, 0)``. A program whose rows all have ``|lse| <= LARGE_LSE`` (or a non-finite one)
    does nothing; the others compute the row max ``m`` and sum ``l`` again (no V, no ``P V``) and
    overwrite the large rows with ``(m, log2(l))``, so that the backward's ``P = exp(s - m) / l`` is
    exact where ``m + log(l)`` has lost ``log(l)`` in float32.
    """
    tl.static_assert(not (USE_BLOCK_MASK and GQA_PACK > 1), "a BlockMask's lists are per head: no GQA packing")
    # Query positions a tile's rows span: BLOCK_M, or fewer when GQA_PACK rows share a position.
    SPAN_M: tl.constexpr = (BLOCK_M - 1) // GQA_PACK + 2 - 1 // GQA_PACK
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if GQA_PACK > 1:
        Hkv = Hq // GQA_PACK
        i_b = i_bh // Hkv
        i_hk = i_bh % Hkv
        o_row = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        o_m = o_row // GQA_PACK  # [BLOCK_M] query positions
        i_h = i_hk * GQA_PACK + o_row % GQA_PACK  # [BLOCK_M] query heads
        m0 = (i_m * BLOCK_M) // GQA_PACK
    else:
        i_b = i_bh // Hq
        i_h = i_bh % Hq
        i_hk = i_h // GROUP
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m0 = i_m * BLOCK_M

    qlen = Lq
    klen = Lk
    if HAS_LENGTHS:
        qlen = tl.load(p_qlen + i_b)
        klen = tl.load(p_klen + i_b)
    offset = klen - qlen

    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < qlen
    if HAS_LENGTHS:
        m_m = m_m & (o_m < Lq)
    row_lo = m0
    row_hi = tl.max(tl.where(m_m, o_m, -1), 0)
    i_b64 = i_b.to(tl.int64)
    o_h64 = i_h.to(tl.int64)  # scalar, or [BLOCK_M] when packed
    o_m64 = o_m.to(tl.int64)
    if REDO_NONFINITE:
        # [BLOCK_M, BLOCK_DV] the rows the first launch wrote
        o_prev = i_b64 * stride_ob + o_h64 * stride_oh + o_m64 * stride_om
        b_prev = tl.load(p_out + (o_prev[:, None] + o_dv[None, :]), mask=(o_m < Lq)[:, None] & (o_dv[None, :] < DV),
                         other=0.0).to(tl.float32)
        redo = tl.max(tl.max(((b_prev - b_prev) != 0.0).to(tl.int32), 1), 0) > 0
    if ROW_STATS:
        tl.static_assert(HAS_MASK and not MASK_IS_BOOL and GQA_PACK == 1, "row statistics: additive masks only")
        p_stats = p_lse + (i_b64 * Hq + o_h64) * 2 * Lq
        # [BLOCK_M] the forward's lse
        b_given = tl.load(p_stats + o_m64, mask=m_m, other=0.0)
        m_large = (tl.abs(b_given) > LARGE_LSE) & ((b_given - b_given) == 0.0) & m_m
        redo = tl.max(m_large.to(tl.int32), 0) > 0

    k_bh = p_k + i_b64 * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_bh = p_v + i_b64 * stride_vb + i_hk.to(tl.int64) * stride_vh
    if USE_TMA:
        # The head's keys up to the logical length: the TMA unit reads rows past it (and the padded
        # head dim) as 0, so an unused KV-cache slot is never read.
        kv_rows = klen
        if HAS_LENGTHS:
            kv_rows = tl.minimum(klen, Lk)
        k_bh = _rows_desc(k_bh, kv_rows, D, stride_kn, BLOCK_N, BLOCK_D)
        v_bh = _rows_desc(v_bh, kv_rows, DV, stride_vn, BLOCK_N, BLOCK_DV)
    # Per-head values the score tile reads: scalars, or [BLOCK_M, 1] columns when packed.
    p_mask_bh = p_mask
    if HAS_MASK:
        if GQA_PACK > 1:
            p_mask_bh = p_mask + (i_b64 * stride_mask_b + o_h64 * stride_mask_h)[:, None]
        else:
            p_mask_bh = p_mask + (i_b64 * stride_mask_b + o_h64 * stride_mask_h)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(p_alibi + (i_b64 * stride_alibi_b + o_h64 * stride_alibi_h))
        if GQA_PACK > 1:
            slope = slope[:, None]
    i_h_tile = i_h
    if GQA_PACK > 1:
        i_h_tile = i_h[:, None]

    # [BLOCK_M, BLOCK_D]
    if USE_TMA and GQA_PACK == 1:
        q_rows = qlen
        if HAS_LENGTHS:
            q_rows = tl.minimum(qlen, Lq)
        b_q = _rows_desc(p_q + (i_b64 * stride_qb + o_h64 * stride_qh), q_rows, D, stride_qm, BLOCK_M, BLOCK_D).load(
            [m0, 0])
    else:
        o_q = i_b64 * stride_qb + o_h64 * stride_qh + o_m64 * stride_qm
        b_q = tl.load(p_q + (o_q[:, None] + o_d[None, :]), mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
    # [BLOCK_M, BLOCK_DV]
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # [BLOCK_M]
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if USE_BLOCK_MASK:
        # Listed tiles only: partial ones with the element mask, full ones without it. A mask block
        # may span MASK_SUB_M x MASK_SUB_N kernel tiles (when it is larger than what fits on chip).
        # Split s takes its share of the tiles, partial ones first.
        i_qb = i_m // MASK_SUB_M
        p_num = i_b * stride_num_b + i_h * stride_num_h + i_qb * stride_num_m
        p_idx = i_b * stride_idx_b + i_h * stride_idx_h + i_qb * stride_idx_m
        num_partial = tl.load(p_kv_num + p_num) * MASK_SUB_N
        num_full = tl.load(p_full_num + p_num) * MASK_SUB_N
        per_split = tl.cdiv(num_partial + num_full, num_splits)
        t_lo = tl.minimum(i_s * per_split, num_partial + num_full)
        t_hi = tl.minimum(t_lo + per_split, num_partial + num_full)
        if REDO_NONFINITE or ROW_STATS:
            t_hi = tl.where(redo, t_hi, t_lo)
        for t in range(t_lo, tl.minimum(t_hi, num_partial)):
            i_kb = tl.load(p_kv_idx + p_idx + t // MASK_SUB_N)
            i_n = i_kb * MASK_SUB_N + t % MASK_SUB_N
            p_mask_tile = _partial_tile_mask(
                p_mask=p_mask, p_mask_bh=p_mask_bh, p_tile_ids=p_tile_ids, i_b=i_b, i_h=i_h, i_qb=i_qb, i_kb=i_kb,
                stride_tid_b=stride_tid_b, stride_tid_h=stride_tid_h, stride_tid_m=stride_tid_m,
                stride_tid_n=stride_tid_n, PARTIAL_MASKS=PARTIAL_MASKS, BLOCK_Q=MASK_SUB_M * BLOCK_M,
                BLOCK_K=MASK_SUB_N * BLOCK_N,
            )
            b_acc, b_l, b_m = _fwd_key_block(
                b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh, v_bh=v_bh,
                stride_kn=stride_kn, stride_vn=stride_vn,
                i_b=i_b, i_h=i_h_tile, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen, klen=klen,
                window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
                softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_tile, stride_mask_m=stride_mask_m,
                stride_mask_n=stride_mask_n, row_lo=row_lo, row_hi=row_hi,
                BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
                HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True,
                DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, NONFINITE_V=REDO_NONFINITE,
                STATS_ONLY=ROW_STATS,
            )
        for t in range(tl.maximum(t_lo, num_partial) - num_partial, t_hi - num_partial):
            i_n = tl.load(p_full_idx + p_idx + t // MASK_SUB_N) * MASK_SUB_N + t % MASK_SUB_N
            b_acc, b_l, b_m = _fwd_key_block(
                b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh, v_bh=v_bh,
                stride_kn=stride_kn, stride_vn=stride_vn,
                i_b=i_b, i_h=i_h_tile, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen, klen=klen,
                window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
                softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m,
                stride_mask_n=stride_mask_n, row_lo=row_lo, row_hi=row_hi,
                BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
                HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=False,
                DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, NONFINITE_V=REDO_NONFINITE,
                STATS_ONLY=ROW_STATS,
            )
        visited = t_hi - t_lo
    else:
        # The visible band only: masked edge blocks, unmasked interior, masked edge blocks; split s
        # takes its share [s_lo, s_hi) of the band.
        n_lo, n_mid_lo, n_mid_hi, n_hi = _key_block_range(
            m0=m0, qlen=qlen, klen=klen, offset=offset, window_left=window_left, window_right=window_right,
            BLOCK_M=SPAN_M, BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
        )
        per_split = tl.cdiv(n_hi - n_lo, num_splits)
        s_lo = tl.minimum(n_lo + i_s * per_split, n_hi)
        s_hi = tl.minimum(s_lo + per_split, n_hi)
        if REDO_NONFINITE or ROW_STATS:
            s_hi = tl.where(redo, s_hi, s_lo)
        if HAS_WINDOW_LEFT:  # without a left bound the band starts unmasked (n_mid_lo == n_lo)
            for i_n in range(s_lo, tl.minimum(n_mid_lo, s_hi)):
                b_acc, b_l, b_m = _fwd_key_block(
                    b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh, v_bh=v_bh,
                    stride_kn=stride_kn, stride_vn=stride_vn,
                    i_b=i_b, i_h=i_h_tile, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen, klen=klen,
                    window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
                    softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m,
                    stride_mask_n=stride_mask_n, row_lo=row_lo, row_hi=row_hi,
                    BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
                    HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                    HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True,
                    DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, NONFINITE_V=REDO_NONFINITE,
                    STATS_ONLY=ROW_STATS,
                )
        for i_n in range(tl.maximum(n_mid_lo, s_lo), tl.minimum(n_mid_hi, s_hi)):
            b_acc, b_l, b_m = _fwd_key_block(
                b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh, v_bh=v_bh,
                stride_kn=stride_kn, stride_vn=stride_vn,
                i_b=i_b, i_h=i_h_tile, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen, klen=klen,
                window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
                softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m,
                stride_mask_n=stride_mask_n, row_lo=row_lo, row_hi=row_hi,
                BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
                HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=False, APPLY_ATTN_MASK=True,
                DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, NONFINITE_V=REDO_NONFINITE,
                STATS_ONLY=ROW_STATS,
            )
        for i_n in range(tl.maximum(n_mid_hi, s_lo), s_hi):
            b_acc, b_l, b_m = _fwd_key_block(
                b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh, v_bh=v_bh,
                stride_kn=stride_kn, stride_vn=stride_vn,
                i_b=i_b, i_h=i_h_tile, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen, klen=klen,
                window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
                softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m,
                stride_mask_n=stride_mask_n, row_lo=row_lo, row_hi=row_hi,
                BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
                HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True,
                DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, NONFINITE_V=REDO_NONFINITE,
                STATS_ONLY=ROW_STATS,
            )
        visited = s_hi - s_lo

    if COUNT_BLOCKS:
        tl.store(p_counter + (i_s * tl.num_programs(1) + i_bh) * tl.num_programs(0) + i_m, visited)

    # Rows that saw no key (or lie past qlen) output 0 and lse = -inf; a row with a NaN sum (a NaN or
    # Inf score it sees) is NaN, as in torch.
    m_row = ((b_l > 0.0) | (b_l != b_l)) & m_m
    # [BLOCK_M, BLOCK_DV]
    b_out = b_acc / tl.where(m_row, b_l, 1.0)[:, None]
    b_out = tl.where(m_row[:, None], b_out, 0.0)
    # [BLOCK_M]
    if HAS_MASK and not MASK_IS_BOOL:  # natural units
        b_lse = tl.where(m_row, b_m + tl.log2(tl.where(m_row, b_l, 1.0)) * 0.6931471805599453, float("-inf"))
    else:
        b_lse = tl.where(m_row, (b_m + tl.log2(tl.where(m_row, b_l, 1.0))) * 0.6931471805599453, float("-inf"))
    if ROW_STATS:
        # Rows with a large lse saw a key: l >= 1.
        tl.store(p_stats + o_m64, b_m, mask=m_large)
        tl.store(p_stats + Lq + o_m64, tl.log2(b_l), mask=m_large)
    else:
        m_store = o_m < Lq
        if REDO_NONFINITE:
            m_store = m_store & redo
        if USE_TMA and GQA_PACK == 1 and not REDO_NONFINITE:
            p_out_bh = p_out + (i_s.to(tl.int64) * stride_os + i_b64 * stride_ob + o_h64 * stride_oh)
            _rows_desc(p_out_bh, Lq, DV, stride_om, BLOCK_M, BLOCK_DV).store([m0, 0], b_out.to(p_out.dtype.element_ty))
        else:
            o_out = i_s.to(tl.int64) * stride_os + i_b64 * stride_ob + o_h64 * stride_oh + o_m64 * stride_om
            tl.store(p_out + (o_out[:, None] + o_dv[None, :]), b_out.to(p_out.dtype.element_ty),
                     mask=m_store[:, None] & (o_dv[None, :] < DV))
        o_lse = i_s.to(tl.int64) * stride_lse_s + (i_b64 * Hq + o_h64) * Lq + o_m64
        if LSE_PAIRS:  # (max, log2 sum) for attention_combine: lse would round log(l) away
            tl.store(p_lse + o_lse, tl.where(m_row, b_m, b_lse), mask=m_store)
            tl.store(p_lse + (o_lse + stride_lse_s // 2), tl.log2(b_l), mask=m_store)
        else:
            tl.store(p_lse + o_lse, b_lse, mask=m_store)


attention_fwd_kernel_tuned = configs.autotune("fwd", configs.FWD_KEY)(attention_fwd_kernel)


@triton.jit(do_not_specialize=["Lq", "Lk", "seed"])
def dropout_keep_kernel(
    # pointers
    p_keep,
    # sizes
    Hq, Lq, Lk,
    # scalars
    dropout_p, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), B * Hq)``: writes the keep pattern ``(B, Hq, Lq, Lk)`` (contiguous bool)."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for n0 in range(0, Lk, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        # [BLOCK_M, BLOCK_N]
        b_keep = _dropout_keep(
            seed=seed, i_b=i_b, i_h=i_h, o_m=o_m, o_n=o_n, Hq=Hq, Lq=Lq, Lk=Lk, dropout_p=dropout_p,
        )
        p_tile = p_keep + ((i_bh.to(tl.int64) * Lq + o_m[:, None]) * Lk + o_n[None, :])
        tl.store(p_tile, b_keep.to(tl.int1), mask=(o_m[:, None] < Lq) & (o_n[None, :] < Lk))


# --------------------------------------------------------------------------- launcher helpers
def head_dim_tile(d: int) -> int:
    """The head dim padded to a power of two (>= 16, tl.dot's minimum); the kernel masks the padding."""
    return max(16, triton.next_power_of_2(d))


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels index the last dim with unit stride (vectorised loads); other layouts are copied once.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _tma_device(device: torch.device) -> bool:
    """Whether tiles can move through tensor descriptors on ``device``: a CUDA GPU with a TMA unit
    (Hopper, sm_90, and later), or the interpreter (which emulates them)."""
    if configs.in_interpreter():
        return True
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # Global memory for the tensor descriptors a kernel builds (128 bytes per descriptor and program).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_tensor_descriptors(*tensors: torch.Tensor) -> bool:
    """The kernels' ``USE_TMA``: tiles of ``tensors`` (each ``(B, H, L, D)``) move through tensor
    descriptors (TMA) when the device has them and every row is 16-byte aligned (unit last stride;
    the other strides and the start a multiple of 16 bytes); else pointer loads. ``FASTATTN_TRITON_TMA=0``
    turns them off. Sets Triton's scratch allocator (for the descriptors) when none is set."""
    if os.environ.get("FASTATTN_TRITON_TMA", "1") == "0" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not _tma_device(tensors[0].device):
        return False
    for t in tensors:
        per_16 = 16 // t.element_size()
        if t.stride(-1) != 1 or t.storage_offset() % per_16 or any(s % per_16 for s in t.stride()[:-1]):
            return False
        try:
            misaligned = t.data_ptr() % 16
        except (RuntimeError, NotImplementedError):  # a fake tensor (torch.compile tracing): no address
            misaligned = 0
        if misaligned:
            return False
    if not configs.in_interpreter():
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_scratch)
    return True


def clamp_window(w: int | None, bound: int) -> int:
    """Windows wider than the sequences change nothing; clamping keeps them in int32."""
    return 0 if w is None else max(-bound, min(bound, int(w)))


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """``(DOT_PRECISION, DOT_FP32)`` for q's dtype.

    Plain tf32 would break the tolerance rule for float32 inputs. On a GPU they use 3xTF32 (three
    tensor-core products, float32-level error; an IEEE FMA dot compiles for minutes and runs far
    slower); the interpreter computes exact IEEE dots. The interpreter has no bf16 dot, so tiles
    are cast to fp32 there.
    """
    if dtype == torch.float32:
        precision = "ieee" if configs.in_interpreter() else "tf32x3"
    else:
        precision = "tf32"  # ignored for 16-bit inputs
    return precision, configs.in_interpreter() and dtype == torch.bfloat16


def element_mask_args(attn_mask, partial_masks, partial_tile_ids, block_size_k: int) -> dict:
    """Kernel arguments of the element mask: a dense ``attn_mask``, or a BlockMask's per-tile masks
    (``partial_masks`` read through ``partial_tile_ids``, see ``_partial_tile_mask``), or none."""
    if partial_masks is None:
        strides = mask_strides(attn_mask)
        return dict(
            p_mask=attn_mask, p_tile_ids=None, PARTIAL_MASKS=False,
            stride_mask_b=strides[0], stride_mask_h=strides[1], stride_mask_m=strides[2], stride_mask_n=strides[3],
            stride_tid_b=0, stride_tid_h=0, stride_tid_m=0, stride_tid_n=0,
        )
    if attn_mask is not None:
        raise ValueError("give attn_mask or partial_masks, not both")
    if partial_tile_ids is None or partial_tile_ids.dim() != 4:
        raise ValueError("partial_masks needs partial_tile_ids, int32 (B|1, H|1, nQB, nKB)")
    partial_masks = partial_masks.contiguous()
    tid = broadcast_strides(partial_tile_ids, 4)
    return dict(
        p_mask=partial_masks, p_tile_ids=partial_tile_ids, PARTIAL_MASKS=True,
        stride_mask_b=0, stride_mask_h=0, stride_mask_m=block_size_k, stride_mask_n=1,
        stride_tid_b=tid[0], stride_tid_h=tid[1], stride_tid_m=tid[2], stride_tid_n=tid[3],
    )


def feature_flags(attn_mask, alibi_slopes, lengths, window_left, window_right, softcap, dropout_p) -> dict:
    """The constexpr feature flags shared by the forward and backward kernels (``attn_mask``: the
    element mask the kernels read, a dense mask or ``partial_masks``)."""
    return {
        "HAS_WINDOW_LEFT": window_left is not None,
        "HAS_WINDOW_RIGHT": window_right is not None,
        "HAS_ALIBI": alibi_slopes is not None,
        "HAS_SOFTCAP": softcap > 0,
        "HAS_MASK": attn_mask is not None,
        "MASK_IS_BOOL": attn_mask is not None and attn_mask.dtype == torch.bool,
        "HAS_LENGTHS": lengths is not None,
        "HAS_DROPOUT": dropout_p > 0,
    }


def both_lengths(key_lengths, query_lengths, B: int, Lq: int, Lk: int, device) -> tuple | None:
    """Both length vectors (int32 ``(B,)``) when either is given, else None."""
    if key_lengths is None and query_lengths is None:
        return None
    if key_lengths is None:
        key_lengths = torch.full((B,), Lk, dtype=torch.int32, device=device)
    if query_lengths is None:
        query_lengths = torch.full((B,), Lq, dtype=torch.int32, device=device)
    return key_lengths.to(torch.int32), query_lengths.to(torch.int32)


BLOCK_MASK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 256


def check_inputs(q, k, v, block_size_q: int, block_size_k: int, use_block_mask: bool) -> None:
    """What the kernels need beyond the public validation: one dtype and device, head dims the
    tiles cover, and BlockMask blocks that can be kernel tiles."""
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got q {q.shape[-1]} and v {v.shape[-1]}")
    if use_block_mask and (block_size_q not in BLOCK_MASK_SIZES or block_size_k not in BLOCK_MASK_SIZES):
        raise ValueError(
            f"block_size_q and block_size_k must be in {BLOCK_MASK_SIZES} (they are the kernel tiles), "
            f"got {(block_size_q, block_size_k)}"
        )


def mask_strides(attn_mask) -> tuple[int, int, int, int]:
    return tuple(attn_mask.stride()) if attn_mask is not None else (0, 0, 0, 0)


def broadcast_strides(t: torch.Tensor, ndim: int) -> tuple[int, ...]:
    """The strides of ``t``'s first ``ndim`` dims, 0 on a size-1 (broadcast) dim."""
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in range(ndim))


def list_strides(num, idx) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Strides of block-list counts ``(B|1, H|1, n)`` and indices ``(B|1, H|1, n, m)``; 0 on a broadcast dim."""
    if num is None:
        return (0, 0, 0), (0, 0, 0)
    return broadcast_strides(num, 3), broadcast_strides(idx, 3)


# --------------------------------------------------------------------------- split-KV and decoding
DECODE_MAX_LQ = 16  # query rows per head up to which a launch is decoding (or speculative verification)
MIN_BLOCKS_PER_SPLIT = 4  # a split's fixed cost (q load, partial write, merge) needs this much work
MAX_SPLITS = 128


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 0 off a CUDA GPU (nothing to fill: never split there)."""
    if device.type != "cuda":
        return 0
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(programs: int, key_blocks: int, sms: int) -> int:
    """Key-range splits that fill the GPU: about ``2 * sms`` programs in all, each split with at least
    ``MIN_BLOCKS_PER_SPLIT`` key blocks; 1 when ``programs`` already fill it."""
    if programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), key_blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))


def decode_tile(meta: dict, rows: int) -> dict:
    """The forward config for few query rows per program: ``BLOCK_M`` shrinks to the rows (at least
    16, tl.dot's minimum), and small tiles keep 4 warps."""
    meta = dict(meta)
    meta["BLOCK_M"] = min(meta["BLOCK_M"], max(16, triton.next_power_of_2(rows)))
    if meta["BLOCK_M"] < 64:
        meta["num_warps"] = min(meta["num_warps"], 4)
    return meta


def softcap_flag(softcap: float, dtype: torch.dtype) -> int:
    """The kernels' ``HAS_SOFTCAP``: 0 without softcap; ``SOFTCAP_HW_TANH`` (one MUFU tanh per score,
    relative error 2**-11) for 16-bit inputs on a GPU, whose own rounding is coarser;
    ``SOFTCAP_EXACT`` for float32 inputs and in the interpreter."""
    if softcap <= 0:
        return 0
    if dtype in (torch.float16, torch.bfloat16) and not configs.in_interpreter():
        return SOFTCAP_HW_TANH.value
    return SOFTCAP_EXACT.value


def empty_output(q: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """An empty ``out (B, Hq, Lq, Dv)`` in q's memory layout: ``(B, L, H, Dv)`` memory when q is a
    transposed ``(B, L, H, D)`` view (its caller can transpose back for free), else contiguous. The
    same rule as ``fastattn.ops.output_like_q`` (the op's fake) and ``csrc/cpu/attention_ops.cpp``."""
    B, Hq, Lq, _ = q.shape
    if Hq > 1 and Lq > 1 and q.stride(1) < q.stride(2):
        return q.new_empty((B, Lq, Hq, head_dim_v)).transpose(1, 2)
    return q.new_empty((B, Hq, Lq, head_dim_v))


class MaskArgs(NamedTuple):
    """What a call lets each query row see, and how its scores are shaped: the mask, lengths,
    BlockMask, window and softcap arguments of :func:`attention_fwd`, :func:`attention_row_stats` and
    ``attention_bwd``, built once per call (``fastattn/backends/triton.py``).

    Attributes:
        attn_mask: bool or float ``(B, Hq, Lq, Lk)`` (zero strides allowed), or None.
        alibi_slopes: float32 ``(B, Hq)``, or None.
        key_lengths, query_lengths: int32 ``(B,)``, or None.
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices: the BlockMask's lists per query
            block (forward and dQ), or None.
        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices: its transposed lists per key block
            (dK/dV; the forward ignores them), or None.
        partial_masks, partial_tile_ids: the BlockMask's per-tile element masks (instead of attn_mask).
        block_size_q, block_size_k: the BlockMask's tiles (powers of two in [16, 128]); 0 without one.
        window_left, window_right: the band around the bottom-right diagonal; None is unbounded.
        softcap: ``softcap * tanh(s / softcap)`` on the scores when > 0.
    """

    attn_mask: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    key_lengths: torch.Tensor | None = None
    query_lengths: torch.Tensor | None = None
    kv_num_blocks: torch.Tensor | None = None
    kv_indices: torch.Tensor | None = None
    full_kv_num_blocks: torch.Tensor | None = None
    full_kv_indices: torch.Tensor | None = None
    q_num_blocks: torch.Tensor | None = None
    q_indices: torch.Tensor | None = None
    full_q_num_blocks: torch.Tensor | None = None
    full_q_indices: torch.Tensor | None = None
    partial_masks: torch.Tensor | None = None
    partial_tile_ids: torch.Tensor | None = None
    block_size_q: int = 0
    block_size_k: int = 0
    window_left: int | None = None
    window_right: int | None = None
    softcap: float = 0.0

    @property
    def use_block_mask(self) -> bool:
        return self.kv_num_blocks is not None


NO_MASKS = MaskArgs()  # a call that sees every key


def _kernel_args(
    q, k, v, masks: MaskArgs, scale, dropout_p, seed, block_counter, out,
) -> tuple[dict, dict]:
    """The forward kernel's arguments but for its output and tiles, and its feature flags (arguments
    as :func:`attention_fwd`; ``out`` only decides ``USE_TMA``, None when nothing is written)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    alibi_slopes, window_left, window_right, softcap = masks.alibi_slopes, masks.window_left, masks.window_right, masks.softcap
    kv_num_blocks, kv_indices = masks.kv_num_blocks, masks.kv_indices
    lengths = both_lengths(masks.key_lengths, masks.query_lengths, B, Lq, Lk, q.device)
    element = element_mask_args(masks.attn_mask, masks.partial_masks, masks.partial_tile_ids, masks.block_size_k)
    flags = feature_flags(element["p_mask"], alibi_slopes, lengths, window_left, window_right, softcap, dropout_p)
    flags["HAS_SOFTCAP"] = softcap_flag(softcap, q.dtype)
    flags["USE_TMA"] = use_tensor_descriptors(q, k, v, *([out] if out is not None else []))
    precision, dot_fp32 = dot_settings(q.dtype)
    bound = Lq + Lk + 1
    num_strides, idx_strides = list_strides(kv_num_blocks, kv_indices)
    args = dict(
        p_q=q, p_k=k, p_v=v, p_alibi=alibi_slopes,
        p_klen=lengths[0] if lengths else None, p_qlen=lengths[1] if lengths else None,
        p_kv_num=kv_num_blocks, p_kv_idx=kv_indices, p_full_num=masks.full_kv_num_blocks,
        p_full_idx=masks.full_kv_indices, p_counter=block_counter,
        Hq=Hq, GROUP=Hq // Hkv, Lq=Lq, Lk=Lk, D=D, DV=DV,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        **element,
        stride_alibi_b=alibi_slopes.stride(0) if alibi_slopes is not None else 0,
        stride_alibi_h=alibi_slopes.stride(1) if alibi_slopes is not None else 0,
        stride_num_b=num_strides[0], stride_num_h=num_strides[1], stride_num_m=num_strides[2],
        stride_idx_b=idx_strides[0], stride_idx_h=idx_strides[1], stride_idx_m=idx_strides[2],
        sm_scale=float(scale), softcap=float(softcap),
        window_left=clamp_window(window_left, bound), window_right=clamp_window(window_right, bound),
        dropout_p=float(dropout_p), seed=int(seed), TUNE_LK=configs.tune_bucket(Lk),
        BLOCK_D=head_dim_tile(D), BLOCK_DV=head_dim_tile(DV), **flags, USE_BLOCK_MASK=kv_num_blocks is not None,
        COUNT_BLOCKS=block_counter is not None, DOT_PRECISION=precision, DOT_FP32=dot_fp32,
    )
    return args, flags


# --------------------------------------------------------------------------- launcher
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: MaskArgs = NO_MASKS,
    *,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    block_counter: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (and, with key-range splits, the combine kernel).

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, DV)``; any strides.
        masks: the call's masks, lengths, BlockMask, window and softcap (:class:`MaskArgs`).
        scale: the scores' scale. dropout_p, seed: dropout on the probabilities and its pattern's seed.
        block_counter: optional int32 buffer, one entry per program (``splits * B * heads *
            row_blocks``), that receives the number of key blocks each program visits (pins the
            untuned config; for tests).
        num_splits: key-range splits (split-KV); None chooses from the grid size and the GPU's SMs
            (more than 1 only when the grid would underfill it).

    Returns:
        ``out (B, Hq, Lq, DV)`` in q's dtype and dim order, and ``lse (B, Hq, Lq)`` float32.
    """
    check_inputs(q, k, v, masks.block_size_q, masks.block_size_k, masks.use_block_mask)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be at least 1 (or None to choose), got {num_splits}")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    out = empty_output(q, DV)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if B * Hq * Lq == 0:
        return out, lse
    args, flags = _kernel_args(q, k, v, masks, scale, dropout_p, seed, block_counter, out)
    use_block_mask, block_size_q, block_size_k = masks.use_block_mask, masks.block_size_q, masks.block_size_k
    block_d, block_dv = head_dim_tile(D), head_dim_tile(DV)
    final = dict(
        p_out=out, p_lse=lse, stride_os=0, stride_ob=out.stride(0), stride_oh=out.stride(1),
        stride_om=out.stride(2), stride_lse_s=0,
    )

    # Decoding: a few query rows per head. The tile shrinks to them and, with GQA, one program
    # serves a whole group of query heads so K and V are read once per group (not with a BlockMask,
    # whose lists are per head).
    decoding = Lq <= DECODE_MAX_LQ and not use_block_mask
    pack = Hq // Hkv if decoding else 1
    sub_m = sub_n = 1
    head_dim = max(block_d, block_dv)
    if use_block_mask:
        meta = configs.block_mask_config("fwd", head_dim, block_size_q, block_size_k, q.element_size(), flags)
        sub_m, sub_n = block_size_q // meta["BLOCK_M"], block_size_k // meta["BLOCK_N"]
    else:
        meta = configs.pinned_config("fwd", head_dim, q.element_size(), flags)
        if decoding:
            meta = decode_tile(meta, Lq * pack)
    rows, heads = Lq * pack, Hq // pack
    programs = triton.cdiv(rows, meta["BLOCK_M"]) * B * heads
    splits = num_splits or choose_num_splits(programs, triton.cdiv(Lk, meta["BLOCK_N"]), sm_count(q.device))

    grid = (triton.cdiv(rows, meta["BLOCK_M"]), B * heads, splits)
    if (splits == 1 and not use_block_mask and not decoding and block_counter is None
            and configs.autotune_enabled(head_dim, q.element_size())):
        tuned_grid = lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * Hq, 1)
        torch.library.wrap_triton(attention_fwd_kernel_tuned)[tuned_grid](
            **args, **final, GQA_PACK=1, MASK_SUB_M=1, MASK_SUB_N=1, REDO_NONFINITE=False,
        )
    elif splits == 1:
        torch.library.wrap_triton(attention_fwd_kernel)[grid](
            **args, **final, **meta, GQA_PACK=pack, MASK_SUB_M=sub_m, MASK_SUB_N=sub_n, REDO_NONFINITE=False,
        )
    else:
        # Each split writes its partial result (float32) and lse; the combine kernel merges them.
        out_part = torch.empty((splits, B, Hq, Lq, DV), dtype=torch.float32, device=q.device)
        # With an additive mask each split gives its rows' (max, log2 sum) (attention_combine's PAIRS).
        pairs = flags["HAS_MASK"] and not flags["MASK_IS_BOOL"]
        lse_part = torch.empty((splits, *((2,) if pairs else ()), B, Hq, Lq), dtype=torch.float32, device=q.device)
        partial = dict(
            p_out=out_part, p_lse=lse_part, stride_os=out_part.stride(0), stride_ob=out_part.stride(1),
            stride_oh=out_part.stride(2), stride_om=out_part.stride(3), stride_lse_s=lse_part.stride(0),
        )
        torch.library.wrap_triton(attention_fwd_kernel)[grid](
            **args, **partial, **meta, GQA_PACK=pack, MASK_SUB_M=sub_m, MASK_SUB_N=sub_n, REDO_NONFINITE=False,
            LSE_PAIRS=pairs,
        )
        attention_combine(out_part, lse_part, out, lse)
    # Rows whose output holds NaN/Inf are computed again with P V by selection (the kernel's
    # REDO_NONFINITE): a value hidden from them may have reached them as 0 * NaN. Others exit at once.
    redo = dict(args, p_counter=None, COUNT_BLOCKS=False)
    torch.library.wrap_triton(attention_fwd_kernel)[grid[:2] + (1,)](
        **redo, **final, **meta, GQA_PACK=pack, MASK_SUB_M=sub_m, MASK_SUB_N=sub_n, REDO_NONFINITE=True,
    )
    return out, lse


def attention_row_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    masks: MaskArgs,
    *,
    scale: float,
) -> torch.Tensor:
    """The backward's row statistics for a call with an additive mask (the kernel's ``ROW_STATS``).

    Args: as :func:`attention_fwd` (``masks.attn_mask`` or ``masks.partial_masks`` additive, no dropout),
    plus the forward's ``lse (B, Hq, Lq)`` float32.

    Returns:
        ``stats (B, Hq, 2, Lq)`` float32: per row a shift ``c`` and a log2 normaliser ``g`` with
        ``P = exp(s - c) / 2**g``: ``(lse, 0)``, or ``(m, log2(l))`` recomputed where ``|lse| > LARGE_LSE``.
    """
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    stats = torch.stack((lse, torch.zeros_like(lse)), dim=2)
    if B * Hq * Lq * k.shape[2] == 0:
        return stats
    args, flags = _kernel_args(q, k, v, masks, scale, 0.0, 0, None, None)
    head_dim = max(head_dim_tile(D), head_dim_tile(v.shape[3]))
    sub_m = sub_n = 1
    if masks.use_block_mask:
        bq, bk = masks.block_size_q, masks.block_size_k
        meta = configs.block_mask_config("fwd", head_dim, bq, bk, q.element_size(), flags)
        sub_m, sub_n = bq // meta["BLOCK_M"], bk // meta["BLOCK_N"]
    else:
        meta = configs.pinned_config("fwd", head_dim, q.element_size(), flags)
    torch.library.wrap_triton(attention_fwd_kernel)[(triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq, 1)](
        **args, p_out=None, p_lse=stats, stride_os=0, stride_ob=0, stride_oh=0, stride_om=0, stride_lse_s=0,
        **meta, GQA_PACK=1, MASK_SUB_M=sub_m, MASK_SUB_N=sub_n, REDO_NONFINITE=False, ROW_STATS=True,
    )
    return stats


def fwd_tiles(q: torch.Tensor, v: torch.Tensor, flags: dict | None = None) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the untuned forward without a BlockMask (to size a ``block_counter``),
    for a launch with the feature flags ``flags`` (``feature_flags``; None: no features)."""
    head_dim = max(head_dim_tile(q.shape[-1]), head_dim_tile(v.shape[-1]))
    meta = configs.pinned_config("fwd", head_dim, q.element_size(), flags)
    return meta["BLOCK_M"], meta["BLOCK_N"]


def dropout_keep_mask(B: int, Hq: int, Lq: int, Lk: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The dropout keep pattern (bool ``(B, Hq, Lq, Lk)``, True = keep) the kernels apply for ``seed``."""
    keep = torch.empty((B, Hq, Lq, Lk), dtype=torch.bool, device=device)
    if keep.numel() == 0:
        return keep
    block = 16 if configs.in_interpreter() else 64
    grid = (triton.cdiv(Lq, block), B * Hq)
    torch.library.wrap_triton(dropout_keep_kernel)[grid](
        p_keep=keep, Hq=Hq, Lq=Lq, Lk=Lk, dropout_p=float(dropout_p), seed=int(seed), BLOCK_M=block, BLOCK_N=block,
    )
    return keep
