"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025).

"Task Singular Vectors: Reducing Task Interference in Model Merging", §4
(TSV-Merge).  For a 2-D tensor and ``N`` task vectors ``τᵢ = Uᵢ Σᵢ Vᵢᵀ``:

1. keep each task's top ``k = ⌊sv_reduction · min(m, n)⌋`` singular triplets
   (``sv_reduction = 1/N`` by default, so the kept ranks add up to at most full rank);
2. concatenate ``U = [U₁ₖ … U_Nₖ]`` (m × Nk), ``Σ = diag(Σ₁ₖ … Σ_Nₖ)``,
   ``V = [V₁ₖ … V_Nₖ]`` (n × Nk);
3. decorrelate the tasks by replacing ``U`` and ``V`` with their nearest
   orthonormal matrices (orthogonal Procrustes / polar factor: ``U = P S Qᵀ ->
   P Qᵀ``), Eq. (8);
4. ``τ_m = U⊥ Σ V⊥ᵀ`` and ``θ = θ₀ + scaling · τ_m``.

Tensors that are not matrices (biases, norms) are averaged, as in the paper's
code.  Numerically zero singular triplets (``σ ≤ ε·max(m, n)·σ₁``) are not kept:
they add nothing to ``τᵢ``, but their arbitrary singular vectors would take part
in the orthogonalisation of step 3 (the paper's code keeps them).  When the tasks' subspaces are already orthogonal and each task has rank
``≤ k``, step 3 changes nothing and TSV-M equals task arithmetic ``Σ τᵢ``.
``weights`` scale each task vector first.  Dense SVDs (``torch.linalg.svd``):
step 1 needs exact per-task spectra, and ``lowrank_ops.linalg`` has no dense
truncated SVD beyond its randomized one.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype
from .registry import register


def _polar(M: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


@register("tsv_m", paper="Task Singular Vectors: Reducing Task Interference in Model Merging",
          url="https://arxiv.org/abs/2412.00081", params={"scaling": 1.0, "sv_reduction": None})
def tsv_m_tensor(base, tensors, weights, *, name="", scaling=1.0, sv_reduction=None, **_):
    """TSV-M of one tensor."""
    n = len(tensors)
    dt = compute_dtype(base)
    b = base.to(dt)
    if b.dim() != 2 or b.numel() == 0:
        mean = torch.zeros_like(b)
        for w, x in zip(weights, tensors):
            mean += float(w) * (x.to(dt) - b)
        return (b + float(scaling) * mean / n).to(base.dtype)
    frac = 1.0 / n if sv_reduction is None else float(sv_reduction)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"tsv_m: sv_reduction must lie in (0, 1], got {sv_reduction!r} (tensor {name!r})")
    k = max(1, int(min(b.shape) * frac))
    Us, Ss, Vhs = [], [], []
    for w, x in zip(weights, tensors):
        U, S, Vh = torch.linalg.svd(float(w) * (x.to(dt) - b), full_matrices=False)
        # numerically zero triplets add nothing to τ but their arbitrary vectors would bend step 3
        keep = min(k, int((S > S[:1].clamp_min(1e-300) * (torch.finfo(dt).eps * max(b.shape))).sum()))
        Us.append(U[:, :keep])
        Ss.append(S[:keep])
        Vhs.append(Vh[:keep])
    U = _polar(torch.cat(Us, dim=1))
    Vh = _polar(torch.cat(Vhs, dim=0).mT).mT
    merged = (U * torch.cat(Ss)) @ Vh
    return (b + float(scaling) * merged).to(base.dtype)
