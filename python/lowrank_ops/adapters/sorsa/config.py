"""SORSA config and the model-wide regulariser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import SORSALinear


@dataclass
class SORSA(SpectralConfigMixin, AdapterConfig):
    """SORSA — Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors
    Adaptation of Large Language Models", https://arxiv.org/abs/2409.00055, method section:
    ``W = W_r + U_p Σ_p V_pᵀ`` with trainable ``U_p, Σ_p, V_p`` and the regulariser
    ``γ(‖U_pᵀU_p − I‖_F² + ‖V_pᵀV_p − I‖_F²)`` (:func:`sorsa_regularizer`).

    Attributes:
        r: number of principal singular triplets made trainable.
        gamma: suggested regulariser weight (recorded; apply it in your loss).
    """

    r: int = 8
    gamma: float = 4e-3

    peft_type: ClassVar[str] = "SORSA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2409.00055"
    init_only_fields: ClassVar[frozenset] = frozenset({"gamma"})

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return SORSALinear(base_layer, self.r)


def sorsa_regularizer(model: nn.Module) -> Tensor:
    """Sum of :meth:`SORSALinear.orthogonal_regularizer` over every SORSA layer of ``model``
    (unweighted: multiply by γ in the loss)."""
    terms = [m.orthogonal_regularizer() for m in model.modules() if isinstance(m, SORSALinear)]
    if not terms:
        raise ValueError("sorsa_regularizer: the model has no SORSA layers")
    return torch.stack(terms).sum()
