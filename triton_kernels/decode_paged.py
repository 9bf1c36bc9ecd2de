"""Decode attention against a KV cache read in place: contiguous, or paged through ``block_table``.

``q (B, Lq, Hq, D)`` (a few query positions per sequence: decode, speculative verification) against
a cache ``(B_cache, L_max, Hkv, D)`` or pages ``(num_pages, page_size, Hkv, D)``. Sequence ``b`` has
``L_b = cache_seqlens[b] + Lnew`` keys, read from device memory by the kernel: nothing here reads a
value on the host, and every buffer's size follows from shapes alone, so a launch can be captured in
a CUDA graph.

Grid ``(B * Hkv, S)``: a program owns one GQA group (the ``Hq / Hkv`` query heads sharing a
key/value head, times the ``Lq`` query positions: one tile of rows, so each key/value tile is loaded
once for the group) and split ``s`` of the keys the group's rows may see (split-KV). Per key tile::

    pos   = n0 + arange(BLOCK_N)                                   # [BLOCK_N] key positions
    page  = block_table[b, pos // page_size]; slot = pos % page_size  (contiguous: row b, slot pos)
    K, V  = cache[page, slot, hk, :]                               # [BLOCK_N, D], only pos < L_b
    S     = scale * Q K^T -> softcap, ALiBi, band                  # [BLOCK_M, BLOCK_N]
    online softmax (m, l, acc)                                     # acc [BLOCK_M, DV]

Query ``i`` sits at position ``L_b - Lq + i`` (bottom-right). Split ``s`` writes its normalised
partial output and lse; ``attention_combine`` merges the splits (the same merge as the forward's
split-KV).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_combine import attention_combine


@triton.jit
def decode_paged_kernel(
    # pointers
    p_q, p_k, p_v, p_seqlens, p_table, p_rows, p_alibi, p_out_part, p_lse_part,
    # sizes
    Lq, Hq, Hkv, GROUP, D, DV, LNEW, PAGE_SIZE, NUM_SPLITS,
    # strides: q (B, Lq, Hq, D); caches (rows or pages, slots, Hkv, *); table (B, pages); alibi (B, Hq)
    stride_qb, stride_ql, stride_qh,
    stride_k0, stride_k1, stride_kh,
    stride_v0, stride_v1, stride_vh,
    stride_tb, stride_tp, stride_ab, stride_ah,
    # scalars
    scale, softcap, window_left, window_right,
    # meta-parameters
    PAGED: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b = (i_bh // Hkv).to(tl.int64)
    i_hk = i_bh % Hkv
    klen = tl.load(p_seqlens + i_b).to(tl.int64) + LNEW
    # Rows of the tile: r = g * Lq + i (query head hk * GROUP + g, query position i).
    o_m = tl.arange(0, BLOCK_M)
    m_rows = o_m < GROUP * Lq
    o_i = o_m % Lq
    o_h = i_hk * GROUP + o_m // Lq
    qpos = klen - Lq + o_i  # [BLOCK_M] each query's position in its sequence
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    # [BLOCK_M, BLOCK_D]
    b_q = tl.load(p_q + (i_b * stride_qb + o_i.to(tl.int64)[:, None] * stride_ql + o_h.to(tl.int64)[:, None] * stride_qh
                         + o_d[None, :]), mask=m_rows[:, None] & (o_d[None, :] < D), other=0.0).to(tl.float32)
    if HAS_ALIBI:
        b_slope = tl.load(p_alibi + i_b * stride_ab + o_h.to(tl.int64) * stride_ah, mask=m_rows, other=0.0)
    # Keys any row of the group may see: [lo, hi).
    lo = 0
    hi = klen
    if HAS_LEFT:
        lo = tl.maximum(klen - Lq - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(klen, klen + window_right)
    per_split = tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS)
    s_lo = tl.minimum(lo + i_s * per_split, hi)
    s_hi = tl.minimum(s_lo + per_split, hi)
    if PAGED:
        row = 0
    elif HAS_ROWS:
        row = tl.load(p_rows + i_b).to(tl.int64)
    else:
        row = i_b

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(s_lo, s_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        m_pos = pos < s_hi
        if PAGED:
            page = tl.load(p_table + i_b * stride_tb + (pos // PAGE_SIZE) * stride_tp, mask=m_pos, other=0).to(tl.int64)
            slot = pos % PAGE_SIZE
        else:
            page = row + pos * 0
            slot = pos
        o_k = page * stride_k0 + slot * stride_k1 + i_hk * stride_kh
        o_v = page * stride_v0 + slot * stride_v1 + i_hk * stride_vh
        # [BLOCK_N, BLOCK_D], [BLOCK_N, BLOCK_DV]: slots past the split (or the sequence) are not read
        b_k = tl.load(p_k + (o_k[:, None] + o_d[None, :]), mask=m_pos[:, None] & (o_d[None, :] < D), other=0.0)
        b_v = tl.load(p_v + (o_v[:, None] + o_dv[None, :]), mask=m_pos[:, None] & (o_dv[None, :] < DV), other=0.0)
        # [BLOCK_M, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k.to(tl.float32)), input_precision="ieee") * scale
        if HAS_SOFTCAP:
            b_s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * b_s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
        if HAS_ALIBI:
            b_s -= b_slope[:, None] * tl.abs(qpos[:, None] - pos[None, :]).to(tl.float32)
        m_vis = m_rows[:, None] & m_pos[None, :]
        if HAS_LEFT:
            m_vis &= pos[None, :] >= qpos[:, None] - window_left
        if HAS_RIGHT:
            m_vis &= pos[None, :] <= qpos[:, None] + window_right
        b_s = tl.where(m_vis, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_p = tl.where(m_vis, tl.exp(b_s - m_safe[:, None]), 0.0)
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m_safe))
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p, b_v.to(tl.float32), input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0
    b_out = acc / tl.where(seen, l_i, 1.0)[:, None]
    b_lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    # Partials (S, B, Hq, Lq, DV) and (S, B, Hq, Lq), contiguous, as attention_combine reads them.
    B = tl.num_programs(0) // Hkv
    o_row = ((i_s * B + i_b) * Hq + o_h.to(tl.int64)) * Lq + o_i
    tl.store(p_out_part + (o_row[:, None] * DV + o_dv[None, :]), b_out, mask=m_rows[:, None] & (o_dv[None, :] < DV))
    tl.store(p_lse_part + o_row, b_lse, mask=m_rows)


def choose_splits(batch: int, heads_kv: int, capacity: int, sms: int) -> int:
    """Splits from shapes only (never from lengths, so a captured graph stays valid): about two
    programs per SM, each split at least 256 keys of the cache's capacity."""
    if sms <= 0:
        return max(1, min(4, triton.cdiv(capacity, 256)))
    return max(1, min(triton.cdiv(2 * sms, max(batch * heads_kv, 1)), triton.cdiv(capacity, 256), 64))


