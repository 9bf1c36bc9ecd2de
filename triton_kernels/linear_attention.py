"""Chunked linear attention: forward and backward (the core, on feature-mapped queries and keys).

Semantics (``fastattn/linear/naive.py``): for ``q (B, Hq, L, M)``, ``k (B, Hkv, L, M)``,
``v (B, Hkv, L, Dv)`` and a float32 state ``S0 (B, Hkv, M, Dv)``,

    causal:      o_i = q_i @ (S0 + sum_{j <= i} k_j^T v_j)
    non-causal:  o_i = q_i @ (S0 + sum_j k_j^T v_j)
    final state:  S  = S0 + sum_j k_j^T v_j

The sequence is cut into chunks of ``BLOCK_T`` positions. Within a chunk the causal part is a
small quadratic block ``tril(q k^T) @ v``; the earlier chunks enter through the state, which is
carried in float32 registers ``[BLOCK_M, BLOCK_DV]`` (the whole feature and value width in one
tile). Normalisation is not done here: the caller appends a column of ones to ``v``.

Grid: the forward and the dQ kernel run one program per ``(batch, query head)``; each program
rebuilds its key/value head's state (no K/V repeat for GQA). The dK/dV kernel runs one program
per ``(batch, key/value head)`` and sums the query heads of its group in a loop, so nothing is
reduced with atomics. A state gradient ``dS`` (of the returned final state) flows backwards
through the chunks; ``dS0`` is its value before the first chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_fwd import dot_settings, head_dim_tile


# --------------------------------------------------------------------------- shared tile steps
@triton.jit
def _load_rows(p_head, o_l, m_t, stride_l, o_c, m_c, stride_c):
    """Rows ``o_l`` (valid where ``m_t``) and columns ``o_c`` (valid where ``m_c``) of one head, 0 elsewhere."""
    # [BLOCK_T, BLOCK_C]
    return tl.load(p_head + o_l[:, None] * stride_l + o_c[None, :] * stride_c, mask=m_t[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _store_rows(p_head, o_l, m_t, stride_l, o_c, m_c, stride_c, b_x):
    tl.store(p_head + o_l[:, None] * stride_l + o_c[None, :] * stride_c, b_x.to(p_head.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _outer_sum(b_x, b_y, DOT_PRECISION: tl.constexpr):
    """``x^T y`` in float32: a chunk's contribution to a state (or to a state gradient)."""
    # [BLOCK_M, BLOCK_DV]
    return tl.dot(tl.trans(b_x.to(tl.float32)), b_y.to(tl.float32), input_precision=DOT_PRECISION)


@triton.jit
def _causal_block(b_x, b_y, o_t, DOT_PRECISION: tl.constexpr):
    """``x_i . y_j`` within one chunk, kept where ``j <= i`` (the chunk's own causal part)."""
    # [BLOCK_T, BLOCK_T]
    return tl.where(o_t[:, None] >= o_t[None, :], tl.dot(b_x, tl.trans(b_y), input_precision=DOT_PRECISION), 0.0)


