"""QR-LoRA config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import QRLoRALinear


@dataclass
class QRLoRA(SpectralConfigMixin, AdapterConfig):
    """QR-LoRA — Liang & Bharadwaj 2025, "QR-LoRA: QR-Based Low-Rank Adaptation for Efficient
    Fine-Tuning of Large Language Models", https://arxiv.org/abs/2508.21810, method section:
    ``W P = Q R`` (column-pivoted QR), ``ΔW = Σ_{i≤r} λ_i Q_i R_iᵀ`` with trainable scalars ``λ``.

    Attributes:
        r: number of basis pairs (ignored when ``energy`` is set).
        energy: choose ``r`` to cover this fraction of ``Σ|R_ii|`` (paper: 0.9–0.95).
        save_bases: store ``Q``, ``R``, the permutation in the adapter file.
    """

    r: Optional[int] = 8
    energy: Optional[float] = None
    save_bases: bool = True

    peft_type: ClassVar[str] = "QRLORA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2508.21810"

    def __post_init__(self) -> None:
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"QRLoRA: energy must lie in (0, 1], got {self.energy!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return QRLoRALinear(base_layer, self.r, self.energy, self.save_bases)
