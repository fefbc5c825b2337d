"""LaMDA config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import INITS, LaMDALinear


@dataclass
class LaMDA(SpectralConfigMixin, AdapterConfig):
    """LaMDA — Azizi et al. 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
    Low-Dimensional Adaptation", https://arxiv.org/abs/2406.12832, method section: ``ΔW = B·S·A`` with
    frozen PMA ``A``, trainable ``r × r`` core ``S`` and PMB ``B`` (frozen early by
    :func:`lamda_freeze_projection_b`).

    Attributes:
        r: adapter rank.  init: ``"svd"`` (spectral split, base becomes the residual) or
            ``"zero"`` (random projections, ``S = 0``).  seed: for ``"zero"``.
        save_bases: store the frozen ``A`` in the adapter file.
    """

    r: int = 8
    init: str = "svd"
    seed: int = 0
    save_bases: bool = True

    peft_type: ClassVar[str] = "LAMDA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.12832"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"LaMDA: init must be one of {INITS}, got {self.init!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return LaMDALinear(base_layer, self.r, self.init, self.seed, self.save_bases)


def lamda_freeze_projection_b(model: nn.Module) -> int:
    """Freeze PMB in every LaMDA layer of ``model``; returns the number of layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, LaMDALinear):
            m.freeze_projection_b()
            n += 1
    return n
