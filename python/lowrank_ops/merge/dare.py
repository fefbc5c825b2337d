"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML): Drop And REscale.

Eq. 2-3: ``m ~ Bernoulli(density)``, ``τ̃ = m ⊙ τ / density`` (the paper's
``1/(1−p)``), so ``E[τ̃] = τ``; then ``dare_linear``: ``θ = θ_base + λ·Σ w_i τ̃_i``,
``dare_ties``: the TIES election and disjoint sum on ``τ̃_i``.  The mask is a
counter hash of ``(seed ⊕ tensor name, model, element)``: deterministic, and
the same on CPU and CUDA.  mergekit defaults (``normalize=False``); mergekit
0.1.5 rescales to the L1 norm instead of ``1/density``.
"""
from __future__ import annotations

from ..ops import merge as ops
from .registry import register_delta
from .sparsify import tensor_seed

_PAPER = "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch (Yu et al., ICML 2024)"
_URL = "https://arxiv.org/abs/2311.03099"


@register_delta("dare_linear", paper=_PAPER, url=_URL,
                params={"density": 0.5, "seed": 0, "normalize": False, "lambda": 1.0})
def dare_linear_delta(d, w, *, name, shape, density=0.5, seed=0, normalize=False):
    return ops.dare_merge(d, w, float(density), tensor_seed(seed, name), "none", "sum", bool(normalize))


@register_delta("dare_ties", paper=_PAPER, url=_URL,
                params={"density": 0.5, "seed": 0, "sign_method": "sum", "normalize": False, "lambda": 1.0})
def dare_ties_delta(d, w, *, name, shape, density=0.5, seed=0, sign_method="sum", normalize=False):
    return ops.dare_merge(d, w, float(density), tensor_seed(seed, name), "ties", sign_method, bool(normalize))
