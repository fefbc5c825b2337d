"""Spectral diagnostics on constructed cases: planted intruders are found, identical and
slightly perturbed weights have none, drift is zero for W_ft = W_pre."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops import diagnostics


def _weight(m=48, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(5, 1, n, dtype=torch.float64)
    return (U[:, :n] * s) @ V.T, U, V


@pytest.mark.parametrize("side", ["left", "right"])
def test_planted_intruder_is_detected(side):
    W, U, V = _weight()
    # a new direction orthogonal to every left singular vector of W (U[:, 32:] spans their complement),
    # with a large singular value: it becomes the top singular vector of W_ft
    u_new = U[:, 40]
    v_new = V[:, 0] * 0.6 + V[:, 1] * 0.8
    W_ft = W + 20.0 * torch.outer(u_new, v_new)
    res = diagnostics.intruder_dimensions(W, W_ft, k=5, eps=0.5, side=side)
    if side == "left":  # u_new has no component in the pre-trained column space
        assert res.count == 1 and res.indices == [0] and res.max_similarity[0] < 0.3
        assert int(res) == 1
    else:  # v_new mixes two pre-trained right singular vectors: not an intruder on that side
        assert 0 not in res.indices and res.max_similarity[0] > 0.7
    assert (res.max_similarity <= 1 + 1e-12).all()


def test_no_intruders_without_new_directions():
    W, _, _ = _weight()
    res = diagnostics.intruder_dimensions(W, W.clone(), k=10, eps=0.9)
    assert res.count == 0
    torch.testing.assert_close(res.max_similarity, torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-10)
    g = torch.Generator().manual_seed(3)
    noisy = W + 1e-3 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    assert diagnostics.intruder_dimensions(W, noisy, k=10, eps=0.5).count == 0


def test_spectral_drift_zero_for_identical_and_measures_a_rotation():
    W, U, V = _weight()
    d = diagnostics.spectral_drift(W, W.clone(), k=4)
    assert d.left_angles.abs().max() < 1e-6 and d.right_angles.abs().max() < 1e-6
    assert d.left_overlap == pytest.approx(1.0) and d.sv_rel_change.abs().max() < 1e-12
    # rotate the top left singular vector by θ inside span(U[:,0], U[:,40]); scale the top σ by 1.5
    theta = 0.3
    s = torch.linspace(5, 1, 32, dtype=torch.float64)
    U2 = U[:, :32].clone()
    U2[:, 0] = math.cos(theta) * U[:, 0] + math.sin(theta) * U[:, 40]
    s2 = s.clone()
    s2[0] *= 1.5
    W_ft = (U2 * s2) @ V.T
    d = diagnostics.spectral_drift(W, W_ft, k=4)
    assert d.left_angles[-1].item() == pytest.approx(theta, abs=1e-8)
    assert d.left_angles[:-1].abs().max() < 1e-6 and d.right_angles.abs().max() < 1e-6
    assert d.left_overlap == pytest.approx((3 + math.cos(theta) ** 2) / 4)
    assert d.sv_rel_change[0].item() == pytest.approx(0.5) and d.sv_rel_change[1:].abs().max() < 1e-12


def test_bad_inputs():
    W, _, _ = _weight()
    with pytest.raises(ValueError, match="same shape"):
        diagnostics.intruder_dimensions(W, W[:, :5], k=2)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, min\(m, n\) = 32\]"):
        diagnostics.spectral_drift(W, W, k=33)
    with pytest.raises(ValueError, match="side"):
        diagnostics.intruder_dimensions(W, W, k=2, side="up")
