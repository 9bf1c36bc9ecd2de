"""Attention over packed variable-length sequences: :func:`varlen_attention` (flash-attn's varlen API).

Two ways to run, chosen per call:

* **a varlen kernel** (the ``cpu`` backend's ``fastattn::varlen_fwd``/``varlen_bwd`` in
  csrc/cpu/varlen.cpp, the ``triton`` backend's ``fastattn::triton_varlen_fwd``/``_bwd`` in
  triton_kernels/attention_varlen.py): the kernels
  read ``cu_seqlens`` themselves and walk each sequence's own tiles, so nothing is padded and no mask
  exists; causal, window and ALiBi are aligned per sequence inside the kernel, and dropout is drawn
  per sequence (:func:`varlen_dropout_keep_mask`);
* **the block-mask path**, for the reference backend (no varlen kernel; the cuda backend refuses
  varlen calls, :data:`VARLEN_REFUSALS`): one
  :func:`fastattn.attention` call (batch 1) with a :class:`fastattn.BlockMask` built from
  ``cu_seqlens`` -- tiles that pair two sequences are empty and never computed, tiles inside one
  sequence are full (or carry the causal / window element mask, bottom-right aligned per sequence),
  and only the tiles that straddle a sequence boundary carry an element mask.

The arguments are checked on every call, the ``cu_seqlens`` values on one host copy of both (one
device synchronisation per call; the kernels themselves need none).
"""

from __future__ import annotations

import os

import torch

from ._inputs import _check_bool, _check_sinks, _check_tensor, _check_window, normalize
from .api import attention
from .autograd import fold_sinks
from .backends import PRIORITY, BackendNotSupportedError, backends, get_backend, select_backend
from .block_mask import EMPTY, FULL, PARTIAL, BlockMask, block_extents
from .ops import BackendOps
from .reference import draw_seed

# Tile size of the mask: a size every backend takes (Triton: a power of two <= 128, CUDA: a multiple of 64).
BLOCK_SIZE = 64


def _check_cu_seqlens(cu, name: str, device: torch.device) -> None:
    _check_tensor(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must have shape (num_seqs + 1,), got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")


def _check_cu_values(cu: torch.Tensor, name: str, total: int) -> None:
    """``cu`` (a host copy, int64) starts at 0, ends at ``total`` and never decreases."""
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"{name} must start at 0 and end at the number of packed tokens {total}, "
                         f"got {int(cu[0])} ... {int(cu[-1])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing (sequence lengths >= 0)")


def _check_max_seqlen(x, name: str, lengths: torch.Tensor) -> None:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if x < longest:
        raise ValueError(f"{name} = {x} is shorter than the longest sequence in its cu_seqlens ({longest})")


def varlen_block_mask(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    window: tuple[int | None, int | None] = (None, None),
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """The BlockMask ``(1, 1, total_q, total_k)`` of packed sequences, each attending only to itself.

    Packed query ``i`` of sequence ``s`` (rows ``[cu_q[s], cu_q[s+1])``) sees packed key ``j`` iff ``j`` is
    in the same sequence and, with the per-sequence bottom-right diagonal ``diag = i + d_s`` where
    ``d_s = cu_k[s+1] - cu_q[s+1]``, ``diag - left <= j <= diag + right`` (``None`` = unbounded).

    Args:
        cu_seqlens_q: int ``(num_seqs + 1,)``, cumulative query lengths starting at 0.
        cu_seqlens_k: int ``(num_seqs + 1,)``, cumulative key lengths starting at 0.
        window: ``(left, right)`` bounds, ints >= 0 or None; ``(None, 0)`` is causal.
        block_size: the tile size (both sides).
    """
    from .masks import _evaluate  # the builders' tile-wise evaluation; imported here so `import fastattn` stays light

    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    device = cu_q.device
    n = cu_q.shape[0] - 1
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    left, right = window
    seq_q = torch.repeat_interleave(torch.arange(n, device=device), cu_q[1:] - cu_q[:-1])  # (total_q,)
    seq_k = torch.repeat_interleave(torch.arange(n, device=device), cu_k[1:] - cu_k[:-1])  # (total_k,)
    offset = cu_k[1:] - cu_q[1:]  # (n,): key index aligned with packed query i of sequence s is i + offset[s]

    # Tile guess from each tile's first and last sequence (the ids are sorted).
    q0, q1 = block_extents(total_q, block_size, device)  # (nQB,)
    k0, k1 = block_extents(total_k, block_size, device)  # (nKB,)
    qmin, qmax = seq_q[q0][:, None], seq_q[q1][:, None]  # (nQB, 1)
    kmin, kmax = seq_k[k0][None, :], seq_k[k1][None, :]  # (1, nKB)
    q0, q1, k0, k1 = q0[:, None], q1[:, None], k0[None, :], k1[None, :]
    nonempty = (qmax >= kmin) & (kmax >= qmin)
    full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
    # A query tile inside one sequence: its window bounds decide emptiness and fullness exactly.
    single = qmin == qmax
    d = offset[qmin]  # (nQB, 1)
    if left is not None:
        nonempty &= ~single | (k1 >= q0 + d - left)
        full &= k0 >= q1 + d - left
    if right is not None:
        nonempty &= ~single | (k0 <= q1 + d + right)
        full &= k1 <= q0 + d + right
    guess = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)

    def predicate(b, h, i, j):
        s = seq_q[i]
        visible = s == seq_k[j]
        diag = i + offset[s]
        if left is not None:
            visible = visible & (j >= diag - left)
        if right is not None:
            visible = visible & (j <= diag + right)
        return visible

    return _evaluate(predicate, guess[None, None], (total_q, total_k), (block_size, block_size))


