"""Plain-PyTorch references of every op: the oracle for tests and benchmarks only."""
from .lowrank import dora_linear_ref, dora_norm_ref, lowrank_linear_ref

__all__ = ["lowrank_linear_ref", "dora_norm_ref", "dora_linear_ref"]
