"""Fused attention backward (FlashAttention-2 style, deterministic: no atomics).

Three kernels, read top to bottom:

1. preprocess: ``delta = rowsum(dO * O)`` per query row (float32), then for 16-bit inputs the dQ
   kernel's delta pass (``DELTA_PASS``) replaces it by the float32 ``rowsum(P * dP)``;
2. dK/dV: one program per key block of one kv head; it loops over the query heads of the GQA group
   and the query blocks that see the key block, and writes dk, dv once (and dbias tiles). Its tiles
   are transposed, keys on the M dimension of every matmul (``S^T = K Q^T``), so ``P^T`` and
   ``dS^T`` feed ``dV`` and ``dK`` without a transpose;
3. dQ: one program per query block of one query head (queries on M); it loops over the visible key blocks.

Both kernels issue their two independent matmuls (``S`` and ``dP``) back to back before the
elementwise work. Row offsets are int64. What a row cannot see never reaches a gradient: keys and
queries outside the lengths or the band of a tile load as zeros, and ``dS`` is selected (not
multiplied) to 0 where ``P`` is 0, so NaN or Inf there stays out; a non-finite key that other rows
of the tile see reaches a row's dq only as ``0 * NaN`` in ``dS K``, and a second dQ launch
(``REDO_NONFINITE``) recomputes exactly the row blocks whose dq is non-finite, by selection. For
16-bit inputs a first dQ launch (``DELTA_PASS``) takes ``delta`` in float32 from ``P * dP``.
Tile configs: ``configs.py``.

Per tile the math is (``P`` recomputed from the saved ``lse``)::

    P  = exp(S - lse)              dV += (P * keep / (1 - p))^T dO
    dP = dO V^T * keep / (1 - p)   dS  = P * (dP - delta)          (= dbias)
    dX = dS * (1 - tanh(X / softcap)^2)                             (dX = dS without softcap)
    dQ += scale * dX K             dK += scale * dX^T Q

With an additive mask, ``P = exp(S - m) / l`` with the row's max and sum recomputed where ``|lse|``
is too large for float32 to keep ``log(l)`` in ``lse = m + log(l)`` (a row masked entirely at
``finfo.min`` or -1e9): ``attention_row_stats`` (the forward kernel without V) runs first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .attention_fwd import (
    NO_MASKS,
    MaskArgs,
    _dropout_keep,
    _key_block_range,
    _partial_tile_mask,
    _rows_desc,
    _score_tile,
    attention_row_stats,
    both_lengths,
    check_inputs,
    clamp_window,
    dot_settings,
    element_mask_args,
    feature_flags,
    head_dim_tile,
    last_dim_contiguous,
    list_strides,
    softcap_flag,
    use_tensor_descriptors,
)


# --------------------------------------------------------------------------- preprocess
@triton.jit(do_not_specialize=["Lq"])
def attention_bwd_preprocess_kernel(
    # pointers
    p_out, p_dout, p_delta, p_tol,
    # sizes
    Hq, Lq, DV,
    # strides
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    # scalars: the unit roundoff of out's dtype and half its smallest subnormal
    eps, tiny,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ROUNDED_OUT: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), B * Hq)``: ``delta (B, Hq, Lq)`` float32 = rowsum(dO * O).

    With ``ROUNDED_OUT`` (16-bit out) also ``tol (B, Hq, Lq)`` = eps * rowsum(|dO| * (|O| + tiny)): the
    most by which rowsum(dO * X) can differ from delta when out is X rounded to its dtype (twice the
    bound of one rounding: the float32 sums and the forward's own roundings fit in the other half).
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_dv = tl.arange(0, BLOCK_DV)
    m_tile = (o_m[:, None] < Lq) & (o_dv[None, :] < DV)
    p_o = p_out + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + o_m[:, None].to(tl.int64) * stride_om + o_dv[None, :]
    p_do = p_dout + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh + o_m[:, None].to(tl.int64) * stride_dom + o_dv[None, :]
    # [BLOCK_M, BLOCK_DV]
    b_o = tl.load(p_o, mask=m_tile, other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=m_tile, other=0.0).to(tl.float32)
    # [BLOCK_M]
    b_delta = tl.sum(b_o * b_do, 1)
    tl.store(p_delta + i_bh.to(tl.int64) * Lq + o_m, b_delta, mask=o_m < Lq)
    if ROUNDED_OUT:
        b_tol = eps * tl.sum(tl.abs(b_do) * (tl.abs(b_o) + tiny), 1)
        tl.store(p_tol + i_bh.to(tl.int64) * Lq + o_m, b_tol, mask=o_m < Lq)


# --------------------------------------------------------------------------- shared tile math
@triton.jit
def _load_row_stats(p_lse_bh, p_delta_bh, o_m, Lq, NATURAL: tl.constexpr = False):
    """The rows' softmax shift (+inf where a row sees nothing or lies past Lq, so P = 0 there) and
    ``delta``: ``P = exp2(s - shift)`` with ``shift = lse`` in log2 units. With ``NATURAL`` (an additive
    mask), ``p_lse_bh`` holds ``attention_row_stats``'s rows, natural-unit shifts then log2 normalisers
    (``_load_row_norms``), and the kernels take ``P' = exp2((s - shift) * log2(e))``, which is
    ``P * 2^norm``: the launcher scales dO (so dP and delta) by ``2^-norm`` per row, and every product
    (``P' dO'``, ``P' (dP' - delta')``) is the true one. ``norm`` is 0 but in recomputed rows."""
    m_m = o_m < Lq
    # [BLOCK_M]
    b_lse = tl.load(p_lse_bh + o_m, mask=m_m, other=float("-inf"))
    if NATURAL:
        b_shift = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    else:
        b_shift = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(p_delta_bh + o_m, mask=m_m, other=0.0)
    return b_shift, b_delta


@triton.jit
def _load_row_norms(p_lse_bh, o_m, Lq):
    """``[BLOCK_M]`` log2 normalisers of ``attention_row_stats``'s rows at ``p_lse_bh`` (see ``_load_row_stats``)."""
    return tl.load(p_lse_bh + Lq + o_m, mask=o_m < Lq, other=0.0)


@triton.jit
def _grad_scores(
    b_s, b_tanh, b_dp,  # scores (-inf where not visible, units as _score_tile), tanh(x / softcap), dO V^T; one tile
    b_shift, b_delta,  # row statistics (_load_row_stats), broadcast against the tile ([BLOCK, 1] or [1, BLOCK])
    b_keep, dropout_p,  # the tile's dropout keep pattern (unused without HAS_DROPOUT)
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, NATURAL: tl.constexpr,
):
    """Elementwise part of one backward tile; returns ``(P_dropped, dS, dX)``, float32, the tile's shape.

    Works on a tile in either orientation (queries on rows in the dQ kernel, keys on rows in the
    dK/dV kernel). Where ``P == 0`` (not visible, or a row that sees nothing) ``dS`` and ``dX`` are
    selected to 0, never multiplied by 0, so a NaN or Inf that a row cannot see stays out of it.
    """
    if NATURAL:
        b_p = tl.exp2((b_s - b_shift) * 1.4426950408889634)
    else:
        b_p = tl.exp2(b_s - b_shift)
    b_p_dropped = b_p
    if HAS_DROPOUT:
        b_p_dropped = tl.where(b_keep, b_p * (1.0 / (1.0 - dropout_p)), 0.0)
        b_dp = tl.where(b_keep, b_dp * (1.0 / (1.0 - dropout_p)), 0.0)
    b_seen = b_p != 0.0
    b_ds = tl.where(b_seen, b_p * (b_dp - b_delta), 0.0)
    b_dx = b_ds
    if HAS_SOFTCAP:
        b_dx = tl.where(b_seen, b_ds * (1.0 - b_tanh * b_tanh), 0.0)
    return b_p_dropped, b_ds, b_dx


@triton.jit
def _band_rows(
    n0, n_end, qlen, offset, window_left, window_right,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
):
    """Query rows ``[lo, hi)`` that see some key of ``[n0, n_end)`` (``n_end`` already cut at klen).

    Query ``i`` sees key ``j`` iff ``j - offset - right <= i <= j - offset + left``. Called with the
    roles swapped (``offset -> -offset``, ``left <-> right``, ``qlen -> klen``) it gives the keys a
    query block sees.
    """
    lo = 0
    hi = qlen
    if HAS_WINDOW_RIGHT:
        lo = tl.maximum(n0 - offset - window_right, 0)
    if HAS_WINDOW_LEFT:
        hi = tl.minimum(n_end - offset + window_left, qlen)
    hi = tl.where(n_end > n0, hi, lo)
    return lo, tl.maximum(hi, lo)


# --------------------------------------------------------------------------- dK / dV
@triton.jit
def _query_block_range(
    n0, qlen, klen, offset, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
):
    """Query blocks that see a key block ``[n0, n0 + BLOCK_N)``, split by whether they need masks.

    Returns ``(m_lo, m_mid_lo, m_mid_hi, m_hi, row_lo, row_hi)``: blocks in ``[m_mid_lo, m_mid_hi)``
    see every key of the block (which lies wholly before ``klen``) and need no index mask; rows
    outside ``[row_lo, row_hi)`` see no key of the block. Rows past ``qlen`` need no mask either:
    they are loaded as zeros and their saved ``lse`` is -inf, which makes their probabilities 0.
    """
    n_end = tl.minimum(n0 + BLOCK_N, klen)
    n_last = n_end - 1
    lo, hi = _band_rows(
        n0=n0, n_end=n_end, qlen=qlen, offset=offset, window_left=window_left, window_right=window_right,
        HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
    )
    m_lo = lo // BLOCK_M
    m_hi = tl.where(hi > lo, (hi + BLOCK_M - 1) // BLOCK_M, m_lo)
    full_lo = m_lo
    full_hi = tl.where(n0 + BLOCK_N <= klen, m_hi, m_lo)  # a block reaching past klen always needs the mask
    if HAS_WINDOW_RIGHT:
        full_lo = (tl.maximum(n_last - offset - window_right, 0) + BLOCK_M - 1) // BLOCK_M
    if HAS_WINDOW_LEFT:
        full_hi = tl.minimum(full_hi, tl.maximum(n0 - offset + window_left + 1, 0) // BLOCK_M)
    m_mid_lo = tl.minimum(tl.maximum(full_lo, m_lo), m_hi)
    m_mid_hi = tl.minimum(tl.maximum(full_hi, m_mid_lo), m_hi)
    return m_lo, m_mid_lo, m_mid_hi, m_hi, lo, hi


@triton.jit
def _dkdv_query_block(
    b_dk, b_dv, b_k, b_v,  # [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV], [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV]
    i_m, o_n, o_d, o_dv, row_lo, row_hi, q_bh, do_bh, p_lse_bh, p_delta_bh, p_dbias_bh, stride_qm, stride_dom,
    stride_dbias_m, stride_dbias_n, i_b, i_h, Hq, Lq, Lk, D, DV,
    offset, qlen, klen, window_left, window_right, slope, sm_scale, softcap, dropout_p, seed,
    p_mask_bh, stride_mask_m, stride_mask_n,
    BLOCK_M: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    APPLY_INDEX_MASK: tl.constexpr, APPLY_ATTN_MASK: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Accumulate one query block's contribution to dk, dv of the key block, keys on the M dimension.

    The tile is transposed (``S^T = K Q^T``, ``[BLOCK_N, BLOCK_M]``), so ``P^T`` and ``dS^T`` feed
    ``dV += P^T dO`` and ``dK += dS^T Q`` as they are: no transpose of a score tile. With
    ``USE_TMA``, ``q_bh`` and ``do_bh`` are tensor descriptors of the head's first ``qlen`` rows.
    """
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = (o_m >= row_lo) & (o_m < row_hi)  # rows that see a key of this block; the others load as 0
    if USE_TMA:
        # Rows past qlen read as 0; in blocks needing no index mask every other row sees the keys.
        # [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_DV]
        b_q = q_bh.load([i_m * BLOCK_M, 0])
        b_do = do_bh.load([i_m * BLOCK_M, 0])
        if APPLY_INDEX_MASK:
            b_q = tl.where(m_m[:, None], b_q, 0.0)
            b_do = tl.where(m_m[:, None], b_do, 0.0)
    else:
        # [BLOCK_M, BLOCK_D]
        b_q = tl.load(q_bh + o_m[:, None] * stride_qm + o_d[None, :], mask=m_m[:, None] & (o_d[None, :] < D),
                      other=0.0)
        # [BLOCK_M, BLOCK_DV]
        b_do = tl.load(do_bh + o_m[:, None] * stride_dom + o_dv[None, :],
                       mask=m_m[:, None] & (o_dv[None, :] < DV), other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    # [BLOCK_M]
    b_shift, b_delta = _load_row_stats(p_lse_bh, p_delta_bh, o_m, Lq, HAS_MASK and not MASK_IS_BOOL)
    # The two independent matmuls back to back. [BLOCK_N, BLOCK_M]
    b_kq = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
    # The score tile with the roles of queries and keys swapped (see _band_rows): rows are keys.
    b_st, b_tanh = _score_tile(
        b_qk=b_kq, o_m=o_n, o_n=o_m, offset=-offset, qlen=klen, klen=qlen, window_left=window_right,
        window_right=window_left, slope=slope, sm_scale=sm_scale, softcap=softcap,
        p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_n, stride_mask_n=stride_mask_m, Lq=Lk, Lk=Lq,
        HAS_WINDOW_LEFT=HAS_WINDOW_RIGHT, HAS_WINDOW_RIGHT=HAS_WINDOW_LEFT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
        APPLY_INDEX_MASK=APPLY_INDEX_MASK, APPLY_ATTN_MASK=APPLY_ATTN_MASK,
    )
    b_keep = b_st  # a placeholder without dropout
    if HAS_DROPOUT:
        b_keep = tl.trans(_dropout_keep(
            seed=seed, i_b=i_b, i_h=i_h, o_m=o_m, o_n=o_n, Hq=Hq, Lq=Lq, Lk=Lk, dropout_p=dropout_p,
        ))
    b_pt, b_dst, b_dxt = _grad_scores(
        b_s=b_st, b_tanh=b_tanh, b_dp=b_dpt, b_shift=b_shift[None, :], b_delta=b_delta[None, :], b_keep=b_keep,
        dropout_p=dropout_p, HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT,
        NATURAL=HAS_MASK and not MASK_IS_BOOL,
    )
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    b_dk += tl.dot(b_dxt.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    if COMPUTE_DBIAS == 2:
        # A broadcast mask: float32 atomics into its own shape (any order), stride 0 on the dimensions
        # it sums over. [BLOCK_N, BLOCK_M] pointers
        p_dbias = p_dbias_bh + o_m[None, :] * stride_dbias_m + o_n[:, None] * stride_dbias_n
        tl.atomic_add(p_dbias, b_dst, mask=(o_m[None, :] < Lq) & (o_n[:, None] < Lk), sem="relaxed")
    elif COMPUTE_DBIAS:  # a dense buffer with contiguous rows: every element written once
        p_dbias = p_dbias_bh + o_m[None, :] * stride_dbias_m + o_n[:, None]
        tl.store(p_dbias, b_dst.to(p_dbias_bh.dtype.element_ty), mask=(o_m[None, :] < Lq) & (o_n[:, None] < Lk))
    return b_dk, b_dv


@triton.jit(do_not_specialize=["Lq", "Lk", "window_left", "window_right", "seed", "TUNE_LK"])
def attention_bwd_dkdv_kernel(
    # pointers
    p_q, p_k, p_v, p_dout, p_lse, p_delta, p_dk, p_dv, p_dbias, p_mask, p_alibi, p_klen, p_qlen,
    p_q_num, p_q_idx, p_full_num, p_full_idx, p_tile_ids,
    # sizes
    Hq, GROUP, Lq, Lk, D, DV,
    # strides (the last dim of every (B, H, L, D) tensor is contiguous)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dbias_b, stride_dbias_h, stride_dbias_m, stride_dbias_n,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    stride_alibi_b, stride_alibi_h,
    stride_num_b, stride_num_h, stride_num_n,
    stride_idx_b, stride_idx_h, stride_idx_n,
    stride_tid_b, stride_tid_h, stride_tid_m, stride_tid_n,
    # scalars
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    TUNE_LK,  # the autotuning key's power-of-two bucket of Lk (unused by the kernel)
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, USE_BLOCK_MASK: tl.constexpr, MASK_SUB_M: tl.constexpr, MASK_SUB_N: tl.constexpr,
    PARTIAL_MASKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Grid ``(cdiv(Lk, BLOCK_N), B * Hkv)``: one program per key block of one kv head.

    ``BLOCK_N`` keys are the M dimension of every matmul, ``BLOCK_M`` queries one loop step. Loops
    over the ``GROUP`` query heads sharing the kv head and, for each, the query blocks that see this
    key block (the band of the window, or the BlockMask's transposed lists); dk, dv are written
    once, so the result is deterministic. Row offsets are int64 (any strides, any lengths).
    ``USE_TMA`` loads the K, V, Q and dO tiles through tensor descriptors (TMA).
    """
    i_n = tl.program_id(0)
    i_bhk = tl.program_id(1)
    Hkv = Hq // GROUP
    i_b = i_bhk // Hkv
    i_hk = i_bhk % Hkv
    stride_qm = tl.cast(stride_qm, tl.int64)
    stride_dom = tl.cast(stride_dom, tl.int64)
    stride_dbias_m = tl.cast(stride_dbias_m, tl.int64)
    stride_dbias_n = tl.cast(stride_dbias_n, tl.int64)
    stride_mask_m = tl.cast(stride_mask_m, tl.int64)
    stride_mask_n = tl.cast(stride_mask_n, tl.int64)

    qlen = Lq
    klen = Lk
    if HAS_LENGTHS:
        qlen = tl.minimum(tl.load(p_qlen + i_b), Lq)
        klen = tl.minimum(tl.load(p_klen + i_b), Lk)
    offset = klen - qlen

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_k = o_n < klen  # keys past klen load as 0: whatever they hold reaches no other row
    k_bh = p_k + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_bh = p_v + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    if USE_TMA:
        # [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV]
        b_k = _rows_desc(k_bh, klen, D, stride_kn, BLOCK_N, BLOCK_D).load([i_n * BLOCK_N, 0])
        b_v = _rows_desc(v_bh, klen, DV, stride_vn, BLOCK_N, BLOCK_DV).load([i_n * BLOCK_N, 0])
    else:
        # [BLOCK_N, BLOCK_D]
        b_k = tl.load(k_bh + o_n[:, None].to(tl.int64) * stride_kn + o_d[None, :],
                      mask=m_k[:, None] & (o_d[None, :] < D), other=0.0)
        # [BLOCK_N, BLOCK_DV]
        b_v = tl.load(v_bh + o_n[:, None].to(tl.int64) * stride_vn + o_dv[None, :],
                      mask=m_k[:, None] & (o_dv[None, :] < DV), other=0.0)
    if DOT_FP32:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    # [BLOCK_N, BLOCK_D]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # [BLOCK_N, BLOCK_DV]
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    m_lo, m_mid_lo, m_mid_hi, m_hi, row_lo, row_hi = _query_block_range(
        n0=i_n * BLOCK_N, qlen=qlen, klen=klen, offset=offset, window_left=window_left, window_right=window_right,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
    )

    for g in range(0, GROUP):
        i_h = i_hk * GROUP + g
        i_bh = i_b * Hq + i_h
        q_bh = p_q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        do_bh = p_dout + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        if USE_TMA:
            q_bh = _rows_desc(q_bh, qlen, D, stride_qm, BLOCK_M, BLOCK_D)
            do_bh = _rows_desc(do_bh, qlen, DV, stride_dom, BLOCK_M, BLOCK_DV)
        p_lse_bh = p_lse + i_bh.to(tl.int64) * Lq
        if HAS_MASK and not MASK_IS_BOOL:  # p_lse: attention_row_stats's (B, Hq, 2, Lq)
            p_lse_bh = p_lse + i_bh.to(tl.int64) * (2 * Lq)
        p_delta_bh = p_delta + i_bh.to(tl.int64) * Lq
        p_dbias_bh = p_dbias
        if COMPUTE_DBIAS:
            p_dbias_bh = p_dbias + i_b.to(tl.int64) * stride_dbias_b + i_h.to(tl.int64) * stride_dbias_h
        p_mask_bh = p_mask
        if HAS_MASK:
            p_mask_bh = p_mask + i_b.to(tl.int64) * stride_mask_b + i_h.to(tl.int64) * stride_mask_h
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(p_alibi + i_b * stride_alibi_b + i_h * stride_alibi_h)
        if USE_BLOCK_MASK:
            i_kb = i_n // MASK_SUB_N  # the mask's key block; its query blocks span MASK_SUB_M tiles each
            p_num = i_b * stride_num_b + i_h * stride_num_h + i_kb * stride_num_n
            p_idx = i_b * stride_idx_b + i_h * stride_idx_h + i_kb * stride_idx_n
            num_partial = tl.load(p_q_num + p_num)
            for t in range(0, num_partial * MASK_SUB_M):
                i_qb = tl.load(p_q_idx + p_idx + t // MASK_SUB_M)
                i_m = i_qb * MASK_SUB_M + t % MASK_SUB_M
                p_mask_tile = _partial_tile_mask(
                    p_mask=p_mask, p_mask_bh=p_mask_bh, p_tile_ids=p_tile_ids, i_b=i_b, i_h=i_h, i_qb=i_qb, i_kb=i_kb,
                    stride_tid_b=stride_tid_b, stride_tid_h=stride_tid_h, stride_tid_m=stride_tid_m,
                    stride_tid_n=stride_tid_n, PARTIAL_MASKS=PARTIAL_MASKS, BLOCK_Q=MASK_SUB_M * BLOCK_M,
                    BLOCK_K=MASK_SUB_N * BLOCK_N,
                )
                b_dk, b_dv = _dkdv_query_block(
                    b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, i_m=i_m, o_n=o_n, o_d=o_d, o_dv=o_dv, row_lo=row_lo,
                    row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
                    p_dbias_bh=p_dbias_bh, stride_qm=stride_qm, stride_dom=stride_dom, stride_dbias_m=stride_dbias_m,
                    stride_dbias_n=stride_dbias_n, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV,
                    offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right,
                    slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed,
                    p_mask_bh=p_mask_tile, stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_M=BLOCK_M,
                    HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                    HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                    HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True,
                    COMPUTE_DBIAS=COMPUTE_DBIAS, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA,
                )
            num_full = tl.load(p_full_num + p_num)
            for t in range(0, num_full * MASK_SUB_M):
                i_m = tl.load(p_full_idx + p_idx + t // MASK_SUB_M) * MASK_SUB_M + t % MASK_SUB_M
                b_dk, b_dv = _dkdv_query_block(
                    b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, i_m=i_m, o_n=o_n, o_d=o_d, o_dv=o_dv, row_lo=row_lo,
                    row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
                    p_dbias_bh=p_dbias_bh, stride_qm=stride_qm, stride_dom=stride_dom, stride_dbias_m=stride_dbias_m,
                    stride_dbias_n=stride_dbias_n, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV,
                    offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right,
                    slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed,
                    p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_M=BLOCK_M,
                    HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                    HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                    HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=False,
                    COMPUTE_DBIAS=COMPUTE_DBIAS, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA,
                )
        else:
            for i_m in range(m_lo, m_mid_lo):
                b_dk, b_dv = _dkdv_query_block(
                    b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, i_m=i_m, o_n=o_n, o_d=o_d, o_dv=o_dv, row_lo=row_lo,
                    row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
                    p_dbias_bh=p_dbias_bh, stride_qm=stride_qm, stride_dom=stride_dom, stride_dbias_m=stride_dbias_m,
                    stride_dbias_n=stride_dbias_n, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV,
                    offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right,
                    slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed,
                    p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_M=BLOCK_M,
                    HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                    HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                    HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True,
                    COMPUTE_DBIAS=COMPUTE_DBIAS, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA,
                )
            for i_m in range(m_mid_lo, m_mid_hi):
                b_dk, b_dv = _dkdv_query_block(
                    b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, i_m=i_m, o_n=o_n, o_d=o_d, o_dv=o_dv, row_lo=row_lo,
                    row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
                    p_dbias_bh=p_dbias_bh, stride_qm=stride_qm, stride_dom=stride_dom, stride_dbias_m=stride_dbias_m,
                    stride_dbias_n=stride_dbias_n, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV,
                    offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right,
                    slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed,
                    p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_M=BLOCK_M,
                    HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                    HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                    HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=False, APPLY_ATTN_MASK=True,
                    COMPUTE_DBIAS=COMPUTE_DBIAS, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA,
                )
            for i_m in range(m_mid_hi, m_hi):
                b_dk, b_dv = _dkdv_query_block(
                    b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, i_m=i_m, o_n=o_n, o_d=o_d, o_dv=o_dv, row_lo=row_lo,
                    row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
                    p_dbias_bh=p_dbias_bh, stride_qm=stride_qm, stride_dom=stride_dom, stride_dbias_m=stride_dbias_m,
                    stride_dbias_n=stride_dbias_n, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV,
                    offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right,
                    slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed,
                    p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_M=BLOCK_M,
                    HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                    HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL,
                    HAS_LENGTHS=HAS_LENGTHS, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True,
                    COMPUTE_DBIAS=COMPUTE_DBIAS, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=USE_TMA,
                )

    b_dk = b_dk * sm_scale
    m_n = o_n < Lk
    p_dk = p_dk + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    tl.store(p_dk + o_n[:, None].to(tl.int64) * stride_dkn + o_d[None, :], b_dk.to(p_dk.dtype.element_ty),
             mask=m_n[:, None] & (o_d[None, :] < D))
    p_dv = p_dv + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    tl.store(p_dv + o_n[:, None].to(tl.int64) * stride_dvn + o_dv[None, :], b_dv.to(p_dv.dtype.element_ty),
             mask=m_n[:, None] & (o_dv[None, :] < DV))


# --------------------------------------------------------------------------- dQ
@triton.jit
def _dq_key_block(
    b_dq, b_q, b_do, b_shift, b_delta,  # [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_DV], [BLOCK_M] x2
    i_n, o_m, o_d, o_dv, key_lo, key_hi, k_bh, v_bh, stride_kn, stride_vn, i_b, i_h, Hq, Lq, Lk, D, DV,
    offset, qlen, klen, window_left, window_right, slope, sm_scale, softcap, dropout_p, seed,
    p_mask_bh, stride_mask_m, stride_mask_n,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    APPLY_INDEX_MASK: tl.constexpr, APPLY_ATTN_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr, DELTA_PASS: tl.constexpr = False,
    NONFINITE_K: tl.constexpr = False,
):
    """Accumulate one key block's contribution to dq (queries on the M dimension). With ``USE_TMA``,
    ``k_bh`` and ``v_bh`` are tensor descriptors of the head's first ``klen`` rows.

    With ``DELTA_PASS`` (and ``b_delta`` = 0), ``b_dq`` is ``[BLOCK_M]`` and accumulates the rows' sums
    of ``P * dP`` (dropout applied), which is ``rowsum(dO * O)`` with O in float32: no third matmul.
    ``NONFINITE_K`` (the redo launch) multiplies ``dX`` by K without its NaN/Inf entries: a row that
    sees such a key has a NaN score, so its dX row is NaN already; the others must not get ``0 * NaN``."""
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = (o_n >= key_lo) & (o_n < key_hi)  # keys no row of the block sees load as 0
    if USE_TMA:
        # Keys past klen read as 0; blocks needing no index mask lie inside every row's band.
        # [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV]
        b_k = k_bh.load([i_n * BLOCK_N, 0])
        b_v = v_bh.load([i_n * BLOCK_N, 0])
        if APPLY_INDEX_MASK:
            b_k = tl.where(m_n[:, None], b_k, 0.0)
            b_v = tl.where(m_n[:, None], b_v, 0.0)
    else:
        # [BLOCK_N, BLOCK_D]
        b_k = tl.load(k_bh + o_n[:, None].to(tl.int64) * stride_kn + o_d[None, :],
                      mask=m_n[:, None] & (o_d[None, :] < D), other=0.0)
        # [BLOCK_N, BLOCK_DV]
        b_v = tl.load(v_bh + o_n[:, None].to(tl.int64) * stride_vn + o_dv[None, :],
                      mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.0)
    if DOT_FP32:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    # The two independent matmuls back to back. [BLOCK_M, BLOCK_N]
    b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
    b_s, b_tanh = _score_tile(
        b_qk=b_qk, o_m=o_m, o_n=o_n, offset=offset, qlen=qlen, klen=klen, window_left=window_left,
        window_right=window_right, slope=slope, sm_scale=sm_scale, softcap=softcap,
        p_mask_bh=p_mask_bh, stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, Lq=Lq, Lk=Lk,
        HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
        APPLY_INDEX_MASK=APPLY_INDEX_MASK, APPLY_ATTN_MASK=APPLY_ATTN_MASK,
    )
    b_keep = b_s  # a placeholder without dropout
    if HAS_DROPOUT:
        b_keep = _dropout_keep(
            seed=seed, i_b=i_b, i_h=i_h, o_m=o_m, o_n=o_n, Hq=Hq, Lq=Lq, Lk=Lk, dropout_p=dropout_p,
        )
    _, b_ds, b_dx = _grad_scores(
        b_s=b_s, b_tanh=b_tanh, b_dp=b_dp, b_shift=b_shift[:, None], b_delta=b_delta[:, None], b_keep=b_keep,
        dropout_p=dropout_p, HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT,
        NATURAL=HAS_MASK and not MASK_IS_BOOL,
    )
    if DELTA_PASS:
        b_dq += tl.sum(b_ds, 1)
    else:
        if HAS_MASK and APPLY_ATTN_MASK:
            # Keys the mask hides from every row of the tile are selected away (0 * NaN is NaN).
            # [BLOCK_N]
            m_seen = tl.max(tl.where(b_s == float("-inf"), 0, 1), 0) > 0
            b_k = tl.where(m_seen[:, None], b_k, 0.0)
        if NONFINITE_K:
            b_k = tl.where((b_k - b_k) == 0.0, b_k, 0.0)
        b_dq += tl.dot(b_dx.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
    return b_dq


@triton.jit(do_not_specialize=["Lq", "Lk", "window_left", "window_right", "seed", "TUNE_LK"])
def attention_bwd_dq_kernel(
    # pointers
    p_q, p_k, p_v, p_dout, p_lse, p_delta, p_tol, p_dq, p_mask, p_alibi, p_klen, p_qlen,
    p_kv_num, p_kv_idx, p_full_num, p_full_idx, p_tile_ids,
    # sizes
    Hq, GROUP, Lq, Lk, D, DV,
    # strides (the last dim of every (B, H, L, D) tensor is contiguous)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
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
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, USE_BLOCK_MASK: tl.constexpr, MASK_SUB_M: tl.constexpr, MASK_SUB_N: tl.constexpr,
    PARTIAL_MASKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, USE_TMA: tl.constexpr, DELTA_PASS: tl.constexpr,
    REDO_NONFINITE: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_M), B * Hq)``: one program per query block; the same key blocks as the
    forward. ``USE_TMA`` loads the Q, dO, K and V tiles through tensor descriptors (TMA).

    ``DELTA_PASS`` (16-bit inputs, before the dK/dV and dQ launches) computes no dq: it sums
    ``P * dP`` over the same tiles, which is ``rowsum(dO * O)`` with O in float32, and overwrites
    ``delta`` (the preprocess's ``rowsum(dO * out)``) with it in the rows where the two agree within
    ``tol``, that is where out is this call's own output rounded; other rows keep delta from out as
    given (the merged output of a context-parallel call, see ``attention_bwd``).

    ``REDO_NONFINITE`` (launched after the plain dQ launch): a program whose rows of dq hold no
    NaN/Inf does nothing; the others compute them again with K's NaN/Inf entries selected away
    (``_dq_key_block``), so a key hidden from some rows of a tile reaches only the rows that see it."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // GROUP
    stride_kn = tl.cast(stride_kn, tl.int64)
    stride_vn = tl.cast(stride_vn, tl.int64)
    stride_mask_m = tl.cast(stride_mask_m, tl.int64)
    stride_mask_n = tl.cast(stride_mask_n, tl.int64)

    qlen = Lq
    klen = Lk
    if HAS_LENGTHS:
        qlen = tl.minimum(tl.load(p_qlen + i_b), Lq)
        klen = tl.minimum(tl.load(p_klen + i_b), Lk)
    offset = klen - qlen

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_q = o_m < qlen  # rows past qlen load as 0 (their gradient is 0)
    q_bh = p_q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    do_bh = p_dout + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    k_bh = p_k + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_bh = p_v + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_mask_bh = p_mask
    if HAS_MASK:
        p_mask_bh = p_mask + i_b.to(tl.int64) * stride_mask_b + i_h.to(tl.int64) * stride_mask_h
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(p_alibi + i_b * stride_alibi_b + i_h * stride_alibi_h)

    if USE_TMA:
        # [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_DV]
        b_q = _rows_desc(q_bh, qlen, D, stride_qm, BLOCK_M, BLOCK_D).load([i_m * BLOCK_M, 0])
        b_do = _rows_desc(do_bh, qlen, DV, stride_dom, BLOCK_M, BLOCK_DV).load([i_m * BLOCK_M, 0])
        k_bh = _rows_desc(k_bh, klen, D, stride_kn, BLOCK_N, BLOCK_D)
        v_bh = _rows_desc(v_bh, klen, DV, stride_vn, BLOCK_N, BLOCK_DV)
    else:
        # [BLOCK_M, BLOCK_D]
        b_q = tl.load(q_bh + o_m[:, None].to(tl.int64) * stride_qm + o_d[None, :],
                      mask=m_q[:, None] & (o_d[None, :] < D), other=0.0)
        # [BLOCK_M, BLOCK_DV]
        b_do = tl.load(do_bh + o_m[:, None].to(tl.int64) * stride_dom + o_dv[None, :],
                       mask=m_q[:, None] & (o_dv[None, :] < DV), other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    p_lse_bh = p_lse + i_bh.to(tl.int64) * Lq
    if HAS_MASK and not MASK_IS_BOOL:  # p_lse: attention_row_stats's (B, Hq, 2, Lq)
        p_lse_bh = p_lse + i_bh.to(tl.int64) * (2 * Lq)
    # [BLOCK_M]
    b_shift, b_delta = _load_row_stats(p_lse_bh, p_delta + i_bh.to(tl.int64) * Lq, o_m, Lq, HAS_MASK and not MASK_IS_BOOL)
    if REDO_NONFINITE:
        # [BLOCK_M, BLOCK_D] the rows the plain launch wrote
        p_prev = p_dq + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
        b_prev = tl.load(p_prev + o_m[:, None].to(tl.int64) * stride_dqm + o_d[None, :],
                         mask=(o_m[:, None] < Lq) & (o_d[None, :] < D), other=0.0).to(tl.float32)
        redo = tl.max(tl.max(((b_prev - b_prev) != 0.0).to(tl.int32), 1), 0) > 0
    if DELTA_PASS:
        b_given = b_delta
        b_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        # [BLOCK_M] the rows' sums of P * dP
        b_dq = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        # [BLOCK_M, BLOCK_D]
        b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys [key_lo, key_hi) are those some row of the block sees (the band with the roles swapped).
    m0 = i_m * BLOCK_M
    key_lo, key_hi = _band_rows(
        n0=m0, n_end=tl.minimum(m0 + BLOCK_M, qlen), qlen=klen, offset=-offset, window_left=window_right,
        window_right=window_left,
        HAS_WINDOW_LEFT=HAS_WINDOW_RIGHT, HAS_WINDOW_RIGHT=HAS_WINDOW_LEFT,
    )

    if USE_BLOCK_MASK:
        i_qb = i_m // MASK_SUB_M  # the mask's query block; its key blocks span MASK_SUB_N tiles each
        p_num = i_b * stride_num_b + i_h * stride_num_h + i_qb * stride_num_m
        p_idx = i_b * stride_idx_b + i_h * stride_idx_h + i_qb * stride_idx_m
        num_partial = tl.load(p_kv_num + p_num)
        num_full = tl.load(p_full_num + p_num)
        if REDO_NONFINITE:
            num_partial = tl.where(redo, num_partial, 0)
            num_full = tl.where(redo, num_full, 0)
        for t in range(0, num_partial * MASK_SUB_N):
            i_kb = tl.load(p_kv_idx + p_idx + t // MASK_SUB_N)
            i_n = i_kb * MASK_SUB_N + t % MASK_SUB_N
            p_mask_tile = _partial_tile_mask(
                p_mask=p_mask, p_mask_bh=p_mask_bh, p_tile_ids=p_tile_ids, i_b=i_b, i_h=i_h, i_qb=i_qb, i_kb=i_kb,
                stride_tid_b=stride_tid_b, stride_tid_h=stride_tid_h, stride_tid_m=stride_tid_m,
                stride_tid_n=stride_tid_n, PARTIAL_MASKS=PARTIAL_MASKS, BLOCK_Q=MASK_SUB_M * BLOCK_M,
                BLOCK_K=MASK_SUB_N * BLOCK_N,
            )
            b_dq = _dq_key_block(
                b_dq=b_dq, b_q=b_q, b_do=b_do, b_shift=b_shift, b_delta=b_delta, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv,
                key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn,
                stride_vn=stride_vn, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen,
                klen=klen, window_left=window_left, window_right=window_right, slope=slope,
                sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_tile,
                stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_N=BLOCK_N,
                HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
                HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True, DOT_PRECISION=DOT_PRECISION,
                DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, DELTA_PASS=DELTA_PASS,
                NONFINITE_K=REDO_NONFINITE,
            )
        for t in range(0, num_full * MASK_SUB_N):
            i_n = tl.load(p_full_idx + p_idx + t // MASK_SUB_N) * MASK_SUB_N + t % MASK_SUB_N
            b_dq = _dq_key_block(
                b_dq=b_dq, b_q=b_q, b_do=b_do, b_shift=b_shift, b_delta=b_delta, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv,
                key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn,
                stride_vn=stride_vn, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen,
                klen=klen, window_left=window_left, window_right=window_right, slope=slope,
                sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh,
                stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_N=BLOCK_N,
                HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
                HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=False, DOT_PRECISION=DOT_PRECISION,
                DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, DELTA_PASS=DELTA_PASS,
                NONFINITE_K=REDO_NONFINITE,
            )
    else:
        n_lo, n_mid_lo, n_mid_hi, n_hi = _key_block_range(
            m0=m0, qlen=qlen, klen=klen, offset=offset, window_left=window_left, window_right=window_right,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
        )
        if REDO_NONFINITE:
            n_hi = tl.where(redo, n_hi, n_lo)
            n_mid_lo = tl.minimum(n_mid_lo, n_hi)
            n_mid_hi = tl.minimum(n_mid_hi, n_hi)
        for i_n in range(n_lo, n_mid_lo):
            b_dq = _dq_key_block(
                b_dq=b_dq, b_q=b_q, b_do=b_do, b_shift=b_shift, b_delta=b_delta, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv,
                key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn,
                stride_vn=stride_vn, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen,
                klen=klen, window_left=window_left, window_right=window_right, slope=slope,
                sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh,
                stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_N=BLOCK_N,
                HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
                HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True, DOT_PRECISION=DOT_PRECISION,
                DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, DELTA_PASS=DELTA_PASS,
                NONFINITE_K=REDO_NONFINITE,
            )
        for i_n in range(n_mid_lo, n_mid_hi):
            b_dq = _dq_key_block(
                b_dq=b_dq, b_q=b_q, b_do=b_do, b_shift=b_shift, b_delta=b_delta, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv,
                key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn,
                stride_vn=stride_vn, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen,
                klen=klen, window_left=window_left, window_right=window_right, slope=slope,
                sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh,
                stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_N=BLOCK_N,
                HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
                HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=False, APPLY_ATTN_MASK=True, DOT_PRECISION=DOT_PRECISION,
                DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, DELTA_PASS=DELTA_PASS,
                NONFINITE_K=REDO_NONFINITE,
            )
        for i_n in range(n_mid_hi, n_hi):
            b_dq = _dq_key_block(
                b_dq=b_dq, b_q=b_q, b_do=b_do, b_shift=b_shift, b_delta=b_delta, i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv,
                key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn,
                stride_vn=stride_vn, i_b=i_b, i_h=i_h, Hq=Hq, Lq=Lq, Lk=Lk, D=D, DV=DV, offset=offset, qlen=qlen,
                klen=klen, window_left=window_left, window_right=window_right, slope=slope,
                sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed, p_mask_bh=p_mask_bh,
                stride_mask_m=stride_mask_m, stride_mask_n=stride_mask_n, BLOCK_N=BLOCK_N,
                HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=HAS_MASK, MASK_IS_BOOL=MASK_IS_BOOL, HAS_LENGTHS=HAS_LENGTHS,
                HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, APPLY_ATTN_MASK=True, DOT_PRECISION=DOT_PRECISION,
                DOT_FP32=DOT_FP32, USE_TMA=USE_TMA, DELTA_PASS=DELTA_PASS,
                NONFINITE_K=REDO_NONFINITE,
            )

    if DELTA_PASS and HAS_MASK and not MASK_IS_BOOL:
        # The sums of P' dP' (unnormalised P', dO scaled by 2^-norm) are rowsum(P * dP): scaled like dO.
        b_dq = b_dq * tl.exp2(-_load_row_norms(p_lse_bh, o_m, Lq))
    if DELTA_PASS:
        # Out is its rounding: delta from the float32 sums (NaN compares false: then out's NaN stays).
        b_tol = tl.load(p_tol + i_bh.to(tl.int64) * Lq + o_m, mask=o_m < Lq, other=0.0)
        b_delta = tl.where(tl.abs(b_dq - b_given) <= b_tol, b_dq, b_given)
        tl.store(p_delta + i_bh.to(tl.int64) * Lq + o_m, b_delta, mask=o_m < Lq)
    else:
        b_dq = b_dq * sm_scale
        p_dq = p_dq + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
        m_store = o_m < Lq
        if REDO_NONFINITE:
            m_store = m_store & redo
        tl.store(p_dq + o_m[:, None].to(tl.int64) * stride_dqm + o_d[None, :], b_dq.to(p_dq.dtype.element_ty),
                 mask=m_store[:, None] & (o_d[None, :] < D))


# No reset_to_zero for dbias: every tuning run stores the same tiles, the others stay zero (the
# launcher does not autotune when the kernel adds dbias with atomics).
attention_bwd_dkdv_kernel_tuned = configs.autotune("dkdv", configs.DKDV_KEY)(attention_bwd_dkdv_kernel)
attention_bwd_dq_kernel_tuned = configs.autotune("dq", configs.DQ_KEY)(attention_bwd_dq_kernel)


# --------------------------------------------------------------------------- launcher
def row_delta(out: torch.Tensor, dout: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The preprocess kernel: ``delta = rowsum(dO * O)``, float32 ``(B, Hq, Lq)``, from ``out, dout (B, Hq, Lq, DV)``,
    and, when ``exact`` is asked for a 16-bit ``out``, the float32 ``tol (B, Hq, Lq)`` the delta pass
    compares with (else None: delta stays the rowsum of the rounded output)."""
    B, Hq, Lq, DV = out.shape
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=out.device)
    rounded = exact and out.dtype in (torch.float16, torch.bfloat16)
    tol = torch.empty_like(delta) if rounded else None
    info = torch.finfo(out.dtype)
    torch.library.wrap_triton(attention_bwd_preprocess_kernel)[(triton.cdiv(Lq, 64), B * Hq)](
        p_out=out, p_dout=dout, p_delta=delta, p_tol=tol, Hq=Hq, Lq=Lq, DV=DV,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
        stride_dob=dout.stride(0), stride_doh=dout.stride(1), stride_dom=dout.stride(2),
        eps=float(info.eps), tiny=float(info.smallest_normal * info.eps / 2),
        BLOCK_M=64, BLOCK_DV=head_dim_tile(DV), ROUNDED_OUT=rounded,
    )
    return delta, tol


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    masks: MaskArgs = NO_MASKS,
    *,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    compute_dbias: bool = False,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels.

    Args: as :func:`attention_fwd` (``masks`` with the BlockMask's transposed lists), plus
    ``dout (B, Hq, Lq, DV)``, the forward's ``out`` and ``lse``, ``compute_dbias`` (gradient w.r.t. an
    additive ``masks.attn_mask``) and ``dlse`` (float32 ``(B, Hq, Lq)``, the gradient w.r.t. ``lse``, or None).

    Returns:
        ``dq``, ``dk``, ``dv`` (dtypes and shapes of q, k, v) and ``dbias`` in the mask's dtype and
        own shape (size 1 where ``attn_mask`` has size 1 or stride 0) when ``compute_dbias`` (an
        empty tensor otherwise).
    """
    check_inputs(q, k, v, masks.block_size_q, masks.block_size_k, masks.use_block_mask)
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    attn_mask, alibi_slopes, partial_masks = masks.attn_mask, masks.alibi_slopes, masks.partial_masks
    window_left, window_right, softcap = masks.window_left, masks.window_right, masks.softcap
    block_size_q, block_size_k = masks.block_size_q, masks.block_size_k
    B, Hq, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # dbias has the mask's own shape: size 1 where attn_mask has size 1 or stride 0 (fastattn/ops.py,
    # dbias_shape). A broadcast mask's elements receive dS of many (b, h, i, j): the kernel adds them
    # with float32 atomics into a buffer of that shape (an order that varies from run to run), rounded
    # once to the mask's dtype. Under torch.use_deterministic_algorithms it stores every dS once into
    # a dense float32 (B, Hq, Lq, Lk) scratch instead (B * Hq * Lq * Lk * 4 bytes, in that mode only)
    # and torch sums it over the broadcast dimensions in a fixed order.
    # Tiles outside the band or the block lists are never visited: their gradient is 0, hence zeros.
    full = (B, Hq, Lq, Lk)
    dbias, dbias_shape = q.new_empty((0,)), full
    dbias_mode = 0  # the kernel's COMPUTE_DBIAS: 0 none, 1 store each element once, 2 float32 atomics
    if compute_dbias:
        dbias_shape = tuple(1 if n == 1 or st == 0 else n for n, st in zip(attn_mask.shape, attn_mask.stride()))
        if dbias_shape == full:
            dbias, dbias_mode = torch.zeros(full, dtype=attn_mask.dtype, device=q.device), 1
        elif torch.are_deterministic_algorithms_enabled():
            dbias, dbias_mode = torch.zeros(full, dtype=torch.float32, device=q.device), 1
        else:
            dbias, dbias_mode = torch.zeros(dbias_shape, dtype=torch.float32, device=q.device), 2

    def finish_dbias(dbias):  # the mask's own shape and dtype, rounded once (no-ops for a dense mask)
        return dbias.sum_to_size(dbias_shape).to(attn_mask.dtype) if dbias_mode else dbias

    if B * Hkv * Lk == 0:
        return dq.zero_(), dk, dv, finish_dbias(dbias)  # no keys: nothing depends on q
    if Lq == 0:
        return dq, dk.zero_(), dv.zero_(), finish_dbias(dbias)
    block_d, block_dv = head_dim_tile(D), head_dim_tile(DV)
    # delta = rowsum(dO * O) per query row, float32 (B, Hq, Lq); the dK/dV and dQ kernels read it. When
    # the mask's gradient is asked for 16-bit inputs, the delta pass below replaces it by the float32
    # rowsum(P * dP) where out is the rounding of this call's own output: dbias sums dS along rows and
    # columns, where the rounding of out would be all that is left of sums that cancel. Otherwise
    # delta keeps out's rounding (2^-9 relative in bf16, as FlashAttention's backward), which saves the
    # pass's two matmuls per tile (+29% tensor-core work) on every 16-bit backward.
    element_mask = attn_mask if partial_masks is None else partial_masks
    if element_mask is not None and element_mask.dtype != torch.bool:
        # With an additive mask the kernels take P from per-row (shift, log2 normaliser) pairs: (lse, 0), or
        # (m, log2(l)) recomputed for rows whose lse is too large to keep log(l) in float32; the normaliser
        # enters as dO (and dlse) scaled by 2^-norm (see _load_row_stats), exactly 1 in the other rows.
        lse = attention_row_stats(q, k, v, lse, masks, scale=scale)
        row_scale = torch.exp2(-lse[:, :, 1])  # (B, Hq, Lq)
        dout = (dout * row_scale[..., None]).to(dout.dtype)
        if dlse is not None:
            dlse = dlse * row_scale
    delta, tol = row_delta(out, dout, exact=compute_dbias)

    lengths = both_lengths(masks.key_lengths, masks.query_lengths, B, Lq, Lk, q.device)
    element = element_mask_args(attn_mask, partial_masks, masks.partial_tile_ids, block_size_k)
    flags = feature_flags(element["p_mask"], alibi_slopes, lengths, window_left, window_right, softcap, dropout_p)
    # The same tanh as the forward, so P is recomputed from the very scores its lse came from.
    flags["HAS_SOFTCAP"] = softcap_flag(softcap, q.dtype)
    use_block_mask = masks.use_block_mask
    precision, dot_fp32 = dot_settings(q.dtype)
    bound = Lq + Lk + 1
    flags["USE_TMA"] = configs.tma_tiles("dq", max(block_d, block_dv), q.element_size()) and use_tensor_descriptors(
        q, k, v, dout
    )
    common = dict(
        p_q=q, p_k=k, p_v=v, p_dout=dout, p_lse=lse, p_delta=delta, p_alibi=alibi_slopes,
        p_klen=lengths[0] if lengths else None, p_qlen=lengths[1] if lengths else None,
        Hq=Hq, GROUP=Hq // Hkv, Lq=Lq, Lk=Lk, D=D, DV=DV,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        stride_dob=dout.stride(0), stride_doh=dout.stride(1), stride_dom=dout.stride(2),
        **element,
        stride_alibi_b=alibi_slopes.stride(0) if alibi_slopes is not None else 0,
        stride_alibi_h=alibi_slopes.stride(1) if alibi_slopes is not None else 0,
        sm_scale=float(scale), softcap=float(softcap),
        window_left=clamp_window(window_left, bound), window_right=clamp_window(window_right, bound),
        dropout_p=float(dropout_p), seed=int(seed), TUNE_LK=configs.tune_bucket(Lk),
        BLOCK_D=block_d, BLOCK_DV=block_dv, **flags, USE_BLOCK_MASK=use_block_mask,
        DOT_PRECISION=precision, DOT_FP32=dot_fp32,
    )
    q_num_strides, q_idx_strides = list_strides(masks.q_num_blocks, masks.q_indices)
    dkdv_args = dict(
        common, p_dk=dk, p_dv=dv, p_dbias=dbias,
        p_q_num=masks.q_num_blocks, p_q_idx=masks.q_indices, p_full_num=masks.full_q_num_blocks,
        p_full_idx=masks.full_q_indices,
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2),
        **{f"stride_dbias_{d}": dbias.stride(i) if compute_dbias and dbias.shape[i] > 1 else 0
           for i, d in enumerate("bhmn")},
        stride_num_b=q_num_strides[0], stride_num_h=q_num_strides[1], stride_num_n=q_num_strides[2],
        stride_idx_b=q_idx_strides[0], stride_idx_h=q_idx_strides[1], stride_idx_n=q_idx_strides[2],
        COMPUTE_DBIAS=dbias_mode,
    )
    kv_num_strides, kv_idx_strides = list_strides(masks.kv_num_blocks, masks.kv_indices)
    dq_args = dict(
        common, p_dq=dq, p_tol=tol,
        p_kv_num=masks.kv_num_blocks, p_kv_idx=masks.kv_indices, p_full_num=masks.full_kv_num_blocks,
        p_full_idx=masks.full_kv_indices,
        stride_dqb=dq.stride(0), stride_dqh=dq.stride(1), stride_dqm=dq.stride(2),
        stride_num_b=kv_num_strides[0], stride_num_h=kv_num_strides[1], stride_num_m=kv_num_strides[2],
        stride_idx_b=kv_idx_strides[0], stride_idx_h=kv_idx_strides[1], stride_idx_m=kv_idx_strides[2],
    )

    head_dim = max(block_d, block_dv)

    def pinned(kind):
        if use_block_mask:
            meta = configs.block_mask_config(kind, head_dim, block_size_q, block_size_k, q.element_size(), flags)
            return meta, {"MASK_SUB_M": block_size_q // meta["BLOCK_M"], "MASK_SUB_N": block_size_k // meta["BLOCK_N"]}
        return configs.pinned_config(kind, head_dim, q.element_size(), flags), {"MASK_SUB_M": 1, "MASK_SUB_N": 1}

    if tol is not None:
        # The delta pass: the dQ kernel's tiles without the dq matmul (pinned tiles: it overwrites delta).
        meta, sub = pinned("dq")
        torch.library.wrap_triton(attention_bwd_dq_kernel)[(triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
            **dq_args, **meta, **sub, DELTA_PASS=True, REDO_NONFINITE=False,
        )
    if dlse is not None:  # d lse / d S = P, so the lse gradient enters as delta - dlse (fastattn/ops.py)
        delta.sub_(dlse)

    # Autotuning runs the dK/dV kernel once per candidate: atomics would add each run's dbias.
    if not use_block_mask and dbias_mode != 2 and configs.autotune_enabled(head_dim, q.element_size()):
        grid_dkdv = lambda META: (triton.cdiv(Lk, META["BLOCK_N"]), B * Hkv)
        grid_dq = lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * Hq)
        torch.library.wrap_triton(attention_bwd_dkdv_kernel_tuned)[grid_dkdv](**dkdv_args, MASK_SUB_M=1, MASK_SUB_N=1)
        torch.library.wrap_triton(attention_bwd_dq_kernel_tuned)[grid_dq](
            **dq_args, MASK_SUB_M=1, MASK_SUB_N=1, DELTA_PASS=False, REDO_NONFINITE=False,
        )
    else:
        for kernel, args, kind in ((attention_bwd_dkdv_kernel, dkdv_args, "dkdv"), (attention_bwd_dq_kernel, dq_args, "dq")):
            meta, sub = pinned(kind)
            if kind == "dkdv":
                grid = (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)
            else:
                grid = (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)
                sub.update(DELTA_PASS=False, REDO_NONFINITE=False)
            torch.library.wrap_triton(kernel)[grid](**args, **meta, **sub)
    # Rows of dq that hold NaN/Inf are computed again with K's NaN/Inf entries selected away (the
    # kernel's REDO_NONFINITE): a key hidden from them may have reached them as 0 * NaN.
    meta, sub = pinned("dq")
    torch.library.wrap_triton(attention_bwd_dq_kernel)[(triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
        **dq_args, **meta, **sub, DELTA_PASS=False, REDO_NONFINITE=True,
    )
    return dq, dk, dv, finish_dbias(dbias)
