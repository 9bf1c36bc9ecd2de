"""Loads the compiled extension ``fastattn._C`` if it was built; the package works without it."""

from __future__ import annotations

import functools


@functools.cache
def load() -> tuple[object | None, str | None]:
    """``(module, None)`` when ``fastattn._C`` imports, else ``(None, why)``."""
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from . import _C
    except ImportError as exc:
        return None, (
            f"the C++ extension fastattn._C is not built ({exc}); install with "
            "`pip install --no-build-isolation -e .` to build it"
        )
    from .ops import register_extension_fakes

    register_extension_fakes()
    return _C, None


def build_info() -> dict:
    module, _ = load()
    return module.build_info() if module is not None else {}
