"""Sparsification primitives shared by the merge methods (mergekit's ``sparsify`` role).

All numerics go through :mod:`lowrank_ops.ops.merge`; these helpers only
reshape and combine.  Conventions (top-k count, ties, NaN) are the ops'.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..ops import merge as ops


def work_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype of the merge methods: fp64 stays fp64, everything else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def flat_deltas(base: Optional[Tensor], tensors: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(N, P)`` task vectors ``tensors[i] - base`` (flattened; the tensors themselves without a base) in
    ``dtype`` (default: the work dtype of ``tensors[0]``).  One ``(N, P)`` buffer, the base subtracted in place."""
    dt = work_dtype(tensors[0]) if dtype is None else dtype
    d = torch.stack([t.reshape(-1).to(dt) for t in tensors])
    return d if base is None else d.sub_(base.reshape(-1).to(dt))


def weights_tensor(weights: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor([float(w) for w in weights], dtype=like.dtype, device=like.device)


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor DARE seed: ``seed`` mixed with the tensor's name, so equal-shaped tensors get different masks."""
    return (int(seed) * 0x100000001B3 + zlib.crc32(name.encode())) & ((1 << 63) - 1)


def magnitude(x: Tensor, density: float) -> Tensor:
    """Keep the top-``density`` fraction of ``x`` by magnitude (``|x| >= magnitude_threshold``), zero the rest."""
    if density >= 1:
        return x
    thr = ops.magnitude_threshold(x, density)
    keep = (x.abs() >= thr) | torch.isnan(x)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def magnitude_rows_(deltas: Tensor, density: float) -> Tensor:
    """:func:`magnitude` on each row of ``(N, P)`` ``deltas``, in place (no second ``(N, P)`` buffer)."""
    if density >= 1:
        return deltas
    for r in deltas:
        thr = ops.magnitude_threshold(r, density)
        for c in r.split(1 << 20):  # chunks: the comparison temporaries stay small
            c.masked_fill_(((c.abs() >= thr) | torch.isnan(c)).logical_not_(), 0)
    return deltas


def random_drop(x: Tensor, density: float, seed: int) -> Tensor:
    """DARE's drop-and-rescale of one tensor (``x·mask/density``), with the ops' counter hash (model index 0)."""
    flat = x.reshape(1, -1)
    w = torch.ones(1, dtype=flat.dtype, device=flat.device)
    return ops.dare_merge(flat, w, density, seed, "none").reshape(x.shape)


def nm_groups(x: Tensor, m: int) -> Optional[Tensor]:
    """View ``x`` so its last dim is a multiple of ``m`` (its own last dim, else flattened); None if impossible."""
    if x.dim() >= 1 and x.shape[-1] % m == 0:
        return x
    if x.numel() % m == 0:
        return x.reshape(-1)
    return None


def disjoint_masks(deltas: Tensor, *, density: float = 0.25, n: Optional[int] = None, m: Optional[int] = None,
                   order: Optional[Sequence[int]] = None, shape: Optional[Sequence[int]] = None) -> Tensor:
    """CABS's conflict-aware masks (Yang et al. 2025): ``M_t = NM(|τ_t| ⊙ R_t)``, ``R_t = ¬∨_{s<t} M_s``.

    Models are visited in ``order`` (default 0..N-1); each keeps its largest
    entries among positions no earlier model kept, so the masks are pairwise
    disjoint.  With ``n`` and ``m`` the selection is ``n:m`` along the last dim
    of ``shape`` (balanced sparsification; flattened if that dim is not a
    multiple of ``m``; density-based if neither is); otherwise each model
    keeps the top-``density`` fraction of the whole tensor among the allowed
    positions (never a zero entry).

    Returns a bool ``(N, P)`` mask for ``(N, P)`` ``deltas``.
    """
    masks = torch.zeros_like(deltas, dtype=torch.bool)
    for t, mk in _disjoint_masks(deltas, density, n, m, *_disjoint_args(deltas, n, m, order, shape)):
        masks[t] = mk
    return masks


def apply_disjoint_masks_(deltas: Tensor, *, density: float = 0.25, n: Optional[int] = None,
                          m: Optional[int] = None, order: Optional[Sequence[int]] = None,
                          shape: Optional[Sequence[int]] = None, chunk: int = 1 << 20) -> Tensor:
    """``deltas ⊙ disjoint_masks(deltas, ...)`` in place, never holding the ``(N, P)`` masks.

    ``n:m`` masks: every group of ``m`` consecutive entries is decided on its own (a group never crosses the
    last dim, which is a multiple of ``m``), so the work goes chunk by chunk of about ``chunk`` entries and
    within a chunk model by model in pruning order: the taken positions, the mask and its float copy are
    chunk-sized, never ``P``-sized.  Density masks need each model's whole row for its threshold: model by
    model, with a ``P``-sized taken mask."""
    order, shape, use_nm = _disjoint_args(deltas, n, m, order, shape)
    if deltas.numel() == 0:
        return deltas
    if not use_nm:
        for t, mk in _disjoint_masks(deltas, density, n, m, order, shape, use_nm):
            for xc, mc in zip(deltas[t].split(chunk), mk.split(chunk)):  # chunks: mul_ by a bool mask
                xc.mul_(mc)  # materialises it in the float dtype
        return deltas
    groups = deltas.view(deltas.shape[0], -1, m)  # (N, P/m, m): the n:m groups, in order
    for g0 in range(0, groups.shape[1], max(1, chunk // m)):
        g = groups[:, g0:g0 + max(1, chunk // m)]
        taken = torch.zeros(g.shape[1:], dtype=torch.bool, device=deltas.device)
        for t in order:
            x = g[t]
            mk = ops.nm_mask(x, n, m, taken)
            mk &= x != 0
            taken |= mk
            x.mul_(mk)
    return deltas


def _disjoint_args(deltas: Tensor, n, m, order, shape):
    """``(order, shape, use_nm)``: the pruning order checked, the tensor's shape, and whether n:m applies."""
    N, P = deltas.shape
    order = list(range(N)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(N)):
        raise ValueError(f"cabs: `order` must be a permutation of 0..{N - 1}, got {order}")
    shape = (P,) if shape is None else tuple(shape)
    use_nm = n is not None and m is not None and nm_groups(torch.empty(shape, device="meta"), m) is not None
    return order, shape, use_nm


def _disjoint_masks(deltas: Tensor, density, n, m, order, shape, use_nm):
    """Yields ``(t, M_t)`` in pruning order (see :func:`disjoint_masks`; the last three from :func:`_disjoint_args`)."""
    P = deltas.shape[1]
    taken = torch.zeros(P, dtype=torch.bool, device=deltas.device)
    for t in order:
        x = deltas[t]
        if use_nm:
            xs = nm_groups(x.reshape(shape), m)
            mk = ops.nm_mask(xs, n, m, taken.reshape(xs.shape)).reshape(P)
            for mc, xc in zip(mk.split(1 << 20), x.split(1 << 20)):
                mc &= xc != 0
        else:
            allowed = torch.where(taken, torch.zeros((), dtype=x.dtype, device=x.device), x)
            mk = magnitude(allowed, density) != 0
            del allowed
            mk &= ~taken
        taken |= mk
        yield t, mk


def apply_delta(base: Optional[Tensor], merged: Tensor, like: Tensor, lam: float) -> Tensor:
    """``base + lam·merged`` (or ``lam·merged`` without a base), shaped and typed like ``like``."""
    out = merged.reshape(like.shape) * lam if lam != 1 else merged.reshape(like.shape)
    if base is not None:
        out = base.to(out.dtype) + out
    return out.to(like.dtype)
