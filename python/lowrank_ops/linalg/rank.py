"""Rank selection from singular-value spectra: one layer (``select_rank``) or a global budget (``allocate_ranks``).

Plain Python on small tensors (spectra have at most a few thousand entries);
no compiled op is needed.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor


def _spectrum(S: Tensor, name: str = "S") -> Tensor:
    if not isinstance(S, Tensor) or S.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of singular values, got "
                         f"{tuple(S.shape) if isinstance(S, Tensor) else type(S).__name__}")
    if not (S.is_floating_point() and bool(torch.isfinite(S).all())) or bool((S < 0).any()):
        raise ValueError(f"{name} must hold finite, non-negative floating singular values")
    # Non-increasing order whatever the caller passed (an SVD already gives it).
    return S.detach().to(torch.float64).cpu().sort(descending=True).values


def select_rank(S: Tensor, energy: Optional[float] = None, elbow: bool = False) -> int:
    """Number of singular values to keep, by exactly one criterion.

    * ``energy=e`` (``0 < e <= 1``): the smallest ``k`` with
      ``Σ_{i<k} S_i² >= e · Σ_i S_i²`` — the explained-energy (cumulative
      explained variance) rule used by PiSSA/EVA-style initialisations.
    * ``elbow=True``: the elbow of the log spectrum.  With ``y_i = log S_i``
      (``S_i`` floored at ``S_0 · eps`` of ``S``'s dtype so exact zeros count as a
      drop, not ``-inf``) and the chord from ``(0, y_0)`` to ``(n-1, y_{n-1})``,
      ``k`` is the index of the point furthest *below* the chord (the start of
      the flat tail; ties: the first), i.e. the number of values before the
      elbow.  If no point lies below the chord (a concave log spectrum, e.g. a
      cliff at the end), ``k`` is one plus the index of the point furthest
      *above* it (the last value before the fall); if the log spectrum is a
      straight line (flat, or exactly geometric) there is no elbow and ``k = 1``.
      For a rank-``r`` signal plus a flat noise floor both rules give ``r``.

    Args:
        S: ``(n,)`` singular values (any order; sorted non-increasing here).
        energy: fraction of ``Σ S²`` to keep, in ``(0, 1]``.
        elbow: use the elbow rule instead.

    Returns:
        ``k`` with ``1 <= k <= n`` (``n >= 1``).
    """
    if (energy is None) == (not elbow):
        raise ValueError("select_rank: give exactly one criterion, energy=<fraction in (0, 1]> or elbow=True "
                         f"(got energy={energy!r}, elbow={elbow!r})")
    s = _spectrum(S)
    n = s.numel()
    if n == 0:
        raise ValueError("select_rank: S must hold at least one singular value, got shape (0,)")
    if energy is not None:
        energy = float(energy)
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"select_rank: energy must be in (0, 1], got {energy}")
        cum = torch.cumsum(s * s, 0)
        total = cum[-1]
        if total == 0:
            return 1
        # cum[-1] is the total itself, so energy = 1 always finds an index (no rounding gap).
        k = int(torch.searchsorted(cum, energy * total, side="left")) + 1
        return min(max(k, 1), n)
    if n <= 2 or s[0] == 0:
        return 1
    floor = s[0] * torch.finfo(S.dtype).eps
    y = torch.log(torch.clamp(s, min=floor))
    i = torch.arange(n, dtype=torch.float64)
    chord = y[0] + (y[-1] - y[0]) * i / (n - 1)
    below = chord - y
    # A straight log line must not find an elbow in its rounding errors: S_i rounded in
    # S's dtype moves log S_i by up to eps/2, so deviations within a few eps are noise.
    tol = max(1e-12 * max(float((y[0] - y[-1]).abs()), 1.0), 4.0 * torch.finfo(S.dtype).eps)
    k = int(torch.argmax(below))
    if below[k] > tol:
        return max(k, 1)
    k = int(torch.argmax(-below))
    return k + 1 if -below[k] > tol else 1


def allocate_ranks(spectra: Mapping[str, Tensor], budget: int, min_rank: int = 1,
                   max_rank: Optional[int] = None, total: Optional[Mapping[str, float]] = None) -> dict[str, int]:
    """Share a total rank ``budget`` across layers by explained variance (EVA's redistribution).

    EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning
    via Explained Variance Adaptation", its rank redistribution step): every layer ``l`` with spectrum
    ``S^l`` offers components with normalised explained variance
    ``ρ^l_i = (S^l_i)² / Σ_j (S^l_j)²``; the globally largest ``ρ`` are taken
    until ``budget`` components are chosen.  Here every layer first gets
    ``min(min_rank, len(S^l))`` (counted against the budget), no layer gets more
    than ``min(max_rank, len(S^l))``, and ties are broken by the order of
    ``spectra`` then by index, so the result is deterministic.  Since each
    layer's ``ρ`` are non-increasing, the chosen components of a layer are its
    leading ones and the allocation is just a rank per layer.  If the caps
    leave the budget partly unspent, every layer gets its cap.

    Args:
        spectra: layer name → ``(n_l,)`` singular values (e.g. of the layer's
            activations or weight).
        budget: total rank over all layers, ``>= Σ min(min_rank, n_l)``.
        min_rank: guaranteed rank per layer (``>= 0``).
        max_rank: optional cap per layer (``>= min_rank``).
        total: optional layer name → total energy ``Σ_j (S^l_j)²`` of the full
            spectrum, for spectra that are truncated (EVA keeps only the leading
            components of each layer's activation SVD but scores them against
            ``‖X‖_F²``); default: the energy of the given spectrum.

    Returns:
        ``{name: rank}`` in the order of ``spectra``.
    """
    if min_rank < 0:
        raise ValueError(f"allocate_ranks: min_rank must be >= 0, got {min_rank}")
    if max_rank is not None and max_rank < min_rank:
        raise ValueError(f"allocate_ranks: max_rank ({max_rank}) must be >= min_rank ({min_rank})")
    specs = {name: _spectrum(S, f"allocate_ranks: spectra[{name!r}]") for name, S in spectra.items()}
    ranks = {name: min(min_rank, s.numel()) for name, s in specs.items()}
    floor = sum(ranks.values())
    if budget < floor:
        raise ValueError(f"allocate_ranks: budget {budget} is below the {floor} that min_rank={min_rank} "
                         f"guarantees to {len(specs)} layers")
    remaining = budget - floor
    candidates = []  # (−ρ, layer order, index) for a stable, deterministic order
    for order, (name, s) in enumerate(specs.items()):
        cap = s.numel() if max_rank is None else min(max_rank, s.numel())
        energy = float(total[name]) if total is not None else float((s * s).sum())
        for i in range(ranks[name], cap):
            rho = float(s[i] * s[i]) / energy if energy > 0 else 0.0
            candidates.append((-rho, order, i, name))
    candidates.sort()
    for _, _, _, name in candidates[:remaining]:
        ranks[name] += 1
    return ranks


__all__ = ["select_rank", "allocate_ranks"]
