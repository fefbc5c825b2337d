"""SVFT config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import PATTERNS, SVFTLinear


@dataclass
class SVFT(SpectralConfigMixin, AdapterConfig):
    """SVFT — Lingam et al. 2024, "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors",
    https://arxiv.org/abs/2405.19597, method section: ``W' = U(Σ + M)Vᵀ``, i.e. ``ΔW = U·M·Vᵀ``
    with frozen singular vectors ``U, V`` of ``W`` and sparse trainable ``M``.

    Attributes:
        pattern: ``"plain"`` (diagonal M), ``"banded"``, ``"random"`` or ``"top_k"``.
        off_diag: ``d``; banded keeps ``2d+1`` diagonals, random/top_k use the same budget.
        r: keep the top-r singular vectors (default None: all ``min(out, in)``, as the paper).
        init: ``"zeros"`` (ΔW = 0 at init) or ``"normal"`` (non-zero start).
        seed: seeds the random pattern and the ``"normal"`` init.
        save_bases: store ``U``/``Vᵀ`` in the adapter file (else recomputed on load).
    """

    pattern: str = "plain"
    off_diag: int = 1
    r: Optional[int] = None
    init: str = "zeros"
    seed: int = 0
    save_bases: bool = True

    peft_type: ClassVar[str] = "SVFT"
    paper: ClassVar[str] = "https://arxiv.org/abs/2405.19597"
    init_only_fields: ClassVar[frozenset] = frozenset({"init"})

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"SVFT: pattern must be one of {PATTERNS}, got {self.pattern!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return SVFTLinear(base_layer, self.pattern, self.off_diag, self.r, self.init, self.seed, self.save_bases)
