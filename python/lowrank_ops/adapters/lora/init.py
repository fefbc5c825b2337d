"""SVD- and data-driven LoRA initialisations (peft keeps its LoRA inits in one place too).

Each init only changes how a LoRA layer's factors — and, for PiSSA / MiLoRA /
OLoRA, its base weight — start; the layer stays a plain :class:`LoRALinear`
(``y = W·x + s·B·A·x``, ``A = lora_A.weight (r, in)``, ``B = lora_B.weight (out, r)``).
Each init is also a config of its own (``adapters.PiSSA(r=16, alpha=16)`` is
``LoRA`` with the PiSSA init) so ``adapters.inject`` applies it, and each saves
as peft's ``LoraConfig(init_lora_weights=...)`` writes it.

* **PiSSA** — Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
  Vectors Adaptation of Large Language Models", https://arxiv.org/abs/2404.02948,
  Eqs. (2)–(4): ``W = U·S·Vᵀ``; ``B = U_r·√(S_r/s)``, ``A = √(S_r/s)·V_rᵀ``,
  ``W_res = W − s·B·A`` (peft divides ``S`` by the scale ``s`` so ``s·B·A`` is
  exactly the principal part).  Exact path: full SVD; fast path: randomized SVD
  (``linalg.rsvd`` with ``n_iter`` power iterations, peft's ``pissa_niter_K``).
* **MiLoRA** — Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for
  Parameter-Efficient LLM Finetuning", https://arxiv.org/abs/2406.09044, Eq. (3)–(5):
  as PiSSA with the ``r`` *smallest* singular triplets; ``W_res`` keeps the principal part.
* **OLoRA** — Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large
  Language Models", https://arxiv.org/abs/2406.01775, §3: ``W = Q·R`` (thin
  Householder QR, no pivoting), ``B = Q[:, :r]`` (orthonormal columns),
  ``A = R[:r]``, ``W_res = W − s·B·A`` — peft's convention (``layer.py`` ``olora_init``:
  no division by ``s``).
* **EVA** — Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning
  via Explained Variance Adaptation", https://arxiv.org/abs/2410.07170, §3.1–3.2:
  incremental SVD of each target layer's input activations over minibatches until the
  top right-singular vectors converge (``|cos| ≥ τ`` between consecutive steps);
  ``A = V_rᵀ``, ``B = 0``; ranks redistributed across layers by explained variance
  under the global budget ``Σ r`` with at most ``round(ρ·r)`` per layer.
* **LoRA-SB** lives in ``adapters.lora_sb`` (it needs an ``r×r`` core, i.e. another layer type).

Numerics: every factorisation runs in fp32 (fp64 for fp64 weights); the factors
are rounded to the weight's dtype first and the residual is computed from the
*rounded* factors, so ``W_res + s·B·A == W`` holds to one rounding of ``W_res``
in the base dtype.  The factors at init are kept as non-persistent buffers
``lora_A_init`` / ``lora_B_init`` so ``save_pretrained(..., convert_to_lora=True)``
can write the trained adapter as an exact rank-``2r`` plain LoRA on the *original*
base (peft's ``path_initial_model_for_weight_conversion``).

Files: a PiSSA/MiLoRA/OLoRA adapter file holds only the factors; loading it (ours or peft)
re-runs the init on the ORIGINAL base weight to recreate the residual, then loads the
factors.  Our fast path is seeded (``linalg.rsvd(seed=...)``) so our loader reproduces the
residual; peft's ``pissa_niter_K`` re-draws its own random sketch, so for peft prefer the
exact path or ``convert_to_lora=True``.  ``adapters.unload`` leaves the residual in the base
(as peft); ``merge_and_unload`` gives the adapted weight.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ... import linalg
from ...linalg import allocate_ranks  # EVA §3.2 redistribution; re-exported for callers of this module
from ...nn import Factor, LoRALinear, lora_scaling
from .config import LoRA, patterns_from_peft_dict

__all__ = [
    "PiSSA", "MiLoRA", "OLoRA", "EVA",
    "pissa_init_", "milora_init_", "olora_init_", "eva_init", "allocate_ranks",
    "config_from_peft_dict",
]


# --------------------------------------------------------------------------- shared numerics


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rank(op: str, layer: LoRALinear, limit: int) -> None:
    if layer.r > limit:
        raise ValueError(f"{op}: rank r={layer.r} exceeds min(out, in)={limit} of the weight "
                         f"({layer.out_features}, {layer.in_features})")


@torch.no_grad()
def _set_factors_and_residual(layer: LoRALinear, up: Tensor, down: Tensor, W: Tensor) -> None:
    """Store ``B = up``, ``A = down`` (rounded to the layer dtype) and ``W_res = W − s·B·A``.

    ``W`` is the base weight in the compute dtype — the weight itself when that is its
    dtype, else a copy — and is consumed: the residual is accumulated into it in place
    (no ``out × in`` temporary: at 4096² a fresh residual plus the copy back cost ~25 ms
    of page faults and memory passes).  The residual is formed from the rounded factors
    so the identity is exact up to one rounding of ``W_res``.
    """
    w = layer.base_layer.weight
    a = down.to(w.dtype).contiguous()
    b = up.to(w.dtype).contiguous()
    layer.lora_A.weight.data = a
    layer.lora_B.weight.data = b
    W.addmm_(b.to(W.dtype), a.to(W.dtype), alpha=-layer.scaling)
    if W.data_ptr() != w.data_ptr():
        w.copy_(W)
    _remember_init(layer)


def _remember_init(layer: LoRALinear) -> None:
    # non-persistent: not in state_dict / the adapter file; used by convert_to_lora
    layer.register_buffer("lora_A_init", layer.lora_A.weight.detach().clone(), persistent=False)
    layer.register_buffer("lora_B_init", layer.lora_B.weight.detach().clone(), persistent=False)


def _svd_split(layer: LoRALinear, U: Tensor, S: Tensor, Vh: Tensor, W: Tensor) -> None:
    """``B = U·√(S/s)``, ``A = √(S/s)·Vh`` so that ``s·B·A = U·diag(S)·Vh`` (PiSSA Eq. 2–3, peft's scaling)."""
    root = (S / layer.scaling).clamp_min(0).sqrt()
    _set_factors_and_residual(layer, U * root, root.unsqueeze(1) * Vh, W)


@torch.no_grad()
def pissa_init_(layer: LoRALinear, n_iter: Optional[int] = None, oversample: int = 8, seed: int = 0) -> None:
    """PiSSA init of ``layer`` in place (Meng et al. 2024, Eqs. 2–4).

    Args:
        layer: a :class:`LoRALinear`; its base weight becomes the residual.
        n_iter: ``None`` → exact path (full ``torch.linalg.svd``, peft ``"pissa"``);
            an int → ``linalg.rsvd(W, r, oversample, n_iter, seed)`` (peft ``"pissa_niter_K"``,
            which uses ``torch.svd_lowrank`` with no oversampling).
    """
    W = layer.base_layer.weight.detach().to(_compute_dtype(layer.base_layer.weight.dtype))
    _check_rank("pissa_init_", layer, min(W.shape))
    if n_iter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :layer.r], S[:layer.r], Vh[:layer.r]
    else:
        U, S, Vh = linalg.rsvd(W, layer.r, oversample=oversample, n_iter=n_iter, seed=seed)
        U, S, Vh = U.to(W.dtype), S.to(W.dtype), Vh.to(W.dtype)
    _svd_split(layer, U, S, Vh, W)


