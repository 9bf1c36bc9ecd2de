"""Fused attention over packed variable-length sequences (flash-attn's varlen layout), forward and backward.

``q (total_q, Hq, D)``, ``k (total_k, Hkv, D)``, ``v (total_k, Hkv, DV)`` hold many sequences packed
one after another; ``cu_seqlens_q/k`` int32 ``(num_seqs + 1,)`` say where each starts. Sequence ``s``
attends only to itself, with causal / window / ALiBi bottom-right aligned per sequence
(``offset = Lk_s - Lq_s``).

The grid is sized from ``max_seqlen_q`` (an argument, so the launch needs no host read of
``cu_seqlens``): program ``(i_m, s * Hq + h)`` reads its sequence's start and length from
``cu_seqlens`` on the device and exits at once when query block ``i_m`` lies past the sequence's
end. Inside, it is the padded kernel with lengths: the same visible-band walks and the same
per-tile steps, imported from ``attention_fwd.py`` (``_key_block_range``, ``_fwd_key_block``) and
``attention_bwd.py`` (``_query_block_range``, ``_dkdv_query_block``, ``_dq_key_block``), on base
pointers moved to the sequence's first row. The backward is attention_bwd.py's two kernels in the
same way: one program per key block of one (sequence, kv head) for dK/dV (deterministic, written
once), one per query block of one (sequence, query head) for dQ.

Dropout: sequence ``s`` draws the padded kernels' Philox pattern for that sequence alone (batch 0,
local indices, its own lengths) from the seed ``seed + s``, so the backward regenerates it and no
two sequences share random numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .attention_bwd import _band_rows, _dkdv_query_block, _dq_key_block, _load_row_stats, _query_block_range, row_delta
from .attention_fwd import (
    _fwd_key_block,
    _key_block_range,
    clamp_window,
    dot_settings,
    feature_flags,
    head_dim_tile,
    last_dim_contiguous,
    softcap_flag,
)


# The three band loops of each kernel (masked edge blocks, unmasked interior, masked edge blocks) are
# one loop helper each, called with the loop's bounds and its APPLY_INDEX_MASK: the shared tile step
# is called in one place per kernel. Triton inlines the helpers (the compiled code is unchanged).
@triton.jit
def _sequence(p_cu_q, p_cu_k, i_s, seed):
    """Sequence ``i_s`` of the packing: its first packed query and key rows and lengths (from
    ``cu_seqlens``), the bottom-right offset ``klen - qlen``, and its dropout seed -- the padded
    kernels' pattern for this sequence alone (batch 1, local indices) from ``seed + s``."""
    q_start = tl.load(p_cu_q + i_s)
    qlen = tl.load(p_cu_q + i_s + 1) - q_start
    k_start = tl.load(p_cu_k + i_s)
    klen = tl.load(p_cu_k + i_s + 1) - k_start
    return q_start, qlen, k_start, klen, klen - qlen, seed.to(tl.int64) + i_s


