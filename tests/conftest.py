"""Test-suite setup: ``tests/`` on ``sys.path`` (for ``from utils import ...``) and a fixed seed per test."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, independent of test order and selection."""
    torch.manual_seed(0)
    yield
