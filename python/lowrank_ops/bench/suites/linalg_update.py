"""Benchmarks of the factored/updating SVDs: ``factored_svd``, ``svd_update``, ``svd_append``.

Shapes: one Llama-3-8B 4096×4096 projection (``--quick``: 256×256, k = 16, c = 4).

* ``factored_svd_*`` — SVD of a rank-``R`` product ``B·A`` (a sum of LoRAs with
  total rank 64): ours (two thin QRs + R×R SVD) vs the dense path peft's
  ``add_weighted_adapter(combination_type="svd")`` takes (form ``B·A``, then
  ``torch.linalg.svd``), vs the floor of forming ``B·A`` alone.
* ``svd_update_*`` — rank-64 SVD of ``U·S·Vh + P·Qᵀ`` with a rank-16 update: ours
  vs recomputing it from the dense updated matrix with ``lowrank_ops.linalg.rsvd``
  (block Krylov, oversample 8, n_iter 2: three blocks of 64 columns at rank 64; ref)
  and ``torch.svd_lowrank`` with q = 72 and niter = 2 (``lowrank``).  The dense matrix is given to the
  recomputations for free (not timed).
* ``svd_append_*`` — 16 new columns appended, rank 64 kept; ``_sparse`` with a
  1%-dense ``C`` (torch sparse COO) on our sparse path; same baselines.

Check (✓ column) and matched error: the updated matrix ``M`` has rank ≤ k + c,
so a randomized range finder with ``q ≥ k + c`` columns captures its range
exactly; that exact rank-``k`` truncation, computed once per case (untimed), is
what ours is checked against — not the timed recomputations, which are
approximations.  The case's ``shape`` records each method's residual
``‖M − U·S·Vh‖_F / ‖M‖`` (``res_*``); ours equals the optimal one.
"""
from __future__ import annotations

import dataclasses

import torch

from ... import linalg
from .. import Config, Impl, describe_roles, measure, register
from .linalg import _rsvd_plan

SUITE = "linalg_update"
FULL = dict(m=4096, n=4096, k=64, c=16)
QUICK = dict(m=256, n=256, k=16, c=4)
OVERSAMPLE, N_ITER = 8, 2


def _orth(m, k, cfg):
    return torch.linalg.qr(torch.randn(m, k, device=cfg.device, dtype=torch.float32)).Q.to(cfg.dtype)


def _base(cfg: Config, m, n, k):
    U, V = _orth(m, k, cfg), _orth(n, k, cfg)
    S = torch.logspace(1, 0, k, device=cfg.device, dtype=cfg.dtype)
    return U, S, V.mT.contiguous()


def _rec(usv):
    U, S, Vh = usv
    return (U * S) @ Vh


def _residuals(shape, M, impls):
    nM = M.double().norm().item()
    for name, fn in impls:
        shape[f"res_{name}"] = float((M.double() - _rec(fn()).double()).norm().item() / nM)


def _recompute_impls(M, rank, exact):
    q = rank + OVERSAMPLE
    m, n = M.shape[-2:]
    b, _, passes = _rsvd_plan(rank, OVERSAMPLE, N_ITER)  # rsvd's own block plan (cpp/linalg/linalg_common.h)
    return [
        Impl("rsvd", "ref", lambda: linalg.rsvd(M, rank, OVERSAMPLE, N_ITER), 2 * m * n * b * passes,
             outputs=lambda: [exact]),
        Impl("lowrank", "alt", lambda: torch.svd_lowrank(M, q=q, niter=N_ITER), 2 * m * n * q * (2 + 2 * N_ITER),
             outputs=lambda: [_rec(_lowrank(M, rank, q))]),
    ]


def _lowrank(M, rank, q):
    U, S, V = torch.svd_lowrank(M, q=q, niter=N_ITER)
    return U[:, :rank], S[:rank], V[:, :rank].mT


def _exact_truncation(M, rank, c):
    """``M`` has rank <= rank + c: a range finder with q = rank + c + 8 columns is exact (fp64 compute)."""
    U, S, Vh = linalg.rsvd(M.double(), rank, c + OVERSAMPLE, N_ITER)
    return _rec((U, S, Vh)).to(M.dtype)


# --------------------------------------------------------------------------- factored_svd


