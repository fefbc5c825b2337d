"""inject and save/load as transactions, peft's module-selection options, config checks
on load, and the ``weight`` / ``bias`` view adapter layers give of their base."""
from __future__ import annotations

import copy
import decimal
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters
from lowrank_ops.adapters.inject import _STATE_ATTR
from lowrank_ops.nn import AdapterLinear

from .tiny_models import make

TARGET = r".*(q_proj|v_proj|up_proj)$"


def _ids(seed=0):
    return torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m for n, m in model.named_modules()})


def _assert_untouched(model, snap):
    sd, flags, modules = snap
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert getattr(model, _STATE_ATTR, None) is None
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[k], sd[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)


# --------------------------------------------------------------------------- inject: all or nothing


class _FailsOnSecond(adapters.LoRA):
    """A LoRA whose second layer fails to build (after the first was built)."""

    def create_layer(self, base_layer, context):
        context["calls"] = context.get("calls", 0) + 1
        if context["calls"] == 2:
            raise RuntimeError("boom")
        return super().create_layer(base_layer, context)


@pytest.mark.parametrize("cfg", [adapters.SORSA(r=24), adapters.PiSSA(r=24, alpha=24), _FailsOnSecond(r=4)],
                         ids=["sorsa", "pissa", "lora"])
def test_failed_inject_leaves_the_model_as_it_was(cfg):
    """head (32 -> 20) fails after the q_proj layers (32 x 32) were built — for SORSA and
    PiSSA after their bases were rewritten into residuals."""
    model = make(vocab=20)
    model.embed.weight.requires_grad_(False)  # a flag the user set survives too
    snap = _snapshot(model)
    y = model(_ids())
    with pytest.raises((ValueError, RuntimeError)):
        adapters.inject(model, cfg, target=["q_proj", "head"])
    _assert_untouched(model, snap)
    torch.testing.assert_close(model(_ids()), y, rtol=0, atol=0)
    # nothing is left that blocks a retry
    adapters.inject(model, adapters.LoRA(r=4), target=["q_proj"])
    assert [n for n, _ in adapters.adapter_layers(model)] == ["layers.0.q_proj", "layers.1.q_proj"]


@pytest.mark.parametrize("cfg", [adapters.LoRA(r=4), adapters.DoRA(r=4), adapters.LoRA(r=4, use_rslora=True),
                                 adapters.EVA(r=4), adapters.VeRA(r=4)], ids=["lora", "dora", "rslora", "eva", "vera"])
def test_keeps_base_is_true_of_the_layers(cfg):
    """Configs declaring ``keeps_base`` (inject keeps no rollback copy of their base tensors)
    really leave the wrapped weights and biases unwritten."""
    assert type(cfg).keeps_base
    model = make(vocab=20)
    base = {n: (m.weight, m.weight._version, m.weight.clone())
            for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    adapters.inject(model, cfg, target=["q_proj", "v_proj"])
    for n, (w, version, copy_) in base.items():
        assert w._version == version and torch.equal(w, copy_), n
        assert model.get_submodule(n).base_layer.weight is w


def test_base_rewriting_inits_do_not_claim_keeps_base():
    for cls in (adapters.PiSSA, adapters.MiLoRA, adapters.OLoRA, adapters.SORSA, adapters.KaSA, adapters.LoLDU,
                adapters.LaMDA, adapters.SVFT, adapters.SVF, adapters.SALT, adapters.QRLoRA, adapters.LoRASB):
        assert not cls.keeps_base, cls.__name__


def test_inject_refuses_multihead_attention_out_proj():
    mha = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        adapters.inject(mha, adapters.LoRA(r=2), target=["out_proj"])
    assert not any(isinstance(m, AdapterLinear) for m in mha.modules())


# --------------------------------------------------------------------------- peft's module selection


NAMES = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.12.q_proj", "model.layers.1.mlp.up_proj",
         "model.layers.1.experts.0.up_proj", "q_proj", "layers.1.q_proj", "model.h.2.q_proj", "lm_head"]


