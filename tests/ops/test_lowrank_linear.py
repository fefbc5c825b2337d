"""Tests of ``lowrank_ops.lowrank_linear`` and its backward op.

Oracle: ``lowrank_ops.reference.lowrank_linear_ref`` (peft's composition), run in
fp64 for the truth and in the tested dtype for PyTorch's own error (utils.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_ops.bench.gemm_rule import cpu_is_intel, few_rows_mirrored
from lowrank_ops.ops import lowrank_linear
from lowrank_ops.reference import lowrank_linear_ref, lowrank_linear_with_h_ref
from utils import (
    DEVICES,
    DTYPES,
    assert_close_to_ref,
    assert_grads_close_to_ref,
    randn,
    requires_cuda,
    to_fp64,
)

OP = torch.ops.lowrank_ops.lowrank_linear
OP_H = torch.ops.lowrank_ops.lowrank_linear_with_h
BWD = torch.ops.lowrank_ops.lowrank_linear_backward
#: Differentiable inputs, in the order of the backward op's outputs and output_mask.
NAMES = ("x", "weight", "bias", "down", "up", "core", "out_scale")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Case:
    lead: tuple = (7,)  # leading dims of x: (tokens,) or (batch, seq)
    in_: int = 33
    out: int = 17
    rank: int = 7  # r of `down` (and of `up` unless ru is set)
    ru: Optional[int] = None  # rank of `up` with a rectangular (ru, rank) core
    weight: bool = True
    bias: bool = True
    core: Optional[str] = None  # None | "diag" | "full"
    out_scale: bool = False
    scale: float = 0.5
    layout: str = "contiguous"  # x: contiguous | transposed | strided_rows | strided_cols | permuted


def _make_x(case: Case, dtype, device) -> torch.Tensor:
    lead, n_in = case.lead, case.in_
    if case.layout == "contiguous":
        return randn(*lead, n_in, dtype=dtype, device=device)
    if case.layout == "transposed":  # (T, in) view of an (in, T) buffer
        (t,) = lead
        x = randn(n_in, t, dtype=dtype, device=device).t()
    elif case.layout == "strided_rows":  # every other row
        (t,) = lead
        x = randn(2 * t, n_in, dtype=dtype, device=device)[::2]
    elif case.layout == "strided_cols":  # every other column: no unit stride for BLAS
        (t,) = lead
        x = randn(t, 2 * n_in, dtype=dtype, device=device)[:, ::2]
    elif case.layout == "permuted":  # (b, s, in) view of an (s, b, in) buffer
        b, s = lead
        x = randn(s, b, n_in, dtype=dtype, device=device).permute(1, 0, 2)
    else:
        raise ValueError(case.layout)
    assert not x.is_contiguous()
    return x


def make_inputs(case: Case, dtype=torch.float32, device="cpu") -> dict:
    """Arguments of one call, keyed by schema name; values of order 1 in the output."""
    n_in, out, rd = case.in_, case.out, case.rank
    ru = case.ru if case.ru is not None else rd
    if case.core is None or case.core == "diag":
        assert ru == rd, "down and up share the rank without a full core"
    s_in = max(n_in, 1) ** -0.5
    a = dict(
        x=_make_x(case, dtype, device),
        weight=randn(out, n_in, dtype=dtype, device=device, std=s_in) if case.weight else None,
        bias=randn(out, dtype=dtype, device=device) if case.bias else None,
        down=randn(rd, n_in, dtype=dtype, device=device, std=s_in),
        up=randn(out, ru, dtype=dtype, device=device, std=ru**-0.5),
        core=None,
        scale=case.scale,
        out_scale=None,
    )
    if case.core == "diag":
        a["core"] = (1 + 0.5 * randn(rd, dtype=torch.float64, device="cpu")).to(device=device, dtype=dtype)
    elif case.core == "full":
        a["core"] = randn(ru, rd, dtype=dtype, device=device, std=rd**-0.5)
    if case.out_scale:
        a["out_scale"] = (1 + 0.25 * randn(out, dtype=torch.float64, device="cpu")).to(device=device, dtype=dtype)
    return a


def call(fn, a: dict):
    return fn(a["x"], a["weight"], a["bias"], a["down"], a["up"], a["core"], a["scale"], a["out_scale"])


def fp64(a: dict) -> dict:
    return {k: to_fp64(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


def leaves(a: dict, requires_grad=NAMES) -> dict:
    """Fresh leaf tensors (same storage and strides) with requires_grad set for the named inputs."""
    return {
        k: v.detach().requires_grad_(k in requires_grad) if isinstance(v, torch.Tensor) else v
        for k, v in a.items()
    }


def grads(fn, a: dict, g: torch.Tensor, requires_grad=NAMES) -> list:
    """Gradients of ``<fn(a), g>`` for every input in NAMES (None where absent or not requested)."""
    lv = leaves(a, requires_grad)
    call(fn, lv).backward(g)
    return [lv[n].grad if lv[n] is not None else None for n in NAMES]


def ids(cases):
    return [pytest.param(c, id=i) for i, c in cases]


BASE = Case()
FORWARD_CASES = ids(
    [
        ("tokens0", replace(BASE, lead=(0,))),
        ("tokens1", replace(BASE, lead=(1,))),
        ("tokens7", BASE),
        ("tokens33", replace(BASE, lead=(33,))),
        ("batched3d", replace(BASE, lead=(2, 5))),
        ("batched3d_tokens0", replace(BASE, lead=(2, 0))),
        ("in0", replace(BASE, in_=0, out_scale=True)),
        ("in65_out769_rank1", replace(BASE, in_=65, out=769, rank=1)),
        ("in33_out769_rank7_full_core_out_scale", replace(BASE, out=769, core="full", ru=5, out_scale=True)),
        ("no_weight", replace(BASE, weight=False)),
        ("no_weight_no_bias", replace(BASE, weight=False, bias=False)),
        ("no_bias", replace(BASE, bias=False)),
        ("core_diag", replace(BASE, core="diag")),
        ("core_full_square", replace(BASE, core="full")),
        ("core_full_rect", replace(BASE, core="full", ru=4)),
        ("out_scale", replace(BASE, out_scale=True)),
        ("out_scale_no_bias", replace(BASE, out_scale=True, bias=False)),
        ("out_scale_no_weight", replace(BASE, out_scale=True, weight=False, core="diag")),
        ("scale0", replace(BASE, scale=0.0)),
        ("scale0_no_weight", replace(BASE, scale=0.0, weight=False, out_scale=True)),
        ("scale_negative", replace(BASE, scale=-1.5, core="diag")),
        ("x_transposed", replace(BASE, layout="transposed")),
        ("x_strided_rows", replace(BASE, layout="strided_rows", out_scale=True)),
        ("x_strided_cols", replace(BASE, layout="strided_cols", core="full", ru=4)),
        ("x_permuted_3d", replace(BASE, lead=(2, 5), layout="permuted", core="diag", out_scale=True)),
        # few tokens, many features: the CPU kernel runs the base GEMM mirrored where its rule says so
        # (cpp/common.h: by CPU vendor; 16..48 tokens mirrored on both)
        ("few_rows_T2_mirrored", replace(BASE, lead=(2,), in_=40, out=50)),
        ("few_rows_T16_mirrored", replace(BASE, lead=(16,), in_=96, out=80, out_scale=True)),
        ("few_rows_3d_mirrored", replace(BASE, lead=(4, 10), in_=200, out=190, core="diag")),
        ("few_rows_x_transposed_mirrored", replace(BASE, lead=(24,), in_=100, out=120, layout="transposed")),
    ]
)

BACKWARD_CASES = ids(
    [
        ("tokens0", replace(BASE, lead=(0,), core="full", ru=4, out_scale=True)),
        ("tokens1", replace(BASE, lead=(1,))),
        ("tokens33", replace(BASE, lead=(33,))),
        ("batched3d_core_diag_out_scale", replace(BASE, lead=(2, 5), core="diag", out_scale=True)),
        ("out769_rank1", replace(BASE, in_=65, out=769, rank=1, out_scale=True)),
        ("core_full_rect_out_scale", replace(BASE, core="full", ru=4, out_scale=True)),
        ("no_weight_out_scale", replace(BASE, weight=False, out_scale=True, core="full")),
        ("no_bias_scale_negative", replace(BASE, bias=False, scale=-1.5)),
        ("scale0", replace(BASE, scale=0.0, core="diag")),
        ("x_transposed", replace(BASE, layout="transposed", core="full", ru=4)),
        ("x_strided_cols", replace(BASE, layout="strided_cols", out_scale=True)),
        ("x_permuted_3d", replace(BASE, lead=(2, 5), layout="permuted", out_scale=True)),
        # few tokens: forward and input gradient mirrored where the CPU rule says so (cpp/common.h)
        ("few_rows_T4", replace(BASE, lead=(4,), in_=40, out=50)),
        ("few_rows_T16_mirrored", replace(BASE, lead=(16,), in_=96, out=80, out_scale=True)),
        ("few_rows_3d_mirrored", replace(BASE, lead=(4, 10), in_=200, out=190, core="full", ru=4)),
    ]
)

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
devices = pytest.mark.parametrize("device", DEVICES)


# --------------------------------------------------------------------------- forward


@devices
@dtypes
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_matches_reference(case, dtype, device):
    a = make_inputs(case, dtype, device)
    y = call(lowrank_linear, a)
    assert y.shape == (*case.lead, case.out)
    assert y.dtype == dtype and y.device.type == device
    assert_close_to_ref(y, call(lowrank_linear_ref, a), call(lowrank_linear_ref, fp64(a)))


@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "weight,bias,core,out_scale",
    list(itertools.product([True, False], [True, False], [None, "diag", "full"], [True, False])),
)
def test_forward_every_option_combination(weight, bias, core, out_scale, dtype, device):
    case = replace(BASE, lead=(2, 3), weight=weight, bias=bias, core=core, out_scale=out_scale,
                   ru=5 if core == "full" else None, scale=-0.75)
    a = make_inputs(case, dtype, device)
    assert_close_to_ref(call(OP, a), call(lowrank_linear_ref, a), call(lowrank_linear_ref, fp64(a)))


@devices
def test_schema_defaults(device):
    """``core=None, scale=1.0, out_scale=None`` are the schema's defaults."""
    a = make_inputs(replace(BASE, scale=1.0), torch.float64, device)
    y = OP(a["x"], a["weight"], a["bias"], a["down"], a["up"])
    ref = lowrank_linear_ref(a["x"], a["weight"], a["bias"], a["down"], a["up"])
    assert_close_to_ref(y, ref, ref)
    y2 = lowrank_linear(a["x"], a["weight"], a["bias"], a["down"], a["up"])
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


