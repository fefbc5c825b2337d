from .config import SALT, salt_regularizer
from .layer import SALTLinear

__all__ = ["SALT", "SALTLinear", "salt_regularizer"]
