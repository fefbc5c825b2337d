"""Benchmarks of the lowrank family: ``lowrank_linear``, ``dora_norm`` and the LoRA/DoRA layers.

Shapes are one Llama-3-8B attention projection (``q_proj``/``o_proj``:
4096 → 4096) with a rank-16 adapter, alpha 16 (scale 1); ``T`` is the number
of tokens (batch × sequence) in a call.

* ``lora_infer_T*`` — ``ops.lowrank_linear`` vs ``reference.lowrank_linear_ref``
  (peft's unfused composition) vs the frozen GEMM ``F.linear(x, W, b)``.
* ``dora_infer_T*`` — ``nn.DoRALinear`` in eval mode (cached ``m/n``: one
  ``lowrank_linear`` call) vs peft's DoRA layer in eval mode (norm of the dense
  ``W + s·B·A`` every call) vs ``F.linear``.
* ``lora_train_T*`` / ``dora_train_T*`` — one step (forward + ``y.backward(g)``)
  with trainable A, B (and DoRA's magnitude), frozen W, b, and the input
  gradient computed (as in every layer but the first): ``nn.LoRALinear`` /
  ``nn.DoRALinear`` vs peft's layer on the same ``nn.Linear`` and the same
  factors, vs the frozen layer's forward + input-gradient step.
* ``floor_mirror`` rows — the same frozen layer with its GEMMs in the
  orientation this library's CPU kernels pick for few tokens (``W·xᵀ`` then a
  transpose; ``cpp/common.h``, by CPU vendor, ``bench.gemm_rule``): with MKL
  that beats ``F.linear`` by up to 2× at 16 tokens (AMD and Intel alike), so
  it is the stricter floor.  Equal to ``floor`` where the rule picks ATen's own.
* ``dora_norm`` — ``ops.dora_norm`` (factored, never forms ``B·A``) vs
  ``dora_norm_ref`` (materializes ``W + s·B·A``) vs one pass over ``W``
  (``vector_norm(W, dim=1)``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ... import nn as lnn
from ... import ops, reference
from .. import Config, Impl, describe_roles, measure, register
from ..gemm_rule import few_rows_mirrored
from ._peft import peft_lora_layer

SUITE = "lowrank"
IN = OUT = 4096  # Llama-3-8B hidden size
RANK = 16
ALPHA = 16.0
SCALE = ALPHA / RANK

INFER_T = (1, 16, 512, 2048)
TRAIN_T = (16, 128, 512)
DORA_INFER_T = (1, 16, 512)
# --quick is a CI smoke run: < 100 s wall on 2 busy cores, ~25 s of which is
# importing torch and peft.  It keeps every code path (T only changes sizes)
# but drops the compute-bound inference shapes and DoRA's larger step.
QUICK_INFER_T = (1, 16)
QUICK_TRAIN_T = {"lora": (16, 128), "dora": (16,)}


def _shape(T=None):
    s = {"in": IN, "out": OUT, "r": RANK, "alpha": ALPHA}
    if T is not None:
        s["T"] = T
    return s


# --------------------------------------------------------------------------- flop counts
# Nominal counts of the math (multiply-add = 2 flops), the same for every
# implementation of a row's role, so GFLOP/s compares like with like.


def _lowrank_fwd_flops(T: int) -> float:
    return 2 * T * RANK * (IN + OUT)  # x·Aᵀ, then ·Bᵀ


def _dora_norm_flops() -> float:
    # ‖W‖² + W·Aᵀ (the cross term) + A·Aᵀ and B·(A·Aᵀ) (the s² term) + row sums
    return 2 * OUT * IN * (RANK + 1) + 2 * RANK * RANK * (IN + OUT) + 4 * OUT * RANK


def _train_flops(T: int) -> float:
    # fwd: base + adapter; bwd: input grad of the base, and for the adapter
    # g·B, dB = gᵀ·h, dA = (g·B)ᵀ·x, dx += (g·B)·A
    return 4 * T * IN * OUT + 3 * _lowrank_fwd_flops(T)


# --------------------------------------------------------------------------- data


def _linear(cfg: Config) -> nn.Linear:
    return nn.Linear(IN, OUT, device=cfg.device, dtype=cfg.dtype).requires_grad_(False)


def _factors(cfg: Config):
    # peft's init_lora_weights=False scale: both factors Kaiming-uniform-like
    a = torch.empty(RANK, IN, device=cfg.device, dtype=cfg.dtype).uniform_(-IN ** -0.5, IN ** -0.5)
    b = torch.empty(OUT, RANK, device=cfg.device, dtype=cfg.dtype).uniform_(-RANK ** -0.5, RANK ** -0.5)
    return a, b


# --------------------------------------------------------------------------- the mirrored floor


def _mirrored(T: int, cfg: Config, backward: bool = False) -> bool:
    """The rule of the CPU kernels' few-rows GEMM (``cpp/common.h``; restated in ``bench.gemm_rule``)."""
    return few_rows_mirrored(T, OUT if not backward else IN, cfg.dtype, cfg.device, backward)


