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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import masks, reference
from fastattn._inputs import normalize

from .tolerance import ATOL_FLOOR, assert_close_to_reference, high_precision

_DEFAULT_EXAMPLES = {"reference": 40, "cpu": 120, "triton": 8}


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
    poison: str  # none | hidden | empty_tiles
    seed: int


@st.composite
def cases(draw, backend: str) -> Case:
    tiny = backend == "triton"  # the interpreter is slow: tiny shapes, fp32/fp16 (no bf16 dot there)
    dtype = draw(st.sampled_from([torch.float32, torch.float16] if tiny else
                                 [torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    L_max = 20 if tiny else 40
    Lq = draw(st.integers(0, L_max))
    Lk = draw(st.integers(0, L_max))
    D = draw(st.sampled_from([16, 24, 40] if tiny else [1, 3, 8, 16, 17, 40]))
    Dv = D if draw(st.booleans()) else draw(st.sampled_from([16, 24] if tiny else [2, 8, 24]))
    block = "none"
    block_size = (0, 0)
    if Lq and Lk and draw(st.integers(0, 3)) == 0:
        block = draw(st.sampled_from(["causal", "window", "document", "dense"] + (["prefix"] if Lq == Lk else [])))
        sizes = [16, 32] if tiny else [1, 3, 4, 8, 16]
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
        poison=draw(st.sampled_from(["none", "none", "hidden", "empty_tiles"])),
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


def build(case: Case):
    """``(q, k, v, kwargs)`` for ``fastattn.attention`` (leaves that require grad)."""
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
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kwargs


def _poisoned(case: Case, q, k, v, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Copies of ``k``, ``v`` with NaN/Inf in keys rows cannot see, and the bool ``(B, Hq, Lq)``
    rows whose results must stay those of the clean inputs (None: every row).

    ``hidden``: keys no query row of the (batch, kv head) sees. ``empty_tiles``: a key block that is
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
            poison = torch.zeros(B, Hkv, Lk, dtype=torch.bool)
            poison[b, hk, kb * bk : (kb + 1) * bk] = True
            clean_blocks = per_kv[b, hk, :, kb]  # (nQB,)
            rows = torch.ones(B, Hq, Lq, dtype=torch.bool)
            rows[b, hk * case.group : (hk + 1) * case.group] = clean_blocks.repeat_interleave(bq)[:Lq]
        else:
            poison = torch.zeros(B, Hkv, Lk, dtype=torch.bool)
    else:
        seen = reference.visible_mask(inputs).expand(B, Hq, Lq, Lk)
        poison = ~seen.reshape(B, Hkv, case.group, Lq, Lk).any(dim=3).any(dim=2)  # (B, Hkv, Lk)
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[poison] = float("nan")
    vp[poison] = float("inf")
    vp[..., : max(1, vp.shape[-1] // 2)][poison] = float("nan")
    return kp.requires_grad_(), vp.requires_grad_(), rows


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    return value


def _check(name, got, ref32, ref_lp, floor):
    """The tolerance rule, where -inf entries (lse of rows that see nothing) must match exactly."""
    neg_inf = ref32 == float("-inf")
    assert torch.equal(got.detach() == float("-inf"), neg_inf), f"{name}: -inf entries differ from the reference"
    assert_close_to_reference(name, got[~neg_inf], ref32[~neg_inf], ref_lp[~neg_inf], atol_floor=floor)


def check_case(backend: str, case: Case) -> None:
    q, k, v, kwargs = build(case)
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

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(out.dtype)
    outputs, grads_out = [out], [dout]
    if case.lse_grad:
        dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(case.seed + 2))
        outputs.append(lse)
        grads_out.append(dlse)
    got = torch.autograd.grad(outputs, run_leaves, grads_out)
    want32 = torch.autograd.grad([ref32[i] for i in range(len(outputs))], hp_leaves, [g.to(hp) for g in grads_out])
    want_lp = torch.autograd.grad([ref_lp[i] for i in range(len(outputs))], lp_leaves, grads_out)
    names = ("dq", "dk", "dv", "dmask")
    for name, g_, w32, wlp in zip(names, got, want32, want_lp):
        if rows is not None and name != "dq":
            continue  # rows that see the poisoned block legitimately carry NaN into dk, dv, dmask
        _check(name, select(g_), select(w32), select(wlp), floor)


@pytest.mark.parametrize(
    "backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_fuzz_against_reference(backend):
    if fastattn.get_backend(backend).unavailable_reasons():
        pytest.skip(f"{backend}: {fastattn.get_backend(backend).unavailable_reasons()}")

    @_fuzz_settings(backend)
    @given(case=cases(backend))
    def run(case):
        if fastattn.get_backend(backend).not_supported_reasons(normalize(*build(case)[:3], **build(case)[3])):
            return
        check_case(backend, case)

    run()
