"""The card's two ceilings, measured in the same run as the benchmarks: dense bf16 matmul TFLOP/s
and device-to-device copy GB/s. Attention TFLOP/s are read against the first; memory-bound
kernels against the second. Nothing here changes clocks, power or any device setting."""

from __future__ import annotations

import torch


def measure_ceilings(device: torch.device | str = "cuda", matmul_size: int = 8192, copy_bytes: int = 2 << 30) -> dict:
    """``{"matmul_bf16_tflops", "copy_gbps", ...}`` on a CUDA device (median of ``do_bench``).

    Args:
        matmul_size: ``N`` of the ``(N, N) @ (N, N)`` bf16 matmul (``2 N^3`` FLOPs).
        copy_bytes: bytes copied device to device; the rate counts a read and a write of each byte.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"ceilings are measured on a CUDA device, got {device}")
    matmul_tflops = _matmul_tflops(device, matmul_size)
    copy_gbps = _copy_gbps(device, copy_bytes)
    torch.cuda.empty_cache()
    n = matmul_size
    return {
        "matmul_bf16_tflops": round(matmul_tflops, 1),
        "matmul_shape": [n, n, n],
        "copy_gbps": round(copy_gbps, 1),
        "copy_bytes": copy_bytes,
        "method": "triton.testing.do_bench median; copy rate counts read + write",
    }


def _matmul_tflops(device: torch.device, n: int) -> float:
    import triton.testing

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: torch.matmul(a, b), warmup=100, rep=500, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _copy_gbps(device: torch.device, copy_bytes: int) -> float:
    import triton.testing

    src = torch.randn(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
