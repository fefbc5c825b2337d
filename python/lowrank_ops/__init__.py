"""lowrank_ops: fused low-rank and spectral ops for PyTorch.

Importing this package loads the compiled library (``lowrank_ops._C``) into
``torch.ops.lowrank_ops`` and registers the Python halves of every op (fake
kernels for ``torch.compile``, autograd).
"""
from __future__ import annotations

import importlib.util

import torch  # must be imported before the compiled library is loaded

__version__ = "0.1.0"

_INSTALL_HINT = (
    "Reinstall against the torch you run: `pip install torch` first, then "
    "`pip install --no-build-isolation .` from the lowrank_ops checkout."
)


def _load_library() -> str:
    spec = importlib.util.find_spec("lowrank_ops._C")
    if spec is None or spec.origin is None:
        raise ImportError(
            "lowrank_ops: the compiled library lowrank_ops/_C.so is missing (the package was "
            "not built, or is imported from a source tree without a build). " + _INSTALL_HINT
        )
    try:
        torch.ops.load_library(spec.origin)
    except OSError as e:  # undefined symbols: built against another torch
        raise ImportError(
            f"lowrank_ops: cannot load {spec.origin} into torch {torch.__version__}: {e}. "
            "It was most likely built against a different torch. " + _INSTALL_HINT
        ) from e
    return torch.ops.lowrank_ops.build_info()


BUILD_INFO = _load_library()

from . import ops  # noqa: E402  (registers fakes + autograd)
from . import reference  # noqa: E402
from . import linalg  # noqa: E402
from . import nn  # noqa: E402
from . import adapters  # noqa: E402
from . import merge  # noqa: E402

__all__ = ["ops", "reference", "linalg", "nn", "adapters", "merge", "BUILD_INFO", "__version__"]
