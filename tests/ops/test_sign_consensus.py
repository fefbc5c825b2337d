"""sign_consensus: elected sign, agreeing support and contributor count vs the reference (exact)."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.ops import sign_consensus
from lowrank_ops.reference.merge import sign_consensus_ref
from utils import DEVICES, DTYPES, randn

SHAPES = [(1, 0), (1, 1), (3, 1), (4, 769)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, shape):
    d = randn(*shape, dtype=dtype, device=device)
    d = torch.where(torch.rand(shape, device=device) < 0.3, torch.zeros((), dtype=dtype, device=device), d)
    w = torch.linspace(0.5, 2.0, shape[0], device=device)
    for weights, eps, sm in [(None, 0.0, "sum"), (w, 0.5, "sum"), (w, 0.0, "count")]:
        got = sign_consensus(d, weights, eps, sm)
        ref = sign_consensus_ref(d, weights, eps, sm)
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype and torch.equal(g, r)


def test_hand_computed():
    d = torch.tensor([[1.0, -2.0, 0.0, 3.0, 1e-7],
                      [2.0, 1.0, 0.0, -1.0, 1.0],
                      [0.5, -1.0, 0.0, -1.0, 2.0]])
    sign, support, count = sign_consensus(d)
    assert sign.tolist() == [1, -1, 1, 1, 1]
    assert support.tolist() == [3, 2, 0, 1, 3]
    assert count.tolist() == [3, 3, 0, 3, 3]
    _, support, count = sign_consensus(d, eps=1e-5)
    assert count.tolist() == [3, 3, 0, 3, 2] and support.tolist()[4] == 2
    sign, _, _ = sign_consensus(d, eps=0.0, sign_method="count")
    assert sign.tolist()[3] == -1  # one +, two −


def test_bad_inputs():
    with pytest.raises(RuntimeError, match=r"sign_consensus: `weights` must be \(N,\)"):
        sign_consensus(torch.randn(3, 4), torch.ones(2))
    with pytest.raises(RuntimeError, match="sign_consensus: `eps` must be >= 0"):
        sign_consensus(torch.randn(3, 4), None, -1.0)
    with pytest.raises(RuntimeError, match=r"sign_consensus: `deltas` must be \(N, P\)"):
        sign_consensus(torch.randn(4))


def test_opcheck():
    d = torch.randn(3, 20)
    torch.library.opcheck(torch.ops.lowrank_ops.sign_consensus, (d, None, 0.0, "sum"))
    torch.library.opcheck(torch.ops.lowrank_ops.sign_consensus, (d, torch.rand(3), 0.1, "count"))
