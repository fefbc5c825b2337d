"""Tests of ``lowrank_ops.dora_norm`` (row norms of ``W + scale·up·down``) and its backward op.

Oracle: ``lowrank_ops.reference.dora_norm_ref``, which materializes ``W + scale·up·down``
as peft's DoRA does, run in fp64 for the truth and in the tested dtype for
PyTorch's own error (utils.py).
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.ops import dora_norm, lowrank_linear
from lowrank_ops.reference import dora_norm_ref, lowrank_linear_ref
from utils import (
    DEVICES,
    DTYPES,
    assert_close_to_ref,
    assert_grads_close_to_ref,
    randn,
    requires_cuda,
    to_fp64,
)

OP = torch.ops.lowrank_ops.dora_norm
BWD = torch.ops.lowrank_ops.dora_norm_backward
NAMES = ("weight", "down", "up")

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
devices = pytest.mark.parametrize("device", DEVICES)


def make_inputs(out: int, n_in: int, rank: int, dtype=torch.float32, device="cpu") -> dict:
    """Rows of W with norm ~1 and an adapter term of the same order (so neither term hides the other)."""
    return dict(
        weight=randn(out, n_in, dtype=dtype, device=device, std=n_in**-0.5),
        down=randn(rank, n_in, dtype=dtype, device=device, std=n_in**-0.5),
        up=randn(out, rank, dtype=dtype, device=device, std=rank**-0.5),
    )


def fp64(a: dict) -> dict:
    return {k: to_fp64(v) for k, v in a.items()}


def leaves(a: dict, requires_grad=NAMES) -> dict:
    return {k: v.detach().requires_grad_(k in requires_grad) for k, v in a.items()}


def grads(fn, a: dict, scale: float, g: torch.Tensor, weight_norm_sq=None) -> list:
    lv = leaves(a)
    fn(lv["weight"], lv["down"], lv["up"], scale, weight_norm_sq).backward(g)
    return [lv[n].grad for n in NAMES]


# (out, in, rank, scale)
CASES = [
    pytest.param(17, 33, 7, 0.5, id="out17_in33_r7"),
    pytest.param(1, 33, 7, 2.0, id="out1"),
    pytest.param(0, 33, 3, 0.5, id="out0"),
    pytest.param(17, 65, 1, -1.5, id="rank1_scale_negative"),
    pytest.param(769, 33, 7, 0.25, id="out769_r7"),
    pytest.param(33, 65, 7, 0.0, id="scale0"),
    pytest.param(40, 16, 24, 1.0, id="rank_gt_in"),
]


# --------------------------------------------------------------------------- forward


@devices
@dtypes
@pytest.mark.parametrize("out,n_in,rank,scale", CASES)
def test_forward_matches_reference(out, n_in, rank, scale, dtype, device):
    a = make_inputs(out, n_in, rank, dtype, device)
    n = dora_norm(a["weight"], a["down"], a["up"], scale)
    assert n.shape == (out,) and n.dtype == dtype
    assert_close_to_ref(n, dora_norm_ref(**a, scale=scale), dora_norm_ref(**fp64(a), scale=scale))


def _cancelling_inputs(noise: float, dtype, device) -> dict:
    """W ≈ -s·up·down plus a residual: ‖W_j + s·up_j·down‖ ≈ 2·noise·‖W_j‖ (noise ≤ 0.3)."""
    g = torch.Generator().manual_seed(0)
    out, n_in, r, s = 33, 65, 7, CANCEL_SCALE
    down = torch.randn(r, n_in, dtype=torch.float64, generator=g) / n_in**0.5
    up = torch.randn(out, r, dtype=torch.float64, generator=g) / r**0.5
    ud = up @ down
    res = torch.randn(out, n_in, dtype=torch.float64, generator=g) * ud.norm(dim=1, keepdim=True) / n_in**0.5
    a = {k: v.to(device=device, dtype=dtype) for k, v in dict(weight=-s * ud + noise * res, down=down, up=up).items()}
    ratio = dora_norm_ref(**fp64(a), scale=s) / a["weight"].double().norm(dim=1)
    assert ratio.max() < 0.8 and ratio.median() < 2.5 * noise  # the regime these tests are about
    return a


CANCEL_SCALE = 0.5


@devices
@dtypes
@pytest.mark.parametrize("noise", [0.03, 0.1, 0.3], ids=["norm~0.06W", "norm~0.2W", "norm~0.5W"])
def test_forward_under_cancellation(noise, dtype, device):
    """Rows where the adapter nearly cancels W: the factored identity subtracts terms of size ‖W_j‖²,
    yet the norm must still meet the tolerance rule (0.5·‖W_j‖ is where the op switches to the dense formula)."""
    a = _cancelling_inputs(noise, dtype, device)
    s = CANCEL_SCALE
    assert_close_to_ref(OP(**a, scale=s), dora_norm_ref(**a, scale=s), dora_norm_ref(**fp64(a), scale=s))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_backward_under_cancellation(dtype):
    """Gradients in the same regime as test_forward_under_cancellation: rows whose norm is far below
    ‖W_j‖ are differentiated through the dense V_j, like the forward."""
    a = _cancelling_inputs(0.03, dtype, "cpu")
    s = CANCEL_SCALE
    gy = randn(33, dtype=dtype, device="cpu")
    assert_grads_close_to_ref(
        NAMES, grads(OP, a, s, gy), grads(dora_norm_ref, a, s, gy), grads(dora_norm_ref, fp64(a), s, to_fp64(gy))
    )


@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_noncontiguous_inputs(dtype, device):
    """W as the transposed view of an (in, out) buffer (tied weights), down/up as column slices."""
    a = make_inputs(33, 65, 7, dtype, device)
    a = dict(
        weight=a["weight"].t().contiguous().t(),
        down=torch.cat([a["down"], a["down"]], 1)[:, :65],
        up=torch.cat([a["up"], torch.full_like(a["up"], float("nan"))], 1)[:, :7],
    )
    assert not any(v.is_contiguous() for v in a.values())
    assert_close_to_ref(OP(**a, scale=0.5), dora_norm_ref(**a, scale=0.5), dora_norm_ref(**fp64(a), scale=0.5))
    g = randn(33, dtype=dtype, device=device)
    assert_grads_close_to_ref(
        NAMES, grads(OP, a, 0.5, g), grads(dora_norm_ref, a, 0.5, g), grads(dora_norm_ref, fp64(a), 0.5, to_fp64(g))
    )


def test_double_backward():
    """Second-order gradients (gradient penalties, Hessian-vector products) via gradgradcheck in fp64."""
    a = leaves(make_inputs(6, 5, 3, torch.float64, "cpu"))
    assert torch.autograd.gradgradcheck(lambda w, d, u: OP(w, d, u, 0.5), (a["weight"], a["down"], a["up"]))


@devices
@dtypes
def test_weight_norm_sq_given_equals_not_given(dtype, device):
    a = make_inputs(33, 65, 7, dtype, device)
    wn = a["weight"].double().square().sum(1).to(dtype)  # the cache a frozen W would keep
    given = OP(a["weight"], a["down"], a["up"], 0.7, wn)
    not_given = OP(a["weight"], a["down"], a["up"], 0.7)
    ref64 = dora_norm_ref(**fp64(a), scale=0.7)
    assert_close_to_ref(given, dora_norm_ref(**a, scale=0.7), ref64)
    if dtype in (torch.float64, torch.float32):
        torch.testing.assert_close(given, not_given, rtol=4 * torch.finfo(dtype).eps, atol=0)


@devices
def test_weight_norm_sq_from_weight_gives_the_same_gradients(device):
    """A cache computed differentiably from W: by the chain rule, the same gradients as no cache."""
    a = make_inputs(17, 33, 7, torch.float64, device)
    g = randn(17, dtype=torch.float64, device=device)
    want = grads(OP, a, 0.7, g)
    lv = leaves(a)
    OP(lv["weight"], lv["down"], lv["up"], 0.7, lv["weight"].square().sum(1)).backward(g)
    for n, w in zip(NAMES, want):
        torch.testing.assert_close(lv[n].grad, w, rtol=1e-12, atol=1e-13, msg=n)


@devices
def test_weight_norm_sq_not_modified(device):
    a = make_inputs(17, 33, 7, torch.float32, device)
    wn = a["weight"].square().sum(1).requires_grad_()
    before, version = wn.detach().clone(), wn._version
    lv = leaves(a)
    OP(lv["weight"], lv["down"], lv["up"], 0.5, wn).sum().backward()
    assert wn._version == version, "weight_norm_sq was written in place"
    torch.testing.assert_close(wn.detach(), before, rtol=0, atol=0)


@devices
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("cached", [False, True], ids=["no_cache", "cache"])
def test_zero_rows(cached, dtype, device):
    """W row and up row zero: norm exactly 0, every gradient finite and 0 in that row."""
    a = make_inputs(9, 33, 7, dtype, device)
    a["weight"][[2, 5]] = 0
    a["up"][[2, 5]] = 0
    wn = a["weight"].float().square().sum(1) if cached else None
    lv = leaves(a)
    n = OP(lv["weight"], lv["down"], lv["up"], 0.5, wn)
    assert (n[[2, 5]] == 0).all()
    assert (n[[0, 1, 3]] > 0).all()
    n.backward(torch.ones_like(n))
    for name in NAMES:
        assert torch.isfinite(lv[name].grad).all(), name
    assert (lv["weight"].grad[[2, 5]] == 0).all()
    assert (lv["up"].grad[[2, 5]] == 0).all()
    if dtype == torch.float64 and not cached:
        # PyTorch's norm backward also takes the zero subgradient: all rows must agree
        ref = grads(dora_norm_ref, a, 0.5, torch.ones_like(n))
        for name, r in zip(NAMES, ref):
            torch.testing.assert_close(lv[name].grad, r, rtol=1e-12, atol=1e-13, msg=name)


# --------------------------------------------------------------------------- backward

GRAD_CASES = [c for c in CASES if c.id in ("out17_in33_r7", "out1", "out0", "rank1_scale_negative", "out769_r7",
                                           "scale0")]


@devices
@dtypes
@pytest.mark.parametrize("out,n_in,rank,scale", GRAD_CASES)
def test_backward_matches_reference(out, n_in, rank, scale, dtype, device):
    a = make_inputs(out, n_in, rank, dtype, device)
    g = randn(out, dtype=dtype, device=device)
    assert_grads_close_to_ref(
        NAMES,
        grads(dora_norm, a, scale, g),
        grads(dora_norm_ref, a, scale, g),
        grads(dora_norm_ref, fp64(a), scale, to_fp64(g)),
    )


@devices
@pytest.mark.parametrize("scale", [0.5, -2.0, 0.0])
@pytest.mark.parametrize("wrt", [NAMES, ("weight",), ("down",), ("up",)], ids=["all", "weight", "down", "up"])
def test_gradcheck(wrt, scale, device):
    a = leaves(make_inputs(6, 5, 3, torch.float64, device), wrt)

    def f(*ts):
        kw = dict(a, **dict(zip(wrt, ts)))
        return OP(kw["weight"], kw["down"], kw["up"], scale)

    assert torch.autograd.gradcheck(f, tuple(a[n] for n in wrt))


@devices
@pytest.mark.parametrize("scale", [0.5, -2.0])
def test_gradcheck_with_weight_norm_sq(scale, device):
    """weight_norm_sq as an independent input: gradients w.r.t. it and w.r.t. W's cross term."""
    a = leaves(make_inputs(6, 5, 3, torch.float64, device))
    wn = (a["weight"].detach().square().sum(1) + 0.5).requires_grad_()  # not ‖W‖²: truly independent
    f = lambda w, d, u, c: OP(w, d, u, scale, c)  # noqa: E731
    assert torch.autograd.gradcheck(f, (a["weight"], a["down"], a["up"], wn))


