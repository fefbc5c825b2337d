"""LoRA and DoRA configs (peft ``LoraConfig`` equivalents)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...nn import DoRALinear, LoRALinear
from ..config import PEFT_COMMON, AdapterConfig



@dataclass
class LoRA(AdapterConfig):
    """LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2106.09685 (Eq. 3).  ``use_rslora`` scales by ``alpha/√r``
    (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732).

    Attributes:
        r: rank.  alpha: scaling numerator.  dropout: on the adapter input.
        use_rslora: rank-stabilised scaling.  init: ``"default"`` | ``"gaussian"`` | ``"random"``.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"

    peft_type: ClassVar[str] = "LORA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2106.09685"
    layer_cls: ClassVar[type] = LoRALinear

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"{type(self).__name__}: r must be an int >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must lie in [0, 1), got {self.dropout!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return self.layer_cls(base_layer, r=self.r, alpha=self.alpha, dropout=self.dropout,
                              use_rslora=self.use_rslora, init=self.init)

    def to_peft_dict(self, target_modules) -> dict:
        return {
            **PEFT_COMMON,
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.layer_cls is DoRALinear,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}.get(self.init, True),
            "target_modules": target_modules,
            "rank_pattern": {},
            "alpha_pattern": {},
            "lora_bias": False,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoRA":
        for key in ("rank_pattern", "alpha_pattern"):
            if d.get(key):
                raise NotImplementedError(f"load_pretrained: peft `{key}` (per-module ranks) is not supported yet: {d[key]}")
        if d.get("fan_in_fan_out"):
            raise NotImplementedError("load_pretrained: fan_in_fan_out=True (Conv1D bases) is not supported")
        if d.get("bias", "none") != "none" or d.get("lora_bias"):
            raise NotImplementedError("load_pretrained: adapters that train biases are not supported")
        init = {True: "default", False: "random", "gaussian": "gaussian"}.get(d.get("init_lora_weights", True), "default")
        klass = DoRA if d.get("use_dora") else LoRA
        return klass(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                     use_rslora=bool(d.get("use_rslora", False)), init=init)


@dataclass
class DoRA(LoRA):
    """DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
    https://arxiv.org/abs/2402.09353 (Eq. 5; norm detached per §4.3).
    Saved as peft's ``LoraConfig(use_dora=True)``."""

    paper: ClassVar[str] = "https://arxiv.org/abs/2402.09353"
    layer_cls: ClassVar[type] = DoRALinear
