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

Memory: each ``δᵢ`` is kept as its SVT factors ``(U_r·diag(S_r), V_rᵀ)`` (dense
only when that would be larger), ``θ₀`` is accumulated in place and the
objective is summed one model at a time, so the working set is one input,
``θ₀``, its accumulator, one SVD and the factors — no stacks of ``N`` dense matrices.
The method is base-free and iterates over all ``N`` models; it indexes
``tensors[i]`` whenever it needs model ``i`` and keeps none, so the streaming
engine hands it a sequence that reads the model's tensor from disk each time
(``lazy_inputs``): the inputs are then never all in memory, at the cost of
two reads per model and iteration.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import compute_dtype
from .registry import register


def svt(M: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``(SVT_τ(M), ‖SVT_τ(M)‖_*)``: singular values shrunk by ``tau`` (the prox of ``tau·‖·‖_*``)."""
    f, nuc = _svt_factors(M, tau)
    return _dense(f), nuc


def _svt_factors(M: Tensor, tau: float):
    """SVT of ``M`` as ``((U_r·S_r, V_rᵀ) or a dense matrix when that is smaller, ‖·‖_*)``."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    S = (S - tau).clamp_min(0)
    r = int((S > 0).sum())
    m, n = M.shape
    if (m + n) * r >= m * n:
        return (U[:, :r] * S[:r]) @ Vh[:r], S.sum()
    return ((U[:, :r] * S[:r]), Vh[:r].clone()), S.sum()


def _dense(f) -> Tensor:
    return f[0] @ f[1] if isinstance(f, tuple) else f


def _add_(out: Tensor, f, alpha: float = 1.0) -> Tensor:
    """``out += alpha·δ`` for ``δ`` factored or dense, without a dense temporary."""
    if isinstance(f, tuple):
        return out.addmm_(f[0], f[1], alpha=alpha)
    return out.add_(f, alpha=alpha)


def _iterate(X: Sequence[Tensor], dt: torch.dtype, mu: Optional[float], mu_rel: float, iters: int, tol: float):
    """``(θ₀, [δᵢ factored], objective per iteration)`` by SVT coordinate descent (Eq. 3) on 2-D ``X``.

    ``X[i]`` is indexed whenever model ``i`` is needed and never kept (the streaming engine's sequence reads it
    from disk each time: twice per iteration, plus twice to start)."""
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
    facs: list = []
    history: list[float] = []
    for _ in range(int(iters)):
        nuc = 0.0
        facs = []
        acc = torch.zeros_like(theta0)
        for i in range(n):  # δᵢ from the current θ₀; the next θ₀ = mean(xᵢ − δᵢ) accumulated on the way
            x = X[i].to(dt)
            f, nn_ = _svt_factors(x - theta0, mu / 2)
            facs.append(f)
            nuc += float(nn_)
            _add_(acc.add_(x), f, -1.0)
            del x
        theta0 = acc.div_(n)
        del acc
        obj = mu * nuc
        for i, f in enumerate(facs):  # ‖θ₀ + δᵢ − xᵢ‖², one model at a time
            r = _add_(theta0 - X[i].to(dt), f)
            obj += float(torch.dot(r.reshape(-1), r.reshape(-1)))
            del r
        history.append(obj)
        if len(history) > 1 and history[-2] - obj <= tol * max(abs(history[-2]), 1e-30):
            break
    return theta0, facs, history


def lore_estimate(tensors: Sequence[Tensor], mu: Optional[float] = None, mu_rel: float = 0.1, iters: int = 20,
                  tol: float = 1e-7) -> tuple[Tensor, list[Tensor], list[float]]:
    """``(θ₀, [δᵢ], objective per iteration)`` for 2-D ``tensors`` by SVT coordinate descent (Eq. 3)."""
    dt = compute_dtype(tensors[0])
    theta0, facs, history = _iterate(tensors, dt, mu, mu_rel, iters, tol)
    deltas = [_dense(f) for f in facs] if facs else [torch.zeros_like(theta0) for _ in tensors]
    return theta0, deltas, history


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
    theta0, facs, _ = _iterate(tensors, dt, mu, mu_rel, iters, 1e-7)
    acc = torch.zeros_like(theta0)
    for w, f in zip(weights, facs):
        _add_(acc, f, float(w))
    return theta0.add_(acc, alpha=float(scaling)).to(like)
