"""LiNeS: post-training layer scaling of task vectors (Wang et al. 2024).

"LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging", Eq. (1): the (merged) task vector of layer ``ℓ`` of ``L`` is scaled by
``λ(ℓ) = α + β · ℓ / (L − 1)``, so shallow layers stay near the pre-trained
weights and deep layers keep their update: ``θ_ℓ = θ₀_ℓ + λ(ℓ) · τ_ℓ``.

Composable with any method: ``base_method`` names the merge whose task vector
is scaled (``τ = merge(θ₀, θ₁..θ_N) − θ₀``; its parameters pass through),
default the task-arithmetic sum ``τ = Σ wᵢ(θᵢ − θ₀)``.  The layer index comes
from the tensor name (``layers.<i>.`` / ``h.<i>.`` / ``blocks.<i>.``); ``L`` is
``num_layers`` (the streaming engine infers it from the tensor names).
Tensors outside the layer stack are scaled by ``non_layer_scale`` (default
``α``, i.e. treated as the shallowest layer).
"""
from __future__ import annotations

import torch

from ._common import compute_dtype
from .config import layer_index
from .registry import get_method, register


def lines_scale(name: str, num_layers, alpha: float, beta: float, non_layer_scale=None) -> float:
    """``λ(ℓ)`` for tensor ``name`` (Eq. 1)."""
    li = layer_index(name)
    if li is None:
        return float(alpha if non_layer_scale is None else non_layer_scale)
    if num_layers is None:
        raise ValueError(f"lines: tensor {name!r} is in layer {li} but num_layers is unknown; pass num_layers "
                         "(the streaming engine infers it from the tensor names)")
    L = int(num_layers)
    if li >= L:
        raise ValueError(f"lines: tensor {name!r} is in layer {li} but num_layers={L}")
    return float(alpha + beta) if L == 1 else float(alpha + beta * li / (L - 1))


@register("lines", paper="LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
          url="https://arxiv.org/abs/2410.17146",
          params={"alpha": 0.5, "beta": 0.5, "num_layers": None, "base_method": None, "non_layer_scale": None})
def lines_tensor(base, tensors, weights, *, name="", alpha=0.5, beta=0.5, num_layers=None, base_method=None,
                 non_layer_scale=None, **inner):
    """``θ₀ + λ(ℓ)·τ`` with ``τ`` the task-arithmetic sum or ``base_method``'s merged task vector."""
    dt = compute_dtype(base)
    b = base.to(dt)
    if base_method:
        merged = get_method(str(base_method)).merge_tensor(name, base, tensors, weights, **inner).to(dt)
        tau = merged - b
    else:
        tau = torch.zeros_like(b)
        for w, x in zip(weights, tensors):
            tau += float(w) * (x.to(dt) - b)
    s = lines_scale(name, num_layers, float(alpha), float(beta), non_layer_scale)
    return (b + s * tau).to(base.dtype)
