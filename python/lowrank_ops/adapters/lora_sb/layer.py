"""LoRA-SB layer and its gradient-based initialisation.

Ponkshe et al. 2024, "Initialization using Update Approximation is a Silver Bullet for
Extremely Efficient Low-Rank Fine-Tuning", https://arxiv.org/abs/2411.19557:

* architecture (LoRA-XS): ``y = W·x + b + s·B·R·A·x`` with ``B (out, r)``, ``A (r, in)``
  frozen and only ``R (r, r)`` trained — one ``lowrank_linear`` call with an ``(r, r)`` core;
* initialisation (§4, "update approximation"): estimate the first full fine-tuning update
  ``ΔW = −η·G`` (SGD) or ``−η·sign(G)`` (Adam's first step; the authors' code) from the
  gradient ``G = ∂L/∂W`` averaged over a few batches, take its truncated SVD
  ``U_r·S_r·V_rᵀ`` and set ``B = U_r``, ``A = V_rᵀ``, ``R = S_r / s``, so that the adapter
  starts at the best rank-``r`` approximation of that update (Eckart–Young) and, with
  orthonormal ``B``, ``A``, every later step moves ``ΔW`` by the projection
  ``B·Bᵀ·(−η s² G)·Aᵀ·A`` of the full gradient step onto the fixed subspaces.

Verified against the authors' repository (github.com/RaghavSinghal10/lora-sb): the gradient
estimate (``utils/gradient_utils.py``: summed per-sample gradients, then ``−lr·sign``) and
``alpha = r``; their ``lr`` there is the first warm-up step's, ``lr / (warmup_ratio · steps)``.
The split of the SVD into ``B``, ``R``, ``A`` above is our reading of the paper's §4 (their
``initialization_utils.py`` was not available to check).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ... import linalg, ops
from ...nn import AdapterLinear, Factor


class LoRASBLinear(AdapterLinear):
    """``y = W·x + b + s·B·R·A·x``; ``lora_A``, ``lora_B`` frozen, ``lora_core`` (``R``) trainable.

    Before :func:`lora_sb_init`, ``R = 0`` (the layer is the identity on the base) and
    ``A``, ``B`` are random orthonormal placeholders.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: Optional[float] = None) -> None:
        super().__init__(base_layer)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRASBLinear: rank r must be an int >= 1, got {r!r}")
        limit = min(self.out_features, self.in_features)
        if r > limit:  # B (out, r) and A (r, in) cannot have orthonormal columns / rows
            raise ValueError(f"LoRASBLinear: rank r={r} exceeds min(out, in)={limit} of the weight "
                             f"({self.out_features}, {self.in_features})")
        w = base_layer.weight
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        self.lora_A = Factor(r, self.in_features, dtype=w.dtype, device=w.device)
        self.lora_B = Factor(self.out_features, r, dtype=w.dtype, device=w.device)
        self.lora_core = Factor(r, r, dtype=w.dtype, device=w.device)
        with torch.no_grad():  # QR in fp32: CPU LAPACK has no bf16/fp16 geqrf
            for f in (self.lora_A.weight, self.lora_B.weight):
                f.copy_(nn.init.orthogonal_(torch.empty(f.shape, dtype=torch.float32, device=f.device)))
        self.lora_A.weight.requires_grad_(False)
        self.lora_B.weight.requires_grad_(False)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_core.weight @ self.lora_A.weight)

    def _adapter_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        return ops.lowrank_linear(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight,
                                  self.lora_core.weight, self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


def lora_sb_init(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[nn.Module, object], Tensor],
    lr: float = 1e-3,
    update: str = "adam",
    n_iter: Optional[int] = 4,
    max_batches: Optional[int] = None,
) -> dict[str, Tensor]:
    """Initialise every :class:`LoRASBLinear` of ``model`` from the estimated first full-FT update.

    Args:
        model: after ``adapters.inject(model, adapters.LoRASB(r=...), target=...)``.
        data: batches; ``loss_fn(model, batch)`` returns the scalar loss of one batch.
        lr: ``η`` of the simulated first step.
        update: ``"adam"`` → ``ΔW = −η·sign(Ḡ)`` (Adam's first step, as the authors' code);
            ``"sgd"`` → ``ΔW = −η·Ḡ``; ``Ḡ`` is the gradient averaged over the batches.
        n_iter: ``linalg.rsvd`` power iterations, or ``None`` for an exact SVD.
        max_batches: use at most this many batches.

    Returns:
        ``{module name: ΔW}``, the estimated full update of each layer (for inspection; fp32, fp64 for fp64 weights).
    """
    from ..inject import adapter_layers

    if update not in ("adam", "sgd"):
        raise ValueError(f"lora_sb_init: update must be 'adam' or 'sgd', got {update!r}")
    layers = {n: l for n, l in adapter_layers(model) if isinstance(l, LoRASBLinear)}
    if not layers:
        raise ValueError("lora_sb_init: the model has no LoRA-SB layers; inject adapters.LoRASB(...) first")
    # fp32 accumulation (fp64 for fp64 weights)
    grads = {n: torch.zeros(l.out_features, l.in_features, device=l.base_layer.weight.device,
                            dtype=torch.float64 if l.base_layer.weight.dtype == torch.float64 else torch.float32)
             for n, l in layers.items()}
    weights = {n: l.base_layer.weight for n, l in layers.items()}
    batches = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for step, batch in enumerate(data):
            if max_batches is not None and step >= max_batches:
                break
            loss = loss_fn(model, batch)
            loss.backward()
            for n, w in weights.items():
                if w.grad is not None:
                    grads[n] += w.grad.to(grads[n].dtype)
                    w.grad = None
            batches += 1
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        for l in layers.values():
            l.lora_core.weight.grad = None
    if batches == 0:
        raise ValueError("lora_sb_init: data yielded no batch")
    updates = {}
    with torch.no_grad():
        for n, l in layers.items():
            G = grads[n] / batches
            dW = -lr * (torch.sign(G) if update == "adam" else G)
            if n_iter is None:
                U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
                U, S, Vh = U[:, :l.r], S[:l.r], Vh[:l.r]
            else:
                U, S, Vh = linalg.rsvd(dW, l.r, n_iter=n_iter)
            dt = l.base_layer.weight.dtype
            l.lora_B.weight.copy_(U.to(dt))
            l.lora_A.weight.copy_(Vh.to(dt))
            l.lora_core.weight.copy_(torch.diag(S / l.scaling).to(dt))
            updates[n] = dW
    return updates

