"""Plain-PyTorch references of the linear-algebra ops (tests and benchmarks only).

Every function returns what its op returns; SVDs as ``(U, S, Vh)`` with
``U (..., m, k)``, ``S (..., k)`` non-increasing, ``Vh (..., k, n)``.  Singular
vectors are unique only up to sign (and rotation inside repeated singular
values), so tests compare reconstructions and subspaces, not vectors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def truncated_svd_ref(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Optimal rank-``rank`` SVD of ``M`` by a full ``torch.linalg.svd`` (fp32 compute for low precision)."""
    Mc = M.to(_compute_dtype(M.dtype))
    U, S, Vh = torch.linalg.svd(Mc, full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def rsvd_ref(A: Tensor, rank: int, oversample: int = 8, n_iter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Halko, Martinsson & Tropp (2011), Alg. 4.4 (randomized subspace iteration) + Alg. 5.1.

    Gaussian test matrix of ``rank + oversample`` columns from a CPU generator
    seeded with ``seed``; ``n_iter`` power iterations, re-orthonormalised by QR
    after every product with ``A`` or ``Aᵀ``; then the SVD of the small ``Qᵀ·A``.
    """
    m, n = A.shape[-2], A.shape[-1]
    k = min(rank + oversample, m, n)
    Ac = A.to(_compute_dtype(A.dtype))
    gen = torch.Generator().manual_seed(seed)
    Omega = torch.randn(*A.shape[:-2], n, k, generator=gen, dtype=Ac.dtype).to(A.device)
    Q = torch.linalg.qr(Ac @ Omega).Q
    for _ in range(n_iter):
        Z = torch.linalg.qr(Ac.mT @ Q).Q
        Q = torch.linalg.qr(Ac @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ Ac, full_matrices=False)
    U = Q @ Ub
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def pivoted_qr_ref(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Businger–Golub column-pivoted Householder QR: ``A[:, perm] = Q·R``, ``|diag R|`` non-increasing.

    Plain loops (one reflector per column, exact column norms recomputed each
    step): slow and obviously correct.  Returns ``Q (m, k)``, ``R (k, n)``,
    ``perm (n,)`` int64 with ``k = min(m, n)``.
    """
    if A.dim() != 2:
        raise ValueError(f"pivoted_qr_ref: A must be 2-D, got shape {tuple(A.shape)}")
    R = A.to(_compute_dtype(A.dtype)).clone()
    m, n = R.shape
    k = min(m, n)
    perm = torch.arange(n, device=A.device)
    Qfull = torch.eye(m, dtype=R.dtype, device=A.device)
    for j in range(k):
        norms = R[j:, j:].norm(dim=0)
        p = j + int(torch.argmax(norms))
        if p != j:
            R[:, [j, p]] = R[:, [p, j]]
            perm[[j, p]] = perm[[p, j]]
        x = R[j:, j]
        alpha = x.norm()
        if alpha == 0:
            continue
        v = x.clone()
        v[0] += torch.sign(x[0]) * alpha if x[0] != 0 else alpha
        v = v / v.norm()
        R[j:, j:] -= 2.0 * torch.outer(v, v @ R[j:, j:])
        Qfull[:, j:] -= 2.0 * torch.outer(Qfull[:, j:] @ v, v)
    return Qfull[:, :k], torch.triu(R[:k, :]), perm


def factored_svd_ref(B: Tensor, A: Tensor, weights: Optional[Tensor] = None, rank: Optional[int] = None):
    """SVD of the dense product ``B·diag(weights)·A`` (the m×n matrix is formed)."""
    Bc = B.to(_compute_dtype(B.dtype))
    if weights is not None:
        Bc = Bc * weights.to(Bc.dtype)
    M = Bc @ A.to(Bc.dtype)
    k = min(B.shape[-1], M.shape[-2], M.shape[-1]) if rank is None else rank
    return truncated_svd_ref(M, k)


def svd_update_ref(U: Tensor, S: Tensor, Vh: Tensor, P: Tensor, Q: Tensor, rank: int):
    """Truncated SVD of the dense ``U·diag(S)·Vh + P·Qᵀ``."""
    dt = _compute_dtype(U.dtype)
    M = (U.to(dt) * S.to(dt).unsqueeze(-2)) @ Vh.to(dt) + P.to(dt) @ Q.to(dt).mT
    return truncated_svd_ref(M, rank)


def svd_append_ref(U: Tensor, S: Tensor, Vh: Tensor, C: Tensor, rank: int, dim: int = 1):
    """Truncated SVD of ``[U·diag(S)·Vh, C]`` (``dim=1``: new columns, ``C (m, c)``) or of
    ``[U·diag(S)·Vh; C]`` (``dim=0``: new rows, ``C (c, n)``); ``C`` may be sparse."""
    dt = _compute_dtype(U.dtype)
    M = (U.to(dt) * S.to(dt).unsqueeze(-2)) @ Vh.to(dt)
    Cd = (C.to_dense() if C.is_sparse or C.layout != torch.strided else C).to(dt)
    return truncated_svd_ref(torch.cat([M, Cd], dim=-1 if dim in (1, -1) else -2), rank)
