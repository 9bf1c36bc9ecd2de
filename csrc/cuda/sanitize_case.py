"""A small CUDA-backend workload for the sanitizers: forward and backward over the edge cases
(odd lengths below and across a tile, Lq != Lk, GQA, padding lengths, windows with empty rows and
boundary tiles at both ends, block lists on the 128-row and the generic 64-row kernels, additive
masks with a broadcast gradient, a strided mask, an offset input), with the backward's default dQ
atomics and again in the deterministic mode (torch.use_deterministic_algorithms: the generic
key-block kernel adding dQ in key-block order). Exits non-zero on a wrong result.

Run on a GPU from the repository root, once per tool::

    compute-sanitizer --tool memcheck --error-exitcode 1 python csrc/cuda/sanitize_case.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python csrc/cuda/sanitize_case.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python csrc/cuda/sanitize_case.py

The setup (input factory, result check, the dtype x head-dim sweep) is shared with the Hopper
forward's workload, csrc/cuda/sm90/sanitize_case.py.
"""

from __future__ import annotations

import torch

import fastattn
from fastattn import reference


def qkv_factory(D: int, dtype: torch.dtype, requires_grad: bool = True):
    """``qkv(B, Hq, Hkv, Lq, Lk)`` -> random CUDA q, k, v of head dim ``D`` in ``dtype``."""

    def qkv(B, Hq, Hkv, Lq, Lk):
        return tuple(
            torch.randn(B, h, L, D, device="cuda", dtype=dtype).requires_grad_(requires_grad)
            for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk))
        )

    return qkv


def sweep():
    """(tag, dtype, D) for every dtype and head dim the CUDA kernels are compiled for."""
    for dtype in (torch.float16, torch.bfloat16):
        for D in (64, 128):
            yield f"{str(dtype).replace('torch.', '')}-D{D}", dtype, D


def check_result(name: str, out: torch.Tensor, ref: torch.Tensor, *others: torch.Tensor) -> None:
    """Print the case's error; exit non-zero when ``out`` is off the reference or anything is not finite."""
    torch.cuda.synchronize()
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    finite = all(torch.isfinite(t).all().item() for t in (out, *others))
    print(f"{name}: max |out - ref| = {err:.3g}, finite = {finite}")
    if not finite or err > 5e-2:
        raise SystemExit(f"{name}: wrong result")


def run_case(name: str, q, k, v, **kwargs) -> None:
    out = fastattn.attention(q, k, v, backend="cuda", **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    ref = reference.attention(*(t.detach().float() for t in (q, k, v)), **kwargs)
    check_result(name, out, ref, *grads)


def main() -> None:
    torch.manual_seed(0)
    for deterministic in (False, True):
        # warn_only: the reference's cuBLAS matmuls run without CUBLAS_WORKSPACE_CONFIG.
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        print(f"deterministic = {deterministic}")
        run_all()
    print("sanitize case done")


def run_all() -> None:
    for tag, dtype, D in sweep():
        qkv = qkv_factory(D, dtype)
        run_case(f"{tag} L1", *qkv(1, 1, 1, 1, 1))
        run_case(f"{tag} Lq17-Lk97 gqa causal", *qkv(2, 4, 2, 17, 97), causal=True)
        run_case(f"{tag} Lq97-Lk17 window", *qkv(1, 2, 1, 97, 17), window=(3, 2))
        lengths = torch.tensor([70, 0], dtype=torch.int32, device="cuda")
        qlens = torch.tensor([65, 3], dtype=torch.int32, device="cuda")
        run_case(f"{tag} lengths", *qkv(2, 2, 2, 65, 70), causal=True, key_lengths=lengths, query_lengths=qlens)
        mask = torch.rand(130, 70, device="cuda") > 0.5
        run_case(f"{tag} bool mask broadcast", *qkv(1, 2, 2, 130, 70), attn_mask=mask)
        layout = torch.tensor([[True, False], [True, True], [False, True]], device="cuda")
        block_mask = fastattn.BlockMask.from_layout(layout, block_size=64, seq_lens=(150, 100))
        run_case(f"{tag} block mask 64 (generic kernel)", *qkv(1, 2, 1, 150, 100), block_mask=block_mask)
        block_mask = fastattn.BlockMask.from_layout(layout, block_size=128, seq_lens=(300, 200))
        run_case(f"{tag} block mask 128", *qkv(1, 2, 1, 300, 200), block_mask=block_mask)
        run_case(f"{tag} window both edges", *qkv(1, 2, 2, 300, 700), window=(200, 100))
        bias = torch.randn(1, 1, 1, 300, device="cuda", dtype=dtype).requires_grad_()
        run_case(f"{tag} additive mask with gradient", *qkv(2, 2, 1, 97, 300), attn_mask=bias)
        base = torch.randn(2 * 33 * D + 1, device="cuda", dtype=dtype)
        q = base[1:].view(1, 2, 33, D).detach().requires_grad_()
        _, k, v = qkv(1, 2, 2, 33, 33)
        run_case(f"{tag} misaligned q", q, k, v, softcap=10.0, alibi_slopes=torch.rand(2, device="cuda"))


if __name__ == "__main__":
    main()