@torch.no_grad()
def milora_init_(layer: LoRALinear) -> None:
    """MiLoRA init of ``layer`` in place (Wang et al. 2024, Eqs. 3–5): the ``r`` minor singular
    triplets go to ``B·A``; ``W_res`` keeps the principal ``min(out, in) − r``.  Exact SVD only
    (a randomized SVD finds the top of the spectrum, not its tail)."""
    W = layer.base_layer.weight.detach().to(_compute_dtype(layer.base_layer.weight.dtype))
    k = min(W.shape)
    _check_rank("milora_init_", layer, k)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    _svd_split(layer, U[:, k - layer.r:], S[k - layer.r:], Vh[k - layer.r:], W)


@torch.no_grad()
def olora_init_(layer: LoRALinear) -> None:
    """OLoRA init of ``layer`` in place (Büyükakyüz 2024, §3; peft's convention):
    ``W = Q·R``, ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]``, ``W_res = W − s·B·A``.

    Unpivoted Householder QR (``torch.linalg.qr``), as the paper and peft: a pivoted QR
    would permute ``A``'s columns and give a different (if equally valid) split.
    """
    W = layer.base_layer.weight.detach().to(_compute_dtype(layer.base_layer.weight.dtype))
    _check_rank("olora_init_", layer, min(W.shape))
    Q, R = torch.linalg.qr(W)
    _set_factors_and_residual(layer, Q[:, :layer.r], R[:layer.r], W)


