"""LoRE-Merging: recovers a planted base from low-rank task vectors without seeing the base; objective decreases."""
from __future__ import annotations

import torch

from lowrank_ops import merge
from lowrank_ops.merge.lore import lore_estimate, svt


def test_svt_shrinks_singular_values():
    M = torch.randn(6, 5, dtype=torch.float64)
    X, nuc = svt(M, 0.5)
    s, sx = torch.linalg.svdvals(M), torch.linalg.svdvals(X)
    torch.testing.assert_close(sx, (s - 0.5).clamp_min(0))
    torch.testing.assert_close(nuc, sx.sum())


def test_recovers_planted_base_and_low_rank_tasks():
    m, n, N = 30, 24, 4
    theta0 = torch.randn(m, n, dtype=torch.float64)
    deltas = [torch.randn(m, 1, dtype=torch.float64) @ torch.randn(1, n, dtype=torch.float64) for _ in range(N)]
    models = [theta0 + d for d in deltas]
    est, ds, hist = lore_estimate(models, mu_rel=0.05, iters=200)
    naive = torch.stack(models).mean(0)  # what averaging would call the base
    err, err_naive = float((est - theta0).norm()), float((naive - theta0).norm())
    assert err < 0.2 * err_naive, (err, err_naive)
    for d, dt in zip(ds, deltas):
        assert float((d - dt).norm()) < 0.3 * float(dt.norm())
        assert int((torch.linalg.svdvals(d) > 1e-6 * float(dt.norm())).sum()) <= 2
    # coordinate descent with exact block minimisers: the objective never goes up
    assert all(b <= a * (1 + 1e-12) for a, b in zip(hist, hist[1:]))


def test_merge_is_estimate_plus_weighted_deltas_and_vectors_average():
    models = [torch.randn(10, 8, dtype=torch.float64) for _ in range(3)]
    est, ds, _ = lore_estimate(models, mu=0.7, iters=5)
    out = merge.lore.merge_tensor("w", None, models, [1.0, 0.5, 0.0], mu=0.7, iters=5)
    torch.testing.assert_close(out, est + ds[0] + 0.5 * ds[1])
    vecs = [torch.randn(5) for _ in range(3)]
    torch.testing.assert_close(merge.lore.merge_tensor("b", None, vecs), torch.stack(vecs).mean(0))


def test_objective_from_the_spectra_equals_the_direct_objective():
    """The objective is computed from each SVD's spectrum and the accumulated residual (no δᵢ kept); it equals
    Σ‖θ₀ + δᵢ − xᵢ‖² + μ·Σ‖δᵢ‖_* evaluated directly at the returned estimates."""
    g = torch.Generator().manual_seed(3)
    models = [torch.randn(12, 9, dtype=torch.float64, generator=g) for _ in range(4)]
    for iters in (1, 4):
        est, ds, hist = lore_estimate(models, mu=1.3, iters=iters, tol=0.0)
        direct = sum(float(((est + d - x) ** 2).sum()) + 1.3 * float(torch.linalg.svdvals(d).sum())
                     for d, x in zip(ds, models))
        assert len(hist) == iters
        assert abs(hist[-1] - direct) <= 1e-10 * direct, (hist[-1], direct)
