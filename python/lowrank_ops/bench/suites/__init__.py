"""Benchmark suites, one module per op family; importing registers their cases."""
from . import linalg, lowrank  # noqa: F401

SUITES = ["lowrank", "linalg"]
