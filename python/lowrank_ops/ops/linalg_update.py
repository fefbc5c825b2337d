"""Factored and updating SVDs: ``factored_svd``, ``svd_update``, ``svd_append``.

Python halves of the ops declared in ``cpp/registration.cpp`` (fragment
``lowrank_ops.ops.linalg_update``): typed wrappers and fake kernels.  All three
rewrite the new matrix as ``[U, Q_l] · K · [V, Q_r]ᵀ`` with orthonormal bases
and a small core ``K`` ((k+c) × (k+c)), take the SVD of ``K`` and rotate, so
their cost is ``O((m+n)(k+c)²)`` and the ``m×n`` matrix is never formed.

Conventions (the ``lowrank_ops.linalg`` contract): ``U (..., m, r)``,
``S (..., r)`` non-increasing and non-negative, ``Vh (..., r, n)``; fp64 in →
fp64 out, any other floating dtype → fp32 compute and output.  Singular vectors
are unique only up to sign (and rotation within repeated singular values).

Not differentiable: a backward through them raises (backpropagating through
an SVD update is ill-conditioned at repeated singular values and no method in
this library needs it); call them under ``torch.no_grad()`` or on detached
tensors.  Non-finite input raises an error that names the op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .linalg import _not_differentiable, _setup_nothing

_lib = torch.ops.lowrank_ops


def factored_svd(B: Tensor, A: Tensor, weights: Optional[Tensor] = None, rank: Optional[int] = None):
    """Exact thin SVD of ``B · diag(weights) · A`` without forming the product.

    With ``B = Q_B·R_B`` and ``Aᵀ = Q_A·R_A`` (thin QRs), ``B·diag(w)·A =
    Q_B · (R_B·diag(w)·R_Aᵀ) · Q_Aᵀ``, so the SVD ``U_K·S·V_Kᵀ`` of the small
    middle factor gives ``U = Q_B·U_K``, ``Vh = V_Kᵀ·Q_Aᵀ`` exactly.  Cost
    ``O((m+n)·R²)``.  The SVD of a weighted sum of LoRAs ``Σ sᵢ·Bᵢ·Aᵢ`` is
    ``factored_svd(cat([B₁…], 1), cat([A₁…], 0), weights=cat([s₁·1…]))``.

    Args:
        B: ``(..., m, R)``.  A: ``(..., R, n)``, same leading dims.
        weights: ``(R,)`` or ``(..., R)``, or None (all ones).
        rank: number of triplets kept, ``0 <= rank <= min(m, n, R)``; default ``min(m, n, R)``.

    Returns:
        ``(U (..., m, rank), S (..., rank), Vh (..., rank, n))``.
    """
    return _lib.factored_svd(B, A, weights, rank)


def svd_update(U: Tensor, S: Tensor, Vh: Tensor, P: Tensor, Q: Tensor, rank: int):
    """Truncated SVD of ``U·diag(S)·Vh + P·Qᵀ`` (Brand 2006, "Fast low-rank modifications of the thin SVD", §2–3).

    ``P = U·X_P + Q_P·R_P`` and ``Q = V·X_Q + Q_Q·R_Q`` (projection, then QR of
    the orthogonal residual, Brand's Eq. 2), so the sum equals
    ``[U, Q_P] · K · [V, Q_Q]ᵀ`` with ``K = [[S, 0], [0, 0]] + [X_P; R_P]·[X_Q; R_Q]ᵀ``
    (Brand's Eq. 3); the SVD of ``K`` is rotated back.  Cost ``O((m+n)(k+c)² + (k+c)³)``.

    ``U`` / ``Vh`` must have orthonormal columns / rows (not checked).  The
    residuals are projected twice (classical Gram–Schmidt twice) so the new
    directions stay orthogonal to ``U`` / ``V`` to working precision; the
    rotations themselves add ``O(ε)`` of non-orthogonality per call.  After
    many chained updates re-orthonormalise with
    ``factored_svd(U * S, Vh)`` (two QRs, ``O((m+n)k²)``).

    Args:
        U: ``(..., m, k)``.  S: ``(..., k)``.  Vh: ``(..., k, n)``.
        P: ``(..., m, c)``.  Q: ``(..., n, c)``.  Same leading dims throughout.
        rank: ``0 <= rank <= min(m, n, k + c)``.

    Returns:
        ``(U' (..., m, rank), S' (..., rank), Vh' (..., rank, n))``.
    """
    return _lib.svd_update(U, S, Vh, P, Q, int(rank))


def svd_append(U: Tensor, S: Tensor, Vh: Tensor, C: Tensor, rank: int, dim: int = 1):
    """Truncated SVD after appending columns or rows (Zha & Simon 1999, Eq. 2.3).

    ``dim=1``: SVD of ``[U·diag(S)·Vh, C]`` with ``C (..., m, c)``;
    ``dim=0``: SVD of ``[U·diag(S)·Vh; C]`` with ``C (..., c, n)``.  With
    ``C = U·X + Q_C·R_C``, ``[A, C] = [U, Q_C] · [[S, X], [0, R_C]] · blockdiag(Vh, I)``.

    A sparse ``C`` (COO, CSR or CSC; 2-D, unbatched) takes the sparse path of
    "Fast Updating Truncated SVD for Representation Learning with Sparse
    Matrices" (Deng et al., ICLR 2024): the complement ``C − U·UᵀC`` is never
    formed; its Gram matrix ``CᵀC − 2·XᵀX + Xᵀ(UᵀU)X`` (fp64, exact for a basis
that is orthonormal only to rounding) is diagonalised in the ``c×c``
    space, and the new basis is ``U·Y₁ + C·Z`` — one GEMM plus one sparse
    product, ``O(nnz·(k + r + c) + (m+n)·k·r)``.  The custom op takes the
    appended vectors as the CSR components ``(crow, col, val)`` of a ``(c, L)``
    matrix (``torch.ops.lowrank_ops.svd_append_sparse``); this wrapper converts.
    Residual directions below ``1e-7·‖C‖_F`` are dropped there (rounding level
    of the Gram form), so the sparse path is exact to that absolute level in fp64.

    Args:
        U: ``(..., m, k)``.  S: ``(..., k)``.  Vh: ``(..., k, n)`` (orthonormal columns/rows, not checked).
        C: ``(..., m, c)`` for ``dim=1``, ``(..., c, n)`` for ``dim=0``; dense or sparse.
        rank: ``0 <= rank <= min(rows, cols, k + c)`` of the appended matrix.
        dim: 1 (columns; ``-1`` too) or 0 (rows; ``-2`` too).

    Returns:
        ``(U', S', Vh')``: ``U' (m, rank)``, ``Vh' (rank, n + c)`` for ``dim=1``;
        ``U' (m + c, rank)``, ``Vh' (rank, n)`` for ``dim=0``.
    """
    if C.layout == torch.strided:
        return _lib.svd_append(U, S, Vh, C, int(rank), int(dim))
    if C.dim() == 2 and dim in (0, 1, -1, -2):
        axis, length, what = (0, U.shape[-2], "(m, c) with m = {} (rows of `U`)") if dim in (1, -1) else \
            (1, Vh.shape[-1], "(c, n) with n = {} (columns of `Vh`)")
        if C.shape[axis] != length:
            raise ValueError(f"svd_append: with dim={dim} a sparse `C` must have shape {what.format(length)}, "
                             f"got {tuple(C.shape)}")
    crow, col, val = sparse_rows(C, dim)
    return _lib.svd_append_sparse(U, S, Vh, crow, col, val, int(rank), int(dim))


def sparse_rows(C: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR components ``(crow, col, val)`` of the appended vectors as rows: ``Cᵀ`` for ``dim=1``, ``C`` for ``dim=0``."""
    if C.dim() != 2:
        raise ValueError(f"svd_append: a sparse `C` must be 2-D (unbatched), got shape {tuple(C.shape)}")
    if dim not in (0, 1, -1, -2):
        raise ValueError(f"svd_append: `dim` must be 1 (append columns) or 0 (append rows), got {dim}")
    if C.layout == torch.sparse_csr and dim in (0, -2):
        return C.crow_indices(), C.col_indices(), C.values()
    coo = C if C.layout == torch.sparse_coo else C.to_sparse_coo()
    if dim in (1, -1):
        coo = coo.t()
    coo = coo.coalesce()  # sorted by (row, col), duplicates summed
    row, col = coo.indices()
    crow = torch.zeros(coo.shape[0] + 1, dtype=torch.int64, device=C.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=coo.shape[0]), 0)
    return crow, col, coo.values()


# --------------------------------------------------------------------------- fakes


def _out_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _svd_like(ref: Tensor, batch, m, n, rank):
    dt = _out_dtype(ref)
    return (
        ref.new_empty((*batch, m, rank), dtype=dt),
        ref.new_empty((*batch, rank), dtype=dt),
        ref.new_empty((*batch, rank, n), dtype=dt),
    )


@torch.library.register_fake("lowrank_ops::factored_svd")
def _factored_svd_fake(B, A, weights=None, rank=None):
    torch._check(B.dim() >= 2 and A.dim() == B.dim(), lambda: "factored_svd: B (..., m, R), A (..., R, n)")
    torch._check(A.shape[:-2] == B.shape[:-2], lambda: "factored_svd: B and A must share leading dims")
    torch._check(A.shape[-2] == B.shape[-1], lambda: "factored_svd: A must be (..., R, n) with R = B.shape[-1]")
    torch._check(A.dtype == B.dtype, lambda: "factored_svd: A and B must share one dtype")
    m, R, n = B.shape[-2], B.shape[-1], A.shape[-1]
    kmax = torch.sym_min(torch.sym_min(m, n), R)
    r = kmax if rank is None else rank
    torch._check(0 <= r, lambda: "factored_svd: rank must be >= 0")
    torch._check(r <= kmax, lambda: "factored_svd: rank must be <= min(m, n, R)")
    return _svd_like(B, B.shape[:-2], m, n, r)


@torch.library.register_fake("lowrank_ops::svd_update")
def _svd_update_fake(U, S, Vh, P, Q, rank):
    batch = U.shape[:-2]
    m, k, n, c = U.shape[-2], U.shape[-1], Vh.shape[-1], P.shape[-1]
    torch._check(S.shape == (*batch, k), lambda: "svd_update: S must be (..., k)")
    torch._check(Vh.shape[:-1] == (*batch, k), lambda: "svd_update: Vh must be (..., k, n)")
    torch._check(P.shape[:-1] == (*batch, m), lambda: "svd_update: P must be (..., m, c)")
    torch._check(Q.shape == (*batch, n, c), lambda: "svd_update: Q must be (..., n, c)")
    torch._check(0 <= rank, lambda: "svd_update: rank must be >= 0")
    torch._check(rank <= torch.sym_min(torch.sym_min(m, n), k + c), lambda: "svd_update: rank <= min(m, n, k + c)")
    return _svd_like(U, batch, m, n, rank)


def _append_shapes(U, S, Vh, c, rank, dim, op):
    batch = U.shape[:-2]
    m, k, n = U.shape[-2], U.shape[-1], Vh.shape[-1]
    torch._check(S.shape == (*batch, k), lambda: f"{op}: S must be (..., k)")
    torch._check(Vh.shape[:-1] == (*batch, k), lambda: f"{op}: Vh must be (..., k, n)")
    torch._check(dim in (0, 1, -1, -2), lambda: f"{op}: dim must be 0 or 1")
    rows, cols = (m, n + c) if dim in (1, -1) else (m + c, n)
    torch._check(0 <= rank, lambda: f"{op}: rank must be >= 0")
    torch._check(rank <= torch.sym_min(torch.sym_min(rows, cols), k + c), lambda: f"{op}: rank too large")
    return _svd_like(U, batch, rows, cols, rank)


@torch.library.register_fake("lowrank_ops::svd_append")
def _svd_append_fake(U, S, Vh, C, rank, dim=1):
    batch = U.shape[:-2]
    torch._check(C.shape[:-2] == batch, lambda: "svd_append: C must share U's leading dims")
    if dim in (1, -1):
        torch._check(C.shape[-2] == U.shape[-2], lambda: "svd_append: C must be (..., m, c) for dim=1")
        c = C.shape[-1]
    else:
        torch._check(C.shape[-1] == Vh.shape[-1], lambda: "svd_append: C must be (..., c, n) for dim=0")
        c = C.shape[-2]
    return _append_shapes(U, S, Vh, c, rank, dim, "svd_append")


@torch.library.register_fake("lowrank_ops::svd_append_sparse")
def _svd_append_sparse_fake(U, S, Vh, crow, col, val, rank, dim=1):
    torch._check(U.dim() == 2, lambda: "svd_append_sparse: U must be (m, k)")
    torch._check(crow.dim() == 1 and crow.shape[0] >= 1, lambda: "svd_append_sparse: crow must be (c + 1,)")
    torch._check(col.shape == val.shape, lambda: "svd_append_sparse: col and val must be (nnz,)")
    return _append_shapes(U, S, Vh, crow.shape[0] - 1, rank, dim, "svd_append_sparse")


__all__ = ["factored_svd", "svd_update", "svd_append", "sparse_rows"]


# --------------------------------------------------------------------------- autograd

for _name in ("factored_svd", "svd_update", "svd_append", "svd_append_sparse"):
    torch.library.register_autograd(f"lowrank_ops::{_name}", _not_differentiable(_name), setup_context=_setup_nothing)
