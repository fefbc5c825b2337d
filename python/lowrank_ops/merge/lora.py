"""Merging LoRA adapters into one LoRA, in factor space where the method allows it.

Each input is a peft-format folder (``adapter_model.safetensors`` +
``adapter_config.json``); adapter ``i`` contributes ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` per module
(``sᵢ = alpha/r``, or ``alpha/√r`` with rsLoRA, Hu et al. 2021 Eq. 3) with weight
``wᵢ``; write ``cᵢ = wᵢ·sᵢ``.  The output is a peft-format LoRA with
``lora_alpha = r`` (scaling 1: every scale is folded into the factors).

``linear``  same rank r: ``A = Σ sign(cᵢ)√|cᵢ|·Aᵢ``, ``B = Σ √|cᵢ|·Bᵢ`` (peft's
            ``linear``).  **Not** the sum of the products: ``B·A`` has the cross
            terms ``Bᵢ·Aⱼ``; it is what peft does, and is only sensible for
            adapters trained from a shared init.
``cat``     ``A = [sign(cᵢ)√|cᵢ|·Aᵢ]`` stacked by rows, ``B = [√|cᵢ|·Bᵢ]`` by columns:
            ``B·A = Σ cᵢ·Bᵢ·Aᵢ`` exactly, rank ``Σ rᵢ``.  No dense matrix is formed.
``svd``     the exact SVD of ``[B₁ … B_N]·diag(c)·[A₁; …; A_N]`` from the factors
            (``lowrank_ops.linalg.factored_svd``), truncated to ``rank`` (default
            ``max rᵢ``): the best rank-``rank`` approximation of ``Σ cᵢBᵢAᵢ``
            (exact when ``rank ≥ Σ rᵢ``); ``B = U·diag(S)``, ``A = Vh`` as peft.
``ties`` / ``dare`` / ``dare_ties``
            need the dense per-task deltas (their masks are elementwise).  ``ΔWᵢ``
            is rebuilt ``tile_rows`` rows at a time (only ``N`` tiles alive), the
            tile is merged (TIES: per-tile top-``density`` trim, sign election by
            sum, disjoint mean; DARE: Bernoulli(``density``) keep and ``1/density``
            rescale, seeded per module and tile; ``dare_ties`` adds TIES' sign
            consensus), written into the merged ``ΔW``, which is then compressed to
            rank ``rank`` with ``lowrank_ops.linalg.rsvd``.  Errors: TIES' trim
            threshold is per row tile, not per matrix (identical when
            ``tile_rows ≥ out_features``); the rank-``rank`` compression of the
            (generally full-rank) merged ``ΔW`` has the randomized-SVD error
            ``≈ ‖ΔW − ΔW_rank‖`` (Halko et al. 2011, Thm. 10.6), reported per
            module in the returned ``errors`` (relative Frobenius).

Entry point :func:`merge_lora_adapters`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .. import linalg, ops
from ..adapters.io import CONFIG_NAME, WEIGHTS_NAME, read_config
from ..adapters.lora import DoRA, LoRA
LORA_METHODS = ("linear", "cat", "svd", "ties", "dare", "dare_ties")


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    modules: dict  # module key prefix -> (A (r, in), B (out, r))
    scaling: float


def read_lora(path: Union[str, os.PathLike]) -> LoraAdapter:
    """Read a peft LoRA folder (safetensors only) into ``{module: (A, B)}`` and its scaling."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"merge_lora_adapters: no {CONFIG_NAME} in {path}")
    if not w_path.is_file():
        raise FileNotFoundError(f"merge_lora_adapters: no {WEIGHTS_NAME} in {path} (pickled adapter_model.bin is not read)")
    cfg = json.loads(cfg_path.read_text())
    config, _target = read_config(path)  # peft dict -> adapters.LoRA / DoRA / VeRA (validates the peft fields)
    if isinstance(config, DoRA):
        raise ValueError(f"merge_lora_adapters: {cfg_path} is a DoRA adapter; its magnitude vectors do not merge "
                         "in factor space")
    if not isinstance(config, LoRA):
        raise ValueError(f"merge_lora_adapters: {cfg_path} has peft_type {cfg.get('peft_type')!r}; only LORA merges")
    r = config.r
    scaling = config.alpha / math.sqrt(r) if config.use_rslora else config.alpha / r
    modules: dict[str, list] = {}
    with safe_open(str(w_path), framework="pt") as f:
        for key in f.keys():
            for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
                if key.endswith(part):
                    modules.setdefault(key[: -len(part)], [None, None])[slot] = f.get_tensor(key)
                    break
            else:
                raise ValueError(f"merge_lora_adapters: {w_path} holds {key!r}, which is not a LoRA factor "
                                 "(embedding LoRAs and trained biases are not supported)")
    for mod, (A, B) in modules.items():
        if A is None or B is None:
            raise ValueError(f"merge_lora_adapters: {w_path} has {'lora_A' if A is not None else 'lora_B'} "
                             f"but not the other factor for {mod!r}")
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"merge_lora_adapters: {w_path}: {mod!r} lora_A is {tuple(A.shape)} but lora_B is "
                             f"{tuple(B.shape)} (expected (r, in) and (out, r))")
    return LoraAdapter(path, cfg, {k: tuple(v) for k, v in modules.items()}, scaling)


