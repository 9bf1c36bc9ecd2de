"""The benchmark suite: the FLOP formula on hand-countable cases, the runner's results document, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn import bench, reference
from fastattn._inputs import normalize
from fastattn.bench.workloads import MODES, Workload, flops, visible_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads make tiny ops
    10x slower under load; these tests check documents, not speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------- FLOP formula
@pytest.mark.parametrize(
    "Lq, Lk, kwargs, expected",
    [
        # 4x4 causal: rows see 1, 2, 3, 4 keys.
        pytest.param(4, 4, dict(causal=True), 10, id="causal-L4"),
        # bottom-right causal with Lq=2, Lk=4: row 0 sees k0..k2, row 1 sees k0..k3.
        pytest.param(2, 4, dict(causal=True), 7, id="causal-Lq2-Lk4"),
        # window (1, 0) on 5: rows see 1, 2, 2, 2, 2.
        pytest.param(5, 5, dict(window=(1, 0)), 9, id="window1_0-L5"),
        # window (1, 1) on 5: rows see 2, 3, 3, 3, 2.
        pytest.param(5, 5, dict(window=(1, 1)), 13, id="window1_1-L5"),
        # window (-1, 0) is causal.
        pytest.param(4, 4, dict(window=(-1, 0)), 10, id="window-1_0-L4"),
        # tiles of 2 on L=4, layout [[1, 0], [1, 1]]: three full 2x2 tiles.
        pytest.param(4, 4, dict(block_layout=torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), block_size=2), 12,
                     id="blocks2-L4"),
        # the same layout cropped to L=3: 2x2 + 1x2 + 1x1 pairs.
        pytest.param(3, 3, dict(block_layout=torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), block_size=2), 7,
                     id="blocks2-L3"),
    ],
)
def test_visible_pairs_hand_counted(Lq, Lk, kwargs, expected):
    assert visible_pairs(Lq, Lk, **kwargs) == expected


@pytest.mark.parametrize(
    "Lq, Lk, window, causal, block_size",
    [
        pytest.param(97, 97, (13, 5), False, 16, id="L97-W13_5-bs16"),
        pytest.param(33, 71, None, True, 8, id="Lq33-Lk71-causal-bs8"),
        pytest.param(65, 40, (7, -1), True, 17, id="Lq65-Lk40-W7-causal-bs17"),
    ],
)
def test_visible_pairs_match_reference_mask(Lq, Lk, window, causal, block_size):
    generator = torch.Generator().manual_seed(1)
    nq, nk = -(-Lq // block_size), -(-Lk // block_size)
    layout = torch.rand(nq, nk, generator=generator) < 0.5
    q, k = torch.randn(1, 1, Lq, 8), torch.randn(1, 1, Lk, 8)
    block_mask = bench.workloads.BlockMask.from_layout(layout, block_size=block_size, seq_lens=(Lq, Lk))
    inputs = normalize(q, k, k, causal=causal, window=window, block_mask=block_mask)
    expected = int(reference.visible_mask(inputs).sum())
    got = visible_pairs(Lq, Lk, window=window, causal=causal, block_layout=layout, block_size=block_size)
    assert got == expected


def test_flops_formula_is_exact():
    w = Workload("causal", batch=2, heads_q=3, heads_kv=3, seqlen=4, head_dim=8)
    forward = 4 * 2 * 3 * 4 * 4 * 8 * (10 / 16)
    assert flops(w, "fwd") == pytest.approx(forward, rel=1e-12)
    assert flops(w, "bwd") == pytest.approx(2.5 * forward, rel=1e-12)
    assert flops(w, "fwd+bwd") == pytest.approx(3.5 * forward, rel=1e-12)
    dense = Workload("dense", batch=1, heads_q=2, heads_kv=2, seqlen=5, head_dim=3)
    assert flops(dense, "fwd") == 4 * 1 * 2 * 5 * 5 * 3
    window = Workload("window", batch=1, heads_q=1, heads_kv=1, seqlen=5, head_dim=2, window=(1, 1))
    assert flops(window, "fwd") == pytest.approx(4 * 13 * 2, rel=1e-12)


@pytest.mark.parametrize("density", [pytest.param(d, id=f"density{d}") for d in (0.1, 0.3, 0.75)])
def test_block_sparse_layout_density(density):
    w = Workload("block_sparse", batch=1, heads_q=1, heads_kv=1, seqlen=1000, head_dim=8, density=density, block_size=64)
    layout = w.block_layout()
    n = 16
    assert layout.shape == (n, n)
    assert bool(layout.diagonal().all()), "every query block must see its own keys"
    assert int(layout.sum()) == max(n, round(density * n * n))
    assert torch.equal(layout, w.block_layout()), "the layout must be the same every time"


def test_workload_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        Workload("nope", 1, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="heads_q"):
        Workload("gqa", 1, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="density"):
        Workload("block_sparse", 1, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="window"):
        Workload("window", 1, 1, 1, 8, 8)


# ------------------------------------------------------------------------------- runner
def _fast(config):
    """The same configurations, timed with fewer repeats (these tests check the document, not speed)."""
    config.preset = dataclasses.replace(config.preset, min_repeats=2, max_repeats=2, noisy_max_repeats=2,
                                        time_budget_s=0.0)
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = _fast(bench.bench_config("quick", "cpu", seq_lens=[67], modes=["fwd", "fwd+bwd"]))
    doc = bench.run_bench(config, progress=False)
    out = tmp_path_factory.mktemp("bench")
    return config, doc, bench.save_bench(doc, out)


def test_bench_document_has_every_configuration(tiny_run):
    config, doc, _ = tiny_run
    selected = [name for name, s in doc["providers"].items() if s["selected"]]
    assert "sdpa" in selected and "fastattn-reference" in selected
    expected = {(w.name, d, p, m) for w in config.preset.workloads for d in config.preset.dtypes
                for p in selected for m in config.preset.modes}
    got = [(r["name"], r["dtype"], r["provider"], r["mode"]) for r in doc["results"]]
    assert len(got) == len(set(got)), "a configuration appears twice"
    assert set(got) == expected
    kinds = {r["workload"] for r in doc["results"]}
    assert kinds == {"dense", "causal", "window", "block_sparse", "gqa", "varlen"}
    env = doc["environment"]
    for key in ("device", "device_name", "torch", "triton", "python", "commit", "host", "created_utc"):
        assert key in env
    # Providers that cannot run here are listed with their reasons.
    for name, status in doc["providers"].items():
        assert status["selected"] or status["reasons"], name


def test_bench_results_are_consistent(tiny_run):
    _, doc, _ = tiny_run
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    by_key = {(r["name"], r["dtype"], r["mode"], r["provider"]): r for r in doc["results"]}
    # The reference and SDPA serve every workload here, in every mode.
    for r in doc["results"]:
        if r["provider"] in ("fastattn-reference", "sdpa"):
            assert r["status"] == "ok", r
    for r in ok:
        assert r["time_ms"] > 0 and r["repeats"] == 2
        assert 0 < r["time_min_ms"] <= r["time_q1_ms"] <= r["time_ms"] <= r["time_q3_ms"] <= r["time_max_ms"]
        assert r["spread"] == pytest.approx((r["time_q3_ms"] - r["time_q1_ms"]) / r["time_ms"])
        assert r["tflops"] == pytest.approx(r["flops"] / (r["time_ms"] * 1e-3) / 1e12)
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
        sdpa = by_key[(r["name"], r["dtype"], r["mode"], "sdpa")]
        assert r["speedup_vs_sdpa"] == pytest.approx(sdpa["time_ms"] / r["time_ms"])
        w = Workload(r["workload"], r["batch"], r["heads_q"], r["heads_kv"], r["seqlen"], r["head_dim"],
                     window=tuple(r["window"]) if r["window"] else None, density=r["density"],
                     block_size=r["block_size"] or 128,
                     doc_lengths=tuple(r["doc_lengths"]) if r["doc_lengths"] else None)
        assert r["flops"] == pytest.approx(flops(w, r["mode"]), rel=1e-12)
    for r in doc["results"]:
        if r["status"] != "ok":
            assert r.get("reasons") or r.get("error"), r
    causal = next(r for r in ok if r["workload"] == "causal")
    assert causal["visible_fraction"] == pytest.approx((67 * 68 / 2) / 67**2)


def test_bench_files_are_written(tiny_run):
    _, doc, paths = tiny_run
    assert json.loads(paths["json"].read_text())["results"] == json.loads(json.dumps(doc["results"], default=str))
    with paths["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(doc["results"])
    # One length: no TFLOP/s-vs-length plot; the density sweep has three densities.
    assert "tflops_plot" not in paths
    assert paths["density_plot"].stat().st_size > 1000
    table = bench.bench_table(doc)
    assert "fastattn-reference" in table
    # The summary, or (on a busy machine, as this one often is) why there is none.
    blockers = bench.headline_blockers(doc)
    assert ("speedup over torch SDPA" in table) == (not blockers)
    assert all(why in table for why in blockers)


def test_bench_plot_of_a_length_sweep(tmp_path):
    config = _fast(bench.bench_config("quick", "cpu", seq_lens=[31, 47], workloads=["causal"], modes=["bwd"],
                                      providers=["reference"]))
    doc = bench.run_bench(config, progress=False)
    assert {r["provider"] for r in doc["results"]} == {"fastattn-reference", "sdpa"}
    assert all(r["status"] == "ok" and r["mode"] == "bwd" and r["time_ms"] > 0 for r in doc["results"])
    assert bench.plot_tflops_vs_seqlen(doc, tmp_path / "t.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(workloads=["nope"]), "--workloads", id="workload"),
        pytest.param(dict(modes=["sideways"]), "--modes", id="mode"),
        pytest.param(dict(dtypes=["fp8"]), "--dtypes", id="dtype"),
        pytest.param(dict(seq_lens=[0]), "--seq-lens", id="seqlen"),
    ],
)
def test_bench_config_rejects_bad_flags(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.bench_config("quick", "cpu", **kwargs)


def test_gpu_preset_needs_a_gpu():
    with pytest.raises(ValueError, match="CUDA"):
        bench.bench_config("gpu", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda"):
            bench.bench_config("quick", "cuda")


def test_cpu_preset_is_the_cpu_kernel_targets():
    config = bench.bench_config("cpu", "cpu")
    assert config.providers == ["fastattn-cpu", "sdpa"]
    names = {w.name for w in config.preset.workloads}
    for kind in ("dense", "causal"):
        for L in (1024, 2048, 4096):
            for D in (64, 128):
                assert f"{kind}-B1-H4-L{L}-D{D}" in names
    assert "window-B1-H1-L16384-D64-W256_0" in names
    assert "varlen-B8-H4-L1024-D64-tokens4096" in names  # benchmarks/varlen_cpu.py's documents
    for density in (0.5, 0.25, 0.1):
        assert f"block_sparse-B1-H4-L2048-D64-density{density:g}-bs128" in names
    assert config.preset.dtypes == ("fp32",)
    # --providers still wins over the preset's own list
    assert bench.bench_config("cpu", "cpu", providers=["reference"]).providers == ["reference"]
    with pytest.raises(ValueError, match="--device cpu"):
        bench.preset("cpu", "cuda")


def test_varlen_workload_packs_the_documents():
    w = bench.workloads.varlen_workload(64, 2, 16)
    assert w.batch == 8 and max(w.doc_lengths) == 64 and sum(w.doc_lengths) == 256  # 50% padding
    case = bench.workloads.make_case(w, torch.float32, "cpu")
    packed = case.packed(case.q)
    assert packed.shape == (256, 2, 16)
    assert torch.equal(packed[64:64 + 60], case.q[1, :, :60].transpose(0, 1))
    assert case.cu_seqlens().tolist()[-1] == 256
    # FLOPs count the documents' causal pairs only
    expected = sum(n * (n + 1) // 2 for n in w.doc_lengths) * 4 * 2 * 16
    assert bench.workloads.flops(w, "fwd") == pytest.approx(expected)
    with pytest.raises(ValueError, match="doc_lengths"):
        bench.workloads.Workload("varlen", 2, 1, 1, 8, 8, doc_lengths=(9, 1))


def test_max_seconds_records_what_is_left_as_over_time(monkeypatch):
    from fastattn.bench import runner

    config = _fast(bench.bench_config("quick", "cpu", seq_lens=[33], workloads=["dense", "causal"], modes=["fwd"],
                                      providers=["reference"], max_seconds=30))
    checks = iter([False])  # the deadline passes after the first workload
    monkeypatch.setattr(runner.Deadline, "passed", lambda self: next(checks, True))
    doc = bench.run_bench(config, progress=False)
    assert doc["max_seconds"] == 30
    by_kind = {}
    for r in doc["results"]:
        by_kind.setdefault(r["workload"], set()).add(r["status"])
    assert by_kind == {"dense": {"ok"}, "causal": {"over_time"}}
    assert all("--max-seconds" in r["reasons"][0] for r in doc["results"] if r["status"] == "over_time")
    assert "time" in bench.bench_table(doc)
    with pytest.raises(ValueError, match="--max-seconds"):
        bench.bench_config("quick", "cpu", max_seconds=0)


def test_unknown_provider_is_named():
    with pytest.raises(ValueError, match="unknown provider 'nope'"):
        bench.resolve(["nope"], torch.device("cpu"))


def test_mode_names_are_the_documented_ones():
    assert MODES == ("fwd", "bwd", "fwd+bwd")


def test_bench_cli_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastattn", "bench", "--seq-lens", "37", "--workloads", "causal", "--modes", "fwd",
         "--providers", "reference", "--out", str(out), "--no-progress", "--no-plots"],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert {(r["provider"], r["seqlen"], r["status"]) for r in doc["results"]} == {
        ("fastattn-reference", 37, "ok"), ("sdpa", 37, "ok")}
    assert "median time (ms)" in proc.stdout


def test_bench_cli_reports_bad_flag(tmp_path):
    from fastattn.cli import main

    assert main(["bench", "--workloads", "nope", "--out", str(tmp_path)]) == 2


def test_exit_status_fails_only_on_fastattn_errors():
    from fastattn.cli import _report_errors

    def row(provider, status):
        return {"provider": provider, "status": status, "name": "causal-B1-H1-L7-D8", "dtype": "fp32", "mode": "fwd",
                "error": "RuntimeError: boom" if status == "error" else None}

    assert _report_errors({"results": [row("fastattn-cpu", "ok"), row("sdpa-math", "error")]}) == 0
    assert _report_errors({"results": [row("fastattn-cuda", "unsupported"), row("fastattn-reference", "oom")]}) == 0
    assert _report_errors({"results": [row("fastattn-cpu", "error")]}) == 1


# ------------------------------------------------------------------------------- results tooling
def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_readme_table_on_a_copy(tiny_run, tmp_path):
    _, doc, paths = tiny_run
    script = _load_script("update_readme_table")
    results = tmp_path / "results"
    results.mkdir()
    older = json.loads(paths["json"].read_text())
    older["environment"]["created_utc"] = "2000-01-01T00:00:00+00:00"
    (results / "2000-01-01-cpu.json").write_text(json.dumps(older))
    (results / "2099-01-01-cpu.json").write_text(paths["json"].read_text())
    # A newer run of one other workload family alone (varlen here) is not the headline table.
    family = json.loads(paths["json"].read_text())
    family["environment"]["created_utc"] = "2100-01-01T00:00:00+00:00"
    family["results"] = [dict(r, workload="varlen") for r in family["results"]]
    (results / "2100-01-01-cpu-varlen.json").write_text(json.dumps(family))
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n\n<!-- perf-table:start -->\nhand-typed\n<!-- perf-table:end -->\n\ntail\n")
    args = ["--readme", str(readme), "--results-dir", str(results)]
    assert script.main([*args, "--check"]) == 1
    assert script.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n<!-- perf-table:start -->\n") and text.endswith("<!-- perf-table:end -->\n\ntail\n")
    assert "hand-typed" not in text and "2099-01-01-cpu.json" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(table_rows) == len({(r["name"], r["dtype"]) for r in doc["results"]})
    assert script.main([*args, "--check"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="perf-table:start"):
        script.main(args)


def test_gpu_summary_assembles_and_summarises(tiny_run, tmp_path):
    _, _, paths = tiny_run
    script = _load_script("gpu_summary")
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "memory").mkdir()
    (work / "bench" / "bench.json").write_text(paths["json"].read_text())
    (work / "memory" / "memory.json").write_text(json.dumps({"memory": "m", "budget_bytes": 1, "results": [{"x": 1}]}))
    out, results = tmp_path / "out", tmp_path / "results"
    assert script.main(["assemble", "--work", str(work), "--out", str(out), "--results-dir", str(results)]) == 0
    merged = json.loads((out / "bench.json").read_text())
    assert merged["memory_profile"]["results"] == [{"x": 1}]
    copies = list(results.glob("*-cpu.json"))
    assert len(copies) == 1 and json.loads(copies[0].read_text()) == merged
    assert script.main(["summary", "--out", str(out), "--stages", "build=ok,tests=FAILED"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "stage tests        FAILED" in summary and "causal-B1-H4-L67-D64 fp32 fwd" in summary


# ------------------------------------------------------------------------------- spread, noise, headline
def test_timing_stats_on_known_values():
    stats = bench.runner.timing_stats([4.0, 1.0, 3.0, 2.0, 100.0])
    assert stats["time_ms"] == 3.0 and stats["time_min_ms"] == 1.0 and stats["time_max_ms"] == 100.0
    assert (stats["time_q1_ms"], stats["time_q3_ms"]) == (2.0, 4.0)
    assert stats["spread"] == pytest.approx(2.0 / 3.0) and stats["repeats"] == 5
    one = bench.runner.timing_stats([2.5])
    assert one["time_ms"] == one["time_q1_ms"] == one["time_q3_ms"] == 2.5 and one["spread"] == 0.0


class _FakeClock:
    """``time.perf_counter`` for the runner; each timed call advances it by the next given duration."""

    def __init__(self, durations_ms):
        self.now, self.durations = 0.0, list(durations_ms)

    def perf_counter(self):
        return self.now

    def call(self):
        self.now += self.durations.pop(0) * 1e-3


@pytest.mark.parametrize("durations, expected_repeats", [
    pytest.param([10.0] * 40, 4, id="steady: the preset's repeats"),
    # Every other call slowed down 3x (another process on the core): repeats rise to the noisy cap.
    pytest.param([10.0, 30.0] * 20, 12, id="noisy: raised to noisy_max_repeats"),
    # Noisy at first, steady afterwards: extra calls stop once the spread is small again.
    pytest.param([10.0, 30.0, 10.0, 30.0] + [10.0] * 36, 9, id="noisy then steady"),
])
def test_noisy_cells_get_more_repeats(monkeypatch, durations, expected_repeats):
    clock = _FakeClock(durations)
    monkeypatch.setattr(bench.runner, "time", clock)
    p = dataclasses.replace(bench.preset("quick", "cpu"), min_repeats=4, max_repeats=4, noisy_max_repeats=12,
                            time_budget_s=1.0)
    stats = bench.runner.time_call(clock.call, torch.device("cpu"), p)
    assert stats["repeats"] == expected_repeats
    assert (stats["spread"] > bench.runner.NOISY_SPREAD) == (expected_repeats == 12)


def test_noisy_repeats_stop_when_the_time_has_doubled(monkeypatch):
    """With no time budget left, the extra calls take at most as long again as the first ones."""
    clock = _FakeClock([10.0, 30.0, 10.0, 30.0] + [300.0] * 10)
    monkeypatch.setattr(bench.runner, "time", clock)
    p = dataclasses.replace(bench.preset("quick", "cpu"), min_repeats=4, max_repeats=4, noisy_max_repeats=12,
                            time_budget_s=0.0)
    # 80 ms for the first four calls; one more 300 ms call passes 2 x 80 ms.
    assert bench.runner.time_call(clock.call, torch.device("cpu"), p)["repeats"] == 5


def _doc(load_start, load_end, cores=2, spreads=(0.01, 0.02, 0.03, 0.01)):
    rows = []
    for i, spread in enumerate(spreads):
        for provider, ms in (("sdpa", 2.0), ("fastattn-cpu", 1.0)):
            rows.append({"provider": provider, "name": f"dense-L{i}", "dtype": "fp32", "mode": "fwd", "status": "ok",
                         "time_ms": ms, "spread": spread, "speedup_vs_sdpa": 2.0 / ms, "tflops": 0.1})
    return {"environment": {"device": "cpu", "cpu_count": cores, "load_average": [load_end, 1.0, 1.0]},
            "load_average_start": load_start, "results": rows}


def test_summary_is_printed_on_a_quiet_machine():
    doc = _doc(1.9, 2.1)
    assert bench.headline_blockers(doc) == []
    table = bench.bench_table(doc)
    assert "speedup over torch SDPA" in table and "2.00x (4)" in table
    assert "1 ±1%" in table and "!" not in table.split("speedup")[0].splitlines()[2]


@pytest.mark.parametrize("load_start, load_end", [(9.5, 2.0), (2.0, 9.5)])
def test_summary_refused_when_the_machine_is_oversubscribed(load_start, load_end):
    doc = _doc(load_start, load_end)
    [why] = bench.headline_blockers(doc)
    assert "oversubscribed: load average 9.5 on 2 cores" in why
    table = bench.bench_table(doc)
    assert "speedup over torch SDPA" not in table and "2.00x" not in table
    assert "no speedup summary" in table and "Re-run" in table and "fastattn bench --quick" in table


def test_summary_refused_when_many_cells_are_noisy():
    doc = _doc(1.0, 1.0, spreads=(0.5, 0.01, 0.4, 0.02))
    [why] = bench.headline_blockers(doc)
    assert why.startswith("4 of 8 cells are noisy")
    assert "±50%!" in bench.bench_table(doc)
    # On a GPU the load average is not the question, the spread still is.
    gpu = _doc(30.0, 30.0)
    gpu["environment"]["device"] = "cuda"
    assert bench.headline_blockers(gpu) == []


def test_skipped_providers_are_listed_with_reasons(tiny_run):
    _, doc, _ = tiny_run
    text = bench.skipped_providers(doc)
    skipped = [name for name, s in doc["providers"].items() if not s["selected"]]
    assert skipped, "on a CPU some providers (flex, sdpa-efficient, ...) are always skipped"
    for name in skipped:
        line = next(line for line in text.splitlines() if line.strip().startswith(name + ":"))
        assert line.split(":", 1)[1].strip(), name


# ------------------------------------------------------------------------------- CLI conventions
def test_cli_bench_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is optional: one line says the plots are skipped; table, files and exit status as usual."""
    from fastattn.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "out"
    rc = main(["bench", "--seq-lens", "33", "--workloads", "causal", "--modes", "fwd", "--providers", "reference",
               "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "median time (ms)" in printed and "fastattn-reference" in printed and "not measured here:" in printed
    assert printed.count("matplotlib is not installed") == 1
    assert (out / "bench.json").exists() and (out / "bench.csv").exists() and not list(out.glob("*.png"))
    assert main(["memory", "--seq-lens", "16,32", "--providers", "reference", "--out", str(out),
                 "--no-progress"]) == 0
    assert "no plots: matplotlib is not installed" in capsys.readouterr().out
    with pytest.raises(ImportError, match="matplotlib is not installed"):
        bench.plot_memory(json.loads((out / "memory.json").read_text()), out / "m.png")


def test_cli_version_bare_help_and_defaults(capsys):
    from fastattn import __version__
    from fastattn.cli import build_parser, main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fastattn {__version__}"
    assert main([]) == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: fastattn") and "bench" in usage and "attention-map" in usage
    parser = build_parser()
    assert parser.parse_args(["memory"]).out == "memory_out"
    assert parser.parse_args(["bench"]).out == "bench_out"
    sub = next(a for a in parser._actions if a.dest == "command").choices
    seed = next(a for a in sub["attention-map"]._actions if a.dest == "seed")
    assert seed.help and "seed" in seed.help
    assert all(a.help for p in sub.values() for a in p._actions), "every option has a help text"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"bench_out/", "memory_out/", "attention_maps/"} <= set(ignored)


# ------------------------------------------------------------------------------- plots
def test_plot_styles_tell_every_provider_apart():
    from fastattn.bench.plots import _style

    styles = [_style(i) for i in range(10)]
    assert len({(s["marker"], s["linestyle"]) for s in styles}) == 10
    # sdpa and sdpa-flash (neighbours) differ in marker, dash pattern and size.
    assert all(a["marker"] != b["marker"] and a["linestyle"] != b["linestyle"] and a["markersize"] > b["markersize"]
               for a, b in zip(styles, styles[1:5]))


@pytest.mark.parametrize("low, high, expected", [(0.3, 3.0, {"0.5", "1", "2"}), (0.01, 500.0, {"0.1", "1", "10", "100"})])
def test_log_axis_labels_are_plain_and_sparse(low, high, expected):
    from fastattn.bench.plots import _log_axis, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [low, high])
    _log_axis(ax, "y")
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = {t.get_text() for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi}
    minor = {t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()}
    plt.close(fig)
    assert expected <= labels and len(labels) <= 8 and not minor
    assert all("$" not in text and "^" not in text for text in labels)


