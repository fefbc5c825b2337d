"""Tests of ``lowrank_ops.svd_update``: truncated SVD of ``U·diag(S)·Vh + P·Qᵀ`` (Brand 2006).

Oracle: the full fp64 ``torch.linalg.svd`` of the updated matrix formed densely
(``svd_checks.check_svd``: singular values, orthonormality, reconstruction vs the
optimal truncation, optimal residual), and ``reference.svd_update_ref``.
"""
from __future__ import annotations

import re

import pytest
import torch

from lowrank_ops import linalg
from lowrank_ops.ops import svd_update
from lowrank_ops.reference import svd_update_ref
from svd_checks import check_svd, dense, input_tol, rand_svd
from utils import DTYPES, randn

OP = torch.ops.lowrank_ops.svd_update
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def updated64(U, S, Vh, P, Q):
    return dense(U, S, Vh) + P.to(torch.float64) @ Q.to(torch.float64).mT


# (batch, m, n, k, c, rank); rank == k + c (<= min(m, n)) is the exact case
CASES = [
    pytest.param((), 40, 33, 5, 3, 8, id="exact_k5_c3"),
    pytest.param((), 40, 33, 5, 3, 4, id="truncated_r4"),
    pytest.param((), 77, 65, 7, 1, 6, id="rank1_update_truncated"),
    pytest.param((3,), 20, 31, 4, 2, 6, id="batched_exact"),
    pytest.param((2, 2), 20, 31, 4, 2, 3, id="batched2_truncated"),
    pytest.param((), 6, 20, 4, 4, 6, id="k_plus_c_gt_m"),
    pytest.param((), 25, 18, 5, 0, 5, id="c0"),
    pytest.param((), 1, 1, 1, 1, 1, id="1x1"),
    pytest.param((), 12, 9, 0, 3, 3, id="k0"),
    pytest.param((0,), 12, 9, 3, 2, 4, id="empty_batch"),
    pytest.param((), 12, 9, 3, 2, 0, id="rank0"),
]


