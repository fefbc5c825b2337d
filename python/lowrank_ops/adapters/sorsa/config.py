"""SORSA config and the model-wide regulariser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import SORSALinear


@dataclass
class SORSA(SpectralConfigMixin, AdapterConfig):
    """SORSA — Cao & Song 2024, "SORSA: Singular Values and Orthonormal Regularized Singular
    Vectors Adaptation of Large Language Models", https://arxiv.org/abs/2409.00055, method section:
    ``W = W_r + U_p Σ_p V_pᵀ`` with trainable ``U_p, Σ_p, V_p``, the orthonormal regulariser
    ``L_reg = ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F`` and the update rule
    ``W_p ← W_p − η_t∇L_train − γ_t∇L_reg`` (apply it with :func:`sorsa_regularizer`).

    Attributes:
        r: number of principal singular triplets made trainable.
        gamma: the regulariser step γ of the update rule, default ``4e-4`` (the authors' value:
            ``scripts/train_sorsa.sh`` and the ``sorsa`` package README, with learning rate
            ``3e-5``).  It is *not* a loss weight: :func:`sorsa_regularizer` with ``lr=`` turns
            it into the loss weight ``γ/lr``.
    """

    r: int = 8
    gamma: float = 4e-4

    peft_type: ClassVar[str] = "SORSA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2409.00055"
    init_only_fields: ClassVar[frozenset] = frozenset({"gamma"})

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return SORSALinear(base_layer, self.r)


def sorsa_regularizer(model: nn.Module, lr: Optional[float] = None, gamma: Optional[float] = None) -> Tensor:
    """SORSA's orthonormal regulariser over every SORSA layer of ``model``.

    ``L_reg`` is the mean of ``‖U_pᵀU_p − I‖_F`` and ``‖V_pᵀV_p − I‖_F`` over all ``2·n_layers``
    singular-vector matrices: the paper (Cao & Song 2024, arXiv:2409.00055, method section)
    writes ``L_reg = ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F`` per adapter with plain (not squared)
    Frobenius norms and states no aggregation over layers; the authors' ``calc_ortho``
    (``sorsalib``) sums the norms of all ``sorsa_A`` / ``sorsa_B`` matrices and divides by their
    count, which is what γ = 4e-4 was tuned with, so that is followed here.

    Weighting (paper's update rule ``W_p ← W_p − η_t∇L_train − γ_t∇L_reg``):

    * ``lr=None`` (and ``gamma=None``): the unweighted ``L_reg`` (for logging or custom use).
    * ``lr=η`` (the optimizer's *base* learning rate, before any schedule): returns
      ``(γ/η)·L_reg`` with ``γ = gamma`` or the injected config's ``gamma`` (default 4e-4).
      Backpropagating it together with the task loss gives, for plain SGD at scheduled rate
      ``η_t``, exactly ``W_p ← W_p − η_t∇L_train − γ(η_t/η)∇L_reg``: the paper's rule with
      ``γ_t`` following the learning-rate schedule.  This is what the authors' ``SORSATrainer``
      does (``self.args.gamma / self.args.learning_rate`` times ``calc_ortho(model)``, backward
      once per optimizer step).

    For exact parity with that trainer: call it once per optimizer step (not once per
    gradient-accumulation micro-batch), and backward it after gradient clipping and right
    before ``optimizer.step()`` (the authors add its gradient after ``clip_grad_norm_``).
    With Adam-type optimizers the step is not literally ``γ∇L_reg`` — the same holds for the
    authors' trainer.
    """
    terms = [m.orthogonal_regularizer() for m in model.modules() if isinstance(m, SORSALinear)]
    if not terms:
        raise ValueError("sorsa_regularizer: the model has no SORSA layers")
    reg = torch.stack(terms).sum() / (2 * len(terms))
    if lr is None:
        if gamma is not None:
            raise ValueError("sorsa_regularizer: gamma is a step size, not a loss weight; pass lr= as well "
                             "(the loss weight is gamma/lr)")
        return reg
    if not lr > 0:
        raise ValueError(f"sorsa_regularizer: lr must be > 0, got {lr!r}")
    if gamma is None:
        cfg = getattr(model, "_lowrank_ops_adapter", {}).get("config")
        gamma = cfg.gamma if isinstance(cfg, SORSA) else SORSA.gamma
    return (gamma / lr) * reg
