"""aTLAS: task vectors composed with learned anisotropic (per-block) scaling (Zhang et al., NeurIPS 2024).

"Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
Eq. (4): ``θ = θ₀ + Σₜ Σ_b λₜ,b · τₜ^(b)`` with one learnable coefficient per task
``t`` and parameter block ``b`` (here: per tensor).  Only the ``λ`` are trained,
on a user-supplied objective, through ``torch.func.functional_call`` on the
user's model.  By the chain rule the gradient of a coefficient is the inner
product of the parameter gradient with that block of the task vector:

    ∂L/∂λₜ,b = ⟨∂L/∂θ^(b), τₜ^(b)⟩.

This is a whole-model method (it needs data and the model), so it has no
per-tensor form and is not available from the streaming CLI::

    merged = merge.atlas(base_state, [sd1, sd2], model=net, loss_fn=F.cross_entropy,
                         data=loader, steps=200, lr=1e-2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .registry import register


@dataclass
class AtlasResult:
    names: list[str]          # the blocks (floating tensors), in coefficient column order
    coefficients: Tensor      # (N, B) learned λ
    losses: list[float]       # loss before each step


def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        x, y = batch, None
    return (x if isinstance(x, tuple) else (x,)), y


def compose(base_state: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]], names: Sequence[str],
            coefficients: Tensor) -> dict[str, Tensor]:
    """``{name: θ₀ + Σₜ λₜ,b τₜ}`` (differentiable in ``coefficients``)."""
    out = {}
    for b, k in enumerate(names):
        p = base_state[k]
        for t, d in enumerate(deltas):
            p = p + coefficients[t, b] * d[k]
        out[k] = p
    return out


def learn_coefficients(model: nn.Module, base_state: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]],
                       loss_fn: Callable, data: Iterable, *, steps: int = 100, lr: float = 1e-2,
                       init: Optional[Sequence[float]] = None) -> AtlasResult:
    """Fit the per-task, per-tensor coefficients with Adam on ``loss_fn(model(x), y)`` over batches of ``data``.

    ``data`` yields ``(x, y)`` (``x`` a tensor or a tuple of positional inputs;
    ``y`` may be None for unsupervised objectives) and is cycled for ``steps``
    steps.  Floating tensors of ``base_state`` are the blocks; buffers the
    model has but the states lack keep the model's values.
    """
    names = [k for k, v in base_state.items() if v.is_floating_point()]
    for i, sd in enumerate(states):
        missing = [k for k in names if k not in sd]
        if missing:
            raise ValueError(f"atlas: model {i} has no tensor {missing[0]!r}")
    base = {k: base_state[k].detach() for k in names}
    deltas = [{k: (sd[k].detach().to(base[k].dtype) - base[k]) for k in names} for sd in states]
    n = len(states)
    start = [1.0 / n] * n if init is None else [float(x) for x in init]
    dtype = base[names[0]].dtype if names else torch.float32
    coef = torch.tensor(start, dtype=dtype).unsqueeze(1).repeat(1, len(names)).requires_grad_(True)
    opt = torch.optim.Adam([coef], lr=lr)
    losses: list[float] = []
    it = iter(data)
    for _ in range(int(steps)):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)
            batch = next(it)
        x, y = _split_batch(batch)
        params = compose(base, deltas, names, coef)
        loss = loss_fn(functional_call(model, params, x, strict=False), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return AtlasResult(names, coef.detach(), losses)


def _atlas_state(base_state, states, weights=None, *, model=None, loss_fn=None, data=None, steps=100, lr=1e-2, **_):
    if model is None or loss_fn is None or data is None:
        raise ValueError("atlas learns its coefficients from data: pass model=, loss_fn= and data= "
                         "(it cannot run from the streaming CLI)")
    if base_state is None:
        raise ValueError("atlas needs the base (pre-trained) state dict")
    res = learn_coefficients(model, base_state, states, loss_fn, data, steps=steps, lr=lr, init=weights)
    base = {k: base_state[k].detach() for k in res.names}
    deltas = [{k: sd[k].detach().to(base[k].dtype) - base[k] for k in res.names} for sd in states]
    with torch.no_grad():
        merged = compose(base, deltas, res.names, res.coefficients)
    out = {k: (merged[k].to(v.dtype) if k in merged else v.clone()) for k, v in base_state.items()}
    return out


atlas = register("atlas", paper="Knowledge Composition using Task Vectors with Learned Anisotropic Scaling (aTLAS)",
                 url="https://arxiv.org/abs/2407.02880",
                 params={"model": None, "loss_fn": None, "data": None, "steps": 100, "lr": 1e-2},
                 state_fn=_atlas_state)(None)
