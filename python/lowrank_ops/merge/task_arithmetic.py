"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR).

``θ = θ_base + λ·Σ_i w_i·τ_i`` with ``τ_i = θ_i − θ_base`` (Eq. 1-2): adding
task vectors (w > 0) learns tasks, negating them (w < 0) forgets, ``λ`` scales.
``normalize=True`` divides by ``Σ_i w_i`` (mergekit's option; off by default).
"""
from __future__ import annotations

from ..ops import merge as ops
from .registry import register_delta


@register_delta("task_arithmetic", paper="Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023)",
                url="https://arxiv.org/abs/2212.04089", params={"lambda": 1.0, "normalize": False})
def task_arithmetic_delta(d, w, *, name, shape, normalize=False):
    # density 1 keeps every entry: dare_merge is then the fused weighted sum Σ w_i τ_i.
    return ops.dare_merge(d, w, 1.0, 0, "none", "sum", bool(normalize))
