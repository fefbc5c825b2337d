"""The fused low-rank linear family: ``lowrank_linear`` and ``dora_norm``.

Python halves of the ops declared in ``cpp/registration.cpp``: typed wrappers,
fake kernels (shape/dtype propagation for ``torch.compile`` / ``torch.export``)
and autograd formulas.  The numerics all live in the compiled kernels.

Under ``torch.autocast`` (cpu, cuda) the linear ops (``lowrank_linear``,
``lowrank_linear_with_h``, ``dora_linear``) behave like ``F.linear``: floating
arguments are cast to the region's autocast dtype (``dora_linear``'s
``weight_norm_sq`` excepted: it is read in fp32 accumulation as given), and
``dora_norm`` runs in fp32 like autocast's norms.  See the autocast section at
the end of this file.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_lib = torch.ops.lowrank_ops


def _no_grad_flows(args) -> bool:
    """Whether no gradient can flow through a call on ``args`` (never while tracing)."""
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and torch._C._any_requires_grad(*args))


def _call(op, *args, op_with_grad=None):
    """``op(*args)`` for the typed wrappers, on the cheapest path that records what is needed:

    * traced code (``torch.compile``/``export``): the plain call (``op_with_grad``
      when given), so the graph holds the op and its registered autograd;
    * no gradient can flow: the kernel below the autograd key.  The registered
      autograd formulas are Python, so every call of the op passes through a
      Python kernel at the autograd key even under ``no_grad``; after a GEMM that
      streamed the weight through the caches that Python runs cold (~40 µs per
      call measured at one token on a 4096² layer, 6 % of the 1.2 ms GEMV);
    * a gradient flows (eager): the same setup and backward formulas as the
      registered autograd, applied through an ``autograd.Function`` directly
      (:data:`_EAGER`), which skips the registration layer's per-call argument
      normalisation and redispatch (~45 of ~115 µs per training step of a small
      layer).  Under autocast the plain call, whose autocast kernel casts first.
    """
    if torch.compiler.is_compiling():
        return (op_with_grad or op)(*args)
    if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    eager = _EAGER.get(op)
    if eager is None or torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return (op_with_grad or op)(*args)
    return eager(*args)


def _lowrank_linear_y_saving_h(*args):
    # The variant that also returns h = x·downᵀ, which its backward reuses instead
    # of recomputing (one (T, in) × (in, r) product less).
    return _lib.lowrank_linear_with_h.default(*args)[0]


def lowrank_linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    down: Tensor,
    up: Tensor,
    core: Optional[Tensor] = None,
    scale: float = 1.0,
    out_scale: Optional[Tensor] = None,
) -> Tensor:
    """Fused base + low-rank linear map.

    ``y = (x·Wᵀ + scale·((x·downᵀ)·coreᵀ)·upᵀ) ⊙ out_scale + bias``, without ever
    forming ``up·down``.

    Args:
        x: ``(..., in)`` input.
        weight: ``(out, in)`` frozen or trainable base weight, or None (adapter term only).
        bias: ``(out,)`` or None.
        down: ``(r_d, in)`` — peft's ``lora_A.weight``.
        up: ``(out, r_u)`` — peft's ``lora_B.weight``.
        core: None (``r_d == r_u``), ``(r,)`` diagonal, or ``(r_u, r_d)`` full.
        scale: scalar on the low-rank term (``alpha / r`` for LoRA).
        out_scale: ``(out,)`` per-output scaling of base + low-rank (DoRA's ``m / ‖W + s·up·down‖``).

    Returns:
        ``(..., out)`` tensor in ``x``'s dtype.  All tensors must share dtype and device;
        under ``torch.autocast`` they are first cast to the autocast dtype, as
        ``F.linear``'s are (float64 excepted).
    """
    return _call(_lib.lowrank_linear.default, x, weight, bias, down, up, core, float(scale), out_scale,
                 op_with_grad=_lowrank_linear_y_saving_h)


def lowrank_linear_with_h(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    down: Tensor,
    up: Tensor,
    core: Optional[Tensor] = None,
    scale: float = 1.0,
    out_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """:func:`lowrank_linear` that also returns the rank-r intermediate.

    Returns:
        ``(y, h)``: ``y`` exactly as :func:`lowrank_linear` computes it, and
        ``h = x·downᵀ`` ``(..., r_d)`` (before ``core``), a non-differentiable output
        that the backward reuses instead of recomputing.  :func:`lowrank_linear`
        calls this op whenever a gradient can flow.
    """
    return _call(_lib.lowrank_linear_with_h.default, x, weight, bias, down, up, core, float(scale), out_scale)


def dora_norm(
    weight: Tensor, down: Tensor, up: Tensor, scale: float, weight_norm_sq: Optional[Tensor] = None
) -> Tensor:
    """Row norms ``‖W_j + scale·up_j·down‖₂`` of the adapted weight, shape ``(out,)``.

    Uses ``‖W‖² + 2s·rowsum((W·downᵀ)⊙up) + s²·rowsum((up·(down·downᵀ))⊙up)``
    (DoRA, Liu et al. 2024, Eq. 5 denominator) so the ``(out, in)`` adapted
    weight is never formed.  ``weight_norm_sq`` optionally supplies a cached
    ``rowsum(W⊙W)`` for a frozen ``W``.  Differentiable in ``weight``, ``down``, ``up``;
    at a zero row norm the zero subgradient is used.  Under ``torch.autocast`` it
    runs in float32 (bf16/fp16 arguments upcast, float32 result), like autocast's norms.
    """
    return _call(_lib.dora_norm.default, weight, down, up, float(scale), weight_norm_sq)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    down: Tensor,
    up: Tensor,
    magnitude: Tensor,
    scale: float = 1.0,
    weight_norm_sq: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DoRA in one call, reading ``W`` once (DoRA, Liu et al. 2024, Eq. 5).

    ``y = (magnitude / n) ⊙ (x·Wᵀ + scale·x·downᵀ·upᵀ) + bias`` with
    ``n = ‖W + scale·up·down‖`` per output row.  The base GEMM runs on the
    stacked rows ``[x; down]`` so the same pass over ``W`` also yields
    ``W·downᵀ`` for the factored norm; ``up·down`` is never formed.

    Args:
        x: ``(..., in)``.  weight: ``(out, in)``.  bias: ``(out,)`` or None.
        down: ``(r, in)``.  up: ``(out, r)``.  magnitude: ``(out,)`` (DoRA's ``m``).
        scale: LoRA scaling.  weight_norm_sq: optional cached ``rowsum(W⊙W)`` ``(out,)``.

    Returns:
        ``(y, pre_scale, norm, h)``: the output ``(..., out)``, the pre-scale output
        ``x·Wᵀ + scale·x·downᵀ·upᵀ`` (saved for the magnitude gradient), the
        row norms ``(out,)`` and the rank-r intermediate ``h = x·downᵀ`` ``(..., r)``
        (saved so the backward does not recompute it).  In ``y``'s backward the
        norm is a constant (paper §4.3, peft's behaviour); ``pre_scale``, ``norm``
        and ``h`` are non-differentiable outputs (``dora_norm`` gives a
        differentiable norm).

    Under ``torch.autocast`` every floating argument but ``weight_norm_sq`` is cast to
    the autocast dtype (as ``F.linear``); ``weight_norm_sq`` is passed as given, the
    kernel reading it in its fp32 accumulation dtype, so a cached fp32 ``‖W‖²`` keeps
    its precision.
    """
    return _call(_lib.dora_linear.default, x, weight, bias, down, up, magnitude, float(scale), weight_norm_sq)


# --------------------------------------------------------------------------- fakes


def _check_common(x, weight, down, up, core):
    torch._check(down.dim() == 2 and up.dim() == 2, lambda: "lowrank_linear: down/up must be 2-D")
    torch._check(down.shape[1] == x.shape[-1], lambda: "lowrank_linear: down must be (r, in)")
    if weight is not None:
        torch._check(
            weight.shape[0] == up.shape[0] and weight.shape[1] == x.shape[-1],
            lambda: "lowrank_linear: weight must be (out, in)",
        )


@torch.library.register_fake("lowrank_ops::lowrank_linear")
def _lowrank_linear_fake(x, weight, bias, down, up, core=None, scale=1.0, out_scale=None):
    _check_common(x, weight, down, up, core)
    return x.new_empty((*x.shape[:-1], up.shape[0]))


@torch.library.register_fake("lowrank_ops::lowrank_linear_with_h")
def _lowrank_linear_with_h_fake(x, weight, bias, down, up, core=None, scale=1.0, out_scale=None):
    _check_common(x, weight, down, up, core)
    return x.new_empty((*x.shape[:-1], up.shape[0])), x.new_empty((*x.shape[:-1], down.shape[0]))


@torch.library.register_fake("lowrank_ops::lowrank_linear_backward")
def _lowrank_linear_backward_fake(grad, x, weight, down, up, core, scale, out_scale, output_mask, h=None):
    _check_common(x, weight, down, up, core)
    shapes = [
        x.shape,
        weight.shape if weight is not None else None,
        (up.shape[0],),
        down.shape,
        up.shape,
        core.shape if core is not None else None,
        (up.shape[0],) if out_scale is not None else None,
    ]
    return tuple(
        x.new_empty(s) if (m and s is not None) else x.new_empty((0,)) for m, s in zip(output_mask, shapes)
    )


@torch.library.register_fake("lowrank_ops::dora_linear")
def _dora_linear_fake(x, weight, bias, down, up, magnitude, scale=1.0, weight_norm_sq=None):
    _check_common(x, weight, down, up, None)
    out_shape = (*x.shape[:-1], up.shape[0])
    return (x.new_empty(out_shape), x.new_empty(out_shape), weight.new_empty((weight.shape[0],)),
            x.new_empty((*x.shape[:-1], down.shape[0])))


@torch.library.register_fake("lowrank_ops::dora_linear_backward")
def _dora_linear_backward_fake(grad, x, weight, down, up, magnitude, scale, pre_scale, norm, output_mask, h=None):
    shapes = [x.shape, weight.shape, (up.shape[0],), down.shape, up.shape, magnitude.shape]
    return tuple(x.new_empty(s) if m else x.new_empty((0,)) for m, s in zip(output_mask, shapes))


@torch.library.register_fake("lowrank_ops::dora_norm")
def _dora_norm_fake(weight, down, up, scale, weight_norm_sq=None):
    torch._check(weight.dim() == 2, lambda: "dora_norm: weight must be (out, in)")
    return weight.new_empty((weight.shape[0],))


@torch.library.register_fake("lowrank_ops::dora_norm_backward")
def _dora_norm_backward_fake(grad, norm, weight, down, up, scale, output_mask):
    shapes = [weight.shape, down.shape, up.shape]
    return tuple(weight.new_empty(s) if m else weight.new_empty((0,)) for m, s in zip(output_mask, shapes))


# --------------------------------------------------------------------------- autograd
# Double backward (create_graph=True: gradient penalties, Hessian-vector
# products) differentiates a composite re-computation of the same math in
# plain torch ops; the fused backward kernels serve every first-order backward.


def _composite_lowrank_linear(x, weight, bias, down, up, core, scale, out_scale):
    h = torch.nn.functional.linear(x, down)
    if core is not None:
        h = h * core if core.dim() == 1 else torch.nn.functional.linear(h, core)
    z = scale * torch.nn.functional.linear(h, up)
    if weight is not None:
        z = z + torch.nn.functional.linear(x, weight)
    if out_scale is not None:
        z = z * out_scale
    return z if bias is None else z + bias


def _composite_dora_norm(weight, down, up, scale, weight_norm_sq):
    wn2 = (weight * weight).sum(1) if weight_norm_sq is None else weight_norm_sq
    cross = ((weight @ down.t()) * up).sum(1)
    quad = ((up @ (down @ down.t())) * up).sum(1)
    return (wn2 + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()


def _grad_of_composite(fn, args, needs, grads_out):
    """Gradients of ``fn(*args)`` w.r.t. the args flagged in ``needs``, with a graph."""
    with torch.enable_grad():
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads_out) if g is not None and o.requires_grad]
        wrt = [a for a, nd in zip(args, needs) if nd]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
    it = iter(got)
    res = []
    for a, nd in zip(args, needs):
        if nd:
            g = next(it)
            res.append(torch.zeros_like(a) if g is None else g)
        else:
            res.append(None)
    return res

