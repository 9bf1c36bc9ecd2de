"""Split-KV combine: merge the partial results of key-range splits by their log-sum-exp.

When the forward grid would underfill the GPU (decoding, speculative verification: few query
rows, long keys), ``attention_fwd`` gives each program a share of the key blocks. Split ``s``
writes, per query row, its softmax-normalised partial output ``out_s`` (float32) and
``lse_s = log(sum_j exp(s_j))`` over its keys (``-inf`` when it saw none). The merge is exact::

    lse = log(sum_s exp(lse_s))        out = sum_s exp(lse_s - lse) * out_s

A row that no split saw outputs 0 with ``lse = -inf`` (never NaN).

Kernels with an additive mask give each split's ``(m_s, log2(l_s))`` instead of ``lse_s`` (``PAIRS``):
a row under a mask at ``finfo(float32).min`` has ``lse_s = m_s + log(l_s)`` rounded to ``m_s``, so
the splits' weights ``l_s`` would be lost; the merge is then ``w_s = exp(m_s - max m) * l_s``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["Lq", "NUM_SPLITS"])
def attention_combine_kernel(
    # pointers
    p_out_part, p_lse_part, p_out, p_lse,
    # sizes
    Hq, Lq, DV, NUM_SPLITS,
    # strides (out_part is (splits, B, Hq, Lq, DV) and lse_part (splits, B, Hq, Lq), both contiguous)
    stride_part_s, stride_lse_s,
    stride_ob, stride_oh, stride_om,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, PAIRS: tl.constexpr = False,
):
    """Grid ``(B * Hq * Lq,)``: one program merges the splits of one query row into ``out``
    ``(B, Hq, Lq, DV)`` (any strides, unit last stride) and ``lse`` ``(B, Hq, Lq)`` float32. With
    ``PAIRS``, ``lse_part`` is ``(splits, 2, B, Hq, Lq)``: row maxima, then log2 sums."""
    i_row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Lq + i
    i_m = i_row % Lq
    i_b = i_row // Lq // Hq
    i_h = i_row // Lq % Hq
    o_s = tl.arange(0, BLOCK_S)
    o_dv = tl.arange(0, BLOCK_DV)
    m_s = o_s < NUM_SPLITS
    # [BLOCK_S]
    b_lse = tl.load(p_lse_part + (o_s.to(tl.int64) * stride_lse_s + i_row), mask=m_s, other=float("-inf"))
    b_max = tl.max(b_lse, 0)
    b_max_safe = tl.where(b_max == float("-inf"), 0.0, b_max)
    if PAIRS:
        b_log2_sum = tl.load(p_lse_part + (o_s.to(tl.int64) * stride_lse_s + stride_lse_s // 2 + i_row), mask=m_s,
                             other=float("-inf"))
        b_w = tl.exp2((b_lse - b_max_safe) * 1.4426950408889634 + b_log2_sum)  # 0 for splits that saw no key
    else:
        b_w = tl.exp(b_lse - b_max_safe)  # 0 for splits that saw no key
    b_sum = tl.sum(b_w, 0)
    m_seen = b_sum > 0.0
    # [BLOCK_S, BLOCK_DV]
    o_part = o_s.to(tl.int64)[:, None] * stride_part_s + (i_row * DV + o_dv[None, :])
    b_part = tl.load(p_out_part + o_part, mask=m_s[:, None] & (o_dv[None, :] < DV), other=0.0)
    # A split that saw no key wrote 0: select, so its weight 0 never multiplies anything else.
    b_part = tl.where(b_w[:, None] > 0.0, b_w[:, None] * b_part, 0.0)
    # [BLOCK_DV]
    b_out = tl.sum(b_part, 0) / tl.where(m_seen, b_sum, 1.0)
    b_out = tl.where(m_seen, b_out, 0.0)
    o_out = i_b * stride_ob + i_h * stride_oh + i_m * stride_om
    tl.store(p_out + (o_out + o_dv), b_out.to(p_out.dtype.element_ty), mask=o_dv < DV)
    tl.store(p_lse + i_row, tl.where(m_seen, b_max_safe + tl.log(tl.where(m_seen, b_sum, 1.0)), float("-inf")))


def attention_combine(out_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge split-KV partial results into ``out`` and ``lse`` (written in place).

    Args:
        out_part: float32 ``(S, B, Hq, Lq, DV)`` contiguous, each split's normalised output.
        lse_part: float32 ``(S, B, Hq, Lq)`` contiguous, each split's lse (``-inf``: no key seen), or
            ``(S, 2, B, Hq, Lq)``: each split's row max and log2 sum (see ``PAIRS``).
        out: ``(B, Hq, Lq, DV)``, any strides with a unit last stride.
        lse: float32 ``(B, Hq, Lq)`` contiguous.
    """
    S, B, Hq, Lq, DV = out_part.shape
    pairs = lse_part.dim() == 5
    if B * Hq * Lq == 0:
        return
    torch.library.wrap_triton(attention_combine_kernel)[(B * Hq * Lq,)](
        p_out_part=out_part, p_lse_part=lse_part, p_out=out, p_lse=lse,
        Hq=Hq, Lq=Lq, DV=DV, NUM_SPLITS=S,
        stride_part_s=out_part.stride(0), stride_lse_s=lse_part.stride(0),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2),
        BLOCK_S=triton.next_power_of_2(S), BLOCK_DV=triton.next_power_of_2(DV), PAIRS=pairs,
    )
