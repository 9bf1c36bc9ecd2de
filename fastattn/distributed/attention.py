"""Context-parallel attention: each rank holds a shard of the sequence; the result is exact.

Three schemes move data with torch.distributed only:

* ``ring``: K/V shards travel around the ring (``batch_isend_irecv``); each step's transfer of the
  next shard runs while the current one is computed. A step's partial ``(out, lse)`` is merged
  into the running result through the log-sum-exp. The backward pass sends K/V around again, with
  their gradient accumulators following them, and a last hop brings each dK/dV home.
* ``allgather``: one all-gather of K/V, then local calls; the backward reduce-scatters dK/dV.
* ``ulysses``: an all-to-all trades the sequence split for a head split, each rank runs ordinary
  attention on the whole sequence for ``H / world`` heads, and a second all-to-all trades back.

For ``ring`` and ``allgather`` every (query piece, key piece) pair is one call of the backend's
forward/backward op, with the window shifted by the pieces' global positions, so causal and
windowed masks stay band descriptions (no dense masks) and pairs nothing can see are skipped.
The backward calls the op's backward with the *final* ``out`` and ``lse``, which makes each
pair's ``dq``/``dk``/``dv`` its exact share of the gradient (``dS = P * (dP - rowsum(dO * O))``,
``P`` from the global lse).

ALiBi's bias ``-slope * |d|`` (``d = i + offset - j`` in global positions) is not a band and
the op's own ALiBi measures ``d`` from the pair's local origin, so a pair is computed as two
regions: ``d >= 0`` and ``d < 0`` (each a window). On a region ``|d|`` is linear, so the bias
splits into a per-key term (an additive ``(B, H, 1, Lk)`` mask, expanded without a copy) and a
per-row term, which only shifts the region's lse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .._inputs import _check_bool, _check_lengths, normalize
from ..backends import get_backend, select_backend
from .layout import check_layout, group_rank_world, local_shard, segments, to_global_order

SCHEMES = ("ring", "allgather", "ulysses")
_NO_BLOCKS = (None,) * 6  # forward op: four block lists + partial_masks + partial_tile_ids
_NO_BLOCKS_BWD = (None,) * 10

# Set to a list by the benchmark (fastattn.bench.context_parallel) to receive one record per ring step.
step_timings: list | None = None


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything the ring/all-gather passes need besides the tensors."""

    group: object
    rank: int
    world: int
    scheme: str
    layout: str
    backend: str
    scale: float
    window_left: int | None
    window_right: int | None
    softcap: float
    alibi_slopes: torch.Tensor | None  # (B, Hq) float32
    key_lengths: tuple[int, ...] | None  # over the global sequence
    seqlen_q: int  # global
    seqlen_k: int  # global
    local_q: int
    local_k: int

    def q_segments(self) -> list[tuple[int, int]]:
        return segments(self.rank, self.world, self.local_q, self.layout)

    def k_segments(self, owner: int) -> list[tuple[int, int]]:
        return segments(owner, self.world, self.local_k, self.layout)

    def peer(self, rank_in_group: int) -> int:
        """The global rank of a rank of the group (what point-to-point ops take)."""
        return rank_in_group if self.group is None else dist.get_global_rank(self.group, rank_in_group)


@dataclass(frozen=True)
class _Call:
    """One op call: a batch slice of one (query piece, key piece) pair, possibly one ALiBi region."""

    batch: slice
    window_left: int | None
    window_right: int | None
    key_lengths: torch.Tensor | None  # int32 (B',): the key piece's unpadded length
    key_bias: torch.Tensor | None  # additive (B', Hq, Lq_piece, Lk_piece), an expanded (B', Hq, 1, Lk_piece)
    row_shift: torch.Tensor | None  # (B', Hq, Lq_piece): added to the op's lse


