"""Property-based tests: random configurations of every feature, each backend against the reference.

Hypothesis draws a configuration (shapes including 0 and 1 lengths, odd head dims, GQA, strides
-- transposed ``(B, L, H, D)`` views, a non-unit last stride, sliced tensors --, dtypes, causal or a
window, ALiBi, softcap, bool and additive masks (with ``-inf`` and the dtype's minimum), BlockMask
builders, lengths, dropout, an lse gradient) and checks ``fastattn.attention`` on one backend
against the reference with the tolerance rule (tests/tolerance.py): output, lse, and the gradients
of q, k, v, an additive mask and lse; never a NaN. Some cases put NaN/Inf into keys and values that
rows cannot see ("poison", see docs/design.md): the result must be the clean reference's.

``FASTATTN_FUZZ_EXAMPLES=N`` runs N configurations per backend (the Triton interpreter: N / 20);
the default keeps CI within a couple of minutes. Failures print the configuration
(``Case(...)``) and hypothesis's reproduction blob.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import masks, reference
from fastattn._inputs import normalize

from .tolerance import ATOL_FLOOR, assert_close_to_reference, delta_rounding_bound, high_precision

_DEFAULT_EXAMPLES = {"reference": 40, "cpu": 120, "triton": 8, "cuda": 60}
# Backends on which a non-finite key or value reaches exactly the rows that see it, even when other rows
# of the same tile do not (docs/design.md); the others are promised less.
PER_ROW_EXACT = ("reference", "cpu", "triton", "cuda")


def _examples(backend: str) -> int:
    n = int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "0"))
    if n <= 0:
        return _DEFAULT_EXAMPLES[backend]
    return max(1, n // 20) if backend == "triton" else n


def _fuzz_settings(backend: str):
    return settings(
        max_examples=_examples(backend),
        deadline=None,
        derandomize=os.environ.get("FASTATTN_FUZZ_RANDOM", "0") != "1",
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        # Shrinking through the Triton interpreter takes minutes; its failures print the unshrunk case.
        phases=[Phase.explicit, Phase.reuse, Phase.generate] if backend == "triton" else list(Phase),
    )


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    B: int
    Hkv: int
    group: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    layout: str  # contiguous | bhld (a (B, L, H, D) view) | k_transposed (non-unit last stride) | sliced
    band: str  # none | causal | window
    window: tuple[int, int]
    alibi: bool
    softcap: float
    mask: str  # none | bool | bool_padding | additive | additive_inf | additive_min
    mask_shape: str  # full | broadcast
    mask_grad: bool
    block: str  # none | causal | window | document | prefix | dense
    block_size: tuple[int, int]
    key_lengths: bool
    query_lengths: bool
    dropout_p: float
    lse_grad: bool
    poison: str  # none | hidden | empty_tiles | some_rows (backends exact per row and key: reference, cpu)
    seed: int


@st.composite
def cases(draw, backend: str) -> Case:
    tiny = backend == "triton"  # the interpreter is slow: tiny shapes, fp32/fp16 (no bf16 dot there)
    # The CUDA kernels: fp16/bf16, head dims 64 and 128, BlockMask blocks in multiples of 64; lengths
    # past one tile so that interior and edge tiles both occur.
    gpu = backend == "cuda"
    dtype = draw(st.sampled_from([torch.float32, torch.float16] if tiny else
                                 [torch.bfloat16, torch.float16] if gpu else
                                 [torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    L_max = 20 if tiny else 300 if gpu else 40
    Lq = draw(st.integers(0, L_max))
    Lk = draw(st.integers(0, L_max))
    D = draw(st.sampled_from([16, 24, 40] if tiny else [64, 128] if gpu else [1, 3, 8, 16, 17, 40]))
    Dv = D if gpu or draw(st.booleans()) else draw(st.sampled_from([16, 24] if tiny else [2, 8, 24]))
    block = "none"
    block_size = (0, 0)
    if Lq and Lk and draw(st.integers(0, 3)) == 0:
        block = draw(st.sampled_from(["causal", "window", "document", "dense"] + (["prefix"] if Lq == Lk else [])))
        sizes = [16, 32] if tiny else [64, 128] if gpu else [1, 3, 4, 8, 16]
        block_size = (draw(st.sampled_from(sizes)), draw(st.sampled_from(sizes)))
    mask = draw(st.sampled_from(["none", "none", "bool", "bool_padding", "additive", "additive_inf", "additive_min"]))
    dropout_p = 0.3 if draw(st.integers(0, 4)) == 0 else 0.0
    return Case(
        dtype=dtype,
        B=draw(st.integers(1, 2)),
        Hkv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2] if tiny else [1, 2, 3])),
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
        layout=draw(st.sampled_from(["contiguous", "bhld", "k_transposed", "sliced"])),
        band=draw(st.sampled_from(["none", "none", "causal", "window"])),
        window=(draw(st.integers(-1, 8)), draw(st.integers(-1, 8))),
        alibi=draw(st.integers(0, 3)) == 0,
        softcap=draw(st.sampled_from([0.0, 0.0, 0.0, 2.5, 20.0])),
        mask=mask,
        mask_shape=draw(st.sampled_from(["full", "broadcast"])),
        mask_grad=mask.startswith("additive") and draw(st.booleans()),
        block=block,
        block_size=block_size,
        key_lengths=draw(st.integers(0, 3)) == 0,
        query_lengths=draw(st.integers(0, 4)) == 0,
        dropout_p=dropout_p,
        lse_grad=draw(st.booleans()),
        poison=draw(st.sampled_from(["none", "none", "hidden", "empty_tiles"]
                                    + (["some_rows"] if backend in PER_ROW_EXACT else []))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensor(shape, dtype, layout: str, generator, *, transpose_last=False) -> torch.Tensor:
    """Random ``(B, H, L, D)`` data in the physical layout ``layout``."""
    B, H, L, D = shape
    if layout == "bhld":
        t = torch.randn(B, L, H, D, generator=generator).transpose(1, 2)
    elif layout == "sliced":  # rows of a wider tensor, and every other column (non-unit last stride)
        wide = torch.randn(B, H, L, 2 * D + 1, generator=generator)
        t = wide[..., 1 : 2 * D + 1 : 2] if transpose_last else wide[..., :D]
    elif layout == "k_transposed" and transpose_last:
        t = torch.randn(B, H, D, L, generator=generator).transpose(-1, -2)
    else:
        t = torch.randn(B, H, L, D, generator=generator)
    return t.to(dtype)


def build(case: Case, device: str = "cpu"):
    """``(q, k, v, kwargs)`` for ``fastattn.attention`` (leaves that require grad), drawn on the CPU
    and moved to ``device``."""
    g = torch.Generator().manual_seed(case.seed)
    B, Hq, Hkv, Lq, Lk = case.B, case.Hkv * case.group, case.Hkv, case.Lq, case.Lk
    q = _tensor((B, Hq, Lq, case.D), case.dtype, case.layout, g)
    k = _tensor((B, Hkv, Lk, case.D), case.dtype, case.layout, g, transpose_last=True)
    v = _tensor((B, Hkv, Lk, case.Dv), case.dtype, case.layout, g, transpose_last=case.layout == "sliced")
    kwargs = {}
    if case.band == "causal":
        kwargs["causal"] = True
    elif case.band == "window":
        kwargs["window"] = case.window
    if case.alibi:
        kwargs["alibi_slopes"] = torch.rand(Hq, generator=g) * 0.5
    if case.softcap:
        kwargs["softcap"] = case.softcap
    shape = (B, Hq, Lq, Lk) if case.mask_shape == "full" else (1, 1, Lq, Lk)
    if case.mask in ("bool", "bool_padding"):
        if case.mask == "bool_padding":  # Hugging Face style: whole key columns hidden per batch
            shape = (B, 1, 1, Lk)
        kwargs["attn_mask"] = torch.rand(shape, generator=g) < 0.7
    elif case.mask.startswith("additive"):
        mask = torch.randn(shape, generator=g).to(case.dtype)
        hidden = torch.rand(shape, generator=g) < 0.3
        if case.mask == "additive_inf":
            mask = mask.masked_fill(hidden, float("-inf"))
        elif case.mask == "additive_min":  # Hugging Face fills padding with the dtype's minimum
            mask = torch.zeros(shape, dtype=case.dtype).masked_fill(hidden, torch.finfo(case.dtype).min)
            if Lq:
                mask[..., 0, :] = torch.finfo(case.dtype).min  # a fully masked row: torch gives the mean of V
        kwargs["attn_mask"] = mask.requires_grad_(case.mask_grad)
    if case.block != "none":
        bs = case.block_size
        if case.block == "causal":
            kwargs["block_mask"] = masks.causal(Lq, Lk, bs)
        elif case.block == "window":
            kwargs["block_mask"] = masks.sliding_window(Lq, Lk, left=case.window[0], right=max(case.window[1], 0),
                                                         block_size=bs)
        elif case.block == "document":
            ids_q = torch.sort(torch.randint(-1, 3, (B, Lq), generator=g)).values
            ids_k = torch.sort(torch.randint(-1, 3, (B, Lk), generator=g)).values
            kwargs["block_mask"] = masks.document(ids_q, ids_k, block_size=bs)
        elif case.block == "prefix":
            kwargs["block_mask"] = masks.prefix_lm(Lq, int(torch.randint(0, Lq + 1, (1,), generator=g)), bs)
        else:
            dense = torch.rand(1, Hq, Lq, Lk, generator=g) < 0.6
            dense[..., : max(1, Lq // 3), :] = False  # some empty tiles
            kwargs["block_mask"] = fastattn.BlockMask.from_dense(dense, block_size=bs)
    if case.key_lengths:
        kwargs["key_lengths"] = torch.randint(0, Lk + 1, (B,), generator=g)
    if case.query_lengths:
        kwargs["query_lengths"] = torch.randint(0, Lq + 1, (B,), generator=g)
    if case.dropout_p:
        kwargs["dropout_p"] = case.dropout_p
    if device != "cpu":
        q, k, v = (t.to(device) for t in (q, k, v))
        for key, val in kwargs.items():
            if isinstance(val, torch.Tensor):
                kwargs[key] = val.detach().to(device).requires_grad_(val.requires_grad)
            elif isinstance(val, fastattn.BlockMask):
                kwargs[key] = val.to(device)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kwargs


def _poisoned(case: Case, q, k, v, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Copies of ``k``, ``v`` with NaN/Inf in keys rows cannot see, and the bool ``(B, Hq, Lq)``
    rows whose results must stay those of the clean inputs (None: every row).

    ``hidden``: keys no query row of the (batch, kv head) sees. ``some_rows``: those, and the key that
    the fewest rows see (but some do); only the rows that see none of them are checked. ``empty_tiles``: a key block that is
    empty for some query blocks of the BlockMask; only those blocks' rows are checked.
    """
    inputs = normalize(q, k, v, **{key: val for key, val in kwargs.items() if key != "dropout_p"})
    B, Hkv, Lk = k.shape[:3]
    Hq, Lq = q.shape[1], q.shape[2]
    rows = None
    if case.poison == "empty_tiles" and "block_mask" in kwargs:
        bm = kwargs["block_mask"]
        layout = bm.layout.expand(B, Hq, *bm.layout.shape[2:])
        empty = layout == fastattn.block_mask.EMPTY  # (B, Hq, nQB, nKB)
        # A key block empty for some query block of every head of some kv group.
        per_kv = empty.view(B, Hkv, case.group, *empty.shape[2:]).all(dim=2)  # (B, Hkv, nQB, nKB)
        candidates = per_kv.any(dim=2).nonzero()
        if candidates.numel():
            b, hk, kb = candidates[0].tolist()
            bq, bk = bm.block_size
            poison = torch.zeros(B, Hkv, Lk, dtype=torch.bool, device=k.device)
            poison[b, hk, kb * bk : (kb + 1) * bk] = True
            clean_blocks = per_kv[b, hk, :, kb]  # (nQB,)
            rows = torch.ones(B, Hq, Lq, dtype=torch.bool, device=k.device)
            rows[b, hk * case.group : (hk + 1) * case.group] = clean_blocks.repeat_interleave(bq)[:Lq]
        else:
            poison = torch.zeros(B, Hkv, Lk, dtype=torch.bool, device=k.device)
    else:
        seen = reference.visible_mask(inputs).expand(B, Hq, Lq, Lk)
        viewers = seen.reshape(B, Hkv, case.group, Lq, Lk).sum(dim=(2, 3))  # (B, Hkv, Lk)
        poison = viewers == 0
        if case.poison == "some_rows" and Lk:
            fewest = torch.where(viewers > 0, viewers, Hq * Lq + 1).argmin(dim=-1, keepdim=True)  # (B, Hkv, 1)
            poison |= torch.zeros_like(poison).scatter_(-1, fewest, True) & (viewers > 0)
            sees_poison = seen & poison.repeat_interleave(case.group, dim=1)[:, :, None, :]
            rows = ~sees_poison.any(dim=-1)
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[poison] = float("nan")
    vp[poison] = float("inf")
    vp[..., : max(1, vp.shape[-1] // 2)][poison] = float("nan")
    return kp.requires_grad_(), vp.requires_grad_(), rows


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    return value


def _check(name, got, ref32, ref_lp, floor, extra=None):
    """The tolerance rule, where -inf entries (lse of rows that see nothing) must match exactly;
    ``extra``: a bound allowed on top, element by element (or None)."""
    neg_inf = ref32 == float("-inf")
    assert torch.equal(got.detach() == float("-inf"), neg_inf), f"{name}: -inf entries differ from the reference"
    assert_close_to_reference(name, got[~neg_inf], ref32[~neg_inf], ref_lp[~neg_inf], atol_floor=floor,
                              extra=None if extra is None else extra[~neg_inf])


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _takes_delta_from_rounded_out(backend: str, case: Case) -> bool:
    """Whether the backward takes ``delta`` from the rounded 16-bit output (the Triton backend when
    no mask gradient is asked; docs/perf-notes.md), so :func:`delta_rounding_bound` applies."""
    return backend == "triton" and case.dtype in (torch.float16, torch.bfloat16) and not case.mask_grad


def check_case(backend: str, case: Case, delta_term: bool | None = None) -> None:
    """Check one configuration; ``delta_term`` adds :func:`delta_rounding_bound` to dq and dk's
    allowance (None: where :func:`_takes_delta_from_rounded_out` says it applies)."""
    if delta_term is None:
        delta_term = _takes_delta_from_rounded_out(backend, case)
    q, k, v, kwargs = build(case, _device(backend))
    leaves = [q, k, v]
    mask = kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.requires_grad:
        leaves.append(mask)
    run_k, run_v, rows = k, v, None
    if case.poison != "none":
        run_k, run_v, rows = _poisoned(case, q, k, v, kwargs)
    run_leaves = [q, run_k, run_v, *leaves[3:]]

    torch.manual_seed(case.seed)
    out, lse = fastattn.attention(q, run_k, run_v, backend=backend, return_lse=True, **kwargs)
    ref_kwargs = dict(kwargs)
    if case.dropout_p:
        torch.manual_seed(case.seed)
        seed = reference.draw_seed()
        inputs = normalize(q, k, v, **kwargs)
        ref_kwargs["dropout_keep"] = fastattn.get_backend(backend).dropout_keep_mask(inputs, seed)

    hp = high_precision(case.dtype)
    hp_leaves = [t.detach().to(hp).requires_grad_() for t in leaves]
    lp_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    hp_kwargs = {key: _cast(val, hp) for key, val in ref_kwargs.items()}
    lp_kwargs = dict(ref_kwargs)
    if len(leaves) == 4:
        hp_kwargs["attn_mask"], lp_kwargs["attn_mask"] = hp_leaves[3], lp_leaves[3]
    ref32 = reference.attention(*hp_leaves[:3], return_lse=True, **hp_kwargs)
    ref_lp = reference.attention(*lp_leaves[:3], return_lse=True, **lp_kwargs)

    def select(t, per_row=True):
        return t if rows is None or not per_row else t[rows]

    floor = ATOL_FLOOR[case.dtype]
    _check("out", select(out), select(ref32[0]), select(ref_lp[0]), floor)
    # lse is float32 on every backend (a float64 row at float64's minimum is -inf there).
    _check("lse", select(lse), select(ref32[1].float()), select(ref_lp[1].float()), max(floor, 1e-5))

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(out)
    outputs, grads_out = [out], [dout]
    if case.lse_grad:
        dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(case.seed + 2)).to(lse)
        outputs.append(lse)
        grads_out.append(dlse)
    got = torch.autograd.grad(outputs, run_leaves, grads_out)
    want32 = torch.autograd.grad([ref32[i] for i in range(len(outputs))], hp_leaves, [g.to(hp) for g in grads_out])
    want_lp = torch.autograd.grad([ref_lp[i] for i in range(len(outputs))], lp_leaves, grads_out)
    extra = {}
    if delta_term:
        extra["dq"], extra["dk"] = delta_rounding_bound(
            q, k, v, out, dout, ref_kwargs.get("dropout_keep"),
            **{key: val for key, val in kwargs.items() if key != "dropout_keep"})
    names = ("dq", "dk", "dv", "dmask")
    for name, g_, w32, wlp in zip(names, got, want32, want_lp):
        if rows is not None and name != "dq":
            continue  # rows that see the poisoned block legitimately carry NaN into dk, dv, dmask
        bound = extra.get(name)
        _check(name, select(g_), select(w32), select(wlp), floor, None if bound is None else select(bound))


@pytest.mark.parametrize(
    "backend",
    ["reference", "cpu", pytest.param("triton", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)],
)
def test_fuzz_against_reference(backend):
    if fastattn.get_backend(backend).unavailable_reasons():
        pytest.skip(f"{backend}: {fastattn.get_backend(backend).unavailable_reasons()}")

    log = os.environ.get("FASTATTN_FUZZ_LOG")  # one line per configuration, for the long runs' counts

    @_fuzz_settings(backend)
    @given(case=cases(backend))
    def run(case):
        q, k, v, kwargs = build(case, _device(backend))
        inputs = normalize(q, k, v, **kwargs)
        if fastattn.get_backend(backend).not_supported_reasons(inputs):
            return
        try:
            check_case(backend, case)
        except Exception as error:
            if log:
                with open(log, "a") as f:
                    f.write(f"{backend} FAIL {case} {type(error).__name__}: {str(error)[:300]!r}\n")
            raise
        if log:
            with open(log, "a") as f:
                f.write(f"{backend} ok poison={case.poison} dtype={case.dtype}\n")

    run()


# ----------------------------------------------------------------------------- named regression tests
# One per finding of issue 16 (numbered as there), on the backends this machine runs.

BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)]


