"""Registry of merge methods by name (the names the YAML ``merge_method`` uses).

Each method lives in its own file under ``lowrank_ops.merge`` and registers its
per-tensor function with :func:`register`, naming its paper::

    @register("ties", paper="TIES-Merging: Resolving Interference When Merging Models",
              url="https://arxiv.org/abs/2306.01708", params={"density": 0.2, "sign_method": "sum"})
    def ties_tensor(base, tensors, weights, *, name="", density=0.2, sign_method="sum", **_):
        ...  # -> merged Tensor, same shape and dtype as tensors[0]

The per-tensor function takes ``base`` (the base model's tensor, or None for
base-free methods), ``tensors`` (one per input model, same shape), ``weights``
(a float per model, default 1 each), the tensor's ``name`` (so depth-aware
methods such as LiNeS can read the layer index), and the method's parameters.
The streaming engine and the CLI call it one tensor at a time.

``MergeMethod.__call__(base_state, states, weights=None, **params)`` applies it
to whole state dicts (DESIGN §4: ``merge.ties(base_state, [sd1, sd2], weights=[1, 1],
density=0.2)``).  Methods that need the whole model at once (e.g. aTLAS, which
learns coefficients from data) pass ``state_fn`` and have no per-tensor form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class MergeMethod:
    name: str
    tensor_fn: Optional[Callable]
    paper: str
    url: str
    needs_base: bool = True
    params: dict = field(default_factory=dict)
    state_fn: Optional[Callable] = None

    @property
    def streamable(self) -> bool:
        return self.tensor_fn is not None

    def merge_tensor(self, name: str, base: Optional[Tensor], tensors: Sequence[Tensor],
                     weights: Optional[Sequence[float]] = None, **params) -> Tensor:
        if self.tensor_fn is None:
            raise ValueError(f"merge method {self.name!r} needs the whole model; it has no per-tensor form")
        if self.needs_base and base is None:
            raise ValueError(f"merge method {self.name!r} needs a base model (tensor {name!r} has none)")
        w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
        if len(w) != len(tensors):
            raise ValueError(f"merge method {self.name!r}: {len(w)} weights for {len(tensors)} models")
        return self.tensor_fn(base, list(tensors), w, name=name, **{**self.params, **params})

    def __call__(self, base_state: Optional[Mapping[str, Tensor]], states: Sequence[Mapping[str, Tensor]],
                 weights: Optional[Sequence[float]] = None, **params) -> dict[str, Tensor]:
        if self.state_fn is not None:
            return self.state_fn(base_state, states, weights=weights, **{**self.params, **params})
        if not states:
            raise ValueError(f"merge method {self.name!r}: no models to merge")
        keys = list(states[0].keys())
        for i, sd in enumerate(states[1:], 1):
            if set(sd.keys()) != set(keys):
                diff = sorted(set(keys) ^ set(sd.keys()))[:5]
                raise ValueError(f"merge method {self.name!r}: model {i} has different tensors than model 0 (e.g. {diff})")
        out = {}
        for k in keys:
            ts = [sd[k] for sd in states]
            base = None if base_state is None else base_state.get(k)
            if self.needs_base and base is None:
                raise ValueError(f"merge method {self.name!r}: base model has no tensor {k!r}")
            if not ts[0].is_floating_point():  # integer buffers (e.g. position ids): keep the base's / first model's
                out[k] = (base if base is not None else ts[0]).clone()
                continue
            out[k] = self.merge_tensor(k, base, ts, weights, **params)
        return out


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, paper: str, url: str, needs_base: bool = True, params: Optional[dict] = None,
             state_fn: Optional[Callable] = None):
    """Decorator: register a per-tensor merge function as method ``name``; returns the :class:`MergeMethod`.

    ``params`` maps each method parameter to its default.  With ``state_fn`` the
    decorated function may be None-returning glue; ``state_fn(base_state, states,
    weights=..., **params)`` is then the method.
    """
    def deco(fn: Optional[Callable]) -> MergeMethod:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        m = MergeMethod(name, None if state_fn is not None else fn, paper, url, needs_base, dict(params or {}), state_fn)
        METHODS[name] = m
        return m
    return deco


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def stack_deltas(base: Optional[Tensor], tensors: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, *shape)`` task vectors ``tensors[i] - base`` (or the tensors themselves when base is None), in ``dtype``."""
    t = torch.stack([x.to(dtype) for x in tensors])
    return t if base is None else t - base.to(dtype)
