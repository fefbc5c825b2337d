"""Policies shared by the linalg ops (docs/ops.md, "linalg"): non-finite input raises an
error naming the op, and a backward through any of them raises instead of running
PyTorch's autograd fallback (which for some ops gave silently missing gradients)."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import linalg, ops
from svd_checks import rand_svd


def _bad(t: torch.Tensor, value: float, index=(0, 0)) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _calls(value):
    """One call per op (and per rsvd route), the poisoned tensor named in the id."""
    U, S, Vh = rand_svd((), 30, 20, 4)
    P, Q = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    C = torch.randn(30, 3, dtype=torch.float64)
    B, A = torch.randn(30, 5, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    return {
        "rsvd-krylov": ("rsvd", lambda: ops.rsvd(_bad(torch.randn(300, 260), value, (7, 9)), 8)),
        "rsvd-gram": ("rsvd", lambda: ops.rsvd(_bad(torch.randn(96, 700), value, (95, 699)), 20)),
        "rsvd-exact": ("rsvd", lambda: ops.rsvd(_bad(torch.randn(40, 30), value), 30)),
        "rsvd-short-side": ("rsvd", lambda: ops.rsvd(_bad(torch.randn(30, 200), value), 30)),
        "pivoted_qr": ("pivoted_qr", lambda: ops.pivoted_qr(_bad(torch.randn(20, 15), value, (3, 4)))),
        "factored_svd-B": ("factored_svd", lambda: linalg.factored_svd(_bad(B, value), A)),
        "factored_svd-weights": ("factored_svd", lambda: linalg.factored_svd(B, A, _bad(torch.ones(5), value, 2).double())),
        "svd_update-Vh": ("svd_update", lambda: linalg.svd_update(U, S, _bad(Vh, value, (1, 3)), P, Q, 4)),
        "svd_update-P": ("svd_update", lambda: linalg.svd_update(U, S, Vh, _bad(P, value), Q, 4)),
        "svd_append-S": ("svd_append", lambda: linalg.svd_append(U, _bad(S, value, 2), Vh, C, 4)),
        "svd_append-Vh": ("svd_append", lambda: linalg.svd_append(U, S, _bad(Vh, value, (0, 5)), C, 4)),
        "svd_append-C-rows": ("svd_append", lambda: linalg.svd_append(U, S, Vh, _bad(torch.randn(3, 20, dtype=torch.float64), value), 4, dim=0)),
        "svd_append_sparse-C": ("svd_append_sparse",
                                lambda: linalg.svd_append(U, S, Vh, _bad(C, value, (4, 1)).to_sparse(), 4)),
        "svd_append_sparse-Vh": ("svd_append_sparse",
                                 lambda: linalg.svd_append(U, S, _bad(Vh, value, (2, 2)), C.to_sparse(), 4)),
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", list(_calls(0.0)))
def test_non_finite_input_raises_naming_the_op(case, value):
    op, call = _calls(value)[case]
    with pytest.raises(RuntimeError, match=rf"{op}: .* contains NaN or Inf( \(or values whose products overflow the compute dtype\))?; "
                                           "the linalg ops require finite input"):
        call()


@pytest.mark.parametrize("case", list(_calls(0.0)))
def test_finite_input_of_the_same_calls_runs(case):
    """The same calls without the poisoned entry succeed (the check is not a false alarm)."""
    _, call = _calls(1.5)[case]
    for t in call():
        assert torch.isfinite(t.to_dense() if t.layout != torch.strided else t).all()


def test_no_backward_through_the_update_ops():
    U, S, Vh = rand_svd((), 12, 9, 3)
    P, Q = torch.randn(12, 2, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    C = torch.zeros(12, 2, dtype=torch.float64)
    C[1, 0], C[5, 1] = 1.0, 2.0
    calls = {
        "factored_svd": lambda s: linalg.factored_svd(U * s, Vh),
        "svd_update": lambda s: linalg.svd_update(U, s, Vh, P, Q, 4),
        "svd_append": lambda s: linalg.svd_append(U, s, Vh, C, 4),
        "svd_append_sparse": lambda s: linalg.svd_append(U, s, Vh, C.to_sparse(), 4),
    }
    for name, call in calls.items():
        s = S.clone().requires_grad_()
        out = call(s)
        assert out[1].requires_grad, name
        with pytest.raises(RuntimeError, match=rf"lowrank_ops::{name} is not differentiable"):
            out[1].sum().backward()


def test_large_finite_values_are_not_taken_for_non_finite():
    """The finiteness checks start from one sum, which finite data can overflow: such data is
    checked entry by entry and passes (LAPACK's SVD scales it; the exact route runs here)."""
    A = torch.rand(40, 30, dtype=torch.float64) * 1e307
    assert not torch.isfinite(A.sum())
    U, S, Vh = ops.rsvd(A, 30)
    assert all(torch.isfinite(t).all() for t in (U, S, Vh))
    torch.testing.assert_close(S, torch.linalg.svdvals(A), rtol=1e-10, atol=0)
