"""Tests of ``lowrank_ops.svd_append``: SVD after appending columns/rows (Zha & Simon 1999),
dense and sparse ``C`` (the sparse path keeps the complement ``C − U·UᵀC`` implicit).

Oracle: the full fp64 ``torch.linalg.svd`` of the appended matrix formed densely
(``svd_checks.check_svd``), ``reference.svd_append_ref``, and dense-vs-sparse agreement.
"""
from __future__ import annotations

import re

import pytest
import torch

from lowrank_ops import linalg
from lowrank_ops.ops import svd_append
from lowrank_ops.ops.linalg_update import sparse_rows
from lowrank_ops.reference import svd_append_ref
from svd_checks import check_svd, dense, input_tol, rand_svd
from utils import DTYPES, randn

OP = torch.ops.lowrank_ops.svd_append
OP_SPARSE = torch.ops.lowrank_ops.svd_append_sparse
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def appended64(U, S, Vh, C, dim):
    Cd = (C.to_dense() if C.layout != torch.strided else C).to(torch.float64)
    return torch.cat([dense(U, S, Vh), Cd], dim=-1 if dim in (1, -1) else -2)


def new_block(batch, m, n, c, dim, dtype):
    return randn(*batch, *((m, c) if dim in (1, -1) else (c, n)), dtype=dtype, device="cpu")


