"""KaSA layer: Wang et al. 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large
Language Models", https://arxiv.org/abs/2412.06071.

Stage 1 — knowledge-based SVD truncation: the ``r`` smallest singular
components of ``W`` are dropped, ``W_world = U_{k−r} Σ_{k−r} V_{k−r}ᵀ``
(``k = min(out, in)``), which becomes the frozen base.  (The authors' code keeps
``in_features − r`` components; we use ``min(out, in) − r`` so tall layers work.)
This changes the layer at init: the output equals ``W_world x + b``, not ``W x + b``.

Stage 2 — knowledge-aware singular-value adaptation:
``ΔW = s·ΔU·diag(ΔΣ)·ΔVᵀ`` with ``ΔU = kasa_B (out, r)`` (zero at init, so
``ΔW = 0``), ``ΔVᵀ = kasa_A (r, in)`` (Kaiming-uniform), ``ΔΣ = kasa_diag (r,)``
(standard normal, as the authors' code) and ``s = alpha/r``.  Training adds
``β·‖ΔΣ‖₂² + γ·(‖ΔUᵀΔU − I‖_F + ‖ΔVᵀΔV − I‖_F)``: :meth:`KaSALinear.regularizers`.
The truncation is destructive: ``unload()`` / ``unmerge()`` give back ``W_world``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..spectral_common import SpectralLinear, resolve_rank, thin_svd


class KaSALinear(SpectralLinear):
    """``y = W_world x + b + s·B·diag(d)·A x``."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16.0, seed: int = 0) -> None:
        super().__init__(base_layer)
        k = min(self.in_features, self.out_features)
        r = resolve_rank("KaSA", r, k, allow_full=False)
        if r >= k:
            raise ValueError(f"KaSA: r={r} must be < min(out_features, in_features)={k} (r minor components are truncated)")
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        U, S, Vh = thin_svd(base_layer.weight)
        keep = k - r
        self._set_base((U[:, :keep] * S[:keep]) @ Vh[:keep])
        g = torch.Generator().manual_seed(seed)
        a = torch.empty(r, self.in_features)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=√5) bound, as nn.Linear / LoRA
        a.uniform_(-bound, bound, generator=g)
        self.kasa_A = self._param(a)
        self.kasa_B = self._param(torch.zeros(self.out_features, r))
        self.kasa_diag = self._param(torch.randn(r, generator=g))

    def factors(self):
        return self.kasa_A, self.kasa_B, self.kasa_diag, self.scaling

    def regularizers(self) -> tuple[Tensor, Tensor]:
        """``(‖ΔΣ‖₂², ‖ΔUᵀΔU − I‖_F + ‖ΔVᵀΔV − I‖_F)`` in fp32 or wider."""
        dt = torch.promote_types(self.kasa_A.dtype, torch.float32)
        a, b, d = self.kasa_A.to(dt), self.kasa_B.to(dt), self.kasa_diag.to(dt)
        eye = torch.eye(self.r, dtype=dt, device=a.device)
        ortho = torch.linalg.matrix_norm(b.T @ b - eye) + torch.linalg.matrix_norm(a @ a.T - eye)
        return d.square().sum(), ortho

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"
