"""Plain-PyTorch linear attention in three forms, the reference of the kernels.

All three compute, for features ``phi_q (B, Hq, L, M)``, ``phi_k (B, Hkv, L, M)`` and values
``v (B, Hkv, L, Dv)`` (query head ``h`` reads key/value head ``h // (Hq // Hkv)``), the
*unnormalised* linear attention with an initial state ``S0 (B, Hkv, M, Dv)``::

    causal:      o_i = phi_q_i @ (S0 + sum_{j <= i} phi_k_j^T v_j)
    non-causal:  o_i = phi_q_i @ (S0 + sum_{j} phi_k_j^T v_j)
    final state:  S  = S0 + sum_{j} phi_k_j^T v_j

* :func:`parallel`: the ``(L, L)`` score matrix, causal by a mask; computed in the inputs' dtype
  (it also serves as "PyTorch in low precision" for the tolerance rule).
* :func:`recurrent`: token by token, the state carried in float32 (float64 for float64 inputs).
* :func:`chunked`: a quadratic block inside each chunk plus the state carried between chunks;
  differentiable by autograd, it is also the CPU path of :func:`fastattn.linear_attention`.

Normalisation (``o_i / (phi_q_i . z_i)``, ``z`` the running sum of ``phi_k``) is the same
computation with a column of ones appended to ``v``: see :func:`with_normalizer`.
"""

from __future__ import annotations

import torch


def _grouped(phi_q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    B, Hq, L, M = phi_q.shape
    return phi_q.view(B, heads_kv, Hq // heads_kv, L, M)  # (B, Hkv, G, L, M): no K/V repeat needed


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _initial(phi_k, v, initial_state, dtype):
    B, Hkv, _, M = phi_k.shape
    if initial_state is None:
        return torch.zeros(B, Hkv, M, v.shape[-1], dtype=dtype, device=v.device)
    return initial_state.to(dtype)


def parallel(phi_q, phi_k, v, causal: bool, initial_state=None):
    """Materialised form. Returns ``(o (B, Hq, L, Dv), state (B, Hkv, M, Dv))`` in the inputs' dtype."""
    B, Hq, L, M = phi_q.shape
    Hkv = phi_k.shape[1]
    state0 = _initial(phi_k, v, initial_state, v.dtype)
    q = _grouped(phi_q, Hkv)  # (B, Hkv, G, L, M)
    scores = q @ phi_k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, L, L)
    if causal:
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=v.device).tril(), 0)
    o = scores @ v.unsqueeze(2) + q @ state0.unsqueeze(2)  # (B, Hkv, G, L, Dv)
    state = state0 + phi_k.transpose(-1, -2) @ v
    return o.reshape(B, Hq, L, v.shape[-1]), state


def recurrent(phi_q, phi_k, v, causal: bool, initial_state=None):
    """Token-by-token form; each step costs ``O(M * Dv)``. Returns ``(o, state)``, state in float32+."""
    B, Hq, L, M = phi_q.shape
    Hkv = phi_k.shape[1]
    dtype = _state_dtype(v.dtype)
    state = _initial(phi_k, v, initial_state, dtype)
    q = _grouped(phi_q, Hkv).to(dtype)
    k, vv = phi_k.to(dtype), v.to(dtype)
    if not causal:
        for t in range(L):
            state = state + k[:, :, t, :, None] * vv[:, :, t, None, :]
        return (q @ state.unsqueeze(2)).reshape(B, Hq, L, v.shape[-1]), state
    outs = []
    for t in range(L):
        state = state + k[:, :, t, :, None] * vv[:, :, t, None, :]  # (B, Hkv, M, Dv)
        outs.append(q[:, :, :, t : t + 1] @ state.unsqueeze(2))  # (B, Hkv, G, 1, Dv)
    o = torch.cat(outs, dim=3) if outs else q.new_zeros(B, Hkv, Hq // Hkv, 0, v.shape[-1])
    return o.reshape(B, Hq, L, v.shape[-1]), state


def chunked(phi_q, phi_k, v, causal: bool, initial_state=None, chunk_size: int = 64):
    """Chunked form: per chunk ``c``, ``o_c = phi_q_c @ S_c + tril(phi_q_c phi_k_c^T) @ v_c`` with
    ``S_c = S0 + sum_{c' < c} phi_k_c'^T v_c'``. All chunks are computed at once (batched matmuls and
    an exclusive cumulative sum of the per-chunk states, ``(L / chunk_size, M, Dv)`` per head), not
    in a Python loop.

    Computed in float32 (float64 for float64 inputs); returns ``(o, state)`` in that dtype.
    """
    B, Hq, L, M = phi_q.shape
    Hkv, Dv = phi_k.shape[1], v.shape[-1]
    dtype = _state_dtype(v.dtype)
    state = _initial(phi_k, v, initial_state, dtype)
    q = _grouped(phi_q, Hkv).to(dtype)
    k, vv = phi_k.to(dtype), v.to(dtype)
    if not causal:
        state = state + k.transpose(-1, -2) @ vv
        return (q @ state.unsqueeze(2)).reshape(B, Hq, L, v.shape[-1]), state
    T = min(chunk_size, max(L, 1))  # a one-token decode step stays O(M * Dv), not O(chunk_size * M * Dv)
    N = -(-L // T)
    pad = N * T - L  # zero rows add nothing to any state or output
    q = torch.nn.functional.pad(q, (0, 0, 0, pad)).unflatten(3, (N, T))  # (B, Hkv, G, N, T, M)
    k = torch.nn.functional.pad(k, (0, 0, 0, pad)).unflatten(2, (N, T))  # (B, Hkv, N, T, M)
    vv = torch.nn.functional.pad(vv, (0, 0, 0, pad)).unflatten(2, (N, T))  # (B, Hkv, N, T, Dv)
    chunk_states = k.transpose(-1, -2) @ vv  # (B, Hkv, N, M, Dv)
    after = state.unsqueeze(2) + chunk_states.cumsum(dim=2)  # state after each chunk
    before = torch.cat([state.unsqueeze(2), after[:, :, :-1]], dim=2)  # (B, Hkv, N, M, Dv)
    scores = q @ k.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, N, T, T)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=v.device).tril(), 0)
    o = q @ before.unsqueeze(2) + scores @ vv.unsqueeze(2)  # (B, Hkv, G, N, T, Dv)
    o = o.flatten(3, 4)[:, :, :, :L]
    return o.reshape(B, Hq, L, Dv), after[:, :, -1] if N else state