def _split(c: float) -> tuple[float, float]:
    """Coefficient ``c`` as ``(a, b)`` with ``a·b = c``, ``|a| = |b|``, the sign on ``a`` (peft's split for A and B)."""
    s = math.sqrt(abs(c))
    return (math.copysign(s, c) if c != 0 else 0.0), s


def merge_lora_adapters(adapters: Sequence[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike], *,
                        method: str = "cat", weights: Optional[Sequence[float]] = None, rank: Optional[int] = None,
                        density: float = 0.5, seed: int = 0, tile_rows: int = 1024,
                        dtype: Optional[torch.dtype] = None) -> dict:
    """Merge peft LoRA folders into one peft LoRA written to ``out_dir`` (atomically).

    Returns ``{"rank": r, "errors": {module: relative Frobenius error of the rank-r compression}}``
    (errors only for ``ties``/``dare``/``dare_ties``; the other methods are exact or not approximations).
    """
    if method not in LORA_METHODS:
        raise ValueError(f"merge_lora_adapters: unknown method {method!r}; known: {', '.join(LORA_METHODS)}")
    if not adapters:
        raise ValueError("merge_lora_adapters: no adapters given")
    ads = [read_lora(p) for p in adapters]
    w = [1.0] * len(ads) if weights is None else [float(x) for x in weights]
    if len(w) != len(ads):
        raise ValueError(f"merge_lora_adapters: {len(w)} weights for {len(ads)} adapters")
    if method in ("ties", "dare", "dare_ties") and not 0.0 < density <= 1.0:
        raise ValueError(f"merge_lora_adapters: density must lie in (0, 1], got {density}")
    mods = list(ads[0].modules)
    for a in ads[1:]:
        if set(a.modules) != set(mods):
            diff = sorted(set(a.modules) ^ set(mods))
            raise ValueError(f"merge_lora_adapters: {a.path} adapts different modules than {ads[0].path} "
                             f"(e.g. {diff[0]!r}); merge adapters of the same targets")
    for m in mods:
        shapes = {(a.modules[m][1].shape[0], a.modules[m][0].shape[1]) for a in ads}
        if len(shapes) > 1:
            raise ValueError(f"merge_lora_adapters: module {m!r} has different (out, in) shapes {sorted(shapes)}")
    ranks = [int(a.config["r"]) for a in ads]
    if method == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"merge_lora_adapters: 'linear' needs adapters of equal rank, got ranks {ranks}; use 'cat' or 'svd'")
    if method == "linear":
        new_rank = ranks[0]
    elif method == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = int(rank) if rank is not None else max(ranks)
    if new_rank < 1:
        raise ValueError(f"merge_lora_adapters: rank must be >= 1, got {new_rank}")
    coefs = [wi * a.scaling for wi, a in zip(w, ads)]
    out_tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for mi, m in enumerate(mods):
        As = [a.modules[m][0] for a in ads]
        Bs = [a.modules[m][1] for a in ads]
        io_dtype = dtype or As[0].dtype
        cdt = torch.float64 if As[0].dtype == torch.float64 else torch.float32
        As = [x.to(cdt) for x in As]
        Bs = [x.to(cdt) for x in Bs]
        if method in ("linear", "cat"):
            sa = [_split(c)[0] for c in coefs]
            sb = [_split(c)[1] for c in coefs]
            if method == "linear":
                A = sum(s * x for s, x in zip(sa, As))
                B = sum(s * x for s, x in zip(sb, Bs))
            else:
                A = torch.cat([s * x for s, x in zip(sa, As)], 0)
                B = torch.cat([s * x for s, x in zip(sb, Bs)], 1)
        elif method == "svd":
            wvec = torch.cat([torch.full((r,), c, dtype=cdt) for r, c in zip(ranks, coefs)])
            U, S, Vh = linalg.factored_svd(torch.cat(Bs, 1), torch.cat(As, 0), weights=wvec,
                                           rank=min(new_rank, sum(ranks), Bs[0].shape[0], As[0].shape[1]))
            A, B = _pad_rank(U * S, Vh, new_rank)
        else:
            out_f, in_f = Bs[0].shape[0], As[0].shape[1]
            merged = torch.empty(out_f, in_f, dtype=cdt)
            for r0 in range(0, out_f, max(1, int(tile_rows))):
                r1 = min(out_f, r0 + int(tile_rows))
                tiles = torch.stack([c * (b[r0:r1] @ a) for c, a, b in zip(coefs, As, Bs)]).reshape(len(ads), -1)
                ones = torch.ones(len(ads), dtype=cdt)
                if method == "ties":  # TIES (Yadav et al. 2023, Alg. 1): trim, elect sign, disjoint mean
                    tile = ops.ties_merge(tiles, ones, density, "sum", True)
                else:  # DARE (Yu et al. 2024, Eq. 2) drop + rescale; seeded per module and tile
                    tile_seed = int(seed) * 1_000_003 + mi * 7919 + r0
                    tile = ops.dare_merge(tiles, ones, density, tile_seed,
                                          "ties" if method == "dare_ties" else "none", "sum", method == "dare_ties")
                merged[r0:r1] = tile.reshape(r1 - r0, in_f)
                del tiles, tile
            k = min(new_rank, out_f, in_f)
            U, S, Vh = linalg.rsvd(merged, k)
            B_, A_ = U * S, Vh
            denom = float(merged.norm())
            errors[m] = float((merged - B_ @ A_).norm()) / denom if denom > 0 else 0.0
            A, B = _pad_rank(B_, A_, new_rank)
        out_tensors[f"{m}.lora_A.weight"] = A.to(io_dtype).contiguous()
        out_tensors[f"{m}.lora_B.weight"] = B.to(io_dtype).contiguous()
    cfg = dict(ads[0].config)
    cfg.update(r=new_rank, lora_alpha=new_rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    _write_atomic(Path(out_dir), out_tensors, cfg)
    return {"rank": new_rank, "errors": errors}


def _pad_rank(B: Tensor, A: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(A (r, in), B (out, r))`` from ``B (out, k)``, ``A (k, in)``, zero-padded when ``k < r``."""
    k = A.shape[0]
    if k < r:
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1)
    return A, B


def _write_atomic(out: Path, tensors: dict, cfg: dict) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"merge_lora_adapters: output folder {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["merge_lora_adapters", "read_lora", "LORA_METHODS"]