@pytest.mark.parametrize("opts, selected", [
    (dict(target=["q_proj"]), {0, 1, 2, 5, 6, 7}),
    (dict(target=["q_proj"], exclude=["model.layers.1.q_proj"]), {0, 2, 5, 6, 7}),
    (dict(target=["q_proj"], exclude=["q_proj"]), set()),  # exclude by suffix too
    (dict(target=r".*q_proj", exclude=r"model\.layers\.1\..*"), {0, 2, 5, 6, 7}),
    # default layer pattern: the first `<name>.<index>.` after the first component
    # (a module named exactly as a target entry, `q_proj`, is taken whatever its layer, as peft)
    (dict(target=["q_proj", "up_proj"], layers_to_transform=[1]), {1, 3, 4, 5}),
    (dict(target=["q_proj"], layers_to_transform=1, layers_pattern="layers"), {1, 5, 6}),
    (dict(target=["q_proj"], layers_to_transform=[2, 12], layers_pattern=["h", "layers"]), {2, 5, 7}),
    (dict(target=["model.layers.0.q_proj", "up_proj"], layers_to_transform=[1]), {0, 3, 4}),
])
def test_module_selection_rules(opts, selected):
    from lowrank_ops.adapters.inject import _is_target

    opts = dict(opts)
    target = opts.pop("target")
    got = {i for i, n in enumerate(NAMES) if _is_target(n, target, **opts)}
    assert got == selected


def test_inject_with_selection_options_round_trips(tmp_path):
    model = adapters.inject(make(), adapters.LoRA(r=4), target=["q_proj", "v_proj"], exclude=["layers.0.v_proj"])
    assert [n for n, _ in adapters.adapter_layers(model)] == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]
    _randomize(model)
    adapters.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["exclude_modules"] == ["layers.0.v_proj"] and cfg["layers_to_transform"] is None
    loaded = adapters.load_pretrained(make(), tmp_path)
    assert [n for n, _ in adapters.adapter_layers(loaded)] == [n for n, _ in adapters.adapter_layers(model)]
    torch.testing.assert_close(loaded(_ids()), model(_ids()), rtol=0, atol=0)

    layered = adapters.inject(make(), adapters.LoRA(r=4), target=["q_proj", "up_proj"], layers_to_transform=[1],
                              layers_pattern="layers")
    assert [n for n, _ in adapters.adapter_layers(layered)] == ["layers.1.q_proj", "layers.1.up_proj"]
    _randomize(layered)
    adapters.save_pretrained(layered, tmp_path / "l")
    cfg = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers"
    loaded = adapters.load_pretrained(make(), tmp_path / "l")
    torch.testing.assert_close(loaded(_ids()), layered(_ids()), rtol=0, atol=0)


def test_selection_options_conflicting_as_in_peft():
    with pytest.raises(ValueError, match="layers_to_transform needs target as a list"):
        adapters.inject(make(), adapters.LoRA(r=4), target=TARGET, layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern is given but layers_to_transform is not"):
        adapters.inject(make(), adapters.LoRA(r=4), target=["q_proj"], layers_pattern="layers")
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        adapters.inject(make(), adapters.LoRA(r=4), target=["q_proj"], exclude=r".*")


# --------------------------------------------------------------------------- load: all or nothing


def _rewrite(path, edit):
    sd = load_file(str(path / "adapter_model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "adapter_model.safetensors"))


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    src = adapters.inject(make(), adapters.PiSSA(r=4, alpha=8), target=TARGET)
    _randomize(src)
    adapters.save_pretrained(src, tmp_path)
    key = "base_model.model.layers.1.up_proj.lora_A.weight"

    # a module's tensors missing: found before anything is built
    _rewrite(tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if ".layers.1.up_proj." in k])
    model = make()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"does not match.*layers\.1\.up_proj"):
        adapters.load_pretrained(model, tmp_path)
    _assert_untouched(model, snap)

    # a wrong shape: found after PiSSA rewrote the bases, which are restored
    adapters.save_pretrained(src, tmp_path)
    _rewrite(tmp_path, lambda sd: sd.__setitem__(key, sd[key][:3].clone()))
    with pytest.raises(ValueError, match=r"wrong shape.*layers\.1\.up_proj\.lora_A"):
        adapters.load_pretrained(model, tmp_path)
    _assert_untouched(model, snap)

    # peft fields we cannot honour are refused before the model is touched
    adapters.save_pretrained(src, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["head"]}))
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        adapters.load_pretrained(model, tmp_path)
    _assert_untouched(model, snap)

    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = adapters.load_pretrained(model, tmp_path)
    torch.testing.assert_close(loaded(_ids()), src(_ids()), rtol=1e-5, atol=1e-5)


