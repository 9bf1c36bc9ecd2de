"""The one memory helper: peak bytes allocated while a call runs, above what was live before it.

* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``torch.cuda.max_memory_allocated`` after the
  call, minus ``torch.cuda.memory_allocated`` before it.
* CPU: torch has no peak counter for CPU memory, so the call runs under ``torch.profiler`` with
  ``profile_memory=True``, which records every allocation and free of torch's CPU allocator in
  order; the peak is the largest running sum. It counts exactly what tensors allocate (in the same
  process, byte for byte, without the noise of the interpreter or the allocator's caches that peak
  RSS carries) -- but not memory a kernel takes outside torch's allocator (``std::vector``,
  thread stacks). See docs/benchmarks.md.

Inputs that already exist before the call are not counted, so the number is what the attention
itself needs: its output, saved tensors and scratch (the ``(Lq, Lk)`` scores for the reference).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM and for the CPU allocator's failure to allocate."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak)
    if device.type == "cpu":
        return _cpu_peak(fn)
    raise ValueError(f"device must be cpu or cuda, got {device}")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: Kineto writes a line at every profiler start and stop, whatever
    KINETO_LOG_LEVEL says, which would bury the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # only around start/stop: errors raised by fn itself stay visible
        prof.start()
    try:
        result = fn()
        del result
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)
