"""torch.compile-clean adapter layers built on ``lowrank_ops.ops``."""
from .base import AdapterLinear, Factor
from .lora import DoRALinear, LoRALinear, lora_scaling
from .vera import VeRALinear, vera_projections

__all__ = ["AdapterLinear", "Factor", "LoRALinear", "DoRALinear", "VeRALinear", "lora_scaling", "vera_projections"]
