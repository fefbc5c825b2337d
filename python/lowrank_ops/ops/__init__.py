"""Typed wrappers over ``torch.ops.lowrank_ops``; importing registers fakes and autograd."""
from .linalg import pivoted_qr, rsvd
from .lowrank import dora_linear, dora_norm, lowrank_linear

__all__ = ["lowrank_linear", "dora_norm", "dora_linear", "rsvd", "pivoted_qr"]
