"""The adapter-layer contract shared by every method.

An adapter layer wraps a frozen ``nn.Linear`` (kept as ``base_layer`` so the
wrapped model's state-dict keys read ``<path>.base_layer.weight`` as in peft)
and adds trainable parameters.  Every subclass implements ``delta_weight()``
(the dense ``ΔW`` it represents, used only for merging and tests) and
``forward``; ``merge()`` / ``unmerge()`` fold the delta in and out of the base
weight in place.  All numerics go through ``lowrank_ops.ops``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Factor(nn.Module):
    """Holds one adapter matrix as ``.weight`` (so keys read ``lora_A.weight``).

    Deliberately not an ``nn.Linear``: injection looks for ``nn.Linear`` modules,
    and an adapter's own factors must never be targeted again.
    """

    def __init__(self, rows: int, cols: int, *, dtype=None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


class AdapterLinear(nn.Module):
    """Base class of adapter layers over an ``nn.Linear``.

    Subclasses implement :meth:`delta_weight` and :meth:`_adapter_forward`;
    merging uses :meth:`_merge_into` / :meth:`_unmerge_from`, which default to
    adding / subtracting ``delta_weight()`` and may be overridden when the
    merge is not additive (DoRA).
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__}: base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.merged = False
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)

    # Models read ``module.weight`` / ``.bias`` of their linears directly (HF T5 checks
    # ``self.wo.weight.dtype``), as peft's tuner layers allow.  Read-only properties, not
    # registered tensors: the base layer's own entries are the only ones in state_dict()
    # and parameters(), so keys stay ``<path>.base_layer.weight`` and nothing is counted
    # twice.  Without merge() they are the *base* weight, not the adapted one.
    @property
    def weight(self) -> Tensor:
        """The base layer's weight (the adapted weight only after :meth:`merge`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    # -- contract -------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """Dense ``ΔW`` (out, in) such that the adapted weight is ``W + ΔW``."""
        raise NotImplementedError

    def _adapter_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return self._adapter_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` in place (idempotent)."""
        if self.merged:
            return
        self._merge_into(self.base_layer.weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to rounding in the weight's dtype)."""
        if not self.merged:
            return
        self._unmerge_from(self.base_layer.weight)
        self.merged = False

    def _merge_into(self, weight: Tensor) -> None:
        weight.add_(self.delta_weight().to(weight.dtype))

    def _unmerge_from(self, weight: Tensor) -> None:
        weight.sub_(self.delta_weight().to(weight.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"
