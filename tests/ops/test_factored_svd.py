"""Tests of ``lowrank_ops.factored_svd``: exact thin SVD of ``B·diag(w)·A`` without forming it.

Oracle: the full ``torch.linalg.svd`` of the product formed densely in fp64
(``svd_checks.check_svd``), and ``reference.factored_svd_ref`` for agreement.
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import linalg
from lowrank_ops.ops import factored_svd
from lowrank_ops.reference import factored_svd_ref
from svd_checks import check_svd, dense
from utils import DTYPES, randn

OP = torch.ops.lowrank_ops.factored_svd
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def product64(B, A, w=None):
    B64 = B.to(torch.float64)
    if w is not None:
        B64 = B64 * w.to(torch.float64).unsqueeze(-2)
    return B64 @ A.to(torch.float64)


# (batch, m, n, R, rank, weights: None | "vec" | "batched")
CASES = [
    pytest.param((), 40, 33, 7, None, "vec", id="m40_n33_R7"),
    pytest.param((), 40, 33, 7, 3, None, id="truncated_r3"),
    pytest.param((2, 3), 17, 25, 5, 4, "batched", id="batched"),
    pytest.param((), 5, 30, 9, None, "vec", id="R_gt_m"),
    pytest.param((), 30, 4, 9, 4, None, id="R_gt_n"),
    pytest.param((), 1, 1, 1, None, "vec", id="1x1"),
    pytest.param((), 1, 9, 3, None, None, id="m1"),
    pytest.param((), 0, 5, 3, None, None, id="m0"),
    pytest.param((), 6, 7, 0, None, None, id="R0"),
    pytest.param((0,), 6, 7, 3, None, None, id="empty_batch"),
]


@dtypes
@pytest.mark.parametrize("batch,m,n,R,rank,weights", CASES)
def test_matches_dense_svd(batch, m, n, R, rank, weights, dtype):
    B = randn(*batch, m, R, dtype=dtype, device="cpu")
    A = randn(*batch, R, n, dtype=dtype, device="cpu")
    w = None
    if weights == "vec":
        w = randn(R, dtype=dtype, device="cpu")
    elif weights == "batched":
        w = randn(*batch, R, dtype=dtype, device="cpu")
    got = factored_svd(B, A, w, rank)
    r = min(m, n, R) if rank is None else rank
    check_svd(got, product64(B, A, w), r, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_agrees_with_reference_and_public_api(dtype):
    B = randn(23, 6, dtype=dtype, device="cpu")
    A = randn(6, 19, dtype=dtype, device="cpu")
    w = randn(6, dtype=dtype, device="cpu")
    ours = linalg.factored_svd(B, A, weights=w, rank=4)
    ref = factored_svd_ref(B, A, w, 4)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours[1], ref[1], rtol=tol, atol=tol * ref[1][0].item())
    torch.testing.assert_close(dense(*ours), dense(*ref), rtol=0, atol=tol * ref[1][0].item())


def test_sum_of_loras_is_exact():
    """``Σ sᵢ·Bᵢ·Aᵢ`` via concatenated factors (the "SVD of a sum of LoRAs" use)."""
    out, inn, ranks, scales = 48, 40, (4, 6, 2), (0.5, -1.25, 2.0)
    Bs = [randn(out, r, dtype=torch.float32, device="cpu") for r in ranks]
    As = [randn(r, inn, dtype=torch.float32, device="cpu") for r in ranks]
    w = torch.cat([torch.full((r,), s) for r, s in zip(ranks, scales)])
    got = factored_svd(torch.cat(Bs, 1), torch.cat(As, 0), w)
    M = sum(s * b.double() @ a.double() for s, b, a in zip(scales, Bs, As))
    check_svd(got, M, sum(ranks), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rank_deficient_factors(dtype):
    """Repeated columns of B: the product has rank < R; all R triplets are still orthonormal."""
    B = randn(30, 4, dtype=dtype, device="cpu")
    B = torch.cat([B, B[:, :2]], 1)
    A = randn(6, 25, dtype=dtype, device="cpu")
    got = factored_svd(B, A)
    check_svd(got, product64(B, A), 6, dtype)
    assert got[1][4:].abs().max() <= 1e-5 * got[1][0]  # product rank 4


def test_non_contiguous():
    Bt = randn(2, 9, 31, dtype=torch.float64, device="cpu").mT  # (2, 31, 9), transposed storage
    Aw = randn(2, 9, 50, dtype=torch.float64, device="cpu")[..., ::2]  # (2, 9, 25), strided
    w = randn(18, dtype=torch.float64, device="cpu")[::2]
    assert not Bt.is_contiguous() and not Aw.is_contiguous() and not w.is_contiguous()
    got = factored_svd(Bt, Aw, w, 5)
    check_svd(got, product64(Bt, Aw, w), 5, torch.float64)
    for t in got:
        assert t.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype):
    B = randn(3, 11, 4, dtype=dtype, device="cpu")
    A = randn(3, 4, 7, dtype=dtype, device="cpu")
    w = randn(4, dtype=dtype, device="cpu")
    torch.library.opcheck(OP, (B, A, w, 3))
    torch.library.opcheck(OP, (B[0], A[0], None, None))


def test_compile_fullgraph():
    B = randn(12, 5, dtype=torch.float64, device="cpu")
    A = randn(5, 9, dtype=torch.float64, device="cpu")
    f = torch.compile(lambda b, a: linalg.factored_svd(b, a, rank=3), fullgraph=True, backend="aot_eager")
    got = f(B, A)
    check_svd(got, product64(B, A), 3, torch.float64)


BAD = [
    (lambda B, A, w: (B[0], A, w, None), "`A` must have shape (..., R, n) with leading dims"),
    (lambda B, A, w: (B, A[:, :3], w, None), "`A` must have shape (..., R, n) with R = 4"),
    (lambda B, A, w: (B, A.float(), w, None), "`A` has dtype Float but `B` has dtype Double"),
    (lambda B, A, w: (B, A, w[:3], None), "`weights` must have shape (R,) = (4,)"),
    (lambda B, A, w: (B, A, w, 5), "`rank` must be in [0, min(m, n, R)] = [0, 4]"),
    (lambda B, A, w: (B, A, w, -1), "`rank` must be in [0, min(m, n, R)]"),
    (lambda B, A, w: (B[0, 0], A, w, None), "`B` must have shape (..., m, R)"),
    (lambda B, A, w: (B.long(), A.long(), None, None), "`B` must be a floating tensor"),
]


@pytest.mark.parametrize("make,msg", BAD)
def test_bad_inputs(make, msg):
    B = randn(2, 10, 4, dtype=torch.float64, device="cpu")
    A = randn(2, 4, 8, dtype=torch.float64, device="cpu")
    w = randn(4, dtype=torch.float64, device="cpu")
    with pytest.raises(RuntimeError, match="factored_svd: .*" + __import__("re").escape(msg)):
        OP(*make(B, A, w))


def test_checker_rejects_wrong_results():
    """``check_svd`` (used by all three op tests) fails on each kind of wrong SVD."""
    from svd_checks import check_svd as check

    B = randn(20, 4, dtype=torch.float64, device="cpu")
    A = randn(4, 15, dtype=torch.float64, device="cpu")
    M = product64(B, A)
    U, S, Vh = factored_svd(B, A)
    check((U, S, Vh), M, 4, torch.float64)
    wrong = {
        "S scaled": (U, S * (1 + 1e-8), Vh),
        "S unsorted": (U, S.flip(0), Vh.flip(0)),
        "U column sign": (torch.cat([U[:, :1], -U[:, 1:2], U[:, 2:]], 1), S, Vh),
        "U not orthonormal": (U * 1.001, S / 1.001, Vh),
        "wrong truncation": (U[:, 1:], S[1:], Vh[1:]),
        "wrong dtype": (U.float(), S.float(), Vh.float()),
    }
    for name, got in wrong.items():
        with pytest.raises(AssertionError):
            check(got, M, got[1].shape[-1] if name == "wrong truncation" else 4, torch.float64)
