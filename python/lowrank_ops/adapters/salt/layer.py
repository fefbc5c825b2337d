"""SALT layer: Elsayed et al. 2025, "SALT: Parameter-Efficient Fine-Tuning via Singular
Value Adaptation with Low-Rank Transformation", https://arxiv.org/abs/2503.16055, method section.

With ``W = U Σ Vᵀ`` (thin SVD, frozen ``U``, ``V``), the top-``k`` singular values
are scaled and shifted, ``σ'_i = ReLU(α_i σ_i + β_i)`` (``α`` starts at 1,
``β`` at 0), and the remaining (minor) block gets a low-rank update ``X·Y``:

    W' = U_k diag(σ'_k) V_kᵀ + U_{>k} (Σ_{>k} + X Y) V_{>k}ᵀ

so ``ΔW = U_k diag(σ'_k − σ_k) V_kᵀ + (U_{>k} X)(Y V_{>k}ᵀ)``.  ``X (n−k, ρ)``
starts at zero and ``Y (ρ, n−k)`` Kaiming-uniform, so ``ΔW = 0`` at init (the
authors' code starts both at small random values instead).

The forward is one ``lowrank_linear`` call of rank ``k + ρ``: ``down =
[V_kᵀ; Y V_{>k}ᵀ]``, ``up = [U_k, U_{>k} X]``, diagonal ``core = [σ' − σ; 1]``.
The two small products cost ``ρ(n−k)(in + out)`` FLOPs per forward, independent
of the token count.

Memory: the full ``U``/``V`` (``k_max = min(out, in)`` columns) are stored, as the method
needs the whole residual subspace.

ReLU scope: ``ReLU`` acts on the ``k`` adapted singular values only, as in the method-section
equation above (as transcribed when this adapter was written; not re-verified against the
paper body).  The authors' code (``SALTLinear.forward``, ``SALT_layers_please_work.py``) applies
``F.relu`` elementwise to the whole modified ``n×n`` core ``diag(α⊙σ_k+β) ⊕ (Σ_{>k} + XY)``,
so negative entries of the non-diagonal ``Σ_{>k} + XY`` block are zeroed too.  That is an
entrywise clamp, not a singular-value operation, and would need the dense ``(n−k)²`` core in
the forward; it is not adopted (with ``X = 0`` at init both give ``W' = W`` exactly).

Regulariser: :meth:`SALTLinear.regularizer` / :func:`~lowrank_ops.adapters.salt_regularizer`
(from the authors' code).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..spectral_common import SpectralLinear, resolve_rank, thin_svd


class SALTLinear(SpectralLinear):
    """Trainable ``salt_alpha``, ``salt_beta`` (k,) and ``salt_X (n−k, ρ)``, ``salt_Y (ρ, n−k)``."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_r: int = 4, relu: bool = True, seed: int = 0,
                 save_bases: bool = True) -> None:
        super().__init__(base_layer)
        n = min(self.in_features, self.out_features)
        k = resolve_rank("SALT", r, n, allow_full=False)
        if not isinstance(lora_r, int) or lora_r < 0:
            raise ValueError(f"SALT: lora_r must be an int >= 0, got {lora_r!r}")
        res = n - k
        rho = min(lora_r, res)
        self.r, self.lora_r, self.relu = k, rho, relu
        U, S, Vh = thin_svd(base_layer.weight)
        self._basis("salt_U", U, save_bases)
        self._basis("salt_Vh", Vh, save_bases)
        self._basis("salt_sigma", S[:k], save_bases)
        self.salt_alpha = self._param(torch.ones(k))
        self.salt_beta = self._param(torch.zeros(k))
        if rho > 0:
            g = torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(res)
            self.salt_X = self._param(torch.zeros(res, rho))
            self.salt_Y = self._param(torch.empty(rho, res).uniform_(-bound, bound, generator=g))
        else:
            self.salt_X = self.salt_Y = None

    def singular_values(self):
        """The adapted top-k singular values ``ReLU(α ⊙ σ + β)``."""
        s = self.salt_alpha * self.salt_sigma + self.salt_beta
        return torch.relu(s) if self.relu else s

    def factors(self):
        k = self.r
        d = self.singular_values() - self.salt_sigma
        if self.salt_X is None:
            return self.salt_Vh[:k], self.salt_U[:, :k], d, 1.0
        down = torch.cat([self.salt_Vh[:k], self.salt_Y @ self.salt_Vh[k:]], dim=0)
        up = torch.cat([self.salt_U[:, :k], self.salt_U[:, k:] @ self.salt_X], dim=1)
        core = torch.cat([d, d.new_ones(self.lora_r)])
        return down, up, core, 1.0

    def regularizer(self) -> torch.Tensor:
        """``‖diag(α⊙σ_k + β) − diag(σ_k)‖_F + ‖XY‖_F`` in fp32 or wider; 0 at init.

        This is the per-layer ``reg_loss`` of the authors' code (``SALTLinear.forward``:
        ``torch.norm(scale_shift_term) + torch.norm(X @ Y)``, the scale/shift term taken before
        the ReLU); the paper text available to us states no regulariser, so the official code is
        followed.  ``‖XY‖_F`` is computed as ``sqrt(Σ (XᵀX) ⊙ (YYᵀ))`` from ``ρ×ρ`` Gram
        matrices, without forming the ``(n−k)²`` product, with a zero (sub)gradient at ``XY = 0``.
        """
        dt = torch.promote_types(self.salt_alpha.dtype, torch.float32)
        sigma = self.salt_sigma.to(dt)
        shift = (self.salt_alpha.to(dt) * sigma + self.salt_beta.to(dt)) - sigma
        reg = torch.linalg.vector_norm(shift)
        if self.salt_X is not None:
            x, y = self.salt_X.to(dt), self.salt_Y.to(dt)
            sq = ((x.T @ x) * (y @ y.T)).sum().clamp_min(0)
            pos = sq > 0
            reg = reg + torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))
        return reg

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_r={self.lora_r}"
