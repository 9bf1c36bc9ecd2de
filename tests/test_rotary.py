"""Rotary embedding: the Triton kernel (interpreter on the CPU, CUDA under -m gpu) against the
PyTorch path in values and gradients, and the PyTorch path against the definition."""

import pytest
import torch

from fastattn.nn import RotaryEmbedding
from fastattn.nn.positional import apply_rotary_reference

from .conftest import HAS_GPU

CASES = [
    pytest.param(1, 1, 1, 8, 8, False, id="B1-L1-H1-D8-R8-half"),
    pytest.param(2, 17, 3, 40, 40, False, id="B2-L17-H3-D40-R40-half"),
    pytest.param(2, 17, 3, 40, 40, True, id="B2-L17-H3-D40-R40-interleaved"),
    pytest.param(3, 9, 2, 64, 24, False, id="B3-L9-H2-D64-R24-partial-half"),
    pytest.param(1, 33, 5, 96, 30, True, id="B1-L33-H5-D96-R30-partial-interleaved"),
]


def check_kernel(B, L, H, D, R, interleaved, device, dtype):
    rope = RotaryEmbedding(R, interleaved=interleaved, max_positions=8)  # tables grow on demand
    x = torch.randn(B, 2 * L, H, D, device=device, dtype=dtype)[:, ::2]  # strided rows: no copy expected
    offsets = torch.randint(0, 50, (B,), device=device)
    dout = torch.randn(B, L, H, D, device=device, dtype=dtype)
    results = []
    for use_triton in (True, False):
        rope.use_triton = use_triton
        leaf = x.detach().clone().requires_grad_()
        out = rope.rotate(leaf, offsets)
        (grad,) = torch.autograd.grad(out, leaf, dout)
        results.append((out, grad))
    (out_k, grad_k), (out_ref, grad_ref) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_k, out_ref, **tol)
    torch.testing.assert_close(grad_k, grad_ref, **tol)
    assert torch.equal(out_k[..., R:], x[..., R:]), "features past rotary_dim must pass through"


@pytest.mark.interpreter
@pytest.mark.skipif(HAS_GPU, reason="the interpreter runs on machines without a GPU")
@pytest.mark.parametrize("B, L, H, D, R, interleaved", CASES)
def test_kernel_matches_pytorch_interpreter(B, L, H, D, R, interleaved):
    check_kernel(B, L, H, D, R, interleaved, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B, L, H, D, R, interleaved", CASES)
def test_kernel_matches_pytorch_gpu(B, L, H, D, R, interleaved, dtype):
    check_kernel(B, L, H, D, R, interleaved, "cuda", dtype)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_pytorch_path_is_complex_rotation(interleaved):
    """Each feature pair, read as a complex number, is multiplied by exp(i * position * theta_k)."""
    B, L, H, R = 2, 7, 3, 12
    x = torch.randn(B, L, H, R, dtype=torch.float64)
    offsets = torch.tensor([0, 5])
    rope = RotaryEmbedding(R, interleaved=interleaved)
    cos, sin = rope.tables(16, x.device)
    got = apply_rotary_reference(x, cos.double(), sin.double(), offsets, interleaved)
    if interleaved:
        pairs = torch.view_as_complex(x.reshape(B, L, H, R // 2, 2))
    else:
        pairs = torch.complex(x[..., : R // 2], x[..., R // 2 :])
    theta = 10000.0 ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    positions = (offsets[:, None] + torch.arange(L))[:, :, None, None].double()
    rotated = pairs * torch.polar(torch.ones_like(theta), positions * theta)
    if interleaved:
        want = torch.view_as_real(rotated).reshape(B, L, H, R)
    else:
        want = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # tables are float32


def test_scores_depend_on_relative_position_only():
    """q_m . k_n after rotary depends on m - n: shifting both by the same offset changes nothing."""
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    scores = lambda offset: torch.einsum("blhd,bmhd->bhlm", *rope(q, k, offset))
    torch.testing.assert_close(scores(0), scores(37), atol=1e-4, rtol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="rotary dim"):
        rope.rotate(torch.randn(1, 3, 2, 6))
    with pytest.raises(ValueError, match="offset"):
        rope.rotate(torch.randn(2, 3, 2, 8), offset=-1)
    with pytest.raises(ValueError, match="offset"):
        rope.rotate(torch.randn(2, 3, 2, 8), offset=torch.tensor([1, 2, 3]))


def test_tables_stay_float32_after_casting_the_module():
    rope = RotaryEmbedding(8).to(torch.bfloat16)
    cos, sin = rope.tables(4, torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float32
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    want = apply_rotary_reference(x.float(), cos, sin, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(rope.rotate(x).float(), want, atol=2e-2, rtol=2e-2)
