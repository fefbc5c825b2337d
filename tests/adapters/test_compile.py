"""torch.compile(fullgraph=True) of a small transformer with injected adapters:
a training step and inference equal eager, with no graph break (fullgraph
raises on one)."""
from __future__ import annotations

import copy

import pytest
import torch

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters

from .tiny_models import make

TARGET = r".*(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj)$"


def _model(cfg, layers=2):
    model = adapters.inject(make(layers=layers), cfg, target=TARGET)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _step(fn, model, ids):
    loss = fn(ids).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "cfg, backend",
    [
        pytest.param(adapters.DoRA(r=4, alpha=8), "inductor", marks=pytest.mark.slow, id="dora-inductor"),
        pytest.param(adapters.LoRA(r=4, alpha=8), "aot_eager", id="lora-aot_eager"),
        pytest.param(adapters.DoRA(r=4, alpha=8), "aot_eager", id="dora-aot_eager"),
        pytest.param(adapters.VeRA(r=8), "aot_eager", id="vera-aot_eager"),
    ],
)
def test_compiled_train_step_and_inference_match_eager(cfg, backend):
    torch._dynamo.reset()
    eager = _model(cfg, layers=1 if backend == "inductor" else 2)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))

    loss_e, grads_e = _step(eager, eager, ids)
    loss_c, grads_c = _step(compiled, compiled_model, ids)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_e.keys() == grads_c.keys() and grads_e
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-5, msg=n)

    with torch.no_grad():  # inference takes the fused out_scale path for DoRA
        torch.testing.assert_close(compiled(ids), eager(ids), rtol=1e-5, atol=1e-5)
