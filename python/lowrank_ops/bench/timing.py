"""The one timing helper of the benchmarks, plus throughput and peak-memory helpers.

* :func:`time_interleaved` — the implementations of one case timed in
  alternating rounds (A B C A B C …), each round a block of calls sized from
  ``torch.utils.benchmark.Timer.blocked_autorange``'s probe; per-impl medians,
  and every ratio taken round by round, so a machine whose speed drifts (as
  shared 2-core machines do, by 2–3×) still gives paired, comparable ratios.
  CUDA is synchronized around every block.
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: list[Callable[[], object]], min_run_time: float, *, device: torch.device,
                     warmup: int = 1, min_rounds: int = 5) -> tuple[list[Timing], list[list[float]]]:
    """Time ``fns`` in alternating rounds (the order rotated each round); returns per-fn :class:`Timing` and the
    per-round seconds-per-call matrix ``[round][fn]`` (for paired ratios).

    Each fn gets a block size from one ``blocked_autorange`` probe (≥ ~20 ms
    per block); rounds continue until ``min_run_time`` seconds per fn have been
    spent and at least ``min_rounds`` rounds ran.
    """
    import time

    numbers = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        probe = timer.blocked_autorange(min_run_time=0.02)
        numbers.append(max(1, probe.number_per_run))
    rounds: list[list[float]] = []
    spent = 0.0
    while len(rounds) < min_rounds or spent < min_run_time * len(fns):
        row = [0.0] * len(fns)
        # The order rotates by one each round, so no fn always runs right after the same other one (a
        # fn that evicts the caches or fragments the heap would otherwise always slow down its successor).
        start = len(rounds) % len(fns)
        for j in [(start + k) % len(fns) for k in range(len(fns))]:
            fn, n = fns[j], numbers[j]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            dt = time.perf_counter() - t0
            spent += dt
            row[j] = dt / n
        rounds.append(row)
    timings = []
    for j, n in enumerate(numbers):
        times = [r[j] for r in rounds]
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        timings.append(Timing(median=statistics.median(times), iqr=q[2] - q[0], runs=len(times), number_per_run=n))
    return timings, rounds


def paired_ratio(rounds: list[list[float]], i: int, j: int) -> float:
    """Median over rounds of time[i] / time[j]."""
    return statistics.median(r[i] / r[j] for r in rounds)


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
