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
    ``L1 + β‖ΔΣ‖² + γ(‖ΔUᵀΔU − I‖_F + ‖ΔVᵀΔV − I‖_F)``, averaged over the adapted layers as
    the authors' code does (:func:`kasa_regularizer`).

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
    """KaSA's auxiliary loss ``β·L2 + γ·L3``, averaged over the KaSA layers of ``model``.

    Paper (Wang et al. 2024, arXiv:2412.06071, method section "knowledge-aware
    singular-value adaptation"): ``L2 = ‖ΔΣ‖²`` (the singular-value / ``‖ΔW‖_F²`` penalty),
    ``L3 = ‖ΔUᵀΔU − I_r‖_F + ‖ΔVᵀΔV − I_r‖_F`` (orthogonal regularisation) and the total loss
    ``L = L1 + β·L2 + γ·L3``, written for one adapted matrix.  Across layers the authors'
    ``main.py`` (``loss_fn``) sums ``β·L2 + γ·L3`` over the adapted layers and divides by their
    number (``block_num``, one per ``lora_diag``); this function returns that mean:
    ``(1/n) Σ_layers (β‖ΔΣ‖² + γ(‖ΔUᵀΔU − I‖_F + ‖ΔVᵀΔV − I‖_F))``.  (The authors' code forms
    the Gram matrices the other way round, ``ΔVΔVᵀ − I_in`` / ``ΔUΔUᵀ − I_out``; the ``r×r``
    form here is the paper's.)  β/γ default to the injected config's (1e-4 / 1e-3, the
    authors' ``main.py`` defaults); add the result to the task loss ``L1``.
    """
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
    return total / len(layers)