FORMS = {"parallel": parallel, "recurrent": recurrent, "chunked": chunked}


def with_normalizer(v: torch.Tensor, initial_state):
    """Append the normaliser as one more value column: ``v -> [v, 1]``, ``(kv, k_sum) -> [kv, k_sum]``."""
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    v_aug = torch.cat([v, ones], dim=-1)  # (B, Hkv, L, Dv + 1)
    if initial_state is None:
        return v_aug, None
    kv, k_sum = initial_state
    return v_aug, torch.cat([kv, k_sum.to(kv.dtype).unsqueeze(-1)], dim=-1)  # (B, Hkv, M, Dv + 1)


def split_normalizer(o_aug: torch.Tensor, state_aug: torch.Tensor):
    """Inverse of :func:`with_normalizer` on the outputs: ``(o, (kv, k_sum))``."""
    # A query that sees no feature mass (ReLU features can be all zero) has a zero numerator too: it
    # outputs 0. An additive epsilon instead would bias Performer, whose normalisers can be tiny.
    den = o_aug[..., -1:]
    out = o_aug[..., :-1] / torch.where(den == 0, torch.ones_like(den), den)
    return out, (state_aug[..., :-1], state_aug[..., -1])


def linear_attention_reference(
    q, k, v, *, causal=False, feature_map="elu+1", normalize=True, scale=None,
    initial_state=None, form="parallel", chunk_size=64,
):
    """Linear attention in plain PyTorch: :func:`fastattn.linear_attention`'s semantics, any form.

    Args:
        q: ``(B, Hq, L, D)``; k: ``(B, Hkv, L, D)``; v: ``(B, Hkv, L, Dv)``.
        form: ``"parallel"``, ``"recurrent"`` or ``"chunked"``.
        initial_state: ``(kv (B, Hkv, M, Dv), k_sum (B, Hkv, M))`` with normalisation, ``kv`` alone without.

    Returns:
        ``(out (B, Hq, L, Dv), state)``, state as ``initial_state``; ``out`` in the form's
        compute dtype (see the module docstring); features are computed in float32 (float64 for float64 inputs).
    """
    from .features import featurize

    phi_q, phi_k = featurize(q, k, feature_map, scale, normalize)
    work = v.dtype
    phi_q, phi_k = phi_q.to(work), phi_k.to(work)
    core = FORMS[form]
    kwargs = {"chunk_size": chunk_size} if form == "chunked" else {}
    if normalize:
        v_aug, state_aug = with_normalizer(v, initial_state)
        o_aug, state = core(phi_q, phi_k, v_aug, causal, state_aug, **kwargs)
        return split_normalizer(o_aug, state)
    return core(phi_q, phi_k, v, causal, initial_state, **kwargs)
