"""Plain-PyTorch references of every op: the oracle for tests and benchmarks only."""
from .linalg import (factored_svd_ref, pivoted_qr_ref, rsvd_ref, svd_append_ref, svd_update_ref,
                     truncated_svd_ref)
from .lowrank import dora_linear_ref, dora_norm_ref, lowrank_linear_ref, lowrank_linear_with_h_ref
from .merge import (dare_merge_ref, magnitude_threshold_ref, nm_mask_ref, sign_consensus_ref,
                    ties_merge_ref)

__all__ = [
    "lowrank_linear_ref", "lowrank_linear_with_h_ref", "dora_norm_ref", "dora_linear_ref",
    "rsvd_ref", "truncated_svd_ref", "pivoted_qr_ref", "factored_svd_ref", "svd_update_ref", "svd_append_ref",
    "magnitude_threshold_ref", "ties_merge_ref", "dare_merge_ref", "nm_mask_ref", "sign_consensus_ref",
]
