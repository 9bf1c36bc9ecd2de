"""Who is measured: fastattn backends, torch SDPA (each of its backends), FlexAttention, flash-attn, xformers.

A :class:`Provider` turns a :class:`~fastattn.bench.workloads.Case` into a :class:`Run` -- a
zero-argument callable computing the attention output plus the leaf tensors its gradients flow
to -- or raises :class:`Unsupported` with the reasons it cannot serve that case. fastattn's own
backends are discovered from :func:`fastattn.backends.backends`, so a backend that registers
itself shows up here without a change.

Masks each provider is given, so all compute the same attention:

========================  =======================  ===============================  =====================
workload                  fastattn                 torch SDPA                       FlexAttention
========================  =======================  ===============================  =====================
dense / gqa               --                       -- (``enable_gqa=True``)         -- (``enable_gqa``)
causal                    ``causal=True``          ``is_causal=True``               ``mask_mod`` q >= kv
window (left, right)      ``window=``              dense bool ``attn_mask``         ``mask_mod``
block_sparse              ``BlockMask``            dense bool ``attn_mask``         ``BlockMask`` of tiles
varlen (documents)        ``varlen_attention``     padded batch, ``is_causal=True``  -- (not wired)
                          on the packed tokens
========================  =======================  ===============================  =====================
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .workloads import Case


class Unsupported(Exception):
    """The provider cannot serve this case; ``reasons`` says why."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


@dataclass
class Run:
    """One prepared call: ``fn()`` returns the output; gradients go to ``leaves`` with ``dout``."""

    fn: Callable[[], torch.Tensor]
    leaves: tuple[torch.Tensor, ...]
    dout: torch.Tensor
    no_backward: list[str] = field(default_factory=list)  # why bwd modes cannot run (empty = they can)


