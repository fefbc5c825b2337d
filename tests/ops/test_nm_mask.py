"""nm_mask: n:m magnitude masks with a forbidden set, vs the stable-sort reference (exact)."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.ops import nm_mask
from lowrank_ops.reference.merge import nm_mask_ref
from utils import DEVICES, DTYPES, randn

CASES = [((0, 8), 2, 4), ((1, 4), 2, 4), ((3, 12), 1, 4), ((5, 6, 16), 4, 8), ((7, 9), 0, 3), ((2, 10), 5, 5),
         ((33,), 2, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n,m", CASES)
def test_matches_reference(device, dtype, shape, n, m):
    x = randn(*shape, dtype=dtype, device=device)
    forb = torch.rand(shape, device=device) < 0.3
    for f in (None, forb):
        got = nm_mask(x, n, m, f)
        assert got.dtype == torch.bool and got.shape == x.shape
        assert torch.equal(got, nm_mask_ref(x, n, m, f))
        groups = got.reshape(-1, m)
        assert (groups.sum(1) <= n).all()
        if f is not None:
            assert not (got & f).any()


def test_hand_computed_and_ties():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, -1.0]])
    assert nm_mask(x, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]  # ties: lower index
    forb = torch.tensor([[False, True, False, False, True, False, False, False]])
    assert nm_mask(x, 2, 4, forb).tolist() == [[False, False, True, True, False, True, True, False]]
    allf = torch.ones_like(forb)
    assert not nm_mask(x, 2, 4, allf).any()
    xn = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert nm_mask(xn, 1, 4).tolist() == [False, True, False, False]  # NaN ranks as +inf, lower index wins


def test_noncontiguous():
    x = torch.randn(16, 12).t()
    assert torch.equal(nm_mask(x, 2, 4), nm_mask_ref(x.contiguous(), 2, 4))


def test_cabs_disjoint_sequence():
    # CABS conflict-aware order: each later mask avoids all earlier kept positions
    taus = torch.randn(3, 8, 16)
    taken = torch.zeros(8, 16, dtype=torch.bool)
    for t in taus:
        mk = nm_mask(t, 1, 4, taken)
        assert not (mk & taken).any() and (mk.reshape(-1, 4).sum(1) == 1).all()
        taken |= mk
    assert int(taken.sum()) == 3 * 8 * 4


def test_bad_inputs():
    with pytest.raises(RuntimeError, match=r"nm_mask: the last dim of `x` \(10, shape \(2, 10\)\) must be a multiple of m=4"):
        nm_mask(torch.randn(2, 10), 2, 4)
    with pytest.raises(RuntimeError, match="nm_mask: need 0 <= n <= m"):
        nm_mask(torch.randn(2, 8), 5, 4)
    with pytest.raises(RuntimeError, match=r"nm_mask: `forbidden` must have x's shape \(2, 8\)"):
        nm_mask(torch.randn(2, 8), 2, 4, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="nm_mask: `forbidden` must be bool"):
        nm_mask(torch.randn(2, 8), 2, 4, torch.zeros(2, 8))


def test_opcheck():
    x = torch.randn(4, 8)
    torch.library.opcheck(torch.ops.lowrank_ops.nm_mask, (x, 2, 4, None))
    torch.library.opcheck(torch.ops.lowrank_ops.nm_mask, (x, 1, 8, torch.rand(4, 8) < 0.5))
