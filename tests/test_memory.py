"""The memory helper and the memory profile against sequence length."""

from __future__ import annotations

import json

import pytest
import torch

from fastattn import bench
from fastattn.bench.memory import peak_memory


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads make tiny ops
    10x slower under load; these tests check documents, not speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cpu_peak_counts_exact_bytes():
    n = 1 << 18
    assert peak_memory(lambda: torch.empty(n, dtype=torch.float32), "cpu") == 4 * n


def test_cpu_peak_is_the_peak_not_the_sum():
    n = 1 << 18

    def fn():
        a = torch.ones(n)  # 1 MiB, freed before the 2 MiB one
        del a
        b = torch.ones(2 * n)
        return b

    assert peak_memory(fn, "cpu") == 8 * n


def test_cpu_peak_ignores_what_lived_before():
    x = torch.randn(1 << 18)
    # An in-place add allocates nothing the size of x (torch may box the scalar: a few bytes).
    assert peak_memory(lambda: x.add_(1), "cpu") < 64


def test_peak_memory_rejects_other_devices():
    with pytest.raises(ValueError, match="device"):
        peak_memory(lambda: None, "meta")


@pytest.fixture(scope="module")
def memory_doc():
    config = bench.memory_config(True, "cpu", seq_lens=[128, 256, 512])
    return bench.run_memory(config, progress=False)


def _peaks(doc, provider, mode):
    rows = [r for r in doc["results"] if r["provider"] == provider and r["mode"] == mode]
    return {r["seqlen"]: r["peak_mem_bytes"] for r in rows if r["status"] == "ok"}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_reference_memory_grows_quadratically(memory_doc, mode):
    peaks = _peaks(memory_doc, "fastattn-reference", mode)
    assert set(peaks) == {128, 256, 512}
    growth = peaks[512] / peaks[256]
    # The (L, L) scores dominate: doubling L multiplies the peak by ~4 (inputs-sized terms pull it below).
    assert 3.3 < growth < 4.5, peaks


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_reference_memory_grows_faster_than_linear_memory_providers(memory_doc, mode):
    ref = _peaks(memory_doc, "fastattn-reference", mode)
    linear = [p for p in ("sdpa-flash", "fastattn-cpu") if memory_doc["providers"].get(p, {}).get("selected")]
    assert linear, "torch's CPU flash SDPA should be usable on every CPU"
    for provider in linear:
        peaks = _peaks(memory_doc, provider, mode)
        assert set(peaks) == {128, 256, 512}, provider
        growth = peaks[512] / peaks[256]
        assert growth < 2.5, (provider, peaks)
        assert growth < ref[512] / ref[256] - 1.0, (provider, peaks, ref)
        assert peaks[512] < ref[512], (provider, peaks, ref)


def test_memory_budget_stops_the_sweep():
    config = bench.memory_config(True, "cpu", seq_lens=[64, 128, 256, 512], providers=["reference"], budget_gib=1 / 1024)
    doc = bench.run_memory(config, progress=False)
    rows = [r for r in doc["results"] if r["provider"] == "fastattn-reference" and r["mode"] == "fwd"]
    statuses = [r["status"] for r in rows]
    # L=64 fits (~200 KiB); L=128 is predicted ~0.75 MiB (quadratic); L=256 is over the 1 MiB budget.
    assert statuses[0] == "ok"
    assert "over_budget" in statuses
    first_over = statuses.index("over_budget")
    assert all(s == "over_budget" for s in statuses[first_over:])
    assert all(r["peak_mem_bytes"] < (1 << 20) for r in rows if r["status"] == "ok")
    assert "budget" in rows[-1]["reasons"][0]


def test_memory_max_seconds_stops_the_sweep():
    config = bench.memory_config(True, "cpu", seq_lens=[64, 128], providers=["reference"], max_seconds=1e-9)
    doc = bench.run_memory(config, progress=False)
    assert {r["status"] for r in doc["results"]} == {"over_time"}
    assert doc["max_seconds"] == 1e-9
    with pytest.raises(ValueError, match="--max-seconds"):
        bench.memory_config(True, "cpu", max_seconds=-1)


def test_memory_config_rejects_bad_flags():
    with pytest.raises(ValueError, match="--memory-budget"):
        bench.memory_config(True, "cpu", budget_gib=0)
    with pytest.raises(ValueError, match="--workloads"):
        bench.memory_config(True, "cpu", kind="block_sparse")


def test_memory_cli_writes_json_csv_and_plot(tmp_path):
    from fastattn.cli import main

    assert main(["memory", "--seq-lens", "64,96", "--providers", "reference", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["kind"] == "memory" and doc["environment"]["device"] == "cpu"
    got = {(r["provider"], r["mode"], r["seqlen"]) for r in doc["results"]}
    assert got == {(p, m, L) for p in ("fastattn-reference", "sdpa") for m in ("fwd", "fwd+bwd") for L in (64, 96)}
    assert (tmp_path / "memory.csv").exists()
    assert (tmp_path / "memory.png").stat().st_size > 1000
