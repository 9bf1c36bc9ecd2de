"""The one tolerance rule of the test suite (flash-attn's).

A result passes when ``max|out - ref32| <= 2 * max|ref_lp - ref32| + atol_floor``, where ``ref32``
is the reference in high precision (float32, or float64 for float32 inputs) and ``ref_lp`` the
reference computed in the input's own precision: a backend may be at most twice as wrong as
PyTorch itself is in that precision.

One documented error is added on top, for one backend only: :func:`delta_rounding_bound`, the
rounding that a 16-bit backward's ``delta = rowsum(dO * O)`` takes from the rounded output.
"""

from __future__ import annotations

import torch

# Floors absorb the case where the low-precision reference happens to be (almost) exact.
ATOL_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def high_precision(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``ref32`` is computed in for inputs of ``dtype``."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def assert_close_to_reference(
    name: str,
    out: torch.Tensor,
    ref32: torch.Tensor,
    ref_lp: torch.Tensor,
    atol_floor: float | None = None,
    worst: int = 5,
    extra: torch.Tensor | None = None,
) -> None:
    """Assert flash-attn's rule for ``out``; on failure, list the ``worst`` elements.

    ``extra`` (``out``'s shape, or broadcastable to it) is a documented error bound allowed on top of
    the rule, element by element (:func:`delta_rounding_bound`); None adds nothing.
    """
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    if atol_floor is None:
        atol_floor = ATOL_FLOOR[out.dtype]
    out64, ref64, lp64 = (t.detach().to(torch.float64).cpu() for t in (out, ref32, ref_lp))
    assert torch.isfinite(out64).all(), f"{name}: {int((~torch.isfinite(out64)).sum())} non-finite values"
    if out64.numel() == 0:
        return
    err = (out64 - ref64).abs()
    allowed = 2 * (lp64 - ref64).abs().max().item() + atol_floor
    bound = torch.zeros_like(err) if extra is None else extra.detach().to(torch.float64).cpu().expand_as(err)
    if (err <= allowed + bound).all():
        return
    flat = (err - bound).flatten()
    top = torch.topk(flat, min(worst, flat.numel()))
    lines = []
    for index in top.indices.tolist():
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), err.shape))
        lines.append(
            f"  at {where}: got {out64[where].item():.6g}, reference {ref64[where].item():.6g}, "
            f"low-precision reference {lp64[where].item():.6g}, error {err[where].item():.3g}"
            + ("" if extra is None else f" (bound added: {bound[where].item():.3g})")
        )
    added = "" if extra is None else " + the delta-rounding bound per element"
    raise AssertionError(
        f"{name}: max error {err.max().item():.3g} exceeds allowed {allowed:.3g} "
        f"(2 * low-precision reference error + {atol_floor:g}{added}); worst elements:\n" + "\n".join(lines)
    )


def delta_rounding_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    dropout_keep: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bound of the dq and dk error that a 16-bit backward's ``delta`` takes from the rounded output.

    The Triton backward (as FlashAttention-2/3 and FlexAttention) takes ``delta_i = sum_d dO_id O_id``
    from the output ``out`` the forward returned, rounded to its 16-bit dtype; the float32 delta pass
    that removes this runs only when an additive mask's gradient is asked (docs/perf-notes.md, "The
    backward's delta pass"). ``out`` differs from the exact output of the backward's own ``P`` by the
    forward's rounding of ``P~ = P * keep / (1 - p)`` to the dtype before ``P~ V`` (at most
    ``u P~_ij |v_jd|``, or ``tiny |v_jd|`` for a subnormal ``P~_ij``) and by its own rounding
    (``u |out_id|``), with ``u`` the dtype's unit roundoff (``eps / 2``: 2^-11 float16, 2^-8 bfloat16)
    and ``tiny`` half its smallest subnormal. float32 sums and ``exp2`` add ``(Lk + Dv + 8) 2^-24`` of
    the same. So::

        |delta_i error| <= a_i = sum_d |dO_id| ((u + (Lk + Dv + 8) 2^-24) (|out_id| + (P~ |v|)_id)
                                               + tiny (Vis |v|)_id)

    It enters every ``dS_ij = P_ij (dP_ij - delta_i)`` (``P`` without dropout's scaling), times
    softcap's derivative ``1 - tanh^2 <= 1``; so ``|dq_i error| <= scale a_i (P |k|)_i`` and
    ``|dk_j error| <= scale sum_i P_ij a_i |q_i|`` (summed over a GQA group), and dv takes none of it.
    Where ``dP_ij - delta_i`` cancels (a row with one visible key, where the reference is exact) this
    is all the error there is, so the rule's relative allowance alone is too tight there.

    Args:
        q, k, v: the call's inputs ``(B, Hq, Lq, D)``, ``(B, Hkv, Lk, D)``, ``(B, Hkv, Lk, Dv)`` (clean:
            without poison).
        out: the output the backend returned, ``(B, Hq, Lq, Dv)``; non-finite rows count as 0.
        dout: the output's gradient, ``(B, Hq, Lq, Dv)``.
        dropout_keep: bool keep mask broadcastable to ``(B, Hq, Lq, Lk)`` when ``dropout_p > 0``.
        **kwargs: the call's other keyword arguments (masks, window, lengths, softcap, scale, ...).

    Returns:
        float64 ``dq_bound (B, Hq, Lq, D)`` and ``dk_bound (B, Hkv, Lk, D)``.
    """
    from fastattn import reference
    from fastattn._inputs import normalize

    f64 = torch.float64
    info = torch.finfo(out.dtype)
    u, tiny = info.eps / 2, info.smallest_normal * info.eps / 2
    cast = {key: val.detach().to(f64) if isinstance(val, torch.Tensor) and val.is_floating_point()
            and val.dtype != torch.float32 else val for key, val in kwargs.items()}
    inputs = normalize(*(t.detach().to(f64) for t in (q, k, v)), **cast)
    p, _ = reference.probabilities(inputs)  # (B, Hq, Lq, Lk) float64, 0 where not visible
    group = inputs.heads_q // inputs.heads_kv
    k_abs, v_abs = (t.detach().to(f64).abs().repeat_interleave(group, dim=1) for t in (k, v))
    p_dropped = p if dropout_keep is None else p * dropout_keep.to(f64) / (1.0 - inputs.dropout_p)
    visible = (p_dropped > 0).to(f64)
    Lk, Dv = k.shape[2], v.shape[3]
    out_abs = torch.nan_to_num(out.detach().to(f64), nan=0.0, posinf=0.0, neginf=0.0).abs()
    per_element = (u + (Lk + Dv + 8) * 2.0**-24) * (out_abs + p_dropped @ v_abs) + tiny * (visible @ v_abs)
    a = (dout.detach().to(f64).abs() * per_element).sum(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    dq_bound = inputs.scale * a * (p @ k_abs)
    dk_bound = inputs.scale * (p * a).transpose(-1, -2) @ q.detach().to(f64).abs()  # (B, Hq, Lk, D)
    B, _, _, D = dk_bound.shape
    return dq_bound, dk_bound.view(B, inputs.heads_kv, group, Lk, D).sum(dim=2)
