from .config import SVFT
from .layer import SVFTLinear

__all__ = ["SVFT", "SVFTLinear"]
