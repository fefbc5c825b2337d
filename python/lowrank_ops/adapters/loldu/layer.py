"""LoLDU layer: Shi et al. 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper
Decomposition for Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2410.13618, method section.

LDU of the frozen weight with partial pivoting, ``W = P L D U`` (``L`` unit
lower-trapezoidal, ``U`` unit upper-trapezoidal, ``D`` diagonal).  The leading
``r`` columns of ``L`` and rows of ``U`` become frozen projections and the update
is ``ΔW = s·P L_r diag(z) U_r`` with trainable ``z`` (initialised to ``D_r``) and the
scalar ``s = alpha/r``, fixed unless ``train_scale=True`` (paper and authors' code train the
diagonal only; see :class:`~lowrank_ops.adapters.LoLDU`).  The base becomes the
residual ``W − s·P L_r diag(z) U_r`` (as the authors' code), so the layer is
unchanged at init.  ``P`` is stored as a row index (``(P L_r)[i] = L_r[perm[i]]``).
A zero pivot ``D_i`` leaves row ``i`` of ``U`` unscaled (``z_i = 0`` then; the
residual keeps the identity exact).  The forward is one ``lowrank_linear`` call
with ``up = P L_r``, ``down = U_r`` and the diagonal core ``s·z``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spectral_common import SpectralLinear, compute_dtype, resolve_rank


def ldu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(perm (out,), L (out, k), d (k,), U (k, in))`` with ``W = P L diag(d) U``, ``P[i, perm[i]] = 1``."""
    P, L, U = torch.linalg.lu(weight)
    d = torch.diagonal(U)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return P.argmax(dim=1), L, d, U / safe.unsqueeze(1)


class LoLDULinear(SpectralLinear):
    """Frozen ``loldu_L (out, r)``, ``loldu_U (r, in)``, ``loldu_perm (out,)``; trainable
    ``loldu_z (r,)``; ``loldu_scale ()`` is a parameter that trains only with ``train_scale=True``."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 1.0, train_scale: bool = False,
                 save_bases: bool = True) -> None:
        super().__init__(base_layer)
        r = resolve_rank("LoLDU", r, min(self.in_features, self.out_features), allow_full=False)
        self.r = r
        w = base_layer.weight.detach().to(compute_dtype(base_layer.weight.dtype))
        perm, L, d, U = ldu(w)
        L, d, U = L[:, :r], d[:r], U[:r]
        s = alpha / r
        self._basis("loldu_L", L, save_bases)
        self._basis("loldu_U", U, save_bases)
        self.register_buffer("loldu_perm", perm.to(base_layer.weight.device), persistent=save_bases)
        self.loldu_z = self._param(d)
        self.loldu_scale = self._param(torch.tensor(s))
        self.loldu_scale.requires_grad_(train_scale)
        self._set_base(w - s * (L[perm] * d) @ U)

    def factors(self):
        up = self.loldu_L.index_select(0, self.loldu_perm)
        return self.loldu_U, up, self.loldu_scale * self.loldu_z, 1.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
