"""Combination of LoRA adapters of one base model in LoRA space (peft's ``add_weighted_adapter``).

For adapters ``i`` with factors ``B_i (out, r_i)``, ``A_i (r_i, in)``, scales ``s_i`` and
weights ``w_i``, the combined update is ``ΔW = Σ_i w_i·s_i·B_i·A_i = B_cat·diag(c)·A_cat``
with ``B_cat = [B_1 … B_N]``, ``A_cat = [A_1; …; A_N]`` and ``c`` repeating ``w_i·s_i``:

* ``"cat"`` — exact: ``B = B_cat``, ``A = diag(c)·A_cat`` (rank ``Σ r_i``).
* ``"svd"`` — the best rank-``k`` approximation of that exact ``ΔW`` (Eckart–Young), from
  ``linalg.factored_svd(B_cat, A_cat, c, k)`` — QR of both factors and an ``R×R`` SVD —
  instead of peft's dense SVD of the materialised ``out × in`` matrix; ``B = U·S``,
  ``A = Vh`` as peft writes them (``k`` defaults to ``max r_i``).
* ``"linear"`` — peft's factor average at equal ranks: ``A = Σ sgn(w_i s_i)·√|w_i s_i|·A_i``,
  ``B = Σ √|w_i s_i|·B_i`` (cheap, *not* ``Σ w_i s_i B_i A_i``; peft calls it a rough approximation).

The result is a plain LoRA with ``alpha = r`` (``s = 1``), as peft's combined adapter.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor

from .. import linalg
from ..nn import lora_scaling
from .config import AdapterConfig
from .lora import LoRA

_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"

AdapterLike = Union[str, os.PathLike, tuple]


def _load(item: AdapterLike) -> tuple[dict[str, Tensor], LoRA]:
    if isinstance(item, (str, os.PathLike)):
        from safetensors.torch import load_file

        from .io import CONFIG_NAME, WEIGHTS_NAME

        d = json.loads((Path(item) / CONFIG_NAME).read_text())
        return load_file(str(Path(item) / WEIGHTS_NAME)), _config(d)
    sd, cfg = item
    return dict(sd), _config(cfg)


def _changes_base(init) -> bool:
    """Whether a LoRA init rewrites the base weight (peft's ``init_lora_weights`` values):
    such factors are relative to a residual, not to the base the others were trained on."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("milora", "olora", "corda"))


def _config(cfg) -> LoRA:
    if isinstance(cfg, dict):
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"combine: only LoRA adapters can be combined, got peft_type {cfg.get('peft_type')!r}")
        init = cfg.get("init_lora_weights", True)
    else:
        init = getattr(cfg, "init", None)
    if _changes_base(init):
        raise ValueError(f"combine: an adapter has init_lora_weights={init!r}, whose init changed the base weight; "
                         "its factors apply to the residual, not to the original base.  Save it with "
                         "adapters.save_pretrained(model, path, convert_to_lora=True) and combine that")
    if isinstance(cfg, dict):
        try:
            cfg = LoRA.from_peft_dict(cfg)
        except NotImplementedError as e:  # the config parser speaks as the loader; say who refuses
            raise NotImplementedError(str(e).replace("load_pretrained:", "combine: cannot combine this adapter:", 1)) from e
    if not isinstance(cfg, LoRA) or (isinstance(cfg, AdapterConfig) and cfg.layer_cls is not LoRA.layer_cls):
        raise ValueError(f"combine: only plain LoRA-family adapters can be combined, got {type(cfg).__name__}")
    return cfg


