"""peft as the benchmarks' peer: its LoRA/DoRA ``Linear`` wrapped around a given ``nn.Linear``."""
from __future__ import annotations

from typing import Optional

from torch import nn


class _Holder(nn.Module):
    """A one-layer model, so peft can target the layer by name (``proj``)."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_lora_layer(lin: nn.Linear, **lora_config) -> Optional[nn.Module]:
    """peft's LoRA layer around ``lin`` built from ``LoraConfig(**lora_config)``, or None without peft.

    ``autocast_adapter_dtype=False`` keeps the factors in ``lin``'s dtype, as ours are."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model = get_peft_model(_Holder(lin), LoraConfig(target_modules=["proj"], **lora_config),
                           autocast_adapter_dtype=False)
    return model.base_model.model.proj