@triton.jit
def _fwd_key_blocks(
    b_acc, b_l, b_m, b_q,  # [BLOCK_M, BLOCK_DV], [BLOCK_M], [BLOCK_M] running state; [BLOCK_M, BLOCK_D]
    n_start, n_end, o_m, o_d, o_dv, k_bh, v_bh, stride_kn, stride_vn, p_q, i_h, Hq, qlen, klen, D, DV,
    offset, window_left, window_right, slope, sm_scale, softcap, dropout_p, seed_s, row_lo, row_hi,
    BLOCK_N: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, APPLY_INDEX_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """The forward's online softmax over key blocks ``[n_start, n_end)`` of one sequence: the padded
    kernel's step with the sequence's lengths (batch 0: dropout is keyed by ``seed_s``)."""
    for i_n in range(n_start, n_end):
        b_acc, b_l, b_m = _fwd_key_block(
            b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q,
            i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn, stride_vn=stride_vn,
            i_b=0, i_h=i_h, Hq=Hq, Lq=qlen, Lk=klen, D=D, DV=DV,
            offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right, slope=slope,
            sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed_s,
            p_mask_bh=p_q, stride_mask_m=0, stride_mask_n=0, row_lo=row_lo, row_hi=row_hi,  # no mask: p_q unread
            BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
            HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=False, MASK_IS_BOOL=False, HAS_LENGTHS=True, HAS_DROPOUT=HAS_DROPOUT,
            APPLY_INDEX_MASK=APPLY_INDEX_MASK, APPLY_ATTN_MASK=False, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
            USE_TMA=False,  # pointer loads
        )
    return b_acc, b_l, b_m


@triton.jit(do_not_specialize=["total_q", "window_left", "window_right", "seed"])
def attention_varlen_fwd_kernel(
    # pointers
    p_q, p_k, p_v, p_out, p_lse, p_cu_q, p_cu_k, p_alibi,
    # sizes
    Hq, GROUP, D, DV, total_q,
    # strides (the last dim of q, k, v, out is contiguous; lse is (Hq, total_q) contiguous)
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_om, stride_oh, stride_alibi_h,
    # scalars
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), num_seqs * Hq)``: one program per block of query rows of
    one (sequence, head). Head ``h`` reads kv head ``h // GROUP``."""
    i_m = tl.program_id(0)
    i_sh = tl.program_id(1)
    i_s = i_sh // Hq
    i_h = i_sh % Hq
    i_hk = i_h // GROUP
    q_start, qlen, k_start, klen, offset, seed_s = _sequence(p_cu_q, p_cu_k, i_s, seed)
    m0 = i_m * BLOCK_M
    if m0 >= qlen:  # past this sequence's queries (the grid is sized for the longest)
        return

    o_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] local query positions
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < qlen
    row_lo = m0
    row_hi = tl.minimum(m0 + BLOCK_M, qlen) - 1
    o_h64 = i_h.to(tl.int64)
    o_row64 = q_start.to(tl.int64) + o_m.to(tl.int64)  # [BLOCK_M] packed rows
    # The sequence's first key row: the shared step indexes keys by local position from here.
    k_bh = p_k + k_start.to(tl.int64) * stride_kn + i_hk.to(tl.int64) * stride_kh
    v_bh = p_v + k_start.to(tl.int64) * stride_vn + i_hk.to(tl.int64) * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(p_alibi + o_h64 * stride_alibi_h)

    # [BLOCK_M, BLOCK_D]
    o_q = o_row64 * stride_qm + o_h64 * stride_qh
    b_q = tl.load(p_q + (o_q[:, None] + o_d[None, :]), mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
    # [BLOCK_M, BLOCK_DV]
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # [BLOCK_M]
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # The visible band: masked edge blocks, unmasked interior, masked edge blocks. The sequence's
    # lengths play the padded kernel's (qlen, klen) with HAS_LENGTHS; there is no attn_mask.
    n_lo, n_mid_lo, n_mid_hi, n_hi = _key_block_range(
        m0=m0, qlen=qlen, klen=klen, offset=offset, window_left=window_left, window_right=window_right, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
    )
    b_acc, b_l, b_m = _fwd_key_blocks(
        b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, n_start=n_lo, n_end=n_mid_lo, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh,
        v_bh=v_bh, stride_kn=stride_kn, stride_vn=stride_vn, p_q=p_q, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen,
        D=D, DV=DV, offset=offset, window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
        softcap=softcap, dropout_p=dropout_p, seed_s=seed_s, row_lo=row_lo, row_hi=row_hi,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, DOT_PRECISION=DOT_PRECISION,
        DOT_FP32=DOT_FP32,
    )
    b_acc, b_l, b_m = _fwd_key_blocks(
        b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, n_start=n_mid_lo, n_end=n_mid_hi, o_m=o_m, o_d=o_d, o_dv=o_dv,
        k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn, stride_vn=stride_vn, p_q=p_q, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen,
        D=D, DV=DV, offset=offset, window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
        softcap=softcap, dropout_p=dropout_p, seed_s=seed_s, row_lo=row_lo, row_hi=row_hi,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=False, DOT_PRECISION=DOT_PRECISION,
        DOT_FP32=DOT_FP32,
    )
    b_acc, b_l, b_m = _fwd_key_blocks(
        b_acc=b_acc, b_l=b_l, b_m=b_m, b_q=b_q, n_start=n_mid_hi, n_end=n_hi, o_m=o_m, o_d=o_d, o_dv=o_dv, k_bh=k_bh,
        v_bh=v_bh, stride_kn=stride_kn, stride_vn=stride_vn, p_q=p_q, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen,
        D=D, DV=DV, offset=offset, window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
        softcap=softcap, dropout_p=dropout_p, seed_s=seed_s, row_lo=row_lo, row_hi=row_hi,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, DOT_PRECISION=DOT_PRECISION,
        DOT_FP32=DOT_FP32,
    )

    # Rows that saw no key output 0 and lse = -inf.
    m_row = (b_l > 0.0) & m_m
    # [BLOCK_M, BLOCK_DV]
    b_out = b_acc / tl.where(m_row, b_l, 1.0)[:, None]
    b_out = tl.where(m_row[:, None], b_out, 0.0)
    # [BLOCK_M]
    b_lse = tl.where(m_row, (b_m + tl.log2(tl.where(m_row, b_l, 1.0))) * 0.6931471805599453, float("-inf"))
    o_out = o_row64 * stride_om + o_h64 * stride_oh
    tl.store(p_out + (o_out[:, None] + o_dv[None, :]), b_out.to(p_out.dtype.element_ty),
             mask=m_m[:, None] & (o_dv[None, :] < DV))
    tl.store(p_lse + (o_h64 * total_q + o_row64), b_lse, mask=m_m)


def attention_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    window_left: int | None,
    window_right: int | None,
    softcap: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the varlen forward (``fastattn.ops.VARLEN_FWD_SCHEMA``).

    Args:
        q: ``(total_q, Hq, D)``; k: ``(total_k, Hkv, D)``; v: ``(total_k, Hkv, DV)``; any strides.
        cu_seqlens_q, cu_seqlens_k: int32 ``(num_seqs + 1,)`` on q's device (read by the kernel only).
        max_seqlen_q, max_seqlen_k: bounds of the sequence lengths; the grid is sized from max_seqlen_q.
        alibi_slopes: float32 ``(Hq,)`` or None.
        scale, window_left, window_right, softcap: as the padded forward (None = unbounded window).
        dropout_p, seed: dropout; sequence ``s`` draws the padded kernels' pattern for that sequence
            alone (batch 1, its own lengths) from ``seed + s``.

    Returns:
        ``out (total_q, Hq, DV)`` contiguous in q's dtype and ``lse (Hq, total_q)`` float32.
    """
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    total_q, Hq, D = q.shape
    Hkv, DV = k.shape[1], v.shape[2]
    out = q.new_empty((total_q, Hq, DV))
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out, lse
    block_d, block_dv = head_dim_tile(D), head_dim_tile(DV)
    # The padded kernels' tiles for these features (lean ones where dropout with softcap would spill).
    flags = feature_flags(None, alibi_slopes, None, window_left, window_right, softcap, dropout_p)
    meta = configs.pinned_config("fwd", max(block_d, block_dv), q.element_size(), flags)
    precision, dot_fp32 = dot_settings(q.dtype)
    bound = max_seqlen_q + max_seqlen_k + 1
    grid = (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), num_seqs * Hq)
    torch.library.wrap_triton(attention_varlen_fwd_kernel)[grid](
        p_q=q, p_k=k, p_v=v, p_out=out, p_lse=lse, p_cu_q=cu_seqlens_q, p_cu_k=cu_seqlens_k, p_alibi=alibi_slopes,
        Hq=Hq, GROUP=Hq // Hkv, D=D, DV=DV, total_q=total_q,
        stride_qm=q.stride(0), stride_qh=q.stride(1), stride_kn=k.stride(0), stride_kh=k.stride(1),
        stride_vn=v.stride(0), stride_vh=v.stride(1), stride_om=out.stride(0), stride_oh=out.stride(1),
        stride_alibi_h=alibi_slopes.stride(0) if alibi_slopes is not None else 0,
        sm_scale=float(scale), softcap=float(softcap),
        window_left=clamp_window(window_left, bound), window_right=clamp_window(window_right, bound),
        dropout_p=float(dropout_p), seed=int(seed),
        BLOCK_D=block_d, BLOCK_DV=block_dv, HAS_WINDOW_LEFT=window_left is not None,
        HAS_WINDOW_RIGHT=window_right is not None, HAS_ALIBI=alibi_slopes is not None,
        HAS_SOFTCAP=softcap_flag(softcap, q.dtype), HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=precision,
        DOT_FP32=dot_fp32, **meta,
    )
    return out, lse


# --------------------------------------------------------------------------- backward
@triton.jit
def _dkdv_query_blocks(
    b_dk, b_dv, b_k, b_v,  # [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV], [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV]
    m_start, m_end, o_n, o_d, o_dv, row_lo, row_hi, q_bh, do_bh, p_lse_bh, p_delta_bh, p_q, stride_qm, stride_dom,
    i_h, Hq, qlen, klen, D, DV, offset, window_left, window_right, slope, sm_scale, softcap, dropout_p, seed_s,
    BLOCK_M: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, APPLY_INDEX_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """dK, dV of one key block from query blocks ``[m_start, m_end)`` of one (sequence, query head)."""
    for i_m in range(m_start, m_end):
        b_dk, b_dv = _dkdv_query_block(
            b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v,
            i_m=i_m, o_n=o_n, o_d=o_d, o_dv=o_dv, row_lo=row_lo, row_hi=row_hi, q_bh=q_bh, do_bh=do_bh,
            p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh, p_dbias_bh=p_q, stride_qm=stride_qm, stride_dom=stride_dom,
            stride_dbias_m=0, stride_dbias_n=0, i_b=0, i_h=i_h, Hq=Hq, Lq=qlen, Lk=klen, D=D, DV=DV,
            offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right, slope=slope,
            sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed_s,
            p_mask_bh=p_q, stride_mask_m=0, stride_mask_n=0,  # no mask, no mask gradient: p_q is never read
            BLOCK_M=BLOCK_M, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
            HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=False, MASK_IS_BOOL=False, HAS_LENGTHS=True, HAS_DROPOUT=HAS_DROPOUT,
            APPLY_INDEX_MASK=APPLY_INDEX_MASK, APPLY_ATTN_MASK=False, COMPUTE_DBIAS=False,
            DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32, USE_TMA=False,  # pointer loads
        )
    return b_dk, b_dv


@triton.jit(do_not_specialize=["total_q", "window_left", "window_right", "seed"])
def attention_varlen_bwd_dkdv_kernel(
    # pointers
    p_q, p_k, p_v, p_dout, p_lse, p_delta, p_dk, p_dv, p_cu_q, p_cu_k, p_alibi,
    # sizes
    Hq, GROUP, D, DV, total_q,
    # strides (the last dim of every (total, H, D) tensor is contiguous; lse, delta (Hq, total_q) contiguous)
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dom, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_alibi_h,
    # scalars
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_k, BLOCK_N), num_seqs * Hkv)``: one program per key block of one
    (sequence, kv head); it loops over the GROUP query heads and the query blocks that see the block."""
    i_n = tl.program_id(0)
    i_shk = tl.program_id(1)
    Hkv = Hq // GROUP
    i_s = i_shk // Hkv
    i_hk = i_shk % Hkv
    q_start, qlen, k_start, klen, offset, seed_s = _sequence(p_cu_q, p_cu_k, i_s, seed)
    if i_n * BLOCK_N >= klen:  # past this sequence's keys
        return
    stride_qm = tl.cast(stride_qm, tl.int64)
    stride_dom = tl.cast(stride_dom, tl.int64)

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] local key positions
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_k = o_n < klen
    o_krow64 = k_start.to(tl.int64) + o_n.to(tl.int64)  # [BLOCK_N] packed rows
    # [BLOCK_N, BLOCK_D]
    b_k = tl.load(p_k + (o_krow64 * stride_kn + i_hk.to(tl.int64) * stride_kh)[:, None] + o_d[None, :],
                  mask=m_k[:, None] & (o_d[None, :] < D), other=0.0)
    # [BLOCK_N, BLOCK_DV]
    b_v = tl.load(p_v + (o_krow64 * stride_vn + i_hk.to(tl.int64) * stride_vh)[:, None] + o_dv[None, :],
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
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
    )
    for g in range(0, GROUP):
        i_h = i_hk * GROUP + g
        # The sequence's first query row of head i_h, and its lse / delta entries.
        q_bh = p_q + q_start.to(tl.int64) * stride_qm + i_h.to(tl.int64) * stride_qh
        do_bh = p_dout + q_start.to(tl.int64) * stride_dom + i_h.to(tl.int64) * stride_doh
        p_lse_bh = p_lse + i_h.to(tl.int64) * total_q + q_start
        p_delta_bh = p_delta + i_h.to(tl.int64) * total_q + q_start
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(p_alibi + i_h * stride_alibi_h)
        b_dk, b_dv = _dkdv_query_blocks(
            b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, m_start=m_lo, m_end=m_mid_lo, o_n=o_n, o_d=o_d, o_dv=o_dv,
            row_lo=row_lo, row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
            p_q=p_q, stride_qm=stride_qm, stride_dom=stride_dom, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen, D=D, DV=DV,
            offset=offset, window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
            softcap=softcap, dropout_p=dropout_p, seed_s=seed_s, BLOCK_M=BLOCK_M, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT,
            HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP,
            HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
        )
        b_dk, b_dv = _dkdv_query_blocks(
            b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, m_start=m_mid_lo, m_end=m_mid_hi, o_n=o_n, o_d=o_d, o_dv=o_dv,
            row_lo=row_lo, row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
            p_q=p_q, stride_qm=stride_qm, stride_dom=stride_dom, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen, D=D, DV=DV,
            offset=offset, window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
            softcap=softcap, dropout_p=dropout_p, seed_s=seed_s, BLOCK_M=BLOCK_M, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT,
            HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP,
            HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=False, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
        )
        b_dk, b_dv = _dkdv_query_blocks(
            b_dk=b_dk, b_dv=b_dv, b_k=b_k, b_v=b_v, m_start=m_mid_hi, m_end=m_hi, o_n=o_n, o_d=o_d, o_dv=o_dv,
            row_lo=row_lo, row_hi=row_hi, q_bh=q_bh, do_bh=do_bh, p_lse_bh=p_lse_bh, p_delta_bh=p_delta_bh,
            p_q=p_q, stride_qm=stride_qm, stride_dom=stride_dom, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen, D=D, DV=DV,
            offset=offset, window_left=window_left, window_right=window_right, slope=slope, sm_scale=sm_scale,
            softcap=softcap, dropout_p=dropout_p, seed_s=seed_s, BLOCK_M=BLOCK_M, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT,
            HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI, HAS_SOFTCAP=HAS_SOFTCAP,
            HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
        )

    b_dk = b_dk * sm_scale
    tl.store(p_dk + (o_krow64 * stride_dkn + i_hk.to(tl.int64) * stride_dkh)[:, None] + o_d[None, :],
             b_dk.to(p_dk.dtype.element_ty), mask=m_k[:, None] & (o_d[None, :] < D))
    tl.store(p_dv + (o_krow64 * stride_dvn + i_hk.to(tl.int64) * stride_dvh)[:, None] + o_dv[None, :],
             b_dv.to(p_dv.dtype.element_ty), mask=m_k[:, None] & (o_dv[None, :] < DV))


