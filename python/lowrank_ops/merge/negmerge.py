"""NegMerge (Kim, Han, Choe, ICML 2025, "NegMerge: Sign-Consensual Weight Merging for Machine Unlearning").

Inputs are several models fine-tuned on the *forget* set (different
hyperparameters).  Keep only the coordinates where every task vector is
nonzero and all share one sign, ``m[p] = 1 iff sign(τ_1[p]) = … = sign(τ_K[p]) ≠ 0``;
average there, ``τ = m ⊙ Σ_k w_k τ_k / Σ_k w_k``; negate:
``θ = θ_base − λ·τ``.
"""
from __future__ import annotations

import torch

from .consensus import COLUMN_CHUNK, unanimous
from .registry import register_delta


@register_delta("negmerge", paper="NegMerge: Sign-Consensual Weight Merging for Machine Unlearning (Kim et al., ICML 2025)",
                url="https://arxiv.org/abs/2410.05583", params={"lambda": 1.0}, sign=-1.0)
def negmerge_delta(d, w, *, name, shape):
    ws = float(w.sum())
    out = torch.empty(d.shape[1], dtype=d.dtype, device=d.device)
    for a in range(0, d.shape[1], COLUMN_CHUNK):  # column chunks: the consensus op's outputs stay small
        dc = d[:, a:a + COLUMN_CHUNK]
        torch.mv(dc.t(), w, out=out[a:a + COLUMN_CHUNK])
        out[a:a + COLUMN_CHUNK].div_(ws if ws != 0 else 1.0).masked_fill_(unanimous(dc).logical_not_(), 0)
    return out