def _usable(backend: str) -> None:
    reasons = fastattn.get_backend(backend).unavailable_reasons()
    if reasons:
        pytest.skip(f"{backend}: {reasons}")


def test_1_sdpa_accepts_a_key_with_non_unit_last_stride():
    q = v = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 2, 16, 8).transpose(-1, -2)  # k.stride(-1) == 8
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v), want)
    for backend in ("reference", "cpu"):
        torch.testing.assert_close(fastattn.attention(q, k, v, backend=backend), want)


@pytest.mark.parametrize("Lq", [0, 3])
def test_2_reference_backend_without_keys_returns_zeros_and_minus_inf_lse(Lq):
    q = torch.randn(1, 2, Lq, 8, requires_grad=True)
    k = torch.randn(1, 2, 0, 8, requires_grad=True)
    v = torch.randn(1, 2, 0, 8, requires_grad=True)
    for backend in ("reference", "cpu"):
        out, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
        assert torch.equal(out, torch.zeros(1, 2, Lq, 8))
        assert torch.equal(lse, torch.full((1, 2, Lq), float("-inf")))
        dq, = torch.autograd.grad(out.sum(), q)
        assert torch.equal(dq, torch.zeros_like(q))


def test_3_reference_float16_large_inputs_do_not_overflow():
    q = k = torch.full((1, 1, 4, 128), 24.0, dtype=torch.float16)
    v = torch.randn(1, 1, 4, 128, dtype=torch.float16)
    out, lse = fastattn.attention(q, k, v, backend="reference", return_lse=True)
    want, want_lse = fastattn.attention(q.float(), k.float(), v.float(), backend="reference", return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(reference.attention(q, k, v).float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_4_attn_mask_together_with_block_mask(backend, kind):
    _usable(backend)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    bm = masks.causal(40, 40, block_size=16)
    mask = torch.rand(1, 2, 40, 40) < 0.7 if kind == "bool" else torch.randn(1, 2, 40, 40)
    inputs = normalize(q, k, v, attn_mask=mask, block_mask=bm)
    assert not fastattn.get_backend(backend).not_supported_reasons(inputs)
    for name in ("triton", "cuda"):  # no backend refuses the combination any more
        assert not any("together" in r for r in fastattn.get_backend(name).not_supported_reasons(inputs))
    dense = bm.to_dense()
    combined = mask & dense if kind == "bool" else mask.masked_fill(~dense, float("-inf"))
    out = fastattn.attention(q, k, v, attn_mask=mask, block_mask=bm, backend=backend)
    want = reference.attention(q, k, v, attn_mask=combined)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(want.sum(), (q, k, v))
    for g_, w in zip(got, expected):
        torch.testing.assert_close(g_, w, atol=2e-5, rtol=2e-5)


def _poison_check(backend, q, k, v, poison_k, poison_v, rows=None, **kwargs):
    """Run with NaN in ``k[poison_k]`` and Inf/NaN in ``v[poison_v]``: every result of ``rows``
    (all rows by default) must equal the clean run's, with no NaN."""
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[poison_k] = float("nan")
    vp[poison_v] = float("inf")
    vp[..., :1][poison_v] = float("nan")
    leaves = [t.detach().clone().requires_grad_() for t in (q, kp, vp)]
    clean = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention(*leaves, backend=backend, return_lse=True, **kwargs)
    want, want_lse = fastattn.attention(*clean, backend=backend, return_lse=True, **kwargs)
    sel = (lambda t: t) if rows is None else (lambda t: t[:, :, rows])
    assert not torch.isnan(sel(out)).any(), "a hidden NaN reached the output"
    torch.testing.assert_close(sel(out), sel(want))
    torch.testing.assert_close(sel(lse), sel(want_lse))
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad((out * dout).sum(), leaves)
    wq, wk, wv = torch.autograd.grad((want * dout).sum(), clean)
    torch.testing.assert_close(sel(dq), sel(wq))
    if rows is None:
        torch.testing.assert_close(dk, wk)
        torch.testing.assert_close(dv, wv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_5_nan_past_key_lengths_never_reaches_a_row(backend):
    _usable(backend)
    q, k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 1, 37, 16), torch.randn(2, 1, 37, 16)
    lengths = torch.tensor([20, 33])
    hidden = torch.arange(37)[None, :] >= lengths[:, None]  # (B, Lk)
    poison = hidden[:, None, :].expand(2, 1, 37)
    _poison_check(backend, q, k, v, poison, poison, key_lengths=lengths, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_5_nan_under_a_padding_column_of_a_bool_mask_never_reaches_a_row(backend):
    _usable(backend)
    q, k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 23, 16), torch.randn(2, 2, 23, 16)
    keep = torch.rand(2, 1, 1, 23) < 0.6
    keep[..., 0] = True
    poison = (~keep[:, 0, 0, :])[:, None, :].expand(2, 2, 23)
    _poison_check(backend, q, k, v, poison, poison, attn_mask=keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_5_nan_outside_every_rows_window_never_reaches_a_row(backend):
    _usable(backend)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    # Rows sit at keys 36..39: a left window of 5 hides keys 0..30 from every row.
    poison = (torch.arange(40) < 31)[None, None, :].expand(1, 2, 40)
    _poison_check(backend, q, k, v, poison, poison, window=(5, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_5_nan_in_an_empty_block_mask_tile_never_reaches_its_rows(backend):
    _usable(backend)
    q, k, v = torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    layout = torch.tensor([[True, False, False, False], [True, True, False, False],
                           [True, True, True, False], [True, True, True, True]])
    bm = fastattn.BlockMask.from_layout(layout, block_size=16)
    poison = torch.zeros(1, 1, 64, dtype=torch.bool)
    poison[..., 48:] = True  # key block 3: empty for query blocks 0-2, full for block 3
    _poison_check(backend, q, k, v, poison, poison, rows=slice(0, 48), block_mask=bm)


MIXED_BACKENDS = BACKENDS


def _mixed_poison_check(backend, q, k, v, j, seen_by, **kwargs):
    """Poison key ``j`` (NaN in k, Inf/NaN in v), which the rows ``seen_by`` (bool ``(Lq,)``) see and the
    others of the same tiles do not: those others must keep the clean results, the seeing rows are NaN."""
    B, Hkv, Lk = k.shape[:3]
    poison = torch.zeros(B, Hkv, Lk, dtype=torch.bool)
    poison[..., j] = True
    assert seen_by.any() and not seen_by.all()
    _poison_check(backend, q, k, v, poison, poison, rows=~seen_by, **kwargs)
    kp = k.clone()
    kp[..., j, :] = float("nan")
    out = fastattn.attention(q, kp, v, backend=backend, **kwargs)
    assert torch.isnan(out[:, :, seen_by]).all()  # a visible NaN propagates to the rows that see it
    vp = v.clone()
    vp[..., j, :] = float("inf")
    out = fastattn.attention(q, k, vp, backend=backend, **kwargs)
    assert torch.isnan(out[:, :, seen_by]).all() and torch.isfinite(out[:, :, ~seen_by]).all()


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
def test_5_nan_in_a_key_on_the_causal_diagonal_never_reaches_the_rows_before_it(backend):
    _usable(backend)
    # Key 37 sits in the same key tile as keys 0..36, which rows 0..36 see: only rows 37.. see key 37.
    q, k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 1, 40, 16), torch.randn(2, 1, 40, 16)
    _mixed_poison_check(backend, q, k, v, 37, torch.arange(40) >= 37, causal=True)


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
def test_5_nan_at_a_window_edge_never_reaches_the_rows_outside_the_window(backend):
    _usable(backend)
    q, k, v = torch.randn(1, 2, 33, 16), torch.randn(1, 2, 33, 16), torch.randn(1, 2, 33, 16)
    i = torch.arange(33)
    _mixed_poison_check(backend, q, k, v, 20, (i - 20).abs() <= 3, window=(3, 3))


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
def test_5_nan_in_a_partial_block_mask_tile_never_reaches_the_rows_it_hides_from(backend):
    _usable(backend)
    # Documents [0, 21) and [21, 40): key 25 shares the partial tile (query block 1, key block 1) with
    # rows 16..20, which belong to the first document and do not see it.
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    doc = (torch.arange(40) >= 21).long()[None]
    bm = masks.document(doc, causal=True, block_size=16)
    i = torch.arange(40)
    _mixed_poison_check(backend, q, k, v, 25, i >= 25, block_mask=bm)


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_5_nan_under_a_mixed_column_of_a_bool_mask_never_reaches_the_rows_it_hides_from(backend, dtype):
    _usable(backend)
    q, k, v = (torch.randn(1, 3, 29, 24, dtype=dtype) for _ in range(3))
    keep = torch.rand(1, 1, 29, 29) < 0.7
    keep[..., 11] = torch.arange(29) % 3 == 0  # key 11: seen by every third row only
    _mixed_poison_check(backend, q, k, v, 11, keep[0, 0, :, 11], attn_mask=keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_6_a_nan_or_inf_query_row_is_nan_not_zero(backend, dtype):
    _usable(backend)
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=dtype) for _ in range(3))
    q, k = q.clone(), k.clone()
    q[0, 0, 1, 3] = float("nan")
    q[0, 0, 2, 0] = float("inf")
    k[..., 0] = k[..., 0].abs() + 0.1  # so that row's scores are +inf (an all -inf row would just see nothing)
    out, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
    assert torch.isnan(out[0, 0, 1:3]).all() and torch.isnan(lse[0, 0, 1:3]).all()
    assert torch.isfinite(out[0, 0, [0, 3]]).all() and torch.isfinite(lse[0, 0, [0, 3]]).all()


def test_6_nan_alibi_slopes_are_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        fastattn.attention(q, q, q, alibi_slopes=torch.tensor([0.5, float("nan")]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_7_fully_masked_row_at_the_dtype_minimum_returns_the_mean_of_v(backend, dtype):
    _usable(backend)
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 dot (bf16 is covered on the GPU)")
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=dtype) for _ in range(3))
    mask = torch.zeros(1, 1, 5, 5, dtype=dtype)
    mask[..., 1, :] = torch.finfo(dtype).min  # row 1 sees every key at the minimum
    mask[..., 3, 2:] = torch.finfo(dtype).min
    out = fastattn.attention(q, k, v, attn_mask=mask, backend=backend)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    # float32's minimum swallows the scores (the row is the mean of V); float16's and bfloat16's do not
    # in float32 arithmetic, where torch and the reference compute (the row is its unmasked softmax).
    if dtype == torch.float32:
        torch.testing.assert_close(out[0, :, 1], v.mean(dim=2)[0])
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)


def test_8_block_mask_builders_say_they_need_a_real_device():
    with pytest.raises(ValueError, match="meta"):
        masks.causal(8, 8, block_size=16, device="meta")


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("Lq, Lk", [(64, 64), (5, 9), (9, 5)])
def test_9_torch_causal_bias_is_the_matching_causal_alignment(variant, Lq, Lk):
    from torch.nn.attention import bias

    q = torch.randn(2, 3, Lq, 16)
    k, v = torch.randn(2, 3, Lk, 16), torch.randn(2, 3, Lk, 16)
    mask = getattr(bias, f"causal_{variant}")(Lq, Lk)
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert type(out) is torch.Tensor
    repr(out)
    dense = mask._materialize()
    want = reference.attention(q, k, v, attn_mask=dense)  # 0 where a row sees nothing (torch gives NaN)
    torch.testing.assert_close(out, want)


def test_10_compile_fullgraph_with_a_block_mask_not_used_eagerly():
    bm = masks.causal(32, 32, block_size=16)
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: fastattn.attention(q, k, v, block_mask=bm), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), reference.attention(q, k, v, causal=True))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda q: fastattn.scaled_dot_product_attention(q, q, q, attn_mask=q[..., 0], is_causal=True), id="causal-and-mask"),
        pytest.param(lambda q: fastattn.scaled_dot_product_attention(q, q.double(), q), id="dtypes"),
        pytest.param(lambda q: fastattn.scaled_dot_product_attention(q[0, 0, 0], q[0, 0, 0], q[0, 0, 0]), id="1-D"),
        pytest.param(lambda q: fastattn.scaled_dot_product_attention(q, q[:, :1], q[:, :1]), id="gqa-without-flag"),
    ],
)
def test_11_sdpa_drop_in_raises_what_torch_raises(call):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError):
        call(q)


