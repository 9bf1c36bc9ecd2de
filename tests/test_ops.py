"""The op contract: custom ops with fakes, opcheck, torch.compile, and C++ schemas equal to Python's."""

import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import BlockMask, _extension
from fastattn.ops import BWD_SCHEMA, FWD_SCHEMA

from .helpers import bwd_op_args, make_qkv, op_args

OPCHECK_CASES = [
    pytest.param({}, id="dense"),
    pytest.param({"causal": True, "alibi_slopes": torch.tensor([0.5, 0.25])}, id="causal-alibi"),
    pytest.param({"window": (2, 1), "softcap": 2.0}, id="window-softcap"),
    pytest.param({"attn_mask": torch.randn(5, 7)}, id="float-mask"),
    pytest.param({"block_mask": BlockMask.from_dense(torch.rand(5, 7) > 0.5, block_size=(2, 4))}, id="block-mask"),
]


@pytest.mark.parametrize("kwargs", OPCHECK_CASES)
def test_opcheck_reference_ops(kwargs):
    q, k, v = make_qkv(1, 2, 1, 5, 7, 8, requires_grad=False)
    fwd, lists = op_args(q, k, v, **kwargs)
    ops = fastattn.get_backend("reference").ops
    torch.library.opcheck(ops.fwd, tuple(fwd))
    out, lse = ops.fwd(*fwd)
    mask = fwd[3]
    compute_dbias = mask is not None and mask.is_floating_point()
    torch.library.opcheck(ops.bwd, tuple(bwd_op_args(fwd, lists, out, lse, compute_dbias)))


def test_compile_fullgraph_traces_through_the_ops():
    q, k, v = make_qkv(2, 4, 2, 9, 11, 8)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return fastattn.attention(q, k, v, causal=True, softcap=5.0)

    out = f(q, k, v)
    torch.testing.assert_close(out, fastattn.reference.attention(q, k, v, causal=True, softcap=5.0))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.skipif(_extension.load()[0] is None, reason="the C++ extension is not built")
def test_cpp_schemas_equal_python_schemas():
    _extension.load()
    fwd = str(torch.ops.fastattn.attention_fwd.default._schema)
    bwd = str(torch.ops.fastattn.attention_bwd.default._schema)
    assert fwd == "fastattn::attention_fwd" + FWD_SCHEMA.replace("-> (Tensor, Tensor)", "-> (Tensor, Tensor)")
    assert bwd == "fastattn::attention_bwd" + BWD_SCHEMA


def test_extension_is_built_by_the_install():
    """The README's install builds fastattn._C; CI must notice if it silently stops doing so."""
    module, error = _extension.load()
    assert module is not None, error
    assert isinstance(module.build_info()["cuda"], bool)


def test_package_imports_and_works_without_the_extension():
    code = (
        "import sys; sys.modules['fastattn._C'] = None\n"
        "import torch, fastattn\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "out = fastattn.attention(q, q, q, causal=True)\n"
        "assert torch.allclose(out, fastattn.reference.attention(q, q, q, causal=True))\n"
        "text = fastattn.info(print_out=False)\n"
        "assert 'not built' in text, text\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_cli_info_runs():
    result = subprocess.run([sys.executable, "-m", "fastattn", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reference" in result.stdout and "backends" in result.stdout
    result = subprocess.run([sys.executable, "-m", "fastattn", "info", "--json"], capture_output=True, text=True, timeout=120)
    import json

    data = json.loads(result.stdout)
    assert [b["name"] for b in data["backends"]] == ["cuda", "triton", "cpu", "reference"]
