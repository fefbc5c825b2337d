"""NegMerge (Kim, Han, Choe, ICML 2025, "NegMerge: Sign-Consensual Weight Merging for Machine Unlearning").

Inputs are several models fine-tuned on the *forget* set (different
hyperparameters).  Keep only the coordinates where every task vector is
nonzero and all share one sign, ``m[p] = 1 iff sign(τ_1[p]) = … = sign(τ_K[p]) ≠ 0``;
average there, ``τ = m ⊙ Σ_k w_k τ_k / Σ_k w_k``; negate:
``θ = θ_base − λ·τ``.
"""
from __future__ import annotations

import torch

from .consensus import unanimous
from .registry import register
from .sparsify import apply_delta, flat_deltas, global_scale, weights_tensor


@register("negmerge", paper="NegMerge: Sign-Consensual Weight Merging for Machine Unlearning (Kim et al., ICML 2025)",
          url="https://arxiv.org/abs/2410.05583", params={"lambda": 1.0})
def negmerge_tensor(base, tensors, weights, *, name="", **kw):
    d = flat_deltas(base, tensors)
    w = weights_tensor(weights, d)
    keep = unanimous(d)
    ws = w.sum()
    mean = (w[:, None] * d).sum(0) / (ws if float(ws) != 0 else 1.0)
    tau = torch.where(keep, mean, torch.zeros((), dtype=d.dtype, device=d.device))
    return apply_delta(base, tau, tensors[0], -global_scale("negmerge", kw))
