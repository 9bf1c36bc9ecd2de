"""The automatic choice between cuda and triton follows measured evidence (fastattn/backends/evidence.py).

Runs anywhere: the GPU's architecture, the evidence table and the backends' reasons are monkeypatched.
"""

from __future__ import annotations

import types

import pytest
import torch

import fastattn
from fastattn import backends as registry
from fastattn.backends import evidence


def _inputs(**overrides):
    """An AttentionInputs stand-in on a CUDA device (only the fields dispatch reads)."""
    fields = dict(
        device=torch.device("cuda", 0), dtype=torch.bfloat16, head_dim=128, head_dim_v=128, heads_q=8, heads_kv=8,
        attn_mask=None, alibi_slopes=None, softcap=0.0, dropout_p=0.0, key_lengths=None, query_lengths=None,
        block_mask=None, window_left=None, window_right=None, is_causal=False,
    )
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


class _FakeBackend:
    def __init__(self, name, reasons=()):
        self.name, self._reasons = name, list(reasons)

    def reasons(self, inputs):
        return self._reasons

    def auto_select_reasons(self, inputs):
        return []


@pytest.fixture
def gpu_sm90(monkeypatch):
    monkeypatch.setattr(evidence, "device_arch", lambda device: "sm_90")
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)


def _with_backends(monkeypatch, refused=()):
    fakes = {n: _FakeBackend(n, ["refused"] if n in refused else []) for n in registry.PRIORITY}
    monkeypatch.setattr(registry, "backends", lambda: fakes)
    monkeypatch.setattr(registry, "get_backend", lambda name: fakes[name])
    return fakes


def test_no_evidence_prefers_triton_on_a_gpu(gpu_sm90, monkeypatch):
    monkeypatch.setattr(evidence, "TABLE", {})
    _with_backends(monkeypatch)
    assert registry.select_backend(_inputs()).name == "triton"
    assert evidence.order(registry.PRIORITY, _inputs()) == ["triton", "cuda", "cpu", "reference"]


def test_explicit_cuda_still_reaches_cuda(gpu_sm90, monkeypatch):
    monkeypatch.setattr(evidence, "TABLE", {})
    _with_backends(monkeypatch)
    assert registry.select_backend(_inputs(), "cuda").name == "cuda"
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    assert registry.select_backend(_inputs()).name == "cuda"


def test_cuda_serves_when_triton_cannot(gpu_sm90, monkeypatch):
    monkeypatch.setattr(evidence, "TABLE", {})
    _with_backends(monkeypatch, refused=("triton",))
    assert registry.select_backend(_inputs()).name == "cuda"


def test_evidence_for_the_class_and_arch_puts_cuda_first(gpu_sm90, monkeypatch):
    monkeypatch.setattr(evidence, "TABLE", {"sm_90": {"causal-D128-bf16": "cuda", "dense-D128-bf16": "triton"}})
    _with_backends(monkeypatch)
    assert registry.select_backend(_inputs(window_left=-1, window_right=0, is_causal=True)).name == "cuda"
    assert registry.select_backend(_inputs()).name == "triton"
    # Another dtype, head dim or architecture has no evidence of its own.
    assert registry.select_backend(_inputs(window_right=0, is_causal=True, dtype=torch.float16)).name == "triton"
    assert registry.select_backend(_inputs(window_right=0, is_causal=True, head_dim=64, head_dim_v=64)).name == "triton"
    monkeypatch.setattr(evidence, "device_arch", lambda device: "sm_80")
    assert registry.select_backend(_inputs(window_right=0, is_causal=True)).name == "triton"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param({}, "dense-D128-bf16", id="dense"),
        pytest.param({"window_right": 0, "is_causal": True}, "causal-D128-bf16", id="causal"),
        pytest.param({"window_left": 64, "window_right": 0}, "window-D128-bf16", id="window"),
        pytest.param({"heads_kv": 2}, "gqa-D128-bf16", id="gqa"),
        pytest.param({"block_mask": object(), "heads_kv": 2}, "block_sparse-D128-bf16", id="block_sparse"),
        pytest.param({"softcap": 30.0}, "other-D128-bf16", id="softcap-is-unmeasured"),
        pytest.param({"attn_mask": object(), "dtype": torch.float16, "head_dim": 64}, "other-D64-fp16", id="mask"),
    ],
)
def test_workload_class(overrides, expected):
    assert evidence.workload_class(_inputs(**overrides)) == expected


