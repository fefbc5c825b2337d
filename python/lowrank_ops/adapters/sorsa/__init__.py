from .config import SORSA, sorsa_regularizer
from .layer import SORSALinear

__all__ = ["SORSA", "SORSALinear", "sorsa_regularizer"]
