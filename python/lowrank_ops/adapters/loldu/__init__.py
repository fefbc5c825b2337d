from .config import LoLDU
from .layer import LoLDULinear

__all__ = ["LoLDU", "LoLDULinear"]
