"""LaMDA layer: Azizi, Kundu & Pedram 2024, "LaMDA: Large Model Fine-Tuning via Spectrally
Decomposed Low-Dimensional Adaptation", https://arxiv.org/abs/2406.12832, method section.

``ΔW = B·S·A`` with the first projection ``A (r, in)`` (PMA) frozen, a trainable
low-dimensional square core ``S (r, r)`` and the second projection ``B (out, r)``
(PMB) trainable early and then frozen (:meth:`LaMDALinear.freeze_projection_b`;
the schedule is the caller's).  Spectral init (``init="svd"``, default): from the
SVD of ``W``, ``A = V_rᵀ``, ``S = Σ_r`` and ``B = U_r``, and the base becomes the
residual ``W − U_r Σ_r V_rᵀ`` so the layer is unchanged at init.  ``init="zero"``
keeps ``W``, draws ``A`` with orthonormal rows and ``B`` Kaiming-uniform (both
seeded) and starts ``S = 0``.  The forward is one ``lowrank_linear`` call with the
dense ``(r, r)`` core.  LaMDA++'s per-layer rank allocation is not included.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..spectral_common import SpectralLinear, resolve_rank, thin_svd

INITS = ("svd", "zero")


class LaMDALinear(SpectralLinear):
    """Frozen ``lamda_A (r, in)``; trainable ``lamda_S (r, r)`` and ``lamda_B (out, r)``."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, init: str = "svd", seed: int = 0,
                 save_bases: bool = True) -> None:
        super().__init__(base_layer)
        if init not in INITS:
            raise ValueError(f"LaMDA: init must be one of {INITS}, got {init!r}")
        r = resolve_rank("LaMDA", r, min(self.in_features, self.out_features), allow_full=False)
        self.r, self.init = r, init
        if init == "svd":
            U, S, Vh = thin_svd(base_layer.weight)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
            a, s, b = Vh, torch.diag(S), U
            self._set_base(base_layer.weight.to(U.dtype) - (U * S) @ Vh)
        else:
            g = torch.Generator().manual_seed(seed)
            a = torch.linalg.qr(torch.randn(self.in_features, r, generator=g)).Q.T
            bound = 1.0 / math.sqrt(r)
            b = torch.empty(self.out_features, r).uniform_(-bound, bound, generator=g)
            s = torch.zeros(r, r)
        self._basis("lamda_A", a, save_bases)
        self.lamda_S = self._param(s)
        self.lamda_B = self._param(b)

    def freeze_projection_b(self) -> None:
        """Stop training PMB (LaMDA freezes it early in fine-tuning)."""
        self.lamda_B.requires_grad_(False)

    def factors(self):
        return self.lamda_A, self.lamda_B, self.lamda_S, 1.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, init={self.init}"
