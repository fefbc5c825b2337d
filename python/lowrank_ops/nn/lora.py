"""LoRA and DoRA layers on the fused ``lowrank_linear`` / ``dora_norm`` ops.

* LoRA — Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
  arXiv:2106.09685, Eq. (3): ``h = W₀x + (α/r)·B·A·x``; rsLoRA scaling
  ``α/√r`` from Kalajdzievski, arXiv:2312.03732, Eq. (4).
* DoRA — Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation",
  arXiv:2402.09353, Eq. (5): ``W' = m · (W₀ + s·BA) / ‖W₀ + s·BA‖_c`` with the
  norm treated as a constant in backward (§4.3), as peft does; the norm comes
  from the factored identity of ``dora_norm`` and never forms ``BA``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import AdapterLinear, Factor


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(AdapterLinear):
    """``y = W₀x + b + s·B·A·dropout(x)`` with ``A = lora_A.weight (r, in)``, ``B = lora_B.weight (out, r)``.

    Args:
        base_layer: the frozen ``nn.Linear``.
        r: rank (1 ≤ r ≤ min(in, out) is not required, but r ≥ 1 is).
        alpha: LoRA alpha; ``s = alpha/r`` (``alpha/√r`` with ``use_rslora``).
        dropout: dropout on the adapter's input only.
        init: ``"default"`` (A Kaiming-uniform, B zero: identity at init, as peft),
            ``"gaussian"`` (A ~ N(0, 1/r²), B zero) or ``"random"`` (both random;
            for tests, like peft's ``init_lora_weights=False``).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__(base_layer)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"{type(self).__name__}: rank r must be an int >= 1, got {r!r}")
        w = base_layer.weight
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = Factor(r, self.in_features, dtype=w.dtype, device=w.device)
        self.lora_B = Factor(self.out_features, r, dtype=w.dtype, device=w.device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "default") -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        if init in ("default", True):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r)
            nn.init.zeros_(b)
        elif init in ("random", False):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            raise ValueError(f"{type(self).__name__}: unknown init {init!r} (expected 'default', 'gaussian' or 'random')")

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _merge_into(self, weight: Tensor) -> None:
        # W += s·B·A without a dense temporary beyond BLAS's own.
        weight.addmm_(self.lora_B.weight.to(weight.dtype), self.lora_A.weight.to(weight.dtype), alpha=self.scaling)

    def _unmerge_from(self, weight: Tensor) -> None:
        weight.addmm_(self.lora_B.weight.to(weight.dtype), self.lora_A.weight.to(weight.dtype), alpha=-self.scaling)

    def _adapter_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            return ops.lowrank_linear(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, None, self.scaling)
        # Dropout changes the adapter's input only, so the base GEMM sees x and
        # the adapter term (weight=None) sees dropout(x).
        y = F.linear(x, base.weight, base.bias)
        return y + ops.lowrank_linear(self.lora_dropout(x), None, None, self.lora_A.weight, self.lora_B.weight, None, self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class DoRALinear(LoRALinear):
    """DoRA: ``y = (m / ‖W₀ + s·BA‖_row) ⊙ (W₀x + s·B·A·x) + b``.

    ``lora_magnitude_vector`` (out,) starts at the row norms of ``W₀`` so the
    layer is the identity at init.  The norm is detached (paper §4.3, peft's
    default).  Forward is one ``dora_linear`` call, which reads ``W₀`` once for
    both the output and the norm; in eager inference (``eval()`` + no grad)
    ``m/n`` is cached until a parameter changes, so a decode step costs one
    ``lowrank_linear`` call.  ``‖W₀‖²`` per row is cached (``W₀`` is frozen); the cache is
    refreshed whenever the base weight's version counter changes (eager mode)
    and by ``merge``/``unmerge``; call
    :meth:`refresh_weight_norm` after editing the base weight in place inside
    compiled code.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default") -> None:
        super().__init__(base_layer, r, alpha, dropout, use_rslora, init)
        w = base_layer.weight
        self.register_buffer("weight_norm_sq", torch.empty(self.out_features, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device), persistent=False)
        self._wn_version = -1
        self.refresh_weight_norm()
        with torch.no_grad():
            m = ops.dora_norm(w, self.lora_A.weight, self.lora_B.weight, self.scaling, self.weight_norm_sq.to(w.dtype))
        self.lora_magnitude_vector = nn.Parameter(m.to(w.dtype))

    @torch.no_grad()
    def refresh_weight_norm(self) -> None:
        w = self.base_layer.weight
        self.weight_norm_sq.copy_(torch.linalg.vector_norm(w, dim=1, dtype=self.weight_norm_sq.dtype).square())
        self._wn_version = w._version

    def _norm(self) -> Tensor:
        with torch.no_grad():  # detached, DoRA §4.3
            return ops.dora_norm(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self._wn2())

    def delta_weight(self) -> Tensor:
        w = self.base_layer.weight
        scale = (self.lora_magnitude_vector / self._norm()).unsqueeze(1)
        return scale * (w + self.scaling * (self.lora_B.weight @ self.lora_A.weight)) - w

    def _merge_into(self, weight: Tensor) -> None:
        factor = self.lora_magnitude_vector / self._norm()
        weight.addmm_(self.lora_B.weight, self.lora_A.weight, alpha=self.scaling).mul_(factor.unsqueeze(1).to(weight.dtype))
        self._merge_factor = factor
        self.refresh_weight_norm()

    def _unmerge_from(self, weight: Tensor) -> None:
        weight.div_(self._merge_factor.unsqueeze(1).to(weight.dtype))
        weight.addmm_(self.lora_B.weight, self.lora_A.weight, alpha=-self.scaling)
        del self._merge_factor
        self.refresh_weight_norm()

    def _wn2(self) -> Tensor:
        base = self.base_layer.weight
        if not torch.compiler.is_compiling() and base._version != self._wn_version:
            self.refresh_weight_norm()
        return self.weight_norm_sq.to(base.dtype)

    def _adapter_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        a, b, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        if not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Eager inference: m/n is constant until a parameter changes, so it is
            # cached (keyed on version counters and storage) and each call reads W once.
            key = tuple((t._version, t.data_ptr()) for t in (base.weight, a, b, m))
            cached = self.__dict__.get("_eval_factor")
            if cached is None or cached[0] != key:
                cached = (key, m / self._norm())
                self.__dict__["_eval_factor"] = cached
            return ops.lowrank_linear(x, base.weight, base.bias, a, b, None, self.scaling, cached[1])
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # one pass over W for both the output and the norm's W·Aᵀ
            y = ops.dora_linear(x, base.weight, base.bias, a, b, m, self.scaling, self._wn2())[0]
            return y
        # Dropout changes the adapter's input only: z = W·x + s·B·A·dropout(x).
        factor = m / self._norm()
        z = F.linear(x, base.weight) + ops.lowrank_linear(self.lora_dropout(x), None, None, a, b, None, self.scaling)
        y = z * factor
        return y if base.bias is None else y + base.bias
