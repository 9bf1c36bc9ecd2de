"""Addressing in the Triton forward and rotary kernels, and what they never read.

* int64 offsets: every tile pointer of the forward, combine, dropout-pattern and rotary kernels is
  formed with 64-bit offsets (checked in the TTGIR of an ahead-of-time sm_90a compile), and rows
  2**30 elements apart (row 2 past int32) are read right through the interpreter, over a sparse
  memory-mapped file (no memory is spent on the gap).
* The compiled softcap: one hardware tanh per score, no division.
* Hidden values: NaN in keys and values a row cannot see (past key_lengths, outside the band, in
  empty BlockMask tiles, under -inf) never reaches its output or lse; additive masks at
  ``torch.finfo(dtype).min`` give what the reference gives.
* The output is written in q's dim order.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32 = torch.float16, torch.float32


def _kernels():
    from fastattn.backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    from fastattn.triton_kernels import attention_fwd, rotary

    return attention_fwd, rotary


# --------------------------------------------------------------------------- compiled code (sm_90a)
def _compile_all() -> list[dict]:
    """Compile, without launching, every kernel variant the launchers below would launch; per
    kernel, the TTGIR tile pointers formed with 32-bit offsets and the PTX op counts."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    from fastattn.backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    fwd = importlib.import_module("fastattn.triton_kernels.attention_fwd")
    rotary = importlib.import_module("fastattn.triton_kernels.rotary")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    compiled = []

    class Compile:
        def __init__(self, kernel, case):
            self.kernel, self.case = kernel, case

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                fn = self.kernel
                kwargs.update(zip(fn.arg_names, args))
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                bound, specialization, options = binder(**kwargs)
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
                k = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
                ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
                narrow = [line.strip() for line in ttgir.splitlines()
                          if "tt.addptr" in line and re.search(r", tensor<[0-9x]+xi32", line)]
                compiled.append({
                    "case": case[0], "kernel": fn.__name__, "narrow_addptr": narrow,
                    "tensor_addptr": sum("tt.addptr" in line and "tensor<" in line for line in ttgir.splitlines()),
                    "tanh": len(re.findall(r"\btanh\.approx\.f32", ptx)), "div": len(re.findall(r"\bdiv\.", ptx)),
                    "elements_per_thread": kwargs.get("BLOCK_M", 0) * kwargs.get("BLOCK_N", 0)
                    // (32 * kwargs.get("num_warps", 4)),
                })

            return launch

    case = [""]
    torch.library.wrap_triton = lambda kernel: Compile(kernel, case)
    B, Hq, L, D = 1, 4, 300, 32
    q, k, v = (torch.randn(B, Hq, L, D, dtype=F16) for _ in range(3))
    common = dict(alibi_slopes=torch.rand(B, Hq), key_lengths=torch.tensor([250], dtype=torch.int32),
                  query_lengths=torch.tensor([200], dtype=torch.int32))
    case[0] = "dense: float mask, alibi, lengths, dropout, causal"
    fwd.attention_fwd(q, k, v, fwd.MaskArgs(attn_mask=torch.randn(L, L, dtype=F16).expand(B, Hq, L, L),
                                            window_right=0, **common), scale=D**-0.5, dropout_p=0.1, seed=3)
    case[0] = "decode: GQA packed, bool mask, alibi, lengths, 3 splits"
    kv = torch.randn(B, 1, L, D, dtype=F16)
    fwd.attention_fwd(q[:, :, :1], kv, kv, fwd.MaskArgs(attn_mask=(torch.rand(B, Hq, 1, L) > 0.5), **common),
                      scale=D**-0.5, num_splits=3)
    case[0] = "softcap"
    fwd.attention_fwd(q, k, v, fwd.MaskArgs(softcap=20.0), scale=D**-0.5)
    case[0] = "no softcap"
    fwd.attention_fwd(q, k, v, scale=D**-0.5)
    case[0] = "dropout pattern"
    fwd.dropout_keep_mask(B, Hq, L, L, 0.1, 3, "cpu")
    case[0] = "rotary"
    rotary.rotary_kernel = Compile(rotary.rotary_kernel, case)
    rotary.apply_rotary(torch.randn(2, 9, 3, 32), torch.rand(16, 16), torch.rand(16, 16), torch.zeros(2, dtype=torch.int32))
    return compiled


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["FASTATTN_AUTOTUNE"] = "0"
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tile_pointers_use_64_bit_offsets(compiled):
    kernels = {c["kernel"] for c in compiled}
    assert {"attention_fwd_kernel", "attention_combine_kernel", "dropout_keep_kernel", "rotary_kernel"} <= kernels
    for c in compiled:
        assert c["tensor_addptr"] > 0, c
        assert not c["narrow_addptr"], f"{c['case']} / {c['kernel']}: 32-bit tile offsets:\n" + "\n".join(
            c["narrow_addptr"][:5]
        )


