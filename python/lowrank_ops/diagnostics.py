"""Spectral diagnostics of fine-tuned weights.

* :func:`intruder_dimensions` — Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An
  Illusion of Equivalence", https://arxiv.org/abs/2410.21228 (definition of intruder dimensions): a singular
  vector ``y_j`` among the top ``k`` of the fine-tuned ``W_ft`` is an *intruder dimension* when
  ``max_i |cos(y_j, x_i)| < ε`` over **all** singular vectors ``x_i`` of the pre-trained
  ``W_pre``.  Default: left singular vectors (columns of ``U``; our reading of the paper);
  ``side="right"`` tests the rows of ``Vh``.
* :func:`spectral_drift` — how the top-``k`` singular structure moved: principal angles between
  the top-``k`` left and right singular subspaces, and the relative change of the top-``k``
  singular values.

Both compute in float64 (these are analysis tools; exactness beats speed) with full
``torch.linalg.svd``: every singular vector of ``W_pre`` is needed for the intruder test.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["IntruderResult", "intruder_dimensions", "SpectralDrift", "spectral_drift"]


def _check(op: str, W_pre: Tensor, W_ft: Tensor, k: int) -> None:
    if W_pre.dim() != 2 or W_pre.shape != W_ft.shape:
        raise ValueError(f"{op}: W_pre and W_ft must be 2-D of the same shape, got {tuple(W_pre.shape)} and {tuple(W_ft.shape)}")
    if not isinstance(k, int) or not 1 <= k <= min(W_pre.shape):
        raise ValueError(f"{op}: k must be an int in [1, min(m, n) = {min(W_pre.shape)}], got {k!r}")


@dataclass
class IntruderResult:
    """``count`` intruders among the top ``k``; ``indices`` (ranks in ``W_ft``'s spectrum, 0-based)
    and ``max_similarity[j] = max_i |cos(y_j, x_i)|`` for every top-``k`` vector ``y_j``."""

    count: int
    indices: list[int]
    max_similarity: Tensor

    def __int__(self) -> int:
        return self.count


@torch.no_grad()
def intruder_dimensions(W_pre: Tensor, W_ft: Tensor, k: int = 10, eps: float = 0.5, side: str = "left") -> IntruderResult:
    """Intruder dimensions of ``W_ft`` relative to ``W_pre`` (Shuttleworth et al. 2024).

    Args:
        W_pre, W_ft: ``(m, n)`` pre-trained and fine-tuned weights.
        k: how many top singular vectors of ``W_ft`` to test.
        eps: similarity threshold ``ε`` (the paper sweeps it; 0.5 is a middle value).
        side: ``"left"`` (columns of ``U``) or ``"right"`` (rows of ``Vh``).
    """
    _check("intruder_dimensions", W_pre, W_ft, k)
    if side not in ("left", "right"):
        raise ValueError(f"intruder_dimensions: side must be 'left' or 'right', got {side!r}")
    U0, _, V0h = torch.linalg.svd(W_pre.double(), full_matrices=False)
    U1, _, V1h = torch.linalg.svd(W_ft.double(), full_matrices=False)
    X, Y = (U0, U1[:, :k]) if side == "left" else (V0h.mT, V1h[:k].mT)
    # singular vectors are unit-norm, so |XᵀY| holds the |cosines|; sign is arbitrary
    sim = (X.mT @ Y).abs().amax(0)
    idx = torch.nonzero(sim < eps).flatten().tolist()
    return IntruderResult(len(idx), idx, sim)


@dataclass
class SpectralDrift:
    """Top-``k`` drift of ``W_ft`` from ``W_pre``.

    ``left_angles`` / ``right_angles``: principal angles (radians, ascending) between the top-``k``
    left / right singular subspaces, ``θ_i = arccos σ_i(U_preᵀ·U_ft)``; 0 = same subspace.
    ``left_overlap`` / ``right_overlap``: ``‖U_preᵀ·U_ft‖_F² / k ∈ [0, 1]`` (mean ``cos² θ``).
    ``sv_rel_change``: ``(σ_ft,i − σ_pre,i) / σ_pre,i`` for ``i < k`` (signed; ``σ_pre,i = 0`` → inf/nan).
    """

    left_angles: Tensor
    right_angles: Tensor
    left_overlap: float
    right_overlap: float
    sv_rel_change: Tensor


@torch.no_grad()
def spectral_drift(W_pre: Tensor, W_ft: Tensor, k: int = 10) -> SpectralDrift:
    """Principal angles between top-``k`` singular subspaces and relative top-``k`` singular-value change."""
    _check("spectral_drift", W_pre, W_ft, k)
    U0, S0, V0h = torch.linalg.svd(W_pre.double(), full_matrices=False)
    U1, S1, V1h = torch.linalg.svd(W_ft.double(), full_matrices=False)

    def angles(P: Tensor, Q: Tensor) -> tuple[Tensor, float]:
        M = P.mT @ Q
        c = torch.linalg.svdvals(M).clamp(0.0, 1.0)
        return torch.arccos(c), float(M.square().sum()) / k  # c descending → angles ascending

    la, lo = angles(U0[:, :k], U1[:, :k])
    ra, ro = angles(V0h[:k].mT, V1h[:k].mT)
    return SpectralDrift(la, ra, lo, ro, (S1[:k] - S0[:k]) / S0[:k])
