"""Model Stock (Jang, Yun & Han 2024), mergekit's ``model_stock``.

"Model Stock: All we need is just a few fine-tuned models", Eq. (2)/(3):
with ``N`` fine-tuned models and ``cos θ`` the (mean pairwise) cosine between
their task vectors ``τᵢ = θᵢ − θ₀``, the interpolation ratio toward the average
is ``t = N·cos θ / ((N − 1)·cos θ + 1)`` and the merge is
``θ = t·mean(θᵢ) + (1 − t)·θ₀``.  ``filter_wise`` computes ``cos θ`` and ``t``
per row (last dimension) instead of per tensor.  Orthogonal task vectors
(``cos θ = 0``) give ``t = 0``: the base model.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype
from .registry import register


@register("model_stock", paper="Model Stock: All we need is just a few fine-tuned models",
          url="https://arxiv.org/abs/2403.19522", params={"filter_wise": False, "eps": 1e-8})
def model_stock_tensor(base, tensors, weights, *, name="", filter_wise=False, eps=1e-8, **_):
    """Model Stock of one tensor (``weights`` are ignored: the method averages with equal weights)."""
    n = len(tensors)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models besides the base (tensor {name!r} got {n})")
    dt = compute_dtype(base)
    b = base.to(dt)
    rowwise = bool(filter_wise) and b.dim() >= 2
    shape = b.shape
    view = (lambda x: x.reshape(-1, shape[-1])) if rowwise else (lambda x: x.reshape(1, -1))
    bv = view(b)
    # pairwise cosines, one delta pair at a time (no (N, *shape) stack)
    cos_sum = torch.zeros(bv.shape[0], dtype=dt, device=b.device)
    norms = []
    for x in tensors:
        d = view(x.to(dt)) - bv
        norms.append(d.norm(dim=1))
    pairs = 0
    for i in range(n):
        di = view(tensors[i].to(dt)) - bv
        for j in range(i + 1, n):
            dj = view(tensors[j].to(dt)) - bv
            cos_sum += (di * dj).sum(dim=1) / (norms[i] * norms[j]).clamp_min(eps)
            pairs += 1
            del dj
        del di
    cos = cos_sum / pairs
    t = (n * cos) / ((n - 1) * cos + 1)
    mean = torch.zeros_like(bv)
    for x in tensors:
        mean += view(x.to(dt))
    mean /= n
    out = t.unsqueeze(1) * mean + (1 - t).unsqueeze(1) * bv
    return out.reshape(shape).to(base.dtype)