def test_failed_load_into_existing_adapters_changes_none(tmp_path):
    src = adapters.inject(make(), adapters.LoRA(r=4), target=TARGET)
    adapters.save_pretrained(src, tmp_path)
    last = "base_model.model.layers.1.v_proj.lora_B.weight"  # late in sorted order
    _rewrite(tmp_path, lambda sd: sd.__setitem__(last, sd[last][:, :3].clone()))
    model = adapters.inject(make(), adapters.LoRA(r=4), target=TARGET)
    _randomize(model)
    before = {k: v.clone() for k, v in adapters.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match="wrong shape"):
        adapters.load_pretrained(model, tmp_path)
    for k, v in adapters.adapter_state_dict(model).items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- load into existing adapters


@pytest.mark.parametrize("saved, present, field", [
    (adapters.LoRA(r=4, alpha=16), adapters.LoRA(r=4, alpha=8), "alpha"),
    (adapters.LoRA(r=4, alpha=8, use_rslora=True), adapters.LoRA(r=4, alpha=8), "use_rslora"),
    (adapters.VeRA(r=8, projection_prng_key=2, save_projection=False), adapters.VeRA(r=8, projection_prng_key=1),
     "projection_prng_key"),
    (adapters.SVF(parametrization="scale"), adapters.SVF(parametrization="additive"), "parametrization"),
    (adapters.KaSA(r=4, alpha=32), adapters.KaSA(r=4, alpha=16), "alpha"),
    (adapters.DoRA(r=4), adapters.LoRA(r=4), "type"),
])
def test_load_refuses_adapters_with_other_settings(tmp_path, saved, present, field):
    src = adapters.inject(make(), saved, target=["q_proj"])
    _randomize(src)
    adapters.save_pretrained(src, tmp_path)
    model = adapters.inject(make(), present, target=["q_proj"])
    before = {k: v.clone() for k, v in adapters.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=rf"differ from those .* holds in {field} \(model"):
        adapters.load_pretrained(model, tmp_path)
    for k, v in adapters.adapter_state_dict(model).items():
        assert torch.equal(v, before[k]), k


def test_load_accepts_differences_in_init_only_fields(tmp_path):
    src = adapters.inject(make(), adapters.VeRA(r=8, d_initial=0.5), target=["q_proj"])
    _randomize(src)
    adapters.save_pretrained(src, tmp_path)
    model = adapters.load_pretrained(adapters.inject(make(), adapters.VeRA(r=8), target=["q_proj"]), tmp_path)
    torch.testing.assert_close(model(_ids()), src(_ids()), rtol=0, atol=0)


# --------------------------------------------------------------------------- save: the pair is replaced as one


def test_save_coerces_numpy_scalars(tmp_path):
    model = adapters.inject(make(), adapters.LoRA(r=4, alpha=np.float32(16.0)), target=["q_proj"])
    _randomize(model)
    adapters.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16.0 and isinstance(cfg["lora_alpha"], float)
    torch.testing.assert_close(adapters.load_pretrained(make(), tmp_path)(_ids()), model(_ids()), rtol=0, atol=0)


def _pair(path):
    return (path / "adapter_model.safetensors").read_bytes(), (path / "adapter_config.json").read_text()


