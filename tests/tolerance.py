"""The one tolerance rule of the test suite (flash-attn's).

A result passes when ``max|out - ref32| <= 2 * max|ref_lp - ref32| + atol_floor``, where ``ref32``
is the reference in high precision (float32, or float64 for float32 inputs) and ``ref_lp`` the
reference computed in the input's own precision: a backend may be at most twice as wrong as
PyTorch itself is in that precision.
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
) -> None:
    """Assert flash-attn's rule for ``out``; on failure, list the ``worst`` elements."""
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    if atol_floor is None:
        atol_floor = ATOL_FLOOR[out.dtype]
    out64, ref64, lp64 = (t.detach().to(torch.float64).cpu() for t in (out, ref32, ref_lp))
    assert torch.isfinite(out64).all(), f"{name}: {int((~torch.isfinite(out64)).sum())} non-finite values"
    if out64.numel() == 0:
        return
    err = (out64 - ref64).abs()
    allowed = 2 * (lp64 - ref64).abs().max().item() + atol_floor
    if err.max().item() <= allowed:
        return
    flat = err.flatten()
    top = torch.topk(flat, min(worst, flat.numel()))
    lines = []
    for value, index in zip(top.values.tolist(), top.indices.tolist()):
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), err.shape))
        lines.append(
            f"  at {where}: got {out64[where].item():.6g}, reference {ref64[where].item():.6g}, "
            f"low-precision reference {lp64[where].item():.6g}, error {value:.3g}"
        )
    raise AssertionError(
        f"{name}: max error {err.max().item():.3g} exceeds allowed {allowed:.3g} "
        f"(2 * low-precision reference error + {atol_floor:g}); worst elements:\n" + "\n".join(lines)
    )