class _MirroredLinear(torch.autograd.Function):
    """``F.linear`` with frozen W and b, its GEMMs in the orientation the CPU kernels pick (see ``_mirrored``).
    The ``floor_mirror`` row: the frozen layer alone, as fast as this library's own GEMM schedule runs it."""

    @staticmethod
    def forward(ctx, x, w, b, fwd: bool, bwd: bool):
        ctx.save_for_backward(w)
        ctx.bwd = bwd
        y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        if fwd:
            torch.add(torch.mm(w, x.t()).t(), b, out=y)
        else:
            torch.addmm(b, x, w.t(), out=y)
        return y

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        gx = torch.empty(g.shape[0], w.shape[1], dtype=g.dtype, device=g.device)
        if ctx.bwd:
            gx.copy_(torch.mm(w.t(), g.t()).t())
        else:
            torch.mm(g, w, out=gx)
        return gx, None, None, None, None


def _mirrored_floor(lin: nn.Linear, cfg: Config, T: int):
    fwd, bwd = _mirrored(T, cfg), _mirrored(T, cfg, backward=True)
    return lambda x: _MirroredLinear.apply(x, lin.weight.detach(), lin.bias.detach(), fwd, bwd)


# --------------------------------------------------------------------------- inference


def _infer_case(cfg: Config, T: int, name: str):
    lin = _linear(cfg)
    w, bias = lin.weight, lin.bias
    a, b = _factors(cfg)
    x = torch.randn(T, IN, device=cfg.device, dtype=cfg.dtype)

    def no_grad(f):
        @functools.wraps(f)
        def g():
            with torch.no_grad():
                return f()
        return g

    ours = no_grad(lambda: ops.lowrank_linear(x, w, bias, a, b, None, SCALE))
    ref = no_grad(lambda: reference.lowrank_linear_ref(x, w, bias, a, b, None, SCALE))
    floor = no_grad(lambda: F.linear(x, w, bias))
    mirror = no_grad(functools.partial(_mirrored_floor(lin, cfg, T), x))
    flops = 2 * T * IN * OUT + _lowrank_fwd_flops(T)
    return measure(cfg, name, [
        Impl("ours", "ours", ours, flops),
        Impl("ref", "ref", ref, flops),
        Impl("floor", "floor", floor, 2 * T * IN * OUT),
        Impl("floor_mirror", "floor_mirror", mirror, 2 * T * IN * OUT),
    ], shape=_shape(T))


def _dora_infer_case(cfg: Config, T: int, name: str):
    """DoRA decoding/prefill in eval mode: ours caches ``m/n`` (one ``lowrank_linear`` call with ``out_scale``);
    peft recomputes the norm from a dense ``W + s·B·A`` on every call."""
    lin = _linear(cfg)
    x = torch.randn(T, IN, device=cfg.device, dtype=cfg.dtype)
    ours = lnn.DoRALinear(lin, r=RANK, alpha=ALPHA, init="random").eval()
    built = _peft_layer(lin, ours, True)
    ref_layer = built[0].eval() if built is not None else _ref_layer(lin, ours, True)[0].eval()

    def no_grad(layer):
        def call():
            with torch.no_grad():
                return layer(x)
        return call

    flops = 2 * T * IN * OUT + _lowrank_fwd_flops(T)
    return measure(cfg, name, [
        Impl("ours", "ours", no_grad(ours), flops),
        Impl("peft" if built is not None else "ref", "ref", no_grad(ref_layer), flops),
        Impl("floor", "floor", no_grad(lin), 2 * T * IN * OUT),
        Impl("floor_mirror", "floor_mirror", no_grad(_mirrored_floor(lin, cfg, T)),
             2 * T * IN * OUT),
    ], shape=_shape(T))


# --------------------------------------------------------------------------- training


def _peft_layer(lin: nn.Linear, ours: lnn.LoRALinear, dora: bool):
    """peft's LoRA (or DoRA) ``Linear`` around the same ``lin``, holding copies of ours' factors.

    Returns ``(layer, trainable params in ours' order)``, or None without peft.
    """
    layer = peft_lora_layer(lin, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=False,
                            use_dora=dora)
    if layer is None:
        return None
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if dora:
        params.append(layer.lora_magnitude_vector["default"].weight)
    with torch.no_grad():
        for p, q in zip(params, _ours_params(ours, dora)):
            p.copy_(q)
    return layer, params


def _ours_params(ours, dora: bool):
    p = [ours.lora_A.weight, ours.lora_B.weight]
    return p + [ours.lora_magnitude_vector] if dora else p