# Forward saves x, the (parameter) tensors it was given and — for
# lowrank_linear_with_h — the rank-r intermediate h = x·downᵀ (T, r): never a
# dense expansion, never up·down.  lowrank_linear itself returns one tensor, so
# its backward recomputes h (T·r·in flops, ~r/out of the base GEMM; measured
# 0.8 ms of a ~100 ms step at 512 tokens on 4096², r = 16).


def _lowrank_linear_setup(ctx, inputs, output):
    x, weight, bias, down, up, core, scale, out_scale = inputs
    ctx.scale = scale
    ctx.has = (weight is not None, bias is not None, core is not None, out_scale is not None)
    h = None
    if isinstance(output, tuple):  # lowrank_linear_with_h: (y, h)
        h = output[1]
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)
    # bias is saved only for the create_graph path (a parameter: no memory cost)
    ctx.save_for_backward(x, weight, bias, down, up, core, out_scale, h)


def _lowrank_linear_backward(ctx, grad, grad_h=None):
    x, weight, bias, down, up, core, out_scale, h = ctx.saved_tensors
    has_w, has_b, has_c, has_os = ctx.has
    n = ctx.needs_input_grad
    mask = [n[0], has_w and n[1], has_b and n[2], n[3], n[4], has_c and n[5], has_os and n[7]]
    if grad is None or not any(mask):
        return (None,) * 8
    if torch.is_grad_enabled():
        args = (x, weight, bias, down, up, core, ctx.scale, out_scale)
        needs = [mask[0], mask[1], mask[2], mask[3], mask[4], mask[5], False, mask[6]]
        return tuple(_grad_of_composite(_composite_lowrank_linear, args, needs, (grad,)))
    g = _lib.lowrank_linear_backward(grad.contiguous(), x, weight, down, up, core, ctx.scale, out_scale, mask, h)
    gx, gw, gb, gd, gu, gc, gos = (t if m else None for t, m in zip(g, mask))
    return gx, gw, gb, gd, gu, gc, None, gos


