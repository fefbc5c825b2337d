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
    ``W = P L D U``; ``ΔW = σ·P L_r diag(z) U_r`` with frozen ``P``, ``L_r``, ``U_r``, a fixed
    scaling factor ``σ`` and trainable diagonal ``z`` (initialised to ``D_r``); the base becomes
    the residual so the layer starts unchanged.  Only the diagonal trains: the paper's abstract
    ("we focus on optimizing the diagonal matrix") and method figure (Fig. 3: the diagonal
    matrix is trainable, all other matrices fixed), and the authors' code (``minloldu``:
    ``get_loldu_params`` / ``name_is_loldu`` select ``vector_z`` only; ``scaling_factor`` is
    left out of the trained set).

    Attributes:
        r: number of LDU components.  alpha: ``σ`` is ``alpha/r`` (the authors' ``lora_alpha/rank``).
        train_scale: also train the scalar ``σ`` (off by default, as paper and code; an extension).
        save_bases: store ``L``, ``U``, ``P``.
    """

    r: int = 8
    alpha: float = 1.0
    train_scale: bool = False
    save_bases: bool = True

    peft_type: ClassVar[str] = "LOLDU"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.13618"

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return LoLDULinear(base_layer, self.r, self.alpha, self.train_scale, self.save_bases)