class _RefDoRA(nn.Module):
    """DoRA composed from the references (used only when peft is missing)."""

    def __init__(self, lin, a, b, m):
        super().__init__()
        self.lin, self.a, self.b, self.m = lin, a, b, m

    def forward(self, x):
        with torch.no_grad():  # detached norm, DoRA §4.3
            n = reference.dora_norm_ref(self.lin.weight, self.a, self.b, SCALE)
        z = reference.lowrank_linear_ref(x, self.lin.weight, None, self.a, self.b, None, SCALE)
        return z * (self.m / n) + self.lin.bias


def _ref_layer(lin, ours, dora: bool):
    params = [nn.Parameter(p.detach().clone()) for p in _ours_params(ours, dora)]
    if dora:
        return _RefDoRA(lin, *params), params
    a, b = params
    return (lambda x: reference.lowrank_linear_ref(x, lin.weight, lin.bias, a, b, None, SCALE)), params


def _drop_grads(x, params):
    def reset():
        x.grad = None
        for p in params:
            p.grad = None

    return reset


def _step(layer, x, g, params):
    """One training step; grads are reset to None first so accumulation never enters the timing."""
    reset = _drop_grads(x, params)

    def step():
        reset()
        layer(x).backward(g)

    return step


def _outputs(layer, x, g, params):
    """The same step, returning what it computed: output, input grad, parameter grads."""
    reset = _drop_grads(x, params)

    def outputs():
        reset()
        y = layer(x)
        y.backward(g)
        return [y.detach(), x.grad] + [p.grad for p in params]

    return outputs


def _train_impl(name, role, layer, x, g, params, flops) -> Impl:
    return Impl(name, role, _step(layer, x, g, params), flops,
                outputs=_outputs(layer, x, g, params), reset=_drop_grads(x, params))


def _train_case(cfg: Config, T: int, dora: bool, name: str):
    lin = _linear(cfg)
    x = torch.randn(T, IN, device=cfg.device, dtype=cfg.dtype, requires_grad=True)
    g = torch.randn(T, OUT, device=cfg.device, dtype=cfg.dtype)
    ours = (lnn.DoRALinear if dora else lnn.LoRALinear)(lin, r=RANK, alpha=ALPHA, init="random").train()
    ours_params = _ours_params(ours, dora)

    built = _peft_layer(lin, ours, dora)
    ref_name = "peft"
    if built is None:
        built, ref_name = _ref_layer(lin, ours, dora), "ref"
    ref, ref_params = built

    flops = _train_flops(T) + (_dora_norm_flops() if dora else 0)
    return measure(cfg, name, [
        _train_impl("ours", "ours", ours, x, g, ours_params, flops),
        _train_impl(ref_name, "ref", ref, x, g, ref_params, flops),
        _train_impl("floor", "floor", lin, x, g, [], 4 * T * IN * OUT),
        _train_impl("floor_mirror", "floor_mirror", _mirrored_floor(lin, cfg, T), x, g, [], 4 * T * IN * OUT),
    ], memory=True, shape=_shape(T))


# --------------------------------------------------------------------------- dora_norm


def _dora_norm_case(cfg: Config, name: str):
    w = _linear(cfg).weight
    a, b = _factors(cfg)

    def run(f):
        def call():
            with torch.no_grad():
                return f(w, a, b, SCALE)
        return call

    nbytes = w.numel() * w.element_size()
    return measure(cfg, name, [
        Impl("ours", "ours", run(ops.dora_norm), _dora_norm_flops(), nbytes),
        Impl("ref", "ref", run(reference.dora_norm_ref), _dora_norm_flops(), nbytes),
        Impl("floor", "floor", run(lambda w, a, b, s: torch.linalg.vector_norm(w, dim=1)), 2 * OUT * IN, nbytes),
    ], shape=_shape())


# --------------------------------------------------------------------------- registration


def _register_all() -> None:
    for T in INFER_T:
        name = f"lora_infer_T{T}"
        register(SUITE, name, functools.partial(_infer_case, T=T, name=name), quick=T in QUICK_INFER_T, shape=_shape(T))
    for T in DORA_INFER_T:
        name = f"dora_infer_T{T}"
        register(SUITE, name, functools.partial(_dora_infer_case, T=T, name=name), quick=False, shape=_shape(T))
    for kind, dora in (("lora", False), ("dora", True)):
        for T in TRAIN_T:
            name = f"{kind}_train_T{T}"
            register(SUITE, name, functools.partial(_train_case, T=T, dora=dora, name=name),
                     quick=T in QUICK_TRAIN_T[kind], shape=_shape(T))
    register(SUITE, "dora_norm", functools.partial(_dora_norm_case, name="dora_norm"), shape=_shape())


_register_all()


describe_roles(SUITE, "ref: the composed reference (inference), peft's layer (training); floor: the frozen base GEMM "
                      "(fwd, or fwd + input grad), one read of W for dora_norm; floor_mirror: the same GEMMs in the "
                      "orientation our CPU kernels pick for few tokens (W·xᵀ, cpp/common.h); check: ours vs ref, "
                      "outputs and gradients")
