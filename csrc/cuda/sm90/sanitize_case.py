"""A small workload for compute-sanitizer over the Hopper forward: tails below and across the
128-row / 128-key tiles, Lq != Lk both ways (rows that see no key), GQA, strided and offset inputs.
Every case must take the sm90 path; exits non-zero on a wrong result.

Run on an sm_90 GPU from the repository root (tests/test_cuda_sm90.py does, for each tool)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python csrc/cuda/sm90/sanitize_case.py
"""

from __future__ import annotations

import torch

import fastattn
from fastattn import _inputs, reference
from fastattn.backends import cuda as cuda_backend


def run_case(name: str, q, k, v, causal: bool) -> None:
    path = cuda_backend.forward_path(_inputs.normalize(q, k, v, causal=causal))
    if path != "sm90":
        raise SystemExit(f"{name}: took the {path} path, not the Hopper kernel")
    out = fastattn.attention(q, k, v, causal=causal, backend="cuda")
    torch.cuda.synchronize()
    ref = reference.attention(q.float(), k.float(), v.float(), causal=causal)
    err = (out.float() - ref).abs().max().item() if out.numel() else 0.0
    finite = bool(torch.isfinite(out).all())
    print(f"{name}: max |out - ref| = {err:.3g}, finite = {finite}")
    if not finite or err > 5e-2:
        raise SystemExit(f"{name}: wrong result")


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for D in (64, 128):
            def qkv(B, Hq, Hkv, Lq, Lk, D=D, dtype=dtype):
                return tuple(torch.randn(B, h, L, D, device="cuda", dtype=dtype) for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))

            tag = f"{str(dtype).replace('torch.', '')}-D{D}"
            run_case(f"{tag} L1", *qkv(1, 1, 1, 1, 1), causal=False)
            run_case(f"{tag} Lq17-Lk200 gqa causal", *qkv(2, 4, 2, 17, 200), causal=True)
            run_case(f"{tag} Lq200-Lk17 causal (blind rows)", *qkv(1, 2, 1, 200, 17), causal=True)
            run_case(f"{tag} L300 full", *qkv(1, 2, 2, 300, 300), causal=False)
            q, k, v = (torch.randn(1, 129, 2, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
            run_case(f"{tag} (B, L, H, D) layout", q, k, v, causal=True)
            base = torch.randn(2 * 33 * D + 1, device="cuda", dtype=dtype)
            q = base[1:].view(1, 2, 33, D)
            _, k, v = qkv(1, 2, 2, 33, 33)
            run_case(f"{tag} offset q", q, k, v, causal=False)
    print("sanitize case done")


if __name__ == "__main__":
    main()
