"""Context parallelism on CPU processes (gloo): every scheme x layout x feature against
single-process ``fastattn.attention`` on the gathered sequence, in values, lse and gradients.

Four processes are started once per module (forkserver: torch and fastattn are imported once, not
in every process); they run every case on the world (W = 4) and on two pairs (W = 2, ranks {0, 1}
and {2, 3}, which also checks groups whose ranks are not the global ranks). Each rank writes what
it found, and the tests below assert on those records, one test per case.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock

import fastattn
from fastattn.distributed import context_parallel_attention, shard, unshard

from .tolerance import assert_close_to_reference

SCHEMES = ("ring", "allgather", "ulysses")
LAYOUTS = ("zigzag", "contiguous")
FEATURES = (
    "dense", "causal", "window", "gqa", "alibi", "alibi_causal", "softcap", "key_padding", "key_padding_causal",
    "cross_causal", "float32",
)
WORLD_SIZES = (2, 4)
# With a GPU: one rank (W = 1, zigzag: two pieces, so partial results are merged) per GPU backend.
GPU_CASES = [
    f"{backend}-{scheme}-{feature}" for backend in ("cuda", "triton") for scheme in SCHEMES
    for feature in ("causal", "window", "gqa", "alibi", "softcap", "key_padding_causal")
]
CASES = [f"{scheme}-{layout}-{feature}" for scheme in SCHEMES for layout in LAYOUTS for feature in FEATURES]
CHECKS = (
    "uneven_shard", "odd_zigzag_shard", "contiguous_odd_shards", "mismatched_shapes", "ulysses_heads", "bad_scheme",
    "reference_backend", "module", "unshard",
)


def _feature_args(feature: str, world: int, L: int):
    """``(Hq, Hkv, Lk, kwargs)`` of one feature; heads divisible by the world size (ulysses)."""
    Hq = Hkv = world
    Lk = L
    kwargs = {}
    if feature == "causal":
        kwargs["causal"] = True
    elif feature == "window":
        kwargs["window"] = (5, 2)
    elif feature == "gqa":
        Hq, kwargs["causal"] = 2 * world, True
    elif feature in ("alibi", "alibi_causal"):
        Hq = 2 * world
        kwargs["alibi_slopes"] = torch.rand(2, Hq, dtype=torch.float32) * 0.5 + 0.1  # (B, Hq)
        kwargs["causal"] = feature == "alibi_causal"
    elif feature == "softcap":
        kwargs.update(softcap=2.0, causal=True, window=(7, -1))
    elif feature == "key_padding":
        kwargs["key_lengths"] = torch.tensor([L - 3, 0])  # batch 1 sees nothing: 0 and lse -inf, no NaN
    elif feature == "key_padding_causal":
        kwargs.update(key_lengths=torch.tensor([L - 3, L // 2 + 1]), causal=True, alibi_slopes=torch.rand(Hq) + 0.1)
    elif feature == "cross_causal":
        Lk, kwargs["causal"] = 2 * L, True
    elif feature == "float32":  # the kernels' float32 path (the float64 one recomputes its lse in double)
        Hq = 2 * world
        kwargs.update(causal=True, alibi_slopes=torch.rand(Hq) + 0.1)
    return Hq, Hkv, Lk, kwargs


def _assert_lse_close(name, lse, ref, ref_lp):
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: -inf rows differ from the reference"
    assert_close_to_reference(name, lse[finite], ref[finite], ref_lp[finite])


def _run_case(
    group, world: int, scheme: str, layout: str, feature: str, backend: str = "cpu", seqlen: int | None = None
) -> None:
    """One case on CPU in float64 (``float32`` for that feature) against single-process float64,
    allowed twice single-process float32's error; or, with a GPU ``backend``, in bfloat16 on the GPU,
    allowed twice that backend's single-process bfloat16 error."""
    gpu = backend != "cpu"
    B, L, D = 2, seqlen or (20 if world == 2 else 24), 64 if gpu else 12
    torch.manual_seed(1234)  # the same full inputs on every rank
    Hq, Hkv, Lk, kwargs = _feature_args(feature, world, L)
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    dout = torch.randn(B, Hq, L, D)
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32 if feature == "float32" else torch.float64

    def single_process(dtype, backend, device):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        on_device = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
        out, lse = fastattn.attention(*leaves, return_lse=True, backend=backend, **on_device)
        out.backward(dout.to(device, dtype))
        return tuple(t.detach().cpu() for t in (out, lse, *(t.grad for t in leaves)))

    ref = single_process(torch.float64, "cpu", "cpu")
    ref_lp = single_process(dtype, backend, device) if gpu else single_process(torch.float32, "cpu", "cpu")

    leaves = [shard(t.to(device, dtype), group, layout).detach().requires_grad_() for t in (q, k, v)]
    on_device = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    out, lse = context_parallel_attention(
        *leaves, group=group, scheme=scheme, layout=layout, return_lse=True, backend=backend, **on_device
    )
    out.backward(shard(dout.to(device, dtype), group, layout))
    got = tuple(t.detach().cpu() for t in (out, lse, *(t.grad for t in leaves)))
    for name, value, r, r_lp in zip(("out", "lse", "dq", "dk", "dv"), got, ref, ref_lp):
        r, r_lp = shard(r, group, layout), shard(r_lp, group, layout)
        if name == "lse":
            _assert_lse_close(name, value, r, r_lp)
        else:
            assert_close_to_reference(name, value, r, r_lp)


