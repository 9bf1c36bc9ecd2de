"""The first questions a GPU run answers: do the kernels compute the right thing, and how fast are they.

    python benchmarks/gpu_smoke.py correctness --backends triton,cuda [--cases all|decode|NAME,...] --out OUT/smoke.json
    python benchmarks/gpu_smoke.py speed [--set headline|decode|all] [--providers ...] --out OUT/speed.json
    python benchmarks/gpu_smoke.py list                        # the correctness cases and the speed grid

``correctness`` runs forward + backward of a handful of configurations that cover the kernels' main
code paths (head dims 64/128, bf16 and fp16, causal and not, GQA, window, BlockMask of whole tiles and
of partial tiles, dropout, key/query lengths, decode with one query against a long cache) against the
reference, with the project's tolerance rule (tests/tolerance.py). ``speed`` times the headline grid
(D=128 bf16, L = 4k and 16k at B*L = 16k tokens, 16 heads, causal and not, forward and forward+backward)
for fastattn's triton and cuda backends, torch SDPA's flash kernel and cuDNN, and measures the card's
ceilings (bf16 matmul TFLOP/s, device copy GB/s) in the same process.

Both write their JSON file again after every case (atomically), so a run that is cut off still leaves
what it measured; a file that exists is extended (results of the same backend/case are replaced).
``--device cpu --tiny`` runs the same code on tiny shapes on the CPU (the cpu backend, or Triton
through its interpreter with ``TRITON_INTERPRET=1``): a test of this script, not of a GPU.
Autotuning is off (``FASTATTN_AUTOTUNE=0``, pinned configs) unless the caller sets it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fastattn and tests.helpers from this tree
os.environ.setdefault("FASTATTN_AUTOTUNE", "0")

import torch  # noqa: E402

# --------------------------------------------------------------------------- correctness cases


@dataclass(frozen=True)
class Case:
    """One correctness configuration: ``q (B, Hq, Lq, D)``, ``k, v (B, Hkv, Lk, D)`` plus attention options.

    ``tiny`` caps every length for ``--tiny`` runs (the CPU check of this script).
    """

    name: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    dtype: str
    options: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()


CASES = [  # most important first: a run cut off early has answered the main question
    Case("d128-bf16-causal", 2, 4, 4, 1000, 1000, 128, "bfloat16", {"causal": True}),
    Case("d128-fp16-gqa-causal-lq-lt-lk", 2, 8, 2, 300, 517, 128, "float16", {"causal": True}, ("gqa",)),
    Case("d128-bf16-decode", 4, 32, 8, 1, 16384, 128, "bfloat16", {}, ("decode", "gqa")),
    Case("d64-fp16-dense-odd", 2, 4, 4, 97, 17, 64, "float16"),
    Case("d128-bf16-lengths-causal", 2, 4, 2, 400, 700, 128, "bfloat16",
         {"causal": True, "key_lengths": (700, 33), "query_lengths": (400, 5)}, ("gqa",)),
    Case("d64-bf16-window", 1, 4, 4, 1024, 1024, 64, "bfloat16", {"window": (100, 20)}),
    Case("d128-bf16-blockmask-tiles", 1, 4, 4, 640, 640, 128, "bfloat16", {"block_mask": "layout"}),
    Case("d64-fp16-blockmask-document", 2, 4, 4, 500, 500, 64, "float16", {"block_mask": "document"}),
    Case("d64-bf16-dropout-causal", 2, 4, 4, 333, 333, 64, "bfloat16", {"causal": True, "dropout_p": 0.1}),
    Case("d128-fp16-decode-lengths", 3, 16, 2, 1, 8192, 128, "float16",
         {"key_lengths": (8192, 4097, 1)}, ("decode", "gqa")),
    Case("d64-bf16-decode-window", 2, 8, 8, 1, 4000, 64, "bfloat16", {"window": (1024, 0)}, ("decode",)),
]
TINY_L = 40  # --tiny: Lq and Lk at most this (decode keeps Lq = 1); key lengths are scaled alike


def _tiny(case: Case) -> Case:
    """``case`` at tiny sizes: lengths at most TINY_L, at most 2 batches and 2 kv heads (GQA kept)."""

    def cap(n: int) -> int:
        return max(1, min(n, TINY_L))

    B, Hkv = min(case.B, 2), min(case.Hkv, 2)
    Hq = Hkv * min(case.Hq // case.Hkv, 2)
    options = dict(case.options)
    for key in ("key_lengths", "query_lengths"):
        if key in options:
            full = case.Lk if key == "key_lengths" else case.Lq
            options[key] = tuple(max(0, round(n * cap(full) / full)) for n in options[key][-B:])
    if "window" in options:
        options["window"] = tuple(w if w < 0 else min(w, TINY_L // 4) for w in options["window"])
    return Case(case.name, B, Hq, Hkv, cap(case.Lq), cap(case.Lk), case.D, case.dtype, options, case.tags)


def _block_mask(kind: str, H: int, Lq: int, Lk: int, device: torch.device):
    """A BlockMask of whole tiles (``layout``) or a document mask with partial tiles (``document``)."""
    import fastattn

    block = 64 if Lq > 64 else 16
    if kind == "layout":
        nq, nk = math.ceil(Lq / block), math.ceil(Lk / block)
        layout = torch.rand(H, nq, nk, device=device) > 0.5  # a different pattern per head
        layout[:, :, 0] = True  # every query tile sees something; the rest is random
        layout[0, -1, :] = False  # and one row of tiles sees nothing (its output must be 0)
        layout[0, -1, 0] = Lq <= block  # unless that is the only row
        return fastattn.BlockMask.from_layout(layout, block_size=block, seq_lens=(Lq, Lk))
    docs = torch.tensor([0.0, 0.3, 0.45, 1.0])  # document boundaries as fractions of the sequence
    q_doc = torch.bucketize(torch.arange(Lq) / Lq, docs[1:-1], right=True)
    k_doc = torch.bucketize(torch.arange(Lk) / Lk, docs[1:-1], right=True)
    dense = (q_doc[:, None] == k_doc[None, :]).to(device)
    return fastattn.BlockMask.from_dense(dense, block_size=block)


def _inputs(case: Case, device: torch.device):
    from tests.helpers import make_qkv

    dtype = getattr(torch, case.dtype)
    q, k, v = make_qkv(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.D, dtype=dtype, device=device)
    options = dict(case.options)
    if "block_mask" in options:
        options["block_mask"] = _block_mask(options["block_mask"], case.Hq, case.Lq, case.Lk, device)
    for key in ("key_lengths", "query_lengths"):
        if key in options:
            options[key] = torch.tensor(options[key], dtype=torch.int32, device=device)
    return (q, k, v), options


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# Errors after which the CUDA context is unusable for the rest of the process.
STICKY_CUDA_ERRORS = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
                      "device-side assert")


def run_case(case: Case, backend: str, device: torch.device) -> dict:
    """Forward + backward of ``case`` on ``backend`` against the reference; never raises."""
    import fastattn
    from tests.helpers import check_against_reference

    row = {"backend": backend, "case": case.name, "shape": [case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.D],
           "dtype": case.dtype, "options": dict(case.options)}
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        (q, k, v), options = _inputs(case, device)
        check_against_reference(backend, q, k, v, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["status"] = "ok"
    except fastattn.BackendNotSupportedError as exc:
        row.update(status="skipped", detail=_short(exc))
    except AssertionError as exc:
        row.update(status="FAIL", detail=_short(exc, 1500))
    except Exception as exc:  # a crash is a result too: record it and go on with the next case
        row.update(status="ERROR", detail=_short(exc), traceback=traceback.format_exc(limit=6)[-3000:])
        if any(sign in str(exc).lower() for sign in STICKY_CUDA_ERRORS):
            row["fatal"] = True  # the CUDA context is lost: nothing after it in this process can be trusted
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def select_cases(spec: str) -> list[Case]:
    """``all``, a tag (``decode``, ``gqa``) or a comma-separated list of case names."""
    if spec == "all":
        return list(CASES)
    names = {c.name for c in CASES}
    tags = {t for c in CASES for t in c.tags}
    chosen = []
    for part in filter(None, spec.split(",")):
        if part in tags:
            chosen += [c for c in CASES if part in c.tags and c not in chosen]
        elif part in names:
            chosen += [c for c in CASES if c.name == part and c not in chosen]
        else:
            raise SystemExit(f"--cases: unknown case or tag {part!r} (tags: {sorted(tags)}, cases: {sorted(names)})")
    return chosen


# --------------------------------------------------------------------------- results file


def _environment(device: torch.device) -> dict:
    env = {"device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "autotune": os.environ.get("FASTATTN_AUTOTUNE")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


class ResultsFile:
    """A JSON file ``{"environment", "results": [...]}`` rewritten after every row (write + rename)."""

    def __init__(self, path: Path, device: torch.device, key: tuple[str, ...]):
        self.path, self.key = path, key
        self.doc = json.loads(path.read_text()) if path.exists() else {}
        self.doc.setdefault("results", [])
        self.doc["environment"] = _environment(device)

    def add(self, row: dict) -> None:
        ident = tuple(row.get(k) for k in self.key)
        self.doc["results"] = [r for r in self.doc["results"] if tuple(r.get(k) for k in self.key) != ident] + [row]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        os.replace(tmp, self.path)


def correctness(args) -> int:
    device = torch.device(args.device)
    cases = select_cases(args.cases)
    if args.tiny:
        cases = [_tiny(c) for c in cases]
    results = ResultsFile(args.out, device, ("backend", "case"))
    failed = 0
    todo = [(backend, case) for backend in args.backends.split(",") for case in cases]
    for i, (backend, case) in enumerate(todo):
        row = run_case(case, backend, device)
        results.add(row)
        print(f"{backend:<7} {case.name:<30} {row['status']:<8} {row['seconds']:6.2f}s  {row.get('detail', '')[:300]}",
              flush=True)
        failed += row["status"] in ("FAIL", "ERROR")
        if row.get("fatal"):
            for later_backend, later in todo[i + 1:]:
                results.add({"backend": later_backend, "case": later.name, "status": "not run",
                             "detail": f"the CUDA context was lost in {backend} {case.name}; run it again alone"})
            print(f"{backend} {case.name}: the CUDA context is lost; {len(todo) - i - 1} cases not run", flush=True)
            return 1
    return 1 if failed else 0


# --------------------------------------------------------------------------- speed


@dataclass(frozen=True)
class SpeedCase:
    """One timed configuration: ``(B, Hq, L, D)`` queries against ``(B, Hkv, Lk, D)`` keys."""

    name: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    causal: bool
    modes: tuple[str, ...]


def speed_cases(which: str, tiny: bool) -> list[SpeedCase]:
    """The headline grid (16k tokens, 16 heads, D=128) and/or the decode grid (one query, long cache)."""
    cases = []
    if which in ("headline", "all"):
        for L in (4096, 16384):
            for causal in (False, True):
                B = 16384 // L
                name = f"B{B}-H16-L{L}-D128{'-causal' if causal else ''}"
                cases.append(SpeedCase(name, B, 16, 16, L, L, 128, causal, ("fwd", "fwd+bwd")))
    if which in ("decode", "all"):
        for Lk in (16384, 131072):
            cases.append(SpeedCase(f"decode-B8-H32-8-Lk{Lk}-D128", 8, 32, 8, 1, Lk, 128, False, ("fwd",)))
    if tiny:
        cases = [SpeedCase(c.name + "-tiny", 1, 2, 2 if c.Hkv == c.Hq else 1, min(c.Lq, 64), min(c.Lk, 64), 32,
                           c.causal, c.modes) for c in cases]
    return cases


def _flops(c: SpeedCase, mode: str) -> float:
    """Matmul FLOPs: 4·B·H·Lq·Lk·D forward (half with causal at Lq = Lk); forward+backward 3.5x that."""
    visible = c.Lq * c.Lk / 2 if c.causal and c.Lq == c.Lk else c.Lq * c.Lk
    fwd = 4 * c.B * c.Hq * visible * c.D
    return fwd if mode == "fwd" else 3.5 * fwd


def _bytes(c: SpeedCase) -> float:
    """Bytes a forward must move at least: q, k, v read and out written (2-byte elements)."""
    return 2 * (2 * c.B * c.Hq * c.Lq * c.D + 2 * c.B * c.Hkv * c.Lk * c.D)


FASTATTN_PROVIDERS = ("triton", "cuda", "cpu")
SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _provider_fn(provider: str, q, k, v, causal: bool):
    """The attention call of ``provider``, or raise with the reason it cannot run."""
    import torch.nn.functional as F

    if provider in FASTATTN_PROVIDERS:
        import fastattn

        return lambda: fastattn.attention(q, k, v, causal=causal, backend=provider)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if provider not in SDPA_KERNELS:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(FASTATTN_PROVIDERS + tuple(SDPA_KERNELS))}")
    kernel = SDPA_KERNELS[provider]
    gqa = q.shape[1] != k.shape[1]

    def fn():
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1, enable_gqa=gqa)

    return fn


def _time_ms(fn, device: torch.device) -> tuple[float, float, float]:
    """(20th percentile, median, 80th percentile) milliseconds of ``fn`` after warm-up."""
    if device.type == "cuda":
        import triton.testing

        low, mid, high = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return low, mid, high
    times = []
    fn()
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return times[1], times[2], times[3]


def time_case(c: SpeedCase, provider: str, mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Times one provider on one case and mode; also the largest difference to the reference output."""
    row = {"case": c.name, "provider": provider, "mode": mode, "shape": [c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.D],
           "causal": c.causal, "dtype": str(dtype).replace("torch.", "")}
    g = torch.Generator(device=device).manual_seed(0)
    try:
        q = torch.randn(c.B, c.Hq, c.Lq, c.D, device=device, dtype=dtype, generator=g)
        k = torch.randn(c.B, c.Hkv, c.Lk, c.D, device=device, dtype=dtype, generator=g)
        v = torch.randn(c.B, c.Hkv, c.Lk, c.D, device=device, dtype=dtype, generator=g)
        if mode == "fwd":
            fn = _provider_fn(provider, q, k, v, c.causal)
            with torch.no_grad():
                out = fn()
                row["max_abs_diff_vs_fp32"] = _diff_vs_fp32(out, q, k, v, c)
                low, mid, high = _time_ms(fn, device)
        else:
            leaves = [t.requires_grad_() for t in (q, k, v)]
            attn = _provider_fn(provider, *leaves, c.causal)
            dout = torch.randn(c.B, c.Hq, c.Lq, c.D, device=device, dtype=dtype, generator=g)

            def fn():
                return torch.autograd.grad(attn(), leaves, dout)

            low, mid, high = _time_ms(fn, device)
        flops = _flops(c, mode)
        row.update(status="ok", ms=round(mid, 4), ms_p20=round(low, 4), ms_p80=round(high, 4),
                   tflops=round(flops / (mid * 1e-3) / 1e12, 2))
        if mode == "fwd":
            row["gbps"] = round(_bytes(c) / (mid * 1e-3) / 1e9, 1)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        # Ours failing is an error; a backend declining, torch's kernels declining, or memory running out is not.
        ours = provider in FASTATTN_PROVIDERS and type(exc).__name__ != "BackendNotSupportedError"
        row.update(status="ERROR" if ours and "out of memory" not in first.lower() else "skipped",
                   detail=f"{type(exc).__name__}: {first}"[:400])
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _diff_vs_fp32(out, q, k, v, c: SpeedCase) -> float | None:
    """Largest |out - float32 SDPA| over the first batch and head (a cheap sanity check of big shapes)."""
    import torch.nn.functional as F

    ref = F.scaled_dot_product_attention(q[:1, :1].float(), k[:1, :1].float(), v[:1, :1].float(),
                                         is_causal=c.causal and c.Lq > 1)
    return round((out[:1, :1].float() - ref).abs().max().item(), 5)


