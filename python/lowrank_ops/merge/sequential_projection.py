"""Sequential orthogonal-projection merging (OPCM; Tang et al. 2025).

"Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging", §3 (Eqs. 5–8), following the authors'
release.  Models arrive one at a time; the merged task vector ``M_{t−1}`` has
SVD ``U S Vᵀ``.  The next task vector ``τ_t`` is expressed in that basis,
``P = Uᵀ τ_t V``, and cleaned of what would interfere with the merge so far:

* the diagonal of ``P`` (the components along each ``uⱼ vⱼᵀ``, so
  ``⟨τ_t^⊥, M_{t−1}⟩_F = 0``), and
* the top-left ``r × r`` block, ``r`` the smallest rank whose singular values
  hold more than ``alpha`` of ``Σ S`` (the span of the dominant left *and*
  right singular vectors),

``τ_t^⊥ = U P' Vᵀ``.  The running sum ``S_t = S_{t−1} + τ_t^⊥`` is rescaled so
its norm equals the mean task-vector norm (the adaptive ``λ_t``, Eq. 8):
``θ = θ₀ + S_T · mean‖τᵢ‖ / ‖S_T‖``.  The paper takes norms over the whole
model; here they are per tensor (streamable).  Non-matrix tensors are added
without projection.  Thin SVDs only: the blocks of ``P`` outside the thin
basis are left untouched, which is what the full-basis formula does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import compute_dtype
from .registry import register


def project_out(merged: Tensor, tau: Tensor, alpha: float = 0.5) -> Tensor:
    """``τ^⊥``: ``tau`` without the diagonal and the dominant ``r × r`` block of ``Uᵀ tau V`` (``merged = U S Vᵀ``)."""
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    total = S.sum()
    if total <= 0:
        return tau.clone()
    r = int((S.cumsum(0) / total > alpha).float().argmax())
    P = U.mT @ tau @ Vh.mT  # (k, k) coordinates in the thin basis
    remove = torch.diag_embed(P.diagonal())
    remove[:r, :r] = P[:r, :r]
    return tau - U @ remove @ Vh


@register("sequential_projection",
          paper="Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging",
          url="https://arxiv.org/abs/2501.09522", params={"alpha": 0.5, "rescale": True})
def sequential_projection_tensor(base, tensors, weights, *, name="", alpha=0.5, rescale=True, **_):
    """OPCM merge of one tensor, models taken in the given order."""
    dt = compute_dtype(base)
    b = base.to(dt)
    taus = (float(w) * (x.to(dt) - b) for w, x in zip(weights, tensors))
    total = next(taus)
    norms = [float(total.norm())]
    for tau in taus:
        norms.append(float(tau.norm()))
        total = total + (project_out(total, tau, float(alpha)) if b.dim() == 2 and b.numel() else tau)
    if rescale:
        n = float(total.norm())
        if n > 0:
            total = total * (sum(norms) / len(norms) / n)
    return (b + total).to(base.dtype)