@devices
def test_large_in_features_rank1(device):
    """in = 50 000 with rank 1: long reductions, thin factors (the regime where forming up·down would hurt)."""
    case = Case(lead=(3,), in_=50_000, out=5, rank=1, out_scale=True, scale=2.0)
    a = make_inputs(case, torch.float32, device)
    assert_close_to_ref(call(OP, a), call(lowrank_linear_ref, a), call(lowrank_linear_ref, fp64(a)))
    g = randn(3, 5, dtype=torch.float32, device=device)
    assert_grads_close_to_ref(
        NAMES, grads(OP, a, g), grads(lowrank_linear_ref, a, g), grads(lowrank_linear_ref, fp64(a), g.double())
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 2, 16, 300])
def test_few_rows_gemm_orientation(tokens, dtype):
    """The CPU forward runs x·Wᵀ as the mirrored W·xᵀ and the input gradient g·W as Wᵀ·gᵀ for the token counts
    where MKL runs that faster on this CPU vendor (cpp/common.h; restated in lowrank_ops.bench.gemm_rule), in
    fp32/fp64 only; otherwise (and in bf16) ATen's own orientation.  The profiler's recorded product shapes show
    which ran; the values are checked by the cases above."""
    from torch.profiler import profile

    n_in, n_out = 1200, 1300
    a = make_inputs(replace(BASE, lead=(tokens,), in_=n_in, out=n_out, bias=False), dtype, "cpu")
    lv = leaves(a, ("x",))
    with profile(record_shapes=True) as prof:
        call(OP, lv).backward(torch.ones(tokens, n_out, dtype=dtype))
    # operand shapes of every product: aten::mm (a, b), and aten::addmm / addmm_ (c, a, b) — the direct
    # orientation accumulates the base GEMM onto the rank-r term already in the output
    shapes = [e.input_shapes[:2] for e in prof.events() if e.name == "aten::mm"]
    shapes += [e.input_shapes[1:3] for e in prof.events() if e.name in ("aten::addmm", "aten::addmm_")]
    mirrored = few_rows_mirrored(tokens, n_out, dtype)
    mirrored_bwd = few_rows_mirrored(tokens, n_in, dtype, backward=True)
    # the rule itself, per vendor (a rule that silently mirrored nothing would pass the shape checks)
    if dtype == torch.bfloat16 or tokens in (1, 300):
        assert not mirrored and not mirrored_bwd
    elif cpu_is_intel():
        assert (mirrored, mirrored_bwd) == (tokens == 16, False)
    else:
        assert (mirrored, mirrored_bwd) == (True, tokens >= 16)
    assert ([[n_out, n_in], [n_in, tokens]] in shapes) == mirrored, shapes
    assert ([[tokens, n_in], [n_in, n_out]] in shapes) == (not mirrored), shapes
    assert ([[n_in, n_out], [n_out, tokens]] in shapes) == mirrored_bwd, shapes
    assert ([[tokens, n_out], [n_out, n_in]] in shapes) == (not mirrored_bwd), shapes


