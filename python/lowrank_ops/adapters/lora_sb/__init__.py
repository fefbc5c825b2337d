from .config import LoRASB
from .layer import LoRASBLinear, lora_sb_init

__all__ = ["LoRASB", "LoRASBLinear", "lora_sb_init"]
