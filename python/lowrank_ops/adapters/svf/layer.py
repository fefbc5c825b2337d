"""Singular-value fine-tuning (SVF / CLIP-SVD): only the singular values of ``W`` train.

``W' = U·diag(σ')·Vᵀ`` with ``U, V`` frozen, so ``ΔW = U·diag(σ' − σ)·Vᵀ``.

* CLIP-SVD — "Singular Value Few-shot Adaptation of Vision-Language Models"
  (2025): trains ``σ'`` directly (``parametrization="additive"``).
* Transformer² SVF — Sun et al. 2025, "Transformer²: Self-adaptive LLMs",
  https://arxiv.org/abs/2501.06252: ``W' = U(Σ ⊗ diag(z))Vᵀ`` with a trainable
  vector ``z`` starting at 1 (``parametrization="scale"``).

Both are SVFT's ``plain`` pattern written on the singular values themselves;
``core = σ' − σ`` (or ``σ ⊙ (z − 1)``) is the diagonal core of ``lowrank_linear``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..spectral_common import SpectralLinear, resolve_rank, thin_svd

PARAMETRIZATIONS = ("additive", "scale")


class SVFLinear(SpectralLinear):
    """``y = W x + b + U·diag(σ' − σ)·Vᵀ x`` over the top ``r`` (default all) singular triplets.

    ``svf_sigma`` is the trainable vector: ``σ'`` itself (starts at ``σ``) for
    ``"additive"``, the multiplier ``z`` (starts at 1) for ``"scale"``.
    """

    def __init__(self, base_layer: nn.Linear, r: Optional[int] = None, parametrization: str = "additive",
                 save_bases: bool = True) -> None:
        super().__init__(base_layer)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"SVF: parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        n = resolve_rank("SVF", r, min(self.in_features, self.out_features))
        self.r, self.parametrization = n, parametrization
        U, S, Vh = thin_svd(base_layer.weight)
        self._basis("svf_U", U[:, :n], save_bases)
        self._basis("svf_Vh", Vh[:n], save_bases)
        self._basis("svf_sigma0", S[:n], save_bases)
        self.svf_sigma = self._param(S[:n] if parametrization == "additive" else torch.ones(n))

    def singular_values(self):
        """The adapted singular values ``σ'``."""
        return self.svf_sigma if self.parametrization == "additive" else self.svf_sigma0 * self.svf_sigma

    def factors(self):
        return self.svf_Vh, self.svf_U, self.singular_values() - self.svf_sigma0, 1.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, parametrization={self.parametrization}"