def _expect_error(fn, kind, *words) -> None:
    try:
        fn()
    except kind as exc:
        missing = [w for w in words if w not in str(exc)]
        assert not missing, f"error {exc!r} does not mention {missing}"
        return
    raise AssertionError(f"expected {kind.__name__}")


def _run_check(group, world: int, check: str) -> None:
    rank = dist.get_rank(group)
    torch.manual_seed(5)
    x = torch.randn(1, world, 4 * world, 8, dtype=torch.float64)
    if check == "uneven_shard":  # a length that does not split: a clear error naming the argument
        _expect_error(lambda: shard(torch.zeros(1, 1, 2 * world + 1, 4), group), ValueError, "x.shape[2]", "key_lengths")
    elif check == "odd_zigzag_shard":
        odd = torch.zeros(1, world, 3, 8, dtype=torch.float64)
        _expect_error(lambda: context_parallel_attention(odd, odd, odd, group=group), ValueError, "q.shape[2]", "zigzag")
    elif check == "mismatched_shapes":  # every rank raises, none hangs
        mine = torch.zeros(1, world, 2 + 2 * rank, 8, dtype=torch.float64)
        _expect_error(
            lambda: context_parallel_attention(mine, mine, mine, group=group, layout="contiguous"), ValueError, "same shapes"
        )
    elif check == "ulysses_heads":
        odd = torch.zeros(1, world + 1, 4, 8, dtype=torch.float64)
        _expect_error(lambda: context_parallel_attention(odd, odd, odd, group=group, scheme="ulysses"), ValueError, "q.shape[1]")
    elif check == "bad_scheme":
        _expect_error(lambda: context_parallel_attention(x, x, x, group=group, scheme="tree"), ValueError, "scheme")
    elif check == "reference_backend":
        _expect_error(lambda: context_parallel_attention(x, x, x, group=group, backend="reference"), ValueError, "backend")
    elif check == "contiguous_odd_shards":  # L % world == 0 is enough for the contiguous layout
        for scheme in SCHEMES:
            _run_case(group, world, scheme, "contiguous", "window", seqlen=7 * world)
    elif check == "unshard":
        for layout in LAYOUTS:
            assert torch.equal(unshard(shard(x, group, layout), group, layout), x)
    elif check == "module":
        _check_module(group, world)


def _check_module(group, world: int) -> None:
    """``fastattn.nn.Attention(context_parallel_group=...)`` on shards == the module on the whole sequence."""
    torch.manual_seed(7)
    for position in ("rotary", "alibi"):
        module = fastattn.nn.Attention(8 * world, 2 * world, num_kv_heads=world, causal=True, position=position)
        x = torch.randn(2, 8 * world, 8 * world, dtype=torch.float64)
        full_lp = module(x.float())
        module = module.double()
        full = module(x)
        module.context_parallel_group = dist.group.WORLD if group is None else group
        x_local = shard(x, group, "zigzag", dim=1).detach().requires_grad_()
        local = module(x_local)
        expected, expected_lp = (shard(t.detach(), group, "zigzag", dim=1) for t in (full, full_lp))
        assert_close_to_reference(f"module {position}", local, expected, expected_lp)
        local.sum().backward()  # gradients flow through the sharded module
        assert torch.isfinite(x_local.grad).all()
        module.context_parallel_group = None


def _check_timeout(rank: int, group) -> dict:
    """Rank 1 raises before a collective; rank 0 must get an error from the group's timeout, not hang."""
    x = torch.zeros(1, 2, 4, 8, dtype=torch.float64)
    start = time.perf_counter()
    try:
        if rank == 1:
            context_parallel_attention(x, x, x, group=group, window=(-2, 0))
        else:
            context_parallel_attention(x, x, x, group=group)
        error = None
    except Exception as exc:  # noqa: BLE001 -- recorded and asserted on by the test
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    return {"error": error, "seconds": time.perf_counter() - start}


