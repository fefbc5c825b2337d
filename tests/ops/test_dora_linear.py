"""Tests of ``lowrank_ops.dora_linear`` (DoRA's forward with one pass over W) and its backward op.

Oracle: ``lowrank_ops.reference.dora_linear_ref`` — peft's algorithm: materialize
``up·down``, take dense row norms, detach them, rescale — in fp64 for the truth
and in the tested dtype for PyTorch's own error (tolerance rule in utils.py).
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.ops import dora_linear
from lowrank_ops.reference import dora_linear_ref
from utils import DEVICES, DTYPES, assert_close_to_ref, assert_grads_close_to_ref, randn, to_fp64

OP = torch.ops.lowrank_ops.dora_linear
BWD = torch.ops.lowrank_ops.dora_linear_backward
NAMES = ("x", "weight", "bias", "down", "up", "magnitude")

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
devices = pytest.mark.parametrize("device", DEVICES)


def make_inputs(lead, n_in, out, rank, dtype=torch.float32, device="cpu", bias=True) -> dict:
    w = randn(out, n_in, dtype=dtype, device=device, std=n_in**-0.5)
    return dict(
        x=randn(*lead, n_in, dtype=dtype, device=device),
        weight=w,
        bias=randn(out, dtype=dtype, device=device) if bias else None,
        down=randn(rank, n_in, dtype=dtype, device=device, std=n_in**-0.5),
        up=randn(out, rank, dtype=dtype, device=device, std=rank**-0.5),
        magnitude=(1 + 0.1 * randn(out, dtype=torch.float64, device="cpu")).to(device=device, dtype=dtype),
    )


def fp64(a: dict) -> dict:
    return {k: to_fp64(v) for k, v in a.items()}


def grads(fn, a: dict, scale: float, g: torch.Tensor) -> list:
    lv = {k: (None if v is None else v.detach().requires_grad_()) for k, v in a.items()}
    fn(**lv, scale=scale)[0].backward(g)
    return [None if lv[n] is None else lv[n].grad for n in NAMES]


# (leading dims of x, in, out, rank, scale, bias)
CASES = [
    pytest.param((7,), 33, 17, 7, 0.5, True, id="T7_in33_out17_r7"),
    pytest.param((2, 5), 65, 33, 1, -1.5, False, id="batched_rank1_nobias"),
    pytest.param((1,), 33, 769, 7, 2.0, True, id="T1_out769"),
    pytest.param((0,), 33, 17, 3, 0.5, True, id="T0"),
    pytest.param((3, 0, 2), 33, 17, 3, 0.5, True, id="empty_batch"),
    pytest.param((9,), 16, 40, 24, 1.0, True, id="rank_gt_in"),
    # few tokens, wide W: the stacked [x; down] GEMM and the input gradient run mirrored on CPU where the
    # rule says so (cpp/common.h, by CPU vendor)
    pytest.param((3,), 64, 90, 8, 0.5, True, id="few_rows_T3_r8_stacked"),
    pytest.param((2, 10), 100, 120, 4, -0.5, False, id="few_rows_T20_mirrored"),
]


@devices
@dtypes
@pytest.mark.parametrize("lead,n_in,out,rank,scale,bias", CASES)
def test_forward_matches_reference(lead, n_in, out, rank, scale, bias, dtype, device):
    a = make_inputs(lead, n_in, out, rank, dtype, device, bias)
    y, pre, n, h = dora_linear(**a, scale=scale)
    ref = dora_linear_ref(**a, scale=scale)
    ref64 = dora_linear_ref(**fp64(a), scale=scale)
    assert y.shape == (*lead, out) and pre.shape == (*lead, out) and n.shape == (out,) and h.shape == (*lead, rank)
    for name, ours, r, r64 in zip(("y", "pre_scale", "norm", "h"), (y, pre, n, h), ref, ref64):
        assert_close_to_ref(ours, r.detach(), r64.detach(), name=name)


@devices
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cached_weight_norm_sq_equals_uncached(dtype, device):
    a = make_inputs((5,), 33, 17, 4, dtype, device)
    wn = a["weight"].float().square().sum(1).to(dtype)
    before = wn.clone()
    y0 = dora_linear(**a, scale=0.5)[0]
    y1 = dora_linear(**a, scale=0.5, weight_norm_sq=wn)[0]
    torch.testing.assert_close(y1, y0)
    assert torch.equal(wn, before)  # the caller's cache is never written


@devices
@dtypes
@pytest.mark.parametrize("lead,n_in,out,rank,scale,bias", CASES[:3] + CASES[5:])
def test_backward_matches_reference(lead, n_in, out, rank, scale, bias, dtype, device):
    """Gradients of y with the norm held constant, as peft computes them."""
    a = make_inputs(lead, n_in, out, rank, dtype, device, bias)
    g = randn(*lead, out, dtype=dtype, device=device)
    assert_grads_close_to_ref(
        NAMES,
        grads(dora_linear, a, scale, g),
        grads(dora_linear_ref, a, scale, g),
        grads(dora_linear_ref, fp64(a), scale, to_fp64(g)),
    )


@devices
def test_gradcheck_inputs_outside_the_norm(device):
    """x, bias and magnitude do not enter the (detached) norm, so their gradients are exact derivatives."""
    a = make_inputs((2, 3), 7, 5, 3, torch.float64, device)
    x, b, m = (a[k].requires_grad_() for k in ("x", "bias", "magnitude"))
    f = lambda x, b, m: OP(x, a["weight"], b, a["down"], a["up"], m, 0.7)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, b, m))
    assert torch.autograd.gradgradcheck(f, (x, b, m))


def test_pre_scale_norm_and_h_are_non_differentiable():
    a = make_inputs((2, 3), 7, 5, 3, torch.float64)
    lv = {k: v.detach().requires_grad_() for k, v in a.items()}
    y, pre, n, h = OP(**lv, scale=0.7)
    assert y.requires_grad and not pre.requires_grad and not n.requires_grad and not h.requires_grad


MASKS = [(1, 1, 1, 1, 1, 1), (1, 0, 0, 0, 0, 0), (0, 0, 0, 1, 1, 0), (0, 0, 0, 0, 0, 1), (0, 1, 1, 0, 0, 0)]


@devices
@pytest.mark.parametrize("mask", [tuple(map(bool, m)) for m in MASKS], ids=["".join(map(str, m)) for m in MASKS])
def test_backward_op_output_mask(mask, device):
    a = make_inputs((6,), 33, 17, 5, torch.float64, device)
    y, pre, n, h = OP(**a, scale=0.5)
    g = randn(6, 17, dtype=torch.float64, device=device)
    outs = BWD(g, a["x"], a["weight"], a["down"], a["up"], a["magnitude"], 0.5, pre, n, list(mask))
    outs_h = BWD(g, a["x"], a["weight"], a["down"], a["up"], a["magnitude"], 0.5, pre, n, list(mask), h)
    full = grads(dora_linear_ref, a, 0.5, g)
    for name, want, got, got_h, ref in zip(NAMES, mask, outs, outs_h, full):
        if want:
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=name)
            torch.testing.assert_close(got_h, got, rtol=1e-12, atol=1e-14, msg=f"{name} with the saved h")
        else:
            assert got.numel() == 0 and got_h.numel() == 0, name


def test_cancelling_rows_are_exact():
    """A row where the adapter cancels W (n ≪ ‖W_j‖) falls back to the dense norm."""
    g = torch.Generator().manual_seed(0)
    a = make_inputs((4,), 65, 9, 3, torch.float32)
    ud = a["up"] @ a["down"]
    a["weight"][:3] = -0.5 * ud[:3] + 1e-3 * torch.randn(3, 65, generator=g)
    n = dora_linear(**a, scale=0.5)[2]
    ref = torch.linalg.vector_norm(a["weight"].double() + 0.5 * (a["up"] @ a["down"]).double(), dim=1)
    torch.testing.assert_close(n.double(), ref, rtol=1e-4, atol=0)


def test_opcheck():
    for bias in (True, False):
        a = make_inputs((3, 2), 9, 6, 2, torch.float64, bias=bias)
        torch.library.opcheck(OP, (*a.values(), 0.5))
        torch.library.opcheck(OP, (*a.values(), 0.5, a["weight"].square().sum(1)))
        lv = {k: (None if v is None else v.detach().requires_grad_()) for k, v in a.items()}
        torch.library.opcheck(OP, (*lv.values(), 0.5))
    y, pre, n, h = OP(**a, scale=0.5)
    g = torch.randn_like(y)
    args = (g, a["x"], a["weight"], a["down"], a["up"], a["magnitude"], 0.5, pre, n, [True] * 6)
    torch.library.opcheck(BWD, args)
    torch.library.opcheck(BWD, (*args, h))


def test_compile_fullgraph():
    a = make_inputs((4,), 16, 8, 2, torch.float32)
    lv = {k: v.detach().requires_grad_() for k, v in a.items()}
    f = torch.compile(lambda **kw: dora_linear(**kw, scale=0.5)[0].square().sum(), fullgraph=True, backend="aot_eager")
    f(**lv).backward()
    got = [lv[k].grad for k in NAMES]
    lv2 = {k: v.detach().requires_grad_() for k, v in a.items()}
    dora_linear(**lv2, scale=0.5)[0].square().sum().backward()
    for name, gg, ref in zip(NAMES, got, (lv2[k].grad for k in NAMES)):
        torch.testing.assert_close(gg, ref, msg=name)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(magnitude=torch.ones(5)), "`magnitude` must have shape"),
        (dict(down=torch.ones(2, 8)), "`down` must have shape"),
        (dict(up=torch.ones(6, 3)), "share the rank"),
        (dict(bias=torch.ones(7)), "`bias` must have shape"),
        (dict(weight=torch.ones(6, 9, dtype=torch.float64)), "`weight` has dtype"),
        (dict(down=torch.ones(0, 9), up=torch.ones(6, 0)), "rank must be >= 1"),
        (dict(weight_norm_sq=torch.ones(3)), "`weight_norm_sq` must have shape"),
        (dict(weight_norm_sq=torch.ones(6, dtype=torch.int64)), "`weight_norm_sq` must be a floating"),
    ],
)
def test_bad_inputs(change, match):
    a = make_inputs((3,), 9, 6, 2, torch.float32)
    a.update(change)
    wn = a.pop("weight_norm_sq", None)
    with pytest.raises(RuntimeError, match=match):
        OP(**a, scale=0.5, weight_norm_sq=wn)


def test_backward_op_checks_saved_tensors():
    """pre_scale and norm of the wrong dtype are named, not a bare ATen dtype error."""
    a = make_inputs((3,), 9, 6, 2, torch.float32)
    y, pre, norm, h = OP(**a, scale=0.5)
    BWD = torch.ops.lowrank_ops.dora_linear_backward
    args = lambda pre, norm: (torch.ones_like(y), a["x"], a["weight"], a["down"], a["up"], a["magnitude"], 0.5,  # noqa: E731
                              pre, norm, [True] * 6)
    with pytest.raises(RuntimeError, match=r"dora_linear_backward: `pre_scale` has dtype Double"):
        BWD(*args(pre.double(), norm))
    with pytest.raises(RuntimeError, match=r"dora_linear_backward: `norm` must be a floating tensor"):
        BWD(*args(pre, norm.to(torch.int32)))


def test_scale_zero_propagates_nan():
    """scale = 0 keeps a NaN of `up` in the output (BLAS would skip the rank-r term at alpha = 0)."""
    a = make_inputs((3,), 9, 6, 2, torch.float64)
    a["up"] = a["up"].clone()
    a["up"][1, 0] = float("nan")
    y, pre = OP(**a, scale=0.0)[:2]
    assert torch.isnan(pre[:, 1]).all() and torch.isnan(y[:, 1]).all()


def test_wrapper_eager_path_equals_registered_autograd():
    """The wrapper's eager grad path (an autograd.Function over the registered formulas) gives the
    registered autograd's gradients bit for bit."""
    a = make_inputs((2, 5), 33, 17, 7, torch.float64)
    g = randn(2, 5, 17, dtype=torch.float64, device="cpu")
    for n, w, o in zip(NAMES, grads(dora_linear, a, 0.5, g), grads(OP, a, 0.5, g)):
        torch.testing.assert_close(w, o, rtol=0, atol=0, msg=n)
    lv = {k: v.detach().requires_grad_() for k, v in a.items()}
    assert type(dora_linear(**lv, scale=0.5)[0].grad_fn).__name__ == "dora_linearBackward"
