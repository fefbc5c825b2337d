"""Checks shared by the factored/updating SVD tests (``tests/ops/test_{factored_svd,svd_update,svd_append}.py``).

An SVD is judged by what is unique about it, never by its vectors (signs and
rotations inside repeated singular values are free):

* shapes and dtype (fp64 in → fp64 out, else fp32);
* ``S`` non-negative, non-increasing, and equal to the true top singular values;
* ``U`` orthonormal columns, ``Vh`` orthonormal rows;
* the reconstruction ``U·diag(S)·Vh`` equals the optimal rank-``r`` truncation
  of the true matrix (computed in fp64 by a full SVD) — for an exactly rank-``r``
  matrix that is the matrix itself — and its residual equals the optimal
  truncation error ``sqrt(Σ_{i>r} σᵢ²)``.

Tolerances (relative, Frobenius, in units of ‖M‖): 1e-10 for fp64 compute,
1e-5 for fp32 compute (the spec's accuracy targets).  bfloat16/float16 inputs are
computed in fp32, but factors ``U``/``Vh`` rounded to 8 or 11 bits are orthonormal
only to that precision, and the updates assume orthonormal inputs: the bound for
ops that take such factors is the input dtype's ε (``tol=input_tol(dtype)``).
"""
from __future__ import annotations

import torch
from torch import Tensor

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def input_tol(dtype: torch.dtype) -> float:
    """Tolerance for an op whose inputs include orthonormal factors stored in ``dtype``."""
    return TOL[dtype] if dtype in TOL else torch.finfo(dtype).eps


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand_orth(*shape: int, gen=None) -> Tensor:
    """fp64 matrix (..., m, k) with orthonormal columns."""
    return torch.linalg.qr(torch.randn(*shape, dtype=torch.float64, generator=gen)).Q


def rand_svd(batch: tuple, m: int, n: int, k: int, dtype=torch.float64, spread: float = 10.0):
    """A rank-``k`` SVD ``(U, S, Vh)`` with well-separated singular values from ``spread`` down to 1."""
    U = rand_orth(*batch, m, k)
    V = rand_orth(*batch, n, k)
    S = torch.logspace(torch.log10(torch.tensor(spread)).item(), 0.0, k, dtype=torch.float64).expand(*batch, k)
    return U.to(dtype), S.contiguous().to(dtype), V.mT.contiguous().to(dtype)


def dense(U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """``U·diag(S)·Vh`` in fp64."""
    U, S, Vh = (t.detach().to(torch.float64) for t in (U, S, Vh))
    return (U * S.unsqueeze(-2)) @ Vh


def check_svd(got, M: Tensor, rank: int, in_dtype: torch.dtype, ortho: bool = True, tol: float | None = None):
    """Assert ``got = (U, S, Vh)`` is a correct rank-``rank`` truncated SVD of the fp64 matrix ``M (..., m, n)``."""
    U, S, Vh = got
    batch, m, n = M.shape[:-2], M.shape[-2], M.shape[-1]
    dt = out_dtype(in_dtype)
    tol = TOL[dt] if tol is None else tol
    assert U.shape == (*batch, m, rank), f"U shape {tuple(U.shape)}, expected {(*batch, m, rank)}"
    assert S.shape == (*batch, rank), f"S shape {tuple(S.shape)}"
    assert Vh.shape == (*batch, rank, n), f"Vh shape {tuple(Vh.shape)}"
    for t in got:
        assert t.dtype == dt, f"dtype {t.dtype}, expected {dt}"
        assert torch.isfinite(t).all()
    if M.numel() == 0 or rank == 0:
        return
    scale = torch.linalg.matrix_norm(M).amax().clamp_min(1e-300).item()
    Ut, St, Vht = torch.linalg.svd(M, full_matrices=False)
    S64 = S.to(torch.float64)
    assert (S64 >= 0).all(), "negative singular values"
    assert (S64[..., :-1] >= S64[..., 1:]).all(), "singular values not non-increasing"
    s_err = (S64 - St[..., :rank]).abs().max().item() / scale
    assert s_err <= tol, f"singular values off by {s_err:.3e} (relative) > {tol:g}"
    if ortho:
        eye = torch.eye(rank, dtype=torch.float64)
        ou = (U.to(torch.float64).mT @ U.to(torch.float64) - eye).abs().max().item()
        ov = (Vh.to(torch.float64) @ Vh.to(torch.float64).mT - eye).abs().max().item()
        assert ou <= 10 * tol and ov <= 10 * tol, f"orthonormality lost: |UᵀU−I| {ou:.3e}, |VhVhᵀ−I| {ov:.3e}"
    Mr = (Ut[..., :rank] * St[..., None, :rank]) @ Vht[..., :rank, :]
    rec = dense(U, S, Vh)
    err = torch.linalg.matrix_norm(rec - Mr).amax().item() / scale
    assert err <= tol, f"reconstruction vs optimal rank-{rank} truncation: {err:.3e} (relative) > {tol:g}"
    opt = St[..., rank:].square().sum(-1).sqrt()
    res = torch.linalg.matrix_norm(M - rec)
    excess = (res - opt).abs().amax().item() / scale
    assert excess <= tol, f"residual exceeds the optimal truncation error by {excess:.3e} (relative) > {tol:g}"
