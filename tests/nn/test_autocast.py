"""The adapter layers and their fused ops under ``torch.autocast``.

Semantics (``lowrank_ops/ops/lowrank.py``, autocast section): ``lowrank_linear``,
``lowrank_linear_with_h`` and ``dora_linear`` act like ``F.linear`` — every floating
argument is cast to the autocast region's dtype, except ``dora_linear``'s
``weight_norm_sq``, which the kernel reads in its fp32 accumulation dtype — and
``dora_norm`` runs in fp32, as autocast's norms do.  So an adapter over an fp32
``nn.Linear`` takes the low-precision activations of a preceding layer, returns the
autocast dtype and gives fp32 gradients to its fp32 parameters, eager and compiled.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import ops
from lowrank_ops.nn import DoRALinear, LoRALinear, VeRALinear, vera_projections
from lowrank_ops.reference import dora_linear_ref, lowrank_linear_ref
from utils import cuda_param

KINDS = ["lora", "dora", "vera"]
#: cuda is always listed so it shows as skipped (not absent) without a GPU.
DEVICES = [pytest.param("cpu", id="cpu"), cuda_param("cuda", id="cuda")]
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
IN, OUT, R = 16, 12, 4


def _layer(kind: str, device: str = "cpu") -> nn.Module:
    """An fp32 adapter whose adapter term matters (non-zero B / λ_b)."""
    base = nn.Linear(IN, OUT)
    if kind == "vera":
        a, b = vera_projections(R, IN, OUT, seed=0)
        layer = VeRALinear(base, a, b)
        with torch.no_grad():
            layer.vera_lambda_b.normal_()
    else:
        cls = DoRALinear if kind == "dora" else LoRALinear
        layer = cls(base, r=R, alpha=8, init="random")
    if kind == "dora":
        with torch.no_grad():  # m ≠ ‖W + sBA‖ so the scale is not 1
            layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, OUT))
    return layer.to(device)


def _explicit(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype, params: dict | None = None) -> torch.Tensor:
    """The layer's math through its op with every argument cast to ``dtype`` by hand, autocast off.

    ``params`` optionally overrides the adapter parameters (leaves to take gradients of).
    """
    p = dict(layer.named_parameters()) if params is None else params
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    c = lambda t: t.to(dtype)  # noqa: E731
    with torch.autocast(x.device.type, enabled=False):
        if isinstance(layer, DoRALinear):
            # weight_norm_sq stays fp32: the kernel accumulates the norm in fp32
            return ops.dora_linear(c(x), c(w), c(bias), c(p["lora_A.weight"]), c(p["lora_B.weight"]),
                                   c(p["lora_magnitude_vector"]), layer.scaling, layer.weight_norm_sq)[0]
        if isinstance(layer, LoRALinear):
            return ops.lowrank_linear(c(x), c(w), c(bias), c(p["lora_A.weight"]), c(p["lora_B.weight"]), None,
                                      layer.scaling)
        down = layer.vera_A[:, :IN]
        up = layer.vera_B[:OUT, :] * p["vera_lambda_b"].unsqueeze(1)
        return ops.lowrank_linear(c(x), c(w), c(bias), c(down), c(up), c(p["vera_lambda_d"]), 1.0)


def _fp32_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    x = x.double()
    d = lambda t: t.detach().double()  # noqa: E731
    if isinstance(layer, DoRALinear):
        return dora_linear_ref(x, d(w), d(bias), d(layer.lora_A.weight), d(layer.lora_B.weight),
                               d(layer.lora_magnitude_vector), layer.scaling)[0]
    if isinstance(layer, LoRALinear):
        return lowrank_linear_ref(x, d(w), d(bias), d(layer.lora_A.weight), d(layer.lora_B.weight), None,
                                  layer.scaling)
    up = layer.vera_B[:OUT].double() * d(layer.vera_lambda_b).unsqueeze(1)
    return lowrank_linear_ref(x, d(w), d(bias), layer.vera_A[:, :IN].double(), up, d(layer.vera_lambda_d), 1.0)


def _trainable(layer: nn.Module) -> dict:
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- the reported failure


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_after_linear_under_autocast_like_nn_linear(kind, mode, device):
    """The review's repro: a preceding nn.Linear hands bf16 activations to an fp32 adapter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, IN), _layer(kind)).to(device)
    getattr(model, mode)()
    plain = nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, OUT)).to(device)
    x = torch.randn(3, IN, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = model(x)
        y_plain = plain(x)
    assert y.dtype == y_plain.dtype == torch.bfloat16
    with torch.no_grad():
        ref = _fp32_reference(model[1], model[0](x))
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- forward: exactly F.linear's casts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_explicitly_cast_inputs(kind, dtype, device):
    """Under autocast(dtype) the layer computes its op on inputs cast to ``dtype`` — bit for bit."""
    if device == "cpu" and dtype == torch.float16 and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    torch.manual_seed(0)
    layer = _layer(kind, device)
    for x in (torch.randn(2, 5, IN, device=device), torch.randn(2, 5, IN, device=device).to(dtype)):
        with torch.autocast(device, dtype=dtype):
            y = layer(x)
        assert y.dtype == dtype
        with torch.no_grad():
            expected = _explicit(layer, x, dtype)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_no_grad_under_autocast(kind, device):
    """Inference (DoRA's cached m/n path included) returns the autocast dtype and the fp32 result to bf16 accuracy."""
    torch.manual_seed(0)
    layer = _layer(kind, device).eval()
    x = torch.randn(4, IN, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        y1, y2 = layer(x), layer(x)  # second call: DoRA's cached factor
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1.double(), _fp32_reference(layer, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dropout_path_under_autocast_returns_autocast_dtype(kind):
    """With adapter dropout (a separate base GEMM) the output stays in the autocast dtype, as nn.Linear's does."""
    torch.manual_seed(0)
    cls = DoRALinear if kind == "dora" else LoRALinear
    layer = cls(nn.Linear(IN, OUT), r=R, alpha=8, dropout=0.1, init="random").train()
    x = torch.randn(3, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for n, p in _trainable(layer).items():
        assert p.grad is not None and p.grad.dtype == torch.float32, n


def test_bf16_dora_eval_cache_survives_leaving_autocast():
    """An m/n factor cached under autocast (fp32 norm) still serves a bf16 layer outside autocast."""
    torch.manual_seed(0)
    layer = _layer("dora").to(torch.bfloat16).eval()
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ac = layer(x)
        y = layer(x)
    assert y.dtype == y_ac.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ac, rtol=0, atol=0)


# --------------------------------------------------------------------------- the ops


def test_dora_norm_runs_in_fp32_under_autocast():
    """dora_norm is on the fp32 side (as autocast's norms): bf16 arguments are upcast, the result is fp32."""
    torch.manual_seed(0)
    w, a, b = torch.randn(OUT, IN), torch.randn(R, IN), torch.randn(OUT, R)
    for args in ((w, a, b), (w.bfloat16(), a.bfloat16(), b.bfloat16()), (w, a.bfloat16(), b)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            n = ops.dora_norm(*args, 0.5)
        assert n.dtype == torch.float32
        expected = ops.dora_norm(*(t.float() for t in args), 0.5)
        torch.testing.assert_close(n, expected, rtol=0, atol=0)


def test_ops_outside_autocast_unchanged():
    """Outside autocast mixed dtypes are still an error (no silent casts)."""
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.lowrank_linear(x, None, None, torch.randn(R, IN), torch.randn(OUT, R), None, 1.0)


def test_float64_is_not_cast():
    """As autocast does for its own ops, float64 arguments are left alone."""
    torch.manual_seed(0)
    args = [torch.randn(3, IN, dtype=torch.float64), torch.randn(OUT, IN, dtype=torch.float64), None,
            torch.randn(R, IN, dtype=torch.float64), torch.randn(OUT, R, dtype=torch.float64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lowrank_linear(*args, None, 0.5)
    assert y.dtype == torch.float64


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_gives_fp32_grads_equal_to_explicit_casts(kind, device):
    """fp32 parameters get fp32 gradients, the same as through hand-written casts (as nn.Linear under autocast)."""
    torch.manual_seed(0)
    layer = _layer(kind, device)
    x = torch.randn(2, 5, IN, device=device)
    g = torch.randn(2, 5, OUT, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g.to(y.dtype))
    leaves = {n: p.detach().clone().requires_grad_() for n, p in _trainable(layer).items()}
    _explicit(layer, x, torch.bfloat16, {**dict(layer.named_parameters()), **leaves}).backward(g.bfloat16())
    assert leaves.keys() and leaves.keys() == _trainable(layer).keys()
    for n, p in _trainable(layer).items():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, leaves[n].grad, rtol=1e-6, atol=1e-6, msg=n)
    assert layer.base_layer.weight.grad is None


def test_backward_reaches_the_input_in_its_dtype():
    """The input's gradient comes back in the input's dtype (fp32 from an fp32 x), through the cast."""
    torch.manual_seed(0)
    layer = _layer("lora")
    x = torch.randn(3, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


# --------------------------------------------------------------------------- torch.compile


class _CountingBackend:
    def __init__(self, inner: str = "aot_eager") -> None:
        self.graphs = 0
        self.inner = inner

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.inner)(gm, example_inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_under_autocast(kind):
    """fullgraph=True traces the autocast region in one graph; output and fp32 grads equal eager's."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(IN, IN), _layer(kind))
    compiled_model = copy.deepcopy(eager)
    backend = _CountingBackend()
    torch._dynamo.reset()

    def step(model, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    fn = torch.compile(step, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, IN)
    y_e, y_c = step(eager, x), fn(compiled_model, x)
    assert backend.graphs == 1
    assert y_c.dtype == torch.bfloat16
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    y_e.float().square().sum().backward()
    y_c.float().square().sum().backward()
    ge, gc = _trainable(eager[1]), _trainable(compiled_model[1])
    for n in ge:
        assert gc[n].grad.dtype == torch.float32, n
        torch.testing.assert_close(gc[n].grad, ge[n].grad, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.slow
def test_compile_inductor_dora_under_autocast():
    torch.manual_seed(0)
    layer = _layer("dora")
    x = torch.randn(4, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_e = layer(x)
        y_c = torch.compile(layer, fullgraph=True)(x)
    assert y_c.dtype == torch.bfloat16
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)


# --------------------------------------------------------------------------- peft as an oracle


@pytest.mark.peft
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_matches_peft_under_autocast(dora):
    peft = pytest.importorskip("peft")

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(IN, IN), nn.Linear(IN, OUT)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    base = M()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=8, target_modules=["b"],
                                                                  init_lora_weights=False, use_dora=dora))
    pb = pm.base_model.model.b
    ours = copy.deepcopy(base)
    cls = DoRALinear if dora else LoRALinear
    ours.b = cls(ours.b, r=R, alpha=8)
    with torch.no_grad():
        ours.b.lora_A.weight.copy_(pb.lora_A["default"].weight)
        ours.b.lora_B.weight.copy_(pb.lora_B["default"].weight)
        if dora:
            ours.b.lora_magnitude_vector.copy_(pb.lora_magnitude_vector["default"].weight * 1.1)
            pb.lora_magnitude_vector["default"].weight.mul_(1.1)
    x = torch.randn(3, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yp, yo = pm(x), ours(x)
    assert yo.dtype == yp.dtype == torch.bfloat16
    torch.testing.assert_close(yo.float(), yp.float(), rtol=2e-2, atol=2e-2)
    yp.float().sum().backward()
    yo.float().sum().backward()
    pairs = [(ours.b.lora_A.weight, pb.lora_A["default"].weight), (ours.b.lora_B.weight, pb.lora_B["default"].weight)]
    for o, p in pairs:
        assert o.grad.dtype == p.grad.dtype == torch.float32
        torch.testing.assert_close(o.grad, p.grad, rtol=5e-2, atol=5e-2)
