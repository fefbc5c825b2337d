"""LoLDU config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import LoLDULinear


@dataclass
class LoLDU(SpectralConfigMixin, AdapterConfig):
    """LoLDU — Shi et al. 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition
    for Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2410.13618, method section:
    ``W = P L D U``; ``ΔW = s·P L_r diag(z) U_r`` with frozen ``L_r``, ``U_r`` and trainable
    ``z`` (+ scalar ``s``); the base becomes the residual so the layer starts unchanged.

    Attributes:
        r: number of LDU components.  alpha: ``s`` starts at ``alpha/r``.
        train_scale: train the scalar ``s`` too.  save_bases: store ``L``, ``U``, ``P``.
    """

    r: int = 8
    alpha: float = 1.0
    train_scale: bool = True
    save_bases: bool = True

    peft_type: ClassVar[str] = "LOLDU"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.13618"

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return LoLDULinear(base_layer, self.r, self.alpha, self.train_scale, self.save_bases)