def sparse_block(m, n, c, dim, density, dtype, layout=torch.sparse_coo, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    shape = (m, c) if dim in (1, -1) else (c, n)
    mask = torch.rand(*shape, generator=g) < density
    C = (torch.randn(*shape, generator=g, dtype=torch.float64) * mask).to(dtype)
    if layout == torch.sparse_csr:
        return C.to_sparse_csr()
    return C.to_sparse_csc() if layout == torch.sparse_csc else C.to_sparse()


# (batch, m, n, k, c, rank, dim); rank == k + c (<= rows, cols) is the exact case
CASES = [
    pytest.param((), 40, 33, 5, 3, 8, 1, id="cols_exact"),
    pytest.param((), 40, 33, 5, 3, 4, 1, id="cols_truncated"),
    pytest.param((), 40, 33, 5, 3, 8, 0, id="rows_exact"),
    pytest.param((), 40, 33, 5, 4, 6, -2, id="rows_truncated_dim_neg"),
    pytest.param((2,), 21, 17, 4, 2, 6, 1, id="batched_cols"),
    pytest.param((2, 1), 21, 17, 4, 2, 5, 0, id="batched_rows"),
    pytest.param((), 6, 20, 4, 5, 6, 1, id="k_plus_c_gt_m"),
    pytest.param((), 25, 18, 5, 0, 5, 1, id="c0"),
    pytest.param((), 25, 18, 5, 1, 6, 0, id="c1_rows"),
    pytest.param((), 1, 1, 1, 1, 1, 1, id="1x1"),
    pytest.param((0,), 8, 9, 3, 2, 4, 1, id="empty_batch"),
    pytest.param((), 8, 9, 3, 2, 0, 0, id="rank0"),
]


@dtypes
@pytest.mark.parametrize("batch,m,n,k,c,rank,dim", CASES)
def test_dense_matches_dense_svd(batch, m, n, k, c, rank, dim, dtype):
    U, S, Vh = rand_svd(batch, m, n, k, dtype)
    C = new_block(batch, m, n, c, dim, dtype)
    got = svd_append(U, S, Vh, C, rank, dim)
    check_svd(got, appended64(U, S, Vh, C, dim), rank, dtype, tol=input_tol(dtype))


SPARSE_CASES = [
    pytest.param(50, 40, 6, 4, 10, 1, 0.3, id="cols_exact"),
    pytest.param(50, 40, 6, 4, 5, 1, 0.3, id="cols_truncated"),
    pytest.param(50, 40, 6, 4, 10, 0, 0.3, id="rows_exact"),
    pytest.param(50, 40, 6, 7, 8, 0, 0.2, id="rows_truncated"),
    pytest.param(60, 45, 5, 3, 8, 1, 1.0, id="fully_dense_values"),
    pytest.param(30, 20, 4, 3, 6, 1, 0.02, id="mostly_empty_vectors"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr, torch.sparse_csc], ids=["coo", "csr", "csc"])
@pytest.mark.parametrize("m,n,k,c,rank,dim,density", SPARSE_CASES)
def test_sparse_matches_dense_svd(m, n, k, c, rank, dim, density, layout, dtype):
    U, S, Vh = rand_svd((), m, n, k, dtype)
    C = sparse_block(m, n, c, dim, density, dtype, layout)
    M = appended64(U, S, Vh, C, dim)
    got = svd_append(U, S, Vh, C, rank, dim)
    check_svd(got, M, rank, dtype, tol=input_tol(dtype))
    # the dense path on the same values agrees (both see the same rounded factors)
    dense_got = svd_append(U, S, Vh, C.to_dense(), rank, dim)
    tol = input_tol(dtype)
    assert (dense(*got) - dense(*dense_got)).norm() <= tol * M.norm()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dim", [1, 0])
def test_sparse_update_inside_span(dim, dtype):
    """New vectors in span(U) (dim=1) / span(V) (dim=0): the complement is rounding noise,
    which the Gram form drops; the result stays exact at rank k.  Asking for k + c
    triplets takes the dense completion (rank beyond the numerical rank)."""
    U, S, Vh = rand_svd((), 40, 30, 5, dtype)
    basis = U.double() if dim == 1 else Vh.double().mT
    coef = torch.randn(5, 3, dtype=torch.float64)
    coef[1:3, 0] = 0.0  # some structure; the values are stored sparse, their span is U's
    Cd = basis @ coef if dim == 1 else (basis @ coef).mT
    C = Cd.to(dtype).to_sparse()
    M = appended64(U, S, Vh, C, dim)
    check_svd(svd_append(U, S, Vh, C, 5, dim), M, 5, dtype)
    check_svd(svd_append(U, S, Vh, C, 8, dim), M, 8, dtype)


def test_sparse_empty_update():
    U, S, Vh = rand_svd((), 12, 10, 4)
    C = torch.zeros(12, 0, dtype=torch.float64).to_sparse()
    check_svd(svd_append(U, S, Vh, C, 4, 1), dense(U, S, Vh), 4, torch.float64)
    Cz = torch.zeros(3, 10, dtype=torch.float64).to_sparse()  # c = 3 vectors, nnz = 0
    check_svd(svd_append(U, S, Vh, Cz, 4, 0), appended64(U, S, Vh, Cz, 0), 4, torch.float64)


def test_sparse_csr_components_with_duplicates():
    """Uncoalesced CSR (a repeated column inside a row) sums like COO does."""
    U, S, Vh = rand_svd((), 10, 8, 3)
    crow = torch.tensor([0, 3, 4])
    col = torch.tensor([1, 1, 7, 2])
    val = torch.tensor([0.5, 1.5, -1.0, 3.0], dtype=torch.float64)
    Cd = torch.zeros(2, 10, dtype=torch.float64)
    Cd[0, 1], Cd[0, 7], Cd[1, 2] = 2.0, -1.0, 3.0
    got = OP_SPARSE(U, S, Vh, crow, col, val, 5, 1)
    check_svd(got, appended64(U, S, Vh, Cd.mT, 1), 5, torch.float64)
    got32 = OP_SPARSE(U, S, Vh, crow.int(), col.int(), val, 5, 1)  # int32 indices
    torch.testing.assert_close(got32[1], got[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_agrees_with_reference_and_public_api(dtype):
    U, S, Vh = rand_svd((), 26, 21, 4, dtype)
    C = randn(26, 3, dtype=dtype, device="cpu")
    ours = linalg.svd_append(U, S, Vh, C, 5)
    ref = svd_append_ref(U, S, Vh, C, 5)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours[1], ref[1], rtol=tol, atol=tol * ref[1][0].item())
    torch.testing.assert_close(dense(*ours), dense(*ref), rtol=0, atol=tol * ref[1][0].item())


def test_streaming_columns_fp32():
    """Incremental SVD over 10 batches of 4 columns (EVA / streaming use), truncating to rank 10:
    every step is the optimal truncation of (previous factors, new columns)."""
    U, S, Vh = rand_svd((), 50, 6, 6, torch.float32)
    for _ in range(10):
        C = randn(50, 4, dtype=torch.float32, device="cpu")
        M = appended64(U, S, Vh, C, 1)
        U, S, Vh = svd_append(U, S, Vh, C, min(10, M.shape[1]), 1)
        check_svd((U, S, Vh), M, U.shape[1], torch.float32)


def test_non_contiguous():
    U, S, Vh = rand_svd((2,), 19, 23, 4, torch.float64)
    Ut = U.mT.contiguous().mT
    C = randn(2, 5, 19, dtype=torch.float64, device="cpu").mT  # (2, 19, 5)
    assert not Ut.is_contiguous() and not C.is_contiguous()
    got = svd_append(Ut, S, Vh, C, 7, 1)
    check_svd(got, appended64(U, S, Vh, C, 1), 7, torch.float64)
    R = randn(2, 23, 3, dtype=torch.float64, device="cpu").mT  # (2, 3, 23) new rows, transposed storage
    check_svd(svd_append(Ut, S, Vh, R, 6, 0), appended64(U, S, Vh, R, 0), 6, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck(dtype):
    U, S, Vh = rand_svd((2,), 13, 10, 3, dtype)
    torch.library.opcheck(OP, (U, S, Vh, randn(2, 13, 2, dtype=dtype, device="cpu"), 4, 1))
    torch.library.opcheck(OP, (U[0], S[0], Vh[0], randn(3, 10, dtype=dtype, device="cpu"), 5, 0))
    C = sparse_block(13, 10, 3, 1, 0.4, dtype)
    crow, col, val = (t.clone() for t in sparse_rows(C, 1))  # plain tensors, not views into C
    torch.library.opcheck(OP_SPARSE, (U[0], S[0], Vh[0], crow, col, val, 5, 1))


def test_compile_fullgraph():
    U, S, Vh = rand_svd((), 14, 11, 3, torch.float64)
    C = randn(4, 11, dtype=torch.float64, device="cpu")
    f = torch.compile(lambda u, s, vh, c: linalg.svd_append(u, s, vh, c, 6, dim=0), fullgraph=True,
                      backend="aot_eager")
    check_svd(f(U, S, Vh, C), appended64(U, S, Vh, C, 0), 6, torch.float64)


BAD = [
    (lambda U, S, Vh, C: (U, S, Vh, C[:5], 3, 1), "with dim=1 `C` must have shape (..., m, c) with m = 12"),
    (lambda U, S, Vh, C: (U, S, Vh, C, 3, 0), "with dim=0 `C` must have shape (..., c, n) with n = 9"),
    (lambda U, S, Vh, C: (U, S, Vh, C, 3, 2), "`dim` must be 1 (append columns) or 0 (append rows), got 2"),
    (lambda U, S, Vh, C: (U, S[:1], Vh, C, 3, 1), "`S` must have shape (..., k) with k = 3"),
    (lambda U, S, Vh, C: (U, S, Vh.float(), C, 3, 1), "`Vh` has dtype Float but `U` has dtype Double"),
    (lambda U, S, Vh, C: (U, S, Vh, C, 6, 1), "`rank` must be in [0, min(rows, cols, k + c)] = [0, 5]"),
    (lambda U, S, Vh, C: (U, S, Vh, C[None], 3, 1), "`C` must have shape (..., m, c) for dim=1 with leading dims ()"),
]


@pytest.mark.parametrize("make,msg", BAD)
def test_bad_inputs(make, msg):
    U, S, Vh = rand_svd((), 12, 9, 3)
    C = randn(12, 2, dtype=torch.float64, device="cpu")
    with pytest.raises(RuntimeError, match="svd_append: .*" + re.escape(msg)):
        OP(*make(U, S, Vh, C))


BAD_SPARSE = [
    (lambda a: {**a, "crow": torch.tensor([1, 2, 3])}, "`crow` must start at 0 and end at nnz = 3"),
    (lambda a: {**a, "crow": torch.tensor([0, 3, 2, 3])}, "`crow` must be non-decreasing"),
    (lambda a: {**a, "col": torch.tensor([0, 12, 1])}, "`col` indices must be in [0, 12)"),
    (lambda a: {**a, "col": torch.tensor([0, 1, 2], dtype=torch.int32)}, "`col` must be a 1-D tensor of column indices with `crow`'s dtype"),
    (lambda a: {**a, "val": a["val"][:2]}, "`val` must have shape (nnz,) = (3,)"),
    (lambda a: {**a, "val": a["val"].float()}, "`val` has dtype Float but `U` has dtype Double"),
    (lambda a: {**a, "crow": torch.tensor([0.0, 3.0])}, "`crow` must be a 1-D int32/int64 tensor"),
    (lambda a: {**a, "rank": 7}, "`rank` must be in [0, min(rows, cols, k + c)] = [0, 5]"),
    (lambda a: {**a, "U": a["U"][None], "S": a["S"][None], "Vh": a["Vh"][None]}, "the sparse path takes unbatched factors"),
]


@pytest.mark.parametrize("make,msg", BAD_SPARSE)
def test_bad_sparse_inputs(make, msg):
    U, S, Vh = rand_svd((), 12, 9, 3)
    a = dict(U=U, S=S, Vh=Vh, crow=torch.tensor([0, 2, 3]), col=torch.tensor([0, 5, 11]),
             val=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), rank=4, dim=1)
    a = make(a)
    with pytest.raises(RuntimeError, match="svd_append_sparse: .*" + re.escape(msg)):
        OP_SPARSE(a["U"], a["S"], a["Vh"], a["crow"], a["col"], a["val"], a["rank"], a["dim"])


def test_bad_sparse_wrapper():
    U, S, Vh = rand_svd((), 12, 9, 3)
    C = torch.zeros(2, 12, 2, dtype=torch.float64).to_sparse()
    with pytest.raises(ValueError, match="a sparse `C` must be 2-D"):
        svd_append(U, S, Vh, C, 3, 1)


def test_sparse_multithreaded():
    """The CSR kernels split rows (projection, Gram) and output columns (scatter) across
    threads; the ops-test fixture runs on one thread, so raise it here."""
    U, S, Vh = rand_svd((), 300, 70, 8, torch.float64)
    C = sparse_block(300, 70, 12, 1, 0.1, torch.float64)
    one = svd_append(U, S, Vh, C, 20, 1)
    n = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        many = svd_append(U, S, Vh, C, 20, 1)
    finally:
        torch.set_num_threads(n)
    check_svd(many, appended64(U, S, Vh, C, 1), 20, torch.float64)
    assert (dense(*many) - dense(*one)).abs().max() <= 1e-12 * S[0]


def test_streamed_rows_of_exactly_low_rank_data_wider_than_the_complement():
    # EVA's use: rows appended to the (k × n) factor I·diag(S)·Vh, with k + c > n and
    # data of rank 6 < k, so every residual is rank deficient.  The complement basis
    # must have at most n − k columns and stay orthogonal to Vh, or the singular
    # vectors lose orthonormality after a few steps and the values blow up.
    g = torch.Generator().manual_seed(0)
    n, k, c = 16, 8, 32
    basis = torch.randn(6, n, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, 6, dtype=torch.float64)[:, None]
    blocks = [torch.randn(c, 6, generator=g, dtype=torch.float64) @ basis for _ in range(12)]
    for dt in (torch.float64, torch.float32):
        _, S, Vh = torch.linalg.svd(blocks[0].to(dt), full_matrices=False)
        S, Vh = S[:k], Vh[:k]
        for C in blocks[1:]:
            _, S, Vh = linalg.svd_append(torch.eye(k, dtype=dt), S, Vh, C.to(dt), k, dim=0)
            eye = torch.eye(k, dtype=dt)
            torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-4 if dt == torch.float32 else 1e-10, rtol=0)
        S_all = torch.linalg.svdvals(torch.cat(blocks))[:k]
        torch.testing.assert_close(S.double(), S_all, rtol=1e-4 if dt == torch.float32 else 1e-10,
                                   atol=1e-3 if dt == torch.float32 else 1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_fp32_inside_span_between_k_and_k_plus_c(seed):
    """fp32 columns inside span(U), asked for rank k + 3 < k + c: an fp32 basis is orthonormal
    only to rounding, and a Gram form assuming UᵀU = I kept spurious residual directions
    (σ ~ 3e-4·‖C‖; U far from orthonormal).  Now as exact as the dense path."""
    m, n, k, c = 200, 150, 10, 6
    U, S, Vh = rand_svd((), m, n, k, torch.float32)
    g = torch.Generator().manual_seed(100 + seed)
    C = (U.double() @ torch.randn(k, c, dtype=torch.float64, generator=g)).float()
    M = appended64(U, S, Vh, C, 1)
    got = svd_append(U, S, Vh, C.to_sparse(), k + 3, 1)
    check_svd(got, M, k + 3, torch.float32)
    torch.testing.assert_close(got[1][:k], svd_append(U, S, Vh, C, k + 3, 1)[1][:k], rtol=1e-5, atol=1e-5)


def test_sparse_fp32_near_span_keeps_orthonormal_basis():
    """Columns mostly in span(U) plus sparse off-span noise (streamed activations): U stays
    orthonormal to fp32 rounding, like the dense path."""
    m, n, k, c = 300, 200, 16, 8
    U, S, Vh = rand_svd((), m, n, k, torch.float32)
    g = torch.Generator().manual_seed(5)
    Cd = U.double() @ torch.randn(k, c, dtype=torch.float64, generator=g)
    Cd += 1e-3 * torch.randn(m, c, dtype=torch.float64, generator=g) * (torch.rand(m, c, generator=g) < 0.3)
    C = Cd.float()
    check_svd(svd_append(U, S, Vh, C.to_sparse(), k + c, 1), appended64(U, S, Vh, C, 1), k + c, torch.float32)


@pytest.mark.parametrize("dim,shape", [(1, (7, 2)), (1, (20, 2)), (0, (2, 7)), (0, (2, 20))])
def test_sparse_wrong_length_raises(dim, shape):
    """The sparse op takes only CSR components, so the wrapper checks C's length against U / Vh."""
    U, S, Vh = rand_svd((), 12, 10, 3)
    C = torch.zeros(shape, dtype=torch.float64)
    C[0, 0] = 1.0
    what = r"\(m, c\) with m = 12" if dim == 1 else r"\(c, n\) with n = 10"
    with pytest.raises(ValueError, match=rf"svd_append: with dim={dim} a sparse `C` must have shape {what}"):
        svd_append(U, S, Vh, C.to_sparse(), 3, dim)
