"""Linear algebra for low-rank methods: randomized, factored and updating SVDs, pivoted QR, rank selection.

```python
import lowrank_ops as lro
U, S, Vh = lro.linalg.rsvd(W, rank=16)                 # randomized SVD (block Krylov)
U, S, Vh = lro.linalg.factored_svd(B, A, weights=w)   # SVD of B·diag(w)·A, never formed
U, S, Vh = lro.linalg.svd_update(U, S, Vh, P, Q, rank)  # SVD of U·diag(S)·Vh + P·Qᵀ
U, S, Vh = lro.linalg.svd_append(U, S, Vh, C, rank, dim=1)
Q, R, perm = lro.linalg.pivoted_qr(A)                  # A[:, perm] = Q·R
k = lro.linalg.select_rank(S, energy=0.9)             # rank keeping 90% of Σ S²
ranks = lro.linalg.allocate_ranks({"q": S_q, "v": S_v}, budget=32)  # EVA-style global budget
```

Contract shared by every SVD here: ``U (..., m, k)``, ``S (..., k)`` non-increasing
and non-negative, ``Vh (..., k, n)``; fp64 in → fp64 out, anything else → fp32.

Every function is a compiled op (``lowrank_ops.ops.linalg`` /
``lowrank_ops.ops.linalg_update``) with a CPU and a CUDA kernel; none is differentiable.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..ops import linalg_update as _upd
from ..ops import linalg as _ops_linalg
from .rank import allocate_ranks, select_rank


def rsvd(A: Tensor, rank: int, oversample: int = 8, n_iter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized truncated SVD of ``A (..., m, n)`` (Halko et al. 2011) -> ``(U, S, Vh)`` of rank ``rank``.

    Block Krylov variant (Musco & Musco 2015); see :func:`lowrank_ops.ops.rsvd` for the algorithm.
    """
    return _ops_linalg.rsvd(A, rank, oversample, n_iter, seed)


def pivoted_qr(A: Tensor, rank: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Column-pivoted QR of ``A (m, n)`` -> ``(Q (m, k), R (k, n), perm (n,))`` with ``A[:, perm] = Q·R``.

    ``k = min(m, n)``, or ``rank`` to stop after ``rank`` pivots; see :func:`lowrank_ops.ops.pivoted_qr`.
    """
    return _ops_linalg.pivoted_qr(A, rank)


def factored_svd(B: Tensor, A: Tensor, weights: Optional[Tensor] = None, rank: Optional[int] = None):
    """Exact thin SVD of ``B (..., m, R) · diag(weights (R,)) · A (..., R, n)`` -> ``(U, S, Vh)``, rank ``rank``
    (default ``min(m, n, R)``); never forms the product.  See :func:`lowrank_ops.ops.linalg_update.factored_svd`."""
    return _upd.factored_svd(B, A, weights, rank)


def svd_update(U: Tensor, S: Tensor, Vh: Tensor, P: Tensor, Q: Tensor, rank: int):
    """Truncated SVD of ``U·diag(S)·Vh + P·Qᵀ`` (Brand 2006); ``P (m, c)``, ``Q (n, c)``.
    See :func:`lowrank_ops.ops.linalg_update.svd_update`."""
    return _upd.svd_update(U, S, Vh, P, Q, rank)


def svd_append(U: Tensor, S: Tensor, Vh: Tensor, C: Tensor, rank: int, dim: int = 1):
    """Truncated SVD after appending columns (``dim=1``, ``C (m, c)``) or rows (``dim=0``, ``C (c, n)``);
    ``C`` may be sparse.  See :func:`lowrank_ops.ops.linalg_update.svd_append`."""
    return _upd.svd_append(U, S, Vh, C, rank, dim)


__all__ = ["rsvd", "pivoted_qr", "factored_svd", "svd_update", "svd_append", "select_rank", "allocate_ranks"]