def test_11_multihead_attention_raises_assertion_errors_like_torch():
    with pytest.raises(AssertionError):
        fastattn.nn.MultiheadAttention(10, 3)
    mha = fastattn.nn.MultiheadAttention(8, 2)
    with pytest.raises(AssertionError):
        mha(torch.randn(3, 1, 6), torch.randn(3, 1, 8), torch.randn(3, 1, 8))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_12_multihead_attention_with_a_half_precision_in_proj_bias_and_double_input(batch_first, training):
    # torch's own test (test_multihead_attn_fast_path_query_and_bias_have_different_dtypes) runs this with
    # batch_first=True: torch then adds the bias after the product, in place, in the product's dtype. (With
    # batch_first=False torch 2.14's module raises "self and mat2 must have the same dtype"; fastattn's runs.)
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(4, 4, batch_first=True, dtype=torch.double).train(training)
    theirs.in_proj_bias = torch.nn.Parameter(torch.randn(12).half())
    ours = fastattn.nn.MultiheadAttention(4, 4, batch_first=batch_first, dtype=torch.double).train(training)
    ours.in_proj_bias = torch.nn.Parameter(theirs.in_proj_bias.detach().clone())
    ours.load_state_dict(theirs.state_dict())
    assert ours.in_proj_bias.dtype == torch.half
    query = torch.randn(3, 4, 4, dtype=torch.double)  # (N, L, E)
    with torch.no_grad():
        want, want_weights = theirs(query, query, query)
        x = query if batch_first else query.transpose(0, 1)
        got, weights = ours(x, x, x)
    assert got.dtype == torch.double
    torch.testing.assert_close(got if batch_first else got.transpose(0, 1), want)
    torch.testing.assert_close(weights, want_weights)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_15_lse_gradient_gradcheck_float64(backend):
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 8, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2)

    def f(q, k, v):
        out, lse = fastattn.attention(q, k, v, causal=True, alibi_slopes=slopes, softcap=3.0, backend=backend,
                                      return_lse=True)
        return out, lse

    def out_only(q, k, v):
        return f(q, k, v)[0]

    def lse_only(q, k, v):
        return f(q, k, v)[1]

    torch.autograd.gradcheck(out_only, (q, k, v))
    # lse is float32 by contract, so finite differences need a larger step and tolerance ...
    torch.autograd.gradcheck(lse_only, (q, k, v), eps=1e-3, atol=2e-3, rtol=1e-3)
    # ... and the exact check is against the float64 reference's autograd, with lse and out together.
    dout, dlse = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64)
    out, lse = f(q, k, v)
    got = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    out64, lse64 = reference.attention(q, k, v, causal=True, alibi_slopes=slopes, softcap=3.0, return_lse=True)
    want = torch.autograd.grad((out64 * dout).sum() + (lse64 * dlse).sum(), (q, k, v))
    for g_, w in zip(got, want):  # dlse reaches the op as float32 (the op contract), hence 1e-6
        torch.testing.assert_close(g_, w, atol=1e-6, rtol=1e-6)


