from .config import DoRA, LoRA

__all__ = ["LoRA", "DoRA"]
