"""Generic injection of an adapter config into any ``nn.Module``."""
from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..nn import AdapterLinear
from .config import AdapterConfig

Target = Union[str, Sequence[str]]
LayerIndexes = Union[int, Sequence[int]]
_STATE_ATTR = "_lowrank_ops_adapter"


def _matches(target: Target, name: str) -> bool:
    """peft's rule: a string is a regex that must match the whole module name; a
    list names modules by exact name or by their last dotted components."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _layer_index(name: str, layers_pattern: Union[str, Sequence[str], None]) -> Optional[int]:
    """The index of the numbered block ``name`` lies in, as peft reads it: the first
    ``<pattern>.<digits>.`` segment (any ``<segment>.<digits>.`` after the first dotted
    component when ``layers_pattern`` is empty), so an expert index nested deeper is
    never taken for the layer index."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _is_target(name: str, target: Target, exclude: Optional[Target] = None,
               layers_to_transform: Optional[LayerIndexes] = None,
               layers_pattern: Union[str, Sequence[str], None] = None) -> bool:
    """peft's ``check_target_module_exists``: ``exclude`` wins (a regex matched against the
    whole name, or names / name suffixes); a regex ``target`` takes the modules it matches;
    a list ``target`` takes exact names as given and suffix matches only inside the
    blocks ``layers_to_transform`` selects (when it is set)."""
    if exclude and _matches(exclude, name):
        return False
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    if name in target:
        return True
    if not any(name.endswith("." + t) for t in target):
        return False
    selecting = layers_to_transform is not None and (
        isinstance(layers_to_transform, int) or len(layers_to_transform) > 0)
    if not selecting:
        return True
    idx = _layer_index(name, layers_pattern)
    if idx is None:
        return False
    return idx == layers_to_transform if isinstance(layers_to_transform, int) else idx in layers_to_transform


def _check_match_options(target: Target, exclude, layers_to_transform, layers_pattern) -> None:
    """The combinations peft's ``LoraConfig`` refuses, refused the same way."""
    if isinstance(target, str) and layers_to_transform is not None:
        raise ValueError("inject: layers_to_transform needs target as a list of module names, not a regex")
    if isinstance(target, str) and layers_pattern is not None:
        raise ValueError("inject: layers_pattern needs target as a list of module names, not a regex")
    if layers_pattern and layers_to_transform is None:
        raise ValueError("inject: layers_pattern is given but layers_to_transform is not")
    if layers_to_transform is not None and not isinstance(layers_to_transform, int) and not all(
            isinstance(i, int) for i in layers_to_transform):
        raise ValueError(f"inject: layers_to_transform must be an int or a list of ints, got {layers_to_transform!r}")


def find_targets(model: nn.Module, target: Target, *, exclude: Optional[Target] = None,
                 layers_to_transform: Optional[LayerIndexes] = None,
                 layers_pattern: Union[str, Sequence[str], None] = None) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every module :func:`inject` would wrap; reads ``model`` only.

    Raises:
        ValueError: nothing matched, a matched module is not an ``nn.Linear``, or it is
            the ``out_proj`` of an ``nn.MultiheadAttention`` (whose forward reads
            ``out_proj.weight`` directly, so an adapter there would never run).
    """
    _check_match_options(target, exclude, layers_to_transform, layers_pattern)
    modules = dict(model.named_modules())
    targets: list[tuple[str, nn.Linear]] = []
    for name, module in modules.items():
        if not name or not _is_target(name, target, exclude, layers_to_transform, layers_pattern):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"inject: target {target!r} matched `{name}`, a {type(module).__name__}; only nn.Linear can be wrapped")
        parent_name, _, child = name.rpartition(".")
        if child == "out_proj" and isinstance(modules.get(parent_name), nn.MultiheadAttention):
            raise ValueError(f"inject: target {target!r} matched `{name}`, the output projection of an "
                             "nn.MultiheadAttention, whose forward reads out_proj.weight directly and would bypass "
                             "the adapter; exclude it")
        targets.append((name, module))
    if not targets:
        extra = "".join(f", {k}={v!r}" for k, v in (("exclude", exclude), ("layers_to_transform", layers_to_transform),
                                                      ("layers_pattern", layers_pattern)) if v is not None)
        raise ValueError(f"inject: target {target!r}{extra} matched no nn.Linear in {type(model).__name__}")
    return targets


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


class _Undo:
    """What an injection changed in ``model``, kept until it has fully succeeded so a
    failure can put the model back exactly: the replaced modules, the requires_grad
    flags, and a copy of every base tensor a method rewrote in place (the residual of
    PiSSA, SORSA, KaSA, ...)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.replaced: list[tuple[str, nn.Module]] = []
        self.rewritten: list[tuple[Tensor, Tensor]] = []

    def build(self, config: AdapterConfig, module: nn.Linear, context: dict) -> nn.Module:
        """``config.create_layer`` with the base tensors copied first; a copy is kept only
        when the layer changed that tensor.  Methods that declare they never write the
        base (``keeps_base``: LoRA, DoRA, EVA, VeRA) are built without the copy."""
        if config.keeps_base:
            return config.create_layer(module, context)
        before = [(t, t._version, t.data_ptr(), t.detach().clone())
                  for t in (module.weight, module.bias) if t is not None]
        try:
            return config.create_layer(module, context)
        finally:
            self.rewritten += [(t, c) for t, v, p, c in before if t._version != v or t.data_ptr() != p]

    @torch.no_grad()
    def rollback(self) -> None:
        for name, module in reversed(self.replaced):
            _set_submodule(self.model, name, module)
        for t, c in self.rewritten:
            if t.shape == c.shape:
                t.copy_(c)
            else:
                t.data = c
        for p, flag in self.flags:
            p.requires_grad_(flag)
        if getattr(self.model, _STATE_ATTR, None) is not None:
            object.__delattr__(self.model, _STATE_ATTR)


