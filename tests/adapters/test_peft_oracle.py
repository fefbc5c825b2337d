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


def test_fresh_lora_init_matches_peft_distribution_and_identity():
    """Same seed → peft's default init (Kaiming-uniform A, zero B) gives the same A."""
    base = make()
    torch.manual_seed(9)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    torch.manual_seed(9)
    ours = adapters.inject(copy.deepcopy(base), adapters.LoRA(r=4, alpha=8), target=["q_proj"])
    a_p = pm.base_model.model.layers[0].q_proj.lora_A["default"].weight
    a_o = ours.layers[0].q_proj.lora_A.weight
    assert a_p.shape == a_o.shape
    bound = 1 / a_o.shape[1] ** 0.5  # kaiming_uniform(a=√5) bound
    assert a_o.abs().max() <= bound and a_o.abs().max() > 0.5 * bound
    assert torch.count_nonzero(ours.layers[0].q_proj.lora_B.weight) == 0


def test_vera_projections_regenerate_like_peft(tmp_path):
    base = make()
    cfg = peft.VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=4, save_projection=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = adapters.inject(copy.deepcopy(base), adapters.VeRA(r=8, projection_prng_key=4), target=TARGETS)
    a_o = next(adapters.adapter_layers(ours))[1].vera_A
    torch.testing.assert_close(a_o, pm.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(next(adapters.adapter_layers(ours))[1].vera_B, pm.base_model.vera_B["default"], rtol=0, atol=0)
