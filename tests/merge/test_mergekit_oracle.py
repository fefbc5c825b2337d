"""mergekit (0.1.5) as an optional oracle for task arithmetic, TIES and DARE, per tensor.

Calls mergekit's own per-tensor merge (``merge_group``) on in-memory tensors,
so no model folders or hub access are needed.  Skipped when mergekit is not
installed.  DARE's masks come from different RNGs (mergekit: torch.bernoulli;
ours: a counter hash) and mergekit 0.1.5 rescales DARE to the L1 norm, so DARE
is compared at density 1 (no drop), where both are exact.
"""
from __future__ import annotations

import pytest
import torch

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_base = pytest.importorskip("mergekit.merge_methods.base")

from lowrank_ops import merge  # noqa: E402


def _mergekit(method, base, tensors, weights, density=1.0, normalize=None, lam=1.0, rescale=None):
    m = mk_registry.get(method)
    entries = [mk_base.TensorEntry("base", base, is_base=True)]
    entries += [mk_base.TensorEntry(i, t) for i, t in enumerate(tensors)]
    group = mk_base.TensorGroup(entries=tuple(entries))
    n = len(tensors)
    params = {"weight": {i: float(weights[i]) for i in range(n)}, "density": {i: density for i in range(n)},
              "normalize": m.default_normalize if normalize is None else normalize,
              "rescale": m.default_rescale if rescale is None else rescale, "lambda": lam, "int8_mask": False}
    return m.merge_group(group, **params)


def _inputs(seed=0, n=3, shape=(24, 40)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g, dtype=torch.float64)
    return base, [base + 0.05 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


def test_task_arithmetic_matches_mergekit():
    base, ts = _inputs()
    w = [1.0, -0.5, 0.7]
    ours = merge.task_arithmetic.merge_tensor("x", base, ts, w, **{"lambda": 0.8})
    torch.testing.assert_close(ours, _mergekit("task_arithmetic", base, ts, w, lam=0.8), rtol=0, atol=1e-12)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 1.2, 0.8]])
def test_ties_matches_mergekit(density, weights):
    base, ts = _inputs(seed=int(density * 10))
    ours = merge.ties.merge_tensor("x", base, ts, weights, density=density)
    ref = _mergekit("ties", base, ts, weights, density=density)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    ours = merge.ties.merge_tensor("x", base, ts, weights, density=density, normalize=False, **{"lambda": 0.5})
    ref = _mergekit("ties", base, ts, weights, density=density, normalize=False, lam=0.5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_ties_bf16_matches_mergekit_closely():
    base, ts = _inputs(seed=3)
    base, ts = base.bfloat16(), [t.bfloat16() for t in ts]
    # bf16 deltas tie in magnitude a lot (multiples of one ulp), and tie handling differs by
    # design (we keep every |δ| >= threshold, mergekit an arbitrary exactly-k subset), so the
    # bf16 comparison runs without trimming: election + disjoint mean, in fp32 on both sides.
    ours = merge.ties.merge_tensor("x", base, ts, [1, 0.5, 2], density=1.0)
    ref = _mergekit("ties", base.float(), [t.float() for t in ts], [1, 0.5, 2], density=1.0).bfloat16()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_one_matches_mergekit(method):
    base, ts = _inputs(seed=7)
    w = [1.0, 0.4, 1.5]
    ours = merge.METHODS[method].merge_tensor("x", base, ts, w, density=1.0)
    torch.testing.assert_close(ours, _mergekit(method, base, ts, w, density=1.0), rtol=0, atol=1e-12)
