"""Sequential projection (OPCM): later task vectors are orthogonal to the merge so far, then rescaled."""
from __future__ import annotations

import torch

from lowrank_ops import merge
from lowrank_ops.merge.sequential_projection import project_out


def test_projection_is_orthogonal_to_previous_merge():
    prev = torch.randn(9, 7, dtype=torch.float64)
    tau = torch.randn(9, 7, dtype=torch.float64)
    c = project_out(prev, tau, alpha=0.5)
    U, S, Vh = torch.linalg.svd(prev, full_matrices=False)
    r = int((S.cumsum(0) / S.sum() > 0.5).float().argmax())
    assert r >= 1
    torch.testing.assert_close((c * prev).sum(), torch.zeros((), dtype=torch.float64), atol=1e-10, rtol=0)
    P = U.T @ c @ Vh.T
    torch.testing.assert_close(P[:r, :r], torch.zeros(r, r, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(P.diagonal(), torch.zeros(7, dtype=torch.float64), atol=1e-10, rtol=0)
    # everything else of tau is kept
    P_tau = U.T @ tau @ Vh.T
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[:r, :r] = False
    mask.fill_diagonal_(False)
    torch.testing.assert_close(P[mask], P_tau[mask])


def test_sequential_merge_and_rescale():
    base = torch.randn(6, 5, dtype=torch.float64)
    taus = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    raw = merge.sequential_projection.merge_tensor("w", base, [base + t for t in taus], rescale=False)
    s = taus[0].clone()
    for t in taus[1:]:
        c = project_out(s, t, 0.5)
        torch.testing.assert_close((c * s).sum(), torch.zeros((), dtype=torch.float64), atol=1e-10, rtol=0)
        s = s + c
    torch.testing.assert_close(raw, base + s)
    out = merge.sequential_projection.merge_tensor("w", base, [base + t for t in taus])
    mean_norm = sum(float(t.norm()) for t in taus) / 3
    torch.testing.assert_close(float((out - base).norm()), mean_norm)
    torch.testing.assert_close((out - base) / (out - base).norm(), s / s.norm())


def test_vectors_sum_then_rescale():
    base = torch.zeros(4, dtype=torch.float64)
    t1 = torch.tensor([3.0, 0, 0, 0], dtype=torch.float64)
    t2 = torch.tensor([0, 4.0, 0, 0], dtype=torch.float64)
    out = merge.sequential_projection.merge_tensor("b", base, [t1, t2])
    torch.testing.assert_close(out, (t1 + t2) * (3.5 / 5.0))
