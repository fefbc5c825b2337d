"""The base of every adapter config: one dataclass per method, each naming its paper."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
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
    #: fields that only set starting values or hold training extras (regulariser
    #: weights): loading a file overwrites or ignores them, so they may differ
    #: between a file and the model it loads into.  Every other field shapes the forward.
    init_only_fields: ClassVar[frozenset] = frozenset()
    #: True for methods whose layers never write the wrapped nn.Linear's weight or bias
    #: (inject then keeps no copy of them for its rollback); False where an init replaces
    #: the base by a residual, or may.
    keeps_base: ClassVar[bool] = False

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

    def differences(self, other: "AdapterConfig") -> dict[str, tuple]:
        """``{field: (self's value, other's)}`` for every field that changes the adapted
        forward (all but :attr:`init_only_fields`); ``{"type": ...}`` when the methods differ."""
        if type(self) is not type(other):
            return {"type": (type(self).__name__, type(other).__name__)}
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if f.name not in self.init_only_fields and getattr(self, f.name) != getattr(other, f.name)}