def _leaves(case: Case, layout: str = "BHLD", requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh leaf copies of q, k, v (``BHLD`` as given, or ``BLHD`` contiguous for flash-attn/xformers)."""
    out = []
    for t in (case.q, case.k, case.v):
        t = t.detach()
        if layout == "BLHD":
            t = t.transpose(1, 2).contiguous()
        out.append(t.clone().requires_grad_(requires_grad))
    return tuple(out)


class Provider:
    """An attention implementation the benchmarks can time."""

    name: str = ""
    description: str = ""

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        """Why it cannot run on ``device`` at all (empty = it can)."""
        return []

    def default_off_reasons(self, device: torch.device) -> list[str]:
        """Why it is left out unless named in ``--providers`` (empty = it runs by default)."""
        return []

    def build(self, case: Case, explicit: bool = False) -> Run:
        """Prepare one call for ``case``; raise :class:`Unsupported` if it cannot serve it.

        ``explicit``: the user asked for this provider by name (so slow paths are allowed).
        """
        raise NotImplementedError


class FastattnProvider(Provider):
    """One fastattn backend, called through the public :func:`fastattn.attention`."""

    def __init__(self, backend_name: str):
        self.backend_name = backend_name
        self.name = f"fastattn-{backend_name}"

    @property
    def backend(self):
        from .. import get_backend

        return get_backend(self.backend_name)

    @property
    def description(self) -> str:  # type: ignore[override]
        return self.backend.description

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        return self.backend.unavailable_reasons()

    def build(self, case: Case, explicit: bool = False) -> Run:
        from .. import attention
        from .._inputs import normalize

        q, k, v = _leaves(case)
        kwargs = case.fastattn_kwargs()
        inputs = normalize(q, k, v, **kwargs)
        reasons = self.backend.reasons(inputs)
        if not reasons and not explicit:
            reasons = [f"not chosen automatically: {r}" for r in self.backend.auto_select_reasons(inputs)]
        if reasons:
            raise Unsupported(reasons)
        name = self.backend_name
        if case.workload.kind == "varlen":  # the documents packed, against the others' padded batch
            from .. import varlen_attention

            packed = tuple(case.packed(t.detach()).requires_grad_() for t in (q, k, v))
            cu, longest = case.cu_seqlens(), max(case.workload.doc_lengths)
            return Run(lambda: varlen_attention(*packed, cu, cu, longest, longest, causal=True, backend=name),
                       packed, case.packed(case.dout))
        return Run(lambda: attention(q, k, v, backend=name, **kwargs), (q, k, v), case.dout)


# torch.nn.attention.SDPBackend member of each named SDPA provider (None = torch's own choice).
_SDPA_BACKENDS = {
    "sdpa": None,
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


class SdpaProvider(Provider):
    """``torch.nn.functional.scaled_dot_product_attention``, pinned to one backend with ``sdpa_kernel``."""

    def __init__(self, name: str):
        self.name = name
        self.sdpa_backend = _SDPA_BACKENDS[name]
        which = "torch's default choice" if self.sdpa_backend is None else f"SDPBackend.{self.sdpa_backend}"
        self.description = f"torch.nn.functional.scaled_dot_product_attention ({which})"

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        if self.sdpa_backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION") and device.type != "cuda":
            return [f"torch runs SDPBackend.{self.sdpa_backend} on CUDA only"]
        if self.sdpa_backend is not None:
            from torch.nn.attention import SDPBackend

            if not hasattr(SDPBackend, self.sdpa_backend):
                return [f"this torch ({torch.__version__}) has no SDPBackend.{self.sdpa_backend}"]
        return []

    def _context(self):
        if self.sdpa_backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, self.sdpa_backend)])

    def build(self, case: Case, explicit: bool = False) -> Run:
        q, k, v = _leaves(case)
        mask = case.dense_mask()
        causal = case.causal
        gqa = case.workload.heads_kv != case.workload.heads_q

        def fn():
            with self._context():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

        # Whether torch can run this backend on these inputs is only known by asking it (quietly:
        # torch warns about every kernel it rules out before raising).
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Unsupported([f"torch cannot run it here: {first}"]) from None
        return Run(fn, (q, k, v), case.dout)


class FlexProvider(Provider):
    """``torch.nn.attention.flex_attention`` compiled with ``torch.compile`` (its fused form)."""

    name = "flex"
    description = "torch FlexAttention (torch.compile'd), masks as mask_mod + BlockMask"
    _compiled = None

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return [f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention"]
        return []

    def default_off_reasons(self, device: torch.device) -> list[str]:
        if device.type != "cuda":
            return [
                "on CPU FlexAttention needs torch.compile, which takes ~30 s per shape and mask here "
                "(measured: 28 s for one 512-token forward on 2 cores); ask for it with --providers flex"
            ]
        return []

    @classmethod
    def _flex(cls):
        if cls._compiled is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            # One compiled graph per shape and mask; a sweep needs more than the default 8.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            cls._compiled = torch.compile(flex_attention, dynamic=False)
        return cls._compiled

    def build(self, case: Case, explicit: bool = False) -> Run:
        from torch.nn.attention.flex_attention import create_block_mask

        w = case.workload
        if w.kind == "varlen":
            raise Unsupported(["the varlen workload is not wired for FlexAttention"])
        # FlexAttention refuses inputs that require grad on CPU (it has no CPU backward), even under no_grad.
        no_backward = [] if case.device.type == "cuda" else ["FlexAttention has no backward on CPU"]
        q, k, v = _leaves(case, requires_grad=not no_backward)
        mask_mod = None
        block_size = 128
        if w.causal:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
        elif w.kind == "window":
            left, right = w.window
            def mask_mod(b, h, q_idx, kv_idx):
                visible = q_idx == q_idx
                if left >= 0:
                    visible = visible & (kv_idx >= q_idx - left)
                if right >= 0:
                    visible = visible & (kv_idx <= q_idx + right)
                return visible
        elif w.kind == "block_sparse":
            layout = w.block_layout(case.device)
            block_size = w.block_size
            def mask_mod(b, h, q_idx, kv_idx):
                return layout[q_idx // block_size, kv_idx // block_size]
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(
                mask_mod, None, None, w.seqlen, w.seqlen, device=str(case.device), BLOCK_SIZE=block_size
            )
        flex = self._flex()
        gqa = w.heads_kv != w.heads_q
        return Run(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa), (q, k, v), case.dout, no_backward)


class FlashAttnProvider(Provider):
    """``flash_attn.flash_attn_func`` (Dao-AILab flash-attention), when importable."""

    name = "flash-attn"
    description = "flash_attn.flash_attn_func, (B, L, H, D) layout"

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        if importlib.util.find_spec("flash_attn") is None:
            return ["flash_attn is not installed"]
        if device.type != "cuda":
            return ["flash-attn runs on CUDA only"]
        return []

    def build(self, case: Case, explicit: bool = False) -> Run:
        from flash_attn import flash_attn_func

        w = case.workload
        reasons = []
        if case.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"flash-attn takes fp16/bf16, not {case.dtype}")
        if w.kind == "block_sparse":
            reasons.append("flash-attn has no block-sparse mask")
        if w.kind == "varlen":
            reasons.append("the varlen workload is not wired for flash-attn (flash_attn_varlen_func)")
        if reasons:
            raise Unsupported(reasons)
        q, k, v = _leaves(case, "BLHD")
        window = w.window if w.window is not None else (-1, -1)
        causal = w.causal
        return Run(
            lambda: flash_attn_func(q, k, v, causal=causal, window_size=window), (q, k, v),
            case.dout.transpose(1, 2).contiguous(),
        )


class XformersProvider(Provider):
    """``xformers.ops.memory_efficient_attention``, when importable (dense and causal)."""

    name = "xformers"
    description = "xformers.ops.memory_efficient_attention, (B, L, H, D) layout"

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        if importlib.util.find_spec("xformers") is None:
            return ["xformers is not installed"]
        return []

    def build(self, case: Case, explicit: bool = False) -> Run:
        import xformers.ops as xops

        w = case.workload
        if w.kind not in ("dense", "causal"):
            raise Unsupported([f"the {w.kind} workload is not wired for xformers"])
        q, k, v = _leaves(case, "BLHD")
        bias = xops.LowerTriangularMask() if w.causal else None
        return Run(
            lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias), (q, k, v),
            case.dout.transpose(1, 2).contiguous(),
        )


class LinearProvider(Provider):
    """:func:`fastattn.linear_attention` (causal, elu+1, normalised) on ``linear`` workloads, by one of
    its backends; ``linear-naive`` is the plain PyTorch formulation that materialises the ``(L, L)`` scores."""

    def __init__(self, backend: str):
        self.linear_backend = backend
        self.name = f"linear-{backend}"
        self.description = {
            "triton": "fastattn.linear_attention, Triton chunked kernels",
            "cpu": "fastattn.linear_attention, C++ chunked CPU kernels",
            "reference": "fastattn.linear_attention, chunked PyTorch form (batched matmuls + cumsum of chunk states)",
            "naive": "linear attention in plain PyTorch: (L, L) feature scores, causal mask, normaliser",
        }[backend]

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        if self.linear_backend == "naive":
            return []
        from ..linear.api import backend_reasons

        return backend_reasons(self.linear_backend, torch.empty(0, device=device))

    def default_off_reasons(self, device: torch.device) -> list[str]:
        if self.linear_backend == "naive":
            return ["materialises (L, L) scores per head: ask for it with --providers linear-naive"]
        return ["runs the linear workload only: the --linear preset measures it"]

    def build(self, case: Case, explicit: bool = False) -> Run:
        from ..linear import linear_attention
        from ..linear.naive import linear_attention_reference

        if case.workload.kind != "linear":
            raise Unsupported([f"linear attention runs the 'linear' workload, not {case.workload.kind!r}"])
        q, k, v = _leaves(case)
        if self.linear_backend == "naive":
            return Run(lambda: linear_attention_reference(q, k, v, causal=True)[0], (q, k, v), case.dout)
        backend = self.linear_backend
        return Run(lambda: linear_attention(q, k, v, causal=True, backend=backend), (q, k, v), case.dout)


BASELINE = "sdpa"


def all_providers() -> list[Provider]:
    """Every provider known, fastattn backends first (in dispatch priority order)."""
    from ..backends import PRIORITY, backends

    registered = backends()
    providers: list[Provider] = [FastattnProvider(name) for name in PRIORITY if name in registered]
    providers += [SdpaProvider(name) for name in _SDPA_BACKENDS]
    providers += [FlexProvider(), FlashAttnProvider(), XformersProvider()]
    providers += [LinearProvider(name) for name in ("triton", "cpu", "reference", "naive")]
    return providers


def resolve(names: list[str] | None, device: torch.device) -> tuple[list[Provider], dict[str, dict]]:
    """The providers to run and a status entry for every known provider.

    ``names=None`` picks every provider usable on ``device`` and not off by default; explicit names
    (``fastattn-cpu`` or just ``cpu`` for a fastattn backend) are taken as asked, even when off by
    default. The SDPA baseline is always added, since every ratio is taken against it.
    Returns ``(providers, status)`` with ``status[name] = {"selected", "reasons", "description"}``.
    """
    known = {p.name: p for p in all_providers()}
    status: dict[str, dict] = {}
    for p in known.values():
        reasons = p.unavailable_reasons(device)
        status[p.name] = {"selected": False, "reasons": reasons, "description": p.description}
    if names is None:
        chosen = [p for p in known.values() if not status[p.name]["reasons"] and not p.default_off_reasons(device)]
        for p in known.values():
            if not status[p.name]["reasons"]:
                status[p.name]["reasons"] = p.default_off_reasons(device)
    else:
        chosen = []
        for raw in names:
            name = raw if raw in known else f"fastattn-{raw}"
            if name not in known:
                raise ValueError(f"--providers: unknown provider {raw!r}; known: {', '.join(known)}")
            if status[name]["reasons"]:
                raise ValueError(f"--providers: {name} cannot run on {device.type}: " + "; ".join(status[name]["reasons"]))
            if known[name] not in chosen:
                chosen.append(known[name])
    if known[BASELINE] not in chosen:
        chosen.append(known[BASELINE])
    for p in chosen:
        status[p.name]["selected"] = True
    return chosen, status