def varlen_kernel_ops(backend_name: str) -> BackendOps | None:
    """The varlen forward/backward ops (``VARLEN_FWD_SCHEMA``/``VARLEN_BWD_SCHEMA`` of fastattn/ops.py)
    of a backend that has a varlen kernel, else None."""
    if backend_name == "cpu":
        ops = torch.ops.fastattn
        if not hasattr(ops, "varlen_fwd"):  # an extension built before the varlen kernels
            return None
        return BackendOps(fwd=ops.varlen_fwd.default, bwd=ops.varlen_bwd.default)
    if backend_name == "triton":
        from .backends.triton import varlen_ops

        return varlen_ops()
    return None


def varlen_dropout_keep_mask(backend_name: str, seed: int, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                             heads_q: int, dropout_p: float) -> list[torch.Tensor]:
    """The dropout pattern a varlen kernel applies for ``seed``: one bool ``(Hq, Lq_s, Lk_s)`` per
    sequence (True = keep).

    Sequence ``s`` gets the pattern the backend's padded kernels draw for that sequence alone (batch 1,
    its own lengths, local indices) from the seed ``seed + s``: sequences never share random numbers,
    and a sequence's pattern does not depend on the lengths of the others.

    Args:
        backend_name: ``"cpu"`` or ``"triton"`` (the backends with a varlen kernel).
        seed: the seed the call drew (:func:`fastattn.reference.draw_seed`).
        cu_seqlens_q, cu_seqlens_k: int32 ``(num_seqs + 1,)``.
        heads_q: Hq.
        dropout_p: the dropout probability.
    """
    backend = get_backend(backend_name)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    masks = []
    for s in range(len(cu_q) - 1):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        if lq == 0 or lk == 0:
            masks.append(torch.ones(heads_q, lq, lk, dtype=torch.bool, device=cu_seqlens_q.device))
            continue
        dummy_q = torch.empty(1, heads_q, lq, 1, device=cu_seqlens_q.device)
        dummy_k = torch.empty(1, 1, lk, 1, device=cu_seqlens_q.device)
        inputs = normalize(dummy_q, dummy_k, dummy_k, dropout_p=dropout_p)
        masks.append(backend.dropout_keep_mask(inputs, seed + s)[0])
    return masks


# Backends that do not serve varlen_attention at all, and why (fastattn info prints these too).
VARLEN_REFUSALS = {
    "cuda": (
        "varlen_attention has no CUDA kernel: the CUDA kernels index a padded (B, H, L, D) batch (cu_seqlens "
        "offsets are not threaded through their grids and tile loops), and the block-mask path would hand them "
        "the tiles that straddle sequence boundaries as a dense (total_q, total_k) element mask; on a GPU, "
        "backend='triton' runs a varlen kernel that reads cu_seqlens on the device (the automatic choice takes it)"
    ),
}


def select_varlen_backend(inputs, requested: str | None) -> str:
    """The backend name that serves a varlen call: as :func:`fastattn.backends.select_backend`, but a
    backend in :data:`VARLEN_REFUSALS` is refused with its reason when requested (by argument or
    ``FASTATTN_BACKEND``) and passed over by the automatic choice."""
    named = requested or os.environ.get("FASTATTN_BACKEND") or None
    if named in VARLEN_REFUSALS:
        reasons = [VARLEN_REFUSALS[named]] + (get_backend(named).reasons(inputs) if named in backends() else [])
        raise BackendNotSupportedError(f"backend {named!r} cannot run this call:\n"
                                       + "\n".join(f"  - {r}" for r in reasons))
    chosen = select_backend(inputs, requested).name
    if chosen not in VARLEN_REFUSALS:
        return chosen
    # The automatic choice took a refused backend: the next one in priority order that serves the call.
    refused = [f"  {chosen}: {VARLEN_REFUSALS[chosen]}"]
    for name in PRIORITY[PRIORITY.index(chosen) + 1:]:
        if name in VARLEN_REFUSALS or name not in backends():
            continue
        backend = get_backend(name)
        reasons = backend.reasons(inputs) or backend.auto_select_reasons(inputs)
        if not reasons:
            return name
        refused.append(f"  {name}: " + "; ".join(reasons))
    raise BackendNotSupportedError("no backend can run this call:\n" + "\n".join(refused))