@pytest.mark.interpreter
def test_15_triton_lse_gradient_matches_reference():
    _usable("triton")
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    dlse = torch.randn(1, 2, 17)
    out, lse = fastattn.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    got = torch.autograd.grad((lse * dlse).sum() + out.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = reference.attention(q64, k64, v64, causal=True, return_lse=True)
    want = torch.autograd.grad((lse64 * dlse.double()).sum() + out64.sum(), (q64, k64, v64))
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_.double(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_13_output_and_gradients_are_written_in_the_inputs_layout(backend):
    _usable(backend)
    B, L, H, D = 2, 7, 3, 16
    leaves = [torch.randn(B, L, H, D, requires_grad=True) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    out = fastattn.attention(q, k, v, causal=True, backend=backend)
    assert out.stride() == q.stride()  # (B, L, H, D) memory: no copy to get back there
    want = reference.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    for g_, leaf, w in zip(torch.autograd.grad(out, leaves, dout), leaves, torch.autograd.grad(want, leaves, dout)):
        assert g_.stride() == leaf.stride()  # the op's gradient was in the view's layout already
        torch.testing.assert_close(g_, w)
    out = fastattn.attention(q.contiguous(), k, v, backend=backend)
    assert out.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_14_gradient_of_a_bias_per_query_is_zero_in_low_precision(backend, dtype):
    _usable(backend)
    # A bias constant along the keys shifts a row's scores, which softmax ignores: its gradient is
    # exactly 0. It is a sum of Lk score gradients that cancel, so it is only ~0 when those are
    # accumulated in float32 (delta included) and rounded once -- before, 3e-3 to 3e-2 here.
    q, k, v = (torch.randn(2, 3, 33, 40, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, 33, 1, dtype=dtype, requires_grad=True)
    out = fastattn.attention(q, k, v, attn_mask=bias, causal=True, backend=backend)
    dbias, = torch.autograd.grad(out, bias, torch.randn_like(out))
    assert dbias.dtype == dtype and dbias.shape == bias.shape
    assert dbias.abs().max().item() < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_14_broadcast_mask_gradient_is_the_float32_sum_rounded_once(backend):
    _usable(backend)
    q, k, v = (torch.randn(2, 2, 24, 16, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 2, 1, 24, dtype=torch.bfloat16, requires_grad=True)  # per head and key
    out = fastattn.attention(q, k, v, attn_mask=bias, backend=backend)
    dout = torch.randn_like(out)
    dbias, = torch.autograd.grad(out, bias, dout)
    b32 = bias.detach().float().requires_grad_()
    want, = torch.autograd.grad(reference.attention(q.float(), k.float(), v.float(), attn_mask=b32), b32, dout.float())
    # Rounded once from a float32 sum: within one bf16 rounding (2^-8 relative) of the float32 gradient.
    torch.testing.assert_close(dbias.float(), want, atol=1e-5, rtol=2**-8)


def test_14_reference_backend_computes_low_precision_inputs_in_float32():
    # The ground truth of a bf16 call: every score, softmax and product in float32, rounded once at the end.
    q, k, v = (torch.randn(1, 2, 19, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.randn(1, 2, 19, 19, dtype=torch.bfloat16)
    kwargs = dict(causal=True, softcap=5.0, alibi_slopes=torch.tensor([0.3, 0.1]))
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, backend="reference", return_lse=True, **kwargs)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want, want_lse = reference.attention(q32, k32, v32, attn_mask=mask.float(), return_lse=True, **kwargs)
    assert torch.equal(out, want.bfloat16())
    assert torch.equal(lse, want_lse)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    expected = torch.autograd.grad(want, (q32, k32, v32), dout.float())
    for g_, w in zip(got, expected):
        torch.testing.assert_close(g_, w.bfloat16(), atol=0, rtol=2**-8)


def _backward_takes_delta_from_an_out_that_is_not_its_own(backend, op, with_mask_gradient=False):
    # Context parallelism passes each call the merged output of all calls (its rowsum(dout * out) is the
    # final softmax's delta): the bf16 kernel must use it, not its own float32 recomputation of out.
    # (Triton recomputes delta only when the mask's gradient is asked: with_mask_gradient.)
    q, k, v = (torch.randn(1, 2, 21, 16) for _ in range(3))
    mask = torch.zeros(1, 2, 21, 21) if with_mask_gradient else None
    out, lse = fastattn.attention(q, k, v, attn_mask=mask, causal=True, backend=backend, return_lse=True)
    merged, dout = 0.5 * out + 0.1, torch.randn_like(out)

    def bwd(dtype):
        t = [x.to(dtype) for x in (dout, q, k, v, merged)]
        m = None if mask is None else mask.to(dtype)
        return op(*t, lse, m, None, None, None, *[None] * 10, 0, 0, 16 ** -0.5, None, 0, 0.0, 0.0, 0,
                  with_mask_gradient)[:3]

    for got, want in zip(bwd(torch.bfloat16), bwd(torch.float32)):
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_14_cpu_backward_takes_delta_from_an_out_that_is_not_its_own():
    _backward_takes_delta_from_an_out_that_is_not_its_own("cpu", torch.ops.fastattn.attention_bwd)


@pytest.mark.interpreter
def test_14_triton_backward_takes_delta_from_an_out_that_is_not_its_own():
    _usable("triton")
    _backward_takes_delta_from_an_out_that_is_not_its_own("triton", fastattn.get_backend("triton").ops.bwd,
                                                          with_mask_gradient=True)


# Bugs the fuzzer found (each fixed; the case that found it is kept here).


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuzz_found_cpu_gradients_of_a_row_masked_entirely_at_the_dtype_minimum(dtype):
    # lse = min + log(n) rounds to min, so exp(S - lse) was 1 on every key instead of 1/n: dq was n times too big.
    q, k, v = (torch.randn(1, 2, 3, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 1, 3, 3, dtype=dtype)
    mask[..., 1, :] = torch.finfo(dtype).min
    slopes = torch.rand(2)
    out = fastattn.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, backend="cpu")
    want = reference.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    for g_, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g_, w)


def _check_rows_masked_at_a_huge_additive_value(backend, device, dtype, qkv_dtype, value, Lq, Lk, D, seed):
    """Rows with every key (or most keys) at `value` in a `dtype` additive mask, under ALiBi and GQA:
    out, lse and every gradient against the reference (the tolerance rule), out against torch's SDPA."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, Lq, D, generator=g)
    k, v = torch.randn(1, 1, Lk, D, generator=g), torch.randn(1, 1, Lk, D, generator=g)  # GQA
    fill = torch.finfo(dtype).min if value == "min" else value
    mask = torch.randn(1, 2, Lq, Lk, generator=g)
    mask[:, 0, 1, :] = fill  # row 1 of head 0: every key at the value
    mask[:, :, 3, 5:] = fill  # row 3: the value on most keys
    mask[:, 1, 19, :] = fill
    mask[:, 1, Lq - 10, :] = fill  # in the last query tile of the CUDA shapes
    slopes = torch.tensor([0.3, 0.7], device=device)  # distinct scores under the mask
    leaves = [t.to(device, qkv_dtype).requires_grad_() for t in (q, k, v)]
    leaves.append(mask.to(device, dtype).requires_grad_())
    out, lse = fastattn.attention(*leaves[:3], attn_mask=leaves[3], alibi_slopes=slopes, backend=backend,
                                  return_lse=True)
    hp = high_precision(qkv_dtype)
    hp_leaves = [t.detach().to(hp).requires_grad_() for t in leaves]
    lp_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref32 = reference.attention(*hp_leaves[:3], attn_mask=hp_leaves[3], alibi_slopes=slopes, return_lse=True)
    ref_lp = reference.attention(*lp_leaves[:3], attn_mask=lp_leaves[3], alibi_slopes=slopes, return_lse=True)
    floor = ATOL_FLOOR[qkv_dtype]
    _check("out", out, ref32[0], ref_lp[0], floor)
    _check("lse", lse, ref32[1].float(), ref_lp[1].float(), max(floor, 1e-5))
    if value == "min" and dtype != torch.float16:
        assert lse[0, 0, 1].item() < -3e38  # the reference's lse, not a floor's
    dout = torch.randn(out.shape, generator=g).to(device, qkv_dtype)
    got = torch.autograd.grad(out, leaves, dout)
    want32 = torch.autograd.grad(ref32[0], hp_leaves, dout.to(hp))
    want_lp = torch.autograd.grad(ref_lp[0], lp_leaves, dout)
    for name, g_, w32, wlp in zip(("dq", "dk", "dv", "dmask"), got, want32, want_lp):
        _check(name, g_, w32, wlp, floor)
    # And torch's SDPA agrees (rows that see nothing aside: torch gives NaN there). It adds ALiBi to the
    # mask first: at -1e5 float32 rounds scores to 2^-7, so the order shows at 1e-2; at -1e9 it rounds
    # in steps of 64, more than the ALiBi terms, so a row with every key at -1e9 is decided by that
    # order: those rows are left to the reference check above.
    distance = (torch.arange(Lq)[:, None] + (Lk - Lq) - torch.arange(Lk)).abs().to(device)  # bottom-right
    bias = leaves[3].detach().float() - slopes[:, None, None] * distance
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.detach().float().expand(1, 2, -1, D) for t in leaves[:3]), attn_mask=bias
    )
    seen = ~torch.isnan(sdpa)
    if value == -1e9:
        seen &= ~(leaves[3].detach() == leaves[3].detach().amin()).all(dim=-1, keepdim=True)
    torch.testing.assert_close(out.float()[seen], sdpa[seen], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("value", ["min", -1e9, -1e5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fuzz_found_triton_rows_masked_entirely_at_a_huge_additive_value(backend, dtype, value):
    # Triton clamped scores at -FLT_MAX / log2(e) in log2 units (lse -2.36e38 instead of -3.40e38 at
    # finfo(float32).min), and its backward took exp(S - lse) where lse = m + log(n) had lost log(n):
    # P = 1 instead of 1/n, dq n times too large (also at -1e9). At -1e5 float32 still resolves the
    # scores (the row is its unmasked softmax, as torch's SDPA gives), and the log2 rounding showed.
    # In float16, -1e9 and -1e5 round to -inf: those rows see nothing (0, lse = -inf).
    # Lq 21, Lk 37: several key blocks; one query block of the interpreter's tiles has no such row.
    _usable(backend)
    _check_rows_masked_at_a_huge_additive_value(backend, "cpu", dtype, dtype, value, Lq=21, Lk=37, D=16, seed=7)


@pytest.mark.interpreter
@pytest.mark.parametrize("Lq", [3, 21], ids=["decode-packed", "Lq21"])
def test_triton_split_kv_merges_rows_masked_entirely_at_the_dtype_minimum(Lq):
    # Each split's lse = min + log(l_s) rounds to min, so the merge weighted the splits equally instead
    # of by their key counts; with an additive mask the splits give (max, log2 sum) instead.
    _usable("triton")
    from fastattn.backends.triton import ensure_kernels_importable

    ensure_kernels_importable()
    from fastattn.triton_kernels.attention_fwd import MaskArgs, attention_fwd

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, Lq, 16, generator=g)
    k, v = torch.randn(1, 2, 70, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g)
    mask = torch.zeros(1, 4, Lq, 70)
    mask[:, :, 1, :] = torch.finfo(torch.float32).min
    mask[:, 1, 2, 30:] = -1e5
    want, want_lse = reference.attention(q.double(), k.double(), v.double(), attn_mask=mask.double(), return_lse=True)
    for splits in (1, 3):
        out, lse = attention_fwd(q, k, v, MaskArgs(attn_mask=mask), scale=16**-0.5, num_splits=splits)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse.float().double(), atol=1e-5, rtol=1e-6)


def test_fuzz_found_cpu_softcap_gradient_with_a_nan_key_past_key_lengths():
    # The softcap factor 1 - tanh^2 was NaN on the hidden key and multiplied into dS = 0.
    q, k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 11, 4), torch.randn(1, 1, 11, 4)
    poison = torch.zeros(1, 1, 11, dtype=torch.bool)
    poison[..., 6:] = True
    _poison_check("cpu", q, k, v, poison, poison, softcap=2.5, key_lengths=torch.tensor([6]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fuzz_found_empty_tensors_with_a_non_unit_last_stride(backend):
    # torch calls an empty tensor contiguous whatever its strides, so .contiguous() kept stride 2.
    q = torch.randn(1, 1, 0, 3)
    k = torch.randn(1, 1, 0, 3)
    v = torch.randn(1, 1, 0, 5)[..., ::2].requires_grad_()
    out = fastattn.attention(q, k, v, backend=backend)
    assert out.shape == (1, 1, 0, 3)
    out.sum().backward()


def test_fuzz_found_cpu_bf16_dq_of_a_row_with_one_visible_key():
    # The backward took delta = rowsum(dO * O) from the bf16-rounded output, so a row with one visible key
    # (dS exactly 0) got dq ~1e-2 instead of 0; delta now comes from O recomputed in float32.
    case = Case(dtype=torch.bfloat16, B=2, Hkv=1, group=2, Lq=38, Lk=6, D=40, Dv=40, layout="contiguous",
                band="window", window=(0, 0), alibi=True, softcap=0.0, mask="additive_inf", mask_shape="full",
                mask_grad=True, block="none", block_size=(0, 0), key_lengths=True, query_lengths=True,
                dropout_p=0.3, lse_grad=False, poison="none", seed=0)
    check_case("cpu", case)


# The one open Triton family: float16, a row with at most one visible key, dropout, an lse gradient.
_TRITON_DELTA_CASE = Case(dtype=torch.float16, B=1, Hkv=1, group=1, Lq=32, Lk=1, D=16, Dv=16, layout="contiguous",
                          band="window", window=(2, 3), alibi=False, softcap=2.5, mask="none", mask_shape="full",
                          mask_grad=False, block="none", block_size=(0, 0), key_lengths=False, query_lengths=False,
                          dropout_p=0.3, lse_grad=True, poison="none", seed=19)


@pytest.mark.interpreter
def test_fuzz_found_triton_fp16_dq_of_a_row_with_one_visible_key_is_within_the_delta_rounding_bound():
    # The Triton 16-bit backward takes delta = rowsum(dO * O) from the rounded output unless a mask gradient
    # is asked (docs/perf-notes.md). A row that sees one key keeps only that rounding in dS, where the
    # reference is exact, so the plain rule fails (dq error 1.87e-3 > 1.23e-3 allowed) and the fuzzer adds
    # tests/tolerance.py's delta_rounding_bound for exactly this backend and case.
    _usable("triton")
    with pytest.raises(AssertionError, match="dq: max error"):
        check_case("triton", _TRITON_DELTA_CASE, delta_term=False)
    check_case("triton", _TRITON_DELTA_CASE)

    # The bound is small: within [2^-11, 2^-9] of scale * sum_d |dO| |O| (P |k|) on every row that sees a key
    # (2 u = 2^-10 for float16, as out holds two roundings: P~ before P~ V, and out itself).
    q, k, v, kwargs = build(_TRITON_DELTA_CASE)
    torch.manual_seed(0)
    out = fastattn.attention(q, k, v, backend="triton", **kwargs)
    torch.manual_seed(0)
    keep = fastattn.get_backend("triton").dropout_keep_mask(normalize(q, k, v, **kwargs), reference.draw_seed())
    dout = torch.randn_like(out)
    dq_bound, dk_bound = delta_rounding_bound(q, k, v, out, dout, keep, **kwargs)
    inputs = normalize(*(t.detach().double() for t in (q, k, v)), **kwargs)
    p, _ = reference.probabilities(inputs)
    o_abs = (p * keep / (1 - inputs.dropout_p)) @ v.detach().double().abs()
    size = inputs.scale * (dout.double().abs() * o_abs).sum(-1, keepdim=True) * (p @ k.detach().double().abs())
    seen = size > 0
    assert seen.any() and (dq_bound[~seen] == 0).all() and (dk_bound >= 0).all()
    ratio = dq_bound[seen] / size[seen]
    assert (ratio >= 2**-11).all() and (ratio <= 2**-9).all(), (ratio.min(), ratio.max())

    # With the mask's gradient asked, the float32 delta pass removes this rounding: the plain rule holds
    # (the same mask without its gradient still fails it).
    with_mask = dataclasses.replace(_TRITON_DELTA_CASE, mask="additive")
    with pytest.raises(AssertionError, match="dq: max error"):
        check_case("triton", with_mask, delta_term=False)
    check_case("triton", dataclasses.replace(with_mask, mask_grad=True), delta_term=False)



@pytest.mark.parametrize("backend", ["cpu"])
def test_14_varlen_bf16_dq_is_zero_when_a_sequence_has_one_key_vector(backend):
    # The cpu varlen backward took delta from the bf16-rounded output like the dense one did. With every
    # key of a sequence equal, dq_i = scale * k * sum_j dS_ij = scale * k * (rowsum(P * dP) - delta) is
    # exactly 0 in float32 arithmetic; delta from the rounded out (a mean of bf16 values, not one itself)
    # left ~1e-2 there. delta now comes from O in float32 (a forward pass). The Triton backwards keep
    # out's rounding in delta unless a mask gradient is asked (docs/perf-notes.md, "delta pass").
    _usable(backend)
    cu = torch.tensor([0, 7, 20, 37], dtype=torch.int32)
    q, v = (torch.randn(37, 2, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    per_seq = torch.randn(3, 2, 24, dtype=torch.bfloat16)
    k = per_seq.repeat_interleave(torch.diff(cu).long(), dim=0).requires_grad_()
    out = fastattn.varlen_attention(q, k, v, cu, cu, 17, 17, causal=True, backend=backend)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert dq.abs().max().item() < 1e-4
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = fastattn.varlen_attention(q32, k32, v32, cu, cu, 17, 17, causal=True, backend="cpu")
    for got, w in zip((dk, dv), torch.autograd.grad(want, (k32, v32), dout.float())):
        torch.testing.assert_close(got.float(), w, atol=2e-2, rtol=2e-2)


# CUDA (issue 16 item 7): additive masks at huge values, on the GPU.


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("value", ["min", -1e9, -1e5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_rows_masked_entirely_at_a_huge_additive_value(dtype, value, D):
    # The CUDA kernels floored masked scores at -65536: right outputs at the minimum, but lse there was
    # -65536 + log n instead of the reference's -3.40e38, and at -1e5 (float32 still resolves the
    # scores: the row is its unmasked softmax) they gave equal weights. Now scores stay unfloored in
    # natural units and the backward recomputes (max, sum) of rows with |lse| > 1024. The CUDA kernels
    # take float16/bfloat16 inputs: `dtype` is the mask's, with bfloat16 q, k, v for a float32 mask.
    # Lq 150: two query tiles of the forward (the second one of head 0 has no such row).
    _usable("cuda")
    qkv_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    _check_rows_masked_at_a_huge_additive_value("cuda", "cuda", dtype, qkv_dtype, value, Lq=150, Lk=200, D=D, seed=11)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_fully_masked_row_at_the_dtype_minimum_returns_the_mean_of_v(dtype):
    # test_7's check on the CUDA backend (bfloat16 q, k, v under a float32 mask), with the
    # deterministic backward too: a padding row's gradients match the reference's.
    _usable("cuda")
    qkv_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    q, k, v = (torch.randn(2, 2, 37, 64, device="cuda", dtype=qkv_dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, 37, 37, device="cuda", dtype=dtype)
    mask[..., 1, :] = torch.finfo(dtype).min
    mask[0, ..., 3, 2:] = torch.finfo(dtype).min
    out = fastattn.attention(q, k, v, attn_mask=mask, backend="cuda")
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    if dtype != torch.float16:  # float16's minimum does not absorb float32 scores
        torch.testing.assert_close(out[:, :, 1].float(), v.detach().float().mean(dim=2), atol=2e-2, rtol=0)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    dout = torch.randn_like(out)
    hp = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*hp, attn_mask=mask.double())
    want_grads = torch.autograd.grad(ref, hp, dout.double())
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            grads = torch.autograd.grad(fastattn.attention(q, k, v, attn_mask=mask, backend="cuda"), (q, k, v), dout)
        finally:
            torch.use_deterministic_algorithms(False)
        for name, g_, w in zip(("dq", "dk", "dv"), grads, want_grads):
            torch.testing.assert_close(g_.double(), w, atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")
