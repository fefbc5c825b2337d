from .config import LaMDA, lamda_freeze_projection_b
from .layer import LaMDALinear

__all__ = ["LaMDA", "LaMDALinear", "lamda_freeze_projection_b"]
