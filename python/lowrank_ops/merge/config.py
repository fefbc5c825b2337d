"""mergekit-style YAML merge configs: parsing, validation and per-tensor parameter values.

A config names a ``merge_method``, the ``models`` (each a ``model:`` path with
optional per-model ``parameters:``), an optional ``base_model:``, global
``parameters:`` and a ``dtype:``::

    merge_method: model_stock
    base_model: /models/base
    models:
      - model: /models/ft-a
        parameters: {weight: 1.0}
      - model: /models/ft-b
    parameters:
      t: [0.0, 0.5, 1.0]                           # gradient over depth
      density: [{filter: mlp, value: 0.5}, {value: 0.2}]   # filter conditionals
    dtype: bfloat16

Parameter values follow mergekit's rules:

* a scalar applies to every tensor;
* a list of numbers is a *gradient*: anchors spread evenly over the layer
  stack, linearly interpolated at the tensor's relative depth
  ``ℓ / (L − 1)`` (``ℓ`` parsed from ``layers.<i>.`` / ``h.<i>.`` /
  ``blocks.<i>.`` in the tensor name);
* a list of ``{filter: substring, value: v}`` entries is a conditional: the
  first entry whose substring occurs in the tensor name wins, an entry without
  ``filter`` is the default (its ``value`` may itself be a gradient).

Per-model parameters override global ones.  ``slices:`` (layer-range
frankenmerges) are refused.

Tensors outside the layer stack have no depth; for gradients they take
position 0 when their name looks like an input embedding (``embed``, ``wte``,
``wpe``) and position 1 otherwise (final norm, output head).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .registry import MergeMethod, get_method

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|resblocks)\.(\d+)\.")
_EMBED_RE = re.compile(r"embed|wte|wpe|tok_embeddings")

#: Parameters every method accepts per model (the model's weight).
MODEL_PARAMS = {"weight"}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}

_TOP_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "tokenizer", "name"}


class ConfigError(ValueError):
    """A merge config that cannot be run; the message names the offending key."""


def layer_index(name: str) -> Optional[int]:
    """Layer number of a tensor name (``model.layers.3.mlp...`` -> 3), or None outside the layer stack."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def infer_num_layers(names) -> Optional[int]:
    """``1 + max`` layer index over ``names`` (None when no name carries one)."""
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else None


def depth_position(name: str, num_layers: Optional[int]) -> float:
    """Relative depth in [0, 1] used to evaluate gradients (see the module docstring)."""
    li = layer_index(name)
    if li is None or not num_layers:
        return 0.0 if _EMBED_RE.search(name) else 1.0
    return 0.0 if num_layers <= 1 else li / (num_layers - 1)


def _is_conditional(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(e, dict) and "value" in e for e in v)


def _is_gradient(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v)


def resolve_value(value: Any, name: str, num_layers: Optional[int]) -> Any:
    """The value of one parameter for tensor ``name`` (scalar, gradient or filter list)."""
    if _is_conditional(value):
        default = None
        for entry in value:
            filt = entry.get("filter")
            if filt is None:
                if default is None:
                    default = entry
                continue
            if str(filt) in name:
                return resolve_value(entry["value"], name, num_layers)
        return None if default is None else resolve_value(default["value"], name, num_layers)
    if _is_gradient(value):
        if len(value) == 1:
            return float(value[0])
        x = depth_position(name, num_layers) * (len(value) - 1)
        lo = min(int(x), len(value) - 2)
        frac = x - lo
        return float(value[lo]) * (1.0 - frac) + float(value[lo + 1]) * frac
    return value


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, list):
        if _is_gradient(value):
            return
        if _is_conditional(value):
            for e in value:
                extra = set(e) - {"filter", "value"}
                if extra:
                    raise ConfigError(f"{where}: conditional entries take `filter` and `value`, got {sorted(extra)}")
                _check_value(e["value"], where)
            return
        raise ConfigError(f"{where}: a list must be a gradient (numbers) or conditionals "
                          f"([{{filter: substring, value: v}}, ..., {{value: default}}]), got {value!r}")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping is not a parameter value (did you mean a list of "
                          f"{{filter: ..., value: ...}} conditionals?), got {value!r}")


