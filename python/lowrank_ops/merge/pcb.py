"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024).

"Parameter Competition Balancing for Model Merging", §3 and Alg. 1, as in the
authors' release (``PCB_merge``), applied per tensor.  With ``τᵢ`` the task
vectors (rows of ``T``, ``N`` of them):

1. outlier clamp: ``|τᵢ|`` clipped to its ``[clamp_ratio, 1 − clamp_ratio]`` quantiles;
2. intra-balancing: ``β_intra,i = exp(N · norm(|τᵢ|)²)`` (``norm`` = min–max over the row);
3. inter-balancing: ``β_inter,i = tanh(τᵢ ⊙ Σⱼ τⱼ)``;
4. ``βᵢ = β_intra,i ⊙ β_inter,i``; drop all but the top ``density`` fraction of each row
   (entries at or below the row's ``(1 − density)`` quantile), min–max normalise to ``β̂ᵢ``;
5. ``τ_m = Σᵢ β̂ᵢ ⊙ τᵢ / Σᵢ β̂ᵢ`` and ``θ = θ₀ + scaling · τ_m``.

The paper flattens the whole model into one row per task; here each tensor is
its own row (streamable; quantiles and min–max are then per tensor).
``weights`` multiply the task vectors before step 1 (1 by default).
"""
from __future__ import annotations

import torch

from ._common import compute_dtype, kth_largest
from .registry import register
from .sparsify import flat_deltas


def _minmax(x, eps=1e-12):
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


def _clamp_quantiles(x, lo_ratio, hi_ratio):
    """Clip each row to its sorted values at index ``⌊d·lo⌋`` and ``⌊d·(1−hi)⌋ − 1`` (the release's ``clamp``)."""
    d = x.shape[1]
    s, _ = torch.sort(x, dim=1)
    lo = s[:, min(int(d * lo_ratio), d - 1)].unsqueeze(1)
    hi = s[:, max(int(d * (1 - hi_ratio)) - 1, 0)].unsqueeze(1)
    return torch.maximum(torch.minimum(x, hi), lo)


def pcb_scores(deltas: torch.Tensor, density: float = 0.1, clamp_ratio: float = 1e-4):
    """``(clamped task vectors, β̂)`` for ``deltas (N, P)`` (steps 1–4 above)."""
    n, d = deltas.shape
    mag = _clamp_quantiles(deltas.abs(), clamp_ratio, clamp_ratio) if clamp_ratio > 0 else deltas.abs()
    clamped = torch.sign(deltas) * mag
    intra = torch.exp(n * _minmax(mag) ** 2)
    inter = torch.tanh(deltas * deltas.sum(dim=0, keepdim=True))
    score = intra * inter
    # scores are signed (tanh term), so this is a selection on the score itself, not on |x|
    k = d - min(int(d * (1 - density)), d - 1)  # rank (from the top) of the row's drop threshold
    thr = torch.stack([kth_largest(score[i], k) for i in range(n)]).unsqueeze(1)
    beta = _minmax(torch.maximum(score, thr))
    return clamped, beta


@register("pcb", paper="Parameter Competition Balancing for Model Merging (PCB-Merging)",
          url="https://arxiv.org/abs/2410.02396", params={"density": 0.1, "clamp_ratio": 1e-4, "scaling": 1.0})
def pcb_tensor(base, tensors, weights, *, name="", density=0.1, clamp_ratio=1e-4, scaling=1.0, **_):
    """PCB merge of one tensor: ``θ₀ + scaling · Σ β̂ᵢτᵢ / Σ β̂ᵢ``."""
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"pcb: density must lie in (0, 1], got {density!r} (tensor {name!r})")
    dt = compute_dtype(base)
    if base.numel() == 0:
        return base.clone()
    w = torch.tensor(weights, dtype=dt, device=base.device).unsqueeze(1)
    deltas = flat_deltas(base, tensors, dt).mul_(w)
    clamped, beta = pcb_scores(deltas, float(density), float(clamp_ratio))
    merged = (clamped * beta).sum(0) / beta.sum(0).clamp_min(1e-12)
    return (base.to(dt) + float(scaling) * merged.reshape(base.shape)).to(base.dtype)
