"""SALT config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import SALTLinear


@dataclass
class SALT(SpectralConfigMixin, AdapterConfig):
    """SALT — Elsayed et al. 2025, "SALT: Parameter-Efficient Fine-Tuning via Singular Value
    Adaptation with Low-Rank Transformation", https://arxiv.org/abs/2503.16055, method section:
    ``W' = U_k diag(ReLU(α⊙σ_k + β)) V_kᵀ + U_{>k}(Σ_{>k} + XY)V_{>k}ᵀ``.

    Attributes:
        r: number of top singular values that get a trainable scale ``α`` and shift ``β``.
        lora_r: rank ``ρ`` of the low-rank update ``XY`` of the remaining block (0: none).
        relu: clamp adapted singular values at 0, as the paper.
        seed: seeds the initial ``Y``.
        save_bases: store ``U``, ``Vᵀ``, ``σ`` in the adapter file.
    """

    r: int = 8
    lora_r: int = 4
    relu: bool = True
    seed: int = 0
    save_bases: bool = True

    peft_type: ClassVar[str] = "SALT"
    paper: ClassVar[str] = "https://arxiv.org/abs/2503.16055"

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return SALTLinear(base_layer, self.r, self.lora_r, self.relu, self.seed, self.save_bases)