@torch.no_grad()
def combine(
    adapters_list: Sequence[AdapterLike],
    weights: Sequence[float],
    method: str = "svd",
    rank: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Tensor], LoRA]:
    """Combine LoRA adapters trained on the same base into one LoRA adapter.

    Args:
        adapters_list: each a peft-layout directory, or ``(state_dict, config)`` with the
            state under peft key names and the config an ``adapters.LoRA`` (or a peft
            ``adapter_config.json`` dict).  Adapters whose init changed the base weight
            (PiSSA, MiLoRA, OLoRA) are refused: convert them first
            (``save_pretrained(..., convert_to_lora=True)``).
        weights: one float per adapter (negative subtracts).
        method: ``"svd"`` | ``"cat"`` | ``"linear"`` (see the module docstring).
        rank: ``"svd"`` only: the output rank (default: the largest input rank).
        out_dir: also save the result there in peft layout (atomic writes).

    Returns:
        ``(state, config)``: peft-keyed tensors of every module any adapter targets (zero-padded
        to the common rank where a module has fewer) and a ``LoRA(r, alpha=r)`` config.
    """
    if method not in ("svd", "cat", "linear"):
        raise ValueError(f"combine: method must be 'svd', 'cat' or 'linear', got {method!r}")
    if len(adapters_list) == 0 or len(adapters_list) != len(weights):
        raise ValueError(f"combine: need one weight per adapter, got {len(adapters_list)} adapters and {len(weights)} weights")
    loaded = [_load(a) for a in adapters_list]
    if len(loaded) == 1:
        method = "linear"  # as peft: one adapter is a rescale
    modules: list[str] = []
    for i, (sd, _) in enumerate(loaded):
        unsupported = sorted(k for k in sd if not (k.endswith(_A) or k.endswith(_B)))
        if unsupported:
            raise ValueError(f"combine: adapter {i} has tensors other than `.lora_A.weight`/`.lora_B.weight` "
                             f"{unsupported[:8]}{' ...' if len(unsupported) > 8 else ''}; only Linear LoRA factors "
                             "can be combined (embedding adapters (lora_embedding_A/B), lora_bias, DoRA magnitudes "
                             "and modules_to_save are not supported)")
        for k in sd:
            if k.endswith(_A) and k[: -len(_A)] not in modules:
                modules.append(k[: -len(_A)])
            if k.endswith(_B) and k[: -len(_B)] + _A not in sd:
                raise ValueError(f"combine: adapter {i} has `{k}` but no `{k[: -len(_B)] + _A}`")
    if not modules:
        raise ValueError("combine: the adapters contain no `.lora_A.weight` tensor, nothing to combine")
    max_r = [max([c.r, *c.rank_pattern.values()]) for _, c in loaded]
    if method == "linear":
        if len(set(max_r)) != 1:
            raise ValueError(f"combine: method 'linear' needs adapters of equal rank, got ranks {max_r}")
        new_r = max_r[0]
    elif method == "cat":
        new_r = sum(max_r)
    else:
        new_r = rank or max(max_r)
    state: dict[str, Tensor] = {}
    for m in modules:
        name = m[len(_PREFIX):] if m.startswith(_PREFIX) else m
        As, Bs, cs = [], [], []
        for (sd, cfg), w in zip(loaded, weights):
            if m + _A not in sd:
                continue
            r, alpha = cfg.rank_alpha(name)
            A, B = sd[m + _A], sd[m + _B]
            if m + _B not in sd:
                raise ValueError(f"combine: `{m}` has lora_A but no lora_B")
            if A.shape[0] != B.shape[1]:
                raise ValueError(f"combine: `{m}` has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}")
            As.append(A)
            Bs.append(B)
            cs.append(float(w) * lora_scaling(r, alpha, cfg.use_rslora))
        dtype = As[0].dtype
        out_f, in_f = Bs[0].shape[0], As[0].shape[1]
        if any(a.shape[1] != in_f for a in As) or any(b.shape[0] != out_f for b in Bs):
            raise ValueError(f"combine: adapters disagree on the shape of `{m}`: "
                             f"lora_A {[tuple(a.shape) for a in As]}, lora_B {[tuple(b.shape) for b in Bs]}")
        if method == "linear" and len({a.shape[0] for a in As}) != 1:
            raise ValueError(f"combine: method 'linear' needs equal ranks in every module, but `{name}` has ranks "
                             f"{[a.shape[0] for a in As]} (a rank_pattern differs); use method 'cat' or 'svd'")
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        if method == "cat":
            A = torch.cat([c * a.to(cdt) for a, c in zip(As, cs)], 0)
            B = torch.cat([b.to(cdt) for b in Bs], 1)
        elif method == "linear":
            A = sum(math.copysign(math.sqrt(abs(c)), c) * a.to(cdt) for a, c in zip(As, cs))
            B = sum(math.sqrt(abs(c)) * b.to(cdt) for b, c in zip(Bs, cs))
        else:
            Bc = torch.cat([b.to(cdt) for b in Bs], 1)
            Ac = torch.cat([a.to(cdt) for a in As], 0)
            wc = torch.cat([torch.full((a.shape[0],), c, dtype=cdt, device=a.device) for a, c in zip(As, cs)])
            k = min(new_r, Ac.shape[0], out_f, in_f)
            U, S, Vh = linalg.factored_svd(Bc, Ac, wc, k)
            B, A = U.to(cdt) * S.to(cdt), Vh.to(cdt)
        # zero-pad to the common rank (peft allocates every module at the config's r)
        pad = new_r - A.shape[0]
        if pad > 0:
            A = torch.cat([A, A.new_zeros(pad, in_f)], 0)
            B = torch.cat([B, B.new_zeros(out_f, pad)], 1)
        state[m + _A] = A.to(dtype).contiguous()
        state[m + _B] = B.to(dtype).contiguous()
    config = LoRA(r=new_r, alpha=float(new_r))
    if out_dir is not None:
        from .extract import _save

        _save(state, config, [m[len(_PREFIX):] if m.startswith(_PREFIX) else m for m in modules], out_dir)
    return state, config
