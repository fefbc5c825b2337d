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
from typing import Callable, Iterable, Mapping, Optional, Sequence

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
    delta_fn: Optional[Callable] = None  # methods θ = θ_base + λ·f(τ_1..τ_N) only, see register_delta
    delta_sign: float = 1.0
    delta_scale: str = "lambda"  # the parameter that is λ (register_delta's / register_per_task's ``scale``)
    task_fns: Optional[tuple[Callable, Callable]] = None  # (reduce, combine), see register_per_task
    lazy_inputs: bool = False  # tensor_fn indexes ``tensors`` when it needs a model (see register)

    @property
    def streamable(self) -> bool:
        return self.tensor_fn is not None

    def merged_delta(self, name: str, deltas: Tensor, weights: Optional[Sequence[float]], shape: tuple,
                     **params) -> tuple[Tensor, float]:
        """``(f(τ), λ)`` of a :func:`register_delta` method: ``f`` on the stacked ``(N, P)`` task vectors
        ``deltas`` (work dtype; the method may overwrite them) and the signed global scale, so that the merged
        tensor is ``θ_base + λ·f(τ)`` reshaped to ``shape``.  The streaming engine builds ``deltas`` one model at
        a time and applies ``λ`` itself, which keeps peak memory at N + 1 tensors."""
        if self.delta_fn is None:
            raise ValueError(f"merge method {self.name!r} is not a task-vector method")
        from .sparsify import weights_tensor

        w, p, lam = self._weights_and_scale(deltas.shape[0], weights, params)
        merged = self.delta_fn(deltas, weights_tensor(w, deltas), name=name, shape=tuple(shape), **p)
        return merged, lam

    def merged_from_tasks(self, name: str, taus: Iterable[Tensor], weights: Optional[Sequence[float]], n: int,
                          shape: tuple, **params) -> tuple[Tensor, float]:
        """``(f, λ)`` of a :func:`register_per_task` method: ``f = combine(reduce(τ_1), ..., reduce(τ_n))``
        (flattened) from ``taus``, an iterable of the ``n`` flattened task vectors in the work dtype, consumed
        one at a time (each may be overwritten and is dropped before the next is drawn), and the signed scale
        λ, so that the merged tensor is ``θ_base + λ·f``."""
        reduce, combine = self.task_fns
        w, p, lam = self._weights_and_scale(n, weights, params)
        parts = []
        for i, tau in enumerate(taus):
            parts.append(reduce(tau, w[i], index=i, count=n, name=name, shape=tuple(shape), **p))
            del tau  # the caller's next task vector is read after this one is gone
        return combine(parts, name=name, shape=tuple(shape), **p), lam

    def _weights_and_scale(self, n: int, weights: Optional[Sequence[float]], params: dict):
        """``(weights as n floats, the method's parameters without λ, signed λ)``; unknown parameters and a
        wrong number of weights are errors."""
        w = [1.0] * n if weights is None else [float(x) for x in weights]
        if len(w) != n:
            raise ValueError(f"merge method {self.name!r}: {len(w)} weights for {n} models")
        p = {**self.params, **params}
        extra = sorted(set(p) - set(self.params))
        if extra:
            raise TypeError(f"merge method {self.name!r}: unknown parameter(s) {extra}")
        return w, p, float(p.pop(self.delta_scale, 1.0)) * self.delta_sign

    def merge_tensor(self, name: str, base: Optional[Tensor], tensors: Sequence[Tensor],
                     weights: Optional[Sequence[float]] = None, **params) -> Tensor:
        if self.tensor_fn is None:
            raise ValueError(f"merge method {self.name!r} needs the whole model; it has no per-tensor form")
        if self.needs_base and base is None:
            raise ValueError(f"merge method {self.name!r} needs a base model (tensor {name!r} has none)")
        w = [1.0] * len(tensors) if weights is None else [float(x) for x in weights]
        if len(w) != len(tensors):
            raise ValueError(f"merge method {self.name!r}: {len(w)} weights for {len(tensors)} models")
        ts = tensors if self.lazy_inputs else list(tensors)
        return self.tensor_fn(base, ts, w, name=name, **{**self.params, **params})

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
             state_fn: Optional[Callable] = None, lazy_inputs: bool = False):
    """Decorator: register a per-tensor merge function as method ``name``; returns the :class:`MergeMethod`.

    ``params`` maps each method parameter to its default.  ``lazy_inputs``: the function reads ``tensors[i]``
    each time it needs model ``i`` and keeps no reference to it (LoRE, which iterates over all models), so the
    streaming engine may pass a sequence that reads the tensor from disk on each indexing.  With ``state_fn`` the
    decorated function may be None-returning glue; ``state_fn(base_state, states,
    weights=..., **params)`` is then the method.
    """
    def deco(fn: Optional[Callable]) -> MergeMethod:
        return _add(MergeMethod(name, None if state_fn is not None else fn, paper, url, needs_base,
                                dict(params or {}), state_fn, lazy_inputs=lazy_inputs))
    return deco