@devices
def test_gradcheck_weight_norm_sq_alone(device):
    """Only the cache requires grad: its gradient must still be computed (not skipped with W's)."""
    a = make_inputs(6, 5, 3, torch.float64, device)
    wn = (a["weight"].square().sum(1) + 0.5).requires_grad_()
    f = lambda c: OP(a["weight"], a["down"], a["up"], 0.5, c)  # noqa: E731
    assert torch.autograd.gradcheck(f, (wn,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cache_on_cancelling_rows_keeps_its_definition(dtype):
    """Rows recomputed densely (norm < ‖W_j‖/2) keep the op's definition with a cache that is not
    ‖W‖² (n² = cache + cross terms): no jump between the factored rows and the recomputed ones,
    and the gradient w.r.t. the cache stays c/2 there."""
    a = _cancelling_inputs(0.03, dtype, "cpu")
    s = CANCEL_SCALE
    wn = a["weight"].double().square().sum(1).to(dtype) + 0.25
    got = OP(**a, scale=s, weight_norm_sq=wn)
    want = dora_norm_ref(**fp64(a), scale=s, weight_norm_sq=wn.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    if dtype == torch.float64:
        c = wn.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda c: OP(**a, scale=s, weight_norm_sq=c), (c,))


def test_cache_equal_to_row_norms_keeps_dense_accuracy():
    """A cache that equals ‖W‖² up to its own rounding (computed another way) must not bring back the
    cancellation error on the recomputed rows: same accuracy as without a cache."""
    a = _cancelling_inputs(0.03, torch.float32, "cpu")
    s = CANCEL_SCALE
    wn = torch.linalg.vector_norm(a["weight"], dim=1).square()  # fp32, another reduction order
    truth = dora_norm_ref(**fp64(a), scale=s)
    err_cache = ((OP(**a, scale=s, weight_norm_sq=wn).double() - truth) / truth).abs().max()
    err_plain = ((OP(**a, scale=s).double() - truth) / truth).abs().max()
    assert err_cache <= 2 * err_plain + 1e-7


@pytest.mark.parametrize("cached", [False, True], ids=["no_cache", "cache"])
def test_non_finite_weight_row(cached):
    """An Inf in W_j gives n_j = Inf and a NaN gives NaN, as the materialized formula does
    (the factored one computed Inf − Inf = NaN for the Inf row); the other rows are untouched."""
    a = make_inputs(5, 9, 2)
    a["weight"][1, 3] = float("inf")
    a["weight"][3, 0] = float("nan")
    wn = a["weight"].square().sum(1) if cached else None
    got = OP(**a, scale=0.5, weight_norm_sq=wn)
    want = dora_norm_ref(**a, scale=0.5)
    assert got[1] == float("inf") and torch.isnan(got[3])
    torch.testing.assert_close(got[[0, 2, 4]], want[[0, 2, 4]])


DORA_MASKS = [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (0, 0, 0)]


@devices
@pytest.mark.parametrize("mask", [tuple(map(bool, m)) for m in DORA_MASKS], ids=["".join(map(str, m)) for m in DORA_MASKS])
def test_backward_op_output_mask(mask, device):
    a = make_inputs(17, 33, 7, torch.float64, device)
    g = randn(17, dtype=torch.float64, device=device)
    norm = OP(a["weight"], a["down"], a["up"], 0.5)
    full = BWD(g, norm, a["weight"], a["down"], a["up"], 0.5, [True] * 3)
    part = BWD(g, norm, a["weight"], a["down"], a["up"], 0.5, list(mask))
    ref = grads(dora_norm_ref, a, 0.5, g)
    for n, m, f, p, r in zip(NAMES, mask, full, part, ref):
        assert_close_to_ref(f, r, r, name=f"grad of {n}")
        if m:
            torch.testing.assert_close(p, f, rtol=0, atol=0, msg=n)
        else:
            assert p.numel() == 0, f"{n} not requested but has shape {tuple(p.shape)}"


# --------------------------------------------------------------------------- opcheck / compile


@devices
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("cached", [False, True], ids=["no_cache", "cache"])
def test_opcheck(cached, requires_grad, device):
    a = leaves(make_inputs(6, 5, 3, torch.float32, device), NAMES if requires_grad else ())
    wn = a["weight"].detach().square().sum(1).requires_grad_(requires_grad) if cached else None
    torch.library.opcheck(OP, (a["weight"], a["down"], a["up"], 0.5, wn))


@devices
def test_opcheck_backward_op(device):
    a = make_inputs(6, 5, 3, torch.float32, device)
    norm = OP(a["weight"], a["down"], a["up"], 0.5)
    g = randn(6, dtype=torch.float32, device=device)
    torch.library.opcheck(BWD, (g, norm, a["weight"], a["down"], a["up"], 0.5, [True, False, True]))


def _fwd_bwd(fn, a: dict, g):
    lv = leaves(a, requires_grad=tuple(a))
    y = fn(*lv.values())
    y.backward(g)
    return [y.detach()] + [v.grad for v in lv.values()]


@devices
def test_compile_aot_eager_fullgraph(device):
    a = make_inputs(17, 33, 7, torch.float32, device)
    a["weight_norm_sq"] = a["weight"].square().sum(1)
    g = randn(17, dtype=torch.float32, device=device)

    def f(weight, down, up, weight_norm_sq):
        return dora_norm(weight, down, up, -0.5) + dora_norm(weight, down, up, 0.5, weight_norm_sq)

    want = _fwd_bwd(f, a, g)
    got = _fwd_bwd(torch.compile(f, backend="aot_eager", fullgraph=True), a, g)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=0, atol=0)


@devices
def test_compile_dora_layer_fullgraph(device):
    """DoRA's forward, m ⊙ (W + s·up·down)x / ‖W + s·up·down‖, from both ops in one graph; vs the reference."""
    out, n_in = 17, 33
    a = make_inputs(out, n_in, 7, torch.float32, device)
    a["magnitude"] = 1 + 0.1 * randn(out, dtype=torch.float32, device=device)
    a["x"] = randn(2, 5, n_in, dtype=torch.float32, device=device)
    g = randn(2, 5, out, dtype=torch.float32, device=device)

    def dora(weight, down, up, magnitude, x, norm_fn=dora_norm, linear=lowrank_linear):
        return linear(x, weight, None, down, up, None, 0.5, magnitude / norm_fn(weight, down, up, 0.5))

    got = _fwd_bwd(torch.compile(dora, backend="aot_eager", fullgraph=True), a, g)
    eager = _fwd_bwd(dora, a, g)
    ref = _fwd_bwd(lambda *t: dora(*t, norm_fn=dora_norm_ref, linear=lowrank_linear_ref), a, g)
    for e, o, r in zip(eager, got, ref):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad inputs

f32 = dict(dtype=torch.float32, device="cpu")
BAD = [
    ("down_in_mismatch", dict(down=randn(7, 32, **f32)), r"`down`"),
    ("down_1d", dict(down=randn(33, **f32)), r"`down`"),
    ("rank0", dict(down=randn(0, 33, **f32), up=randn(17, 0, **f32)), r"`down`"),
    ("up_out_mismatch", dict(up=randn(16, 7, **f32)), r"`up`"),
    ("up_rank_mismatch", dict(up=randn(17, 6, **f32)), r"`up`"),
    ("weight_1d", dict(weight=randn(33, **f32)), r"`weight`"),
    ("weight_int", dict(weight=torch.ones(17, 33, dtype=torch.int32)), r"`weight`"),
    ("down_float64", dict(down=randn(7, 33, dtype=torch.float64, device="cpu")), r"`down`"),
    ("up_bfloat16", dict(up=randn(17, 7, dtype=torch.bfloat16, device="cpu")), r"`up`"),
    ("weight_norm_sq_wrong_len", dict(weight_norm_sq=randn(16, **f32)), r"`weight_norm_sq`"),
    ("weight_norm_sq_2d", dict(weight_norm_sq=randn(17, 1, **f32)), r"`weight_norm_sq`"),
    ("weight_norm_sq_int", dict(weight_norm_sq=torch.ones(17, dtype=torch.int64)), r"`weight_norm_sq` must be a floating"),
]


@pytest.mark.parametrize("change,match", [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_bad_inputs_raise_naming_the_argument(change, match):
    a = dict(make_inputs(17, 33, 7), weight_norm_sq=None)
    a.update(change)
    with pytest.raises(RuntimeError, match=r"dora_norm") as exc:
        OP(a["weight"], a["down"], a["up"], 0.5, a["weight_norm_sq"])
    assert exc.match(match)


def test_backward_op_bad_grad_shape():
    a = make_inputs(17, 33, 7)
    norm = OP(a["weight"], a["down"], a["up"], 0.5)
    with pytest.raises(RuntimeError, match=r"dora_norm_backward.*`grad`"):
        BWD(randn(16, **f32), norm, a["weight"], a["down"], a["up"], 0.5, [True] * 3)


# --------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.cuda
@dtypes
def test_cuda_matches_cpu(dtype):
    a = make_inputs(769, 65, 7, dtype, "cpu")
    got = OP(*(v.cuda() for v in a.values()), 0.5).cpu()
    assert_close_to_ref(got, dora_norm_ref(**a, scale=0.5), dora_norm_ref(**fp64(a), scale=0.5))


def test_wrapper_eager_path_equals_registered_autograd():
    """The wrapper's eager grad path gives the registered autograd's gradients bit for bit,
    with and without a cache, and double backward works through it."""
    a = make_inputs(17, 33, 7, torch.float64)
    g = randn(17, dtype=torch.float64, device="cpu")
    for wn in (None, a["weight"].square().sum(1) + 0.1):
        via = [grads(fn, a, 0.5, g, wn) for fn in (dora_norm, lambda *args: OP(*args))]
        for n, w, o in zip(NAMES, *via):
            torch.testing.assert_close(w, o, rtol=0, atol=0, msg=n)
    lv = leaves(a)
    assert type(dora_norm(lv["weight"], lv["down"], lv["up"], 0.5).grad_fn).__name__ == "dora_normBackward"
    assert torch.autograd.gradgradcheck(lambda w, d, u: dora_norm(w, d, u, 0.5), (lv["weight"], lv["down"], lv["up"]))
