"""KaSA config and the model-wide regulariser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import KaSALinear


@dataclass
class KaSA(SpectralConfigMixin, AdapterConfig):
    """KaSA — Wang et al. 2024, "KaSA: Knowledge-Aware Singular-Value Adaptation of Large
    Language Models", https://arxiv.org/abs/2412.06071, method section: truncate the ``r`` minor
    singular components of ``W``, then ``ΔW = (alpha/r)·ΔU·diag(ΔΣ)·ΔVᵀ`` with the loss
    ``L + β‖ΔΣ‖² + γ(‖ΔUᵀΔU − I‖_F + ‖ΔVᵀΔV − I‖_F)`` (:func:`kasa_regularizer`).

    Attributes:
        r: adapter rank and number of truncated minor components.
        alpha: scaling numerator (``s = alpha/r``).
        beta, gamma: regulariser weights used by :func:`kasa_regularizer` by default.
        seed: seeds the initial ``ΔVᵀ`` and ``ΔΣ``.
    """

    r: int = 8
    alpha: float = 16.0
    beta: float = 1e-4
    gamma: float = 1e-3
    seed: int = 0

    peft_type: ClassVar[str] = "KASA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2412.06071"
    init_only_fields: ClassVar[frozenset] = frozenset({"beta", "gamma"})

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return KaSALinear(base_layer, self.r, self.alpha, self.seed)


def kasa_regularizer(model: nn.Module, beta: float | None = None, gamma: float | None = None) -> Tensor:
    """``Σ_layers β‖ΔΣ‖² + γ(‖ΔUᵀΔU − I‖_F + ‖ΔVᵀΔV − I‖_F)``; β/γ default to the injected config's."""
    layers = [m for m in model.modules() if isinstance(m, KaSALinear)]
    if not layers:
        raise ValueError("kasa_regularizer: the model has no KaSA layers")
    cfg = getattr(model, "_lowrank_ops_adapter", {}).get("config")
    beta = beta if beta is not None else getattr(cfg, "beta", KaSA.beta)
    gamma = gamma if gamma is not None else getattr(cfg, "gamma", KaSA.gamma)
    total = None
    for m in layers:
        l2, ortho = m.regularizers()
        term = beta * l2 + gamma * ortho
        total = term if total is None else total + term
    return total
