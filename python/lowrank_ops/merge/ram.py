"""RAM, Reinforced Agent Merging ("Behavior Knowledge Merge in Reinforced Agentic Models", arXiv 2601.13572).

RL fine-tuning gives sparse, heterogeneous task vectors; averaging them dilutes
updates that only one agent made.  A model contributes at ``p`` when
``|τ_t[p]| > ε``; with ``S_p`` the contributors:
``τ[p] = mean_{t∈S_p} τ_t[p]`` if ``|S_p| ≥ 2`` (shared), ``τ[p] = τ_t[p]``
if ``|S_p| = 1`` (unique, kept undiluted).  RAM+ (``r > 0``) rescales model
t's unique entries by ``1 + r·clip(ρ_t, 0, α)``, ``ρ_t`` = its shared / unique
entry counts in this tensor (mergekit's ``ramplus_tl``).  ``θ = θ_base + λ·τ``;
weights multiply each ``τ_t`` first (mergekit's ``ram`` has none: all 1).
"""
from __future__ import annotations

import torch

from .consensus import support_count
from .registry import register
from .sparsify import apply_delta, flat_deltas, global_scale, weights_tensor


@register("ram", paper="Behavior Knowledge Merge in Reinforced Agentic Models (RAM, 2026)",
          url="https://arxiv.org/abs/2601.13572", params={"epsilon": 1e-5, "r": 0.0, "alpha": 0.2, "lambda": 1.0})
def ram_tensor(base, tensors, weights, *, name="", epsilon=1e-5, r=0.0, alpha=0.2, **kw):
    d = flat_deltas(base, tensors)
    w = weights_tensor(weights, d)
    count = support_count(d, float(epsilon))
    on = d.abs() > epsilon
    dz = torch.where(on, d * w[:, None], torch.zeros((), dtype=d.dtype))
    unique = (count == 1)[None, :]
    shared = (count > 1)[None, :]
    scale = torch.ones(d.shape[0], 1, dtype=d.dtype, device=d.device)
    if r:
        n_shared = (on & shared).sum(1).to(d.dtype)
        n_unique = (on & unique).sum(1).to(d.dtype)
        rho = n_shared / n_unique.clamp(min=float(epsilon))
        scale = (1 + r * rho.clamp(0, alpha))[:, None]
    merged = (dz * unique * scale).sum(0) + (dz * shared).sum(0) / count.clamp(min=1).to(d.dtype)
    return apply_delta(base, merged, tensors[0], global_scale("ram", kw))
