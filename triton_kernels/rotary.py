"""Rotary position embedding (RoPE): a fused Triton kernel and its launcher.

One program rotates a ``[BLOCK_L, BLOCK_R]`` tile of one (batch, head): the first ``rotary_dim``
features of ``x (B, L, H, D)`` at positions ``l + offsets[b]``, reading ``cos``/``sin`` tables
``(max_positions, rotary_dim // 2)``. Feature pairs follow one of two conventions::

    half-split (GPT-NeoX, Llama):  (x[i], x[i + rotary_dim/2])   for i < rotary_dim/2
    interleaved (GPT-J):           (x[2i], x[2i + 1])

and each pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``. The backward of a rotation is
the rotation by the opposite angle (``CONJUGATE``: ``sin -> -sin``). Features past ``rotary_dim``
pass through unchanged (copied by the launcher).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seqlen"])
def rotary_kernel(
    # pointers
    X, OUT, COS, SIN, OFFSETS,
    # sizes
    seqlen,
    # strides (elements); the last dim of X and OUT is contiguous
    stride_xb, stride_xl, stride_xh,
    stride_ob, stride_ol, stride_oh,
    stride_cos_l,
    # meta-parameters
    HALF: tl.constexpr,  # rotary_dim // 2
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next power of two >= HALF
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
):
    i_l, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L] row within the sequence
    o_r = tl.arange(0, BLOCK_R)  # [BLOCK_R] pair index
    m_tile = (o_l[:, None] < seqlen) & (o_r[None, :] < HALF)  # [BLOCK_L, BLOCK_R]

    # Row offsets in int64: B * L * H * D may pass 2**31 elements (and so may a row's stride times L).
    position = (o_l + tl.load(OFFSETS + i_b)).to(tl.int64)  # [BLOCK_L]
    o_cos = position[:, None] * stride_cos_l + o_r[None, :]  # [BLOCK_L, BLOCK_R]
    p_cos = COS + o_cos
    p_sin = SIN + o_cos
    b_cos = tl.load(p_cos, mask=m_tile, other=1.0).to(tl.float32)  # [BLOCK_L, BLOCK_R]
    b_sin = tl.load(p_sin, mask=m_tile, other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_R]
    if CONJUGATE:
        b_sin = -b_sin

    # The two features of pair r: (2r, 2r + 1) interleaved, (r, r + HALF) half-split.
    o_first = o_r * 2 if INTERLEAVED else o_r  # [BLOCK_R]
    o_second = o_first + 1 if INTERLEAVED else o_r + HALF  # [BLOCK_R]
    o_x = i_b.to(tl.int64) * stride_xb + i_h.to(tl.int64) * stride_xh + o_l.to(tl.int64) * stride_xl  # [BLOCK_L]
    b_a = tl.load(X + (o_x[:, None] + o_first[None, :]), mask=m_tile, other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_R]
    b_b = tl.load(X + (o_x[:, None] + o_second[None, :]), mask=m_tile, other=0.0).to(tl.float32)  # [BLOCK_L, BLOCK_R]

    b_out_a = b_a * b_cos - b_b * b_sin  # [BLOCK_L, BLOCK_R]
    b_out_b = b_b * b_cos + b_a * b_sin  # [BLOCK_L, BLOCK_R]
    o_out = i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + o_l.to(tl.int64) * stride_ol  # [BLOCK_L]
    tl.store(OUT + (o_out[:, None] + o_first[None, :]), b_out_a.to(OUT.dtype.element_ty), mask=m_tile)
    tl.store(OUT + (o_out[:, None] + o_second[None, :]), b_out_b.to(OUT.dtype.element_ty), mask=m_tile)


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offsets: torch.Tensor,
    *,
    interleaved: bool = False,
    conjugate: bool = False,
) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[1]`` features of ``x``; returns a new tensor.

    Args:
        x: ``(B, L, H, D)``, any strides with a unit last stride.
        cos, sin: ``(max_positions, rotary_dim // 2)``, float32, contiguous last dim.
        offsets: int32 ``(B,)``: the position of row 0 of each sequence; every
            ``offsets[b] + L - 1`` must be below ``max_positions`` (checked by the caller).
        interleaved: pairs ``(2i, 2i+1)`` (GPT-J) instead of ``(i, i + rotary_dim/2)`` (GPT-NeoX).
        conjugate: rotate by the opposite angle (the backward pass).
    """
    B, L, H, D = x.shape
    half = cos.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()  # the kernel indexes features with unit stride
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if 2 * half < D:
        out[..., 2 * half :] = x[..., 2 * half :]
    if x.numel() == 0:
        return out
    block_r = triton.next_power_of_2(half)
    block_l = max(1, min(triton.next_power_of_2(L), 4096 // block_r, 64))
    grid = (triton.cdiv(L, block_l), B, H)
    rotary_kernel[grid](
        x, out, cos, sin, offsets,
        seqlen=L,
        stride_xb=x.stride(0), stride_xl=x.stride(1), stride_xh=x.stride(2),
        stride_ob=out.stride(0), stride_ol=out.stride(1), stride_oh=out.stride(2),
        stride_cos_l=cos.stride(0),
        HALF=half, BLOCK_L=block_l, BLOCK_R=block_r, INTERLEAVED=interleaved, CONJUGATE=conjugate,
    )
    return out