# --------------------------------------------------------------------------- backward


@devices
@dtypes
@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_matches_reference(case, dtype, device):
    a = make_inputs(case, dtype, device)
    g = randn(*case.lead, case.out, dtype=dtype, device=device)
    ours = grads(lowrank_linear, a, g)
    assert_grads_close_to_ref(
        NAMES, ours, grads(lowrank_linear_ref, a, g), grads(lowrank_linear_ref, fp64(a), to_fp64(g))
    )
    for n, t in zip(NAMES, ours):
        if t is not None:
            assert t.shape == a[n].shape, n


def _noncontiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Same values, non-contiguous layout: a transposed view for matrices, every other element for vectors."""
    if t is None:
        return None
    if t.dim() == 2:
        v = t.t().contiguous().t()
    else:
        v = torch.stack([t, torch.full_like(t, float("nan"))], 1)[:, 0]  # NaN in the gaps: reading them shows
    assert not v.is_contiguous() and torch.equal(v, t)
    return v


@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("core", [None, "diag", "full"])
def test_noncontiguous_parameters(core, dtype, device):
    """weight, bias, down, up, core, out_scale as views (tied / transposed weights, slices of packed buffers)."""
    case = replace(BASE, core=core, ru=4 if core == "full" else None, out_scale=True, layout="transposed")
    a = make_inputs(case, dtype, device)
    a = {k: _noncontiguous(v) if isinstance(v, torch.Tensor) and k != "x" else v for k, v in a.items()}
    assert_close_to_ref(call(OP, a), call(lowrank_linear_ref, a), call(lowrank_linear_ref, fp64(a)))
    g = randn(*case.lead, case.out, dtype=dtype, device=device)
    assert_grads_close_to_ref(
        NAMES, grads(OP, a, g), grads(lowrank_linear_ref, a, g), grads(lowrank_linear_ref, fp64(a), to_fp64(g))
    )


def _gradcheck(case: Case, device: str, requires_grad=NAMES):
    a = make_inputs(case, torch.float64, device)
    lv = leaves(a, requires_grad)
    names = [n for n in NAMES if lv[n] is not None]
    assert any(lv[n].requires_grad for n in names)

    def f(*ts):
        kw = dict(lv, **dict(zip(names, ts)))
        return call(OP, kw)

    assert torch.autograd.gradcheck(f, tuple(lv[n] for n in names))


SMALL = Case(lead=(2, 3), in_=5, out=4, rank=3, scale=-0.7)


# every core kind with and without out_scale, plus weight/bias absent (forward covers all 24 combinations)
GRADCHECK_OPTIONS = [(True, True, c, o) for c in (None, "diag", "full") for o in (True, False)] + [
    (False, True, "full", True),
    (True, False, "diag", False),
    (False, False, None, True),
]


@devices
@pytest.mark.parametrize("weight,bias,core,out_scale", GRADCHECK_OPTIONS)
def test_gradcheck_all_inputs(weight, bias, core, out_scale, device):
    _gradcheck(replace(SMALL, weight=weight, bias=bias, core=core, out_scale=out_scale,
                       ru=2 if core == "full" else None), device)


ONE_INPUT = [(n, None) for n in NAMES if n != "core"] + [("core", "diag"), ("core", "full")]


@devices
@pytest.mark.parametrize("name,core", ONE_INPUT, ids=[f"{n}-{c}" if c else n for n, c in ONE_INPUT])
def test_gradcheck_one_input(name, core, device):
    """Each input alone: exercises every single-entry output_mask of the backward op."""
    case = replace(SMALL, core=core or "diag", ru=2 if core == "full" else None, out_scale=True)
    _gradcheck(case, device, requires_grad=(name,))


@devices
def test_gradcheck_noncontiguous_x(device):
    _gradcheck(replace(SMALL, layout="permuted", core="full", ru=2, out_scale=True), device)


@pytest.mark.parametrize(
    "weight,core,out_scale",
    [
        pytest.param(True, None, False, id="core_none"),
        pytest.param(True, "full", False, id="core_full"),
        pytest.param(True, "diag", False, id="core_diag"),
        pytest.param(True, None, True, id="out_scale"),
        pytest.param(False, "diag", True, id="no_weight_core_diag_out_scale"),
    ],
)
def test_double_backward(weight, core, out_scale):
    """Second-order gradients (gradient penalties, Hessian-vector products) via gradgradcheck in fp64."""
    case = replace(SMALL, weight=weight, core=core, ru=2 if core == "full" else None, out_scale=out_scale)
    a = make_inputs(case, torch.float64, "cpu")
    lv = leaves(a)
    names = [n for n in NAMES if lv[n] is not None]

    def f(*ts):
        return call(OP, dict(lv, **dict(zip(names, ts))))

    assert torch.autograd.gradgradcheck(f, tuple(lv[n] for n in names))


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


@devices
@pytest.mark.parametrize("frozen", NAMES)
def test_only_requested_grads_are_computed(frozen, device):
    """A frozen input gets no .grad, and backward asks the kernel for exactly the others."""
    case = replace(BASE, lead=(2, 5), core="full", ru=4, out_scale=True)
    a = make_inputs(case, torch.float64, device)
    g = randn(2, 5, case.out, dtype=torch.float64, device=device)
    wanted = tuple(n for n in NAMES if n != frozen)
    lv = leaves(a, wanted)
    y = call(OP, lv)
    with _RecordOps() as rec:
        y.backward(g)
    bwd = [c for c in rec.calls if c[0] is BWD.default]
    assert len(bwd) == 1, [c[0] for c in rec.calls]
    _, args, kwargs = bwd[0]
    mask = kwargs["output_mask"] if "output_mask" in kwargs else args[8]
    assert list(mask) == [n != frozen for n in NAMES]
    assert lv[frozen].grad is None
    ref = grads(lowrank_linear_ref, a, g, wanted)
    for n, r in zip(NAMES, ref):
        if n != frozen:
            assert_close_to_ref(lv[n].grad, r, r, name=f"grad of {n}")


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_wrapper_without_gradient_skips_autograd(mode, requires_grad):
    """The typed wrapper reaches the kernel below the autograd key only when no gradient can flow:
    same values as the op either way, and a graph exactly when grad mode is on and an input requires grad."""
    case = replace(BASE, core="diag", out_scale=True)
    a = leaves(make_inputs(case, torch.float64), NAMES if requires_grad else ())
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        y = call(lowrank_linear, a)
        y_op = call(OP, a)
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    tracked = mode == "grad" and requires_grad
    assert y.requires_grad == tracked and (y.grad_fn is not None) == tracked
    if tracked:
        g = torch.ones_like(y)
        y.backward(g)
        ref = grads(lowrank_linear_ref, a, g)
        for n, r in zip(NAMES, ref):
            assert_close_to_ref(a[n].grad, r, r, name=f"grad of {n}")
    # grad mode is back on: the wrapper never leaves the autograd key excluded
    z = call(lowrank_linear, leaves(a, ("x",)))
    assert z.grad_fn is not None


@devices
@dtypes
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_with_h_returns_the_output_and_the_rank_r_intermediate(case, dtype, device):
    """lowrank_linear_with_h's y is lowrank_linear's, bit for bit, and h = x·downᵀ with x's leading dims."""
    a = make_inputs(case, dtype, device)
    y, h = call(OP_H, a)
    torch.testing.assert_close(y, call(OP, a), rtol=0, atol=0)
    assert h.shape == (*case.lead, case.rank) and h.dtype == dtype
    (_, h_ref), (_, h64) = call(lowrank_linear_with_h_ref, a), call(lowrank_linear_with_h_ref, fp64(a))
    assert_close_to_ref(h, h_ref, h64, name="h")


