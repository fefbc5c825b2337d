"""TSV-M: equals task arithmetic on orthogonal task subspaces; otherwise keeps exactly the kept singular values."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import merge


def _lowrank_in(rows, cols, m, n, r):
    U = torch.zeros(m, r, dtype=torch.float64)
    V = torch.zeros(n, r, dtype=torch.float64)
    U[rows] = torch.randn(len(rows), r, dtype=torch.float64)
    V[cols] = torch.randn(len(cols), r, dtype=torch.float64)
    return U @ V.T


def test_orthogonal_subspaces_equal_task_arithmetic():
    m, n = 8, 10
    base = torch.randn(m, n, dtype=torch.float64)
    d1 = _lowrank_in([0, 1, 2], [0, 1, 2], m, n, 2)
    d2 = _lowrank_in([4, 5, 6], [5, 6, 7], m, n, 2)
    out = merge.tsv_m.merge_tensor("w", base, [base + d1, base + d2])  # k = 8 // 2 = 4 >= rank 2
    torch.testing.assert_close(out, base + d1 + d2)
    # full-rank-k tasks (no zero singular values involved) in disjoint row and column blocks
    e1 = _lowrank_in([0, 1, 2, 3], [0, 1, 2, 3, 4], m, n, 4)
    e2 = _lowrank_in([4, 5, 6, 7], [5, 6, 7, 8, 9], m, n, 4)
    torch.testing.assert_close(merge.tsv_m.merge_tensor("w", base, [base + e1, base + e2]), base + e1 + e2)
    out_w = merge.tsv_m.merge_tensor("w", base, [base + d1, base + d2], [2.0, -1.0], scaling=0.5)
    torch.testing.assert_close(out_w, base + 0.5 * (2 * d1 - d2))


def test_overlapping_tasks_are_decorrelated():
    m, n, N = 12, 9, 3
    base = torch.randn(m, n, dtype=torch.float64)
    deltas = [torch.randn(m, n, dtype=torch.float64) for _ in range(N)]
    out = merge.tsv_m.merge_tensor("w", base, [base + d for d in deltas]) - base
    k = min(m, n) // N
    kept = torch.cat([torch.linalg.svdvals(d)[:k] for d in deltas])
    # U⊥ and V⊥ are orthonormal, so the merge has exactly the kept singular values
    torch.testing.assert_close(torch.linalg.svdvals(out)[: N * k], kept.sort(descending=True).values)
    assert not torch.allclose(out, sum(deltas))


def test_vectors_are_averaged_and_dtypes_kept():
    base = torch.randn(6)
    ts = [base + torch.randn(6) for _ in range(3)]
    out = merge.tsv_m.merge_tensor("b", base, ts)
    torch.testing.assert_close(out, torch.stack(ts).mean(0), atol=1e-6, rtol=1e-6)
    bf = merge.tsv_m.merge_tensor("w", base.bfloat16().reshape(2, 3), [t.bfloat16().reshape(2, 3) for t in ts])
    assert bf.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sv_reduction"):
        merge.tsv_m.merge_tensor("w", torch.zeros(3, 3), [torch.ones(3, 3)], sv_reduction=2.0)


def test_rsvd_and_exact_agree_when_the_kept_spectrum_is_separated():
    """svd="rsvd" (the default, lowrank_ops.ops.rsvd; here on its Krylov route: k = 18 of 150) keeps the same
    triplets as the dense SVD when each task's rank-k part stands clear of the rest."""
    g = torch.Generator().manual_seed(0)
    m, n, N = 200, 150, 8
    base = torch.randn(m, n, dtype=torch.float64, generator=g)
    ts = []
    for _ in range(N):
        d = torch.randn(m, 18, dtype=torch.float64, generator=g) @ torch.randn(18, n, dtype=torch.float64, generator=g)
        ts.append(base + d + 1e-6 * torch.randn(m, n, dtype=torch.float64, generator=g))
    fast = merge.tsv_m.merge_tensor("w", base, ts)
    exact = merge.tsv_m.merge_tensor("w", base, ts, svd="exact")
    torch.testing.assert_close(fast, exact, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="svd"):
        merge.tsv_m.merge_tensor("w", base, ts, svd="lapack")
