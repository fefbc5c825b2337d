"""VeRA layer: Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation",
arXiv:2310.11454, Eq. (1): ``h = W₀x + Λ_b·B·Λ_d·A·x`` with frozen random
``A (r, in)``, ``B (out, r)`` shared by all layers and trainable vectors
``λ_d (r)``, ``λ_b (out)``.  One ``lowrank_linear`` call: ``λ_d`` is the
diagonal core, ``λ_b`` is folded into ``up`` (an (out, r) product).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import AdapterLinear


def vera_projections(r: int, in_max: int, out_max: int, seed: int, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """The shared frozen ``A (r, in_max)`` and ``B (out_max, r)``.

    Kaiming-uniform with gain √2 over each matrix's fan-in, drawn from a CPU
    ``torch.Generator`` seeded with ``seed`` — A first, then B — which is the
    layout and stream peft regenerates from ``projection_prng_key``, so
    adapters saved without projections still agree across libraries.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def draw(rows: int, cols: int) -> Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
        return torch.empty(rows, cols).uniform_(-bound, bound, generator=gen)

    a = draw(r, in_max)
    b = draw(out_max, r)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


class VeRALinear(AdapterLinear):
    """``y = W₀x + b + λ_b ⊙ (B·(λ_d ⊙ (A·dropout(x))))``.

    ``vera_A`` / ``vera_B`` are the shared projections (sliced to this layer's
    ``in``/``out``); they are non-persistent buffers here and saved once per
    model by ``adapters.save_pretrained``.  ``vera_lambda_b`` starts at zero
    (identity at init) and ``vera_lambda_d`` at ``d_initial``.

    Under ``torch.autocast`` the layer behaves like ``nn.Linear``: the fused op
    runs on the input and (λ-scaled) factors cast to the autocast dtype, the
    output is in that dtype, and the fp32 λ vectors get fp32 gradients.
    """

    def __init__(self, base_layer: nn.Linear, vera_A: Tensor, vera_B: Tensor, d_initial: float = 0.1,
                 dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        r = vera_A.shape[0]
        if vera_A.shape[1] < self.in_features or vera_B.shape[0] < self.out_features or vera_B.shape[1] != r:
            raise ValueError(
                f"VeRALinear: shared projections vera_A {tuple(vera_A.shape)} / vera_B {tuple(vera_B.shape)} are too "
                f"small for a ({self.out_features}, {self.in_features}) layer")
        w = base_layer.weight
        self.r = r
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=w.dtype, device=w.device))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), dtype=w.dtype, device=w.device))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _factors(self) -> tuple[Tensor, Tensor]:
        dt = self.base_layer.weight.dtype
        down = self.vera_A[:, : self.in_features].to(dt)
        up = self.vera_B[: self.out_features, :].to(dt) * self.vera_lambda_b.unsqueeze(1)
        return down, up

    def delta_weight(self) -> Tensor:
        down, up = self._factors()
        return (up * self.vera_lambda_d) @ down

    def _adapter_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        down, up = self._factors()
        if isinstance(self.vera_dropout, nn.Identity) or not self.training:
            return ops.lowrank_linear(x, base.weight, base.bias, down, up, self.vera_lambda_d, 1.0)
        y = F.linear(x, base.weight, base.bias)
        return y + ops.lowrank_linear(self.vera_dropout(x), None, None, down, up, self.vera_lambda_d, 1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