def _factored_case(cfg: Config, s: dict, name: str):
    m, n, R = s["m"], s["n"], s["k"]
    B = torch.randn(m, R, device=cfg.device, dtype=cfg.dtype)
    A = torch.randn(R, n, device=cfg.device, dtype=cfg.dtype) / n**0.5

    def dense_path():
        return torch.linalg.svd(B @ A, full_matrices=False)

    shape = {"m": m, "n": n, "R": R}
    # The dense path's full SVD of an m×n matrix takes tens of seconds at 4096² on a CPU:
    # time it in one round.
    cfg1 = dataclasses.replace(cfg, min_run_time=0.0, min_runs=1, warmup=0) if m >= 2048 else cfg
    return measure(cfg1, name, [
        Impl("ours", "ours", lambda: linalg.factored_svd(B, A), 4 * (m + n) * R * R,
             outputs=lambda: [_rec(linalg.factored_svd(B, A))]),
        Impl("dense", "ref", dense_path, 2 * m * n * R + 4 * m * n * min(m, n),
             outputs=lambda: [_rec(tuple(t[..., :R] if i == 0 else t[:R] for i, t in enumerate(dense_path())))]),
        Impl("B@A", "floor", lambda: B @ A, 2 * m * n * R),
    ], shape=shape)


# --------------------------------------------------------------------------- updates


def _update_case(cfg: Config, s: dict, name: str):
    m, n, k, c = s["m"], s["n"], s["k"], s["c"]
    U, S, Vh = _base(cfg, m, n, k)
    P = torch.randn(m, c, device=cfg.device, dtype=cfg.dtype) / m**0.5
    Q = torch.randn(n, c, device=cfg.device, dtype=cfg.dtype)
    M = _rec((U, S, Vh)) + P @ Q.mT
    ours = lambda: linalg.svd_update(U, S, Vh, P, Q, k)  # noqa: E731
    shape = {"m": m, "n": n, "k": k, "c": c, "rank": k}
    _residuals(shape, M, [("ours", ours), ("rsvd", lambda: linalg.rsvd(M, k, OVERSAMPLE, N_ITER)),
                          ("lowrank", lambda: _lowrank(M, k, k + OVERSAMPLE)),
                          ("exact", lambda: linalg.rsvd(M.double(), k, c + OVERSAMPLE, N_ITER))])
    return measure(cfg, name, [Impl("ours", "ours", ours, 4 * (m + n) * (k + c) ** 2, outputs=lambda: [_rec(ours())])]
                   + _recompute_impls(M, k, _exact_truncation(M, k, c)),
                   shape=shape)


def _append_case(cfg: Config, s: dict, name: str, density=None):
    m, n, k, c = s["m"], s["n"], s["k"], s["c"]
    U, S, Vh = _base(cfg, m, n, k)
    C = torch.randn(m, c, device=cfg.device, dtype=cfg.dtype)
    if density is not None:
        C = (C * (torch.rand(m, c, device=cfg.device) < density)).to_sparse()
    M = torch.cat([_rec((U, S, Vh)), C.to_dense()], 1)
    ours = lambda: linalg.svd_append(U, S, Vh, C, k, 1)  # noqa: E731
    shape = {"m": m, "n": n, "k": k, "c": c, "rank": k, "density": density or 1.0}
    _residuals(shape, M, [("ours", ours), ("rsvd", lambda: linalg.rsvd(M, k, OVERSAMPLE, N_ITER)),
                          ("lowrank", lambda: _lowrank(M, k, k + OVERSAMPLE)),
                          ("exact", lambda: linalg.rsvd(M.double(), k, c + OVERSAMPLE, N_ITER))])
    return measure(cfg, name, [Impl("ours", "ours", ours, 4 * m * (k + c) ** 2 + 2 * n * k * k,
                                    outputs=lambda: [_rec(ours())])]
                   + _recompute_impls(M, k, _exact_truncation(M, k, c)),
                   shape=shape)


def _register():
    for tag, s, quick in (("256", QUICK, True), ("4096", FULL, False)):
        register(SUITE, f"factored_svd_{tag}", lambda cfg, s=s, t=tag: _factored_case(cfg, s, f"factored_svd_{t}"),
                 quick=quick, shape=s)
        register(SUITE, f"svd_update_{tag}", lambda cfg, s=s, t=tag: _update_case(cfg, s, f"svd_update_{t}"),
                 quick=quick, shape=s)
        register(SUITE, f"svd_append_{tag}", lambda cfg, s=s, t=tag: _append_case(cfg, s, f"svd_append_{t}"),
                 quick=quick, shape=s)
        register(SUITE, f"svd_append_sparse_{tag}",
                 lambda cfg, s=s, t=tag: _append_case(cfg, s, f"svd_append_sparse_{t}", density=0.01),
                 quick=quick, shape=s)


_register()


describe_roles(SUITE, "ref: recomputing from the dense updated matrix with linalg.rsvd (lowrank: torch.svd_lowrank, "
                      "q = rank + 8) / the dense path for factored_svd (form B·A, torch.linalg.svd); floor: forming "
                      "B·A; check: ours vs the exact rank-k truncation")
