"""The Triton kernels compile for a Hopper GPU (sm_90) and fit its shared memory, checked without one.

Each case runs the launchers in a subprocess without TRITON_INTERPRET, with ``wrap_triton``
replaced by an ahead-of-time compile (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, ptxas
included) of exactly the kernel variant the launcher would launch. This catches what the
interpreter cannot: type errors in compiled code, unsupported ops, ptxas failures and tiles that
overflow shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SMEM_LIMIT = 232448  # bytes of shared memory per block on H100

CASES = [
    pytest.param("bfloat16", 128, "causal,alibi,softcap,floatmask,dropout,lengths", id="bf16-D128-all-features"),
    pytest.param("float16", 256, "block128,gqa", id="fp16-D256-block128-gqa"),
    pytest.param("float32", 40, "window", id="fp32-D40-window"),
    pytest.param("bfloat16", 64, "docmask,gqa", id="bf16-D64-docmask-gqa"),
    pytest.param("float16", 96, "window,lengths,boolmask,dropout", id="fp16-D96-window-lengths-boolmask-dropout"),
    pytest.param("bfloat16", 256, "causal,softcap", id="bf16-D256-causal-softcap"),
    # Every autotuning config of the main path: a config that does not compile would not be skipped
    # by the autotuner on the GPU (only running out of resources is), it would fail the call.
    pytest.param("bfloat16", 128, "autotune,causal", id="bf16-D128-causal-every-tuned-config"),
    pytest.param("float16", 64, "autotune", id="fp16-D64-every-tuned-config"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, head_dim, features", CASES)
def test_kernels_compile_for_sm90(dtype, head_dim, features):
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["FASTATTN_AUTOTUNE"] = "1" if "autotune" in features else "0"
    done = subprocess.run(
        [sys.executable, __file__, dtype, str(head_dim), features], env=env, capture_output=True, text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    names = {c["kernel"] for c in compiled}
    assert {"attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"} <= names
    if "autotune" in features:
        # Configs over the shared memory limit are skipped by the autotuner at run time; each kernel
        # must keep some that fit.
        for name in names:
            assert any(c["shared"] <= SMEM_LIMIT for c in compiled if c["kernel"] == name), name
        return
    for c in compiled:
        assert c["shared"] <= SMEM_LIMIT, f"{c['kernel']} {c['meta']} needs {c['shared']} bytes of shared memory"


def _compile_launches(dtype_name: str, head_dim: int, features: set[str]) -> list[dict]:
    """Run forward and backward launchers with every ``wrap_triton`` launch compiled, not run."""
    import importlib

    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    from fastattn import BlockMask, masks
    from fastattn.backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    attention_fwd = importlib.import_module("fastattn.triton_kernels.attention_fwd").attention_fwd
    attention_bwd = importlib.import_module("fastattn.triton_kernels.attention_bwd").attention_bwd

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    compiled = []

    class Compile:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(**kwargs):
                if hasattr(self.kernel, "configs"):  # an autotuner: compile every config it would try
                    for config in self.kernel.configs:
                        meta = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                        compile_one(self.kernel.fn, meta)
                else:
                    compile_one(self.kernel, kwargs)

            return launch

    def compile_one(fn, kwargs):
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        k = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        meta = {key: kwargs.get(key) for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        compiled.append({"kernel": fn.__name__, "meta": meta, "shared": k.metadata.shared})

    torch.library.wrap_triton = Compile
    dtype = getattr(torch, dtype_name)
    B, Hq, L = 1, 4, 300
    Hkv = 1 if "gqa" in features else Hq
    q = torch.randn(B, Hq, L, head_dim, dtype=dtype)
    k = torch.randn(B, Hkv, L, head_dim, dtype=dtype)
    v = torch.randn(B, Hkv, L, head_dim, dtype=dtype)
    kwargs = {"scale": head_dim**-0.5}
    lists = {}
    if "causal" in features:
        kwargs["window_right"] = 0
    if "window" in features:
        kwargs.update(window_left=17, window_right=3)
    if "alibi" in features:
        kwargs["alibi_slopes"] = torch.rand(B, Hq)
    if "softcap" in features:
        kwargs["softcap"] = 20.0
    if "dropout" in features:
        kwargs.update(dropout_p=0.1, seed=2**40 + 7)
    if "lengths" in features:
        kwargs.update(key_lengths=torch.tensor([250], dtype=torch.int32), query_lengths=torch.tensor([200], dtype=torch.int32))
    if "floatmask" in features:
        kwargs["attn_mask"] = torch.randn(L, L, dtype=dtype).expand(B, Hq, L, L)
    if "boolmask" in features:
        kwargs["attn_mask"] = (torch.rand(L, L) > 0.3).expand(B, Hq, L, L)
    mask = None
    if "block128" in features:
        mask = BlockMask.from_dense(torch.rand(L, L) > 0.5, block_size=128)
    if "docmask" in features:  # per-tile element masks (partial_masks) instead of a dense mask
        mask = masks.document((torch.arange(L) // 70)[None], causal=True, block_size=64)
        kwargs.update(partial_masks=mask.partial_masks, partial_tile_ids=mask.partial_tile_ids)
    if mask is not None:
        kwargs.update(zip(("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"), mask.kv_lists))
        kwargs.update(block_size_q=mask.block_size[0], block_size_k=mask.block_size[1])
        lists = dict(zip(("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"), mask.q_lists))
    attention_fwd(q, k, v, **kwargs)
    out, lse = torch.zeros(B, Hq, L, head_dim, dtype=dtype), torch.zeros(B, Hq, L)
    attention_bwd(torch.randn_like(out), q, k, v, out, lse, **kwargs, **lists, compute_dbias="floatmask" in features)
    return compiled


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = _compile_launches(sys.argv[1], int(sys.argv[2]), set(sys.argv[3].split(",")))
    print(json.dumps(result))
