"""pivoted_qr: the definition (A[:, perm] = Q·R, orthonormal Q, triangular R, non-increasing |diag R|),
agreement with the unblocked Businger–Golub reference, truncation, odd shapes, bad input."""
from __future__ import annotations

import pytest
import torch
from utils import DEVICES

from lowrank_ops import ops
from lowrank_ops.reference import linalg as ref

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def check_definition(A, Q, R, perm, k=None):
    m, n = A.shape
    k = min(m, n) if k is None else k
    dt = torch.float64 if A.dtype == torch.float64 else torch.float32
    assert Q.shape == (m, k) and R.shape == (k, n) and perm.shape == (n,)
    assert Q.dtype == R.dtype == dt and perm.dtype == torch.int64
    assert torch.equal(perm.sort().values.cpu(), torch.arange(n))
    assert torch.equal(R, R.triu()), "R must be upper trapezoidal"
    tol = TOL[dt]
    scale = max(A.abs().max().item(), 1.0) if A.numel() else 1.0

    def amax(t):
        return t.abs().max().item() if t.numel() else 0.0

    A64, Q64, R64 = A.double().cpu(), Q.double().cpu(), R.double().cpu()
    if k == min(m, n):
        assert amax(A64[:, perm.cpu()] - Q64 @ R64) <= tol * scale * max(m, n) ** 0.5
    else:  # the first k pivot columns are factored exactly
        assert amax(A64[:, perm.cpu()][:, :k] - Q64 @ R64[:, :k]) <= tol * scale * max(m, n) ** 0.5
    assert amax(Q64.mT @ Q64 - torch.eye(k, dtype=torch.float64)) <= tol * max(m, 1) ** 0.5
    d = R64.diagonal().abs()
    assert bool((d[1:] <= d[:-1] * (1 + 10 * tol) + tol * scale).all()), f"|diag R| increases: {d}"


