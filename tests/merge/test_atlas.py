"""aTLAS: learned per-tensor coefficients lower the loss; ∂L/∂λ_{t,b} = ⟨∂L/∂θ_b, τ_t^b⟩."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lowrank_ops import merge
from lowrank_ops.merge.atlas import compose, learn_coefficients


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tasks = [{k: v + 0.3 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    # targets come from a model that uses task 0 in the first layer and task 1 in the second
    target = {k: base[k] + (tasks[0][k] - base[k] if k.startswith("0.") else tasks[1][k] - base[k]) for k in base}
    x = torch.randn(64, 4, dtype=torch.float64)
    with torch.no_grad():
        y = functional_call(net, target, (x,))
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    return net, base, tasks, data


def test_gradient_is_inner_product_with_task_vector():
    net, base, tasks, data = _setup()
    names = list(base)
    deltas = [{k: t[k] - base[k] for k in names} for t in tasks]
    coef = torch.rand(2, len(names), dtype=torch.float64, requires_grad=True)
    x, y = data[0]
    loss = nn.functional.mse_loss(functional_call(net, compose(base, deltas, names, coef), (x,)), y)
    (g_coef,) = torch.autograd.grad(loss, coef)
    # the same loss as a function of the parameters themselves
    params = {k: v.detach().requires_grad_(True) for k, v in compose(base, deltas, names, coef.detach()).items()}
    loss2 = nn.functional.mse_loss(functional_call(net, params, (x,)), y)
    g_param = torch.autograd.grad(loss2, [params[k] for k in names])
    expected = torch.tensor([[float((g * d[k]).sum()) for g, k in zip(g_param, names)] for d in deltas],
                            dtype=torch.float64)
    torch.testing.assert_close(g_coef, expected)


def test_learned_coefficients_reduce_the_loss():
    net, base, tasks, data = _setup()
    res = learn_coefficients(net, base, tasks, nn.functional.mse_loss, data, steps=150, lr=0.05)
    assert res.coefficients.shape == (2, len(base))
    assert sum(res.losses[-4:]) < 0.2 * sum(res.losses[:4])
    # anisotropic: the first layer leans on task 0, the second on task 1
    c = dict(zip(res.names, res.coefficients.T))
    assert c["0.weight"][0] > c["0.weight"][1] and c["2.weight"][1] > c["2.weight"][0]
    merged = merge.atlas(base, tasks, model=net, loss_fn=nn.functional.mse_loss, data=data, steps=150, lr=0.05)
    x, y = data[0]
    before = nn.functional.mse_loss(functional_call(net, compose(base, [{k: t[k] - base[k] for k in base} for t in tasks],
                                                                 list(base), torch.full((2, len(base)), 0.5,
                                                                                        dtype=torch.float64)), (x,)), y)
    after = nn.functional.mse_loss(functional_call(net, merged, (x,)), y)
    assert float(after) < 0.5 * float(before)


def test_whole_model_method_only():
    assert not merge.atlas.streamable
    with pytest.raises(ValueError, match="model=, loss_fn= and data="):
        merge.atlas({"w": torch.zeros(2)}, [{"w": torch.ones(2)}])
