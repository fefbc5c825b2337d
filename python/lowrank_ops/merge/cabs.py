"""CABS (Yang et al. 2025, "CABS: Conflict-Aware and Balanced Sparsification for Enhancing Model Merging").

Conflict-aware (CA): task vectors are pruned one after another, each only
among the positions no earlier one kept, ``M_t = NM(|τ_t| ⊙ R_t)``,
``R_t = ¬∨_{s<t} M_s`` -- the masks are disjoint, so the merged entries never
conflict.  Balanced sparsification (BS): ``NM`` is ``n:m`` pruning (the ``n``
largest of every ``m`` consecutive weights), which spreads the kept weights
evenly.  ``θ = θ_base + λ·Σ_t w_t (M_t ⊙ τ_t)``.

Parameters: ``n``/``m`` (BS; default 1:4, i.e. density 0.25 per model);
``n=None`` or ``m=None`` selects density-based CA (top-``density`` of the
whole tensor per model, among allowed positions); ``order``: the pruning order
(model indices; default the given order -- the paper leaves it to the user).
Tensors whose last dim (and size) is not a multiple of ``m`` fall back to the
density-based masks with ``density = n/m``.
"""
from __future__ import annotations

from .registry import register_delta
from .sparsify import apply_disjoint_masks_


@register_delta("cabs", paper="CABS: Conflict-Aware and Balanced Sparsification for Enhancing Model Merging (Yang et al., 2025)",
                url="https://arxiv.org/abs/2503.01874",
                params={"n": 1, "m": 4, "density": None, "order": None, "lambda": 1.0})
def cabs_delta(d, w, *, name, shape, n=1, m=4, density=None, order=None):
    if density is None:
        if n is None or m is None:
            raise ValueError("cabs: give `n` and `m` (n:m masks) or `density`")
        density = n / m
    return w @ apply_disjoint_masks_(d, density=float(density), n=n, m=m, order=order, shape=shape)