def speed(args) -> int:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = ResultsFile(args.out, device, ("case", "provider", "mode"))
    if device.type == "cuda":
        from fastattn.bench.ceilings import measure_ceilings

        try:
            results.doc["ceilings"] = measure_ceilings(device)
        except Exception as exc:
            results.doc["ceilings"] = {"error": _short(exc)}
        results.save()
        print(f"ceilings: {results.doc['ceilings']}", flush=True)
    unknown = [p for p in args.providers.split(",") if p not in FASTATTN_PROVIDERS + tuple(SDPA_KERNELS)]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {', '.join(FASTATTN_PROVIDERS + tuple(SDPA_KERNELS))}")
    errors = 0
    for c in speed_cases(args.set, args.tiny):
        for mode in c.modes:
            for provider in args.providers.split(","):
                row = time_case(c, provider, mode, device, dtype)
                results.add(row)
                detail = (f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s" if row["status"] == "ok"
                          else row["detail"][:200])
                print(f"{c.name:<34} {mode:<8} {provider:<10} {row['status']:<7} {detail}", flush=True)
                errors += row["status"] == "ERROR"
    return 1 if errors else 0


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("correctness", help="forward + backward against the reference")
    c.add_argument("--backends", default="triton", help="comma-separated fastattn backends, e.g. triton,cuda")
    c.add_argument("--cases", default="all", help="all, a tag (decode, gqa) or case names, comma-separated")
    s = sub.add_parser("speed", help="time the headline (and decode) grid and the ceilings")
    s.add_argument("--set", choices=("headline", "decode", "all"), default="headline")
    s.add_argument("--providers", default="triton,cuda,sdpa-flash,cudnn")
    for p in (c, s):
        p.add_argument("--out", type=Path, required=True, help="JSON results file (extended if it exists)")
        p.add_argument("--device", default="cuda")
        p.add_argument("--tiny", action="store_true", help="tiny shapes: a check of this script on the CPU")
    sub.add_parser("list", help="print the correctness cases and the speed grid")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for case in CASES:
            print(f"{case.name:<30} B{case.B} Hq{case.Hq} Hkv{case.Hkv} Lq{case.Lq} Lk{case.Lk} D{case.D} "
                  f"{case.dtype} {case.options} {' '.join(case.tags)}")
        for sc in speed_cases("all", False):
            print(f"speed: {sc.name} ({', '.join(sc.modes)})")
        return 0
    return correctness(args) if args.command == "correctness" else speed(args)


if __name__ == "__main__":
    sys.exit(main())
