"""PCB-Merging: Parameter Competition Balancing (Du et al., NeurIPS 2024).

"Parameter Competition Balancing for Model Merging", §3 and Alg. 1, as in the
authors' release (``PCB_merge``), applied per tensor.  With ``τᵢ`` the task
vectors (rows of ``T``, ``N`` of them):

1. outlier clamp: ``|τᵢ|`` clipped to its ``[clamp_ratio, 1 − clamp_ratio]`` quantiles;
2. intra-balancing: ``β_intra,i = exp(N · norm(|τᵢ|)²)`` (``norm`` = min–max over the row);
3. inter-balancing: ``β_inter,i = tanh(τᵢ ⊙ Σⱼ τⱼ)``;
4. ``βᵢ = β_intra,i ⊙ β_inter,i``; drop all but the top ``density`` fraction of each row
   (entries at or below the row's ``(1 − density)`` quantile), min–max normalise to ``β̂ᵢ``;
5. ``τ_m = Σᵢ β̂ᵢ ⊙ τᵢ / Σᵢ β̂ᵢ`` and ``θ = θ₀ + scaling · τ_m``.

The paper flattens the whole model into one row per task; here each tensor is
its own row (streamable; quantiles and min–max are then per tensor).
``weights`` multiply the task vectors before step 1 (1 by default).

Memory: the method works in the ``(N, P)`` task vectors it is given plus one
``P``-sized row (N + 1 tensors, as the streaming engine promises), in two
passes over column chunks.  Pass 1, row by row: the two clamp quantiles and the
score threshold are order statistics, selected in place in that one scratch row
(no sort, no ``(N, P)`` temporary); the min–max ranges follow from them
(``min`` of a row clipped to ``[lo, hi]`` is ``lo``, its ``max`` is
``max(hi, lo)``; the min of ``max(score, thr)`` is ``thr``).  Pass 2, chunk by
chunk: scores, ``β̂`` and the weighted mean of the chunk, written over the
first task vector's chunk (no later chunk reads it).  Both passes compute a
row's scores with the same code on the same chunks, so the threshold
comparison sees identical values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_delta

_EPS = 1e-12  # floor of a min–max range and of Σ β̂
_CHUNK = 1 << 18  # columns per chunk: the chunk temporaries are N × _CHUNK


def _order_stats_(x: Tensor, idx: list[int]) -> list[float]:
    """The values at 0-based ascending positions ``idx`` of ``x`` (1-D), selected in place (``x`` is scrambled)."""
    if x.device.type == "cpu":
        a = x.numpy()
        a.partition(sorted(set(idx)))  # introselect in place: no copy, no sort
        return [float(a[i]) for i in idx]
    return [float(torch.kthvalue(x, i + 1).values) for i in idx]


def _chunks(p: int):
    return [(c, min(c + _CHUNK, p)) for c in range(0, p, _CHUNK)]


def _mag(x: Tensor, st: Tensor, clamp: bool) -> Tensor:
    """``|x|`` clipped to ``[lo, hi]`` (``st`` columns 0, 1: lo, hi)."""
    a = x.abs()
    return torch.maximum(torch.minimum(a, st[..., 1:2]), st[..., 0:1]) if clamp else a


def _score(x: Tensor, s: Tensor, st: Tensor, n: int, clamp: bool) -> tuple[Tensor, Tensor]:
    """``(|x| clipped, β_intra ⊙ β_inter)`` of one row chunk ``x`` with ``s`` = the chunk's Σⱼτⱼ (``st``: lo,
    hi, magnitude min, magnitude range)."""
    mag = _mag(x, st, clamp)
    score = ((mag - st[..., 2:3]) / st[..., 3:4]).square_().mul_(n).exp_()
    return mag, score.mul_(torch.tanh(x * s))


def pcb_scores(deltas: Tensor, density: float = 0.1, clamp_ratio: float = 1e-4) -> Tensor:
    """Per-row statistics of ``deltas (N, P)`` (steps 1–4 above): an ``(N, 6)`` tensor of the clamp bounds
    ``lo, hi``, the clipped magnitudes' min and range, the score threshold ``thr`` and the range of
    ``max(score, thr)``.  One ``P``-sized scratch row."""
    n, p = deltas.shape
    clamp = clamp_ratio > 0
    st = torch.zeros(n, 6, dtype=deltas.dtype, device=deltas.device)
    st[:, 3] = 1
    row = torch.empty(p, dtype=deltas.dtype, device=deltas.device)
    i_lo, i_hi = min(int(p * clamp_ratio), p - 1), max(int(p * (1 - clamp_ratio)) - 1, 0)
    i_thr = min(int(p * (1 - density)), p - 1)
    chunks = _chunks(p)
    for i in range(n):
        x = deltas[i]
        if clamp:
            lo, hi = _order_stats_(torch.abs(x, out=row), [i_lo, i_hi])
            mlo, mhi = lo, max(hi, lo)
        else:
            mlo, mhi = (float(v) for v in torch.aminmax(torch.abs(x, out=row)))
        st[i, :4] = torch.tensor([lo if clamp else 0.0, hi if clamp else 0.0, mlo, mhi], dtype=st.dtype)
        st[i, 3] = (st[i, 3] - st[i, 2]).clamp_min(_EPS)
        for c0, c1 in chunks:  # Σⱼτⱼ of the chunk recomputed per row: N adds instead of a P-sized buffer
            row[c0:c1] = _score(x[c0:c1], deltas[:, c0:c1].sum(0), st[i], n, clamp)[1]
        smax = row.max()
        st[i, 4] = _order_stats_(row, [i_thr])[0]
        st[i, 5] = smax - st[i, 4]  # max of max(score, thr) minus its min, in the work dtype
    st[:, 5].clamp_(min=_EPS)
    return st


@register_delta("pcb", paper="Parameter Competition Balancing for Model Merging (PCB-Merging)",
                url="https://arxiv.org/abs/2410.02396", params={"density": 0.1, "clamp_ratio": 1e-4, "scaling": 1.0},
                scale="scaling")
def pcb_delta(d, w, *, name, shape, density=0.1, clamp_ratio=1e-4):
    """PCB's ``Σ β̂ᵢτᵢ / Σ β̂ᵢ`` of the ``(N, P)`` task vectors ``d`` (overwritten; the result is ``d[0]``)."""
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"pcb: density must lie in (0, 1], got {density!r} (tensor {name!r})")
    n, p = d.shape
    if p == 0:
        return d[0] if n else d.new_zeros(0)
    d.mul_(w.unsqueeze(1))
    clamp = float(clamp_ratio) > 0
    st = pcb_scores(d, float(density), float(clamp_ratio))
    for c0, c1 in _chunks(p):
        x = d[:, c0:c1]
        s = x.sum(0)
        num = torch.zeros_like(s)
        den = torch.zeros_like(s)
        for i in range(n):
            mag, score = _score(x[i], s, st[i], n, clamp)
            beta = torch.maximum(score, st[i, 4:5]).sub_(st[i, 4:5]).div_(st[i, 5:6])
            num.add_(torch.sign(x[i]).mul_(mag).mul_(beta))
            den.add_(beta)
        d[0, c0:c1] = num.div_(den.clamp_min_(_EPS))
    return d[0]
