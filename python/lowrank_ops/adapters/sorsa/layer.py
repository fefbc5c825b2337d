"""SORSA layer: Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular
Vectors Adaptation of Large Language Models", https://arxiv.org/abs/2409.00055.

Split (method section): ``W = W_r + W_p`` with ``W_p = U_p Σ_p V_pᵀ`` the top-``r`` SVD part
and ``W_r`` the frozen residual (held in ``base_layer.weight``).  ``U_p``,
``Σ_p``, ``V_pᵀ`` all train; the orthonormal regulariser of the method section,
``L_reg = ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F`` (plain Frobenius norms, not squared), keeps
the singular vectors near-orthonormal; it is applied with the update rule
``W_p ← W_p − η_t∇L_train − γ_t∇L_reg`` (see :func:`~lowrank_ops.adapters.sorsa_regularizer`).
The forward is ``y = W_r x + b + U_p·diag(Σ_p)·V_pᵀ x`` — one ``lowrank_linear`` call with a
diagonal core.  At init ``W_r + U_p Σ_p V_pᵀ = W`` (to round-off in the weight's
dtype).  ``unload()`` (without merging) leaves the residual ``W_r`` in place,
as peft does for PiSSA; ``merge_and_unload()`` gives ``W_r + U_p Σ_p V_pᵀ``.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..spectral_common import SpectralLinear, orthonormality_gap, resolve_rank, thin_svd


class SORSALinear(SpectralLinear):
    """Trainable ``sorsa_U (out, r)``, ``sorsa_S (r,)``, ``sorsa_Vh (r, in)``; base = residual."""

    def __init__(self, base_layer: nn.Linear, r: int = 8) -> None:
        super().__init__(base_layer)
        r = resolve_rank("SORSA", r, min(self.in_features, self.out_features), allow_full=False)
        self.r = r
        U, S, Vh = thin_svd(base_layer.weight)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
        self.sorsa_U = self._param(U)
        self.sorsa_S = self._param(S)
        self.sorsa_Vh = self._param(Vh)
        w = base_layer.weight
        self._set_base(w.to(U.dtype) - (U * S) @ Vh)

    def factors(self):
        return self.sorsa_Vh, self.sorsa_U, self.sorsa_S, 1.0

    def orthogonal_regularizer(self) -> Tensor:
        """This adapter's ``L_reg = ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F`` (Cao & Song 2024,
        arXiv:2409.00055, method section, orthonormal regulariser; plain Frobenius norms as the
        paper and the authors' ``calc_ortho``), in fp32 or wider; 0 at init up to round-off."""
        return orthonormality_gap(self.sorsa_U, rows=False) + orthonormality_gap(self.sorsa_Vh, rows=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