@triton.jit
def _dq_key_blocks(
    b_dq, b_q, b_do, b_lse2, b_delta,  # [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_DV], [BLOCK_M] x2
    n_start, n_end, o_m, o_d, o_dv, key_lo, key_hi, k_bh, v_bh, stride_kn, stride_vn, p_q, i_h, Hq, qlen, klen,
    D, DV, offset, window_left, window_right, slope, sm_scale, softcap, dropout_p, seed_s,
    BLOCK_N: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, APPLY_INDEX_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """dQ of one query block from key blocks ``[n_start, n_end)`` of one sequence."""
    for i_n in range(n_start, n_end):
        b_dq = _dq_key_block(
            b_dq=b_dq, b_q=b_q, b_do=b_do, b_shift=b_lse2, b_delta=b_delta,
            i_n=i_n, o_m=o_m, o_d=o_d, o_dv=o_dv, key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh,
            stride_kn=stride_kn, stride_vn=stride_vn, i_b=0, i_h=i_h, Hq=Hq, Lq=qlen, Lk=klen, D=D, DV=DV,
            offset=offset, qlen=qlen, klen=klen, window_left=window_left, window_right=window_right, slope=slope,
            sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed=seed_s,
            p_mask_bh=p_q, stride_mask_m=0, stride_mask_n=0,  # no mask: p_q is never read
            BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
            HAS_SOFTCAP=HAS_SOFTCAP, HAS_MASK=False, MASK_IS_BOOL=False, HAS_LENGTHS=True, HAS_DROPOUT=HAS_DROPOUT,
            APPLY_INDEX_MASK=APPLY_INDEX_MASK, APPLY_ATTN_MASK=False, DOT_PRECISION=DOT_PRECISION, DOT_FP32=DOT_FP32,
            USE_TMA=False,  # pointer loads
        )
    return b_dq


@triton.jit(do_not_specialize=["total_q", "window_left", "window_right", "seed"])
def attention_varlen_bwd_dq_kernel(
    # pointers
    p_q, p_k, p_v, p_dout, p_lse, p_delta, p_dq, p_cu_q, p_cu_k, p_alibi,
    # sizes
    Hq, GROUP, D, DV, total_q,
    # strides (the last dim of every (total, H, D) tensor is contiguous; lse, delta (Hq, total_q) contiguous)
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_dom, stride_doh,
    stride_dqm, stride_dqh, stride_alibi_h,
    # scalars
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), num_seqs * Hq)``: one program per query block of one
    (sequence, query head); the same key blocks as the forward."""
    i_m = tl.program_id(0)
    i_sh = tl.program_id(1)
    i_s = i_sh // Hq
    i_h = i_sh % Hq
    i_hk = i_h // GROUP
    q_start, qlen, k_start, klen, offset, seed_s = _sequence(p_cu_q, p_cu_k, i_s, seed)
    m0 = i_m * BLOCK_M
    if m0 >= qlen:  # past this sequence's queries
        return
    stride_kn = tl.cast(stride_kn, tl.int64)
    stride_vn = tl.cast(stride_vn, tl.int64)

    o_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] local query positions
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_q = o_m < qlen
    o_row64 = q_start.to(tl.int64) + o_m.to(tl.int64)  # [BLOCK_M] packed rows
    k_bh = p_k + k_start.to(tl.int64) * stride_kn + i_hk.to(tl.int64) * stride_kh
    v_bh = p_v + k_start.to(tl.int64) * stride_vn + i_hk.to(tl.int64) * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(p_alibi + i_h * stride_alibi_h)
    # [BLOCK_M, BLOCK_D]
    b_q = tl.load(p_q + (o_row64 * stride_qm + i_h.to(tl.int64) * stride_qh)[:, None] + o_d[None, :],
                  mask=m_q[:, None] & (o_d[None, :] < D), other=0.0)
    # [BLOCK_M, BLOCK_DV]
    b_do = tl.load(p_dout + (o_row64 * stride_dom + i_h.to(tl.int64) * stride_doh)[:, None] + o_dv[None, :],
                   mask=m_q[:, None] & (o_dv[None, :] < DV), other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    # [BLOCK_M]
    p_row = i_h.to(tl.int64) * total_q + q_start
    b_lse2, b_delta = _load_row_stats(p_lse + p_row, p_delta + p_row, o_m, qlen)
    # [BLOCK_M, BLOCK_D]
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys [key_lo, key_hi) are those some row of the block sees (the band with the roles swapped).
    key_lo, key_hi = _band_rows(
        n0=m0, n_end=tl.minimum(m0 + BLOCK_M, qlen), qlen=klen, offset=-offset, window_left=window_right,
        window_right=window_left, HAS_WINDOW_LEFT=HAS_WINDOW_RIGHT,
        HAS_WINDOW_RIGHT=HAS_WINDOW_LEFT,
    )
    n_lo, n_mid_lo, n_mid_hi, n_hi = _key_block_range(
        m0=m0, qlen=qlen, klen=klen, offset=offset, window_left=window_left, window_right=window_right, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT,
    )
    b_dq = _dq_key_blocks(
        b_dq=b_dq, b_q=b_q, b_do=b_do, b_lse2=b_lse2, b_delta=b_delta, n_start=n_lo, n_end=n_mid_lo, o_m=o_m, o_d=o_d,
        o_dv=o_dv, key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn, stride_vn=stride_vn,
        p_q=p_q, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen, D=D, DV=DV, offset=offset, window_left=window_left,
        window_right=window_right, slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed_s=seed_s,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, DOT_PRECISION=DOT_PRECISION,
        DOT_FP32=DOT_FP32,
    )
    b_dq = _dq_key_blocks(
        b_dq=b_dq, b_q=b_q, b_do=b_do, b_lse2=b_lse2, b_delta=b_delta, n_start=n_mid_lo, n_end=n_mid_hi, o_m=o_m,
        o_d=o_d, o_dv=o_dv, key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn,
        stride_vn=stride_vn,
        p_q=p_q, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen, D=D, DV=DV, offset=offset, window_left=window_left,
        window_right=window_right, slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed_s=seed_s,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=False, DOT_PRECISION=DOT_PRECISION,
        DOT_FP32=DOT_FP32,
    )
    b_dq = _dq_key_blocks(
        b_dq=b_dq, b_q=b_q, b_do=b_do, b_lse2=b_lse2, b_delta=b_delta, n_start=n_mid_hi, n_end=n_hi, o_m=o_m, o_d=o_d,
        o_dv=o_dv, key_lo=key_lo, key_hi=key_hi, k_bh=k_bh, v_bh=v_bh, stride_kn=stride_kn, stride_vn=stride_vn,
        p_q=p_q, i_h=i_h, Hq=Hq, qlen=qlen, klen=klen, D=D, DV=DV, offset=offset, window_left=window_left,
        window_right=window_right, slope=slope, sm_scale=sm_scale, softcap=softcap, dropout_p=dropout_p, seed_s=seed_s,
        BLOCK_N=BLOCK_N, HAS_WINDOW_LEFT=HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT=HAS_WINDOW_RIGHT, HAS_ALIBI=HAS_ALIBI,
        HAS_SOFTCAP=HAS_SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, APPLY_INDEX_MASK=True, DOT_PRECISION=DOT_PRECISION,
        DOT_FP32=DOT_FP32,
    )

    b_dq = b_dq * sm_scale
    tl.store(p_dq + (o_row64 * stride_dqm + i_h.to(tl.int64) * stride_dqh)[:, None] + o_d[None, :],
             b_dq.to(p_dq.dtype.element_ty), mask=m_q[:, None] & (o_d[None, :] < D))


def attention_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    window_left: int | None,
    window_right: int | None,
    softcap: float,
    dlse: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the varlen backward (``fastattn.ops.VARLEN_BWD_SCHEMA``).

    Args:
        dout, out: ``(total_q, Hq, DV)``; q, k, v, cu_seqlens, max_seqlen, alibi_slopes, scale, window,
            softcap: as :func:`attention_varlen_fwd` took them; lse: its ``(Hq, total_q)`` float32.
        dlse: float32 ``(Hq, total_q)``, the gradient w.r.t. lse, or None.
        dropout_p, seed: the forward's (the backward regenerates its pattern).

    Returns:
        ``dq (total_q, Hq, D)``, ``dk (total_k, Hkv, D)``, ``dv (total_k, Hkv, DV)``, contiguous.
    """
    q, k, v, dout, out = (last_dim_contiguous(t) for t in (q, k, v, dout, out))
    total_q, Hq, D = q.shape
    total_k, Hkv, DV = k.shape[0], k.shape[1], v.shape[2]
    dq = q.new_empty((total_q, Hq, D))
    dk = k.new_empty((total_k, Hkv, D))
    dv = v.new_empty((total_k, Hkv, DV))
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_seqs == 0 or total_q == 0 or total_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    # delta = rowsum(dO * O) - dlse, float32 (Hq, total_q): the padded preprocess kernel on a batch-1 view.
    delta = row_delta(out[None].transpose(1, 2), dout[None].transpose(1, 2))[0][0]
    if dlse is not None:
        delta = delta - dlse
    block_d, block_dv = head_dim_tile(D), head_dim_tile(DV)
    head_dim = max(block_d, block_dv)
    precision, dot_fp32 = dot_settings(q.dtype)
    bound = max_seqlen_q + max_seqlen_k + 1
    common = dict(
        p_q=q, p_k=k, p_v=v, p_dout=dout, p_lse=lse, p_delta=delta, p_cu_q=cu_seqlens_q, p_cu_k=cu_seqlens_k,
        p_alibi=alibi_slopes, Hq=Hq, GROUP=Hq // Hkv, D=D, DV=DV, total_q=total_q,
        stride_qm=q.stride(0), stride_qh=q.stride(1), stride_kn=k.stride(0), stride_kh=k.stride(1),
        stride_vn=v.stride(0), stride_vh=v.stride(1), stride_dom=dout.stride(0), stride_doh=dout.stride(1),
        stride_alibi_h=alibi_slopes.stride(0) if alibi_slopes is not None else 0,
        sm_scale=float(scale), softcap=float(softcap),
        window_left=clamp_window(window_left, bound), window_right=clamp_window(window_right, bound),
        dropout_p=float(dropout_p), seed=int(seed),
        BLOCK_D=block_d, BLOCK_DV=block_dv, HAS_WINDOW_LEFT=window_left is not None,
        HAS_WINDOW_RIGHT=window_right is not None, HAS_ALIBI=alibi_slopes is not None,
        HAS_SOFTCAP=softcap_flag(softcap, q.dtype), HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=precision,
        DOT_FP32=dot_fp32,
    )
    flags = feature_flags(None, alibi_slopes, None, window_left, window_right, softcap, dropout_p)
    meta = configs.pinned_config("dkdv", head_dim, q.element_size(), flags)
    torch.library.wrap_triton(attention_varlen_bwd_dkdv_kernel)[(triton.cdiv(max_seqlen_k, meta["BLOCK_N"]),
                                                                 num_seqs * Hkv)](
        **common, p_dk=dk, p_dv=dv, stride_dkn=dk.stride(0), stride_dkh=dk.stride(1), stride_dvn=dv.stride(0),
        stride_dvh=dv.stride(1), **meta,
    )
    # Keys of sequences no program reached (max_seqlen_k == 0 with empty sequences) do not exist:
    # cu_seqlens_k covers every packed key, and each lies in some program's block.
    meta = configs.pinned_config("dq", head_dim, q.element_size(), flags)
    torch.library.wrap_triton(attention_varlen_bwd_dq_kernel)[(triton.cdiv(max_seqlen_q, meta["BLOCK_M"]),
                                                               num_seqs * Hq)](
        **common, p_dq=dq, stride_dqm=dq.stride(0), stride_dqh=dq.stride(1), **meta,
    )
    return dq, dk, dv
