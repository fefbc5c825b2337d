from .config import LaMDA, lamda_freeze_projection_b, lamda_freeze_step
from .layer import LaMDALinear, freeze_schedule

__all__ = ["LaMDA", "LaMDALinear", "lamda_freeze_projection_b", "lamda_freeze_step", "freeze_schedule"]
