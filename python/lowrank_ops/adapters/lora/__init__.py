from .config import DoRA, LoRA
from .init import EVA, MiLoRA, OLoRA, PiSSA, allocate_ranks, eva_init, milora_init_, olora_init_, pissa_init_

__all__ = ["LoRA", "DoRA", "PiSSA", "MiLoRA", "OLoRA", "EVA",
           "pissa_init_", "milora_init_", "olora_init_", "eva_init", "allocate_ranks"]
