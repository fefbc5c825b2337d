"""Model Stock (Jang, Yun & Han 2024), mergekit's ``model_stock``.

"Model Stock: All we need is just a few fine-tuned models", Eq. (2)/(3):
with ``N`` fine-tuned models and ``cos θ`` the (mean pairwise) cosine between
their task vectors ``τᵢ = θᵢ − θ₀``, the interpolation ratio toward the average
is ``t = N·cos θ / ((N − 1)·cos θ + 1)`` and the merge is
``θ = t·mean(θᵢ) + (1 − t)·θ₀``.  ``filter_wise`` computes ``cos θ`` and ``t``
per row (last dimension) instead of per tensor.  Where ``(N − 1)·cos θ + 1 = 0``
there is no finite ratio and the base is kept (as mergekit does).  Orthogonal task vectors
(``cos θ = 0``) give ``t = 0``: the base model.
"""
from __future__ import annotations

import torch

from ._common import compute_dtype, scratch_base
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
    rows, cols = bv.shape
    # Gram matrix of the task vectors, per row: G[r] = D_r D_rᵀ, accumulated over column chunks so that
    # no (N, *shape) stack or full-size delta is formed (peak memory ≈ inputs + the output)
    G = torch.zeros(rows, n, n, dtype=dt, device=b.device)
    step = max(1, (1 << 20) // max(1, rows * n))
    for c0 in range(0, cols, step):
        D = torch.stack([view(x)[:, c0:c0 + step].to(dt) for x in tensors], 1) - bv[:, None, c0:c0 + step]
        G += D @ D.mT
        del D
    norms = G.diagonal(dim1=1, dim2=2).sqrt()
    cos = G / (norms[:, :, None] * norms[:, None, :]).clamp_min(eps)
    iu = torch.triu_indices(n, n, 1)
    cos = cos[:, iu[0], iu[1]].clamp(-1, 1).mean(1)
    den = (n - 1) * cos + 1
    singular = den.abs() < 1e-6  # cos θ = −1/(N−1): no finite ratio; keep the base there
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))
    # θ₀ + t·(mean − θ₀) = (1 − t)·θ₀ + Σ (t/N)·θᵢ, accumulated in place (into base's storage when the
    # streaming engine owns it: then no full-size buffer beyond the inputs is allocated)
    out = view(scratch_base(base, dt))
    out.mul_((1 - t)[:, None])
    coef = (t / n)[:, None]
    for x in tensors:
        out.addcmul_(view(x).to(dt), coef)
    return out.reshape(shape).to(base.dtype)
