"""The one timing helper of the benchmarks, plus throughput and peak-memory helpers.

* :func:`time_fn` — median wall time of repeated calls after warm-up, measured
  with ``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronizes
  CUDA around every block, so GPU work is counted).  ``Timer`` pins
  ``num_threads`` to 1 unless told otherwise; we pass
  ``torch.get_num_threads()`` so the CPU numbers use the threads the header
  reports.
* :func:`gflops` / :func:`gbps` — rates from a flop or byte count.
* :func:`peak_extra_memory` — peak bytes allocated *on top of* what was live
  before one call (the activation/gradient footprint of a training step).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.benchmark import Timer


@dataclass
class Timing:
    """Per-call seconds: ``median`` and inter-quartile range over ``runs`` timed blocks."""

    median: float
    iqr: float
    runs: int
    number_per_run: int


def time_fn(fn: Callable[[], object], min_run_time: float, *, warmup: int = 1, min_runs: int = 1) -> Timing:
    """Median seconds per call of ``fn()``.

    ``warmup`` untimed calls first (lazy initialisation, allocator and oneDNN
    primitive caches); ``blocked_autorange`` then picks a block size (its own
    probe calls are discarded too) and times blocks until ``min_run_time``
    seconds have been spent.  Slow calls can finish that in one block, so
    ``min_runs`` tops the sample up with further blocks of the same size.
    """
    for _ in range(warmup):
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_runs:
        times.append(timer.timeit(m.number_per_run).median)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(median=statistics.median(times), iqr=q[2] - q[0], runs=len(times), number_per_run=m.number_per_run)


def gflops(flops: float, seconds: float) -> float:
    """Throughput in GFLOP/s (1e9 flop per second)."""
    return flops / seconds / 1e9


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    # Kineto prints "profiler_start"/"profiler_stop" lines straight to fd 2;
    # silence only the start/stop calls, never the measured function.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_memory(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated during one call of ``fn()`` beyond those live before it.

    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
    minus ``memory_allocated()`` at the start.

    CPU has no peak counter, so the call runs once under ``torch.profiler`` with
    ``profile_memory=True``: every allocation and free made through PyTorch's CPU
    allocator is recorded as a ``[memory]`` event with a signed byte count.
    We read the raw events (``kineto_results.events()``: the parsed
    ``FunctionEvent`` list attributes most of them to the enclosing op, which
    loses their order), sort them by timestamp and take the maximum of the
    running sum.  Frees of tensors that were live before the call count
    negatively, as they do in reality.  The result is exact for the bytes the
    PyTorch allocator hands out; memory a library allocates behind its back
    (e.g. BLAS packing buffers) is not seen, on either device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr_fd():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    cpu_types = {torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.MKLDNN, torch.autograd.DeviceType.IDEEP}
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() in cpu_types
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