@dataclass
class ModelSpec:
    path: str
    parameters: dict = field(default_factory=dict)


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelSpec]
    base_model: Optional[str] = None
    parameters: dict = field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None

    # ------------------------------------------------------------------ derived
    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def valid_params(self) -> set[str]:
        """Global parameter names the method accepts (its own plus its inner method's, for wrappers)."""
        m = self.method
        names = set(m.params)
        inner = self.parameters.get("base_method", m.params.get("base_method"))
        if "base_method" in m.params and isinstance(inner, str) and inner:
            names |= set(get_method(inner).params)
        return names

    def task_models(self) -> list[ModelSpec]:
        """The models that contribute task tensors: ``models`` without the base model (mergekit lists it too)."""
        if self.base_model is None:
            return list(self.models)
        base = _norm(self.base_model)
        return [m for m in self.models if _norm(m.path) != base]

    def base_spec(self) -> Optional[ModelSpec]:
        if self.base_model is None:
            return None
        for m in self.models:
            if _norm(m.path) == _norm(self.base_model):
                return m
        return ModelSpec(self.base_model)

    def torch_dtype(self, override: Optional[str] = None) -> Optional[torch.dtype]:
        name = override or self.out_dtype or self.dtype
        return None if name is None else DTYPES[name]

    def tensor_params(self, name: str, num_layers: Optional[int]) -> tuple[list[float], dict]:
        """``(weights, params)`` for tensor ``name``: per-model weights and method parameters, resolved."""
        models = self.task_models()
        weights = []
        per_model: dict[str, list] = {}
        for m in models:
            w = resolve_value(m.parameters.get("weight", self.parameters.get("weight", 1.0)), name, num_layers)
            weights.append(1.0 if w is None else float(w))
            for k in m.parameters:
                if k != "weight":
                    per_model.setdefault(k, [])
        params = {}
        for k, v in self.parameters.items():
            if k == "weight":
                continue
            r = resolve_value(v, name, num_layers)
            if r is not None:
                params[k] = r
        for k in per_model:
            vals = []
            for m in models:
                v = m.parameters.get(k, self.parameters.get(k))
                vals.append(resolve_value(v, name, num_layers) if v is not None else None)
            if all(v is None for v in vals):
                continue
            if any(v is None for v in vals):
                default = self.method.params.get(k)
                vals = [default if v is None else v for v in vals]
            params[k] = vals[0] if all(v == vals[0] for v in vals) else vals
        return weights, params


def _norm(p: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(p))))


def parse_config(data: Union[dict, str, os.PathLike], *, base_dir: Optional[Path] = None) -> MergeConfig:
    """Parse and validate a config (a dict, or a path to a YAML file); raises :class:`ConfigError`.

    Relative model paths resolve against the YAML file's folder.  Checks the
    method exists and every parameter is one the method knows (a typo is
    reported with the valid names); file-level checks happen in the engine.
    """
    if not isinstance(data, dict):
        import yaml

        path = Path(data)
        if not path.is_file():
            raise ConfigError(f"merge config {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"merge config {str(path)!r} is not valid YAML: {e}") from None
        base_dir = path.resolve().parent if base_dir is None else base_dir
        if not isinstance(data, dict):
            raise ConfigError(f"merge config {str(path)!r} must be a mapping with `merge_method` and `models`")
    if "slices" in data:
        raise ConfigError("merge config: `slices:` (layer-range frankenmerges) is not supported; list whole "
                          "models under `models:`")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"merge config: unknown top-level key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    if "merge_method" not in data:
        raise ConfigError("merge config: missing `merge_method`")
    try:
        method = get_method(str(data["merge_method"]))
    except ValueError as e:
        raise ConfigError(f"merge config: {e}") from None
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("merge config: `models:` must be a non-empty list of {model: path, parameters: {...}}")

    def resolve_path(p) -> str:
        p = os.path.expanduser(str(p))
        if base_dir is not None and not os.path.isabs(p):
            p = str(base_dir / p)
        return p

    models = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"merge config: models[{i}] must be a mapping with a `model:` path, got {entry!r}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise ConfigError(f"merge config: models[{i}] has unknown key(s) {sorted(extra)}; valid: ['model', 'parameters']")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"merge config: models[{i}].parameters must be a mapping, got {params!r}")
        models.append(ModelSpec(resolve_path(entry["model"]), dict(params)))
    gparams = data.get("parameters") or {}
    if not isinstance(gparams, dict):
        raise ConfigError(f"merge config: `parameters` must be a mapping, got {gparams!r}")
    cfg = MergeConfig(
        merge_method=method.name,
        models=models,
        base_model=None if data.get("base_model") is None else resolve_path(data["base_model"]),
        parameters=dict(gparams),
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        tokenizer_source=None if data.get("tokenizer_source") is None else resolve_path(data["tokenizer_source"]),
    )
    for key in ("dtype", "out_dtype"):
        v = getattr(cfg, key)
        if v is not None and v not in DTYPES:
            raise ConfigError(f"merge config: `{key}: {v}` is not a supported dtype; valid: {sorted(DTYPES)}")
    if "base_method" in cfg.parameters:
        try:
            get_method(str(cfg.parameters["base_method"]))
        except ValueError as e:
            raise ConfigError(f"merge config: parameters.base_method: {e}") from None
    valid = cfg.valid_params()
    for k, v in cfg.parameters.items():
        if k not in valid | MODEL_PARAMS:
            raise ConfigError(f"merge config: unknown parameter {k!r} for merge method {method.name!r}; "
                              f"valid: {sorted(valid | MODEL_PARAMS)}")
        _check_value(v, f"parameters.{k}")
    for i, m in enumerate(cfg.models):
        for k, v in m.parameters.items():
            if k not in valid | MODEL_PARAMS:
                raise ConfigError(f"merge config: unknown parameter {k!r} in models[{i}] ({m.path}) for merge "
                                  f"method {method.name!r}; valid: {sorted(valid | MODEL_PARAMS)}")
            _check_value(v, f"models[{i}].parameters.{k}")
    if method.needs_base and cfg.base_model is None:
        raise ConfigError(f"merge config: merge method {method.name!r} needs a `base_model`")
    if not cfg.task_models():
        raise ConfigError("merge config: no models to merge besides the base model")
    return cfg
