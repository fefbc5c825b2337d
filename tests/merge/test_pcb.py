"""PCB-Merging against the paper's Alg. 1 (written out here independently, with sorts and explicit loops)."""
from __future__ import annotations

import importlib

import pytest
import torch

from lowrank_ops import merge


def _pcb_alg1(deltas: torch.Tensor, ratio: float, clamp: float) -> torch.Tensor:
    """Alg. 1 of the paper on rows of ``deltas`` (N, P), element by element where it is cheap to read."""
    n, d = deltas.shape

    def clip_rows(x, lo_r, hi_r):
        out = x.clone()
        for i in range(n):
            s = sorted(x[i].tolist())
            out[i] = x[i].clamp(s[int(d * lo_r)], s[int(d * (1 - hi_r)) - 1])
        return out

    def minmax(x):
        return torch.stack([(r - r.min()) / (r.max() - r.min()) for r in x])

    mag = clip_rows(deltas.abs(), clamp, clamp)
    tv = deltas.sign() * mag
    score = torch.exp(n * minmax(mag) ** 2) * torch.tanh(deltas * deltas.sum(0))
    beta = minmax(clip_rows(score, 1 - ratio, 0.0))
    return (tv * beta).sum(0) / beta.sum(0).clamp_min(1e-12)


@pytest.mark.parametrize("ratio,clamp", [(0.1, 1e-4), (0.3, 0.05), (1.0, 0.0)])
def test_matches_algorithm_1(ratio, clamp):
    base = torch.randn(6, 20, dtype=torch.float64)
    deltas = torch.randn(3, 6, 20, dtype=torch.float64)
    out = merge.pcb.merge_tensor("w", base, [base + d for d in deltas], density=ratio, clamp_ratio=clamp)
    ref = base + _pcb_alg1(deltas.reshape(3, -1), ratio, clamp).reshape(6, 20)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("clamp", [0.05, 0.0])
def test_chunked_passes_match_algorithm_1(monkeypatch, clamp):
    """Both passes run over column chunks (7 columns here, so every row spans several, the last one short)."""
    monkeypatch.setattr(importlib.import_module("lowrank_ops.merge.pcb"), "_CHUNK", 7)  # the module, not the method
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 9, dtype=torch.float64, generator=g)
    deltas = torch.randn(4, 5, 9, dtype=torch.float64, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    out = merge.pcb.merge_tensor("w", base, [base + d for d in deltas], weights=w.tolist(), density=0.3,
                                 clamp_ratio=clamp, scaling=0.7)
    ref = base + 0.7 * _pcb_alg1((w[:, None] * deltas.reshape(4, -1)), 0.3, clamp).reshape(5, 9)
    torch.testing.assert_close(out, ref)


def test_identical_task_vectors_keep_their_top_entries():
    base = torch.zeros(100, dtype=torch.float64)
    tau = torch.randn(100, dtype=torch.float64)
    out = merge.pcb.merge_tensor("w", base, [tau, tau], density=0.2, clamp_ratio=0.0)
    changed = out != 0
    # every changed entry equals the task vector; only about the top 20 % of scores survive
    torch.testing.assert_close(out[changed], tau[changed])
    assert 10 <= int(changed.sum()) <= 20
    # the kept entries are the largest |τ| (scores grow with |τ| when the tasks agree)
    assert tau[changed].abs().min() >= tau[~changed].abs().max()


def test_scaling_weights_and_dtype():
    base = torch.randn(8, 8)
    ts = [base + torch.randn(8, 8) for _ in range(2)]
    one = merge.pcb.merge_tensor("w", base, ts, density=0.5)
    two = merge.pcb.merge_tensor("w", base, ts, density=0.5, scaling=2.0)
    torch.testing.assert_close(two - base, 2 * (one - base), atol=1e-5, rtol=1e-5)
    half = merge.pcb.merge_tensor("w", base.half(), [t.half() for t in ts], density=0.5)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="density"):
        merge.pcb.merge_tensor("w", base, ts, density=0.0)
