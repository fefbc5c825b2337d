"""SVF / CLIP-SVD config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import PARAMETRIZATIONS, SVFLinear


@dataclass
class SVF(SpectralConfigMixin, AdapterConfig):
    """Singular-value fine-tuning — "Singular Value Few-shot Adaptation of Vision-Language
    Models" (CLIP-SVD, 2025) and Transformer² SVF (Sun et al. 2025,
    https://arxiv.org/abs/2501.06252): ``W' = U·diag(σ')·Vᵀ``, i.e.
    ``ΔW = U·diag(σ' − σ)·Vᵀ``; only the singular values train.

    Attributes:
        r: number of leading singular values to tune (default None: the full spectrum).
        parametrization: ``"additive"`` (train ``σ'``, CLIP-SVD) or ``"scale"``
            (train ``z`` with ``σ' = σ ⊙ z``, Transformer² SVF).
        save_bases: store ``U``, ``Vᵀ``, ``σ`` in the adapter file.
    """

    r: Optional[int] = None
    parametrization: str = "additive"
    save_bases: bool = True

    peft_type: ClassVar[str] = "SVF"
    paper: ClassVar[str] = "https://arxiv.org/abs/2501.06252"

    def __post_init__(self) -> None:
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"SVF: parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return SVFLinear(base_layer, self.r, self.parametrization, self.save_bases)
