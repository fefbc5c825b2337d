"""SLERP: spherical linear interpolation of two models (mergekit's ``slerp``).

Shoemake 1985, "Animating Rotation with Quaternion Curves", Eq. for slerp:
``slerp(p0, p1; t) = sin((1−t)Ω)/sin Ω · p0 + sin(tΩ)/sin Ω · p1`` with
``cos Ω = p̂0·p̂1`` (the angle between the flattened, normalised tensors).  As in
mergekit, the coefficients multiply the *unnormalised* tensors, and nearly
colinear pairs (``|cos Ω| > dot_threshold``) fall back to linear interpolation
``(1−t)·p0 + t·p1``.  ``t = 0`` gives the first model (the base model when one is
given), ``t = 1`` the second; per-layer ``t`` comes from a config gradient.
"""
from __future__ import annotations

import math

import torch

from ._common import compute_dtype
from .registry import register


@register("slerp", paper="Animating Rotation with Quaternion Curves (Shoemake 1985), as used by mergekit",
          url="https://doi.org/10.1145/325165.325242", needs_base=False,
          params={"t": 0.5, "dot_threshold": 0.9995, "eps": 1e-8})
def slerp_tensor(base, tensors, weights, *, name="", t=0.5, dot_threshold=0.9995, eps=1e-8, **_):
    """Spherical interpolation between ``base`` and ``tensors[0]``, or ``tensors[0]`` and ``tensors[1]`` without base.

    ``weights`` are ignored (mergekit ignores them too); ``t`` is the position along the arc.
    """
    if base is not None and len(tensors) == 1:
        v0, v1 = base, tensors[0]
    elif base is None and len(tensors) == 2:
        v0, v1 = tensors
    else:
        raise ValueError(f"slerp interpolates exactly two models (a base model and one other, or two models "
                         f"without a base); tensor {name!r} got {'a base and ' if base is not None else ''}"
                         f"{len(tensors)} model(s)")
    t = float(t)
    dt = compute_dtype(v0)
    a, b = v0.to(dt), v1.to(dt)
    na, nb = a.norm(), b.norm()
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua * ub).sum().clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        out = torch.lerp(a, b, t)
    else:
        omega = math.acos(dot)
        s = math.sin(omega)
        out = a * (math.sin((1.0 - t) * omega) / s) + b * (math.sin(t * omega) / s)
    return out.to(v0.dtype)
