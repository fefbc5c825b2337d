"""Plain-PyTorch references of the merge family (tests and benchmarks only).

Written the way mergekit computes these methods: stack the task vectors, sort
(``torch.sort`` of all magnitudes) for the top-k threshold, then elementwise
masks and sums over the stacked ``(N, P)`` tensor.  The conventions (top-k
count, keep ``|x| >= threshold``, NaN ranking, DARE's hash) are the kernels';
see ``lowrank_ops.ops.merge`` for them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_M64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_count(density: float, n: int) -> int:
    """mergekit's ``sparsify.magnitude`` count: 0, all, or ``max(1, floor(density·n))``."""
    if n <= 0 or density <= 0:
        return 0
    if density >= 1:
        return n
    return max(1, int(density * n))


def magnitude_keys(x: Tensor) -> Tensor:
    """``|x|`` as integer bit patterns (int32 for ≤32-bit floats, int64 for fp64); NaN → one key above +inf."""
    a = x.to(_acc(x.dtype)).abs()
    if a.dtype == torch.float64:
        k = a.view(torch.int64)
        return torch.where(torch.isnan(a), torch.tensor(0x7FF8000000000000, dtype=torch.int64, device=a.device), k)
    k = a.view(torch.int32)
    return torch.where(torch.isnan(a), torch.tensor(0x7FC00000, dtype=torch.int32, device=a.device), k)


def _key_to_value(key: Tensor) -> Tensor:
    return key.view(torch.float64) if key.dtype == torch.int64 else key.view(torch.float32)


def magnitude_threshold_ref(x: Tensor, density: float) -> Tensor:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"magnitude_threshold: `density` must be in [0, 1], got {density}")
    k = topk_count(density, x.numel())
    if k == 0:
        return torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    keys = torch.sort(magnitude_keys(x).reshape(-1), descending=True).values
    return _key_to_value(keys[k - 1 : k].clone()).reshape(()).to(x.dtype)


def trim_mask_ref(x: Tensor, density: float) -> Tensor:
    """Bool mask of the kept entries of ``x`` (``|x| >= threshold``, NaN kept; nothing at k = 0)."""
    k = topk_count(density, x.numel())
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    keys = magnitude_keys(x)
    thr = torch.sort(keys.reshape(-1), descending=True).values[k - 1]
    return keys >= thr


def _consensus(s: Tensor, w: Tensor, sign_method: str, normalize: bool) -> Tensor:
    """mergekit's ``get_mask`` + disjoint merge on weighted deltas ``s`` (N, P); NaN where Σ s is NaN."""
    S = s.sum(0)
    E = S if sign_method == "sum" else torch.sign(s).sum(0)
    elected = torch.where(E >= 0, 1.0, -1.0).to(s.dtype)
    agree = torch.sign(s) == elected
    num = (s * agree).sum(0)
    den = (w[:, None] * agree).sum(0)
    out = torch.where(den != 0, num / torch.where(den != 0, den, 1), num) if normalize else num
    return torch.where(torch.isnan(S), torch.full_like(out, float("nan")), out)


