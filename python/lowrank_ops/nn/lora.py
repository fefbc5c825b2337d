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

    Under ``torch.autocast`` the layer behaves like ``nn.Linear``: the fused op
    runs on the input and parameters cast to the autocast dtype, the output is in
    that dtype, and fp32 parameters get fp32 gradients (``lowrank_ops.ops``).
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
    both the output and the norm.

    Caches.  ``‖W₀‖²`` per row is cached (``W₀`` is frozen), and in eager
    inference (``eval()`` + no grad) so is ``m/n``, so a decode step costs one
    ``lowrank_linear`` call.  Both are keyed on the version counter and storage
    of the tensors they depend on, which every ordinary update changes
    (optimizer steps, in-place ops on the parameters, ``load_state_dict``,
    replacing a parameter), and both are refreshed on every ``train()`` /
    ``eval()`` switch, after ``load_state_dict`` and by ``merge``/``unmerge``.
    An in-place edit through ``.data`` (``p.data.mul_(…)``) bumps no version
    counter, and neither does an in-place edit inside compiled code: after
    such an edit made without a mode switch, call :meth:`refresh_weight_norm`,
    which refreshes both caches.  (Forward never re-reads ``W₀`` just to check:
    that would cost a pass over the weight per step.)

    Under ``torch.autocast`` the layer computes like ``nn.Linear``: the input and
    parameters enter the fused ops in the autocast dtype (the norm keeps fp32
    accumulation and the fp32 ``‖W₀‖²`` cache), the output is in the autocast
    dtype and fp32 parameters receive fp32 gradients; see ``lowrank_ops.ops``.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default") -> None:
        super().__init__(base_layer, r, alpha, dropout, use_rslora, init)
        w = base_layer.weight
        self.register_buffer("weight_norm_sq", torch.empty(self.out_features, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device), persistent=False)
        self._wn_key = None
        self.refresh_weight_norm()
        with torch.no_grad():
            m = ops.dora_norm(w, self.lora_A.weight, self.lora_B.weight, self.scaling, self.weight_norm_sq)
        self.lora_magnitude_vector = nn.Parameter(m.to(w.dtype))
        self.register_load_state_dict_post_hook(_dora_after_load)

    @torch.no_grad()
    def refresh_weight_norm(self) -> None:
        """Recompute the cached ``‖W₀‖²`` rows (one pass over ``W₀``) and drop the cached eval ``m/n``.

        Needed only after an in-place edit that bypasses version counters (through
        ``.data``, or inside compiled code) made without a ``train()``/``eval()``
        switch; every other change is picked up automatically.
        """
        w = self.base_layer.weight
        self.weight_norm_sq.copy_(torch.linalg.vector_norm(w, dim=1, dtype=self.weight_norm_sq.dtype).square())
        self._wn_key = _tensor_key(w)
        self.__dict__.pop("_eval_factor", None)

    def train(self, mode: bool = True) -> "DoRALinear":
        # A mode switch is the natural point after edits made through ``.data``
        # (init code, surgery between training and evaluation): both caches are
        # rebuilt there.  ``‖W₀‖²`` costs a pass over W, so it is recomputed only
        # when the mode actually changes (training loops often call train() every
        # step); dropping the eval factor is free and happens on every call.
        switching = bool(mode) != self.training
        super().train(mode)
        if switching:
            self.refresh_weight_norm()
        else:
            self.__dict__.pop("_eval_factor", None)
        return self

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
        if not torch.compiler.is_compiling():
            key = _tensor_key(base)
            if key is None or key != self._wn_key:
                self.refresh_weight_norm()
        return self.weight_norm_sq  # fp32 for low-precision weights: the kernels read it in fp32 accumulation

    def _adapter_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        a, b, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        if not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Eager inference: m/n is constant until a parameter changes, so it is
            # cached (keyed on version counters and storage) and each call reads W once.
            key = tuple(_tensor_key(t) for t in (base.weight, a, b, m))
            cached = self.__dict__.get("_eval_factor")
            if cached is None or cached[0] != key or None in key:
                # m.dtype: under autocast the fp32-policy norm would otherwise give
                # an fp32 factor that a later call without autocast could not use.
                cached = (key, (m / self._norm()).to(m.dtype))
                self.__dict__["_eval_factor"] = cached
            return ops.lowrank_linear(x, base.weight, base.bias, a, b, None, self.scaling, cached[1])
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # one pass over W for both the output and the norm's W·Aᵀ
            y = ops.dora_linear(x, base.weight, base.bias, a, b, m, self.scaling, self._wn2())[0]
            return y
        # Dropout changes the adapter's input only: z = W·x + s·B·A·dropout(x).
        factor = m / self._norm()
        z = F.linear(x, base.weight) + ops.lowrank_linear(self.lora_dropout(x), None, None, a, b, None, self.scaling)
        # z is in the autocast dtype under autocast (else the parameters'); keep
        # the output there, as nn.Linear does, instead of promoting to fp32.
        y = z * factor.to(z.dtype)
        return y if base.bias is None else y + base.bias.to(y.dtype)


def _tensor_key(t: Tensor):
    """``(version, data pointer)`` of ``t``: changes with every in-place update
    seen by autograd and with every new storage; None when ``t`` has no storage
    (functorch wrappers, fake tensors), where a cache cannot be trusted."""
    try:
        return t._version, t.data_ptr()
    except RuntimeError:
        return None


def _dora_after_load(module: "DoRALinear", incompatible_keys) -> None:
    # load_state_dict(assign=True) installs new tensors whose (fresh) version
    # counters can collide with the cached key; refresh unconditionally.
    module.refresh_weight_norm()