@triton.jit
def _whole_sequence_state(b_s, p_k0, p_v0, L, stride_kl, stride_km, stride_vl, stride_vd, o_t, o_m, m_m, o_v, m_v,
                          BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``b_s + sum_j k_j^T v_j`` over the sequence: the state every non-causal query reads (and,
    given ``q`` and ``dO`` for ``k`` and ``v``, the gradient of that state)."""
    for i_c in range(0, tl.cdiv(L, BLOCK_T)):
        o_l = i_c * BLOCK_T + o_t
        m_t = o_l < L
        b_k = _load_rows(  # [BLOCK_T, BLOCK_M]
            p_head=p_k0, o_l=o_l, m_t=m_t, stride_l=stride_kl, o_c=o_m, m_c=m_m, stride_c=stride_km,
        )
        b_v = _load_rows(  # [BLOCK_T, BLOCK_DV]
            p_head=p_v0, o_l=o_l, m_t=m_t, stride_l=stride_vl, o_c=o_v, m_c=m_v, stride_c=stride_vd,
        )
        b_s += _outer_sum(b_k, b_v, DOT_PRECISION)
    return b_s


# --------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["L"])
def linear_attention_fwd_kernel(
    # pointers
    Q, K, V, S0, O, ST,
    # sizes
    L, M, DV, Hq, Hkv,
    # strides
    stride_qb, stride_qh, stride_ql, stride_qm,
    stride_kb, stride_kh, stride_kl, stride_km,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    # meta-parameters
    IS_CAUSAL: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, STORE_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // Hq, i_bh % Hq
    group = Hq // Hkv
    i_hk = i_h // group
    o_t = tl.arange(0, BLOCK_T)
    o_m = tl.arange(0, BLOCK_M)
    o_v = tl.arange(0, BLOCK_DV)
    m_m, m_v = o_m < M, o_v < DV
    # state (B, Hkv, M, DV) float32, contiguous
    p_state = (i_b * Hkv + i_hk).to(tl.int64) * M * DV + o_m[:, None] * DV + o_v[None, :]
    m_state = m_m[:, None] & m_v[None, :]
    # [BLOCK_M, BLOCK_DV]
    b_s = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_INITIAL_STATE:
        b_s = tl.load(S0 + p_state, mask=m_state, other=0.0)
    p_q0 = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_o0 = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    if not IS_CAUSAL:
        b_s = _whole_sequence_state(
            b_s=b_s, p_k0=p_k0, p_v0=p_v0, L=L, stride_kl=stride_kl, stride_km=stride_km, stride_vl=stride_vl,
            stride_vd=stride_vd, o_t=o_t, o_m=o_m, m_m=m_m,
            o_v=o_v, m_v=m_v, BLOCK_T=BLOCK_T, DOT_PRECISION=DOT_PRECISION,
        )
    for i_c in range(0, tl.cdiv(L, BLOCK_T)):
        o_l = i_c * BLOCK_T + o_t
        m_t = o_l < L
        b_q = _load_rows(  # [BLOCK_T, BLOCK_M]
            p_head=p_q0, o_l=o_l, m_t=m_t, stride_l=stride_ql, o_c=o_m, m_c=m_m, stride_c=stride_qm,
        )
        # [BLOCK_T, BLOCK_DV]: the state's part (earlier chunks, or everything when not causal)
        b_o = tl.dot(b_q.to(tl.float32), b_s, input_precision=DOT_PRECISION)
        if IS_CAUSAL:
            b_k = _load_rows(  # [BLOCK_T, BLOCK_M]
                p_head=p_k0, o_l=o_l, m_t=m_t, stride_l=stride_kl, o_c=o_m, m_c=m_m, stride_c=stride_km,
            )
            b_v = _load_rows(  # [BLOCK_T, BLOCK_DV]
                p_head=p_v0, o_l=o_l, m_t=m_t, stride_l=stride_vl, o_c=o_v, m_c=m_v, stride_c=stride_vd,
            )
            b_a = _causal_block(b_q, b_k, o_t, DOT_PRECISION)  # [BLOCK_T, BLOCK_T]
            b_o += tl.dot(b_a.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
            b_s += _outer_sum(b_k, b_v, DOT_PRECISION)
        _store_rows(
            p_head=p_o0, o_l=o_l, m_t=m_t, stride_l=stride_ol, o_c=o_v, m_c=m_v, stride_c=stride_od, b_x=b_o,
        )
    if STORE_STATE:
        if i_h % group == 0:  # every head of the group holds the same state; one writes it
            tl.store(ST + p_state, b_s, mask=m_state)


# --------------------------------------------------------------------------- backward: dQ
@triton.jit(do_not_specialize=["L"])
def linear_attention_bwd_dq_kernel(
    # pointers
    K, V, S0, DO, DQ,
    # sizes
    L, M, DV, Hq, Hkv,
    # strides (dQ shares q's layout, dO shares o's)
    stride_kb, stride_kh, stride_kl, stride_km,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqm,
    # meta-parameters
    IS_CAUSAL: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # dq_i = dO_i @ S_i^T with S_i the state query i read: causal, dq = dO @ S^T + tril(dO v^T) @ k
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // Hq, i_bh % Hq
    i_hk = i_h // (Hq // Hkv)
    o_t = tl.arange(0, BLOCK_T)
    o_m = tl.arange(0, BLOCK_M)
    o_v = tl.arange(0, BLOCK_DV)
    m_m, m_v = o_m < M, o_v < DV
    # [BLOCK_M, BLOCK_DV]
    b_s = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_INITIAL_STATE:
        p_state = (i_b * Hkv + i_hk).to(tl.int64) * M * DV + o_m[:, None] * DV + o_v[None, :]
        b_s = tl.load(S0 + p_state, mask=m_m[:, None] & m_v[None, :], other=0.0)
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_do0 = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    p_dq0 = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    if not IS_CAUSAL:
        b_s = _whole_sequence_state(
            b_s=b_s, p_k0=p_k0, p_v0=p_v0, L=L, stride_kl=stride_kl, stride_km=stride_km, stride_vl=stride_vl,
            stride_vd=stride_vd, o_t=o_t, o_m=o_m, m_m=m_m,
            o_v=o_v, m_v=m_v, BLOCK_T=BLOCK_T, DOT_PRECISION=DOT_PRECISION,
        )
    for i_c in range(0, tl.cdiv(L, BLOCK_T)):
        o_l = i_c * BLOCK_T + o_t
        m_t = o_l < L
        b_do = _load_rows(  # [BLOCK_T, BLOCK_DV]
            p_head=p_do0, o_l=o_l, m_t=m_t, stride_l=stride_dol, o_c=o_v, m_c=m_v, stride_c=stride_dod,
        )
        # [BLOCK_T, BLOCK_M]
        b_dq = tl.dot(b_do.to(tl.float32), tl.trans(b_s), input_precision=DOT_PRECISION)
        if IS_CAUSAL:
            b_k = _load_rows(  # [BLOCK_T, BLOCK_M]
                p_head=p_k0, o_l=o_l, m_t=m_t, stride_l=stride_kl, o_c=o_m, m_c=m_m, stride_c=stride_km,
            )
            b_v = _load_rows(  # [BLOCK_T, BLOCK_DV]
                p_head=p_v0, o_l=o_l, m_t=m_t, stride_l=stride_vl, o_c=o_v, m_c=m_v, stride_c=stride_vd,
            )
            b_a = _causal_block(b_do, b_v, o_t, DOT_PRECISION)  # [BLOCK_T, BLOCK_T]: dO_i . v_j, j <= i
            b_dq += tl.dot(b_a.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
            b_s += _outer_sum(b_k, b_v, DOT_PRECISION)
        _store_rows(
            p_head=p_dq0, o_l=o_l, m_t=m_t, stride_l=stride_dql, o_c=o_m, m_c=m_m, stride_c=stride_dqm, b_x=b_dq,
        )


# --------------------------------------------------------------------------- backward: dK, dV, dS0
@triton.jit(do_not_specialize=["L"])
def linear_attention_bwd_dkv_kernel(
    # pointers
    Q, K, V, DO, DST, DK, DV_, DS0,
    # sizes
    L, M, DV, Hq, Hkv,
    # strides (dK shares k's layout, dV shares v's)
    stride_qb, stride_qh, stride_ql, stride_qm,
    stride_kb, stride_kh, stride_kl, stride_km,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkm,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    # meta-parameters
    IS_CAUSAL: tl.constexpr, HAS_STATE_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # dH: the gradient of the state that chunk c's keys/values are added to, summed over the group
    # and the later chunks: dH = dS + sum_{later} q^T dO. Then dk = v @ dH^T + (intra-chunk) and
    # dv = k @ dH + (intra-chunk); dS0 = dH after the first chunk.
    i_bh = tl.program_id(0)
    i_b, i_hk = i_bh // Hkv, i_bh % Hkv
    group = Hq // Hkv
    o_t = tl.arange(0, BLOCK_T)
    o_m = tl.arange(0, BLOCK_M)
    o_v = tl.arange(0, BLOCK_DV)
    m_m, m_v = o_m < M, o_v < DV
    p_state = (i_b * Hkv + i_hk).to(tl.int64) * M * DV + o_m[:, None] * DV + o_v[None, :]
    m_state = m_m[:, None] & m_v[None, :]
    # [BLOCK_M, BLOCK_DV]
    b_dh = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_STATE_GRAD:
        b_dh = tl.load(DST + p_state, mask=m_state, other=0.0)
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    p_dk0 = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    p_dv0 = DV_ + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    num_chunks = tl.cdiv(L, BLOCK_T)
    if not IS_CAUSAL:
        # dH = dS + sum over the group's heads of Q^T dO: the whole-sequence state's gradient
        for i_g in range(0, group):
            i_h = i_hk * group + i_g
            p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
            p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
            b_dh = _whole_sequence_state(
                b_s=b_dh, p_k0=p_q, p_v0=p_do, L=L, stride_kl=stride_ql, stride_km=stride_qm, stride_vl=stride_dol,
                stride_vd=stride_dod, o_t=o_t, o_m=o_m,
                m_m=m_m, o_v=o_v, m_v=m_v, BLOCK_T=BLOCK_T, DOT_PRECISION=DOT_PRECISION,
            )
    for i_r in range(0, num_chunks):
        i_c = num_chunks - 1 - i_r if IS_CAUSAL else i_r
        o_l = i_c * BLOCK_T + o_t
        m_t = o_l < L
        b_k = _load_rows(  # [BLOCK_T, BLOCK_M]
            p_head=p_k0, o_l=o_l, m_t=m_t, stride_l=stride_kl, o_c=o_m, m_c=m_m, stride_c=stride_km,
        )
        b_v = _load_rows(  # [BLOCK_T, BLOCK_DV]
            p_head=p_v0, o_l=o_l, m_t=m_t, stride_l=stride_vl, o_c=o_v, m_c=m_v, stride_c=stride_vd,
        )
        # [BLOCK_T, BLOCK_M]
        b_dk = tl.dot(b_v.to(tl.float32), tl.trans(b_dh), input_precision=DOT_PRECISION)
        # [BLOCK_T, BLOCK_DV]
        b_dv = tl.dot(b_k.to(tl.float32), b_dh, input_precision=DOT_PRECISION)
        if IS_CAUSAL:
            # [BLOCK_M, BLOCK_DV]: this chunk's queries reach the earlier chunks' keys, added once it is done
            b_dh_chunk = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            for i_g in range(0, group):
                i_h = i_hk * group + i_g
                p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
                p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                b_q = _load_rows(  # [BLOCK_T, BLOCK_M]
                    p_head=p_q, o_l=o_l, m_t=m_t, stride_l=stride_ql, o_c=o_m, m_c=m_m, stride_c=stride_qm,
                )
                b_do = _load_rows(  # [BLOCK_T, BLOCK_DV]
                    p_head=p_do, o_l=o_l, m_t=m_t, stride_l=stride_dol, o_c=o_v, m_c=m_v, stride_c=stride_dod,
                )
                # [BLOCK_T, BLOCK_T] over (query i, key j), kept where j <= i
                b_dov = _causal_block(b_do, b_v, o_t, DOT_PRECISION)
                b_qk = _causal_block(b_q, b_k, o_t, DOT_PRECISION)
                b_dk += tl.dot(tl.trans(b_dov).to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
                b_dv += tl.dot(tl.trans(b_qk).to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
                b_dh_chunk += _outer_sum(b_q, b_do, DOT_PRECISION)
            b_dh += b_dh_chunk
        _store_rows(
            p_head=p_dk0, o_l=o_l, m_t=m_t, stride_l=stride_dkl, o_c=o_m, m_c=m_m, stride_c=stride_dkm, b_x=b_dk,
        )
        _store_rows(
            p_head=p_dv0, o_l=o_l, m_t=m_t, stride_l=stride_dvl, o_c=o_v, m_c=m_v, stride_c=stride_dvd, b_x=b_dv,
        )
    tl.store(DS0 + p_state, b_dh, mask=m_state)


# --------------------------------------------------------------------------- launchers
def _tiles(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> dict:
    precision, _ = dot_settings(q.dtype)
    return {
        "BLOCK_T": chunk_size, "BLOCK_M": head_dim_tile(q.shape[-1]), "BLOCK_DV": head_dim_tile(v.shape[-1]),
        "DOT_PRECISION": precision,
    }


def check_chunk_size(chunk_size: int) -> None:
    """The kernels' chunk is one tile: a power of two, at least 16 (``tl.dot``'s minimum)."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Triton kernels, got {chunk_size}")


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, causal: bool,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the core. ``q (B, Hq, L, M)``, ``k (B, Hkv, L, M)``, ``v (B, Hkv, L, Dv)`` of one
    dtype, ``initial_state (B, Hkv, M, Dv)`` float32 or None. Returns ``(o (B, Hq, L, Dv)`` in v's
    dtype, ``state (B, Hkv, M, Dv)`` float32)."""
    check_chunk_size(chunk_size)
    B, Hq, L, M = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    o = torch.empty(B, Hq, L, Dv, dtype=v.dtype, device=v.device)
    state = torch.empty(B, Hkv, M, Dv, dtype=torch.float32, device=v.device)
    s0 = None if initial_state is None else initial_state.float().contiguous()  # the kernel indexes it densely
    torch.library.wrap_triton(linear_attention_fwd_kernel)[(B * Hq,)](
        q, k, v, s0 if s0 is not None else state, o, state,
        L, M, Dv, Hq, Hkv,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        IS_CAUSAL=causal, HAS_INITIAL_STATE=s0 is not None, STORE_STATE=True,
        **_tiles(q, v, chunk_size), num_warps=4,
    )
    return o, state


def linear_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, initial_state: torch.Tensor | None,
    d_state: torch.Tensor | None, causal: bool, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the core: ``(dq, dk, dv, d_initial_state)`` (the last float32 ``(B, Hkv, M, Dv)``)."""
    check_chunk_size(chunk_size)
    B, Hq, L, M = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ds0 = torch.empty(B, Hkv, M, Dv, dtype=torch.float32, device=v.device)
    s0 = None if initial_state is None else initial_state.float().contiguous()  # indexed densely
    dst = None if d_state is None else d_state.float().contiguous()  # indexed densely
    tiles = _tiles(q, v, chunk_size)
    torch.library.wrap_triton(linear_attention_bwd_dq_kernel)[(B * Hq,)](
        k, v, s0 if s0 is not None else ds0, do, dq,
        L, M, Dv, Hq, Hkv,
        *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        IS_CAUSAL=causal, HAS_INITIAL_STATE=s0 is not None, **tiles, num_warps=4,
    )
    torch.library.wrap_triton(linear_attention_bwd_dkv_kernel)[(B * Hkv,)](
        q, k, v, do, dst if dst is not None else ds0, dk, dv, ds0,
        L, M, Dv, Hq, Hkv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        IS_CAUSAL=causal, HAS_STATE_GRAD=dst is not None, **tiles, num_warps=4,
    )
    return dq, dk, dv, ds0
