"""Small helpers shared by the merge methods of this package."""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def kth_largest(x: Tensor, k: int) -> Tensor:
    """The ``k``-th largest value of ``x`` (flattened), ``1 <= k <= x.numel()``."""
    flat = x.reshape(-1)
    return torch.kthvalue(flat, flat.numel() - k + 1).values