def _doc(device_name, created, rows, device="cuda"):
    return {"environment": {"device": device, "device_name": device_name, "created_utc": created}, "results": rows}


def _row(provider, workload, seqlen, mode, time_ms, status="ok", head_dim=128, dtype="bf16"):
    return {
        "provider": f"fastattn-{provider}", "workload": workload, "name": f"{workload}-B1-H8-L{seqlen}-D{head_dim}",
        "head_dim": head_dim, "dtype": dtype, "mode": mode, "status": status, "time_ms": time_ms,
    }


def test_table_from_results():
    rows = [
        # causal: cuda faster at every length and mode -> cuda
        _row("cuda", "causal", 1024, "fwd", 1.0), _row("triton", "causal", 1024, "fwd", 1.5),
        _row("cuda", "causal", 8192, "bwd", 9.0), _row("triton", "causal", 8192, "bwd", 9.5),
        # dense: cuda slower at one length -> triton
        _row("cuda", "dense", 1024, "fwd", 1.0), _row("triton", "dense", 1024, "fwd", 1.5),
        _row("cuda", "dense", 8192, "fwd", 20.0), _row("triton", "dense", 8192, "fwd", 19.0),
        # window: cuda could not run one configuration -> triton
        _row("cuda", "window", 1024, "fwd", None, status="unsupported"), _row("triton", "window", 1024, "fwd", 2.0),
        # rows of other providers are ignored
        {"provider": "sdpa", "workload": "gqa", "name": "gqa-x", "head_dim": 128, "dtype": "bf16", "mode": "fwd",
         "status": "ok", "time_ms": 0.1},
    ]
    old = _doc("NVIDIA H100 80GB HBM3", "2026-01-01T00:00:00+00:00", [_row("cuda", "dense", 1024, "fwd", 0.1),
                                                                      _row("triton", "dense", 1024, "fwd", 9.0)])
    docs = [
        ("2026-01-01-h100.json", old),
        ("2026-02-01-h200.json", _doc("NVIDIA H200", "2026-02-01T00:00:00+00:00", rows)),
        ("2026-02-01-cpu.json", _doc("AMD EPYC", "2026-02-01T00:00:00+00:00", rows, device="cpu")),
    ]
    table, sources = evidence.table_from_results(docs)
    assert table == {"sm_90": {"causal-D128-bf16": "cuda", "dense-D128-bf16": "triton", "window-D128-bf16": "triton"}}
    assert sources == ("2026-02-01-h200.json",)


def test_render_round_trips():
    table = {"sm_80": {"dense-D64-fp16": "cuda"}, "sm_90": {"causal-D128-bf16": "triton"}}
    namespace = {}
    exec(evidence.render(table, ("a.json", "b.json")), namespace)  # noqa: S102 -- our own generated code
    assert namespace["TABLE"] == table and namespace["SOURCES"] == ("a.json", "b.json")
    exec(evidence.render({}, ()), namespace)  # noqa: S102
    assert namespace["TABLE"] == {} and namespace["SOURCES"] == ()


def test_committed_table_matches_committed_results():
    # The table in the package is what the generator makes of benchmarks/results (GPU files only).
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    docs = [(p.name, json.loads(p.read_text())) for p in sorted(results.glob("*.json"))]
    assert evidence.table_from_results(docs) == (evidence.TABLE, evidence.SOURCES)


def test_info_names_the_evidence():
    from fastattn.info import info_dict

    assert evidence.describe() in fastattn.info(print_out=False)
    assert info_dict()["dispatch_evidence"]["sources"] == list(evidence.SOURCES)