def _check(deltas, weights, density, sign_method):
    if deltas.dim() != 2 or weights.shape != (deltas.shape[0],):
        raise ValueError(f"deltas must be (N, P) and weights (N,), got {tuple(deltas.shape)}, {tuple(weights.shape)}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"`density` must be in [0, 1], got {density}")
    if sign_method not in ("sum", "count"):
        raise ValueError(f"unknown `sign_method` {sign_method!r}")


def ties_merge_ref(deltas: Tensor, weights: Tensor, density: float, sign_method: str = "sum",
                   normalize: bool = True) -> Tensor:
    _check(deltas, weights, density, sign_method)
    acc = _acc(deltas.dtype)
    d = deltas.to(acc)
    trimmed = torch.where(torch.stack([trim_mask_ref(row, density) for row in deltas]), d, 0) \
        if deltas.shape[0] else d
    w = weights.to(acc)
    return _consensus(w[:, None] * trimmed, w, sign_method, normalize).to(deltas.dtype)


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def dare_block_key(seed: int, model: int, block: int) -> int:
    """32-bit key of (seed, model, block of 2³² elements); ``merge_math.h::dare_block_key``."""
    return _mix64((_mix64((seed + 0x9E3779B97F4A7C15 * (model + 1)) & _M64) + block) & _M64) & _M32


def dare_keep_mask_ref(shape_np: tuple, seed: int, density: float, device=None) -> Tensor:
    """``(N, P)`` keep mask of DARE's counter hash, in int64 torch ops (``merge_math.h::dare_hash``)."""
    N, P = shape_np
    if density <= 0:
        return torch.zeros(N, P, dtype=torch.bool, device=device)
    T = 1 << 24 if density >= 1 else int(density * 16777216.0)
    p = torch.arange(P, dtype=torch.int64, device=device)
    lo, blk = p & _M32, p >> 32
    rows = []
    for i in range(N):
        bk = torch.zeros(P, dtype=torch.int64, device=device)
        for b in torch.unique(blk).tolist():
            bk = torch.where(blk == b, dare_block_key(seed, i, b), bk)
        x = lo ^ bk
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & _M32
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & _M32  # int64 product wraps mod 2^64; the low 32 bits are exact
        x = x ^ (x >> 16)
        rows.append((x >> 8) < T)
    return torch.stack(rows) if rows else torch.zeros(0, P, dtype=torch.bool, device=device)


def dare_merge_ref(deltas: Tensor, weights: Tensor, density: float, seed: int, consensus: str = "none",
                   sign_method: str = "sum", normalize: bool = False) -> Tensor:
    _check(deltas, weights, density, sign_method)
    if consensus not in ("none", "ties"):
        raise ValueError(f"unknown `consensus` {consensus!r}")
    acc = _acc(deltas.dtype)
    d = deltas.to(acc)
    keep = dare_keep_mask_ref(tuple(deltas.shape), seed, density, deltas.device)
    dens = torch.tensor(density, dtype=acc)
    dropped = torch.where(keep, d / dens, 0) if density > 0 else torch.zeros_like(d)
    w = weights.to(acc)
    s = w[:, None] * dropped
    if consensus == "ties":
        return _consensus(s, w, sign_method, normalize).to(deltas.dtype)
    out = s.sum(0)
    ws = float(w.sum())
    if normalize and abs(ws) >= 1e-8:
        out = out / w.sum()
    return out.to(deltas.dtype)


def nm_mask_ref(x: Tensor, n: int, m: int, forbidden: Optional[Tensor] = None) -> Tensor:
    if x.shape[-1] % m:
        raise ValueError(f"nm_mask: last dim {x.shape[-1]} is not a multiple of m={m}")
    score = x.to(torch.float64).abs()
    score = torch.where(torch.isnan(score), float("inf"), score)
    if forbidden is not None:
        score = torch.where(forbidden, -1.0, score)
    g = score.reshape(-1, m)
    order = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(1, order, True)
    mask &= g >= 0
    return mask.reshape(x.shape)


def sign_consensus_ref(deltas: Tensor, weights: Optional[Tensor] = None, eps: float = 0.0,
                       sign_method: str = "sum") -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc(deltas.dtype)
    d = deltas.to(acc)
    w = torch.ones(d.shape[0], dtype=acc, device=d.device) if weights is None else weights.to(acc)
    on = d.abs() > eps
    s = w[:, None] * d
    E = torch.where(on, s if sign_method == "sum" else torch.sign(s), 0).sum(0)
    pos = E >= 0
    agree = on & torch.where(pos, s > 0, s < 0)
    sign = torch.where(pos, 1.0, -1.0).to(deltas.dtype)
    return sign, agree.sum(0).to(torch.int32), on.sum(0).to(torch.int32)
