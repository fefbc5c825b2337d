"""DoRALinear's two caches — the eval-mode ``m/n`` factor and the ``‖W₀‖²`` rows —
never serve stale values across the points where a user can edit parameters
behind autograd's back: in-place edits through ``.data`` followed by a
``train()``/``eval()`` switch, ``load_state_dict`` (also ``assign=True``), or an
explicit ``refresh_weight_norm()``.  Ordinary updates are caught by the cheap
version/storage check, and forward never re-reads ``W₀`` to check.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import ops
from lowrank_ops.nn import DoRALinear
from lowrank_ops.reference import dora_linear_ref

IN, OUT, R = 16, 12, 4


def _layer(seed: int = 0) -> DoRALinear:
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(IN, OUT), r=R, alpha=8, init="random")
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, OUT))
    return layer


def _ref(layer: DoRALinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dora_linear_ref(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight,
                               layer.lora_B.weight, layer.lora_magnitude_vector, layer.scaling)[0]


def _check(layer: DoRALinear, x: torch.Tensor) -> None:
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, _ref(layer, x), rtol=1e-5, atol=1e-5)
    expected_wn2 = layer.base_layer.weight.detach().double().square().sum(1)
    torch.testing.assert_close(layer.weight_norm_sq.double(), expected_wn2, rtol=1e-6, atol=1e-6)


X = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))


def _edits():
    return {
        "lora_B": lambda l: l.lora_B.weight.data.mul_(3.0),
        "lora_A": lambda l: l.lora_A.weight.data.add_(0.5),
        "magnitude": lambda l: l.lora_magnitude_vector.data.mul_(2.0),
        "base": lambda l: l.base_layer.weight.data.mul_(0.5),
    }


# --------------------------------------------------------------------------- mode switches


@pytest.mark.parametrize("what", list(_edits()))
def test_data_edit_in_eval_then_train_eval_switch(what):
    """Edit through .data while evaluating (m/n cached), then switch modes: no stale factor or ‖W‖²."""
    layer = _layer().eval()
    with torch.no_grad():
        layer(X)  # fills the eval cache
    _edits()[what](layer)
    layer.train()
    _check(layer, X)
    layer.eval()
    _check(layer, X)


@pytest.mark.parametrize("what", list(_edits()))
def test_data_edit_in_train_then_eval(what):
    """Edit through .data while training (e.g. init code, surgery), then eval(): fresh caches."""
    layer = _layer().eval()
    with torch.no_grad():
        layer(X)
    layer.train()
    _edits()[what](layer)
    layer.eval()
    _check(layer, X)


def test_review_repro_base_weight_then_train():
    """The review's repro, second half: base weight edited through .data in eval, then train()."""
    layer = _layer().eval()
    with torch.no_grad():
        layer(X)
        layer.lora_B.weight.data.mul_(3.0)
        layer.base_layer.weight.data.mul_(0.5)
    layer.train()
    _check(layer, X)


def test_parent_module_switch_reaches_the_layer():
    """model.eval()/train() on an enclosing module refreshes the DoRA layers inside it."""
    layer = _layer()
    model = nn.Sequential(nn.Identity(), layer).eval()
    with torch.no_grad():
        model(X)
    layer.base_layer.weight.data.mul_(0.5)
    layer.lora_B.weight.data.mul_(3.0)
    model.train()
    model.eval()
    _check(layer, X)


def test_eval_again_drops_the_eval_factor():
    """eval() on a layer already in eval mode drops the cached m/n (it is free to rebuild)."""
    layer = _layer().eval()
    with torch.no_grad():
        layer(X)
    layer.lora_B.weight.data.mul_(3.0)
    layer.eval()
    _check(layer, X)


def test_train_when_training_does_not_reread_weight(monkeypatch):
    """train() every step (as training loops do) costs no pass over W; only a real switch does."""
    layer = _layer()
    calls = []
    real = layer.refresh_weight_norm
    monkeypatch.setattr(layer, "refresh_weight_norm", lambda: (calls.append(1), real())[1])
    for _ in range(3):
        layer.train()
    assert calls == []
    layer.eval()
    assert len(calls) == 1
    layer.eval()
    assert len(calls) == 1
    layer.train()
    assert len(calls) == 2


def test_forward_does_not_reread_weight(monkeypatch):
    """Training steps (adapter parameters change, W does not) never recompute ‖W‖²."""
    layer = _layer()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    calls = []
    real = layer.refresh_weight_norm
    monkeypatch.setattr(layer, "refresh_weight_norm", lambda: (calls.append(1), real())[1])
    for _ in range(3):
        layer(X).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert calls == []
    _check(layer, X)


# --------------------------------------------------------------------------- staying in one mode


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("what", list(_edits()))
def test_data_edit_without_switch_needs_refresh_weight_norm(what, mode):
    """The documented case: a .data edit with no mode switch is picked up by refresh_weight_norm()."""
    layer = getattr(_layer(), mode)()
    with torch.no_grad():
        layer(X)
    _edits()[what](layer)
    layer.refresh_weight_norm()
    _check(layer, X)


@pytest.mark.parametrize("what", list(_edits()))
def test_ordinary_in_place_update_is_seen_in_eval(what):
    """In-place updates that autograd sees (optimizer steps, no_grad ops) need nothing."""
    layer = _layer().eval()
    with torch.no_grad():
        layer(X)
        p = {"lora_B": layer.lora_B.weight, "lora_A": layer.lora_A.weight,
             "magnitude": layer.lora_magnitude_vector, "base": layer.base_layer.weight}[what]
        p.mul_(1.5)
    _check(layer, X)


def test_replaced_base_weight_is_seen_in_train():
    """A base weight replaced by a new tensor (fresh version counter) refreshes ‖W‖²."""
    layer = _layer()
    w = layer.base_layer.weight
    fresh = nn.Parameter(w.detach() * 0.5, requires_grad=False)
    with torch.no_grad():
        while fresh._version < w._version:  # make the version counters collide
            fresh.mul_(1.0)
    assert fresh._version == w._version
    layer.base_layer.weight = fresh
    _check(layer, X)


# --------------------------------------------------------------------------- load_state_dict


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_load_state_dict_refreshes(assign, mode):
    """Loading another layer's weights (base included) leaves no stale m/n or ‖W‖², also with assign=True."""
    layer = getattr(_layer(0), mode)()
    with torch.no_grad():
        layer(X)
    other = _layer(0)  # same construction: every version counter equal to layer's
    other.base_layer.weight.data.mul_(0.5)
    other.lora_B.weight.data.mul_(3.0)
    layer.load_state_dict(copy.deepcopy(other.state_dict()), assign=assign)
    _check(layer, X)


def test_load_state_dict_of_enclosing_model_refreshes():
    layer = _layer(0)
    model = nn.Sequential(layer).eval()
    with torch.no_grad():
        model(X)
    other = nn.Sequential(_layer(0))
    other[0].base_layer.weight.data.mul_(0.5)
    model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    _check(layer, X)


def test_low_precision_layer_hands_the_fp32_cache_to_the_kernels():
    """A bf16 DoRA layer passes its fp32 ‖W₀‖² cache as is (the kernels accumulate in fp32): its norm is
    the uncached op's bit for bit, where a cache rounded to bf16 first lost precision."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(64, 48).bfloat16(), r=4, alpha=8, init="random")
    assert layer.weight_norm_sq.dtype == torch.float32
    w, a, b = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer._norm(), ops.dora_norm(w, a, b, layer.scaling), rtol=0, atol=0)
