"""peft as an oracle: the same adapter gives the same outputs, gradients and
merged weights in both libraries, and files move both ways.  Skips cleanly
when peft is not installed (CI installs it, so these run there)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters

from .tiny_models import make

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.peft

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _peft_config(kind: str):
    if kind == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    if kind == "dora":
        return peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False,
                               use_dora=True, use_rslora=True)
    return peft.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=11)


def _peft_model(kind: str, base):
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_config(kind))
    if kind == "vera":  # λ_b starts at 0: move it so the adapter matters
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "vera_lambda" in n:
                    p.normal_()
    return pm


def _grads(model):
    return {n.replace("base_model.model.", "").replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_peft_file_loads_into_ours_with_same_outputs_and_grads(tmp_path, kind):
    base = make()
    pm = _peft_model(kind, base)
    pm.save_pretrained(tmp_path)
    ours = adapters.load_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))

    yp, yo = pm(ids), ours(ids)
    torch.testing.assert_close(yo, yp, rtol=1e-5, atol=1e-5)
    yp.square().mean().backward()
    yo.square().mean().backward()
    gp, go = _grads(pm), _grads(ours)
    assert gp.keys() == go.keys() and len(go) > 0
    for n in go:
        torch.testing.assert_close(go[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_our_file_loads_in_peft(tmp_path, kind):
    base = make()
    pm = _peft_model(kind, base)
    pm.save_pretrained(tmp_path / "peft")
    ours = adapters.load_pretrained(copy.deepcopy(base), tmp_path / "peft")
    adapters.save_pretrained(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_merged_weights_match_peft(tmp_path, kind):
    base = make(dtype=torch.float32)
    pm = _peft_model(kind, base)
    pm.save_pretrained(tmp_path)
    ours = adapters.merge_and_unload(adapters.load_pretrained(copy.deepcopy(base), tmp_path))
    theirs = pm.merge_and_unload()
    sd_o, sd_p = ours.state_dict(), theirs.state_dict()
    assert sd_o.keys() == sd_p.keys()
    for k in sd_o:
        torch.testing.assert_close(sd_o[k], sd_p[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fresh_lora_init_has_peft_shape_bounds_and_zero_b():
    """peft's default init: A Kaiming-uniform (a=√5) of the same shape and bound, B zero.
    The draws themselves differ (each library consumes the RNG its own way)."""
    base = make()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    ours = adapters.inject(copy.deepcopy(base), adapters.LoRA(r=4, alpha=8), target=["q_proj"])
    a_p = pm.base_model.model.layers[0].q_proj.lora_A["default"].weight
    a_o = ours.layers[0].q_proj.lora_A.weight
    assert a_p.shape == a_o.shape
    bound = 1 / a_o.shape[1] ** 0.5  # kaiming_uniform(a=√5) bound
    for a in (a_o, a_p):
        assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert torch.count_nonzero(ours.layers[0].q_proj.lora_B.weight) == 0


@pytest.mark.parametrize("cfg", [adapters.LoRA(r=4, alpha=8), adapters.DoRA(r=4, alpha=6, use_rslora=True)],
                         ids=["lora", "dora"])
def test_adapter_injected_by_us_loads_in_peft(tmp_path, cfg):
    """An adapter that never passed through peft: our inject, trained values, our file."""
    base = make()
    ours = adapters.inject(copy.deepcopy(base), cfg, target=TARGETS)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in adapters.trainable_parameters(ours):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    adapters.save_pretrained(ours, tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids), rtol=1e-5, atol=1e-5)


_SELECTION = [
    dict(target_modules=["q_proj"], exclude_modules=["model.layers.1.q_proj"]),
    dict(target_modules=["q_proj"], exclude_modules=["q_proj"]),
    dict(target_modules=r".*q_proj", exclude_modules=r"model\.layers\.1\..*"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[2, 12], layers_pattern=["h", "layers"]),
    dict(target_modules=["model.layers.0.q_proj", "up_proj"], layers_to_transform=[1]),
]


@pytest.mark.parametrize("opts", _SELECTION)
def test_module_selection_matches_peft(opts):
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    from lowrank_ops.adapters.inject import _is_target

    names = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.12.q_proj", "model.layers.1.mlp.up_proj",
             "model.layers.1.experts.0.up_proj", "q_proj", "layers.1.q_proj", "model.h.2.q_proj", "lm_head"]
    full = {"exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, **opts}
    theirs = SimpleNamespace(modules_to_save=None, target_parameters=None, **full)
    for n in names:
        want = bool(check_target_module_exists(theirs, n))  # an excluded module is falsy
        got = _is_target(n, full["target_modules"], full["exclude_modules"], full["layers_to_transform"], full["layers_pattern"])
        assert got == want, n


@pytest.mark.parametrize("opts", [
    dict(exclude_modules=["layers.1.q_proj"]),
    dict(exclude_modules=r".*1\.v_proj"),
    dict(layers_to_transform=[1], layers_pattern="layers"),
], ids=["exclude-list", "exclude-regex", "layers"])
@pytest.mark.parametrize("init", [False, "pissa"])
def test_peft_file_with_module_selection_loads(tmp_path, opts, init):
    if "exclude_modules" in opts and "exclude_modules" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this peft has no exclude_modules")
    base = make()
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=init, **opts))
    with torch.no_grad():  # move B off zero so the adapter matters
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(tmp_path / "peft")
    ours = adapters.load_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert sorted(n for n, _ in adapters.adapter_layers(ours)) == sorted(
        n.replace("base_model.model.", "") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), pm(ids), rtol=1e-5, atol=1e-5)
    adapters.save_pretrained(ours, tmp_path / "ours")  # and back: the options are written again
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), pm(ids), rtol=1e-5, atol=1e-5)


def test_vera_projections_regenerate_like_peft(tmp_path):
    base = make()
    cfg = peft.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=4, save_projection=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = adapters.inject(copy.deepcopy(base), adapters.VeRA(r=8, projection_prng_key=4), target=TARGETS)
    a_o = next(adapters.adapter_layers(ours))[1].vera_A
    torch.testing.assert_close(a_o, pm.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(next(adapters.adapter_layers(ours))[1].vera_B, pm.base_model.vera_B["default"], rtol=0, atol=0)
