"""Magnitude pruning then task arithmetic (mergekit's ``magnitude_prune``; the trim step of
TIES, Yadav et al. 2023, without the sign election).

``τ̂_i`` = top-``density`` magnitudes of ``τ_i``; ``θ = θ_base + λ·Σ_i w_i τ̂_i``
(÷ ``Σ w_i`` if ``normalize``).
"""
from __future__ import annotations

from ..ops import merge as ops
from .registry import register_delta
from .sparsify import magnitude_rows_


@register_delta("magnitude_prune", paper="TIES-Merging (Yadav et al., NeurIPS 2023), trim step + task arithmetic",
                url="https://arxiv.org/abs/2306.01708", params={"density": 0.2, "normalize": False, "lambda": 1.0})
def magnitude_prune_delta(d, w, *, name, shape, density=0.2, normalize=False):
    return ops.dare_merge(magnitude_rows_(d, float(density)), w, 1.0, 0, "none", "sum", bool(normalize))
