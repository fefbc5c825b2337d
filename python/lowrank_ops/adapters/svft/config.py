"""SVFT config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import INITS, PATTERNS, SVFTLinear


@dataclass
class SVFT(SpectralConfigMixin, AdapterConfig):
    """SVFT — Lingam et al. 2024, "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors",
    https://arxiv.org/abs/2405.19597, §3.1 Eq. (1): ``W' = U(Σ + M)Vᵀ``, i.e. ``ΔW = U·M·Vᵀ``
    with frozen singular vectors ``U, V`` of ``W`` and sparse trainable ``M``.  What the paper
    says vs the official code vs ours: :mod:`lowrank_ops.adapters.svft.layer`.

    Attributes:
        pattern: ``"plain"`` (diagonal M), ``"banded"``, ``"random"`` or ``"top_k"``.
        off_diag: ``d``; banded keeps ``2d+1`` diagonals (``n(2d+1) − d(d+1)`` entries);
            random (anywhere in ``M``) and top_k use the same budget.
        r: keep the top-r singular vectors (default None: all ``min(out, in)``, as the paper).
        init: ``"zeros"`` (ΔW = 0 at init; the paper does not specify M's init),
            ``"normal"`` (non-zero start) or ``"kaiming"`` (the official code's draw).
        seed: seeds the random pattern and the ``"normal"``/``"kaiming"`` inits.
        save_bases: store ``U``/``Vᵀ`` in the adapter file (else recomputed on load).
        gate: multiply ``M`` by ``sigmoid(g)``, ``g`` a trainable per-layer scalar starting at
            0 (official code, not in the paper); with ``init="kaiming"`` it reproduces the
            official layer.
        drop_tail: for ``r < min(out, in)``, replace ``W`` by ``U_r Σ_r V_rᵀ`` as the paper's
            rank ablation (App. C.4) and the official code do (default False: keep ``W``
            whole, which is Eq. (1) with Ω inside the top ``r × r`` block).
    """

    pattern: str = "plain"
    off_diag: int = 1
    r: Optional[int] = None
    init: str = "zeros"
    seed: int = 0
    save_bases: bool = True
    gate: bool = False
    drop_tail: bool = False

    peft_type: ClassVar[str] = "SVFT"
    paper: ClassVar[str] = "https://arxiv.org/abs/2405.19597"
    init_only_fields: ClassVar[frozenset] = frozenset({"init"})

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"SVFT: pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.init not in INITS:
            raise ValueError(f"SVFT: init must be one of {INITS}, got {self.init!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return SVFTLinear(base_layer, self.pattern, self.off_diag, self.r, self.init, self.seed, self.save_bases,
                          self.gate, self.drop_tail)
