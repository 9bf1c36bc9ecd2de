"""Backend selection: priority order, explicit choice, FASTATTN_BACKEND, and errors listing reasons."""

import subprocess
import sys

import pytest
import torch

import fastattn
import fastattn.backends as registry
from fastattn.backends import BackendNotSupportedError, select_backend
from fastattn.backends.base import Backend, used_features

from .helpers import make_qkv


def inputs(**kwargs):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    return fastattn._inputs.normalize(q, k, v, **kwargs)


def test_every_backend_is_registered_in_priority_order():
    names = [name for name, _, _ in registry.status()]
    assert names == ["cuda", "triton", "cpu", "reference"]
    assert "reference" in fastattn.list_backends()


def test_reference_is_always_usable():
    assert fastattn.get_backend("reference").reasons(inputs(causal=True, dropout_p=0.5)) == []


def test_automatic_choice_follows_priority(monkeypatch):
    class Fake(Backend):
        name = "cpu"
        description = "pretends to serve everything but dropout"

        def not_supported_reasons(self, inputs):
            return ["dropout is not supported"] if inputs.dropout_p else []

    registry.backends()
    monkeypatch.setitem(registry._REGISTRY, "cpu", Fake())
    for name in ("cuda", "triton"):
        if name in registry._REGISTRY:
            monkeypatch.setattr(registry._REGISTRY[name], "reasons", lambda inputs: ["not here"])
    assert select_backend(inputs()).name == "cpu"
    assert select_backend(inputs(dropout_p=0.1)).name == "reference"


def test_explicit_backend_that_cannot_serve_lists_reasons(monkeypatch):
    class Refuser(Backend):
        name = "cpu"

        def not_supported_reasons(self, inputs):
            return ["reason one", "reason two"]

    registry.backends()
    monkeypatch.setitem(registry._REGISTRY, "cpu", Refuser())
    with pytest.raises(BackendNotSupportedError, match="reason one\n.*reason two"):
        select_backend(inputs(), "cpu")
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this call"):
        fastattn.attention(q, k, v, backend="cpu")


def test_environment_variable_overrides_the_default(monkeypatch):
    calls = []

    class Spy(Backend):
        name = "cpu"

        def not_supported_reasons(self, inputs):
            calls.append(inputs)
            return ["spy refuses"]

    registry.backends()
    monkeypatch.setitem(registry._REGISTRY, "cpu", Spy())
    monkeypatch.setenv("FASTATTN_BACKEND", "cpu")
    with pytest.raises(BackendNotSupportedError, match="spy refuses"):
        select_backend(inputs())
    # an explicit backend wins over the environment variable
    assert select_backend(inputs(), "reference").name == "reference"
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert select_backend(inputs()).name == "reference"


def test_used_features_names_what_a_call_needs():
    q, k, v = make_qkv(1, 4, 2, 4, 4, 8, requires_grad=False)
    got = used_features(
        fastattn._inputs.normalize(q, k, v, causal=True, alibi_slopes=torch.ones(4), softcap=1.0, dropout_p=0.1)
    )
    assert got == ["causal", "alibi", "softcap", "dropout", "gqa"]
    got = used_features(fastattn._inputs.normalize(q, k, v, window=(3, 3), attn_mask=torch.ones(4, 4, dtype=torch.bool)))
    assert got == ["window", "attn_mask", "gqa"]


def test_info_explains_every_backend(capsys):
    text = fastattn.info()
    for name in ("cuda", "triton", "cpu", "reference"):
        assert name in text
    rows = {name: reasons for name, _, reasons in registry.status()}
    assert rows["reference"] == []
    if not torch.cuda.is_available():
        assert rows["cuda"], "cuda must explain why it is not usable on a machine without a GPU"
        assert any(r for r in rows["cuda"]), rows["cuda"]
        for reason in rows["cuda"]:
            assert reason in text


def test_import_does_not_initialise_cuda():
    """``import fastattn`` registers every backend's ops but never queries the GPU (no CUDA context
    before a fork, say): checked in a fresh process that pretends a GPU is there."""
    script = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "def fail(*args, **kwargs):\n"
        "    raise AssertionError('CUDA queried at import')\n"
        "torch.cuda._lazy_init = torch.cuda.current_device = torch.cuda.get_device_capability = fail\n"
        "import fastattn\n"
        "print(sorted(fastattn.list_backends()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reference" in done.stdout


def test_reasons_do_not_look_up_modules(monkeypatch):
    """Under torch.compile a backend's reasons are traced, and torch 2.11's dynamo refuses to trace
    importlib.util.find_spec: what is installed is looked up once, at import."""
    import importlib.util

    def refuse(*args, **kwargs):
        raise AssertionError("importlib.util.find_spec called while choosing a backend")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    for backend in fastattn.list_backends().values():
        backend.reasons(inputs())
    select_backend(inputs())


@pytest.mark.parametrize("value", ["bogus", "CPU", "fastattn-cpu"])
def test_bad_environment_variable_is_named(monkeypatch, value):
    monkeypatch.setenv("FASTATTN_BACKEND", value)
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    with pytest.raises(ValueError, match=f"environment variable FASTATTN_BACKEND must be one of cuda, triton, cpu, "
                                         f"reference .*got '{value}'"):
        fastattn.attention(q, k, v)
    # An explicit backend= does not read the variable at all.
    assert fastattn.attention(q, k, v, backend="reference").shape == q.shape
    monkeypatch.setenv("FASTATTN_BACKEND", "")
    assert fastattn.attention(q, k, v).shape == q.shape  # empty = unset


def test_selection_cache_never_changes_a_choice_or_hides_a_refusal():
    """CPU calls without masks reuse their backend choice (per-call overhead); every property a
    backend's reasons read is part of the key, so a call that differs in one of them -- here sinks
    with float64, which the cpu backend refuses -- is decided afresh, not served the cached choice."""
    registry._SELECTION_CACHE.clear()
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float64, requires_grad=False)
    plain = fastattn._inputs.normalize(q, k, v)
    assert select_backend(plain, "cpu").name == "cpu"
    assert select_backend(plain, "cpu").name == "cpu"  # served from the cache
    assert len(registry._SELECTION_CACHE) == 1
    with_sinks = fastattn._inputs.normalize(q, k, v, sinks=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(BackendNotSupportedError, match="sinks"):
        select_backend(with_sinks, "cpu")
    assert select_backend(with_sinks).name == "reference"
    assert select_backend(plain).name == registry._select_uncached(plain, None, registry.backends()).name
