"""Typed wrappers over ``torch.ops.lowrank_ops``; importing registers fakes and autograd."""
from .lowrank import dora_linear, dora_norm, lowrank_linear
from .linalg import pivoted_qr, rsvd

__all__ = ["lowrank_linear", "dora_norm", "dora_linear", "rsvd", "pivoted_qr"]
