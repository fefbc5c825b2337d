"""LaMDA layer: Azizi, Kundu & Pedram 2024, "LaMDA: Large Model Fine-Tuning via Spectrally
Decomposed Low-Dimensional Adaptation", https://arxiv.org/abs/2406.12832 (EMNLP 2024 Findings).

Forward (paper, method section, written for row inputs ``Y = XW + α·XASB``): frozen first
projection ``A`` (PMA), trainable low-dimensional square adapter ``S`` (LDA, ``r × r``),
second projection ``B`` (PMB).  In our ``(out, in)`` weight convention that is
``y = W x + α·B S A x`` with ``lamda_A (r, in)``, ``lamda_S (r, r)``, ``lamda_B (out, r)``;
one ``lowrank_linear`` call, scale ``α`` (config ``alpha``, default 1).

Sources, in the order the project rule asks for.  The paper body (method section) could
not be read in this environment; what is used from the *paper* is its abstract and the
Figure 1 caption ("At the beginning, PMB is trainable and gradually freezes based on the
singular values.  After t_i iterations, PMB is completely frozen, and only the LDA is
fine-tuned"), and the forward ``Y = XW + α·XASB`` as quoted from the method section by
third-party summaries.  Where those are silent the official code
(github.com/ArminAzizi98/LaMDA, ``lamda.py`` and ``Trainer.gradual_freeze_B`` in
``custom_trainer.py``) was read for facts:

* PMB freezing: the official trainer zeroes the gradient of the first ``t`` columns of
  PMB (index order — largest singular value first for an SVD-ordered PMB) with ``t = ⌊step / (η·T)⌋``,
  ``η = 0.3``, ``T`` = total steps, and sets ``requires_grad=False`` once ``t ≥ r``.  We keep
  its order (largest singular value first; ``freeze_order="smallest_first"`` reverses it)
  and the paper's end point: component ``j`` (0-based, in freeze order) freezes at step
  ``t_j = ⌈(j+1)·t_i / r⌉``, so all of PMB is frozen after ``t_i`` steps (config
  ``freeze_steps``).  The official spacing (one column every ``η·T`` steps) never freezes
  more than ``⌊1/η⌋`` columns within a run for ``r > 1/η``, contradicting "completely
  frozen"; linear spacing up to ``t_i`` is our reading of the caption.
* Masking (ours): a frozen component is served from a snapshot, ``B_eff = where(frozen,
  lamda_B_frozen, lamda_B)`` (buffers ``lamda_B_frozen (out, r)`` and ``lamda_B_mask (r,)``,
  saved with the adapter), so its column gets an exactly zero gradient and — whatever the
  optimizer does to the stale column of the ``lamda_B`` parameter (AdamW weight decay,
  momentum) — the *effective* PMB column is bit-for-bit constant from the step it froze.
  No hooks, one graph: works under ``torch.compile(fullgraph=True)``; the mask changes
  values in place (no recompile), only the final "all frozen" step flips
  ``lamda_B.requires_grad`` (one recompile) so the optimizer stops touching it.  The
  official code only zeroes ``.grad``, which AdamW's momentum and weight decay still move.
* Initialisation: "svd" (default) takes ``A = V_rᵀ``, ``B = U_r`` from the SVD of ``W``
  ("LaMDA initializes projection matrices with singular vectors from pre-trained weights",
  summaries of the method section), ``S = Σ_r / α`` and the residual base
  ``W − U_r Σ_r V_rᵀ`` (PiSSA-style split; the layer is unchanged at init).  Whether the
  paper sets ``S = Σ_r`` on a residual base or ``S = 0`` on the whole ``W`` could not be
  verified from the paper text; the official code does neither (its ``A``, ``B`` come from
  peft's LoRA or LoftQ initialisation, ``S`` from the ``nn.Linear`` default init, scale
  ``lora_alpha / r``; ``α`` is that scale).  ``init="zero"``
  keeps ``W``, draws ``A`` with orthonormal rows and ``B`` Kaiming-uniform (seeded) and
  starts ``S = 0`` — also the identity at init.
LaMDA++'s per-layer rank allocation is not included.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..spectral_common import SpectralLinear, resolve_rank, thin_svd

INITS = ("svd", "zero")
FREEZE_ORDERS = ("largest_first", "smallest_first")


def freeze_schedule(r: int, freeze_steps: int, step: int) -> int:
    """Number of PMB components frozen before optimizer step ``step`` (0-based: the
    number of steps already taken): component ``j`` freezes at ``⌈(j+1)·freeze_steps / r⌉``,
    so none is frozen at step 0 (unless ``freeze_steps == 0``) and all ``r`` are from step
    ``freeze_steps`` on (the paper's ``t_i``, Figure 1)."""
    if freeze_steps < 0 or step < 0:
        raise ValueError(f"LaMDA: freeze_steps and step must be >= 0, got {freeze_steps}, {step}")
    if step >= freeze_steps:
        return r
    # largest j with ceil((j+1)·T/r) <= step  <=>  (j+1)·T <= step·r
    return min(r, (step * r) // freeze_steps)


class LaMDALinear(SpectralLinear):
    """Frozen ``lamda_A (r, in)``; trainable ``lamda_S (r, r)`` and ``lamda_B (out, r)``, whose
    columns freeze one by one (:meth:`freeze_components`)."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, init: str = "svd", seed: int = 0,
                 save_bases: bool = True, alpha: float = 1.0, freeze_steps: Optional[int] = None,
                 freeze_order: str = "largest_first") -> None:
        super().__init__(base_layer)
        if init not in INITS:
            raise ValueError(f"LaMDA: init must be one of {INITS}, got {init!r}")
        if freeze_order not in FREEZE_ORDERS:
            raise ValueError(f"LaMDA: freeze_order must be one of {FREEZE_ORDERS}, got {freeze_order!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha == 0:
            raise ValueError(f"LaMDA: alpha must be a finite non-zero number, got {alpha!r}")
        if freeze_steps is not None and (not isinstance(freeze_steps, int) or isinstance(freeze_steps, bool)
                                         or freeze_steps < 0):
            raise ValueError(f"LaMDA: freeze_steps must be None or an int >= 0, got {freeze_steps!r}")
        r = resolve_rank("LaMDA", r, min(self.in_features, self.out_features), allow_full=False)
        self.r, self.init, self.alpha = r, init, float(alpha)
        self.freeze_steps, self.freeze_order = freeze_steps, freeze_order
        if init == "svd":
            U, S, Vh = thin_svd(base_layer.weight)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
            a, s, b = Vh, torch.diag(S / self.alpha), U
            self._set_base(base_layer.weight.to(U.dtype) - (U * S) @ Vh)
        else:
            g = torch.Generator().manual_seed(seed)
            a = torch.linalg.qr(torch.randn(self.in_features, r, generator=g)).Q.T
            bound = 1.0 / math.sqrt(r)
            b = torch.empty(self.out_features, r).uniform_(-bound, bound, generator=g)
            s = torch.zeros(r, r)
        self._basis("lamda_A", a, save_bases)
        self.lamda_S = self._param(s)
        self.lamda_B = self._param(b)
        # frozen PMB columns are read from this snapshot (see the module docstring)
        self._basis("lamda_B_frozen", b, True)
        self.register_buffer("lamda_B_mask", torch.zeros(r, dtype=torch.bool, device=base_layer.weight.device))

    # -- PMB freezing ------------------------------------------------------------
    def freeze_order_indices(self) -> Tensor:
        """PMB column indices in freezing order (columns are in descending singular-value
        order for ``init="svd"``, index order for ``init="zero"``)."""
        idx = torch.arange(self.r)
        return idx if self.freeze_order == "largest_first" else idx.flip(0)

    @property
    def num_frozen(self) -> int:
        return int(self.lamda_B_mask.sum())

    @torch.no_grad()
    def freeze_components(self, n: int) -> None:
        """Freeze the first ``n`` PMB components in freezing order (monotone: never unfreezes).
        Newly frozen columns are snapshotted from ``lamda_B`` as it is now; once all ``r``
        are frozen ``lamda_B.requires_grad`` is turned off (only the LDA trains)."""
        n = max(0, min(int(n), self.r))
        cols = self.freeze_order_indices()[:n].to(self.lamda_B_mask.device)
        new = cols[~self.lamda_B_mask[cols]]
        if new.numel():
            self.lamda_B_frozen[:, new] = self.lamda_B[:, new].to(self.lamda_B_frozen.dtype)
            self.lamda_B_mask[new] = True
        if bool(self.lamda_B_mask.all()):
            self.lamda_B.requires_grad_(False)

    def freeze_step(self, step: int, freeze_steps: Optional[int] = None) -> int:
        """Apply the schedule for optimizer step ``step``; returns the number of frozen components."""
        t = self.freeze_steps if freeze_steps is None else freeze_steps
        if t is None:
            raise ValueError("LaMDA: no freeze schedule: set LaMDA(freeze_steps=...) or pass freeze_steps")
        self.freeze_components(freeze_schedule(self.r, t, step))
        return self.num_frozen

    def freeze_projection_b(self) -> None:
        """Freeze all of PMB now (the end state of the schedule)."""
        self.freeze_components(self.r)

    def effective_b(self) -> Tensor:
        """PMB as the forward uses it: frozen columns from the snapshot, the rest trainable."""
        return torch.where(self.lamda_B_mask, self.lamda_B_frozen, self.lamda_B)

    def factors(self):
        return self.lamda_A, self.effective_b(), self.lamda_S, self.alpha

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, init={self.init}, alpha={self.alpha}, "
                f"freeze_steps={self.freeze_steps}")
