"""LoRA and DoRA configs (peft ``LoraConfig`` equivalents)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

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
        rank_pattern, alpha_pattern: per-module ``r`` / ``alpha`` overrides, keyed by a
            regex matched against the end of the module name as peft does
            (``re.match(rf"(.*\\.)?({key})$", name)``); EVA and ``extract_lora`` write them.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    peft_type: ClassVar[str] = "LORA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2106.09685"
    layer_cls: ClassVar[type] = LoRALinear
    init_only_fields: ClassVar[frozenset] = frozenset({"init"})
    keeps_base: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"{type(self).__name__}: r must be an int >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must lie in [0, 1), got {self.dropout!r}")

    def prepare(self, targets) -> dict:
        # create_layer is not told the module's name; rank/alpha patterns need it
        return {"names": {id(m): n for n, m in targets}}

    def rank_alpha(self, name: Optional[str]) -> tuple[int, float]:
        """``(r, alpha)`` of module ``name`` after ``rank_pattern`` / ``alpha_pattern``."""
        return (_pattern_value(self.rank_pattern, name, self.r),
                _pattern_value(self.alpha_pattern, name, self.alpha))

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        r, alpha = self.rank_alpha(context.get("names", {}).get(id(base_layer)))
        return self.layer_cls(base_layer, r=r, alpha=alpha, dropout=self.dropout,
                              use_rslora=self.use_rslora, init=self.init)

    def peft_init_value(self):
        """The ``init_lora_weights`` value peft writes for this config."""
        return {"default": True, "gaussian": "gaussian", "random": False}.get(self.init, True)

    def to_peft_dict(self, target_modules) -> dict:
        return {
            **PEFT_COMMON,
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.layer_cls is DoRALinear,
            "init_lora_weights": self.peft_init_value(),
            "target_modules": target_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "lora_bias": False,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoRA":
        init_value = d.get("init_lora_weights", True)
        if isinstance(init_value, str) and init_value not in ("gaussian",):
            # PiSSA / MiLoRA / OLoRA / EVA configs live in adapters.lora.init
            from .init import config_from_peft_dict

            return config_from_peft_dict(d)
        if d.get("fan_in_fan_out"):
            raise NotImplementedError("load_pretrained: fan_in_fan_out=True (Conv1D bases) is not supported")
        if d.get("bias", "none") != "none" or d.get("lora_bias"):
            raise NotImplementedError("load_pretrained: adapters that train biases are not supported")
        init = {True: "default", False: "random", "gaussian": "gaussian"}.get(d.get("init_lora_weights", True), "default")
        klass = DoRA if d.get("use_dora") else LoRA
        return klass(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                     use_rslora=bool(d.get("use_rslora", False)), init=init, **patterns_from_peft_dict(d))


def patterns_from_peft_dict(d: dict) -> dict:
    """``rank_pattern`` / ``alpha_pattern`` of a peft config, typed."""
    return {"rank_pattern": {k: int(v) for k, v in (d.get("rank_pattern") or {}).items()},
            "alpha_pattern": {k: float(v) for k, v in (d.get("alpha_pattern") or {}).items()}}


def _pattern_value(pattern: dict, name: Optional[str], default):
    """peft's ``get_pattern_key`` rule: the first key whose regex matches the end of ``name``."""
    if name is None or not pattern:
        return default
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class DoRA(LoRA):
    """DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
    https://arxiv.org/abs/2402.09353 (Eq. 5; norm detached per §4.3).
    Saved as peft's ``LoraConfig(use_dora=True)``."""

    paper: ClassVar[str] = "https://arxiv.org/abs/2402.09353"
    layer_cls: ClassVar[type] = DoRALinear
