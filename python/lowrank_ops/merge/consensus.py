"""Consensus primitives shared by the merge methods (TIES sign election, agreement, support)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..ops import merge as ops


def elect_sign(deltas: Tensor, weights: Optional[Tensor] = None, sign_method: str = "sum") -> Tensor:
    """TIES-elected sign per coordinate (±1; +1 where the vote is 0), Yadav et al. 2023, Alg. 1 step 2."""
    return ops.sign_consensus(deltas, weights, 0.0, sign_method)[0]


#: Columns per chunk where a method runs the consensus op over column slices of the (N, P) deltas to keep
#: its (P,) temporaries small (the streaming engine's memory bound).
COLUMN_CHUNK = 1 << 18


def unanimous(deltas: Tensor) -> Tensor:
    """Bool ``(P,)``: every model's delta is nonzero and all share one sign (NegMerge's mask)."""
    _, support, _ = ops.sign_consensus(deltas)
    return support == deltas.shape[0]


def support_count(deltas: Tensor, eps: float = 0.0) -> Tensor:
    """Int32 ``(P,)``: how many models have ``|δ| > eps`` (RAM's contributor count)."""
    return ops.sign_consensus(deltas, None, eps)[2]