def test_decode_bench_rows_and_units(tmp_path):
    """fastattn bench --decode: both providers per workload, tokens/s and bandwidth from the median time."""
    from fastattn.bench.decode import DecodeWorkload, decode_table, decode_workloads, make_decode_case, run_decode

    shape = dict(heads_q=4, heads_kv=1, head_dim=16, page_size=16)
    workloads = decode_workloads([1, 2], [40], dtype=torch.float32, **shape)
    assert [w.layout for w in workloads] == ["contiguous", "contiguous", "paged", "paged"]
    # The cache budget drops what does not fit: a 64 x 32k fp32 cache of 8 heads x 128 is 16 GiB.
    assert decode_workloads([64], [32768], max_cache_gib=1.0) == []
    paged = make_decode_case(workloads[3], torch.float32, torch.device("cpu"))
    assert paged.k_cache.shape == (2 * 3, 16, 1, 16) and paged.block_table.shape == (2, 3)
    # The pages hold the contiguous cache's tokens (the SDPA inputs) in the order of the block table.
    page, slot = int(paged.block_table[1, 2]), 40 - 32 - 1
    assert torch.equal(paged.k_cache[page, slot], paged.k_sdpa[1, :, 39])
    doc = run_decode(workloads, repeats=2, device="cpu", progress=False)
    assert doc["kind"] == "decode" and "commit" in doc["environment"]
    rows = doc["results"]
    assert len(rows) == 2 * len(workloads) and all(r["status"] == "ok" for r in rows)
    for r in rows:
        w = DecodeWorkload(r["batch"], r["cache_len"], r["layout"], **shape)
        assert r["cache_bytes"] == r["batch"] * 40 * 1 * 2 * 16 * 4 == w.cache_bytes(torch.float32)
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["time_ms"] / 1e3))
        assert r["bandwidth_gb_s"] == pytest.approx(r["cache_bytes"] / (r["time_ms"] / 1e3) / 1e9)
    assert "decode-paged-B2-H4-Hkv1-Lk40-D16" in decode_table(doc)
    with pytest.raises(ValueError, match="layout"):
        DecodeWorkload(1, 8, "ragged")