for _name in ("lowrank_linear", "lowrank_linear_with_h"):
    torch.library.register_autograd(
        f"lowrank_ops::{_name}", _lowrank_linear_backward, setup_context=_lowrank_linear_setup
    )


def _dora_linear_setup(ctx, inputs, output):
    x, weight, bias, down, up, magnitude, scale, weight_norm_sq = inputs
    _, pre_scale, norm, h = output
    # pre_scale, norm and h are returned for inspection and for the backward; they
    # carry no gradient (use dora_norm for a differentiable norm), so a DoRA
    # step never runs backward passes for outputs it does not use.
    ctx.mark_non_differentiable(pre_scale, norm, h)
    ctx.set_materialize_grads(False)
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, down, up, magnitude, weight_norm_sq, pre_scale, norm, h)


def _composite_dora_linear(x, weight, bias, down, up, magnitude, scale, weight_norm_sq):
    norm = _composite_dora_norm(weight, down, up, scale, weight_norm_sq).detach()  # constant in y (DoRA §4.3)
    pre = _composite_lowrank_linear(x, weight, None, down, up, None, scale, None)
    y = pre * (magnitude / norm)
    return y if bias is None else y + bias


def _dora_linear_backward(ctx, grad, grad_pre_scale=None, grad_norm=None, grad_h=None):
    x, weight, bias, down, up, magnitude, weight_norm_sq, pre_scale, norm, h = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[0], n[1], ctx.has_bias and n[2], n[3], n[4], n[5]]
    if grad is None or not any(mask):
        return (None,) * 8
    if torch.is_grad_enabled():
        args = (x, weight, bias, down, up, magnitude, ctx.scale, weight_norm_sq)
        return tuple(_grad_of_composite(_composite_dora_linear, args, mask + [False, False], (grad,)))
    g = _lib.dora_linear_backward(grad.contiguous(), x, weight, down, up, magnitude, ctx.scale, pre_scale, norm, mask,
                                  h)
    return (*(t if m else None for t, m in zip(g, mask)), None, None)