def _inject(model: nn.Module, config: AdapterConfig, target: Target, *, exclude=None,
            layers_to_transform=None, layers_pattern=None) -> _Undo:
    """:func:`inject`, returning the :class:`_Undo` that reverses it (``load_pretrained``
    keeps it until the file has loaded).  On any exception the model is restored first."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"inject: config must be an adapters config (LoRA, DoRA, VeRA, ...), got {type(config).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None or any(True for _ in adapter_layers(model)):
        raise ValueError("inject: this model already carries lowrank_ops adapters; merge_and_unload or unload it first")
    targets = find_targets(model, target, exclude=exclude, layers_to_transform=layers_to_transform,
                           layers_pattern=layers_pattern)
    undo = _Undo(model)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        context = config.prepare(targets)
        # every layer is built before the first is swapped in: a method that fails on a
        # later layer (a rank above min(out, in), say) leaves no mixed model behind
        layers = [(name, module, undo.build(config, module, context)) for name, module in targets]
        for name, module, layer in layers:
            _set_submodule(model, name, layer)
            undo.replaced.append((name, module))
        match = {"exclude_modules": _plain(exclude), "layers_to_transform": _plain(layers_to_transform),
                 "layers_pattern": _plain(layers_pattern)}
        # a plain attribute: not a parameter or buffer, so state_dict() is unchanged
        object.__setattr__(model, _STATE_ATTR, {"config": config, "target": target, "context": context, "match": match})
    except BaseException:
        undo.rollback()
        raise
    return undo


def _plain(v):
    """A match option as peft's JSON holds it (lists, not tuples, sets or ranges)."""
    if v is None or isinstance(v, (str, int)):
        return v
    return sorted(v) if isinstance(v, (set, frozenset)) else list(v)


def inject(model: nn.Module, config: AdapterConfig, target: Target, *, exclude: Optional[Target] = None,
           layers_to_transform: Optional[LayerIndexes] = None,
           layers_pattern: Union[str, Sequence[str], None] = None) -> nn.Module:
    """Wrap every ``nn.Linear`` of ``model`` whose name matches ``target`` with
    the adapter layer of ``config``; freeze every other parameter.

    All or nothing: if any layer fails to build, the model is left exactly as it was
    (modules, base weights, requires_grad flags).

    Args:
        model: any module; modified in place and returned.
        config: an adapter config (``adapters.LoRA(...)``, ``DoRA``, ``VeRA``).
        target: a regex matched against the full module name (``re.fullmatch``,
            e.g. ``r".*(q_proj|v_proj)$"``) or a list of module-name suffixes, as
            peft's ``target_modules``.
        exclude: modules never wrapped, as peft's ``exclude_modules``: a regex matched
            against the full name, or a list of names / name suffixes.
        layers_to_transform: with a list ``target``, wrap suffix matches only inside these
            numbered blocks (an int or a list of ints), as peft's option of that name.
        layers_pattern: the name of the ``nn.ModuleList`` holding those blocks (``"layers"``,
            ``"h"``, or a list); default: the first ``<name>.<index>.`` in the module path.

    Raises:
        ValueError: nothing matched, the model already carries adapters, a matched
            module is not an ``nn.Linear``, or the match options conflict (as in peft).
    """
    _inject(model, config, target, exclude=exclude, layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern)
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