@devices
@pytest.mark.parametrize("mask", [(True,) * 7, (False, False, False, False, True, True, False)], ids=["all", "up_core"])
def test_backward_with_saved_h_equals_recomputed(mask, device):
    """The backward op given the forward's h returns what it returns when it recomputes h."""
    case = replace(BASE, lead=(2, 5), core="full", ru=4, out_scale=True)
    a = make_inputs(case, torch.float64, device)
    g = randn(2, 5, case.out, dtype=torch.float64, device=device)
    args = (g, a["x"], a["weight"], a["down"], a["up"], a["core"], a["scale"], a["out_scale"], list(mask))
    _, h = call(OP_H, a)
    for n, m, r, s in zip(NAMES, mask, BWD(*args), BWD(*args, h)):
        torch.testing.assert_close(s, r, rtol=1e-12, atol=1e-14, msg=f"grad of {n}")
        assert (s.numel() > 0) == m, n


def test_backward_bad_h_shape():
    a = make_inputs(BASE, torch.float64)
    g = randn(*BASE.lead, BASE.out, dtype=torch.float64, device="cpu")
    args = (g, a["x"], a["weight"], a["down"], a["up"], a["core"], a["scale"], a["out_scale"], [True] * 7)
    with pytest.raises(RuntimeError, match=r"`h` must have shape \(\.\.\., r\)"):
        BWD(*args, randn(*BASE.lead, BASE.rank + 1, dtype=torch.float64, device="cpu"))
    with pytest.raises(RuntimeError, match="`h` has dtype"):
        BWD(*args, randn(*BASE.lead, BASE.rank, dtype=torch.float32, device="cpu"))


