"""Typed wrappers over ``torch.ops.lowrank_ops``; importing registers fakes and autograd."""
from .lowrank import dora_linear, dora_norm, lowrank_linear

__all__ = ["lowrank_linear", "dora_norm", "dora_linear"]
from .linalg_update import factored_svd, svd_append, svd_update  # noqa: E402

__all__ += ["factored_svd", "svd_update", "svd_append"]
