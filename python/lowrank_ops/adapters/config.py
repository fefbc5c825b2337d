"""The base of every adapter config: one dataclass per method, each naming its paper."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from torch import nn


#: Fields every peft config file carries with these values for a plain adapter.
PEFT_COMMON = {
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "task_type": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "layers_to_transform": None,
    "layers_pattern": None,
}


@dataclass
class AdapterConfig:
    """Base class.  Subclasses set ``peft_type`` and implement :meth:`create_layer`."""

    peft_type: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        """Wrap one targeted ``nn.Linear``.  ``context`` is shared across the
        layers of one injection (e.g. VeRA's shared projections)."""
        raise NotImplementedError

    def prepare(self, targets: list[tuple[str, nn.Linear]]) -> dict:
        """Called once before wrapping ``targets``; returns the shared context."""
        return {}

    def to_peft_dict(self, target_modules) -> dict:
        """The ``adapter_config.json`` peft writes for the same adapter."""
        raise NotImplementedError

    @classmethod
    def from_peft_dict(cls, d: dict) -> "AdapterConfig":
        raise NotImplementedError

    def to_dict(self) -> dict:
        return asdict(self)
