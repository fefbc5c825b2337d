"""Saving and loading adapters in peft's on-disk layout.

``adapter_model.safetensors`` holds the adapter tensors under peft's key names
(``base_model.model.<module path>.lora_A.weight``, ``...lora_magnitude_vector``,
``...vera_lambda_b``, shared ``base_model.vera_A``), and ``adapter_config.json``
the matching peft config, so files move both ways between peft and lowrank_ops.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig
from .inject import _STATE_ATTR, _inject, adapter_layers, adapter_state, find_targets
from .kasa import KaSA
from .lamda import LaMDA
from .loldu import LoLDU
from .lora import LoRA
from .qrlora import QRLoRA
from .salt import SALT
from .sorsa import SORSA
from .svf import SVF
from .svft import SVFT
from .lora_sb import LoRASB
from .vera import VeRA

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_CONFIGS = {"LORA": LoRA, "VERA": VeRA, "LORA_SB": LoRASB}
# methods peft lacks: our own keys in peft's layout (see adapters/spectral_common.py)
_CONFIGS.update({c.peft_type: c for c in (SVFT, SORSA, SVF, KaSA, SALT, LaMDA, QRLoRA, LoLDU)})


def _json_default(o):
    # numpy / 0-dim torch scalars in a config (alpha=np.float32(16)) become Python numbers
    if getattr(o, "shape", None) == () and hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} value {o!r} is not JSON-serialisable")


def write_adapter_files(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], peft_config: dict) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``directory`` as a pair.

    The JSON is serialised first (a config that cannot be written fails before any file
    is touched), both files go to temporaries in the same folder, and only then are they
    renamed over the old ones, the config last; a failure before the renames leaves the
    old pair as it was and no temporaries behind.
    """
    path = Path(directory)
    try:
        text = json.dumps(peft_config, indent=2, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_pretrained: the adapter config cannot be written as JSON: {e}") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []
    try:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
            os.close(fd)
            temps.append(tmp)
        save_file(tensors, temps[0], metadata={"format": "pt"})
        Path(temps[1]).write_text(text)
        os.replace(temps[0], path / WEIGHTS_NAME)
        os.replace(temps[1], path / CONFIG_NAME)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` under peft's key names."""
    state = adapter_state(model)
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        # parameters and persistent buffers (frozen bases of the spectral methods)
        for pname, p in layer.state_dict(keep_vars=True).items():
            if not pname.startswith("base_layer."):
                out[f"{_PREFIX}{name}.{pname}"] = p.detach()
    config = state["config"]
    if isinstance(config, VeRA) and config.save_projection:
        out["base_model.vera_A"] = state["context"]["vera_A"]
        out["base_model.vera_B"] = state["context"]["vera_B"]
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, convert_to_lora: bool = False) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` as peft does.

    Args:
        convert_to_lora: for adapters whose init changed the base weight (PiSSA, MiLoRA,
            OLoRA): write instead the plain rank-``2r`` LoRA that applies the *same* adapted
            weight to the ORIGINAL base, ``ΔW = s·B·A − s·B₀·A₀ = s·[B, −B₀]·[A; A₀]`` (exact;
            peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``), with
            ``r`` doubled and ``alpha`` doubled (``√2``× with rsLoRA) so ``s`` is unchanged.
    """
    state = adapter_state(model)
    config: AdapterConfig = state["config"]
    target = state["target"]
    tensors = adapter_state_dict(model)
    peft_config = config.to_peft_dict(target if isinstance(target, str) else list(target))
    match = state.get("match") or {}
    peft_config["layers_to_transform"] = match.get("layers_to_transform")
    peft_config["layers_pattern"] = match.get("layers_pattern")
    if match.get("exclude_modules") is not None:
        peft_config["exclude_modules"] = match["exclude_modules"]
    if convert_to_lora:
        tensors, peft_config = _converted_to_lora(model, config, tensors, peft_config)
    write_adapter_files(save_directory, tensors, peft_config)


def _converted_to_lora(model, config, tensors, peft_config):
    if not isinstance(config, LoRA) or config.layer_cls is not LoRA.layer_cls:
        raise ValueError(f"save_pretrained: convert_to_lora needs a LoRA-family adapter (PiSSA, MiLoRA, OLoRA), got {type(config).__name__}")
    out = {}
    for name, layer in adapter_layers(model):
        a0, b0 = getattr(layer, "lora_A_init", None), getattr(layer, "lora_B_init", None)
        if a0 is None:
            raise ValueError(f"save_pretrained: convert_to_lora: `{name}` has no recorded initial factors; "
                             "only adapters whose init changed the base weight (PiSSA, MiLoRA, OLoRA) can be converted")
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        out[f"{_PREFIX}{name}.lora_A.weight"] = torch.cat([a, a0.to(a.dtype)], 0).to("cpu").contiguous()
        out[f"{_PREFIX}{name}.lora_B.weight"] = torch.cat([b, -b0.to(b.dtype)], 1).to("cpu").contiguous()
    if out.keys() != tensors.keys():
        raise ValueError("save_pretrained: convert_to_lora: the adapter holds tensors other than lora_A/lora_B")
    d = dict(peft_config)
    d["init_lora_weights"] = True
    d.pop("eva_config", None)
    d["r"] = 2 * d["r"]
    d["lora_alpha"] = d["lora_alpha"] * (2 ** 0.5 if d.get("use_rslora") else 2)
    if d.get("use_rslora") and (d.get("rank_pattern") or d.get("alpha_pattern")):
        raise ValueError("save_pretrained: convert_to_lora with use_rslora and rank/alpha patterns is not supported (as in peft)")
    d["rank_pattern"] = {k: 2 * v for k, v in (d.get("rank_pattern") or {}).items()}
    d["alpha_pattern"] = {k: 2 * v for k, v in (d.get("alpha_pattern") or {}).items()}
    return out, d


def _read_peft_dict(directory: str | os.PathLike) -> dict:
    cfg_path = Path(directory) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_pretrained: no {CONFIG_NAME} in {directory}")
    return json.loads(cfg_path.read_text())


def _config_from_peft_dict(d: dict, where) -> tuple[AdapterConfig, object]:
    peft_type = d.get("peft_type")
    if peft_type not in _CONFIGS:
        raise NotImplementedError(f"load_pretrained: peft_type {peft_type!r} is not supported (supported: {sorted(_CONFIGS)})")
    target = d.get("target_modules")
    if target is None:
        raise ValueError(f"load_pretrained: {where} has no target_modules")
    return _CONFIGS[peft_type].from_peft_dict(d), target


def read_config(directory: str | os.PathLike) -> tuple[AdapterConfig, object]:
    """``(config, target_modules)`` from a peft ``adapter_config.json``."""
    return _config_from_peft_dict(_read_peft_dict(directory), Path(directory) / CONFIG_NAME)


def _match_options(d: dict) -> dict:
    """``inject``'s module-selection options from a peft config dict.  peft fields that
    change *which* modules carry what and that we cannot reproduce are refused here,
    before the model is touched."""
    for key in ("modules_to_save", "target_parameters", "trainable_token_indices"):
        if d.get(key):
            raise NotImplementedError(f"load_pretrained: {key}={d[key]!r} is not supported "
                                      "(only adapters on nn.Linear modules load)")
    return {"exclude": d.get("exclude_modules") or None, "layers_to_transform": d.get("layers_to_transform"),
            "layers_pattern": d.get("layers_pattern") or None}


def _module_of(key: str, names: set[str]) -> str | None:
    """The module of ``names`` that file key ``base_model.model.<module>.<tensor>`` belongs to."""
    if not key.startswith(_PREFIX):
        return None
    rest = key[len(_PREFIX):]
    i = rest.rfind(".")
    while i > 0:
        if rest[:i] in names:
            return rest[:i]
        i = rest.rfind(".", 0, i)
    return None


def _mismatch(weights, missing, unexpected) -> ValueError:
    return ValueError(f"load_pretrained: {weights} does not match the model's adapters; "
                      f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                      f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


@torch.no_grad()
def load_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a peft-layout adapter (saved by peft or by :func:`save_pretrained`).

    Injects the adapter described by ``adapter_config.json`` (honouring peft's
    ``target_modules``, ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern``)
    if ``model`` has none yet, then copies every tensor.  A model that already carries
    adapters must carry the same method with the same settings (every config field that
    shapes the forward).  Every adapter tensor must be present and every file tensor used;
    a mismatch raises naming the keys and shapes.  All or nothing: on any error the model
    is left exactly as it was.  Only safetensors files are read (never a pickle).
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        legacy = directory / "adapter_model.bin"
        hint = " (found adapter_model.bin: pickled files are not loaded; re-save it as safetensors)" if legacy.exists() else ""
        raise FileNotFoundError(f"load_pretrained: no {WEIGHTS_NAME} in {directory}{hint}")
    d = _read_peft_dict(directory)
    config, target = _config_from_peft_dict(d, directory / CONFIG_NAME)
    match = _match_options(d)
    shared = {"base_model.vera_A", "base_model.vera_B"}
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        undo = None
        state = getattr(model, _STATE_ATTR, None)
        if state is None:
            # which modules the file covers is known before anything is built
            names = {n for n, _ in find_targets(model, target, **match)}
            covered = {_module_of(k, names) for k in shapes if k not in shared}
            missing = sorted(names - covered)
            unexpected = sorted(k for k in shapes if k not in shared and _module_of(k, names) is None)
            if missing or unexpected:
                selection = ", ".join(f"{k}={v!r}" for k, v in {"target_modules": target, **match}.items() if v is not None)
                raise ValueError(
                    f"load_pretrained: {weights} does not match the modules its config selects in this model "
                    f"({selection}); no tensors for modules {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                    f"tensors of no selected module {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
            undo = _inject(model, config, target, **match)
            state = adapter_state(model)
        else:
            diff = state["config"].differences(config)
            if diff:
                raise ValueError(f"load_pretrained: the model carries {type(state['config']).__name__} adapters that differ "
                                 f"from those {directory} holds in " +
                                 ", ".join(f"{k} (model {a!r}, file {b!r})" for k, (a, b) in diff.items()))
        try:
            expected = adapter_state_dict(model)
            if isinstance(config, VeRA) and not config.save_projection:
                # projections are regenerated from projection_prng_key by inject
                expected.pop("base_model.vera_A", None)
                expected.pop("base_model.vera_B", None)
            missing = sorted(set(expected) - set(shapes))
            unexpected = sorted(set(shapes) - set(expected) - shared)
            if missing or unexpected:
                raise _mismatch(weights, missing, unexpected)
            dsts = {k: state["context"][k.rsplit(".", 1)[1]] if k in shared else expected[k] for k in shapes}
            bad = [f"`{k}` {shapes[k]} in the file, {tuple(t.shape)} in the model"
                   for k, t in dsts.items() if shapes[k] != tuple(t.shape)]
            if bad:
                raise ValueError(f"load_pretrained: {weights} has tensors of the wrong shape: " + "; ".join(bad[:8]))
            # a fresh injection is undone as a whole; adapters that were already there
            # get their old values back (checked above, so only I/O can fail here)
            backup = [(t, t.clone()) for t in dsts.values()] if undo is None else []
            try:
                for key in sorted(shapes):
                    dsts[key].copy_(f.get_tensor(key))
            except BaseException:
                for t, old in backup:
                    t.copy_(old)
                raise
        except BaseException:
            if undo is not None:
                undo.rollback()
            raise
    return model
