"""SLERP (mergekit semantics): endpoints, the hand-computed arc midpoint, the lerp fallback, mergekit as oracle."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops import merge


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_endpoints(dtype):
    a, b = torch.randn(7, 5, dtype=dtype), torch.randn(7, 5, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    for base, ts in ((a, [b]), (None, [a, b])):
        out0 = merge.slerp.merge_tensor("w", base, ts, t=0.0)
        out1 = merge.slerp.merge_tensor("w", base, ts, t=1.0)
        assert out0.dtype == dtype
        torch.testing.assert_close(out0.double(), a.double(), atol=tol, rtol=tol)
        torch.testing.assert_close(out1.double(), b.double(), atol=tol, rtol=tol)


def test_quarter_arc_by_hand():
    # orthogonal unit vectors: Ω = π/2, t = 1/3 -> (cos π/6, sin π/6)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = merge.slerp.merge_tensor("w", a, [b], t=1 / 3)
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)], dtype=torch.float64))
    # the coefficients multiply the unnormalised tensors
    out2 = merge.slerp.merge_tensor("w", 3 * a, [5 * b], t=0.5)
    torch.testing.assert_close(out2, torch.tensor([3, 5], dtype=torch.float64) * math.sin(math.pi / 4))


def test_colinear_falls_back_to_lerp():
    a = torch.randn(10, dtype=torch.float64)
    b = 2.0 * a + 1e-6 * torch.randn(10, dtype=torch.float64)
    out = merge.slerp.merge_tensor("w", a, [b], t=0.25)
    torch.testing.assert_close(out, torch.lerp(a, b, 0.25))


def test_state_dict_api_and_bad_counts():
    sd0 = {"x": torch.randn(3, 3), "n": torch.arange(3)}
    sd1 = {"x": torch.randn(3, 3), "n": torch.arange(3)}
    out = merge.slerp(sd0, [sd1], t=0.0)
    torch.testing.assert_close(out["x"], sd0["x"])
    assert torch.equal(out["n"], sd0["n"])
    with pytest.raises(ValueError, match="exactly two models"):
        merge.slerp.merge_tensor("x", sd0["x"], [sd1["x"], sd1["x"]])
    with pytest.raises(ValueError, match="exactly two models"):
        merge.slerp.merge_tensor("x", None, [sd1["x"]])


def test_matches_mergekit():
    mk = pytest.importorskip("mergekit.merge_methods.slerp")
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    for t in (0.0, 0.3, 0.7, 1.0):
        try:  # mergekit >= 0.1.5 slerps a leading batch of logical weights, t per weight
            ref = mk.slerp(torch.tensor([t]), a[None], b[None])[0]
        except AttributeError:  # older releases: plain floats and one weight
            ref = mk.slerp(t, a, b)
        torch.testing.assert_close(merge.slerp.merge_tensor("w", a, [b], t=t), torch.as_tensor(ref, dtype=a.dtype),
                                   atol=1e-5, rtol=1e-5)
