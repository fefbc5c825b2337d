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
``weights`` scale each task vector first.

Step 1 uses ``lowrank_ops.ops.rsvd`` (``svd="rsvd"``, the default; its
Gram route for ``k`` near ``min(m, n)/N``, exact when the Krylov space would
cover ``min(m, n)``) or the dense ``torch.linalg.svd`` (``svd="exact"``, the
paper's code).  Step 3's polar factors come from dense SVDs: of the ``m × Nk``
and ``n × Nk`` stacks, or for a tall stack of the ``Nk × Nk`` factor of its QR.  Memory: registered with ``register_per_task``, so the
streaming engine reads one task vector at a time and keeps only the ``k``
leading triplets of each (copies: the full ``U``/``Vh`` are freed at once).
"""
from __future__ import annotations

import torch

from ..ops import linalg as lops
from .registry import register_per_task


def _polar(M: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``P·Qᵀ`` of ``M = P·S·Qᵀ``.  A tall ``M`` (m > K) goes through its
    Householder QR, ``polar(Q·R) = Q·polar(R)``, so the SVD works on the K × K ``R`` (its workspace is K², not
    m·K) and ``M`` is dropped once factored (callers pass it as a temporary)."""
    m, K = M.shape
    if m > K:
        Q, R = torch.linalg.qr(M)
        del M
        return Q @ _polar(R)
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def _reduce(tau, w, *, index, count, name, shape, sv_reduction=None, svd="rsvd", **_):
    """One task's part: ``w·τ`` for a vector, its leading ``k`` singular triplets for a matrix."""
    if svd not in ("rsvd", "exact"):
        raise ValueError(f"tsv_m: svd must be 'rsvd' or 'exact', got {svd!r} (tensor {name!r})")
    frac = 1.0 / count if sv_reduction is None else float(sv_reduction)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"tsv_m: sv_reduction must lie in (0, 1], got {sv_reduction!r} (tensor {name!r})")
    tau.mul_(float(w))
    if len(shape) != 2 or tau.numel() == 0:
        return tau
    M = tau.view(shape)
    k = max(1, int(min(shape) * frac))
    U, S, Vh = lops.rsvd(M, k) if svd == "rsvd" else torch.linalg.svd(M, full_matrices=False)
    # numerically zero triplets add nothing to τ but their arbitrary vectors would bend step 3
    keep = min(k, int((S > S[:1].clamp_min(1e-300) * (torch.finfo(S.dtype).eps * max(shape))).sum()))
    return U[:, :keep].clone(), S[:keep].clone(), Vh[:keep].clone()


@register_per_task("tsv_m", paper="Task Singular Vectors: Reducing Task Interference in Model Merging",
                   url="https://arxiv.org/abs/2412.00081", reduce=_reduce,
                   params={"scaling": 1.0, "sv_reduction": None, "svd": "rsvd"})
def tsv_m_combine(parts, *, name, shape, **_):
    """TSV-M of one tensor from the tasks' parts: the mean for vectors, ``U⊥ Σ V⊥ᵀ`` for matrices."""
    if not isinstance(parts[0], tuple):
        mean = torch.zeros_like(parts[0])
        for p in parts:
            mean += p
        return mean / len(parts)
    Us, S, Vhs = [p[0] for p in parts], torch.cat([p[1] for p in parts]), [p[2] for p in parts]
    parts.clear()  # each stack below then holds the only copy of its factors
    U = _polar(_cat_(Us, 1))
    Vh = _polar(_cat_(Vhs, 0).mT).mT
    return ((U * S) @ Vh).reshape(-1)


def _cat_(xs: list, dim: int) -> torch.Tensor:
    """``torch.cat(xs, dim)``, emptying ``xs`` so the pieces are freed as soon as the stack exists."""
    out = torch.cat(xs, dim=dim)
    xs.clear()
    return out
