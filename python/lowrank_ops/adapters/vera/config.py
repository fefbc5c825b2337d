"""VeRA config (peft ``VeraConfig`` equivalent)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...nn import VeRALinear, vera_projections
from ..config import PEFT_COMMON, AdapterConfig


@dataclass
class VeRA(AdapterConfig):
    """VeRA — Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
    https://arxiv.org/abs/2310.11454 (Eq. 1).

    Attributes:
        r: rank of the shared random projections (the paper uses large r, e.g. 256).
        d_initial: initial value of every ``λ_d``.
        projection_prng_key: seed that regenerates the frozen projections.
        save_projection: store the projections in the adapter file (else they are
            regenerated from the seed on load).
        dropout: on the adapter input.
    """

    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0

    peft_type: ClassVar[str] = "VERA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2310.11454"
    init_only_fields: ClassVar[frozenset] = frozenset({"d_initial", "save_projection"})
    keeps_base: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"VeRA: r must be an int >= 1, got {self.r!r}")

    def prepare(self, targets) -> dict:
        out_max = max(m.out_features for _, m in targets)
        in_max = max(m.in_features for _, m in targets)
        w = targets[0][1].weight
        a, b = vera_projections(self.r, in_max, out_max, self.projection_prng_key, dtype=w.dtype, device=w.device)
        return {"vera_A": a, "vera_B": b}

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return VeRALinear(base_layer, context["vera_A"], context["vera_B"], d_initial=self.d_initial, dropout=self.dropout)

    def to_peft_dict(self, target_modules) -> dict:
        return {
            "peft_type": "VERA",
            "r": self.r,
            "d_initial": self.d_initial,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "target_modules": target_modules,
            "init_weights": True,
            **PEFT_COMMON,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "VeRA":
        if d.get("fan_in_fan_out"):
            raise NotImplementedError("load_pretrained: fan_in_fan_out=True (Conv1D bases) is not supported")
        return cls(r=int(d["r"]), d_initial=float(d.get("d_initial", 0.1)),
                   projection_prng_key=int(d.get("projection_prng_key", 0)),
                   save_projection=bool(d.get("save_projection", True)), dropout=float(d.get("vera_dropout", 0.0)))
