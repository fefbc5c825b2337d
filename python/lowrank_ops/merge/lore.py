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

Memory: no ``δᵢ`` is kept.  Each iteration accumulates ``Σ(xᵢ − θ₀ − δᵢ)`` (the
``θ₀`` step) and ``Σ wᵢδᵢ`` (the merge) model by model, and the objective comes
from each SVD's own spectrum (see ``_iterate``), so the working set is ``θ₀``, the
two accumulators, one model and one SVD, whatever ``N``.
The method is base-free and iterates over all ``N`` models; it indexes
``tensors[i]`` whenever it needs model ``i`` and keeps none, so the streaming
engine hands it a sequence that reads the model's tensor from disk each time
(``lazy_inputs``): the inputs are then never all in memory, at the cost of
one read per model and iteration.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import compute_dtype
from .registry import register


def svt(M: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``(SVT_τ(M), ‖SVT_τ(M)‖_*)``: singular values shrunk by ``tau`` (the prox of ``tau·‖·‖_*``)."""
    f, nuc, _ = _svt_factors(M, tau)
    return _dense(f), nuc


def _svt_factors(M: Tensor, tau: float):
    """SVT of ``M`` as ``((U_r·S_r, V_rᵀ) or a dense matrix when that is smaller, ‖·‖_*, ‖M − SVT(M)‖²_F)``;
    the last is ``Σ min(sⱼ, τ)²`` (``M − SVT_τ(M) = U·diag(min(s, τ))·Vᵀ``)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    resid = float(S.clamp_max(tau).square().sum())
    S = (S - tau).clamp_min(0)
    r = int((S > 0).sum())
    m, n = M.shape
    if (m + n) * r >= m * n:
        return (U[:, :r] * S[:r]) @ Vh[:r], S.sum(), resid
    return ((U[:, :r] * S[:r]), Vh[:r].clone()), S.sum(), resid


def _dense(f) -> Tensor:
    return f[0] @ f[1] if isinstance(f, tuple) else f


def _add_(out: Tensor, f, alpha: float = 1.0) -> Tensor:
    """``out += alpha·δ`` for ``δ`` factored or dense, without a dense temporary."""
    if isinstance(f, tuple):
        return out.addmm_(f[0], f[1], alpha=alpha)
    return out.add_(f, alpha=alpha)


def _iterate(X: Sequence[Tensor], dt: torch.dtype, mu: Optional[float], mu_rel: float, iters: int, tol: float,
             weights: Optional[Sequence[float]] = None, keep: bool = False):
    """SVT coordinate descent (Eq. 3) on 2-D ``X``: ``(θ₀, Σ wᵢδᵢ, [δᵢ] if keep, objective per iteration)``.

    Per iteration and model: ``Dᵢ = xᵢ − θ₀``, ``δᵢ = SVT_{μ/2}(Dᵢ)``; ``Σ(Dᵢ − δᵢ)`` and ``Σ wᵢδᵢ`` are
    accumulated and ``δᵢ`` dropped (kept only for ``keep``).  The new ``θ₀' = θ₀ + g``, ``g = mean(Dᵢ − δᵢ)``,
    and the objective at ``(θ₀', δ)`` is ``Σᵢ‖Dᵢ − δᵢ‖² − N‖g‖² + μ·Σᵢ‖δᵢ‖_*`` (expand
    ``‖θ₀' + δᵢ − xᵢ‖² = ‖g − (Dᵢ − δᵢ)‖²``) with ``‖Dᵢ − δᵢ‖² = Σ min(s, μ/2)²`` from the SVD, so nothing of
    size ``N·P`` is ever held.  ``X[i]`` is indexed whenever model ``i`` is needed and never kept (the
    streaming engine's sequence reads it from disk each time: once per iteration, plus twice to start)."""
    n = len(X)
    theta0 = None
    for i in range(n):
        x = X[i].to(dt)
        theta0 = x.clone() if theta0 is None else theta0.add_(x)
        del x
    theta0.div_(n)
    if mu is None:
        mu = float(mu_rel) * max(float(torch.linalg.matrix_norm(X[i].to(dt) - theta0, ord=2)) for i in range(n))
    mu = float(mu)
    w = [1.0] * n if weights is None else [float(v) for v in weights]
    merged, deltas, history = torch.zeros_like(theta0), [], []
    for _ in range(int(iters)):
        obj, acc = 0.0, torch.zeros_like(theta0)
        merged.zero_()
        deltas = []
        for i in range(n):
            D = X[i].to(dt) - theta0
            acc.add_(D)
            f, nuc, resid = _svt_factors(D, mu / 2)
            del D
            obj += resid + mu * float(nuc)
            _add_(acc, f, -1.0)
            _add_(merged, f, w[i])
            if keep:
                deltas.append(_dense(f))
            del f
        theta0.add_(acc, alpha=1.0 / n)
        obj -= float(torch.dot(acc.reshape(-1), acc.reshape(-1))) / n  # N‖g‖² = ‖Σ(Dᵢ − δᵢ)‖² / N
        del acc
        history.append(obj)
        if len(history) > 1 and history[-2] - obj <= tol * max(abs(history[-2]), 1e-30):
            break
    return theta0, merged, deltas, history


def lore_estimate(tensors: Sequence[Tensor], mu: Optional[float] = None, mu_rel: float = 0.1, iters: int = 20,
                  tol: float = 1e-7) -> tuple[Tensor, list[Tensor], list[float]]:
    """``(θ₀, [δᵢ], objective per iteration)`` for 2-D ``tensors`` by SVT coordinate descent (Eq. 3)."""
    dt = compute_dtype(tensors[0])
    theta0, _, deltas, history = _iterate(tensors, dt, mu, mu_rel, iters, tol, keep=True)
    return theta0, deltas or [torch.zeros_like(theta0) for _ in tensors], history


@register("lore", paper="LoRE-Merging: Exploring Low-Rank Estimation For Large Language Model Merging",
          url="https://arxiv.org/abs/2502.10749", needs_base=False, lazy_inputs=True,
          params={"mu": None, "mu_rel": 0.1, "iters": 20, "scaling": 1.0})
def lore_tensor(base, tensors, weights, *, name="", mu=None, mu_rel=0.1, iters=20, scaling=1.0, **_):
    """Base-free LoRE merge of one tensor (a given ``base`` is ignored: the method estimates its own)."""
    first = tensors[0]
    dt, like, matrix = compute_dtype(first), first.dtype, first.dim() == 2 and first.numel() > 0
    del first  # the engine's lazy sequence reads a model each time it is indexed: hold none
    if not matrix:
        return torch.stack([tensors[i].to(dt) for i in range(len(tensors))]).mean(0).to(like)
    theta0, merged, _, _ = _iterate(tensors, dt, mu, mu_rel, iters, 1e-7, weights=weights)
    return theta0.add_(merged, alpha=float(scaling)).to(like)
