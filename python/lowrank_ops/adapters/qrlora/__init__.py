from .config import QRLoRA
from .layer import QRLoRALinear

__all__ = ["QRLoRA", "QRLoRALinear"]