def _run_all(group, world: int) -> dict:
    records = {}
    for name in CASES + list(CHECKS):
        try:
            if name in CHECKS:
                _run_check(group, world, name)
            else:
                _run_case(group, world, *name.split("-"))
            records[name] = None
        except Exception:  # noqa: BLE001 -- recorded and asserted on by the test
            records[name] = traceback.format_exc(limit=-3)
    return records


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4, timeout=timedelta(seconds=60)
    )
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    short = dist.new_group([0, 1], timeout=timedelta(seconds=2))
    gpu = dist.new_group([0], backend="nccl") if torch.cuda.is_available() else None
    records = {4: _run_all(None, 4), 2: _run_all(pairs[rank // 2], 2)}
    if gpu is not None and rank == 0:
        records["gpu"] = {}
        for case in GPU_CASES:
            backend, scheme, feature = case.split("-")
            try:
                _run_case(gpu, 1, scheme, "zigzag", feature, backend)
                records["gpu"][case] = None
            except Exception:  # noqa: BLE001
                records["gpu"][case] = traceback.format_exc(limit=-3)
    if rank < 2:
        records["timeout"] = _check_timeout(rank, short)
    dist.barrier()  # rank 1 waits here on a healthy group while rank 0 times out
    usage = resource.getrusage(resource.RUSAGE_SELF)
    records["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # how much of the machine this rank used
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The records of ranks 0-3: ``{"2": {case: None or traceback}, "4": {...}, "timeout": ...}``.

    Under pytest-xdist the group runs once per session: the first worker to take the lock starts it
    in a folder the workers share, the others read its records.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent  # this session's folder, shared by its workers
    else:
        root = tmp_path_factory.mktemp("context_parallel")
    out_dir = root / "context_parallel_records"
    with FileLock(str(root / "context_parallel.lock")):
        if not all((out_dir / f"rank{rank}.json").exists() for rank in range(4)):
            out_dir.mkdir(exist_ok=True)
            context = mp.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # children fork from one process that imported this module
            mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=4, start_method="forkserver")
    found = []
    for rank in range(4):
        with open(out_dir / f"rank{rank}.json") as f:
            found.append(json.load(f))
    return found


def _assert_all_ranks(records: list[dict], world: int, key: str) -> None:
    failures = [f"rank {r}:\n{rec[str(world)][key]}" for r, rec in enumerate(records) if rec[str(world)][key] is not None]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("case", CASES)
def test_matches_single_process(results, world, case):
    _assert_all_ranks(results, world, case)


@pytest.mark.parametrize("world", WORLD_SIZES, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("check", CHECKS)
def test_checks(results, world, check):
    _assert_all_ranks(results, world, check)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_backends_as_the_local_kernel(results, case):
    error = results[0]["gpu"][case]
    assert error is None, error


def test_a_raising_rank_does_not_hang_the_others(results):
    failed, waiting = results[1]["timeout"], results[0]["timeout"]
    # fastattn's input errors are ValueError subclasses (InputValueError also derives from RuntimeError).
    assert failed["error"] is not None and failed["error"].split(":", 1)[0].endswith("ValueError")
    assert "window" in failed["error"]
    assert waiting["error"] is not None, "rank 0 returned although rank 1 never joined"
    assert waiting["seconds"] < 30, f"rank 0 waited {waiting['seconds']:.1f}s with a 2s group timeout"


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    x = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(x, x, x)


def test_bench_mode_cli_rejects_a_length_that_does_not_split(tmp_path, capsys):
    from fastattn.cli import main

    assert main(["bench", "--context-parallel", "--world-sizes", "3", "--seq-lens", "10", "--out", str(tmp_path)]) == 2
    assert "seq_len 10 must be divisible by 2 * world size 3" in capsys.readouterr().err


def test_bench_mode_tables_from_a_recorded_run():
    from pathlib import Path

    from fastattn.bench.context_parallel import tables

    path = Path(__file__).parent.parent / "benchmarks" / "results" / "2026-11-30-cpu-context-parallel.json"
    text = tables(json.loads(path.read_text()))
    memory, steps = text.split("\n\n")
    assert len(memory.splitlines()) == 2 + 3 * 3  # header + (ring, allgather, ulysses) x (W = 1, 2, 4)
    assert "| ring | 4 | 512 |" in memory and "| ring | 2 | forward |" in steps
