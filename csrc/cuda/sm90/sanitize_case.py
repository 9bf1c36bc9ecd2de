"""A small workload for compute-sanitizer over the Hopper forward: tails below and across the
128-row / 128-key tiles, Lq != Lk both ways (rows that see no key), GQA, strided and offset inputs,
and each compile-time feature set (window, ALiBi, softcap, lengths, BlockMask tile lists). Every
case must take the sm90 path; exits non-zero on a wrong result. The setup is
csrc/cuda/sanitize_case.py's.

Run on an sm_90 GPU from the repository root (tests/test_cuda_sm90.py does, for each tool)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python csrc/cuda/sm90/sanitize_case.py
"""

from __future__ import annotations

import importlib.util
import os

import torch

import fastattn
from fastattn import _inputs, reference
from fastattn.backends import cuda as cuda_backend

_spec = importlib.util.spec_from_file_location(
    "sanitize_case", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sanitize_case.py")
)
shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shared)


def run_case(name: str, q, k, v, **kwargs) -> None:
    """The forward only (the backward is the sm80 kernels'), on the Hopper path."""
    path = cuda_backend.forward_path(_inputs.normalize(q, k, v, **kwargs))
    if path != "sm90":
        raise SystemExit(f"{name}: took the {path} path, not the Hopper kernel")
    out = fastattn.attention(q, k, v, backend="cuda", **kwargs)
    shared.check_result(name, out, reference.attention(q.float(), k.float(), v.float(), **kwargs))


def main() -> None:
    torch.manual_seed(0)
    for tag, dtype, D in shared.sweep():
        qkv = shared.qkv_factory(D, dtype, requires_grad=False)
        run_case(f"{tag} L1", *qkv(1, 1, 1, 1, 1))
        run_case(f"{tag} Lq17-Lk200 gqa causal", *qkv(2, 4, 2, 17, 200), causal=True)
        run_case(f"{tag} Lq200-Lk17 causal (blind rows)", *qkv(1, 2, 1, 200, 17), causal=True)
        run_case(f"{tag} L300 full", *qkv(1, 2, 2, 300, 300))
        q, k, v = (torch.randn(1, 129, 2, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
        run_case(f"{tag} (B, L, H, D) layout", q, k, v, causal=True)
        base = torch.randn(2 * 33 * D + 1, device="cuda", dtype=dtype)
        _, k, v = qkv(1, 2, 2, 33, 33)
        run_case(f"{tag} offset q", base[1:].view(1, 2, 33, D), k, v)
        run_case(f"{tag} window both edges", *qkv(1, 2, 2, 300, 700), window=(200, 100))
        run_case(f"{tag} window, empty rows", *qkv(1, 2, 2, 700, 300), window=(100, 0))
        lengths = torch.tensor([270, 0], dtype=torch.int32, device="cuda")
        qlens = torch.tensor([65, 3], dtype=torch.int32, device="cuda")
        run_case(f"{tag} lengths", *qkv(2, 2, 1, 300, 300), causal=True, key_lengths=lengths, query_lengths=qlens)
        layout = torch.tensor([[True, False], [True, True], [False, True]], device="cuda")
        block_mask = fastattn.BlockMask.from_layout(layout, block_size=128, seq_lens=(300, 200))
        run_case(f"{tag} block mask 128 + alibi", *qkv(1, 2, 1, 300, 200), block_mask=block_mask,
                 alibi_slopes=torch.rand(2, device="cuda"))
        run_case(f"{tag} softcap + window + alibi", *qkv(2, 2, 2, 257, 130), softcap=10.0, window=(64, 0),
                 alibi_slopes=torch.rand(2, 2, device="cuda"))
    print("sanitize case done")


if __name__ == "__main__":
    main()
