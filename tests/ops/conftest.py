"""Op tests run their kernels on one intra-op thread.

The inputs here are tiny, and OpenMP's thread start/spin on a busy 2-core
machine costs 5-10x the work itself (measured: 100 forward cases take 0.2 s of
CPU on one thread, 1-2 s on two).  The multi-threaded paths (parallel
epilogue, column reduction, threaded BLAS) are covered by tests that raise the
thread count explicitly (``test_lowrank_linear.py::test_multithreaded``).
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