def test_wrapper_saves_h_for_the_backward():
    """With a gradient to record, the wrapper's graph node is lowrank_linear_with_h's (h saved, not recomputed)."""
    a = leaves(make_inputs(BASE, torch.float64), NAMES)
    y = call(lowrank_linear, a)
    assert "lowrank_linear_with_h" in type(y.grad_fn).__name__
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert any(t.shape == (*BASE.lead, BASE.rank) for t in saved), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("requires_grad", [NAMES, ("x",), ("down", "up"), ("core", "out_scale")],
                         ids=["all", "x", "factors", "core_out_scale"])
def test_wrapper_eager_path_equals_registered_autograd(requires_grad):
    """The wrapper's eager grad path (an autograd.Function over the same setup/backward formulas)
    gives the registered autograd's gradients bit for bit, and double backward works through it."""
    case = replace(BASE, lead=(2, 5), core="full", ru=4, out_scale=True)
    a = make_inputs(case, torch.float64)
    g = randn(2, 5, case.out, dtype=torch.float64, device="cpu")
    via_wrapper, via_op = grads(lowrank_linear, a, g, requires_grad), grads(OP, a, g, requires_grad)
    for n, w, o in zip(NAMES, via_wrapper, via_op):
        assert (w is None) == (o is None), n
        if w is not None:
            torch.testing.assert_close(w, o, rtol=0, atol=0, msg=n)
    lv = leaves(a, requires_grad)
    assert type(call(lowrank_linear, lv).grad_fn).__name__ == "lowrank_linear_with_hBackward"
    inputs = tuple(lv[n] for n in requires_grad)
    assert torch.autograd.gradgradcheck(
        lambda *ts: call(lowrank_linear, dict(lv, **dict(zip(requires_grad, ts)))), inputs)


