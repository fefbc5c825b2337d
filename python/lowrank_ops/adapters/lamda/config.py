"""LaMDA config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import nn

from ..config import AdapterConfig
from ..spectral_common import SpectralConfigMixin
from .layer import FREEZE_ORDERS, INITS, LaMDALinear, freeze_schedule


@dataclass
class LaMDA(SpectralConfigMixin, AdapterConfig):
    """LaMDA — Azizi et al. 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
    Low-Dimensional Adaptation", https://arxiv.org/abs/2406.12832, method section / Fig. 1:
    ``Y = XW + α·XASB`` with frozen PMA ``A``, trainable ``r × r`` LDA ``S`` and PMB ``B``,
    which "gradually freezes based on the singular values" and is "completely frozen after
    ``t_i`` iterations" (:func:`lamda_freeze_step`).  Sources and our choices where the
    paper text was not available: :mod:`lowrank_ops.adapters.lamda.layer`.

    Attributes:
        r: adapter rank.  init: ``"svd"`` (spectral split, base becomes the residual,
            ``S = Σ_r / α``) or ``"zero"`` (random projections, ``S = 0``).  seed: for ``"zero"``.
        save_bases: store the frozen ``A`` in the adapter file.
        alpha: the paper's scale ``α`` on the adapter path (default 1).
        freeze_steps: the paper's ``t_i``: optimizer steps after which PMB is entirely
            frozen; its ``r`` components freeze one by one before that, in singular-value
            order (``None``: no schedule; freeze by hand with :func:`lamda_freeze_projection_b`).
        freeze_order: ``"largest_first"`` (the official code's order) or ``"smallest_first"``.
    """

    r: int = 8
    init: str = "svd"
    seed: int = 0
    save_bases: bool = True
    alpha: float = 1.0
    freeze_steps: Optional[int] = None
    freeze_order: str = "largest_first"

    peft_type: ClassVar[str] = "LAMDA"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.12832"
    # the schedule only decides which columns train; the saved mask/snapshot carry its effect
    init_only_fields: ClassVar[frozenset] = frozenset({"freeze_steps", "freeze_order"})

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"LaMDA: init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha == 0:
            raise ValueError(f"LaMDA: alpha must be a non-zero number, got {self.alpha!r}")
        if self.freeze_order not in FREEZE_ORDERS:
            raise ValueError(f"LaMDA: freeze_order must be one of {FREEZE_ORDERS}, got {self.freeze_order!r}")
        if self.freeze_steps is not None and (not isinstance(self.freeze_steps, int)
                                              or isinstance(self.freeze_steps, bool) or self.freeze_steps < 0):
            raise ValueError(f"LaMDA: freeze_steps must be None or an int >= 0, got {self.freeze_steps!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        return LaMDALinear(base_layer, self.r, self.init, self.seed, self.save_bases, self.alpha,
                           self.freeze_steps, self.freeze_order)


def _lamda_layers(model: nn.Module) -> list[LaMDALinear]:
    layers = [m for m in model.modules() if isinstance(m, LaMDALinear)]
    if not layers:
        raise ValueError("no LaMDA layers in the model")
    return layers


def lamda_freeze_step(model: nn.Module, step: int, freeze_steps: Optional[int] = None) -> int:
    """Apply LaMDA's gradual PMB freezing for optimizer step ``step`` (0-based, the number of
    steps already taken) to every LaMDA layer of ``model``; call it before each step's
    forward.  ``freeze_steps`` overrides the config's ``t_i``.  Idempotent and monotone
    (calling it again, or with an earlier step, never unfreezes).  Returns the number of
    frozen PMB components per layer (the largest over layers).

    Guarantee: from the step a component is frozen, the PMB column the forward uses is
    exactly constant and gets a zero gradient, whatever the optimizer (momentum, weight
    decay) does to the corresponding column of the ``lamda_B`` parameter, which is then
    unused; after ``t_i`` steps ``lamda_B`` no longer requires grad and only ``lamda_S`` trains.
    """
    return max(layer.freeze_step(step, freeze_steps) for layer in _lamda_layers(model))


def lamda_freeze_projection_b(model: nn.Module) -> int:
    """Freeze all of PMB in every LaMDA layer of ``model`` now (the end state of
    :func:`lamda_freeze_step`); returns the number of layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, LaMDALinear):
            m.freeze_projection_b()
            n += 1
    return n


__all__ = ["LaMDA", "lamda_freeze_step", "lamda_freeze_projection_b", "freeze_schedule"]
