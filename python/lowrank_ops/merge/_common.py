"""Small helpers shared by the merge methods of this package."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_INPUTS_OWNED: ContextVar[bool] = ContextVar("lowrank_ops_merge_inputs_owned", default=False)


@contextmanager
def owned_inputs():
    """Within this block the caller owns the tensors it passes to merge methods and will not read them again,
    so a method may write its result into ``base``'s storage.  The streaming engine uses it (its inputs are
    freshly read from disk); the state-dict API never does, so user tensors are never modified."""
    token = _INPUTS_OWNED.set(True)
    try:
        yield
    finally:
        _INPUTS_OWNED.reset(token)


def scratch_base(base: Tensor, dtype: torch.dtype) -> Tensor:
    """``base`` in ``dtype`` as a tensor the method may overwrite: ``base`` itself inside :func:`owned_inputs`
    when no conversion is needed, else a copy."""
    if _INPUTS_OWNED.get() and base.dtype == dtype and base.is_contiguous():
        return base
    return base.to(dtype=dtype, copy=True)


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