MASKS = [tuple(i == j for j in range(7)) for i in range(7)] + [
    (True,) * 7,
    (False,) * 7,
    (True, False, True, False, True, False, True),
    (False, True, False, True, False, True, False),
]


@devices
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_backward_op_output_mask(mask, device):
    """Unselected outputs are empty; selected ones equal the full computation and the reference."""
    case = replace(BASE, lead=(2, 5), core="full", ru=4, out_scale=True)
    a = make_inputs(case, torch.float64, device)
    g = randn(2, 5, case.out, dtype=torch.float64, device=device)
    args = (g, a["x"], a["weight"], a["down"], a["up"], a["core"], a["scale"], a["out_scale"])
    full = BWD(*args, [True] * 7)
    part = BWD(*args, list(mask))
    ref = grads(lowrank_linear_ref, a, g)
    for n, m, f, p, r in zip(NAMES, mask, full, part, ref):
        assert_close_to_ref(f, r, r, name=f"grad of {n} (full mask)")
        if m:
            torch.testing.assert_close(p, f, rtol=0, atol=0, msg=f"grad of {n}")
        else:
            assert p.numel() == 0, f"{n} was not requested but has shape {tuple(p.shape)}"


def test_backward_op_absent_inputs_give_empty():
    """weight/core/out_scale None: their outputs are empty even when requested; bias grad is still Σ grad."""
    case = replace(BASE, weight=False, bias=False)
    a = make_inputs(case, torch.float64, "cpu")
    g = randn(7, case.out, dtype=torch.float64, device="cpu")
    out = BWD(g, a["x"], None, a["down"], a["up"], None, a["scale"], None, [True] * 7)
    ref = grads(lowrank_linear_ref, a, g)
    for i in (1, 5, 6):
        assert out[i].numel() == 0, NAMES[i]
    torch.testing.assert_close(out[2], g.sum(0))
    for i in (0, 3, 4):
        assert_close_to_ref(out[i], ref[i], ref[i], name=NAMES[i])


# --------------------------------------------------------------------------- opcheck

OPCHECK_CASES = ids(
    [
        ("weight_bias", Case(lead=(3,), in_=6, out=5, rank=2)),
        ("core_diag_out_scale", Case(lead=(3,), in_=6, out=5, rank=2, core="diag", out_scale=True)),
        ("core_full_rect_out_scale_no_bias", Case(lead=(2, 3), in_=6, out=5, rank=3, ru=2, core="full",
                                                  out_scale=True, bias=False)),
        ("no_weight_no_bias", Case(lead=(3,), in_=6, out=5, rank=2, weight=False, bias=False)),
        ("x_transposed", Case(lead=(3,), in_=6, out=5, rank=2, layout="transposed", out_scale=True)),
    ]
)


# every sample with requires_grad (exercises the autograd registration and the backward's fake),
# two without (forward fake, schema)
OPCHECK_PARAMS = [pytest.param(p.values[0], True, id=f"{p.id}-grad") for p in OPCHECK_CASES] + [
    pytest.param(p.values[0], False, id=f"{p.id}-no_grad") for p in OPCHECK_CASES[1:3]
]


@devices
@pytest.mark.parametrize("op", [OP, OP_H], ids=["lowrank_linear", "with_h"])
@pytest.mark.parametrize("case,requires_grad", OPCHECK_PARAMS)
def test_opcheck(case, requires_grad, device, op):
    a = leaves(make_inputs(case, torch.float32, device), NAMES if requires_grad else ())
    torch.library.opcheck(op, (a["x"], a["weight"], a["bias"], a["down"], a["up"], a["core"], a["scale"],
                               a["out_scale"]))


@devices
@pytest.mark.parametrize(
    "case,mask",
    [
        pytest.param(OPCHECK_CASES[2].values[0], (True,) * 7, id="all_inputs-mask_all"),
        pytest.param(
            OPCHECK_CASES[3].values[0], (True, False, True, False, True, False, True), id="no_weight-mask_some"
        ),
    ],
)
def test_opcheck_backward_op(case, mask, device):
    a = make_inputs(case, torch.float32, device)
    g = randn(*case.lead, case.out, dtype=torch.float32, device=device)
    args = (g, a["x"], a["weight"], a["down"], a["up"], a["core"], a["scale"], a["out_scale"], list(mask))
    torch.library.opcheck(BWD, args)
    h = torch.nn.functional.linear(a["x"], a["down"])
    torch.library.opcheck(BWD, (*args, h))


