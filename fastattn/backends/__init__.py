"""Backend registry and dispatch.

Backends are tried in priority order ``cuda > triton > cpu > reference``, except that ``cuda`` and
``triton`` are ordered by measured evidence (:mod:`fastattn.backends.evidence`: triton first
unless a committed GPU results file shows cuda faster for that kind of call on that GPU); the
first whose :meth:`~fastattn.backends.base.Backend.reasons` list is empty serves the call. An explicitly
requested backend that cannot serve raises one :class:`BackendNotSupportedError` listing why.
``FASTATTN_BACKEND=<name>`` replaces the automatic choice (an explicit ``backend=`` still wins).
"""

from __future__ import annotations

import importlib
import os

import torch

from .._inputs import AttentionInputs
from . import base, evidence
from .base import Backend

PRIORITY = ("cuda", "triton", "cpu", "reference")


class BackendNotSupportedError(ValueError):
    """The requested backend cannot serve these inputs; the message lists every reason."""


class _Registry(dict):
    """The backends by name. Replacing or removing one (tests do) drops the cached dispatch decisions."""

    def __setitem__(self, name, backend):
        super().__setitem__(name, backend)
        clear_dispatch_caches()

    def __delitem__(self, name):
        super().__delitem__(name)
        clear_dispatch_caches()


_REGISTRY: dict[str, Backend] = _Registry()
_IMPORT_ERRORS: dict[str, str] = {}

# Automatic choices for CPU calls, keyed on what the backends' reasons read (see _selection_key),
# and the plans of whole calls that the public functions keep (fastattn.api, fastattn.kvcache):
# both are dropped when a backend is swapped or one of its attributes changes.
_SELECTION_CACHE: dict[tuple, Backend] = {}
_SELECTION_CACHE_SIZE = 512
CALL_PLANS: dict[tuple, object] = {}


def clear_dispatch_caches() -> None:
    _SELECTION_CACHE.clear()
    CALL_PLANS.clear()


base.CHANGE_HOOKS.append(clear_dispatch_caches)


def remember_plan(key: tuple, plan) -> None:
    """Keep ``plan`` for calls with ``key`` (a bounded cache: emptied when full)."""
    if len(CALL_PLANS) >= _SELECTION_CACHE_SIZE:
        CALL_PLANS.clear()
    CALL_PLANS[key] = plan


# os.environ's own mapping (bytes keys on POSIX): a lookup there is a dict access, where
# os.environ.get also encodes the name and decodes the value -- a tenth of a small call's dispatch.
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def dispatch_environment() -> tuple:
    """The environment variables that steer dispatch (``FASTATTN_BACKEND``, ``TRITON_INTERPRET``),
    read cheaply, as parts of cache keys."""
    if _ENVIRON is not None:
        return _ENVIRON.get(b"FASTATTN_BACKEND"), _ENVIRON.get(b"TRITON_INTERPRET")
    return os.environ.get("FASTATTN_BACKEND"), os.environ.get("TRITON_INTERPRET")


def _load_all() -> None:
    if _REGISTRY or _IMPORT_ERRORS:
        return
    for name in PRIORITY:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:
            _IMPORT_ERRORS[name] = f"could not import fastattn.backends.{name}: {exc}"
            continue
        backend = module.BACKEND
        # Register its ops now: under torch.compile the first call is traced, and dynamo can trace
        # neither op registration nor the first access of a cached property. (Not gated on
        # unavailable_reasons, which may query the GPU: importing fastattn must not initialise CUDA.)
        try:
            backend.ops  # noqa: B018
        except Exception:  # noqa: BLE001 -- cannot run here; unavailable_reasons says why, a call re-raises
            pass
        _REGISTRY[name] = backend


def backends() -> dict[str, Backend]:
    """Every registered backend by name, in priority order (``fastattn.list_backends()``)."""
    _load_all()
    return {name: _REGISTRY[name] for name in PRIORITY if name in _REGISTRY}


def get_backend(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        if name in _IMPORT_ERRORS:
            raise BackendNotSupportedError(f"backend {name!r} is not usable: {_IMPORT_ERRORS[name]}")
        raise ValueError(f"backend must be one of {list(PRIORITY)} or None, got {name!r}")
    return _REGISTRY[name]


def status() -> list[tuple[str, str | None, list[str]]]:
    """``(name, description, reasons it cannot run here)`` for every backend, for ``fastattn info``."""
    _load_all()
    rows = []
    for name in PRIORITY:
        if name in _REGISTRY:
            backend = _REGISTRY[name]
            rows.append((name, backend.description, backend.unavailable_reasons()))
        else:
            rows.append((name, None, [_IMPORT_ERRORS.get(name, "not registered")]))
    return rows


def _selection_key(inputs: AttentionInputs, requested: str | None) -> tuple | None:
    """A key for the backend choice of a CPU call without masks, or None (not cached).

    The reasons of every backend read only the device, dtype, shapes, the features a call uses and
    the environment, all in the key; calls with an ``attn_mask`` or BlockMask are not cached (their
    masks' own properties count), nor are GPU calls (the dispatch evidence and the GPU count). A
    backend swapped in the registry, or one whose ``reasons`` are replaced on the instance (tests do
    both), empties the cache (:func:`clear_dispatch_caches`).
    """
    if inputs.device.type != "cpu" or inputs.attn_mask is not None or inputs.block_mask is not None:
        return None
    return (
        requested, dispatch_environment()[1], inputs.dtype, inputs.q.shape, inputs.k.shape, inputs.v.shape,
        inputs.window_left, inputs.window_right,
        inputs.alibi_slopes is None, inputs.softcap > 0, inputs.dropout_p > 0, inputs.key_lengths is None,
        inputs.query_lengths is None, inputs.sinks is None, inputs.return_lse, inputs.requires_grad,
    )


def select_backend(inputs: AttentionInputs, requested: str | None = None) -> Backend:
    """The backend that serves ``inputs``: ``requested`` if given, else ``FASTATTN_BACKEND``, else the first that fits."""
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend must be a str or None, got {type(requested).__name__}")
    if not requested and os.environ.get("FASTATTN_BACKEND"):
        requested = os.environ["FASTATTN_BACKEND"]
        if requested not in PRIORITY:
            raise ValueError(f"environment variable FASTATTN_BACKEND must be one of {', '.join(PRIORITY)} "
                             f"(or unset, to choose automatically), got {requested!r}")
    requested = requested or None
    available = backends()
    key = None if torch.compiler.is_compiling() else _selection_key(inputs, requested)
    if key is not None and key in _SELECTION_CACHE:
        return _SELECTION_CACHE[key]
    backend = _select_uncached(inputs, requested, available)
    if key is not None:
        if len(_SELECTION_CACHE) >= _SELECTION_CACHE_SIZE:
            _SELECTION_CACHE.clear()
        _SELECTION_CACHE[key] = backend
    return backend


def _select_uncached(inputs: AttentionInputs, requested: str | None, available: dict[str, Backend]) -> Backend:
    if requested is not None:
        backend = get_backend(requested)
        reasons = backend.reasons(inputs)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {requested!r} cannot run this call:\n" + "\n".join(f"  - {r}" for r in reasons)
            )
        return backend
    refused = []
    for name in evidence.order(available, inputs):
        backend = available[name]
        reasons = backend.reasons(inputs) or backend.auto_select_reasons(inputs)
        if not reasons:
            return backend
        refused.append(f"  {name}: " + "; ".join(reasons))
    raise BackendNotSupportedError("no backend can run this call:\n" + "\n".join(refused))
