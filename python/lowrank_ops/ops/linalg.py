"""The linear-algebra family: ``rsvd`` and ``pivoted_qr``.

Python halves of the ops declared in ``cpp/registration.cpp``: typed wrappers
and fake kernels (shapes and dtypes for ``torch.compile`` / ``torch.export``).
Neither op is differentiable: their autograd formulas raise a clear error if a
gradient is ever requested through them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_lib = torch.ops.lowrank_ops


def rsvd(A: Tensor, rank: int, oversample: int = 8, n_iter: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized truncated SVD ``A ≈ U·diag(S)·Vh`` by block Krylov iteration.

    Algorithm: the randomized range finder of Halko, Martinsson & Tropp (2011,
    §4, Alg. 4.4's power scheme) replaced by the block Krylov space of Musco &
    Musco (2015, "Randomized Block Krylov Methods for Stronger and Faster
    Approximate SVD", Alg. 2: ``K = [AΩ, (AAᵀ)AΩ, …, (AAᵀ)^{d−1}AΩ]``, ``A ≈ Q·QᵀA``
    with ``Q = orth(K)``), built as a block Lanczos-type recurrence with full
    reorthogonalisation of ``Q``:

    1. ``P₀ = Ω (n, b)`` Gaussian from a CPU generator seeded with ``seed`` (drawn
       as its ``b × n`` transpose: every ``Pᵢ`` is kept column-major, the operand
       layout MKL runs ``A·Pᵢ`` fastest with), one
       block for a whole batch (the analysis is per matrix), so a batch member's
       result is the one ``rsvd`` gives for that matrix alone, up to rounding (the
       QR and fp64-Gram fallbacks are decided once for the whole batch).
    2. For ``i = 0…d−1``: ``Yᵢ = A·Pᵢ`` (one pass over ``A``), ``Qᵢ = orth(Yᵢ ⊥ Q₀…Qᵢ₋₁)``,
       ``Wᵢ = Aᵀ·Qᵢ`` (one pass over ``Aᵀ``), ``Pᵢ₊₁`` = a well-conditioned basis of ``Wᵢ``
       (one CholeskyQR round).  ``Q = [Q₀…Q_{d−1}]`` spans ``K``.
    3. ``B = QᵀA = [W₀…W_{d−1}]ᵀ``: the recurrence's own products are the rows of
       ``QᵀA``, so Musco & Musco's final pass is free (they are computed as ``Qᵢᵀ·A``,
       rows of ``B``, the orientation BLAS runs fastest).  Rayleigh–Ritz without a QR
       of the tall ``Bᵀ``: the top-``rank`` eigenpairs ``(λᵢ, uᵢ)`` of the ``(d·b)²`` Gram
       matrix ``B·Bᵀ``, then the exact SVD of the projection ``U_k·(U_kᵀ·B)``: the rows
       of ``C' = Σ⁻¹·U_kᵀ·B`` (``σᵢ = √λᵢ``) are orthonormal up to the Gram matrix's
       rounding, so one CholeskyQR round ``C'·C'ᵀ = L·Lᵀ`` finishes them (checked:
       ``‖C'C'ᵀ − I‖_F ≤ 1/2``, else CholeskyQR2 of ``U_kᵀ·B``), and ``U_kᵀ·B = (Σ·L)·Zᵀ``
       with ``Zᵀ = L⁻¹·C'`` orthonormal: the SVD of the ``rank²`` matrix ``Σ·L`` gives
       the result.  The Gram matrix is formed in the compute dtype, which perturbs the
       result only to second order; for fp32, when ``σ_rank < ~0.011·σ₁`` it is formed
       again in fp64 (fp32's rounding would leave the last directions unresolved).

    ``Q`` is orthonormalised by block Gram–Schmidt twice with CholeskyQR rounds
    (BCGS2; Householder QR where a Cholesky fails or orthogonality is lost).

    Block plan: ``d = n_iter + 1`` blocks — ``2·n_iter + 2`` passes, as many as
    ``torch.svd_lowrank(q = rank + oversample, niter = n_iter)``, but keeping every
    block: a Krylov space of degree ``2·n_iter + 1`` in ``d·b`` dimensions against
    svd_lowrank's single block — of ``b = rank + oversample`` columns rounded down to
    a multiple of 16 (not below ``rank``; not rounded below 16 columns or when
    ``d = 1``), where AVX-512 GEMMs cost less per column (measured with MKL, fp32,
    4096²: a pass of 16 columns 3.5 ms, of 20 or 24 4.4 ms, of 32 5.6 ms).  Defaults
    at rank 64: 6 passes of 64 columns (a 192-dimensional space); at rank 16: 6 of 16.

    Measured (benchmark suite ``linalg``, ``docs/kernels.md``): at 4096², rank 64,
    error ÷ optimal 1.0006 against svd_lowrank's 1.007–1.008 and at or below it on
    six spectra (power laws, geometric, clustered, noise floor); at rank 16 1.0007
    against 1.0006 (i^-1), and below svd_lowrank on five of six spectra — not on a
    slow ``i^-0.5`` decay (1.0023–1.0031 against 1.0015–1.0016).

    Other routes: when ``d·b ≥ min(m, n)`` the exact SVD — ``torch.linalg.svd`` for
    near-square shapes, through the short side when ``max(m, n) ≥ 2·min(m, n)``
    (``Z = orth(Aᵀ)``, then the SVD of the ``min(m, n)``-square ``A·Z``; LAPACK's own
    SVD of a short, wide matrix is 2–3× slower); when
    ``2·d·b ≥ min(m, n)`` (batches of short, wide matrices such as LoRA factors)
    the Gram route — the top ``rank + oversample`` eigenvectors ``Ũ`` of the short
    side's Gram matrix ``A·Aᵀ``, then one Rayleigh–Ritz step through the long side,
    ``Z = orth(Aᵀ·Ũ)``, ``A ≈ (A·Z)·Zᵀ`` (HMT Alg. 4.4 with one power step started from
    ``Ũ``: it damps the Gram matrix's rounding error in the small eigen-directions
    and is exact when ``rank(A) ≤ rank + oversample``); that route uses no random
    numbers, so ``seed`` has no effect there.

    Args:
        A: ``(..., m, n)``; leading dims are a batch.  fp64 is computed in fp64,
            everything else in fp32.
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
        oversample: extra columns per Krylov block (see the block plan).
        n_iter: Krylov depth parameter (see the block plan), ``>= 0``.
        seed: seed of the Gaussian start block; results are deterministic for a
            seed on a device (the block is drawn on the CPU for every device).

    Returns:
        ``U (..., m, rank)`` with orthonormal columns, ``S (..., rank)``
        non-increasing and non-negative, ``Vh (..., rank, n)`` with orthonormal
        rows, in the compute dtype.  Not differentiable.
    """
    return _lib.rsvd(A, int(rank), int(oversample), int(n_iter), int(seed))