@dtypes
@pytest.mark.parametrize("batch,m,n,k,c,rank", CASES)
def test_matches_dense_svd(batch, m, n, k, c, rank, dtype):
    U, S, Vh = rand_svd(batch, m, n, k, dtype)
    P = randn(*batch, m, c, dtype=dtype, device="cpu")
    Q = randn(*batch, n, c, dtype=dtype, device="cpu")
    got = svd_update(U, S, Vh, P, Q, rank)
    check_svd(got, updated64(U, S, Vh, P, Q), rank, dtype, tol=input_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_update_inside_span_keeps_orthonormal_basis(dtype):
    """P ∈ span(U), Q ∈ span(V): the residuals are rounding noise, the rank stays k.
    Asking for all k + c triplets exercises the orthonormal completion of the null directions."""
    U, S, Vh = rand_svd((), 30, 24, 5, dtype)
    P = (U.double() @ torch.randn(5, 3, dtype=torch.float64)).to(dtype)
    Q = (Vh.double().mT @ torch.randn(5, 3, dtype=torch.float64)).to(dtype)
    M = updated64(U, S, Vh, P, Q)
    check_svd(svd_update(U, S, Vh, P, Q, 5), M, 5, dtype)
    check_svd(svd_update(U, S, Vh, P, Q, 8), M, 8, dtype)


def _householder_qrs(fn):
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.name == "aten::linalg_qr" for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_complement_routes(dtype):
    """The update's complement basis: CholeskyQR (no Householder QR) for a generic update; a rank-deficient
    residual (repeated update columns) is caught by its Gram matrices and takes the Householder QR of [U, E] —
    both giving the exact truncation with orthonormal factors."""
    U, S, Vh = rand_svd((), 70, 60, 6, dtype)
    P = randn(70, 3, dtype=dtype, device="cpu")
    Q = randn(60, 3, dtype=dtype, device="cpu")
    assert _householder_qrs(lambda: svd_update(U, S, Vh, P, Q, 9)) == 0
    check_svd(svd_update(U, S, Vh, P, Q, 9), updated64(U, S, Vh, P, Q), 9, dtype)
    Pd = torch.cat([P[:, :2], P[:, :1]], 1)  # rank 2 in 3 columns
    assert _householder_qrs(lambda: svd_update(U, S, Vh, Pd, Q, 8)) == 1
    check_svd(svd_update(U, S, Vh, Pd, Q, 8), updated64(U, S, Vh, Pd, Q), 8, dtype)


def test_chained_updates_stay_accurate():
    """Twenty rank-2 updates in fp32, truncating to rank 12 each time: each step is the
    optimal truncation of (previous factors + update), and orthonormality does not drift."""
    U, S, Vh = rand_svd((), 60, 50, 12, torch.float32)
    for _ in range(20):
        P = randn(60, 2, dtype=torch.float32, device="cpu", std=0.3)
        Q = randn(50, 2, dtype=torch.float32, device="cpu", std=0.3)
        M = updated64(U, S, Vh, P, Q)
        U, S, Vh = svd_update(U, S, Vh, P, Q, 12)
        check_svd((U, S, Vh), M, 12, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_agrees_with_reference_and_public_api(dtype):
    U, S, Vh = rand_svd((), 26, 21, 4, dtype)
    P = randn(26, 2, dtype=dtype, device="cpu")
    Q = randn(21, 2, dtype=dtype, device="cpu")
    ours = linalg.svd_update(U, S, Vh, P, Q, 5)
    ref = svd_update_ref(U, S, Vh, P, Q, 5)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours[1], ref[1], rtol=tol, atol=tol * ref[1][0].item())
    torch.testing.assert_close(dense(*ours), dense(*ref), rtol=0, atol=tol * ref[1][0].item())


def test_non_contiguous():
    U, S, Vh = rand_svd((2,), 19, 23, 4, torch.float64)
    Ut = U.mT.contiguous().mT  # column-major U
    P = randn(2, 3, 19, dtype=torch.float64, device="cpu").mT
    Q = randn(2, 23, 6, dtype=torch.float64, device="cpu")[..., ::2]
    assert not Ut.is_contiguous() and not P.is_contiguous() and not Q.is_contiguous()
    got = svd_update(Ut, S, Vh, P, Q, 7)
    check_svd(got, updated64(U, S, Vh, P, Q), 7, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype):
    U, S, Vh = rand_svd((2,), 13, 10, 3, dtype)
    P = randn(2, 13, 2, dtype=dtype, device="cpu")
    Q = randn(2, 10, 2, dtype=dtype, device="cpu")
    torch.library.opcheck(OP, (U, S, Vh, P, Q, 4))
    torch.library.opcheck(OP, (U[0], S[0], Vh[0], P[0], Q[0], 5))


def test_compile_fullgraph():
    U, S, Vh = rand_svd((), 14, 11, 3, torch.float64)
    P = randn(14, 2, dtype=torch.float64, device="cpu")
    Q = randn(11, 2, dtype=torch.float64, device="cpu")
    f = torch.compile(lambda *a: linalg.svd_update(*a, 5), fullgraph=True, backend="aot_eager")
    check_svd(f(U, S, Vh, P, Q), updated64(U, S, Vh, P, Q), 5, torch.float64)


BAD = [
    (lambda U, S, Vh, P, Q: (U, S[:2], Vh, P, Q, 3), "`S` must have shape (..., k) with k = 3"),
    (lambda U, S, Vh, P, Q: (U, S, Vh[:2], P, Q, 3), "`Vh` must have shape (..., k, n) with k = 3"),
    (lambda U, S, Vh, P, Q: (U, S, Vh, P[:5], Q, 3), "`P` must have shape (..., m, c) with m = 12"),
    (lambda U, S, Vh, P, Q: (U, S, Vh, P, Q[:, :1], 3), "`Q` must have shape (..., n, c) = (..., 9, 2)"),
    (lambda U, S, Vh, P, Q: (U, S, Vh, P, Q[:4], 3), "`Q` must have shape (..., n, c) = (..., 9, 2)"),
    (lambda U, S, Vh, P, Q: (U, S, Vh, P.float(), Q, 3), "`P` has dtype Float but `U` has dtype Double"),
    (lambda U, S, Vh, P, Q: (U, S, Vh, P, Q, 6), "`rank` must be in [0, min(m, n, k + c)] = [0, 5]"),
    (lambda U, S, Vh, P, Q: (U, S, Vh, P, Q, -2), "`rank` must be in [0, min(m, n, k + c)]"),
    (lambda U, S, Vh, P, Q: (U, S, Vh, P[None], Q, 3), "`P` must have shape (..., m, c) with leading dims ()"),
    (lambda U, S, Vh, P, Q: (U[0], S, Vh, P, Q, 1), "`U` must have shape (..., m, k)"),
]


@pytest.mark.parametrize("make,msg", BAD)
def test_bad_inputs(make, msg):
    U, S, Vh = rand_svd((), 12, 9, 3)
    P = randn(12, 2, dtype=torch.float64, device="cpu")
    Q = randn(9, 2, dtype=torch.float64, device="cpu")
    with pytest.raises(RuntimeError, match="svd_update: .*" + re.escape(msg)):
        OP(*make(U, S, Vh, P, Q))
