"""Benchmarks of the adapter inits: PiSSA initialisation of one square weight.

``pissa_init_N`` times one PiSSA init (rank 16, alpha 16) of an ``N × N`` weight — the SVD,
the factor split and the residual written into the base weight (plus one copy of the
original weight back into the layer, the same for every row):

* ``ours``     — ``adapters.lora.pissa_init_`` with ``linalg.rsvd`` at its default ``n_iter``;
* ``ours_n4``  — the same with ``n_iter=4``;
* ``ref``      — peft's ``pissa_init(..., "pissa_niter_4")`` (``torch.svd_lowrank(W, q=r, niter=4)``),
  only the init, on a peft ``Linear`` around an ``nn.Linear(N, N)``;
* ``exact``    — ``pissa_init_(n_iter=None)``, the full-SVD path (peft ``"pissa"`` does the same SVD);
  timed once (one call, ``runs = 1``) with ``--quick`` and at 4096².

The weight is ``P·diag(σ)·Q / √N`` with Gaussian ``P (N×256)``, ``Q (256×N)`` and
``σ_i = i^-0.6`` plus a 1e-3 Gaussian floor: a decaying spectrum like trained projections
(a purely Gaussian weight has a flat spectrum, where no rank-16 init is meaningful).
The "check" column compares the reconstructed weight ``W_res + s·B·A`` with the original
(the residual identity, which every implementation must satisfy); each row also reports,
on its own line, the identity error and the rank-``r`` approximation error
``‖W_res‖_F`` relative to the optimum ``‖W − W_r‖_F`` of the exact path.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ...adapters.lora.init import pissa_init_
from ...nn import LoRALinear
from .. import Config, Impl, Row, describe_roles, measure, register
from ._peft import peft_lora_layer

SUITE = "adapters"
RANK = 16
ALPHA = 16.0


def _weight(n: int, cfg: Config) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    k = 256
    P = torch.randn(n, k, generator=g)
    Q = torch.randn(k, n, generator=g)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.6
    W = (P * s) @ Q / n ** 0.5 + 1e-3 * torch.randn(n, n, generator=g)
    return W.to(device=cfg.device, dtype=cfg.dtype)


def _ours(W0: torch.Tensor, n_iter):
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False, device=W0.device, dtype=W0.dtype).requires_grad_(False)
    layer = LoRALinear(lin, r=RANK, alpha=ALPHA)

    def fn():
        lin.weight.copy_(W0)
        pissa_init_(layer, n_iter=n_iter)
        return layer

    return fn


def _peft(W0: torch.Tensor):
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False, device=W0.device, dtype=W0.dtype).requires_grad_(False)
    layer = peft_lora_layer(lin, r=RANK, lora_alpha=ALPHA)
    if layer is None:
        return None

    def fn():
        with torch.no_grad():
            layer.base_layer.weight.copy_(W0)
        layer.pissa_init("default", "pissa_niter_4")
        return layer

    return fn


def _parts(layer):
    """``(W_res, s·B·A)`` of ours' or peft's layer."""
    if isinstance(layer, LoRALinear):
        return layer.base_layer.weight, layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    return layer.base_layer.weight, layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def _recon(fn):
    def outputs():
        with torch.no_grad():
            res, low = _parts(fn())
            return [res.double() + low.double()]
    return outputs


def _errors(fn, W0: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        res, low = _parts(fn())
        ident = ((res.double() + low.double() - W0.double()).norm() / W0.double().norm()).item()
        return ident, res.double().norm().item()


def _case(cfg: Config, n: int, name: str) -> list:
    W0 = _weight(n, cfg)
    impls = [
        Impl("ours", "ours", _ours(W0, 2), 0.0),
        Impl("ours_n4", "ours", _ours(W0, 4), 0.0),
    ]
    peft_fn = _peft(W0)
    if peft_fn is not None:
        impls.append(Impl("ref", "ref", peft_fn, 0.0))
    exact = _ours(W0, None)
    # a full SVD costs ~20x the randomized paths at 1024² and minutes at 4096² on CPU: it is
    # timed over fewer rounds only in a full run at 1024², else once (a single-call ratio)
    timed_exact = n <= 1024 and not cfg.quick
    if timed_exact:  # in rounds of its own, as linalg's `linalg.svd` rows (bench/__init__.py: Impl)
        impls.append(Impl("exact", "floor", exact, 0.0, interleave=False))
    for impl in impls:
        impl.outputs = _recon(impl.fn)
    if peft_fn is None:  # check against the original weight itself
        impls.append(Impl("orig", "ref", lambda: None, 0.0, outputs=lambda: [W0.double()]))
    rows = measure(cfg, name, impls, shape={"n": n, "r": RANK, "alpha": ALPHA})
    rows = [r for r in rows if r.impl != "orig"]
    impls = [i for i in impls if i.name != "orig"]
    t0 = time.perf_counter()
    exact_layer = exact()  # also the optimum for the error column
    dt = time.perf_counter() - t0
    if not timed_exact:
        rows.append(Row(case=name, impl="exact", role="floor", ms=dt * 1e3, iqr_ms=0.0, runs=1, gflops=0.0,
                        vs_ref=None, vs_floor=None, peak_extra_mb=None, check=None, max_rel_err=None, flops=0.0,
                        gbps=None, shape={"n": n, "r": RANK, "alpha": ALPHA}))
        ref_row = next((r for r in rows if r.impl == "ref"), None)
        if ref_row is not None:
            rows[-1].vs_ref = rows[-1].ms / ref_row.ms  # single-call ratio (not paired)
    _, opt = _errors(lambda: exact_layer, W0)
    notes = []
    for impl_name, fn in [(i.name, i.fn) for i in impls if i.name != "exact"] + [("exact", lambda: exact_layer)]:
        ident, res = _errors(fn, W0)
        for r in rows:
            if r.impl == impl_name:
                r.shape.update({"identity_rel_err": ident, "approx_err_vs_optimal": res / opt})
                if r.role == "ours" and r.check is not None:
                    # the identity holds for any factors: a wrong SVD must fail the check too (rsvd's contract)
                    r.check = bool(r.check and res / opt <= 1.05)
        notes.append(f"{impl_name}: identity {ident:.1e}, rank-{RANK} error {res / opt:.4f}x optimal")
    print(f"  {name}: " + "; ".join(notes), flush=True)
    return rows


describe_roles(SUITE, "ref: peft's pissa_niter_4 init; floor: the exact-SVD init (pissa); check: the residual identity "
                      "W_res + s·B·A = W (vs ref) and rank-r error <= 1.05x optimal")
register(SUITE, "pissa_init_1024", lambda cfg: _case(cfg, 1024, "pissa_init_1024"), quick=True,
         shape={"n": 1024, "r": RANK})
register(SUITE, "pissa_init_4096", lambda cfg: _case(cfg, 4096, "pissa_init_4096"), quick=False,
         shape={"n": 4096, "r": RANK})