# --------------------------------------------------------------------------- configs


@dataclass
class PiSSA(LoRA):
    """PiSSA — Meng et al. 2024, https://arxiv.org/abs/2404.02948: LoRA whose factors start
    at the principal singular triplets of ``W`` and whose base weight becomes the residual.

    Attributes (beyond :class:`LoRA`):
        n_iter: ``None`` → exact SVD (peft ``init_lora_weights="pissa"``); ``K`` →
            ``linalg.rsvd`` with ``K`` power iterations (peft ``"pissa_niter_K"``).
        oversample, seed: ``linalg.rsvd`` parameters of the fast path.
    """

    init: str = "pissa"
    n_iter: Optional[int] = None
    oversample: int = 8
    seed: int = 0

    paper: ClassVar[str] = "https://arxiv.org/abs/2404.02948"
    keeps_base: ClassVar[bool] = False  # the base becomes the residual

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_iter is not None and (not isinstance(self.n_iter, int) or self.n_iter < 0):
            raise ValueError(f"PiSSA: n_iter must be None (exact SVD) or an int >= 0, got {self.n_iter!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        layer = _plain_layer(self, base_layer, context)
        pissa_init_(layer, self.n_iter, self.oversample, self.seed)
        return layer

    def peft_init_value(self):
        return "pissa" if self.n_iter is None else f"pissa_niter_{self.n_iter}"


@dataclass
class MiLoRA(LoRA):
    """MiLoRA — Wang et al. 2024, https://arxiv.org/abs/2406.09044: LoRA on the minor singular
    triplets of ``W``.  peft has no MiLoRA: files carry ``init_lora_weights="milora"`` (our
    loader reads them; for peft, save with ``convert_to_lora=True``)."""

    init: str = "milora"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.09044"
    keeps_base: ClassVar[bool] = False  # the base becomes the residual

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        layer = _plain_layer(self, base_layer, context)
        milora_init_(layer)
        return layer

    def peft_init_value(self):
        return "milora"


@dataclass
class OLoRA(LoRA):
    """OLoRA — Büyükakyüz 2024, https://arxiv.org/abs/2406.01775: LoRA from the thin QR of ``W``
    (peft ``init_lora_weights="olora"``)."""

    init: str = "olora"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.01775"
    keeps_base: ClassVar[bool] = False  # the base becomes the residual

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        layer = _plain_layer(self, base_layer, context)
        olora_init_(layer)
        return layer

    def peft_init_value(self):
        return "olora"


@dataclass
class EVA(LoRA):
    """EVA — Paischer et al. 2024, https://arxiv.org/abs/2410.07170 (peft ``init_lora_weights="eva"``).

    ``inject`` creates plain LoRA layers (``B = 0``); :func:`eva_init` then sets ``A`` from the
    activations' right singular vectors and redistributes the ranks.

    Attributes (beyond :class:`LoRA`, as peft's ``EvaConfig``):
        rho: ≥ 1; a layer may receive up to ``round(rho·r)`` ranks (``rho = 1``: no redistribution).
        tau: convergence threshold on ``|cos|`` of each right singular vector between steps.
        whiten: divide ``A``'s rows by ``√σ`` (peft's option).
        adjust_scaling_factors: ``alpha ← alpha·r_new/r`` so ``s = alpha/r`` is unchanged.
        use_label_mask: with the default input preparation, also drop the token positions
            whose ``labels`` equal ``label_mask_value`` (positions with ``attention_mask == 0``
            are always dropped), as peft's ``prepare_model_inputs_fn_language_modeling``.
        label_mask_value: the ignored label (peft: ``-100``).
    """

    init: str = "eva"
    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    adjust_scaling_factors: bool = True
    use_label_mask: bool = True
    label_mask_value: int = -100

    paper: ClassVar[str] = "https://arxiv.org/abs/2410.07170"
    init_only_fields: ClassVar[frozenset] = frozenset({"init", "rho", "tau", "whiten", "adjust_scaling_factors",
                                                             "use_label_mask", "label_mask_value"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho >= 1.0:
            raise ValueError(f"EVA: rho must be >= 1, got {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EVA: tau must lie in [0, 1], got {self.tau!r}")

    def create_layer(self, base_layer: nn.Linear, context: dict) -> nn.Module:
        layer = _plain_layer(self, base_layer, context, init="default")
        return layer

    def peft_init_value(self):
        return "eva"

    def to_peft_dict(self, target_modules) -> dict:
        d = super().to_peft_dict(target_modules)
        d["eva_config"] = {"rho": self.rho, "tau": self.tau, "use_label_mask": self.use_label_mask,
                           "label_mask_value": self.label_mask_value,
                           "whiten": self.whiten, "adjust_scaling_factors": self.adjust_scaling_factors}
        return d


def _plain_layer(cfg: LoRA, base_layer: nn.Linear, context: dict, init: str = "random") -> LoRALinear:
    # "random" skips nothing costly (two small Kaiming fills) and is overwritten by the init
    r, alpha = cfg.rank_alpha(context.get("names", {}).get(id(base_layer)))
    return LoRALinear(base_layer, r=r, alpha=alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, init=init)


def config_from_peft_dict(d: dict) -> LoRA:
    """Config for a peft ``LoraConfig`` dict whose ``init_lora_weights`` is a string."""
    init = d.get("init_lora_weights")
    if d.get("use_dora"):
        raise NotImplementedError(f"load_pretrained: DoRA with init_lora_weights={init!r} is not supported")
    if d.get("fan_in_fan_out"):
        raise NotImplementedError("load_pretrained: fan_in_fan_out=True (Conv1D bases) is not supported")
    common = dict(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                  use_rslora=bool(d.get("use_rslora", False)), **patterns_from_peft_dict(d))
    if init == "pissa":
        return PiSSA(**common)
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        return PiSSA(**common, n_iter=int(init[len("pissa_niter_"):]))
    if init == "milora":
        return MiLoRA(**common)
    if init == "olora":
        return OLoRA(**common)
    if init == "eva":
        e = d.get("eva_config") or {}
        return EVA(**common, rho=float(e.get("rho", 2.0)), tau=float(e.get("tau", 0.99)),
                   whiten=bool(e.get("whiten", False)), adjust_scaling_factors=bool(e.get("adjust_scaling_factors", True)),
                   use_label_mask=bool(e.get("use_label_mask", True)),
                   label_mask_value=int(e.get("label_mask_value", -100)))
    raise NotImplementedError(f"load_pretrained: init_lora_weights={init!r} is not supported "
                              "(supported: True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'milora', 'olora', 'eva')")


# --------------------------------------------------------------------------- EVA


def _default_forward(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _token_mask(batch, cfg: "EVA") -> Optional[Tensor]:
    """peft's default token selection (``prepare_model_inputs_fn_language_modeling``): for a
    Mapping batch, keep the positions with ``attention_mask != 0`` and, with
    ``use_label_mask``, ``labels != label_mask_value``; ``None`` when the batch has neither."""
    if not isinstance(batch, Mapping):
        return None
    mask = None
    am = batch.get("attention_mask")
    if isinstance(am, Tensor):
        mask = am.bool()
    labels = batch.get("labels")
    if cfg.use_label_mask and isinstance(labels, Tensor) and labels.dim() >= 1:
        keep = labels != cfg.label_mask_value
        if mask is None:
            mask = keep
        elif keep.shape == mask.shape:
            mask = mask & keep
        # labels of another shape (one per sequence: classification) carry no token mask
    return mask


def _default_layer_inputs(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Rows of the SVD: the token positions ``mask`` keeps, or every position when there is
    no mask or the layer's leading dims are not the mask's (e.g. a head on pooled features)."""
    if mask is not None and x.dim() > mask.dim() and tuple(x.shape[:mask.dim()]) == tuple(mask.shape):
        return x[mask.to(x.device)].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


class _IncrementalSVD:
    """Truncated SVD of the stacked rows seen so far, kept as ``(S, Vh)`` only.

    ``[X_old; C]`` has the same right singular vectors and values as ``[S·Vh; C]``
    (``X_old = U·S·Vh`` with orthonormal ``U``), so each step appends ``C`` to the
    ``k × n`` matrix ``I·diag(S)·Vh`` with ``linalg.svd_append(..., dim=0)`` and memory
    does not grow with the number of tokens.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.S: Optional[Tensor] = None
        self.Vh: Optional[Tensor] = None
        self.energy = 0.0  # ‖X‖_F² of every row appended (the explained-variance denominator)
        self.steps = 0

    def update(self, C: Tensor) -> None:
        C = C.detach().to(torch.float64 if C.dtype == torch.float64 else torch.float32)
        self.energy += float(C.double().square().sum())
        if self.S is None:
            # first block: an exact thin SVD of the (tokens × in) minibatch
            _, S, Vh = torch.linalg.svd(C, full_matrices=False)
            k = min(self.k, S.numel())
            self.S, self.Vh = S[:k], Vh[:k]
        else:
            k = min(self.k, self.S.numel() + C.shape[0], C.shape[1])
            eye = torch.eye(self.S.numel(), dtype=C.dtype, device=C.device)
            _, S, Vh = linalg.svd_append(eye, self.S.to(C.dtype), self.Vh.to(C.dtype), C, k, dim=0)
            self.S, self.Vh = S.to(C.dtype), Vh.to(C.dtype)
        self.steps += 1


@torch.no_grad()
def eva_init(
    model: nn.Module,
    data: Iterable,
    forward_fn: Optional[Callable[[nn.Module, object], object]] = None,
    prepare_layer_inputs_fn: Optional[Callable[[Tensor, object, str], Tensor]] = None,
    max_batches: Optional[int] = None,
    min_rank: int = 0,
) -> dict[str, int]:
    """EVA initialisation of a model injected with :class:`EVA` (Paischer et al. 2024, §3).

    For every minibatch of ``data``, ``forward_fn(model, batch)`` runs the model on its
    *base* weights (adapters bypassed) and each target layer's input rows are appended
    to that layer's incremental SVD (``linalg.svd_append``, rows = tokens).  A layer
    stops collecting once its first ``rank`` right singular vectors (``rank`` = its
    current allocation) all have ``|cos| ≥ tau`` with the previous step's; the
    ranks are re-allocated after every batch by explained variance ``σ_i²/‖X‖_F²``
    with budget ``Σ_ℓ r_ℓ`` and at most ``round(rho·r_ℓ)`` per layer (peft's rule).
    Then ``A = V_rᵀ`` (``/√σ`` with ``whiten``), ``B = 0``; ``alpha`` is rescaled with
    ``adjust_scaling_factors``; layers given rank 0 are removed (their base ``nn.Linear``
    is put back) and the saved ``target_modules`` / ``rank_pattern`` / ``alpha_pattern``
    are updated, as peft does.

    Differences from peft, on purpose: the SVD is uncentred (the paper's SVD of the
    activations; peft's ``IncrementalPCA`` subtracts the running mean), ``data`` is
    read once rather than cycled (a warning names the layers not converged when it runs
    out), and sign flips between steps do not count as non-convergence (``|cos|``).

    Args:
        model: after ``adapters.inject(model, adapters.EVA(...), target=...)``.
        data: an iterable of batches (a DataLoader, a list).
        forward_fn: ``forward_fn(model, batch)``; default ``model(**batch)`` for a dict,
            ``model(*batch)`` for a tuple/list, else ``model(batch)``.
        prepare_layer_inputs_fn: ``fn(layer_input, batch, name) -> (tokens, in)``.  Default,
            as peft's defaults: for a Mapping batch, the positions with ``attention_mask == 0``
            and (``use_label_mask``) ``labels == label_mask_value`` are dropped when the layer
            input's leading dims match that mask; the remaining leading dims are flattened.
        max_batches: stop after this many batches.
        min_rank: smallest rank a layer keeps (peft: 0, i.e. a layer may lose its adapter).

    Returns:
        ``{module name: rank}`` after redistribution.
    """
    from ..inject import _set_submodule, adapter_layers, adapter_state

    state = adapter_state(model)
    cfg = state["config"]
    if not isinstance(cfg, EVA):
        raise ValueError(f"eva_init: the model carries {type(cfg).__name__} adapters; inject adapters.EVA(...) first")
    layers = dict(adapter_layers(model))
    if not layers:
        raise ValueError("eva_init: the model has no adapter layers")
    forward_fn = forward_fn or _default_forward
    r0 = {n: cfg.rank_alpha(n)[0] for n in layers}
    alpha0 = {n: cfg.rank_alpha(n)[1] for n in layers}
    cap = {n: min(max(1, round(r0[n] * cfg.rho)), layers[n].in_features) for n in layers}
    budget = sum(r0.values())
    svds = {n: _IncrementalSVD(cap[n]) for n in layers}
    prev: dict[str, Optional[Tensor]] = {n: None for n in layers}
    converged = {n: torch.zeros(cap[n], dtype=torch.bool) for n in layers}
    ranks = dict(r0)
    active = set(layers)
    current_batch = [None]
    current_mask: list[Optional[Tensor]] = [None]

    def hook_for(name):
        def hook(module, args):
            if name not in active:
                return
            x = args[0]
            if prepare_layer_inputs_fn is not None:
                x = prepare_layer_inputs_fn(x, current_batch[0], name)
            else:
                x = _default_layer_inputs(x, current_mask[0])
            if x.shape[0] > 0:
                svds[name].update(x)
        return hook

    # run on the base weights: put the plain nn.Linear back while collecting
    handles = []
    try:
        for n, layer in layers.items():
            _set_submodule(model, n, layer.base_layer)
            handles.append(layer.base_layer.register_forward_pre_hook(hook_for(n)))
        was_training = model.training
        model.eval()
        for step, batch in enumerate(data):
            if max_batches is not None and step >= max_batches:
                break
            current_batch[0] = batch
            current_mask[0] = None if prepare_layer_inputs_fn is not None else _token_mask(batch, cfg)
            forward_fn(model, batch)
            for n in layers:
                sv = svds[n]
                if sv.Vh is None:
                    continue
                if prev[n] is not None and n in active:
                    k = min(prev[n].shape[0], sv.Vh.shape[0])
                    cos = (prev[n][:k] * sv.Vh[:k]).sum(1).abs().cpu()
                    conv = torch.zeros(cap[n], dtype=torch.bool)
                    conv[:k] = cos >= cfg.tau
                    converged[n] = conv
                prev[n] = sv.Vh.clone()
            if all(svds[n].S is not None for n in layers):
                ranks = allocate_ranks({n: svds[n].S for n in layers}, budget, min_rank=min_rank,
                                       max_rank=None, total={n: svds[n].energy for n in layers})
            for n in layers:
                done = bool(converged[n][:ranks[n]].all()) and svds[n].steps >= 2
                if done:
                    active.discard(n)
                else:
                    active.add(n)
            if not active:
                break
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for n, layer in layers.items():
            _set_submodule(model, n, layer)
    missing = [n for n in layers if svds[n].S is None]
    if missing:
        raise ValueError(f"eva_init: no activations reached {missing[:8]}; check forward_fn and data")
    if active:
        warnings.warn(f"eva_init: data ran out before the right singular vectors of {sorted(active)[:8]} "
                      f"converged (tau={cfg.tau}); using the current estimate")
    ranks = {n: min(ranks[n], svds[n].S.numel()) for n in layers}

    rank_pattern, alpha_pattern, kept = {}, {}, []
    for n, layer in layers.items():
        r = ranks[n]
        if r == 0:
            _set_submodule(model, n, layer.base_layer)
            continue
        kept.append(n)
        alpha = alpha0[n] * r / r0[n] if (cfg.adjust_scaling_factors and r != r0[n]) else alpha0[n]
        A = svds[n].Vh[:r]
        if cfg.whiten:
            A = A / svds[n].S[:r].sqrt().clamp_min(torch.finfo(A.dtype).tiny).unsqueeze(1)
        _resize(layer, r, alpha)
        w = layer.base_layer.weight
        layer.lora_A.weight.data = A.to(device=w.device, dtype=w.dtype).contiguous()
        layer.lora_B.weight.data.zero_()
        if r != cfg.r:
            rank_pattern[n] = r
        if alpha != cfg.alpha:
            alpha_pattern[n] = alpha
    state["config"] = EVA(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, rho=cfg.rho, tau=cfg.tau,
                          whiten=cfg.whiten, adjust_scaling_factors=cfg.adjust_scaling_factors,
                          use_label_mask=cfg.use_label_mask, label_mask_value=cfg.label_mask_value)
    state["target"] = kept
    return ranks


def _resize(layer: LoRALinear, r: int, alpha: float) -> None:
    """Give ``layer`` rank ``r`` (fresh factors) and ``alpha``; ``s`` follows LoRA's rule."""
    w = layer.base_layer.weight
    if r != layer.r:
        layer.lora_A = Factor(r, layer.in_features, dtype=w.dtype, device=w.device)
        layer.lora_B = Factor(layer.out_features, r, dtype=w.dtype, device=w.device)
    layer.r = r
    layer.alpha = alpha
    layer.scaling = lora_scaling(r, alpha, layer.use_rslora)