def separated(m, n, seed=0, dtype=torch.float64):
    """Columns with norms spread over a factor 2 from each other: the pivot order is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=0) * (1.5 ** -torch.randperm(n, generator=g).double()).clamp_min(1e-30)
    return A.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,n", [(70, 40), (40, 70), (65, 65), (100, 33), (33, 100), (129, 97)])
def test_definition_random(device, dtype, m, n):
    A = torch.randn(m, n, dtype=torch.float64).to(dtype).to(device)
    check_definition(A, *ops.pivoted_qr(A))


@pytest.mark.parametrize("m,n", [(60, 40), (40, 60), (90, 90)])
def test_matches_reference(m, n):
    """Same pivots as the plain Businger–Golub loop (which recomputes every norm) and the same R up to row signs."""
    A = separated(m, n)
    Q, R, perm = ops.pivoted_qr(A)
    Q0, R0, perm0 = ref.pivoted_qr_ref(A)
    assert torch.equal(perm, perm0)
    sign = torch.sign(R.diagonal()) * torch.sign(R0.diagonal())
    torch.testing.assert_close(R, R0 * sign[:, None], rtol=0, atol=1e-12 * A.abs().max().item())
    torch.testing.assert_close(Q, Q0 * sign[None, :], rtol=0, atol=1e-12)


def test_norm_downdating_recomputes():
    """Columns almost parallel to earlier pivots lose nearly all their norm in one step: the downdated
    norms are pure cancellation and must be recomputed (else the pivot order goes wrong)."""
    g = torch.Generator().manual_seed(3)
    m, n = 80, 60
    base = torch.randn(m, 20, generator=g, dtype=torch.float64)
    near = base[:, torch.arange(40) % 20] + 1e-9 * torch.randn(m, 40, generator=g, dtype=torch.float64) \
        * torch.logspace(0, 3, 40, dtype=torch.float64)
    A = torch.cat([base, near], 1)[:, torch.randperm(n, generator=g)]
    Q, R, perm = ops.pivoted_qr(A)
    check_definition(A, Q, R, perm)
    Q0, R0, perm0 = ref.pivoted_qr_ref(A)
    # After the 20 dominant columns the remainders are ~1e-9..1e-6: the order among them must follow
    # the true (recomputed) norms, as in the reference.
    torch.testing.assert_close(R.diagonal().abs(), R0.diagonal().abs(), rtol=1e-5, atol=1e-13)


def test_rank_deficient():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 45, generator=g, dtype=torch.float64)
    Q, R, perm = ops.pivoted_qr(A)
    check_definition(A, Q, R, perm)
    assert R[6:].abs().max() <= 1e-12 * A.abs().max()  # the numerical rank shows in R
    assert R.diagonal()[:6].abs().min() > 1e-3


@pytest.mark.parametrize("rank", [0, 1, 10, 33, 40])
def test_truncated(rank):
    """Stopping after ``rank`` pivots gives the leading rows of the full factorization."""
    A = separated(70, 40)
    Qk, Rk, pk = ops.pivoted_qr(A, rank=rank)
    check_definition(A, Qk, Rk, pk, k=rank)
    Q, R, p = ops.pivoted_qr(A)
    assert torch.equal(pk[:rank], p[:rank])
    torch.testing.assert_close(Rk[:, :rank], R[:rank, :rank], rtol=0, atol=1e-13)
    torch.testing.assert_close(Qk, Q[:, :rank], rtol=0, atol=1e-13)


@pytest.mark.parametrize("m,n", [(0, 5), (5, 0), (0, 0), (1, 1), (1, 7), (7, 1)])
def test_tiny_and_empty(m, n):
    A = torch.randn(m, n, dtype=torch.float64)
    Q, R, perm = ops.pivoted_qr(A)
    check_definition(A, Q, R, perm)


def test_zero_matrix_and_zero_columns():
    A = torch.zeros(6, 4, dtype=torch.float64)
    Q, R, perm = ops.pivoted_qr(A)
    check_definition(A, Q, R, perm)
    assert bool((R == 0).all())
    B = torch.randn(10, 8, dtype=torch.float64)
    B[:, [1, 4]] = 0
    Q, R, perm = ops.pivoted_qr(B)
    check_definition(B, Q, R, perm)
    assert set(perm[-2:].tolist()) == {1, 4}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_fp32(dtype):
    A = torch.randn(40, 30).to(dtype)
    Q, R, perm = ops.pivoted_qr(A)
    assert Q.dtype == R.dtype == torch.float32
    check_definition(A, Q, R, perm)


def test_noncontiguous():
    A = torch.randn(50, 70, dtype=torch.float64)
    check_definition(A.T, *ops.pivoted_qr(A.T))
    check_definition(A[:, ::2], *ops.pivoted_qr(A[:, ::2]))


def test_bad_inputs():
    with pytest.raises(RuntimeError, match=r"pivoted_qr: `A` must have shape \(m, n\) \(batched input is not supported\), got \(2, 3, 4\)"):
        ops.pivoted_qr(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match=r"pivoted_qr: `rank` must satisfy 0 <= rank <= min\(m, n\) = 4 for `A` of shape \(5, 4\), got rank=5"):
        ops.pivoted_qr(torch.randn(5, 4), rank=5)
    with pytest.raises(RuntimeError, match="pivoted_qr: `A` must be a floating tensor"):
        ops.pivoted_qr(torch.ones(3, 3, dtype=torch.int32))


def test_not_differentiable():
    A = torch.randn(8, 6, requires_grad=True)
    Q, R, perm = ops.pivoted_qr(A)
    with pytest.raises(RuntimeError, match="pivoted_qr is not differentiable"):
        R.sum().backward()


def test_opcheck_and_compile():
    A = torch.randn(40, 36)
    torch.library.opcheck(torch.ops.lowrank_ops.pivoted_qr, (A,))
    torch.library.opcheck(torch.ops.lowrank_ops.pivoted_qr, (A.double(),), {"rank": 7})
    fn = torch.compile(lambda X: ops.pivoted_qr(X, rank=5)[1].abs(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(A), ops.pivoted_qr(A, rank=5)[1].abs())


def test_public_api_uses_the_op():
    import lowrank_ops.linalg as L
    A = torch.randn(30, 20, dtype=torch.float64)
    for x, y in zip(L.pivoted_qr(A, rank=4), ops.pivoted_qr(A, rank=4)):
        assert torch.equal(x, y)
