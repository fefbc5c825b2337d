"""Generic injection of an adapter config into any ``nn.Module``."""
from __future__ import annotations

import re
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from ..nn import AdapterLinear
from .config import AdapterConfig

Target = Union[str, Sequence[str]]
_STATE_ATTR = "_lowrank_ops_adapter"


def _matches(target: Target, name: str) -> bool:
    """peft's rule: a string is a regex that must match the whole module name; a
    list names modules by exact name or by their last dotted components."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """``(name, layer)`` for every adapter layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def adapter_state(model: nn.Module) -> dict:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no lowrank_ops adapters: call adapters.inject(model, config, target=...) first")
    return state


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: AdapterConfig, target: Target) -> nn.Module:
    """Wrap every ``nn.Linear`` of ``model`` whose name matches ``target`` with
    the adapter layer of ``config``; freeze every other parameter.

    Args:
        model: any module; modified in place and returned.
        config: an adapter config (``adapters.LoRA(...)``, ``DoRA``, ``VeRA``).
        target: a regex matched against the full module name (``re.fullmatch``,
            e.g. ``r".*(q_proj|v_proj)$"``) or a list of module-name suffixes, as
            peft's ``target_modules``.

    Raises:
        ValueError: nothing matched, the model already carries adapters, or a
            matched module is not an ``nn.Linear``.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"inject: config must be an adapters config (LoRA, DoRA, VeRA, ...), got {type(config).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None or any(True for _ in adapter_layers(model)):
        raise ValueError("inject: this model already carries lowrank_ops adapters; merge_and_unload or unload it first")
    targets: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if not name or not _matches(target, name):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"inject: target {target!r} matched `{name}`, a {type(module).__name__}; only nn.Linear can be wrapped")
        targets.append((name, module))
    if not targets:
        raise ValueError(f"inject: target {target!r} matched no nn.Linear in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    context = config.prepare(targets)
    for name, module in targets:
        _set_submodule(model, name, config.create_layer(module, context))
    # a plain attribute: not a parameter or buffer, so state_dict() is unchanged
    object.__setattr__(model, _STATE_ATTR, {"config": config, "target": target, "context": context})
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after ``inject``: the adapters')."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in trainable_parameters(model)), total


@torch.no_grad()
def _remove_adapters(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    if getattr(model, _STATE_ATTR, None) is not None:
        object.__delattr__(model, _STATE_ATTR)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back."""
    return _remove_adapters(model, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (unmerging merged ones first)."""
    return _remove_adapters(model, merge=False)
