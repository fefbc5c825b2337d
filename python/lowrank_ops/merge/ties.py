"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS).

Alg. 1: trim each task vector to its top-``density`` magnitudes, elect a sign
per parameter (``γ = sign(Σ_i w_i τ̂_i)``), disjoint mean over the models that
agree: ``τ = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i``; ``θ = θ_base + λ·τ``.  One fused
kernel (``lowrank_ops.ops.ties_merge``).  Defaults as mergekit's ``ties``.
"""
from __future__ import annotations

from ..ops import merge as ops
from .registry import register_delta


@register_delta("ties", paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023)",
                url="https://arxiv.org/abs/2306.01708",
                params={"density": 0.2, "sign_method": "sum", "normalize": True, "lambda": 1.0})
def ties_delta(d, w, *, name, shape, density=0.2, sign_method="sum", normalize=True):
    return ops.ties_merge(d, w, float(density), sign_method, bool(normalize))
