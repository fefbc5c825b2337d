"""LoRE-Merging: base-free merging by low-rank estimation (Liu et al. 2025).

"LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model
Merging", Eq. (3): without the base model, estimate it and low-rank task
vectors jointly,

    min_{θ₀, δ₁..δ_N}  Σᵢ ‖θ₀ + δᵢ − θᵢ‖²_F + μ ‖δᵢ‖_*,

by coordinate descent: ``δᵢ ← SVT_{μ/2}(θᵢ − θ₀)`` (singular value
thresholding, the exact minimiser over ``δᵢ``) and ``θ₀ ← mean(θᵢ − δᵢ)`` (exact
over ``θ₀``), so the objective never increases.  The merge is then task
arithmetic on the estimates, ``θ = θ₀ + scaling · Σ wᵢ δᵢ``.

``μ`` is absolute when ``mu`` is given; by default it is ``mu_rel`` times the
largest singular value of the centred models ``θᵢ − mean(θ)`` (scale-free).
Non-matrix tensors (no nuclear norm) are averaged.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import compute_dtype
from .registry import register


def svt(M: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``(SVT_τ(M), ‖SVT_τ(M)‖_*)``: singular values shrunk by ``tau`` (the prox of ``tau·‖·‖_*``)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    S = (S - tau).clamp_min(0)
    r = int((S > 0).sum())
    return (U[:, :r] * S[:r]) @ Vh[:r], S.sum()


def lore_estimate(tensors: Sequence[Tensor], mu: Optional[float] = None, mu_rel: float = 0.1, iters: int = 20,
                  tol: float = 1e-7) -> tuple[Tensor, list[Tensor], list[float]]:
    """``(θ₀, [δᵢ], objective per iteration)`` for 2-D ``tensors`` by SVT coordinate descent (Eq. 3)."""
    dt = compute_dtype(tensors[0])
    X = [t.to(dt) for t in tensors]
    theta0 = torch.stack(X).mean(0)
    if mu is None:
        mu = float(mu_rel) * max(float(torch.linalg.matrix_norm(x - theta0, ord=2)) for x in X)
    mu = float(mu)
    deltas = [torch.zeros_like(theta0) for _ in X]
    history: list[float] = []
    for _ in range(int(iters)):
        nuc = 0.0
        for i, x in enumerate(X):
            deltas[i], nn_ = svt(x - theta0, mu / 2)
            nuc += float(nn_)
        theta0 = torch.stack([x - d for x, d in zip(X, deltas)]).mean(0)
        obj = sum(float(((theta0 + d - x) ** 2).sum()) for x, d in zip(X, deltas)) + mu * nuc
        history.append(obj)
        if len(history) > 1 and history[-2] - obj <= tol * max(abs(history[-2]), 1e-30):
            break
    return theta0, deltas, history


@register("lore", paper="LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging",
          url="https://arxiv.org/abs/2502.10749", needs_base=False,
          params={"mu": None, "mu_rel": 0.1, "iters": 20, "scaling": 1.0})
def lore_tensor(base, tensors, weights, *, name="", mu=None, mu_rel=0.1, iters=20, scaling=1.0, **_):
    """Base-free LoRE merge of one tensor (a given ``base`` is ignored: the method estimates its own)."""
    dt = compute_dtype(tensors[0])
    if tensors[0].dim() != 2 or tensors[0].numel() == 0:
        return torch.stack([t.to(dt) for t in tensors]).mean(0).to(tensors[0].dtype)
    theta0, deltas, _ = lore_estimate(tensors, mu, mu_rel, iters)
    merged = theta0 + float(scaling) * sum(float(w) * d for w, d in zip(weights, deltas))
    return merged.to(tensors[0].dtype)