# --------------------------------------------------------------------------- torch.compile


def _fwd_bwd(fn, a: dict, g: torch.Tensor):
    lv = leaves(a)
    y = call(fn, lv)
    y.backward(g)
    return [y.detach()] + [lv[n].grad if lv[n] is not None else None for n in NAMES]


def _compiled_fn(scale: float):
    def f(x, weight, bias, down, up, core, _scale, out_scale):
        # scale is a Python constant of the traced function, as in a layer
        return lowrank_linear(x, weight, bias, down, up, core, scale, out_scale)

    return f


def _compiled(backend: str, scale: float, **kw):
    return torch.compile(_compiled_fn(scale), backend=backend, fullgraph=True, **kw)


def _assert_same(got: list, want: list, **tol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{(['y'] + list(NAMES))[i]}: {m}")


@devices
@pytest.mark.parametrize(
    "case",
    ids(
        [
            ("all_inputs", replace(BASE, lead=(2, 5), core="full", ru=4, out_scale=True, scale=-0.5)),
            ("no_weight_core_diag", replace(BASE, weight=False, bias=False, core="diag")),
        ]
    ),
)
def test_compile_aot_eager_fullgraph(case, device):
    """fullgraph=True raises on any graph break; results equal eager bit for bit (same kernels)."""
    a = make_inputs(case, torch.float32, device)
    g = randn(*case.lead, case.out, dtype=torch.float32, device=device)
    want = _fwd_bwd(lowrank_linear, a, g)
    got = _fwd_bwd(_compiled("aot_eager", case.scale), a, g)
    _assert_same(got, want, rtol=0, atol=0)


@devices
def test_compile_dynamic_shapes_no_recompile(device):
    """The fake kernel traces symbolic token counts: a new T reuses the graph."""
    f = _compiled("aot_eager", 0.5, dynamic=True)
    case = replace(BASE, core="full", ru=4, out_scale=True)
    for t in (7, 33):
        a = make_inputs(replace(case, lead=(t,)), torch.float32, device)
        g = randn(t, case.out, dtype=torch.float32, device=device)
        want = _fwd_bwd(lowrank_linear, a, g)
        with torch._dynamo.config.patch(error_on_recompile=(t != 7)):
            got = _fwd_bwd(f, a, g)
        _assert_same(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_compile_inductor_fullgraph():
    """The one default-backend (inductor) compile: forward and backward equal eager.

    The graph is the op alone: each pointwise kernel inductor generates around it
    costs a g++ compile (~5 s on 2 cores), and the op itself is an extern call either way.
    """
    case = replace(BASE, lead=(2, 5), core="full", ru=4, out_scale=True, scale=-0.5)
    a = make_inputs(case, torch.float32, "cpu")
    g = randn(*case.lead, case.out, dtype=torch.float32, device="cpu")
    want = _fwd_bwd(lowrank_linear, a, g)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):  # no worker pool to start for one graph
        got = _fwd_bwd(torch.compile(_compiled_fn(case.scale), fullgraph=True), a, g)
    _assert_same(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- bad inputs


def _bad(**changes):
    def mutate(a):
        for k, v in changes.items():
            a[k] = v(a) if callable(v) else v
        return a

    return mutate


f32 = dict(dtype=torch.float32, device="cpu")
BAD = [
    ("down_in_mismatch", _bad(down=lambda a: randn(7, 32, **f32)), r"`down`"),
    ("weight_in_mismatch", _bad(weight=lambda a: randn(17, 32, **f32)), r"`weight`"),
    ("weight_out_mismatch", _bad(weight=lambda a: randn(16, 33, **f32)), r"`weight`"),
    ("up_rank_mismatch", _bad(up=lambda a: randn(17, 6, **f32)), r"`up`"),
    ("up_1d", _bad(up=lambda a: randn(17, **f32)), r"`up`"),
    ("down_1d", _bad(down=lambda a: randn(33, **f32)), r"`down`"),
    ("weight_float64", _bad(weight=lambda a: a["weight"].double()), r"`weight`.*dtype|dtype.*`weight`"),
    ("up_bfloat16", _bad(up=lambda a: a["up"].bfloat16()), r"`up`.*dtype|dtype.*`up`"),
    ("bias_float64", _bad(bias=lambda a: a["bias"].double()), r"`bias`.*dtype|dtype.*`bias`"),
    ("rank0", _bad(down=lambda a: randn(0, 33, **f32), up=lambda a: randn(17, 0, **f32)), r"rank.*`down`"),
    ("core_diag_wrong_len", _bad(core=lambda a: randn(6, **f32)), r"`core`"),
    ("core_full_wrong_shape", _bad(core=lambda a: randn(7, 6, **f32)), r"`core`"),
    ("core_3d", _bad(core=lambda a: randn(7, 7, 1, **f32)), r"`core`"),
    ("bias_wrong_len", _bad(bias=lambda a: randn(16, **f32)), r"`bias`"),
    ("bias_2d", _bad(bias=lambda a: randn(1, 17, **f32)), r"`bias`"),
    ("out_scale_wrong_len", _bad(out_scale=lambda a: randn(18, **f32)), r"`out_scale`"),
    ("out_scale_float64", _bad(out_scale=lambda a: randn(17, dtype=torch.float64, device="cpu")), r"`out_scale`"),
    ("x_int64", _bad(x=lambda a: torch.ones(7, 33, dtype=torch.int64)), r"`x`"),
    ("x_0d", _bad(x=lambda a: torch.tensor(1.0)), r"`x`"),
]


@pytest.mark.parametrize("mutate,match", [pytest.param(m, r, id=i) for i, m, r in BAD])
def test_bad_inputs_raise_naming_the_argument(mutate, match):
    a = mutate(make_inputs(BASE, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match=r"lowrank_linear") as exc:
        call(OP, a)
    assert exc.match(match)


@pytest.mark.parametrize("mutate,match", [pytest.param(m, r, id=i) for i, m, r in BAD[:4]])
def test_bad_inputs_raise_with_grad(mutate, match):
    """Same checks when the call goes through the autograd kernel."""
    a = leaves(mutate(make_inputs(BASE, torch.float32, "cpu")))
    with pytest.raises(RuntimeError, match=match):
        call(OP, a)


@pytest.mark.parametrize("where", ["up", "down", "x"])
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no_weight"])
def test_scale_zero_propagates_nan(where, weight):
    """scale = 0 must not hide a NaN or Inf in the rank-r term (BLAS skips its operands at alpha = 0):
    0·NaN = 0·Inf = NaN, as in the reference."""
    a = make_inputs(BASE, torch.float64, "cpu")
    a["core"] = None
    if not weight:
        a["weight"] = None
    a[where] = a[where].clone()
    a[where][0, 0] = float("nan") if where != "x" else float("inf")
    a["scale"] = 0.0
    got, want = call(OP, a), call(lowrank_linear_ref, a)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())


def test_backward_op_bad_grad_shape_same_numel():
    """A grad with the right element count but another shape is an error, not reinterpreted."""
    a = make_inputs(BASE, torch.float32, "cpu")
    x = a["x"].reshape(1, *a["x"].shape)
    g = randn(a["x"].shape[0], 1, 17, **f32)
    with pytest.raises(RuntimeError, match=r"lowrank_linear_backward: `grad` must have shape \(1, 7, 17\)"):
        torch.ops.lowrank_ops.lowrank_linear_backward(g, x, a["weight"], a["down"], a["up"], None, 0.5, None,
                                                      [True] * 7)


def test_backward_op_bad_grad_shape():
    a = make_inputs(BASE, torch.float32, "cpu")
    g = randn(7, 16, **f32)
    with pytest.raises(RuntimeError, match=r"lowrank_linear_backward.*`grad`"):
        BWD(g, a["x"], a["weight"], a["down"], a["up"], None, 0.5, None, [True] * 7)


# --------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_matches_cpu(dtype):
    """Same inputs on both backends agree within the tolerance rule (CPU result as 'PyTorch in this dtype')."""
    case = replace(BASE, lead=(2, 5), out=769, core="full", ru=4, out_scale=True)
    a_cpu = make_inputs(case, dtype, "cpu")
    a_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a_cpu.items()}
    ref = call(lowrank_linear_ref, fp64(a_cpu))
    assert_close_to_ref(call(OP, a_gpu).cpu(), call(lowrank_linear_ref, a_cpu), ref)


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_multithreaded(dtype):
    """Several intra-op threads (the suite otherwise runs on one, see conftest.py): the parallel
    row epilogue (16-row grains) and column reduction (256-column blocks) split across workers."""
    torch.set_num_threads(4)  # the autouse fixture restores the count afterwards
    assert torch.get_num_threads() > 1
    case = replace(BASE, lead=(4, 40), in_=65, out=769, core="full", ru=4, out_scale=True)
    a = make_inputs(case, dtype, "cpu")
    g = randn(4, 40, 769, dtype=dtype, device="cpu")
    assert_close_to_ref(call(OP, a), call(lowrank_linear_ref, a), call(lowrank_linear_ref, fp64(a)))
    assert_grads_close_to_ref(
        NAMES, grads(OP, a, g), grads(lowrank_linear_ref, a, g), grads(lowrank_linear_ref, fp64(a), to_fp64(g))
    )
