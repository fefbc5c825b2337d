from .config import KaSA, kasa_regularizer
from .layer import KaSALinear

__all__ = ["KaSA", "KaSALinear", "kasa_regularizer"]