def decode_paged(q, k_cache, v_cache, cache_seqlens, *, lnew: int = 0, block_table=None, cache_batch_idx=None,
                 alibi_slopes=None, scale: float, softcap: float = 0.0, window_left=None, window_right=None,
                 num_splits: int | None = None):
    """Launch the decode kernel and the split merge; the caller has checked every argument.

    Args:
        q: ``(B, Lq, Hq, D)``, unit last stride.
        k_cache, v_cache: ``(B_cache, L_max, Hkv, D/DV)`` or paged ``(num_pages, page_size, Hkv, D/DV)``.
        cache_seqlens: int ``(B,)`` on q's device: keys per sequence before the ``lnew`` appended ones.
        block_table: int ``(B, max_pages)`` for a paged cache. cache_batch_idx: int ``(B,)`` cache rows.
        alibi_slopes: float32 ``(B, Hq)`` or None. window_left/right: None = unbounded.

    Returns:
        ``out (B, Lq, Hq, DV)`` in q's dtype and ``lse (B, Hq, Lq)`` float32.
    """
    B, Lq, Hq, D = q.shape
    Hkv, DV = k_cache.shape[2], v_cache.shape[3]
    group = Hq // Hkv
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 0
        num_splits = choose_splits(B, Hkv, capacity, sms)
    out = q.new_empty((B, Lq, Hq, DV))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    if B * Lq * Hq == 0:
        return out, lse
    out_part = q.new_empty((num_splits, B, Hq, Lq, DV), dtype=torch.float32)
    lse_part = q.new_empty((num_splits, B, Hq, Lq), dtype=torch.float32)
    dummy = cache_seqlens
    table = block_table if paged else dummy
    slopes = alibi_slopes if alibi_slopes is not None else q.new_empty((1, 1), dtype=torch.float32)
    torch.library.wrap_triton(decode_paged_kernel)[(B * Hkv, num_splits)](
        q, k_cache, v_cache, cache_seqlens, table, cache_batch_idx if cache_batch_idx is not None else dummy, slopes,
        out_part, lse_part,
        Lq, Hq, Hkv, group, D, DV, lnew, k_cache.shape[1] if paged else 1, num_splits,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0), table.stride(1) if paged else 0, slopes.stride(0), slopes.stride(1),
        scale, softcap, window_left or 0, window_right or 0,
        PAGED=paged, HAS_ROWS=cache_batch_idx is not None, HAS_LEFT=window_left is not None,
        HAS_RIGHT=window_right is not None, HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0,
        BLOCK_M=max(16, triton.next_power_of_2(group * Lq)), BLOCK_N=16 if capacity <= 64 else 64,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
    )
    attention_combine(out_part, lse_part, out.transpose(1, 2), lse)
    return out, lse