def _add(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def register_delta(name: str, *, paper: str, url: str, params: Optional[dict] = None, sign: float = 1.0,
                   scale: str = "lambda"):
    """Decorator for a task-vector method ``θ = θ_base + sign·λ·f(τ_1, ..., τ_N)``, ``τ_i = θ_i − θ_base``.

    The decorated ``f(deltas, w, *, name, shape, **params) -> (P,)`` takes the stacked ``(N, P)`` task vectors
    (flattened, in the work dtype: fp64 stays fp64, else fp32; ``f`` may overwrite them), the ``(N,)`` weights and
    the tensor's name and shape.  ``params`` include the global scale λ, named by ``scale`` (default
    ``"lambda"``, mergekit's name; a method whose paper names it otherwise passes that name).  The per-tensor
    form (state-dict API) stacks the deltas and applies λ; the streaming engine instead fills the stack one
    model at a time and frees the base while ``f`` runs (:meth:`MergeMethod.merged_delta`).
    """
    params = dict(params or {})
    params.setdefault(scale, 1.0)

    def deco(fn: Callable) -> MergeMethod:
        def tensor_fn(base, tensors, weights, *, name="", **p):
            from .sparsify import apply_delta, flat_deltas

            merged, lam = method.merged_delta(name, flat_deltas(base, tensors), weights, tuple(tensors[0].shape), **p)
            return apply_delta(base, merged, tensors[0], lam)

        tensor_fn.__doc__, tensor_fn.__name__ = fn.__doc__, fn.__name__
        method = _add(MergeMethod(name, tensor_fn, paper, url, True, params, None, fn, float(sign), scale))
        return method
    return deco


def register_per_task(name: str, *, paper: str, url: str, reduce: Callable, params: Optional[dict] = None,
                      scale: str = "scaling"):
    """Decorator for a method ``θ = θ_base + λ·combine(reduce(τ_1), ..., reduce(τ_N))`` whose per-task step needs
    one task vector at a time (TSV-M: each task's top singular triplets); the decorated function is ``combine``.

    ``reduce(tau, w, *, index, count, name, shape, **params)`` gets one flattened task vector in the work dtype
    (it may overwrite or keep it), its weight, its index among ``count`` models, and returns what ``combine``
    needs from it; ``combine(parts, *, name, shape, **params) -> (P,)`` gets the list of those (and may empty
    it to free the parts early).  λ is the parameter named ``scale``.  The per-tensor form computes each ``τ_i``
    when it is needed; the streaming engine reads one model at a time (:meth:`MergeMethod.merged_from_tasks`),
    so only the base, one task vector and the reductions are alive.
    """
    params = dict(params or {})
    params.setdefault(scale, 1.0)

    def deco(combine: Callable) -> MergeMethod:
        def tensor_fn(base, tensors, weights, *, name="", **p):
            from .sparsify import apply_delta, work_dtype

            dt = work_dtype(tensors[0])
            b = base.reshape(-1).to(dt)
            taus = (t.reshape(-1).to(dt, copy=True).sub_(b) for t in tensors)
            merged, lam = method.merged_from_tasks(name, taus, weights, len(tensors), tuple(tensors[0].shape), **p)
            return apply_delta(base, merged, tensors[0], lam)

        tensor_fn.__doc__, tensor_fn.__name__ = combine.__doc__, combine.__name__
        method = _add(MergeMethod(name, tensor_fn, paper, url, True, params, None, None, 1.0, scale,
                                  (reduce, combine)))
        return method
    return deco


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
