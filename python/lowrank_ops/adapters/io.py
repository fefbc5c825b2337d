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
from .inject import _STATE_ATTR, adapter_layers, adapter_state, inject
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


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder and rename: never a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    peft_config = config.to_peft_dict(target if isinstance(target, str) else list(target))
    if convert_to_lora:
        tensors, peft_config = _converted_to_lora(model, config, tensors, peft_config)
    _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2, sort_keys=True)))


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


def read_config(directory: str | os.PathLike) -> tuple[AdapterConfig, object]:
    """``(config, target_modules)`` from a peft ``adapter_config.json``."""
    cfg_path = Path(directory) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_pretrained: no {CONFIG_NAME} in {directory}")
    d = json.loads(cfg_path.read_text())
    peft_type = d.get("peft_type")
    if peft_type not in _CONFIGS:
        raise NotImplementedError(f"load_pretrained: peft_type {peft_type!r} is not supported (supported: {sorted(_CONFIGS)})")
    target = d.get("target_modules")
    if target is None:
        raise ValueError(f"load_pretrained: {cfg_path} has no target_modules")
    return _CONFIGS[peft_type].from_peft_dict(d), target


@torch.no_grad()
def load_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a peft-layout adapter (saved by peft or by :func:`save_pretrained`).

    Injects the adapter described by ``adapter_config.json`` if ``model`` has
    none yet, then copies every tensor.  Every adapter tensor must be present
    and every file tensor used; a mismatch raises naming the keys and shapes.
    Only safetensors files are read (never a pickle).
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        legacy = directory / "adapter_model.bin"
        hint = " (found adapter_model.bin: pickled files are not loaded; re-save it as safetensors)" if legacy.exists() else ""
        raise FileNotFoundError(f"load_pretrained: no {WEIGHTS_NAME} in {directory}{hint}")
    config, target = read_config(directory)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        inject(model, config, target)
        state = adapter_state(model)
    elif type(state["config"]) is not type(config) or getattr(state["config"], "r", None) != getattr(config, "r", None):
        raise ValueError(f"load_pretrained: model carries {state['config']} but {directory} holds {config}")
    expected = adapter_state_dict(model)
    if isinstance(config, VeRA) and not config.save_projection:
        # projections are regenerated from projection_prng_key by inject
        expected.pop("base_model.vera_A", None)
        expected.pop("base_model.vera_B", None)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected) - {"base_model.vera_A", "base_model.vera_B"})
        if missing or unexpected:
            raise ValueError(f"load_pretrained: {weights} does not match the model's adapters; "
                             f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        for key in sorted(keys):
            if key in ("base_model.vera_A", "base_model.vera_B"):
                dst = state["context"][key.rsplit(".", 1)[1]]
            else:
                dst = expected[key]
            src = f.get_tensor(key)
            if src.shape != dst.shape:
                raise ValueError(f"load_pretrained: `{key}` has shape {tuple(src.shape)} in {weights} but "
                                 f"{tuple(dst.shape)} in the model")
            dst.copy_(src)
    return model
