"""Shared pieces of the spectral adapters (SVFT, SVF, SORSA, KaSA, SALT, LaMDA, QR-LoRA, LoLDU).

Every spectral method writes its update as ``ΔW = scale · up · core · down``
with frozen bases (singular vectors, a pivoted-QR basis or LU factors of
``W``) and a small trainable core, so one :class:`SpectralLinear` forward —
a single fused ``lowrank_ops.ops.lowrank_linear`` call — serves them all.

File format: peft has none of these methods (peft 0.21), so adapters are saved
in peft's layout (``adapter_model.safetensors`` + ``adapter_config.json``) with
``peft_type`` set to the method's name in upper case and our own tensor keys
(``base_model.model.<module>.<name>``).  The frozen bases are stored too
(``save_bases=True``, the default) because an SVD is only defined up to signs
and differs across backends; with ``save_bases=False`` they are recomputed
from the base weight on load, which is reproducible only on the same backend.
peft itself refuses these files (unknown ``peft_type``).
"""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..nn import AdapterLinear
from .config import PEFT_COMMON

#: marks files written for lowrank_ops-only methods
FORMAT_TAG = "lowrank_ops"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factorizations run in fp64 for fp64 weights and fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def thin_svd(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U (out, k)``, ``S (k,)``, ``Vh (k, in)`` of ``weight`` in :func:`compute_dtype`, ``k = min(out, in)``."""
    w = weight.detach().to(compute_dtype(weight.dtype))
    return torch.linalg.svd(w, full_matrices=False)


def resolve_rank(method: str, r: Optional[int], k: int, *, allow_full: bool = True, name: str = "r") -> int:
    """``r`` checked against ``k = min(out, in)``; ``None`` means ``k`` when ``allow_full``."""
    if r is None:
        if not allow_full:
            raise ValueError(f"{method}: {name} is required")
        return k
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{method}: {name} must be an int >= 1, got {r!r}")
    if r > k:
        raise ValueError(f"{method}: {name}={r} exceeds min(out_features, in_features)={k}")
    return r


class SpectralConfigMixin:
    """``to_peft_dict`` / ``from_peft_dict`` for the dataclass configs of methods peft lacks:
    every dataclass field is written under its own name."""

    peft_type: str

    def to_peft_dict(self, target_modules) -> dict:
        return {**PEFT_COMMON, **asdict(self), "peft_type": self.peft_type, "target_modules": target_modules,
                "format": FORMAT_TAG}

    @classmethod
    def from_peft_dict(cls, d: dict):
        if d.get("fan_in_fan_out"):
            raise NotImplementedError("load_pretrained: fan_in_fan_out=True (Conv1D bases) is not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SpectralLinear(AdapterLinear):
    """Base of the spectral layers: ``y = W x + b + scale·up·core·down·x`` in one
    ``lowrank_linear`` call.  Subclasses implement :meth:`factors` returning
    ``(down (r_d, in), up (out, r_u), core (None | (r,) | (r_u, r_d)), scale)``;
    ``W`` is ``base_layer.weight`` (a residual for the split methods)."""

    def factors(self) -> tuple[Tensor, Tensor, Optional[Tensor], float]:
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        down, up, core, scale = self.factors()
        if core is None:
            m = up @ down
        elif core.dim() == 1:
            m = (up * core) @ down
        else:
            m = up @ core @ down
        return scale * m

    def _adapter_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        down, up, core, scale = self.factors()
        return ops.lowrank_linear(x, base.weight, base.bias, down, up, core, scale)

    def _basis(self, name: str, t: Tensor, persistent: bool) -> None:
        """Register a frozen basis in the base weight's dtype/device."""
        w = self.base_layer.weight
        self.register_buffer(name, t.detach().to(device=w.device, dtype=w.dtype).contiguous(), persistent=persistent)

    def _param(self, t: Tensor) -> nn.Parameter:
        w = self.base_layer.weight
        return nn.Parameter(t.detach().to(device=w.device, dtype=w.dtype).clone().contiguous())

    @torch.no_grad()
    def _set_base(self, new_weight: Tensor) -> None:
        """Replace the frozen base weight (residual split / truncation) in place."""
        w = self.base_layer.weight
        w.copy_(new_weight.to(w.dtype))


def orthonormality_gap(m: Tensor, rows: bool) -> Tensor:
    """``‖M Mᵀ − I‖_F`` (``rows=True``) or ``‖Mᵀ M − I‖_F`` — the plain, not squared, Frobenius
    norm, in fp32 or wider.

    This is one term of SORSA's orthonormal regulariser (Cao & Song, "SORSA", arXiv:2409.00055,
    method section: ``L_reg = ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F``; the authors' ``calc_ortho``
    uses ``torch.norm(·, p="fro")`` too).  At an exactly orthonormal ``M`` the value is 0 and
    the gradient is 0 (``torch.linalg.matrix_norm`` masks the 0/0)."""
    m = m.to(torch.promote_types(m.dtype, torch.float32))
    g = m @ m.T if rows else m.T @ m
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.matrix_norm(g - eye)
