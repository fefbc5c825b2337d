"""LoRA-SB config (no peft equivalent; saved in peft's file layout with ``peft_type: "LORA_SB"``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from ..config import PEFT_COMMON, AdapterConfig
from .layer import LoRASBLinear


@dataclass
class LoRASB(AdapterConfig):
    """LoRA-SB — Ponkshe et al. 2024, "Initialization using Update Approximation is a Silver
    Bullet for Extremely Efficient Low-Rank Fine-Tuning", https://arxiv.org/abs/2411.19557.

    ``ΔW = s·B·R·A`` with frozen ``B (out, r)``, ``A (r, in)`` and a trainable ``r×r`` core
    ``R`` (the LoRA-XS architecture), initialised by :func:`adapters.lora_sb_init` from the
    truncated SVD of the first full fine-tuning update estimated over a few batches.

    Attributes:
        r: rank.  alpha: scale numerator, ``s = alpha/r``; default ``alpha = r`` (``s = 1``:
            the paper's point is that with orthonormal ``B``, ``A`` no scale needs tuning).
    """

    r: int = 8
    alpha: Optional[float] = None

    peft_type: ClassVar[str] = "LORA_SB"
    paper: ClassVar[str] = "https://arxiv.org/abs/2411.19557"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRASB: r must be an int >= 1, got {self.r!r}")
        if self.alpha is None:
            self.alpha = float(self.r)

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return LoRASBLinear(base_layer, r=self.r, alpha=self.alpha)

    def to_peft_dict(self, target_modules) -> dict:
        return {**PEFT_COMMON, "peft_type": "LORA_SB", "r": self.r, "lora_alpha": self.alpha,
                "init_lora_weights": "lora_sb", "target_modules": target_modules}

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoRASB":
        return cls(r=int(d["r"]), alpha=float(d.get("lora_alpha", d["r"])))
