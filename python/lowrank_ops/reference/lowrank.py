"""Reference (unfused, composed PyTorch) implementations of the lowrank family."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def lowrank_linear_ref(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    down: Tensor,
    up: Tensor,
    core: Optional[Tensor] = None,
    scale: float = 1.0,
    out_scale: Optional[Tensor] = None,
) -> Tensor:
    """``(x·Wᵀ + scale·((x·downᵀ)·coreᵀ)·upᵀ) ⊙ out_scale + bias``, the way peft composes it."""
    h = F.linear(x, down)
    if core is not None:
        h = h * core if core.dim() == 1 else F.linear(h, core)
    y = F.linear(h, up) * scale
    if weight is not None:
        y = F.linear(x, weight) + y
    if out_scale is not None:
        y = y * out_scale
    if bias is not None:
        y = y + bias
    return y


def lowrank_linear_with_h_ref(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    down: Tensor,
    up: Tensor,
    core: Optional[Tensor] = None,
    scale: float = 1.0,
    out_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(lowrank_linear_ref(...), x·downᵀ)``: the output and the rank-r intermediate before the core."""
    return lowrank_linear_ref(x, weight, bias, down, up, core, scale, out_scale), F.linear(x, down)


def dora_norm_ref(weight: Tensor, down: Tensor, up: Tensor, scale: float, weight_norm_sq: Optional[Tensor] = None) -> Tensor:
    """Row norms of the materialized ``W + scale·up·down`` (what peft's DoRA does).

    With ``weight_norm_sq`` the op's definition ``n² = weight_norm_sq + (‖W + s·up·down‖² − ‖W‖²)``
    per row (the cache taken as given, its cross terms from the materialized matrix)."""
    v = weight + scale * (up @ down)
    if weight_norm_sq is None:
        return torch.linalg.vector_norm(v, dim=1)
    n2 = weight_norm_sq.to(v.dtype) + (v * v).sum(1) - (weight * weight).sum(1)
    return n2.clamp_min(0).sqrt()


def dora_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor, up: Tensor, magnitude: Tensor,
                    scale: float = 1.0, weight_norm_sq: Optional[Tensor] = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """peft's DoRA forward: materialize ``up·down``, detach the norm, rescale.  Returns
    ``(y, pre_scale, norm, h)`` like ``dora_linear``, ``h = x·downᵀ``."""
    norm = dora_norm_ref(weight, down, up, scale, weight_norm_sq)
    h = F.linear(x, down)
    pre = F.linear(x, weight) + scale * F.linear(h, up)
    y = (magnitude / norm.detach()) * pre
    if bias is not None:
        y = y + bias
    return y, pre, norm, h
