"""SALT config and the model-wide regulariser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

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
        reg_multiplier: weight of :func:`salt_regularizer` (the authors' ``train_dl``
            default ``reg_multiplier=0.01``).
    """

    r: int = 8
    lora_r: int = 4
    relu: bool = True
    seed: int = 0
    save_bases: bool = True
    reg_multiplier: float = 0.01

    peft_type: ClassVar[str] = "SALT"
    paper: ClassVar[str] = "https://arxiv.org/abs/2503.16055"
    init_only_fields: ClassVar[frozenset] = frozenset({"reg_multiplier"})

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return SALTLinear(base_layer, self.r, self.lora_r, self.relu, self.seed, self.save_bases)


def salt_regularizer(model: nn.Module, reg_multiplier: Optional[float] = None) -> Tensor:
    """``reg_multiplier · Σ_layers (‖diag(α⊙σ_k + β) − diag(σ_k)‖_F + ‖XY‖_F)`` over every SALT
    layer of ``model``; add it to the task loss.

    Source: the authors' code, not the paper — the SALT paper (Elsayed et al. 2025,
    arXiv:2503.16055, method section) defines the scale/shift + low-rank update but, in the text
    available to us, no regulariser.  In the official implementation each ``SALTLinear`` returns
    ``reg_loss = ‖scale_shift_term‖_F + ‖XY‖_F`` (:meth:`SALTLinear.regularizer`), the encoder
    sums it over all layers and ``train_dl`` adds ``reg_loss * reg_multiplier`` (default 0.01)
    to the segmentation loss every step: a plain sum over layers, no averaging.
    ``reg_multiplier`` defaults to the injected config's (0.01).
    """
    layers = [m for m in model.modules() if isinstance(m, SALTLinear)]
    if not layers:
        raise ValueError("salt_regularizer: the model has no SALT layers")
    if reg_multiplier is None:
        cfg = getattr(model, "_lowrank_ops_adapter", {}).get("config")
        reg_multiplier = cfg.reg_multiplier if isinstance(cfg, SALT) else SALT.reg_multiplier
    return reg_multiplier * torch.stack([m.regularizer() for m in layers]).sum()