def test_failed_save_keeps_the_old_pair(tmp_path, monkeypatch):
    first = adapters.inject(make(), adapters.LoRA(r=4, alpha=8), target=["q_proj"])
    _randomize(first)
    adapters.save_pretrained(first, tmp_path)
    old = _pair(tmp_path)

    # a config that cannot be written as JSON fails before any file is touched
    second = adapters.inject(make(), adapters.LoRA(r=4, alpha=8, alpha_pattern={"q_proj": decimal.Decimal(16)}),
                             target=["q_proj"])
    _randomize(second, seed=2)
    with pytest.raises(TypeError, match="JSON"):
        adapters.save_pretrained(second, tmp_path)
    assert _pair(tmp_path) == old

    # a failing weights write (a full disk, say) leaves no temporaries and the old pair
    import lowrank_ops.adapters.io as io

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(io, "save_file", broken)
    third = adapters.inject(make(), adapters.LoRA(r=4, alpha=4), target=["q_proj"])
    with pytest.raises(OSError, match="no space"):
        adapters.save_pretrained(third, tmp_path)
    assert _pair(tmp_path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.undo()
    torch.testing.assert_close(adapters.load_pretrained(make(), tmp_path)(_ids()), first(_ids()), rtol=0, atol=0)


# --------------------------------------------------------------------------- .weight / .bias


CONFIGS = {
    "lora": lambda: adapters.LoRA(r=4, alpha=8),
    "dora": lambda: adapters.DoRA(r=4, alpha=8),
    "vera": lambda: adapters.VeRA(r=8),
    "sorsa": lambda: adapters.SORSA(r=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_and_bias_are_the_base_layers(name, tmp_path):
    base = make(dtype=torch.float64)
    model = adapters.inject(copy.deepcopy(base), CONFIGS[name](), target=r".*(q_proj|k_proj)$")
    _randomize(model)
    q, k = model.layers[0].q_proj, model.layers[0].k_proj
    assert q.weight is q.base_layer.weight and q.bias is q.base_layer.bias and k.bias is None
    with pytest.raises((AttributeError, KeyError)):
        q.weight = nn.Parameter(torch.zeros(2))
    # registered nowhere else: no `q_proj.weight` key, nothing counted twice
    keys = list(model.state_dict())
    assert "layers.0.q_proj.weight" not in keys and "layers.0.q_proj.base_layer.weight" in keys
    assert not any(n.endswith(("q_proj.weight", "q_proj.bias")) for n in keys)
    every = [p for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(every) == len({id(p) for p in every})
    # merge folds the adapter into what .weight shows; unmerge takes it out again
    ids = _ids()
    y = model(ids)
    w0 = q.weight.clone()
    q.merge()
    assert not torch.equal(q.weight, w0) and q.weight is q.base_layer.weight
    torch.testing.assert_close(model(ids), y, rtol=1e-10, atol=1e-10)
    q.unmerge()
    torch.testing.assert_close(q.weight, w0, rtol=1e-12, atol=1e-12)
    # state_dict round trip, strict, and peft-layout save/load
    again = adapters.inject(copy.deepcopy(base), CONFIGS[name](), target=r".*(q_proj|k_proj)$")
    again.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    adapters.save_pretrained(model, tmp_path)
    torch.testing.assert_close(adapters.load_pretrained(copy.deepcopy(base), tmp_path)(ids), y, rtol=1e-12, atol=1e-12)


class _ReadsWeight(nn.Module):
    """Reads ``proj.weight`` / ``proj.bias`` directly, as HF T5 (``self.wo.weight.dtype``) does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        x = x.to(self.proj.weight.dtype)
        return self.proj(x) + self.proj.bias


def test_models_reading_weight_run_eager_and_compiled():
    torch.manual_seed(0)
    model = adapters.inject(_ReadsWeight(), adapters.DoRA(r=2), target=["proj"])
    _randomize(model)
    x = torch.randn(3, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_hf_t5_runs_with_adapters_on_wo():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    y0 = model(input_ids=ids, decoder_input_ids=ids).logits
    adapters.inject(model, adapters.LoRA(r=4), target=["wo"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, y0, rtol=1e-6, atol=1e-6)
