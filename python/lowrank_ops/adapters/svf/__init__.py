from .config import SVF
from .layer import SVFLinear

__all__ = ["SVF", "SVFLinear"]