def pivoted_qr(A: Tensor, rank: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Column-pivoted Householder QR ``A[:, perm] = Q·R`` (Businger & Golub 1965).

    Blocked as LAPACK's xGEQP3 (Quintana-Ortí, Sun & Bischof 1998): panels of 32
    columns with lazily-updated trailing matrix and a GEMM update per panel,
    column norms downdated and recomputed when cancellation makes the
    downdate unreliable (Drmač & Bujanović 2008's test).  At step ``j`` the
    column with the largest remaining norm is moved to position ``j``, so
    ``|R[0,0]| >= |R[1,1]| >= …``.

    Args:
        A: ``(m, n)`` (2-D only).  fp64 is computed in fp64, everything else in fp32.
        rank: stop after ``rank`` pivots (``0 <= rank <= min(m, n)``); default ``min(m, n)``.
            With ``k = rank``, ``Q·R`` is the rank-``k`` pivoted approximation
            (QR-LoRA's basis) and ``A[:, perm] − Q·R`` is the unfactored remainder.

    Returns:
        ``Q (m, k)`` orthonormal columns, ``R (k, n)`` upper trapezoidal,
        ``perm (n,)`` int64, ``k = min(m, n)`` or ``rank``.  Not differentiable.
    """
    return _lib.pivoted_qr(A, None if rank is None else int(rank))


# --------------------------------------------------------------------------- fakes


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("lowrank_ops::rsvd")
def _rsvd_fake(A, rank, oversample=8, n_iter=2, seed=0):
    torch._check(A.dim() >= 2, lambda: f"lowrank_ops::rsvd: `A` must have shape (..., m, n), got {tuple(A.shape)}")
    m, n = A.shape[-2], A.shape[-1]
    torch._check(1 <= rank, lambda: f"lowrank_ops::rsvd: `rank` must be >= 1, got {rank}")
    torch._check(rank <= m and rank <= n,
                 lambda: f"lowrank_ops::rsvd: `rank` must be <= min(m, n) for `A` of shape {tuple(A.shape)}, got {rank}")
    torch._check(oversample >= 0 and n_iter >= 0, lambda: "lowrank_ops::rsvd: `oversample` and `n_iter` must be >= 0")
    dt = _compute_dtype(A.dtype)
    batch = A.shape[:-2]
    return (A.new_empty((*batch, m, rank), dtype=dt), A.new_empty((*batch, rank), dtype=dt),
            A.new_empty((*batch, rank, n), dtype=dt))


@torch.library.register_fake("lowrank_ops::pivoted_qr")
def _pivoted_qr_fake(A, rank=None):
    torch._check(A.dim() == 2, lambda: f"lowrank_ops::pivoted_qr: `A` must have shape (m, n), got {tuple(A.shape)}")
    m, n = A.shape
    k = min(m, n) if rank is None else rank
    torch._check(0 <= k and k <= m and k <= n,
                 lambda: f"lowrank_ops::pivoted_qr: `rank` must satisfy 0 <= rank <= min(m, n) for `A` of shape {tuple(A.shape)}, got {rank}")
    dt = _compute_dtype(A.dtype)
    return A.new_empty((m, k), dtype=dt), A.new_empty((k, n), dtype=dt), A.new_empty((n,), dtype=torch.int64)


# --------------------------------------------------------------------------- autograd


def _not_differentiable(name: str, hint: str = "or use torch.linalg.svd / torch.linalg.qr where gradients "
                                                "through the factorization are needed"):
    def backward(ctx, *grads):
        raise RuntimeError(f"lowrank_ops::{name} is not differentiable; detach its input, {hint}")
    return backward


def _setup_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd("lowrank_ops::rsvd", _not_differentiable("rsvd"), setup_context=_setup_nothing)
torch.library.register_autograd("lowrank_ops::pivoted_qr", _not_differentiable("pivoted_qr"),
                                setup_context=_setup_nothing)
