"""The merge ops have no gradient: a backward through them raises, also inside a larger graph
(where a silently dropped contribution would be a wrong gradient), and their integer/bool
outputs never require grad."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import ops

CALLS = {
    "magnitude_threshold": lambda d: ops.magnitude_threshold(d[0], 0.3),
    "ties_merge": lambda d: ops.ties_merge(d, torch.ones(3), 0.3),
    "dare_merge": lambda d: ops.dare_merge(d, torch.ones(3), 0.5, seed=1),
    "sign_consensus": lambda d: ops.sign_consensus(d)[0],
}


@pytest.mark.parametrize("name", list(CALLS))
def test_backward_through_a_merge_op_raises_even_in_a_mixed_graph(name):
    d = torch.randn(3, 40, requires_grad=True)
    out = CALLS[name](d)
    with pytest.raises(RuntimeError, match=rf"lowrank_ops::{name} is not differentiable"):
        (out.sum() + d.sum()).backward()
    with torch.no_grad():
        assert not CALLS[name](d).requires_grad
    assert not CALLS[name](d.detach()).requires_grad


def test_integer_and_bool_outputs_never_require_grad():
    d = torch.randn(3, 40, requires_grad=True)
    _, count, support = ops.sign_consensus(d)
    assert count.dtype == torch.int32 and not count.requires_grad and not support.requires_grad
    mask = ops.nm_mask(d[0].reshape(10, 4), 2, 4)
    assert mask.dtype == torch.bool and not mask.requires_grad
