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

from .consensus import COLUMN_CHUNK, support_count
from .registry import register_delta


@register_delta("ram", paper="Behavior Knowledge Merge in Reinforced Agentic Models (RAM, 2026)",
                url="https://arxiv.org/abs/2601.13572", params={"epsilon": 1e-5, "r": 0.0, "alpha": 0.2, "lambda": 1.0})
def ram_delta(d, w, *, name, shape, epsilon=1e-5, r=0.0, alpha=0.2):
    N, P = d.shape
    eps = float(epsilon)
    scale = torch.ones(N, dtype=d.dtype, device=d.device)
    if r:  # RAM+: per model, its shared / unique contribution counts over the whole tensor (a first pass)
        n_shared = torch.zeros(N, dtype=torch.float64, device=d.device)
        n_unique = torch.zeros(N, dtype=torch.float64, device=d.device)
        for a in range(0, P, COLUMN_CHUNK):
            dc = d[:, a:a + COLUMN_CHUNK]
            count = support_count(dc, eps)
            on = dc.abs() > eps
            n_shared += (on & (count > 1)).sum(1)
            n_unique += (on & (count == 1)).sum(1)
        rho = (n_shared / n_unique.clamp(min=eps)).to(d.dtype)
        scale = 1 + r * rho.clamp(0, alpha)
    out = torch.empty(P, dtype=d.dtype, device=d.device)
    ws = w * scale
    for a in range(0, P, COLUMN_CHUNK):  # column chunks: every temporary is (N, chunk) or (chunk,)
        dc = d[:, a:a + COLUMN_CHUNK]
        count = support_count(dc, eps)
        dz = torch.where(dc.abs() > eps, dc, torch.zeros((), dtype=d.dtype, device=d.device))  # NaN: no contribution
        shared = count > 1
        # unique entries: w_t τ_t times RAM+'s per-model scale; shared ones: Σ_t w_t τ_t / |S_p|
        oc = torch.mv(dz.t(), ws, out=out[a:a + COLUMN_CHUNK])
        if bool(shared.any()):
            oc.copy_(torch.where(shared, torch.mv(dz.t(), w).div_(count.clamp(min=1).to(d.dtype)), oc))
    return out
