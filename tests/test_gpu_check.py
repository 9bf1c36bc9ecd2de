"""The GPU check's machinery, on the CPU: the dry-run plan, the whole script against a stand-in interpreter,
the summary of runs cut off at every stage, the smoke and speed script at tiny shapes, the prebuilt
extension's tag, installation and load check. The first GPU call must not fail on the script itself."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(args, env=None, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, cwd=ROOT)


# --------------------------------------------------------------------------- dry run

PLAN_LINE = re.compile(r"^  \+\s*(\d+)s  (\S+)\s+<=\s*(?:(\d+)s|the rest[^(]*\(worst case: (\d+)s\))  (.+)$")


def _plan(stdout: str) -> list[tuple[int, str, int, str]]:
    """(start, stage, cap, command) of every planned line of a dry run."""
    rows = []
    for line in stdout.splitlines():
        m = PLAN_LINE.match(line)
        if m:
            rows.append((int(m[1]), m[2], int(m[3] or m[4]), m[5]))
    return rows


def test_dry_run_prints_the_full_plan_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--dry-run"], env={"OUT": str(out)})
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    stages = [name for _, name, _, _ in plan]
    assert stages == ["extension", "env", "smoke-triton", "smoke-cuda", "sanitizer", "speed", "tests", "bench",
                      "memory", "results"]
    caps = {name: cap for _, name, cap, _ in plan}
    assert caps["smoke-triton"] + caps["smoke-cuda"] + caps["sanitizer"] <= 180  # the smoke stage: 3 minutes
    assert caps["speed"] <= 180
    assert all(start + cap <= 540 for start, _, cap, _ in plan)  # the default budget holds in the worst case
    assert "(background) build" in proc.stdout and "TORCH_CUDA_ARCH_LIST=9.0a" in proc.stdout
    commands = {name: cmd for _, name, _, cmd in plan}
    assert "--backends triton --cases all" in commands["smoke-triton"]
    assert "compute-sanitizer --tool memcheck" in commands["sanitizer"]
    assert "--set headline --providers triton,cuda,sdpa-flash,cudnn" in commands["speed"]
    for _, _, _, cmd in plan:  # every script a command names exists in the tree
        for path in re.findall(r"(?:benchmarks|csrc)/\S+\.(?:py|sh)", cmd):
            assert (ROOT / path).exists(), path
    assert not out.exists()  # nothing was run, nothing written


@pytest.mark.parametrize("focus, stages", [
    ("triton", ["extension", "env", "smoke-triton", "speed", "tests"]),
    ("cuda", ["extension", "env", "smoke-cuda", "sanitizer", "speed", "tests"]),
    ("decode", ["extension", "env", "smoke-decode", "speed-decode"]),
    ("sanitize", ["extension", "env", "sanitizer", "memcheck-tiny", "racecheck-tiny"]),
    ("speed", ["extension", "env", "speed"]),
    ("bench", ["extension", "env", "bench", "memory", "results"]),
])
def test_dry_run_of_each_focus(focus, stages):
    proc = _run(["--dry-run", "--focus", focus])
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    assert [name for _, name, _, _ in plan] == stages  # none left out by the default budget
    assert all(start + cap <= 540 for start, _, cap, _ in plan)


def test_dry_run_with_a_small_budget_says_what_it_leaves_out():
    proc = _run(["--dry-run", "--budget", "150"])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"sanitizer\s+skipped: budget spent", proc.stdout)
    assert re.search(r"speed\s+skipped: budget spent", proc.stdout)


def test_every_planned_smoke_command_parses():
    gpu_smoke = _load("gpu_smoke")
    parser = gpu_smoke.build_parser()
    commands = []
    for focus in ["", "triton", "cuda", "decode", "sanitize", "speed"]:
        proc = _run(["--dry-run"] + (["--focus", focus] if focus else []))
        commands += [cmd for _, _, _, cmd in _plan(proc.stdout) if "gpu_smoke.py" in cmd]
    assert len(commands) == 12
    for cmd in commands:
        args = parser.parse_args(cmd.split("gpu_smoke.py ", 1)[1].split())
        if args.command == "correctness":
            gpu_smoke.select_cases(args.cases)
            assert set(args.backends.split(",")) <= {"triton", "cuda"}
        else:
            assert set(args.providers.split(",")) <= set(gpu_smoke.FASTATTN_PROVIDERS) | set(gpu_smoke.SDPA_KERNELS)


def test_bad_flags_are_refused():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = _run(["--focus", "metal"])
    assert proc.returncode == 2 and "--focus takes one of" in proc.stderr
    proc = _run(["--budget", "9m"])
    assert proc.returncode == 2 and "--budget takes whole seconds" in proc.stderr
    proc = _run(["--frobnicate"])
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


# --------------------------------------------------------------------------- the whole script, stand-in python

STAND_IN = r'''#!{python}
"""Stands in for the GPU machine's python: every program the check runs answers at once with made-up
results of the right form (the smoke and speed script's arguments are checked by another test); the
summary runs for real."""
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(args) + "\n")
joined = " ".join(args)
if "gpu_summary.py" in joined:
    os.execv(sys.executable, [sys.executable, *args])
if "prebuilt.py" in joined:
    print("no prebuilt extension for this machine")
    sys.exit(3)
if "setup.py" in joined:
    time.sleep(float(os.environ.get("FAKE_BUILD_SECONDS", "0.5")))
    sys.exit(int(os.environ.get("FAKE_BUILD_RC", "0")))
if args[:3] in (["-m", "fastattn", "bench"], ["-m", "fastattn", "memory"]):
    out = args[args.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    doc = json.load(open(os.environ["FAKE_BENCH"])) if args[2] == "bench" else {{"memory": "m", "results": []}}
    json.dump(doc, open(os.path.join(out, args[2] + ".json"), "w"))
elif "gpu_smoke.py" in joined:
    out = args[args.index("--out") + 1]
    doc = json.load(open(out)) if os.path.exists(out) else {{"environment": {{"device": "cuda"}}, "results": []}}
    if "correctness" in args:
        for backend in args[args.index("--backends") + 1].split(","):
            doc["results"] += [{{"backend": backend, "case": c, "status": "ok", "seconds": 0.1}} for c in ("c1", "c2")]
    else:
        for provider in args[args.index("--providers") + 1].split(","):
            doc["results"].append({{"case": "B4-H16-L4096-D128", "mode": "fwd", "provider": provider, "status": "ok",
                                   "ms": 1.0, "tflops": 400.0, "shape": [4, 16, 16, 4096, 4096, 128]}})
    json.dump(doc, open(out, "w"))
'''


def _stand_in(tmp_path, bench_doc: dict) -> dict:
    python = tmp_path / "python"
    python.write_text(STAND_IN.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sanitizer = bin_dir / "compute-sanitizer"  # drops its options, runs the program
    sanitizer.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift 2; done\nexec "$@"\n')
    sanitizer.chmod(0o755)
    bench = tmp_path / "bench_in.json"
    bench.write_text(json.dumps(bench_doc))
    return {"PYTHON": str(python), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
            "FAKE_BENCH": str(bench), "OUT": str(tmp_path / "out"), "RESULTS_DIR": str(tmp_path / "results")}


def _bench_doc() -> dict:
    row = {"name": "causal-B1-H4-L67-D64", "dtype": "bf16", "mode": "fwd", "provider": "fastattn-triton",
           "status": "ok", "tflops": 100.0, "speedup_vs_sdpa": 1.1}
    return {"environment": {"device_name": "Stand-in GPU", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
                            "commit": "abc", "created_utc": "2026-01-02T00:00:00", "device_slug": "standin"},
            "ceilings": {"matmul_bf16_tflops": 790.0, "copy_gbps": 4300.0},
            "results": [row, {**row, "provider": "sdpa", "tflops": 90.0}]}


def test_whole_run_against_a_stand_in_python(tmp_path):
    env = _stand_in(tmp_path, _bench_doc())
    proc = _run(["--budget", "400"], env=env, timeout=400)
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage, status in [("extension", "building"), ("env", "ok"), ("smoke-triton", "ok"), ("build", "ok"),
                          ("smoke-cuda", "ok"), ("sanitizer", "ok"), ("speed", "ok"), ("tests", "ok"),
                          ("bench", "ok"), ("memory", "ok"), ("results", "ok")]:
        assert re.search(rf"stage {stage}\s+{status}", summary), (stage, summary)
    assert re.search(r"triton\s+2 ok", summary) and re.search(r"cuda\s+2 ok", summary)
    assert "Stand-in GPU" in summary and re.search(r"B4-H16-L4096-D128 fwd\s+1ms 400T", summary)
    assert json.loads((out / "bench.json").read_text())["memory_profile"]["memory"] == "m"
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "build.log", "gpu_check.log", "smoke.json",
                                                     "speed.json", "summary.txt"]
    assert list((tmp_path / "results").glob("2026-01-02-standin.json"))
    assert "gpu_check: every stage passed" in proc.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    first = [next(i for i, c in enumerate(calls) if key in c) for key in (
        "prebuilt.py install", "setup.py build_ext", "fastattn info", "--backends triton", "--backends cuda",
        "sanitize_case.py", "speed --set headline", "pytest -m gpu", "fastattn bench", "fastattn memory", "assemble")]
    assert first[0] == 0 and first[2:] == sorted(first[2:])  # the build runs beside env and the Triton smoke


def test_failed_build_skips_the_sanitizer_and_fails_the_run(tmp_path):
    env = _stand_in(tmp_path, _bench_doc())
    env.update(FAKE_BUILD_RC="1")
    proc = _run(["--focus", "cuda", "--budget", "200"], env=env, timeout=300)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert proc.returncode == 1
    assert re.search(r"stage build\s+FAILED", summary)
    assert re.search(r"stage sanitizer\s+skipped\(no CUDA extension\)", summary)
    assert re.search(r"stage smoke-cuda\s+ok", summary)  # on a GPU, its cases say why the backend declined


def test_spent_budget_skips_stages_and_fails(tmp_path):
    env = _stand_in(tmp_path, _bench_doc())
    env.update(FAKE_BUILD_SECONDS="30")
    proc = _run(["--focus", "speed", "--budget", "15"], env=env, timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert proc.returncode == 1
    assert re.search(r"stage build\s+FAILED\(rc=timeout after 1\ds", summary)  # cut to what was left
    assert re.search(r"stage speed\s+skipped\(time budget of 15s spent\)", summary)


# --------------------------------------------------------------------------- summary of runs cut off anywhere

def _synthetic_run(out: Path, reached: int, stages: list[str]):
    """Writes what a full run leaves in ``out`` after its first ``reached`` stages, plus half of the next."""
    smoke_rows = [{"backend": b, "case": f"case{i}", "status": s, "seconds": 1.0, "detail": "why" if s != "ok" else ""}
                  for b in ("triton", "cuda") for i, s in enumerate(("ok", "FAIL", "skipped"))]
    speed_rows = [{"case": "B4-H16-L4096-D128", "mode": m, "provider": p, "status": "ok", "ms": 1.0, "tflops": 500.0,
                   "shape": [4, 16, 16, 4096, 4096, 128]} for m in ("fwd", "fwd+bwd") for p in ("triton", "cuda")]
    files = {
        "smoke-triton": ("smoke.json", smoke_rows[:3]), "smoke-cuda": ("smoke.json", smoke_rows),
        "speed": ("speed.json", speed_rows),
    }
    doc = {}
    for i, stage in enumerate(stages[: reached + 1]):
        if stage not in files:
            continue
        name, rows = files[stage]
        if i == reached:  # the stage in flight wrote part of its rows
            rows = rows[: len(rows) // 2 + 1] if stage != "smoke-cuda" else smoke_rows[:4]
        doc[name] = {"environment": {"device": "cuda", "device_name": "H200", "torch": "2.11.0"}, "results": rows}
        if name == "speed.json":
            doc[name]["ceilings"] = {"matmul_bf16_tflops": 790.0, "copy_gbps": 4300.0}
    for name, content in doc.items():
        (out / name).write_text(json.dumps(content))
    if reached > stages.index("results"):
        (out / "bench.json").write_text(json.dumps(_bench_doc()))


def test_summary_of_a_run_cut_off_at_every_stage(tmp_path):
    gpu_summary = _load("gpu_summary")
    stages = ["extension", "env", "smoke-triton", "build", "smoke-cuda", "sanitizer", "speed", "tests", "bench",
              "memory", "results"]
    for reached in range(len(stages) + 1):
        out = tmp_path / f"cut{reached}"
        out.mkdir()
        _synthetic_run(out, reached, stages)
        done = ",".join(f"{s}=ok(1s)" for s in stages[:reached])
        running = stages[reached] if reached < len(stages) else None
        assert gpu_summary.main(["summary", "--out", str(out), "--stages", done, "--planned", " ".join(stages)]
                                + (["--running", running] if running else [])) == 0
        text = (out / "summary.txt").read_text()
        for s in stages[:reached]:
            assert re.search(rf"stage {s}\s+ok\(1s\)", text), (reached, s)
        if running:
            assert re.search(rf"stage {running}\s+running", text)
        for s in stages[reached + 1:]:
            assert re.search(rf"stage {s}\s+not reached", text), (reached, s)
        if reached > stages.index("smoke-triton"):
            assert re.search(r"triton\s+1 ok, 1 FAIL, 1 skipped", text) and "FAIL    case1: why" in text
        if reached > stages.index("smoke-cuda"):
            assert re.search(r"cuda\s+1 ok, 1 FAIL, 1 skipped", text)
        if reached > stages.index("speed"):
            assert "ceilings: bf16 matmul 790.0 TFLOP/s" in text and "63%" in text  # 500 of 790 TFLOP/s
        if reached < stages.index("smoke-triton"):
            assert "no results yet" in text
        assert ("Stand-in GPU" in text) == (reached > stages.index("results"))


def test_summary_ignores_a_results_file_cut_off_mid_write(tmp_path):
    gpu_summary = _load("gpu_summary")
    (tmp_path / "smoke.json").write_text('{"results": [{"backend": "triton", "ca')
    assert gpu_summary.main(["summary", "--out", str(tmp_path), "--planned", "env smoke-triton"]) == 0
    assert "no results yet" in (tmp_path / "summary.txt").read_text()


# --------------------------------------------------------------------------- gpu_smoke.py on the CPU

def test_smoke_correctness_runs_on_cpu_and_extends_its_file(tmp_path):
    listing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "list"], capture_output=True,
                             text=True, timeout=300)  # the script runs as a script, from any folder
    assert listing.returncode == 0 and "d128-bf16-decode" in listing.stdout, listing.stderr
    gpu_smoke = _load("gpu_smoke")
    out = tmp_path / "smoke.json"
    smoke = ["correctness", "--device", "cpu", "--tiny", "--out", str(out)]
    assert gpu_smoke.main([*smoke, "--backends", "cpu"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == len(gpu_smoke.CASES) and {r["status"] for r in rows} == {"ok"}
    assert gpu_smoke.main([*smoke, "--backends", "reference", "--cases", "decode"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["backend"] for r in rows} == {"cpu", "reference"}
    assert sorted(r["case"] for r in rows if r["backend"] == "reference") == sorted(
        c.name for c in gpu_smoke.CASES if "decode" in c.tags)


def test_smoke_catches_a_wrong_answer_and_names_skips_and_lost_contexts(tmp_path, monkeypatch):
    import fastattn

    gpu_smoke = _load("gpu_smoke")
    case = gpu_smoke._tiny(gpu_smoke.select_cases("d128-bf16-lengths-causal")[0])
    cpu = torch.device("cpu")
    assert gpu_smoke.run_case(case, "cpu", cpu)["status"] == "ok"
    skipped = gpu_smoke.run_case(case, "cuda", cpu)
    assert skipped["status"] == "skipped" and "cuda" in skipped["detail"]

    real = fastattn.attention
    monkeypatch.setattr(fastattn, "attention", lambda *a, **k: real(*a, **k) * 1.01)
    failed = gpu_smoke.run_case(case, "cpu", cpu)
    assert failed["status"] == "FAIL" and "exceeds allowed" in failed["detail"]

    def lost(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(fastattn, "attention", lost)
    out = tmp_path / "smoke.json"
    rc = gpu_smoke.main(["correctness", "--device", "cpu", "--tiny", "--backends", "cpu", "--cases", "decode",
                         "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert rc == 1 and [r["status"] for r in rows] == ["ERROR", "not run", "not run"]


def test_tiny_cases_keep_their_features():
    gpu_smoke = _load("gpu_smoke")
    for case in gpu_smoke.CASES:
        tiny = gpu_smoke._tiny(case)
        assert tiny.Lq <= gpu_smoke.TINY_L and tiny.Lk <= gpu_smoke.TINY_L and tiny.B <= 2
        assert (tiny.Lq == 1) == (case.Lq == 1) and (tiny.Hq > tiny.Hkv) == (case.Hq > case.Hkv)
        assert set(tiny.options) == set(case.options)
        for key in ("key_lengths", "query_lengths"):
            if key in tiny.options:
                assert len(tiny.options[key]) == tiny.B
    with pytest.raises(SystemExit, match="unknown case or tag"):
        gpu_smoke.select_cases("nope")


@pytest.mark.interpreter
def test_smoke_runs_a_triton_decode_case_in_the_interpreter(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "correctness", "--device", "cpu",
                           "--tiny", "--backends", "triton", "--cases", "d64-bf16-decode-window", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["status"] for r in json.loads(out.read_text())["results"]] == ["ok"]


def test_speed_runs_on_cpu(tmp_path):
    out = tmp_path / "speed.json"
    gpu_smoke = _load("gpu_smoke")
    assert gpu_smoke.main(["speed", "--device", "cpu", "--tiny", "--set", "all", "--providers", "cpu,sdpa-math,cudnn",
                           "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    ours = [r for r in rows if r["provider"] == "cpu"]
    assert len(ours) == 10 and all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] >= 0 for r in ours)
    assert all(r["max_abs_diff_vs_fp32"] < 1e-4 for r in ours if r["mode"] == "fwd")
    assert all(r["status"] == "skipped" for r in rows if r["provider"] == "cudnn")  # torch runs cuDNN on CUDA only
    with pytest.raises(SystemExit, match=r"unknown \['tirton'\]"):
        gpu_smoke.main(["speed", "--device", "cpu", "--providers", "tirton", "--out", str(out)])


# --------------------------------------------------------------------------- the prebuilt extension

def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "csrc" / "cuda").mkdir(parents=True)
    (root / "fastattn").mkdir()
    (root / "setup.py").write_text("setup()\n")
    (root / "csrc" / "bindings.cpp").write_text("int x;\n")
    (root / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    (root / "csrc" / "cuda" / "notes.py").write_text("# not a source\n")
    return root


def test_prebuilt_tag_and_source_hash(tmp_path):
    prebuilt = _load("prebuilt")
    tag = prebuilt.tag()
    assert re.fullmatch(r"py3\d+-torch\d+\.\d+\.\d+\S*-cu(\d+|none)-cxx11abi[01]", tag), tag
    assert tag.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}")
    root = _tree(tmp_path)
    before = prebuilt.source_hash(root)
    (root / "csrc" / "cuda" / "notes.py").write_text("# changed, but not a source\n")
    assert prebuilt.source_hash(root) == before
    (root / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() { }\n")
    assert prebuilt.source_hash(root) != before


def test_prebuilt_install_only_when_tag_and_sources_match(tmp_path):
    prebuilt = _load("prebuilt")
    root = _tree(tmp_path)
    store = tmp_path / "prebuilt"
    used, why = prebuilt.install(store, root)
    assert not used and "no prebuilt extension for" in why
    folder = store / prebuilt.tag()
    folder.mkdir(parents=True)
    (folder / "_C.cpython-3x.so").write_bytes(b"\x7fELF fake")
    (folder / "manifest.json").write_text(json.dumps({"source_hash": "0" * 16}))
    used, why = prebuilt.install(store, root)
    assert not used and "rebuild" in why and not list((root / "fastattn").glob("_C*.so"))
    (folder / "manifest.json").write_text(json.dumps({"source_hash": prebuilt.source_hash(root)}))
    used, why = prebuilt.install(store, root)
    assert used and "using prebuilt" in why
    assert (root / "fastattn" / "_C.cpython-3x.so").read_bytes() == b"\x7fELF fake"
    assert prebuilt.main(["install", "--dir", str(tmp_path / "none")]) == prebuilt.NOT_USABLE


def test_prebuilt_check_loads_the_built_extension_and_lists_its_ops():
    libs = sorted((ROOT / "fastattn").glob(f"_C.cpython-{sys.version_info.major}{sys.version_info.minor}*.so"))
    if not libs:
        pytest.skip("the extension is not built in this tree")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prebuilt.py"), "check", "--cpu-only", str(libs[0])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch.ops.fastattn.attention_fwd" in proc.stdout and "torch.ops.fastattn.attention_bwd" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prebuilt.py"), "check", str(ROOT / "README.md")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "check:" in proc.stderr
