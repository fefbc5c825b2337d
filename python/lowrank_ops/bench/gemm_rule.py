"""The CPU kernels' few-rows GEMM orientation rule (``cpp/common.h``, ``mirror_few_rows_gemm``) restated in
Python, for the ``floor_mirror`` benchmark rows and the test that checks which orientation ran.

``x·Wᵀ`` for few tokens runs as ``(W·xᵀ)ᵀ`` and the input gradient ``g·W`` as ``(Wᵀ·gᵀ)ᵀ`` where MKL runs the
mirrored call faster, which depends on the CPU vendor (MKL picks its kernels by vendor):

* Intel: forward for 16..48 tokens, input gradient never;
* other CPUs (measured on AMD EPYC): forward for 2..256 tokens, input gradient for 16..256.

CPU fp32/fp64 only, and only when the output has at least 4 columns per row.
"""
from __future__ import annotations

import functools
import platform

import torch

__all__ = ["cpu_is_intel", "few_rows_mirrored"]


@functools.lru_cache(maxsize=None)
def cpu_is_intel() -> bool:
    """Whether the CPUID vendor is Intel (``GenuineIntel``), as ``__builtin_cpu_is("intel")`` in the C++ rule."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


def few_rows_mirrored(rows: int, cols: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                      backward: bool = False) -> bool:
    """Whether the CPU kernels run the ``(rows, cols)`` product ``x·Wᵀ`` (``backward=False``) or the input
    gradient ``g·W`` (``backward=True``) in the mirrored orientation."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.float64) or cols < 4 * rows:
        return False
    if cpu_is_intel():
        return not backward and 16 <= rows <= 48
    return (16 if backward else 2) <= rows <= 256
