from .config import SALT
from .layer import SALTLinear

__all__ = ["SALT", "SALTLinear"]
