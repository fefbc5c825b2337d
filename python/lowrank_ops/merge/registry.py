"""Registry of merge methods by name (the names the YAML ``merge_method`` uses).

Each method lives in its own file under ``lowrank_ops.merge`` and registers
itself with :func:`register`, giving its paper.  A method is a callable

    method(base_state, states, *, weights=None, **params) -> state_dict

where ``base_state`` is a mapping name -> Tensor (or None for base-free
methods), ``states`` a sequence of such mappings, and the result maps the same
names to merged tensors.  Methods that work tensor by tensor also expose
``method.merge_tensor(name, base, tensors, weights, **params) -> Tensor`` so the
streaming engine can apply them one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable
    paper: str
    url: str
    needs_base: bool = True
    tensorwise: Optional[Callable] = None
    params: dict = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, paper: str, url: str, needs_base: bool = True,
             tensorwise: Optional[Callable] = None, params: Optional[dict] = None):
    """Decorator: register ``fn`` as merge method ``name`` (with its paper title and URL).

    ``tensorwise`` is the per-tensor form used by the streaming engine;
    ``params`` maps each method parameter to its default.
    """
    def deco(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(name, fn, paper, url, needs_base, tensorwise, dict(params or {}))
        return fn
    return deco


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
