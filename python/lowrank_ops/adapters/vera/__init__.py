from .config import VeRA

__all__ = ["VeRA"]