torch.library.register_autograd(
    "lowrank_ops::dora_linear", _dora_linear_backward, setup_context=_dora_linear_setup
)


def _dora_norm_setup(ctx, inputs, output):
    weight, down, up, scale, weight_norm_sq = inputs
    ctx.scale = scale
    ctx.cached_sq = weight_norm_sq is not None
    ctx.save_for_backward(weight, down, up, output, weight_norm_sq)


def _dora_norm_backward(ctx, grad):
    weight, down, up, norm, weight_norm_sq = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[0], n[1], n[2]]
    if torch.is_grad_enabled() and any(n):
        args = (weight, down, up, ctx.scale, weight_norm_sq)
        needs = mask + [False, ctx.cached_sq and len(n) > 4 and n[4]]
        return tuple(_grad_of_composite(_composite_dora_norm, args, needs, (grad,)))
    gw = gd = gu = gwn = None
    if any(mask):
        kmask = [mask[0] and not ctx.cached_sq, mask[1], mask[2]]
        gw, gd, gu = _lib.dora_norm_backward(grad.contiguous(), norm, weight, down, up, ctx.scale, kmask)
    if ctx.cached_sq:
        # d n / d weight_norm_sq = 1 / (2n); with a supplied ‖W‖² the norm
        # depends on W only through the cross term, so drop ∂W's c ⊙ W part.
        c = torch.where(norm > 0, grad / norm, torch.zeros_like(norm))
        if len(n) > 4 and n[4]:
            gwn = c / 2
        if mask[0]:
            # ∂W = s·(c ⊙ up)·down directly (the kernel's c⊙W + ... minus c⊙W would cancel)
            acc = torch.promote_types(weight.dtype, torch.float32)
            gw = (torch.mm(up.to(acc) * c.to(acc).unsqueeze(1), down.to(acc)) * ctx.scale).to(weight.dtype)
    return (gw if mask[0] else None, gd if mask[1] else None, gu if mask[2] else None, None, gwn)


