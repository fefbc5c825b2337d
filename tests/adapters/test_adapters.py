"""Adapter layers and the adapters API, checked against their math."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters
from lowrank_ops.nn import AdapterLinear, DoRALinear, LoRALinear, VeRALinear

from .tiny_models import make

TARGET = r".*(q_proj|v_proj|up_proj)$"
CONFIGS = {
    "lora": lambda: adapters.LoRA(r=4, alpha=8),
    "rslora": lambda: adapters.LoRA(r=4, alpha=8, use_rslora=True),
    "dora": lambda: adapters.DoRA(r=4, alpha=8),
    "vera": lambda: adapters.VeRA(r=16),
}


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter off its identity init so outputs really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _ids(seed=0, b=2, t=7):
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_identity_at_init(name):
    base = make(dtype=torch.float64)
    ids = _ids()
    y0 = base(ids)
    model = adapters.inject(copy.deepcopy(base), CONFIGS[name](), target=TARGET)
    torch.testing.assert_close(model(ids), y0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_dense_delta(name):
    """y == F.linear(x, W + ΔW, b) with ΔW = delta_weight(), per layer, fp64."""
    model = adapters.inject(make(dtype=torch.float64), CONFIGS[name](), target=TARGET)
    _randomize(model)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    for _, layer in adapters.adapter_layers(model):
        if layer.in_features != 32:
            continue
        base = layer.base_layer
        dense = torch.nn.functional.linear(x, base.weight + layer.delta_weight(), base.bias)
        torch.testing.assert_close(layer(x), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_unmerge_and_unload(name):
    model = adapters.inject(make(dtype=torch.float64), CONFIGS[name](), target=TARGET)
    _randomize(model)
    ids = _ids()
    y = model(ids)
    w_before = {n: l.base_layer.weight.clone() for n, l in adapters.adapter_layers(model)}
    for _, layer in adapters.adapter_layers(model):
        layer.merge()
        layer.merge()  # idempotent
    torch.testing.assert_close(model(ids), y, rtol=1e-10, atol=1e-10)
    for n, layer in adapters.adapter_layers(model):
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w_before[n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(ids), y, rtol=1e-10, atol=1e-10)
    merged = adapters.merge_and_unload(model)
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    assert isinstance(merged.layers[0].q_proj, nn.Linear)
    torch.testing.assert_close(merged(ids), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_adapter_parameters_train(name):
    model = adapters.inject(make(), CONFIGS[name](), target=TARGET)
    _randomize(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_suffix = {"lora": ("lora_A.weight", "lora_B.weight"), "rslora": ("lora_A.weight", "lora_B.weight"),
                       "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
                       "vera": ("vera_lambda_b", "vera_lambda_d")}[name]
    assert trainable and all(n.endswith(expected_suffix) for n in trainable)
    n_layers = sum(1 for _ in adapters.adapter_layers(model))
    assert n_layers == 6 and len(trainable) == n_layers * len(expected_suffix)
    model(_ids()).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_lora_scaling_and_rslora():
    lin = nn.Linear(16, 8)
    assert LoRALinear(lin, r=4, alpha=8).scaling == 2.0
    assert LoRALinear(nn.Linear(16, 8), r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_dora_magnitude_init_is_row_norm():
    lin = nn.Linear(16, 8).double()
    layer = DoRALinear(lin, r=3)
    torch.testing.assert_close(layer.lora_magnitude_vector, lin.weight.norm(dim=1))


def test_dora_norm_cache_follows_inplace_base_edits():
    """Editing the frozen base weight in place must not leave a stale ‖W‖² cache."""
    layer = DoRALinear(nn.Linear(16, 8).double(), r=3, init="random")
    x = torch.randn(4, 16, dtype=torch.float64)
    layer(x)
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)
    dense = torch.nn.functional.linear(x, layer.base_layer.weight + layer.delta_weight(), layer.base_layer.bias)
    w = layer.base_layer.weight
    ref_norm = (w + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).norm(dim=1)
    torch.testing.assert_close(layer._norm(), ref_norm)
    torch.testing.assert_close(layer(x), dense)


def test_vera_projections_shared_and_seeded():
    model = adapters.inject(make(), adapters.VeRA(r=8, projection_prng_key=7), target=TARGET)
    layers = [l for _, l in adapters.adapter_layers(model)]
    assert all(isinstance(l, VeRALinear) for l in layers)
    assert len({l.vera_A.data_ptr() for l in layers}) == 1  # one shared tensor
    again = adapters.inject(make(), adapters.VeRA(r=8, projection_prng_key=7), target=TARGET)
    other = adapters.inject(make(), adapters.VeRA(r=8, projection_prng_key=8), target=TARGET)
    a0 = next(adapters.adapter_layers(again))[1].vera_A
    assert torch.equal(layers[0].vera_A, a0)
    assert not torch.equal(layers[0].vera_A, next(adapters.adapter_layers(other))[1].vera_A)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_roundtrip(tmp_path, name):
    model = adapters.inject(make(), CONFIGS[name](), target=TARGET)
    _randomize(model)
    ids = _ids()
    adapters.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("VERA" if name == "vera" else "LORA")
    assert cfg["target_modules"] == TARGET
    loaded = adapters.load_pretrained(make(), tmp_path)
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_vera_without_saved_projection_regenerates(tmp_path):
    model = adapters.inject(make(), adapters.VeRA(r=8, save_projection=False, projection_prng_key=5), target=TARGET)
    _randomize(model)
    adapters.save_pretrained(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.vera_A" not in f.keys()
    loaded = adapters.load_pretrained(make(), tmp_path)
    ids = _ids()
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        adapters.inject(make(), adapters.LoRA(r=4), target=r".*nonexistent$")
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        adapters.LoRA(r=0)
    with pytest.raises(ValueError, match="only nn.Linear"):
        adapters.inject(make(), adapters.LoRA(r=4), target=r".*norm1$")
    model = adapters.inject(make(), adapters.LoRA(r=4), target=TARGET)
    with pytest.raises(ValueError, match="already carries"):
        adapters.inject(model, adapters.LoRA(r=4), target=TARGET)
    with pytest.raises(ValueError, match="no lowrank_ops adapters"):
        adapters.save_pretrained(make(), "/nonexistent/never-written")
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), r=2)
    with pytest.raises(ValueError, match="unknown init"):
        LoRALinear(nn.Linear(4, 4), r=2, init="svd?")


def test_load_rejects_mismatched_files(tmp_path):
    model = adapters.inject(make(), adapters.LoRA(r=4), target=TARGET)
    adapters.save_pretrained(model, tmp_path)
    # a model carrying the same config on another set of modules
    other = adapters.inject(make(), adapters.LoRA(r=4), target=r".*q_proj$")
    with pytest.raises(ValueError, match="does not match"):
        adapters.load_pretrained(other, tmp_path)
    wrong_rank = adapters.inject(make(), adapters.LoRA(r=2), target=TARGET)
    with pytest.raises(ValueError, match="holds"):
        adapters.load_pretrained(wrong_rank, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        adapters.load_pretrained(make(), tmp_path)


def test_dora_eval_cache_tracks_parameter_updates():
    """Eager inference caches m/n; any in-place update of W, A, B or m must invalidate it."""
    layer = DoRALinear(nn.Linear(16, 8).double(), r=3, init="random").eval()
    x = torch.randn(4, 16, dtype=torch.float64)

    def dense():
        w = layer.base_layer.weight
        return torch.nn.functional.linear(x, w + layer.delta_weight(), layer.base_layer.bias)

    with torch.no_grad():
        y1 = layer(x)
        torch.testing.assert_close(y1, dense())
        for p in (layer.lora_B.weight, layer.lora_A.weight, layer.lora_magnitude_vector, layer.base_layer.weight):
            p.mul_(1.5)
            y2 = layer(x)
            torch.testing.assert_close(y2, dense())
            assert not torch.allclose(y1, y2)
            y1 = y2
