"""Typed wrappers over ``torch.ops.lowrank_ops``; importing registers fakes and autograd."""
from .lowrank import dora_linear, dora_norm, lowrank_linear, lowrank_linear_with_h
from .linalg import pivoted_qr, rsvd
from .linalg_update import factored_svd, svd_append, svd_update
from .merge import dare_merge, magnitude_threshold, nm_mask, sign_consensus, ties_merge

__all__ = [
    "lowrank_linear", "lowrank_linear_with_h", "dora_norm", "dora_linear",
    "rsvd", "pivoted_qr", "factored_svd", "svd_update", "svd_append",
    "magnitude_threshold", "ties_merge", "dare_merge", "nm_mask", "sign_consensus",
]
