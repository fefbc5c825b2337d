"""Benchmark suites, one module per op family; importing registers their cases."""
from . import lowrank  # noqa: F401
from . import linalg  # noqa: F401
from . import linalg_update  # noqa: F401
from . import merge  # noqa: F401
from . import adapters  # noqa: F401

SUITES = ["lowrank", "linalg", "linalg_update", "merge", "adapters"]
