"""Benchmarks of the merge family: fused ``ties_merge`` / ``dare_merge`` vs the stack-and-sort way.

Shapes: ``N = 4`` task vectors of ``P = 64M`` fp32 parameters each (a 64M
slice of a 7B model's merge; 1 GiB of deltas), ``--quick``: ``P = 4M`` for
``ties`` and ``dare_ties`` (the references' sorts and Bernoulli draws dominate
the quick run's time, so ``dare_linear`` is left to the full run).

* ``ties_P*``: ``ops.ties_merge`` (density 0.2, sign sum, normalize) vs
  ``reference.ties_merge_ref`` (per-model ``torch.sort`` of all magnitudes for
  the top-k threshold -- mergekit sorts with ``argsort`` -- then masks and sums
  over the stacked ``(N, P)`` tensor, as ``mergekit``'s
  ``GeneralizedTaskArithmeticMerge`` does).
* ``dare_ties_P*`` / ``dare_linear_P*``: ``ops.dare_merge`` (density 0.5) vs the
  mergekit way (``torch.bernoulli`` mask, ``/density`` rescale, stacked
  weighted sum, ``get_mask``-style sign election).  The two draw different
  masks by design, so the ✓ column compares ours with
  ``reference.dare_merge_ref`` (the same counter hash, exact) while the timed
  ``ref`` row is the mergekit way.
* ``floor``: ``torch.sum(deltas, 0)`` -- streams exactly the bytes a merge
  must move (read ``N·P``, write ``P``) with trivial compute: the measured
  memory bandwidth of this machine for this traffic, in the same run.  ``vs
  floor`` is (our time) / (floor time), so ``1 / vs floor`` is the fraction of
  measured bandwidth we reach.

GB/s counts ``(N + 1)·P·4`` bytes (deltas read once + output written).
"""
from __future__ import annotations

import functools

import torch

from ... import ops, reference
from .. import Config, Impl, describe_roles, measure, register

SUITE = "merge"
N = 4
P_FULL = 64 * 2**20
P_QUICK = 4 * 2**20
DENSITY_TIES = 0.2
DENSITY_DARE = 0.5


def _inputs(cfg: Config, P: int):
    g = torch.Generator().manual_seed(0)
    d = (torch.randn(N, P, generator=g) * 1e-3).to(device=cfg.device, dtype=cfg.dtype)
    w = torch.tensor([1.0, 0.8, 1.2, 0.5], device=cfg.device)
    return d, w


def _mergekit_dare(d, w, density, consensus):
    """mergekit's dare_*: Bernoulli mask per model, rescale, stack, weight, (sign election), sum."""
    acc = torch.float64 if d.dtype == torch.float64 else torch.float32
    x = d.to(acc)
    mask = torch.bernoulli(torch.full_like(x, density))
    x = x * mask / density * w.to(acc)[:, None]
    if consensus == "none":
        return x.sum(0).to(d.dtype)
    elected = torch.where(x.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(x) == elected
    num = (x * agree).sum(0)
    return num.to(d.dtype)


def _case(cfg: Config, name: str, kind: str, P: int):
    d, w = _inputs(cfg, P)
    nbytes = (N + 1) * P * d.element_size()
    flops = 3.0 * N * P  # nominal: compare, multiply, add per element
    nog = torch.no_grad
    if kind == "ties":
        ours = Impl("ours", "ours", lambda: ops.ties_merge(d, w, DENSITY_TIES), flops, nbytes)
        ref = Impl("ref_sort", "ref", lambda: reference.ties_merge_ref(d, w, DENSITY_TIES), flops, nbytes)
    else:
        cons = "ties" if kind == "dare_ties" else "none"
        ours = Impl("ours", "ours", lambda: ops.dare_merge(d, w, DENSITY_DARE, 0, cons), flops, nbytes)
        ref = Impl("ref_mergekit", "ref", lambda: _mergekit_dare(d, w, DENSITY_DARE, cons), flops, nbytes,
                   outputs=lambda: [reference.dare_merge_ref(d, w, DENSITY_DARE, 0, cons)])
    floor = Impl("floor_stream", "floor", lambda: torch.sum(d, 0), float(N * P), nbytes)
    with nog():
        return measure(cfg, name, [ours, ref, floor], shape={"N": N, "P": P})


def _register_all() -> None:
    for kind in ("ties", "dare_ties", "dare_linear"):
        for P, quick in ((P_QUICK, kind != "dare_linear"), (P_FULL, False)):
            name = f"{kind}_P{P // 2**20}M"
            register(SUITE, name, functools.partial(_case, name=name, kind=kind, P=P), quick=quick,
                     shape={"N": N, "P": P})


_register_all()


describe_roles(SUITE, "ref: the sort-based reference or mergekit's algorithm; floor: one streaming read of the N task "
                      "vectors (torch.sum over models); check: ours vs ref")