@pytest.mark.slow
def test_softcap_is_one_hardware_tanh_per_score_and_no_division(compiled):
    by_case = {c["case"]: c for c in compiled if c["kernel"] == "attention_fwd_kernel"}
    soft, plain = by_case["softcap"], by_case["no softcap"]
    # Without window or lengths the loop over key blocks is compiled twice (unmasked interior,
    # masked last block): one tanh per score of each.
    assert soft["tanh"] == 2 * soft["elements_per_thread"], soft
    assert plain["tanh"] == 0
    # The pre-scale sm_scale / softcap is one scalar division per program; the old formula had
    # two full divisions per score (2 * 2 * elements_per_thread more).
    assert soft["div"] <= plain["div"] + 1, (soft["div"], plain["div"])


# --------------------------------------------------------------------------- past int32, interpreted
@pytest.fixture
def sparse_storage(tmp_path):
    """A float32 tensor of ``2**31 + 4096`` elements over a sparse file (only touched pages cost)."""
    numel = 2**31 + 4096
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(numel * 4)
    return torch.from_file(str(path), shared=True, size=numel, dtype=F32)


@pytest.mark.interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on machines without a GPU")
def test_rows_past_int32_offsets_are_read_right(sparse_storage):
    from fastattn import reference

    fwd, _ = _kernels()
    L, D, row = 3, 16, 2**30  # row 2 starts at element 2**31
    # q, k, v: rows `row` elements apart; columns [0, D), [D, 2D), [2D, 3D) of each row.
    base = sparse_storage.as_strided((L, 3 * D), (row, 1))
    base.copy_(torch.randn(L, 3 * D))
    q, k, v = (base[:, i * D:(i + 1) * D].view(1, 1, L, D) for i in range(3))
    assert q.stride(2) == row and k.storage_offset() == D
    mask = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.0, 0.0], [0.0, -2.0, 1.0]])
    strided_mask = sparse_storage[4 * D:].as_strided((1, 1, L, L), (0, 0, row, 1))
    strided_mask.copy_(mask)
    out, lse = fwd.attention_fwd(q, k, v, fwd.MaskArgs(attn_mask=strided_mask), scale=D**-0.5)
    want, want_lse = reference.attention(*(t.double().contiguous() for t in (q, k, v)), attn_mask=mask.double(),
                                         return_lse=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on machines without a GPU")
def test_rotary_rows_past_int32_offsets(sparse_storage):
    from fastattn.nn.positional import apply_rotary_reference

    _, rotary = _kernels()
    x = sparse_storage.as_strided((1, 3, 1, 32), (0, 2**30, 32, 1))  # (B, L, H, D), row 2 past int32
    x.copy_(torch.randn(1, 3, 1, 32))
    cos, sin = torch.rand(8, 16), torch.rand(8, 16)
    offsets = torch.tensor([2], dtype=torch.int32)
    got = rotary.apply_rotary(x, cos, sin, offsets)
    torch.testing.assert_close(got, apply_rotary_reference(x.clone(), cos, sin, offsets), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- hidden values, extreme masks
def _poisoned(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN / +inf / -inf cycling over the key rows selected by ``where`` (B, Hkv, Lk)."""
    t = t.detach().clone()
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype, device=t.device)
    idx = where.nonzero(as_tuple=True)
    t[idx] = bad[torch.arange(len(idx[0]), device=t.device) % 3][:, None].expand(-1, t.shape[-1])
    return t


def _check_poison_free(q, k, v, hidden, values: bool = True, **kwargs):
    """Keys ``hidden`` (B, Hkv, Lk) that no query may see, poisoned in k (and v), change nothing."""
    import fastattn

    clean, clean_lse = fastattn.attention(q, k, v, backend="triton", return_lse=True, **kwargs)
    v_bad = _poisoned(v, hidden) if values else v
    out, lse = fastattn.attention(q, _poisoned(k, hidden), v_bad, backend="triton", return_lse=True, **kwargs)
    assert torch.isfinite(out).all(), "a hidden NaN / inf reached an output"
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)


def _qkv(B, Hq, Hkv, Lq, Lk, D=16, dtype=F32):
    return (torch.randn(B, h, L, D, dtype=dtype, device=DEVICE) for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))


@pytest.mark.interpreter
@pytest.mark.parametrize("Lq", [pytest.param(1, id="decode-Lq1"), pytest.param(37, id="Lq37")])
def test_values_past_key_lengths_never_reach_a_row(Lq):
    q, k, v = _qkv(2, 4, 2, Lq, 90)
    key_lengths = torch.tensor([50, 77], dtype=torch.int32, device=DEVICE)
    hidden = torch.arange(90, device=DEVICE)[None, None, :] >= key_lengths[:, None, None]
    _check_poison_free(q, k, v, hidden.expand(2, 2, 90), key_lengths=key_lengths)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "Lq, left", [pytest.param(3, 20, id="Lq3-Lk200-window20"), pytest.param(40, 30, id="Lq40-Lk200-window30")]
)
def test_values_outside_the_band_never_reach_a_row(Lq, left):
    # Bottom-right aligned: query rows sit at positions 200 - Lq .. 199 and see `left` keys back, so
    # keys before 200 - Lq - left are outside every band; some share a visited key block with
    # visible ones (their values must not be loaded: P = 0 times NaN would be NaN).
    q, k, v = _qkv(1, 4, 1, Lq, 200)
    hidden = (torch.arange(200, device=DEVICE) < 200 - Lq - left)[None, None, :]
    _check_poison_free(q, k, v, hidden, window=(left, 0))


@pytest.mark.interpreter
def test_values_in_empty_block_mask_tiles_never_reach_a_row():
    from fastattn import BlockMask

    q, k, v = _qkv(1, 2, 1, 64, 96)
    layout = torch.tensor([[True, False, True], [False, False, True]], device=DEVICE)
    mask = BlockMask.from_layout(layout, block_size=32, seq_lens=(64, 96))
    hidden = (torch.arange(96, device=DEVICE) // 32 == 1)[None, None, :]  # key block 1 is empty for all rows
    _check_poison_free(q, k, v, hidden, block_mask=mask)


@pytest.mark.interpreter
def test_keys_under_a_minus_inf_bias_never_reach_a_row():
    # NaN / inf keys under a -inf bias are selected away (NaN + -inf would be NaN). Their values
    # still meet P = 0 in the tile's P @ V (the documented gap), so only keys are poisoned here.
    q, k, v = _qkv(1, 2, 2, 5, 40)
    bias = torch.randn(5, 40, device=DEVICE)
    bias[:, 7] = float("-inf")
    bias[:, 30:] = float("-inf")
    hidden = (bias[0] == float("-inf"))[None, None, :].expand(1, 2, 40)
    _check_poison_free(q, k, v, hidden, values=False, attn_mask=bias)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype", [pytest.param(F32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"), pytest.param(F16, id="fp16")]
)
def test_additive_mask_at_the_dtype_minimum(dtype):
    # Hugging Face pads with torch.finfo(dtype).min. In float32 and bfloat16 it absorbs the score,
    # so a fully padded row averages V, as the reference does (it must not overflow to -inf in
    # log2 units and give 0); float16's minimum (-65504) leaves the scores' differences.
    import fastattn
    from fastattn import reference

    from .tolerance import assert_close_to_reference, high_precision

    q, k, v = _qkv(1, 2, 2, 6, 33, dtype=dtype)
    bias = torch.zeros(1, 1, 6, 33, dtype=dtype, device=DEVICE)
    bias[..., 20:] = torch.finfo(dtype).min  # padding
    bias[..., 2, :] = torch.finfo(dtype).min  # a fully masked row
    out, lse = fastattn.attention(q, k, v, attn_mask=bias, backend="triton", return_lse=True)
    hp = high_precision(dtype)
    ref32 = reference.attention(q.to(hp), k.to(hp), v.to(hp), attn_mask=bias.to(hp))
    ref_lp = reference.attention(q, k, v, attn_mask=bias)
    assert_close_to_reference("out", out, ref32, ref_lp)
    if dtype != F16:
        torch.testing.assert_close(out[0, :, 2].float(), v[0].float().mean(1), atol=1e-2, rtol=1e-2)
    assert torch.isfinite(lse).all()


# --------------------------------------------------------------------------- output layout
@pytest.mark.interpreter
@pytest.mark.parametrize("Lq", [pytest.param(1, id="decode-split"), pytest.param(33, id="Lq33")])
def test_output_in_the_dim_order_of_q(Lq):
    fwd, _ = _kernels()
    B, H, D = 2, 4, 16
    q = torch.randn(B, Lq, H, D, device=DEVICE).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    k, v = (torch.randn(B, 40, 2, D, device=DEVICE).transpose(1, 2) for _ in range(2))
    out, _ = fwd.attention_fwd(q, k, v, scale=D**-0.5, num_splits=2 if Lq == 1 else 1)
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    contiguous, _ = fwd.attention_fwd(q.contiguous(), k, v, scale=D**-0.5)
    assert contiguous.is_contiguous()
    torch.testing.assert_close(out, contiguous, atol=1e-6, rtol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(_compile_all()))
