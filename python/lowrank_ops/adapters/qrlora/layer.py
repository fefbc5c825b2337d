"""QR-LoRA layer: Liang & Bharadwaj 2025, "QR-LoRA: QR-Based Low-Rank Adaptation for
Efficient Fine-Tuning of Large Language Models", https://arxiv.org/abs/2508.21810, method section.

Column-pivoted QR of the frozen weight, ``W P = Q R`` (``|diag R|``
non-increasing), gives an orthonormal basis ``Q``; the update is
``ΔW = Σ_{i≤r} λ_i Q_i R_iᵀ`` with ``R_i`` row ``i`` of ``R`` mapped back through
the permutation (``R Pᵀ``), and only the scalars ``λ`` train (starting at 0).
``r`` is given, or chosen as the smallest rank whose leading ``|R_ii|`` hold a
fraction ``energy`` (the paper uses 0.9–0.95) of ``Σ|R_ii|``.  The forward is one
``lowrank_linear`` call with ``down = (R Pᵀ)[:r]``, ``up = Q[:, :r]`` and the
diagonal core ``λ``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ... import linalg
from ..spectral_common import SpectralLinear, compute_dtype, resolve_rank


def energy_rank(diag_r: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i<r} |R_ii| ≥ energy · Σ |R_ii|`` (at least 1)."""
    mag = diag_r.abs()
    total = mag.sum()
    if total == 0:
        return 1
    frac = mag.cumsum(0) / total
    return max(1, int((frac < energy - 1e-12).sum()) + 1)


class QRLoRALinear(SpectralLinear):
    """Frozen ``qrlora_Q (out, r)``, ``qrlora_R (r, in)`` (un-permuted rows of ``R``) and
    ``qrlora_perm (in,)``; trainable ``qrlora_lambda (r,)``."""

    def __init__(self, base_layer: nn.Linear, r: Optional[int] = 8, energy: Optional[float] = None,
                 save_bases: bool = True) -> None:
        super().__init__(base_layer)
        k = min(self.in_features, self.out_features)
        w = base_layer.weight.detach().to(compute_dtype(base_layer.weight.dtype))
        if energy is None:  # stop the pivoting after r columns (truncated pivoted QR)
            Q, R, perm = linalg.pivoted_qr(w, rank=resolve_rank("QRLoRA", r, k))
        else:  # the energy rule needs the whole diagonal of R
            Q, R, perm = linalg.pivoted_qr(w)
            if not 0.0 < energy <= 1.0:
                raise ValueError(f"QRLoRA: energy must lie in (0, 1], got {energy!r}")
            r = energy_rank(torch.diagonal(R), energy)
        r = resolve_rank("QRLoRA", r, k)
        self.r = r
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        self._basis("qrlora_Q", Q[:, :r], save_bases)
        self._basis("qrlora_R", R[:r][:, inv], save_bases)
        self.register_buffer("qrlora_perm", perm.to(base_layer.weight.device), persistent=save_bases)
        self.qrlora_lambda = self._param(torch.zeros(r))

    def factors(self):
        return self.qrlora_R, self.qrlora_Q, self.qrlora_lambda, 1.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