torch.library.register_autograd("lowrank_ops::dora_norm", _dora_norm_backward, setup_context=_dora_norm_setup)


# --------------------------------------------------------------------------- autocast
# Under torch.autocast the ops follow autocast's own op lists (see docs/ops.md):
#
# * lowrank_linear, lowrank_linear_with_h, dora_linear are linear maps and act
#   like F.linear (autocast's "lower precision" list): every floating tensor
#   argument on the autocast device (float64 excepted, as autocast does) is
#   cast to the *current* autocast dtype of that device, and the op runs with
#   autocast off.  dora_linear's optional `weight_norm_sq` is the exception: it
#   is a row-norm accumulator, which the kernel reads in its accumulation dtype
#   (fp32 for bf16/fp16 inputs) whatever its own dtype, so it is passed through
#   uncast and the norm keeps its precision.
# * dora_norm is a norm and runs like autocast's fp32 list (norm,
#   linalg_vector_norm): bf16/fp16 arguments are cast to float32, the result is
#   float32.
#
# The casts sit above autograd (as autocast's own casts do), so a backward
# through them delivers gradients to fp32 parameters in fp32.
# torch.library.register_autocast is not used because it fixes one cast dtype
# at registration time; autocast's dtype is chosen per region
# (torch.autocast(..., dtype=...)), which F.linear follows.  The registration
# below is the same mechanism (an Autocast<Device> kernel plus its Python-
# dispatcher twin for tracing) with the dtype read when the op runs.
# The backward ops are not registered: their inputs are the saved, already
# cast tensors and the autograd engine hands them gradients in those dtypes.

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, Tensor) and value.is_floating_point() and value.device.type == device_type \
            and value.dtype is not torch.float64:
        return value.to(dtype)
    return value


def _register_autocast(name: str, device_type: str, fp32: bool, keep: tuple = ()) -> None:
    op = getattr(_lib, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    keyset = torch._C.DispatchKeySet(key)

    def run(*args):
        dtype = torch.float32 if fp32 else torch.get_autocast_dtype(device_type)
        cast = tuple(a if i in keep else _autocast_cast(a, device_type, dtype) for i, a in enumerate(args))
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*cast)

    op.py_kernels.pop(key, None)  # the Python-dispatcher twin, used when tracing
    op.py_impl(key)(run)
    _autocast_lib.impl(name, lambda _keyset, *args: run(*args), key_name, with_keyset=True)


_autocast_lib = torch.library.Library("lowrank_ops", "IMPL")
for _device in _AUTOCAST_DEVICES:
    if not torch._C._is_autocast_available(_device):
        continue
    _register_autocast("lowrank_linear", _device, fp32=False)
    _register_autocast("lowrank_linear_with_h", _device, fp32=False)
    _register_autocast("dora_linear", _device, fp32=False, keep=(7,))  # 7: weight_norm_sq
    _register_autocast("dora_norm", _device, fp32=True)


# --------------------------------------------------------------------------- eager autograd path
# The wrappers' grad path in eager mode (_call): autograd.Functions built from the
# registered setup/backward formulas above, so both paths compute the same gradients.


def _eager_function(op, setup, backward) -> type:
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        setup(ctx, args, out)
        return out

    name = op._schema.name.split("::")[-1]
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_LowrankLinearWithH = _eager_function(_lib.lowrank_linear_with_h.default, _lowrank_linear_setup, _lowrank_linear_backward)
_EAGER = {
    # lowrank_linear's grad path goes through the variant that saves h (_lowrank_linear_y_saving_h)
    _lib.lowrank_linear.default: lambda *args: _LowrankLinearWithH.apply(*args)[0],
    _lib.lowrank_linear_with_h.default: _LowrankLinearWithH.apply,
    _lib.dora_linear.default: _eager_function(_lib.dora_linear.default, _dora_linear_setup, _dora_linear_backward).apply,
    _lib.dora_norm.default: _eager_function(_lib.dora_norm.default, _dora_norm_setup, _dora_norm_backward).apply,
}
