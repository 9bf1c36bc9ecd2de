"""pytest-benchmark cases over the same workloads and providers as ``fastattn bench --quick``.

    pytest benchmarks --benchmark-only                         # every case of the quick preset here
    pytest benchmarks --benchmark-only -k "causal and fwd"     # a slice
    pytest benchmarks --benchmark-only --benchmark-json=out.json

Each case records its FLOPs and TFLOP/s (one formula: fastattn.bench.workloads.flops) in
``extra_info``. A provider that cannot serve a workload is skipped with its reasons.
"""

from __future__ import annotations

import pytest
import torch

from fastattn.bench.providers import Unsupported, resolve
from fastattn.bench.runner import mode_fn
from fastattn.bench.workloads import DTYPES, flops, make_case, preset

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = preset("quick", DEVICE.type)
DTYPE = PRESET.dtypes[0]
PROVIDERS = {p.name: p for p in resolve(None, DEVICE)[0]}

CASES = [
    pytest.param(w, name, mode, id=f"{w.name}-{DTYPE}-{name}-{mode}")
    for w in PRESET.workloads
    for name in PROVIDERS
    for mode in PRESET.modes
]


@pytest.fixture(scope="module")
def cases():
    """Inputs per workload, made once and shared by every provider and mode."""
    made = {}

    def get(workload):
        if workload not in made:
            made[workload] = make_case(workload, DTYPES[DTYPE], DEVICE)
        return made[workload]

    return get


@pytest.mark.parametrize("workload, provider, mode", CASES)
def test_attention(benchmark, cases, workload, provider, mode):
    try:
        run = PROVIDERS[provider].build(cases(workload))
    except Unsupported as exc:
        pytest.skip(f"{provider} cannot serve {workload.name}: {exc}")
    fn = mode_fn(run, mode)

    def call():
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    result = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    outputs = result if isinstance(result, tuple) else (result,)
    assert all(bool(torch.isfinite(t).all()) for t in outputs), "non-finite output or gradient"
    work = flops(workload, mode)
    benchmark.extra_info.update(flops=work, dtype=DTYPE, device=DEVICE.type,
                                tflops=work / benchmark.stats.stats.median / 1e12)
