"""LoRA extraction from a full fine-tune and LoRA-space combination, with peft as oracle."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters
from lowrank_ops.nn import lora_scaling

from .tiny_models import make

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["q_proj", "v_proj", "up_proj"]
TARGET_RE = r".*(q_proj|v_proj|up_proj)$"


def _planted(dtype=torch.float64, rank=3, seed=0):
    """A base model and a 'fine-tune' whose target weights moved by exact rank-``rank`` deltas."""
    base = make(dtype=dtype)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in tuned.named_modules():
            if name.endswith(("q_proj", "v_proj", "up_proj")):
                o, i = m.weight.shape
                d = torch.randn(o, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, i, generator=g, dtype=torch.float64)
                m.weight.add_(0.1 * d.to(dtype))
    return base, tuned


def _delta(state, cfg, module):
    A = state[f"base_model.model.{module}.lora_A.weight"].double()
    B = state[f"base_model.model.{module}.lora_B.weight"].double()
    r, alpha = cfg.rank_alpha(module)
    return lora_scaling(r, alpha, cfg.use_rslora) * B @ A


def test_extract_planted_rank_delta_is_exact():
    base, tuned = _planted()
    bsd, tsd = base.state_dict(), tuned.state_dict()
    state, cfg = adapters.extract_lora(bsd, tsd, rank=3, target=TARGET_RE)
    assert len(state) == 2 * 6 and cfg.r == 3
    for key in bsd:
        mod = key[:-len(".weight")]
        if mod.endswith(("q_proj", "v_proj", "up_proj")) and key.endswith(".weight"):
            torch.testing.assert_close(_delta(state, cfg, mod), tsd[key] - bsd[key], rtol=0, atol=1e-12)
    # energy = 1 finds the planted rank in every layer
    state_e, cfg_e = adapters.extract_lora(bsd, tsd, energy=1.0, target=TARGET_RE)
    assert cfg_e.r == 3 and cfg_e.rank_pattern == {}
    # a lower rank is the Eckart–Young optimum of each delta
    state2, cfg2 = adapters.extract_lora(bsd, tsd, rank=2, target=["layers.0.q_proj"])
    d = tsd["layers.0.q_proj.weight"] - bsd["layers.0.q_proj.weight"]
    U, S, Vh = torch.linalg.svd(d)
    torch.testing.assert_close(_delta(state2, cfg2, "layers.0.q_proj"), (U[:, :2] * S[:2]) @ Vh[:2], rtol=0, atol=1e-6)


def test_extract_energy_rule_gives_per_layer_ranks():
    base = make(dtype=torch.float64)
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # q_proj: one dominant direction; v_proj: four equal ones
        q, v = tuned.layers[0].q_proj.weight, tuned.layers[0].v_proj.weight
        q.add_(torch.outer(torch.ones(32), torch.ones(32)).double())
        e = torch.eye(32, dtype=torch.float64)
        v.add_(e[:, :4] @ e[:4])
    state, cfg = adapters.extract_lora(base.state_dict(), tuned.state_dict(), energy=0.99)
    assert set(k.split(".lora_")[0] for k in state) == {"base_model.model.layers.0.q_proj", "base_model.model.layers.0.v_proj"}
    assert cfg.r == 4 and cfg.rank_pattern == {"layers.0.q_proj": 1}
    torch.testing.assert_close(_delta(state, cfg, "layers.0.q_proj"), torch.ones(32, 32, dtype=torch.float64), rtol=0, atol=1e-10)
    # energy 0.5 of four equal directions needs two
    _, cfg_half = adapters.extract_lora(base.state_dict(), tuned.state_dict(), energy=0.5, target=["v_proj"])
    assert cfg_half.r == 2


def test_extract_bad_arguments():
    base, tuned = _planted()
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        adapters.extract_lora(base.state_dict(), tuned.state_dict())
    with pytest.raises(ValueError, match="energy must lie in"):
        adapters.extract_lora(base.state_dict(), tuned.state_dict(), energy=1.5)
    bad = tuned.state_dict()
    bad["layers.0.q_proj.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layers.0.q_proj.weight.*\(32, 32\).*\(3, 3\)"):
        adapters.extract_lora(base.state_dict(), bad, rank=2)
    with pytest.raises(ValueError, match="no 2-D weight differs"):
        adapters.extract_lora(base.state_dict(), base.state_dict(), rank=2)


@pytest.mark.peft
def test_extracted_adapter_loads_in_peft_and_ours_with_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base, tuned = _planted(dtype=torch.float32)
    adapters.extract_lora(base.state_dict(), tuned.state_dict(), rank=3, target=TARGET_RE, out_dir=tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA" and sorted(d["target_modules"])[0] == "layers.0.q_proj"
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    ours = adapters.load_pretrained(copy.deepcopy(base), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        y = tuned(ids)
        torch.testing.assert_close(ours(ids), y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs(ids), ours(ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- combine


def _random_lora(seed, r, alpha, base=None, use_rslora=False):
    torch.manual_seed(seed)
    m = adapters.inject(copy.deepcopy(base) if base is not None else make(), adapters.LoRA(r=r, alpha=alpha, init="random",
                                                                                           use_rslora=use_rslora), target=TARGETS)
    return {k: v.clone() for k, v in adapters.adapter_state_dict(m).items()}, _cfg(m)


def _cfg(model):
    from lowrank_ops.adapters.inject import adapter_state

    return adapter_state(model)["config"]


def _modules(state):
    return sorted({k.split(".lora_")[0][len("base_model.model."):] for k in state})


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combine_is_exact_in_lora_space(method):
    base = make(dtype=torch.float64)
    a = _random_lora(1, 4, 8.0, base)
    b = _random_lora(2, 2, 3.0, base, use_rslora=True)
    w = [0.7, -1.3]
    rank = 6 if method == "svd" else None  # full rank of the sum: exact
    state, cfg = adapters.combine([a, b], w, method=method, rank=rank)
    assert cfg.r == 6 and cfg.alpha == 6
    for mod in _modules(a[0]):
        want = w[0] * _delta(a[0], a[1], mod) + w[1] * _delta(b[0], b[1], mod)
        torch.testing.assert_close(_delta(state, cfg, mod), want, rtol=0, atol=1e-12)
    # truncated svd = the best rank-3 approximation of the exact sum
    st3, cfg3 = adapters.combine([a, b], w, method="svd", rank=3)
    mod = _modules(a[0])[0]
    want = w[0] * _delta(a[0], a[1], mod) + w[1] * _delta(b[0], b[1], mod)
    U, S, Vh = torch.linalg.svd(want)
    torch.testing.assert_close(_delta(st3, cfg3, mod), (U[:, :3] * S[:3]) @ Vh[:3], rtol=0, atol=1e-10)


def test_combine_bad_arguments(tmp_path):
    a, b = _random_lora(1, 4, 8.0), _random_lora(2, 2, 2.0)
    with pytest.raises(ValueError, match="equal rank"):
        adapters.combine([a, b], [1, 1], method="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        adapters.combine([a, b], [1])
    with pytest.raises(ValueError, match="method must be"):
        adapters.combine([a, b], [1, 1], method="ties")
    # saving the result and reloading it as a plain LoRA
    state, cfg = adapters.combine([a, b], [1, 1], method="cat", out_dir=tmp_path)
    m = adapters.load_pretrained(make(), tmp_path)
    for n, L in adapters.adapter_layers(m):
        torch.testing.assert_close(L.lora_A.weight, state[f"base_model.model.{n}.lora_A.weight"])


@pytest.mark.parametrize("cfg", [adapters.PiSSA(r=4, alpha=8), adapters.PiSSA(r=4, alpha=8, n_iter=2),
                                 adapters.MiLoRA(r=4, alpha=8), adapters.OLoRA(r=4, alpha=8)],
                         ids=["pissa", "pissa_niter", "milora", "olora"])
def test_combine_refuses_adapters_that_changed_the_base(tmp_path, cfg):
    """Their factors apply to a residual base: they must be converted to plain LoRA first."""
    m = adapters.inject(make(), cfg, target=TARGETS)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # "trained": the converted adapter is not zero
        for p in adapters.trainable_parameters(m):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    adapters.save_pretrained(m, tmp_path / "raw")
    sd = adapters.adapter_state_dict(m)
    peft_dict = json.loads((tmp_path / "raw" / "adapter_config.json").read_text())
    plain = _random_lora(1, 4, 8.0)
    for item in (tmp_path / "raw", (sd, cfg), (sd, peft_dict)):
        with pytest.raises(ValueError, match=r"convert_to_lora=True"):
            adapters.combine([plain, item], [1.0, 1.0], method="cat")
    # converted, it combines, and the combination on the original base is the adapted model
    adapters.save_pretrained(m, tmp_path / "lora", convert_to_lora=True)
    adapters.combine([tmp_path / "lora"], [1.0], out_dir=tmp_path / "out")
    back = adapters.load_pretrained(make(), tmp_path / "out")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(m(ids), make()(ids), atol=1e-2)
        torch.testing.assert_close(back(ids), m(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.peft
@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_combine_matches_peft_add_weighted_adapter(tmp_path, method):
    peft = pytest.importorskip("peft")
    base = make()
    ra, rb = (4, 4) if method == "linear" else (4, 2)
    a = _random_lora(1, ra, 8.0, base)
    b = _random_lora(2, rb, 3.0, base)
    for name, (sd, cfg) in (("a", a), ("b", b)):
        m = adapters.inject(copy.deepcopy(base), cfg, target=TARGETS)
        with torch.no_grad():
            for n, L in adapters.adapter_layers(m):
                L.lora_A.weight.copy_(sd[f"base_model.model.{n}.lora_A.weight"])
                L.lora_B.weight.copy_(sd[f"base_model.model.{n}.lora_B.weight"])
        adapters.save_pretrained(m, tmp_path / name)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    w = [0.6, 1.4]
    pm.add_weighted_adapter(["a", "b"], w, "m", combination_type=method)
    state, cfg = adapters.combine([tmp_path / "a", tmp_path / "b"], w, method=method)
    assert pm.peft_config["m"].r == cfg.r and pm.peft_config["m"].lora_alpha == cfg.alpha
    for mod in _modules(state):
        L = pm.base_model.model.get_submodule(mod)
        pA, pB = L.lora_A["m"].weight.double(), L.lora_B["m"].weight.double()
        oA = state[f"base_model.model.{mod}.lora_A.weight"].double()
        oB = state[f"base_model.model.{mod}.lora_B.weight"].double()
        if method in ("cat", "linear"):  # same factors
            torch.testing.assert_close(oA, pA, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(oB, pB, rtol=1e-6, atol=1e-7)
        else:  # singular vectors up to sign: compare the products
            torch.testing.assert_close(oB @ oA, pB @ pA, rtol=1e-4, atol=1e-5)