def _tighter(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _band_visible(diag: int, left: int | None, right: int | None, rows: int, keys: int) -> bool:
    """Whether some row ``i < rows`` sees some key ``j < keys`` with ``i + diag - left <= j <= i + diag + right``."""
    if rows <= 0 or keys <= 0 or (left is not None and right is not None and left + right < 0):
        return False
    lo = 0 if right is None else max(0, -diag - right)
    hi = rows - 1 if left is None else min(rows - 1, keys - 1 - diag + left)
    return lo <= hi


def _pair_calls(plan: _Plan, q_start: int, lq: int, k_start: int, lk: int, device, dtype) -> list[_Call]:
    """The op calls that compute queries ``[q_start, q_start + lq)`` against keys ``[k_start, k_start + lk)``.

    A query at global position ``qi`` sees a key at ``kj`` iff ``qi + off - left <= kj <= qi + off + right``
    with ``off = Lk - Lq`` (``key_lengths[b] - Lq`` with lengths). For local indices ``i``, ``j`` that is
    ``i + diag - left <= j <= i + diag + right`` with ``diag = q_start + off - k_start``; the op aligns
    its window at ``op_off = (local key length) - lq``, so it gets ``left - diag + op_off`` and
    ``right + diag - op_off``.
    """
    positional = plan.window_left is not None or plan.window_right is not None or plan.alibi_slopes is not None
    if plan.key_lengths is not None and positional:
        batches = [slice(b, b + 1) for b in range(len(plan.key_lengths))]  # a global offset per batch
    else:
        batches = [slice(None)]
    calls = []
    for batch in batches:
        offset, keys, key_lengths = plan.seqlen_k - plan.seqlen_q, lk, None
        if plan.key_lengths is not None:
            local = [min(max(n - k_start, 0), lk) for n in plan.key_lengths[batch]]
            if max(local) == 0:
                continue  # every key of this piece is padding
            keys = max(local)
            key_lengths = torch.tensor(local, dtype=torch.int32, device=device)
            offset = plan.key_lengths[batch][0] - plan.seqlen_q  # used only with one batch per call
        diag = q_start + offset - k_start
        op_off = keys - lq
        if plan.alibi_slopes is None:
            regions = [(plan.window_left, plan.window_right, 0)]
        else:
            regions = [(plan.window_left, _tighter(plan.window_right, 0), 1), (_tighter(plan.window_left, -1), plan.window_right, -1)]
        for left, right, sign in regions:
            if not _band_visible(diag, left, right, lq, keys):
                continue
            key_bias = row_shift = None
            if sign:
                bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
                slopes = plan.alibi_slopes[batch].to(bias_dtype)[:, :, None]  # (B', Hq, 1)
                j = torch.arange(lk, device=device, dtype=bias_dtype)
                i = torch.arange(lq, device=device, dtype=bias_dtype)
                # -slope * sign * (i + diag - j), split around a reference key that keeps both terms small
                ref = lk - 1 if sign > 0 else 0
                key_bias = (sign * slopes * (j - ref))[:, :, None, :]  # (B', Hq, 1, lk)
                key_bias = key_bias.expand(-1, -1, lq, -1)
                row_shift = (-sign * slopes * (i + diag - ref)).float()  # (B', Hq, lq)
            calls.append(_Call(
                batch=batch,
                window_left=None if left is None else left - diag + op_off,
                window_right=None if right is None else right + diag - op_off,
                key_lengths=key_lengths,
                key_bias=key_bias,
                row_shift=row_shift,
            ))
    return calls


def _merge(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold a partial ``(out, lse)`` into the running ``(out_acc, lse_acc)`` in place, exactly.

    Rows that have seen nothing keep ``lse = -inf`` and an output of 0 (never NaN).
    """
    lse = lse.to(lse_acc.dtype)
    new = torch.logaddexp(lse_acc, lse)
    safe = new.masked_fill(new == float("-inf"), 0.0)
    out_acc.mul_(torch.exp(lse_acc - safe).unsqueeze(-1)).add_(out.to(out_acc.dtype) * torch.exp(lse - safe).unsqueeze(-1))
    lse_acc.copy_(new)


def _attend_forward(plan: _Plan, q, k, v, k_segs, out_acc, lse_acc, call_lses: list) -> None:
    """Every op call of this rank's queries against the key pieces ``k_segs`` (stored in order in k/v),
    merged into ``(out_acc, lse_acc)``; each call's own lse is appended to ``call_lses`` for the backward."""
    ops = get_backend(plan.backend).ops
    q_pos = 0
    for q_start, lq in plan.q_segments():
        k_pos = 0
        for k_start, lk in k_segs:
            for call in _pair_calls(plan, q_start, lq, k_start, lk, q.device, q.dtype):
                b = call.batch
                out, lse = ops.fwd(
                    q[b, :, q_pos:q_pos + lq], k[b, :, k_pos:k_pos + lk], v[b, :, k_pos:k_pos + lk],
                    call.key_bias, None, call.key_lengths, None, *_NO_BLOCKS, 0, 0, plan.scale,
                    call.window_left, call.window_right, plan.softcap, 0.0, 0,
                )
                call_lses.append(lse)
                if call.row_shift is not None:
                    lse = lse + call.row_shift
                _merge(out_acc[b, :, q_pos:q_pos + lq], lse_acc[b, :, q_pos:q_pos + lq], out, lse)
            k_pos += lk
        q_pos += lq


def _attend_backward(plan: _Plan, dout, q, k, v, out, lse, k_segs, call_lses, dq_acc, dk_acc, dv_acc) -> None:
    """Add this rank's queries' share of dq, and the key pieces' share of dk/dv, for ``k_segs``.

    ``call_lses`` yields each call's own lse (as the forward appended them). A call's probabilities
    are ``P_call * w`` of the whole softmax with ``w = exp(lse_call - lse)``, so the op's backward
    gets ``dout * w`` and the *final* ``out`` (whose ``rowsum(dout * out)`` is the softmax's
    ``delta``): its result is then exactly the call's share, whether the op uses the lse it is
    given or recomputes it.
    """
    ops = get_backend(plan.backend).ops
    q_pos = 0
    for q_start, lq in plan.q_segments():
        k_pos = 0
        for k_start, lk in k_segs:
            rows, keys = slice(q_pos, q_pos + lq), slice(k_pos, k_pos + lk)
            for call in _pair_calls(plan, q_start, lq, k_start, lk, q.device, q.dtype):
                b = call.batch
                call_lse = next(call_lses)
                shifted = call_lse if call.row_shift is None else call_lse + call.row_shift
                final = lse[b, :, rows]
                weight = torch.exp(shifted.to(final.dtype) - final.masked_fill(final == float("-inf"), 0.0))
                weight = weight.masked_fill(final == float("-inf"), 0.0)  # (B', Hq, lq); rows that saw nothing
                dq, dk, dv, _ = ops.bwd(
                    (dout[b, :, rows] * weight.unsqueeze(-1)).to(dout.dtype), q[b, :, rows], k[b, :, keys],
                    v[b, :, keys], out[b, :, rows], call_lse, call.key_bias, None, call.key_lengths, None,
                    *_NO_BLOCKS_BWD, 0, 0, plan.scale, call.window_left, call.window_right, plan.softcap, 0.0, 0, False,
                )
                dq_acc[b, :, rows] += dq
                dk_acc[b, :, keys] += dk
                dv_acc[b, :, keys] += dv
            k_pos += lk
        q_pos += lq


def _start_exchange(plan: _Plan, tensors: list[torch.Tensor], tag: int):
    """Send ``tensors`` to the next rank of the ring and receive the previous rank's; returns
    ``(received, works)`` -- wait on ``works`` before reading ``received``. Exchanges in flight at
    the same time (K/V and their gradients) need different ``tag``s."""
    received = [torch.empty_like(t) for t in tensors]
    nxt, prev = plan.peer((plan.rank + 1) % plan.world), plan.peer((plan.rank - 1) % plan.world)
    p2p = [dist.P2POp(dist.isend, t, nxt, plan.group, tag) for t in tensors]
    p2p += [dist.P2POp(dist.irecv, t, prev, plan.group, tag) for t in received]
    return received, dist.batch_isend_irecv(p2p)


def _wait(works, record: dict | None, device: torch.device) -> None:
    """Wait for point-to-point ``works``; with a benchmark ``record``, add the time it took (on GPUs
    ``wait`` only orders the streams, so the device is synchronised to see the transfer's end)."""
    start = time.perf_counter()
    for work in works:
        work.wait()
    if record is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record["wait_s"] += time.perf_counter() - start


def _timed(q: torch.Tensor, record: dict | None, fn, *args, **kwargs):
    """``fn(*args)``, its time added to ``record["compute_s"]`` when the benchmark records steps."""
    if record is None:
        return fn(*args, **kwargs)
    if q.is_cuda:
        torch.cuda.synchronize(q.device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if q.is_cuda:
        torch.cuda.synchronize(q.device)
    record["compute_s"] += time.perf_counter() - start
    return result


def _step_record(plan: _Plan, pass_name: str, step: int) -> dict | None:
    if step_timings is None:
        return None
    record = {"scheme": plan.scheme, "pass": pass_name, "step": step, "compute_s": 0.0, "wait_s": 0.0}
    step_timings.append(record)
    return record


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    """Partial results and gradients accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _accumulators(q, v):
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=_acc_dtype(q), device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=_acc_dtype(q), device=q.device)
    return out, lse


def _gather_sequence(plan: _Plan, x: torch.Tensor) -> torch.Tensor:
    shards = [torch.empty_like(x) for _ in range(plan.world)]
    dist.all_gather(shards, x.contiguous(), group=plan.group)
    return to_global_order(shards, plan.layout)


def _ring_forward(plan: _Plan, q, k, v, call_lses: list):
    out_acc, lse_acc = _accumulators(q, v)
    kv = [k.contiguous(), v.contiguous()]
    for step in range(plan.world):
        record = _step_record(plan, "forward", step)
        owner = (plan.rank - step) % plan.world
        if step + 1 < plan.world:
            next_kv, works = _start_exchange(plan, kv, tag=0)  # overlaps with this step's compute
        _timed(q, record, _attend_forward, plan, q, kv[0], kv[1], plan.k_segments(owner), out_acc, lse_acc, call_lses)
        if step + 1 < plan.world:
            _wait(works, record, q.device)
            kv = next_kv
    return out_acc, lse_acc


def _ring_backward(plan: _Plan, dout, q, k, v, out, lse, call_lses):
    acc_dtype = _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kv = [k.contiguous(), v.contiguous()]
    grads, grad_works = None, None
    for step in range(plan.world):
        record = _step_record(plan, "backward", step)
        owner = (plan.rank - step) % plan.world
        if step + 1 < plan.world:
            next_kv, kv_works = _start_exchange(plan, kv, tag=0)
        dk = torch.zeros(kv[0].shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(kv[1].shape, dtype=acc_dtype, device=q.device)
        _timed(q, record, _attend_backward, plan, dout, q, kv[0], kv[1], out, lse, plan.k_segments(owner), call_lses, dq, dk, dv)
        if grad_works is not None:  # the owner's gradient so far, from the ranks that held its K/V before
            _wait(grad_works, record, q.device)
            dk += grads[0]
            dv += grads[1]
        if plan.world > 1:
            grads, grad_works = _start_exchange(plan, [dk, dv], tag=1)
        else:
            grads = [dk, dv]
        if step + 1 < plan.world:
            _wait(kv_works, record, q.device)
            kv = next_kv
    if grad_works is not None:  # the last hop brings each rank its own dK/dV
        _wait(grad_works, record, q.device)
    return dq, grads[0], grads[1]


def _allgather_forward(plan: _Plan, q, k, v, call_lses: list):
    out_acc, lse_acc = _accumulators(q, v)
    record = _step_record(plan, "forward", 0)
    start = time.perf_counter()
    full_k, full_v = _gather_sequence(plan, k), _gather_sequence(plan, v)
    if record is not None:
        record["wait_s"] = time.perf_counter() - start
    _timed(q, record, _attend_forward, plan, q, full_k, full_v, [(0, plan.seqlen_k)], out_acc, lse_acc, call_lses)
    return out_acc, lse_acc


def _allgather_backward(plan: _Plan, dout, q, k, v, out, lse, call_lses):
    acc_dtype = _acc_dtype(q)
    record = _step_record(plan, "backward", 0)
    start = time.perf_counter()
    full_k, full_v = _gather_sequence(plan, k), _gather_sequence(plan, v)
    if record is not None:
        record["wait_s"] = time.perf_counter() - start
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk_full = torch.zeros(full_k.shape, dtype=acc_dtype, device=q.device)
    dv_full = torch.zeros(full_v.shape, dtype=acc_dtype, device=q.device)
    _timed(q, record, _attend_backward, plan, dout, q, full_k, full_v, out, lse, [(0, plan.seqlen_k)], call_lses, dq,
           dk_full, dv_full)
    start = time.perf_counter()
    grads = []
    for full in (dk_full, dv_full):
        # Each rank's pieces of the gradient go back to it, summed over every rank's queries.
        pieces = [local_shard(full, r, plan.world, plan.layout).contiguous() for r in range(plan.world)]
        mine = torch.empty_like(pieces[0])
        dist.reduce_scatter(mine, pieces, group=plan.group)
        grads.append(mine)
    if record is not None:
        record["wait_s"] += time.perf_counter() - start
    return dq, grads[0], grads[1]


class _ContextParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        forward = _ring_forward if plan.scheme == "ring" else _allgather_forward
        call_lses = []  # one (B', Hq, l_piece) float32 per op call: O(L) floats per rank, no head_dim factor
        out, lse = forward(plan, q, k, v, call_lses)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *call_lses)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse.float()

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *call_lses = ctx.saved_tensors
        plan = ctx.plan
        backward = _ring_backward if plan.scheme == "ring" else _allgather_backward
        dq, dk, dv = backward(plan, dout.contiguous(), q, k, v, out, lse, iter(call_lses))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _heads_to_ranks(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``(B, H, l, D)`` sequence shard -> ``(B, H / W, L, D)``: this rank's heads over the whole sequence."""
    B, H, l, D = x.shape
    send = x.reshape(B, plan.world, H // plan.world, l, D).transpose(0, 1).contiguous()  # (W, B, H/W, l, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=plan.group)  # recv[s]: rank s's shard of my heads
    return to_global_order(list(recv.unbind(0)), plan.layout)


def _ranks_to_heads(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Inverse of :func:`_heads_to_ranks`: ``(B, H / W, L, ...)`` -> ``(B, H, L / W, ...)``."""
    send = torch.stack([local_shard(x, r, plan.world, plan.layout) for r in range(plan.world)])  # (W, B, H/W, l, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=plan.group)  # recv[g]: head group g of my shard
    return recv.transpose(0, 1).flatten(1, 2)


class _HeadsToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return _heads_to_ranks(x, plan)

    @staticmethod
    def backward(ctx, grad):
        return _ranks_to_heads(grad.contiguous(), ctx.plan), None


class _RanksToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan = plan
        return _ranks_to_heads(x, plan)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_ranks(grad.contiguous(), ctx.plan), None


def _ulysses(plan: _Plan, q, k, v, key_lengths):
    import fastattn

    Hq, Hkv = q.shape[1], k.shape[1]
    for heads, name in ((Hq, "q.shape[1]"), (Hkv, "k.shape[1]")):
        if heads % plan.world:
            raise ValueError(
                f"scheme='ulysses' splits heads across ranks: {name} = {heads} must be divisible by the world "
                f"size {plan.world} (use scheme='ring' or 'allgather' otherwise)"
            )
    record = _step_record(plan, "forward", 0)
    start = time.perf_counter()
    qh, kh, vh = (_HeadsToRanks.apply(t, plan) for t in (q, k, v))
    if record is not None:
        record["wait_s"] = time.perf_counter() - start
    heads = slice(plan.rank * Hq // plan.world, (plan.rank + 1) * Hq // plan.world)
    alibi = None if plan.alibi_slopes is None else plan.alibi_slopes[:, heads]
    window = None
    if plan.window_left is not None or plan.window_right is not None:
        window = tuple(-1 if w is None else w for w in (plan.window_left, plan.window_right))
    out, lse = _timed(
        q, record, fastattn.attention, qh, kh, vh, window=window, alibi_slopes=alibi, softcap=plan.softcap,
        scale=plan.scale, key_lengths=key_lengths, return_lse=True, backend=plan.backend,
    )
    start = time.perf_counter()
    out = _RanksToHeads.apply(out, plan)
    lse = _ranks_to_heads(lse.detach().unsqueeze(-1).contiguous(), plan).squeeze(-1)
    if record is not None:
        record["wait_s"] += time.perf_counter() - start
    return out, lse


def _check_same_shapes(plan: _Plan, q, k, v) -> None:
    """Every rank must hold shards of the same shapes; compare them once so a mismatch is an error
    on every rank instead of a hang or garbage in the collectives."""
    mine = torch.tensor([*q.shape, *k.shape, v.shape[-1]], dtype=torch.int64, device=q.device)
    every = [torch.empty_like(mine) for _ in range(plan.world)]
    dist.all_gather(every, mine, group=plan.group)
    shapes = [tuple(t.tolist()) for t in every]
    if any(s != shapes[0] for s in shapes):
        listed = ", ".join(f"rank {r}: q {s[:4]}, k {s[4:8]}, v[-1] {s[8]}" for r, s in enumerate(shapes))
        raise ValueError(
            f"every rank must pass q, k, v shards of the same shapes (L / world each; pad the sequence and use "
            f"key_lengths for uneven lengths), got {listed}"
        )


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    scheme: str = "ring",
    layout: str = "zigzag",
    causal: bool = False,
    window: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention over a sequence sharded across the ranks of ``group``, exact and differentiable.

    Every rank passes its own shards (made with :func:`fastattn.distributed.shard` or laid out the
    same way) and gets its shard of :func:`fastattn.attention` on the gathered sequence::

        out_r = shard(fastattn.attention(unshard(q), unshard(k), unshard(v), ...), layout)

    Positions are global: ``causal``, ``window`` and ALiBi are bottom-right aligned on the whole
    sequence, as in :func:`fastattn.attention`.

    Args:
        q: ``(B, Hq, Lq / W, D)``, this rank's query shard (``W`` = world size of ``group``).
        k: ``(B, Hkv, Lk / W, D)``, ``Hq % Hkv == 0``. K/V are communicated with ``Hkv`` heads (GQA is
            never expanded before communication).
        v: ``(B, Hkv, Lk / W, Dv)``.
        group: the process group (default: the world).
        scheme: ``"ring"`` (point-to-point, overlapped with compute; memory per rank ∝ L / W),
            ``"allgather"`` (gathers the whole K/V on every rank), or ``"ulysses"`` (all-to-all over
            heads; needs ``Hq`` and ``Hkv`` divisible by ``W``).
        layout: ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2W-1-r`` of ``2W``; balanced causal
            work) or ``"contiguous"``.
        causal: bottom-right causal on the global sequence.
        window: ``(left, right)`` on global positions; ``-1`` = unbounded.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``.
        softcap: score soft-capping, as :func:`fastattn.attention`.
        scale: default ``1 / sqrt(D)``.
        key_lengths: int ``(B,)`` over the **global** key sequence: keys at ``j >= key_lengths[b]``
            are padding (how a length that does not split evenly is handled).
        return_lse: also return this shard's float32 lse ``(B, Hq, Lq / W)``.
        backend: the local kernel: any fastattn backend name, or None for the first that fits.

    Returns:
        ``out (B, Hq, Lq / W, Dv)`` (and ``lse``), this rank's shard of the result.

    Not supported (raise): ``attn_mask``, ``block_mask``, dropout and ``query_lengths`` are not
    arguments of this function.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    check_layout(layout)
    _check_bool(return_lse, "return_lse")
    rank, world = group_rank_world(group)
    inputs = normalize(q, k, v, causal=causal, window=window, alibi_slopes=alibi_slopes, softcap=softcap, scale=scale)
    if layout == "zigzag":
        for t, name in ((q, "q"), (k, "k")):
            if t.shape[2] % 2:
                raise ValueError(
                    f"{name}.shape[2] = {t.shape[2]} must be even for layout='zigzag' (two chunks per rank): pad the "
                    "global sequence to a multiple of 2 * world size and pass key_lengths"
                )
    seqlen_q, seqlen_k = q.shape[2] * world, k.shape[2] * world
    key_lengths = _check_lengths(key_lengths, "key_lengths", q.shape[0], seqlen_k, q)
    # Choose the local kernel for what the op calls will use: a float additive mask for ALiBi's
    # key term, local key lengths, shifted windows.
    representative = replace(
        inputs,
        alibi_slopes=None,
        attn_mask=None if alibi_slopes is None else q.new_zeros((), dtype=torch.float32).expand(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
        key_lengths=key_lengths,
    )
    if scheme == "ulysses":
        representative = replace(inputs, key_lengths=key_lengths)
    backend_name = select_backend(representative, backend).name
    if scheme != "ulysses" and backend_name == "reference":
        raise ValueError(
            "backend='reference' cannot be the local kernel of scheme='ring' or 'allgather': its backward "
            "recomputes the softmax of its own call instead of using the given out and lse; use 'cpu', "
            "'triton' or 'cuda' (or scheme='ulysses')"
        )
    plan = _Plan(
        group=group, rank=rank, world=world, scheme=scheme, layout=layout, backend=backend_name,
        scale=inputs.scale, window_left=inputs.window_left, window_right=inputs.window_right, softcap=inputs.softcap,
        alibi_slopes=inputs.alibi_slopes,
        key_lengths=None if key_lengths is None else tuple(key_lengths.tolist()),
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, local_q=q.shape[2], local_k=k.shape[2],
    )
    _check_same_shapes(plan, q, k, v)
    if scheme == "ulysses":
        out, lse = _ulysses(plan, q, k, v, key_lengths)
    else:
        out, lse = _ContextParallelFunction.apply(q, k, v, plan)
    return (out, lse) if return_lse else out