class VarlenFunction(torch.autograd.Function):
    """Autograd of the varlen kernels: the chosen backend's varlen forward and backward ops."""

    @staticmethod
    def forward(ctx, backend_name, lse_differentiable, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, alibi_slopes, scale, window_left, window_right, softcap, dropout_p, seed):
        ops = varlen_kernel_ops(backend_name)
        scalars = (max_seqlen_q, max_seqlen_k, alibi_slopes, scale, window_left, window_right, softcap)
        out, lse = ops.fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes)
        ctx.backend_name = backend_name
        ctx.scalars = scalars[:2] + scalars[3:]
        ctx.dropout = (dropout_p, seed)
        ctx.lse_differentiable = lse_differentiable
        # The ops' lse is in the accumulation dtype (float64 for float64 inputs); callers get float32.
        lse_out = lse.float()
        if not lse_differentiable:
            ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap = ctx.scalars
        # The lse gradient only reaches the op when the caller holds lse (return_lse=True).
        dlse = dlse.float().contiguous() if ctx.lse_differentiable and dlse is not None else None
        dq, dk, dv = varlen_kernel_ops(ctx.backend_name).bwd(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, scale,
            window_left, window_right, softcap, dlse, *ctx.dropout,
        )
        return None, None, dq, dk, dv, *(None,) * 11


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    sinks: torch.Tensor | None = None,
):
    """Attention over packed sequences, each attending only to itself (flash-attn's varlen layout).

    Sequence ``s`` owns query rows ``[cu_seqlens_q[s], cu_seqlens_q[s+1])`` and key rows
    ``[cu_seqlens_k[s], cu_seqlens_k[s+1])``. The result equals :func:`fastattn.attention` run on each
    sequence alone; a sequence of length 0 contributes nothing, and a query whose sequence has no key
    returns 0 (lse ``-inf``).

    Args:
        q: ``(total_q, Hq, D)``.
        k: ``(total_k, Hkv, D)`` with ``Hq % Hkv == 0``.
        v: ``(total_k, Hkv, Dv)``.
        cu_seqlens_q: int32 ``(num_seqs + 1,)``: cumulative query lengths, starting at 0.
        cu_seqlens_k: int32 ``(num_seqs + 1,)``: cumulative key lengths, starting at 0.
        max_seqlen_q: an int >= the longest query sequence.
        max_seqlen_k: an int >= the longest key sequence.
        causal: bottom-right aligned per sequence: query ``i`` of a sequence sees its key ``j`` iff
            ``j <= i + (Lk_s - Lq_s)``.
        window: ``(left, right)``, ``-1`` = unbounded, aligned per sequence as ``causal``.
        alibi_slopes: float32 ``(Hq,)``; bias ``-slope * |i + (Lk_s - Lq_s) - j|`` per sequence (local
            indices). The varlen kernels (cpu, triton) apply it per sequence. The block-mask path (the
            reference backend) applies one offset, ``total_k - total_q``, to the packed call, so there it needs ``cu_seqlens_k[s+1] - cu_seqlens_q[s+1] == total_k - total_q``
            for every sequence with queries and keys (true when ``Lq_s == Lk_s`` for all) and raises a
            ValueError otherwise rather than give a wrong bias.
        softcap, scale: as in :func:`fastattn.attention`.
        backend: as in :func:`fastattn.attention`; ``"cuda"`` is refused (:data:`VARLEN_REFUSALS` says
            why) and the automatic choice passes over it.
        dropout_p: as in :func:`fastattn.attention`: reproducible under ``torch.manual_seed``, with a
            matching backward. The varlen kernels draw each sequence's pattern as for that sequence
            alone (:func:`varlen_dropout_keep_mask`); the block-mask path draws one pattern over the
            packed positions.
        return_lse: also return the float32 log-sum-exp ``(Hq, total_q)``.
        sinks: float32 ``(Hq,)`` attention-sink logits, as in :func:`fastattn.attention` (every row's
            denominator; ``lse`` then includes the sink).

    Returns:
        ``out (total_q, Hq, Dv)`` in q's dtype, or ``(out, lse)`` with ``return_lse``.
    """
    _check_bool(return_lse, "return_lse")
    _check_bool(causal, "causal")
    for t, name, shape in ((q, "q", "(total_q, Hq, D)"), (k, "k", "(total_k, Hkv, D)"), (v, "v", "(total_k, Hkv, Dv)")):
        _check_tensor(t, name)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D {shape}, got shape {tuple(t.shape)}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v must have k's number of packed tokens {k.shape[0]}, got {v.shape[0]}")
    _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}")
    # The values are checked on one host copy of both (the call's one device synchronisation).
    cu_q, cu_k = torch.stack([cu_seqlens_q, cu_seqlens_k]).to("cpu", torch.int64)
    _check_cu_values(cu_q, "cu_seqlens_q", q.shape[0])
    _check_cu_values(cu_k, "cu_seqlens_k", k.shape[0])
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    _check_max_seqlen(max_seqlen_q, "max_seqlen_q", len_q)
    _check_max_seqlen(max_seqlen_k, "max_seqlen_k", len_k)
    if alibi_slopes is not None:
        _check_tensor(alibi_slopes, "alibi_slopes")
        if alibi_slopes.dim() != 1:
            raise ValueError(f"alibi_slopes must have shape (Hq,) = ({q.shape[1]},), got {tuple(alibi_slopes.shape)}")
    total_q, total_k = q.shape[0], k.shape[0]
    if total_q == 0 or total_k == 0:  # nothing to attend to: zeros (and no kernel call)
        _check_window(window)
        out = q.new_zeros(total_q, q.shape[1], v.shape[2])
        lse = torch.full((q.shape[1], total_q), float("-inf"), dtype=torch.float32, device=q.device)
        if _check_sinks(sinks, q.shape[1], q) is not None:  # rows that see no key: lse is the sink
            lse = sinks.float()[:, None].expand(q.shape[1], total_q)
        return (out, lse) if return_lse else out
    # The padded API's checks (dtypes, GQA, window, ALiBi, softcap, scale) on the batch-1 view, and
    # the backend that serves it.
    inputs = normalize(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2), causal=causal,
                       window=window, alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, scale=scale,
                       return_lse=return_lse, sinks=sinks)
    chosen = select_varlen_backend(inputs, backend)
    if varlen_kernel_ops(chosen) is not None:
        seed = draw_seed() if inputs.dropout_p > 0 else 0
        slopes = None if inputs.alibi_slopes is None else inputs.alibi_slopes[0]
        # With sinks the kernel's lse feeds the result (fold_sinks), so its gradient must reach the backward.
        out, lse = VarlenFunction.apply(chosen, return_lse or sinks is not None, inputs.q[0].transpose(0, 1), inputs.k[0].transpose(0, 1),
                                        inputs.v[0].transpose(0, 1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, slopes, inputs.scale, inputs.window_left, inputs.window_right,
                                        inputs.softcap, inputs.dropout_p, seed)
        if inputs.sinks is not None:  # (total_q, Hq, Dv) and (Hq, total_q) as one batch of fold_sinks
            out, lse = fold_sinks(out.transpose(0, 1)[None], lse[None], inputs.sinks)
            out, lse = out[0].transpose(0, 1), lse[0]
        return (out, lse) if return_lse else out

    # The block-mask path (a backend without a varlen kernel).
    if alibi_slopes is not None:
        # One call applies one offset (total_k - total_q) to every pair: exact only if each sequence has it.
        offsets = (cu_k[1:] - cu_q[1:])[(len_q > 0) & (len_k > 0)]
        if bool((offsets != total_k - total_q).any()):
            raise ValueError(
                f"alibi_slopes with varlen_attention on the block-mask path (backend {chosen!r} has no varlen "
                "kernel) needs cu_seqlens_k[s+1] - cu_seqlens_q[s+1] == total_k - total_q = "
                f"{total_k - total_q} for every sequence with queries and keys (true when Lq_s == Lk_s for all); "
                "these cu_seqlens differ, so their per-sequence ALiBi distances cannot be expressed in one packed call"
            )
    block_mask = varlen_block_mask(cu_seqlens_q, cu_seqlens_k, (inputs.window_left, inputs.window_right))
    result = attention(q[None], k[None], v[None], layout="blhd", block_mask=block_mask, alibi_slopes=alibi_slopes,
                       softcap=softcap, dropout_p=dropout_p, scale=scale, return_lse=return_lse, backend=backend,
                       sinks=sinks)
    if return_lse:
        return result[0][0], result[1][0]
    return result[0]


__all__ = ["VARLEN_REFUSALS", "varlen_attention", "varlen_block_mask", "varlen_dropout_keep_mask"]
