"""``fastattn.info()``: what this installation can run, and why not."""

from __future__ import annotations

import platform

import torch

from . import _extension
from .backends import evidence, status


def info_dict() -> dict:
    """Versions, devices, the extension build and every backend's availability."""
    from .varlen import VARLEN_REFUSALS

    _, ext_error = _extension.load()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "extension": {"built": ext_error is None, "error": ext_error, **_extension.build_info()},
        "dispatch_evidence": {"summary": evidence.describe(), "sources": list(evidence.SOURCES), "table": evidence.TABLE},
        "backends": [
            {"name": name, "description": description, "usable": not reasons, "reasons": reasons}
            for name, description, reasons in status()
        ],
        # Backends that refuse varlen_attention whatever the call, and why.
        "varlen_refusals": dict(VARLEN_REFUSALS),
    }


def info(print_out: bool = True) -> str:
    """Print (and return) a report of every backend: usable here or not, and why not."""
    d = info_dict()
    lines = [
        f"fastattn on Python {d['python']}, torch {d['torch']} (CUDA {d['torch_cuda']}), triton {d['triton']}",
        f"GPU: {d['cuda_device'] or 'none'}; CPU threads: {d['cpu_threads']}",
        "extension fastattn._C: "
        + (f"built (CUDA kernels: {'yes' if d['extension'].get('cuda') else 'no'})" if d["extension"]["built"] else d["extension"]["error"]),
        "",
        d["dispatch_evidence"]["summary"],
        "backends (automatic choice tries them in this order, cuda and triton as the evidence says):",
    ]
    for b in d["backends"]:
        mark = "usable" if b["usable"] else "not usable"
        lines.append(f"  {b['name']:<10} {mark}" + (f" -- {b['description']}" if b["description"] else ""))
        lines.extend(f"  {'':<10}   why: {r}" for r in b["reasons"])
        if b["name"] in d["varlen_refusals"]:
            lines.append(f"  {'':<10}   not for varlen: {d['varlen_refusals'][b['name']]}")
    text = "\n".join(lines)
    if print_out:
        print(text)
    return text
