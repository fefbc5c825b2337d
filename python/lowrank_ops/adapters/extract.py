"""LoRA extraction from a full fine-tune: truncated SVD of each weight delta.

``ΔW = W_tuned − W_base ≈ U_k·S_k·V_kᵀ`` (Eckart–Young: the best rank-``k`` approximation
in Frobenius and spectral norm), split as ``B = U_k·√(S_k/s)``, ``A = √(S_k/s)·V_kᵀ`` so that
``s·B·A = U_k·S_k·V_kᵀ``.  The SVD is ``linalg.rsvd`` (never a dense full SVD); with
``energy`` the rank of each layer is the smallest ``k`` with ``Σ_{i≤k} σ_i² ≥ energy·‖ΔW‖_F²``
(rsvd at doubling ranks until the captured energy reaches the target).  This is what
mergekit's ``extract-lora`` and kohya's ``extract_lora_from_models`` do with dense SVDs.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .. import linalg
from .inject import Target, _matches
from .lora import LoRA

_PREFIX = "base_model.model."

# module names that are embeddings by the usual conventions (HF: embed_tokens, wte, wpe,
# word/position/token_type_embeddings, shared, embed_positions; and plain ``embed``/``emb``):
# the last name component contains "embed"/"emb", or is wte / wpe / shared
_EMBED_NAME = re.compile(r"(^|[._])(embed\w*|emb|\w*_embeddings?|wte|wpe|shared)$")


def _embedding_modules(names, model: Optional[nn.Module]) -> set:
    """The module names among ``names`` that are embeddings: by type when ``model`` is
    given (anything but ``nn.Linear``), else by the name conventions of ``_EMBED_NAME``."""
    if model is not None:
        mods = dict(model.named_modules())
        return {n for n in names if n in mods and not isinstance(mods[n], nn.Linear)}
    return {n for n in names if _EMBED_NAME.search(n)}


def _rank_for_energy(delta: Tensor, energy: float, max_rank: int, n_iter: int, seed: int):
    total = float(delta.double().square().sum())
    k = min(16, max_rank)
    while True:
        U, S, Vh = linalg.rsvd(delta, k, n_iter=n_iter, seed=seed)
        cum = torch.cumsum(S.double().square(), 0)
        if cum[-1] >= energy * total * (1 - 1e-12) or k >= max_rank:
            break
        k = min(2 * k, max_rank)
    hit = torch.nonzero(cum >= energy * total * (1 - 1e-12))
    rank = int(hit[0]) + 1 if hit.numel() else k
    return U[:, :rank], S[:rank], Vh[:rank]


@torch.no_grad()
def extract_lora(
    base_sd: Mapping[str, Tensor],
    tuned_sd: Mapping[str, Tensor],
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    target: Optional[Target] = None,
    out_dir: Optional[str | os.PathLike] = None,
    max_rank: Optional[int] = None,
    n_iter: int = 4,
    seed: int = 0,
    model: Optional[nn.Module] = None,
) -> tuple[dict[str, Tensor], LoRA]:
    """Extract a LoRA adapter that turns ``base_sd`` into (approximately) ``tuned_sd``.

    Args:
        base_sd, tuned_sd: state dicts of the same model (``<module>.weight`` keys).
        rank: the rank of every layer (capped at ``min(out, in)``) — or
        energy: in (0, 1]: per-layer rank from the energy rule (``rank_pattern`` in the config).
        target: which modules to extract (a regex matched against the whole module name, or
            a list of name suffixes, as ``adapters.inject``); default every 2-D ``.weight``
            of a Linear module whose delta is non-zero.  Only ``nn.Linear`` layers are
            extracted: the file is a plain LoRA (``lora_A``/``lora_B``), which peft and
            ``load_pretrained`` apply to Linear layers only.  Embeddings are skipped by
            default and a ``target`` naming one raises.  Which modules are embeddings is
            decided by type when ``model`` is given, else by name (as HF names them: a last
            name component ``embed*``, ``emb``, ``*_embedding(s)``, ``wte``, ``wpe``,
            ``shared``; a tied ``lm_head`` is a Linear and is extracted).
        out_dir: also write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft
            layout; atomic writes) there.
        max_rank: cap for ``energy`` (default ``min(out, in)``).
        n_iter, seed: ``linalg.rsvd`` parameters.
        model: optional module of that architecture (the base model, or one on the meta
            device): only the ``.weight`` of its ``nn.Linear`` modules is extracted.

    Bias deltas are not extracted (``load_pretrained`` has no ``lora_bias``): a
    ``UserWarning`` names each selected module whose ``.bias`` changed and the delta's norm.

    Returns:
        ``(state, config)``: tensors under peft key names
        (``base_model.model.<module>.lora_A.weight``) and a :class:`adapters.LoRA` config
        (``alpha = r``; per-layer ranks in ``rank_pattern``, their scale folded into the factors).
        Layers whose delta is zero (or whose energy rank is 0) are left out.
    """
    if (rank is None) == (energy is None):
        raise ValueError(f"extract_lora: give exactly one of rank and energy (got rank={rank!r}, energy={energy!r})")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"extract_lora: rank must be an int >= 1, got {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"extract_lora: energy must lie in (0, 1], got {energy!r}")
    factors: dict[str, tuple[Tensor, Tensor, Tensor, torch.dtype]] = {}
    candidates = [k[: -len(".weight")] for k, w in base_sd.items() if k.endswith(".weight") and w.dim() == 2]
    embeds = _embedding_modules(candidates, model)
    if target is not None:
        named = sorted(m for m in embeds if _matches(target, m))
        if named:
            how = "are not nn.Linear in `model`" if model is not None else \
                "are embeddings by name (pass model=... to decide by module type)"
            raise ValueError(f"extract_lora: target selects {named[:8]}, which {how}; a LoRA file carries "
                             "lora_A/lora_B for Linear layers only — leave embeddings out of target")
    linear_names = None if model is None else {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    bias_changed: list[str] = []
    for module in candidates:
        key, w_base = module + ".weight", base_sd[module + ".weight"]
        if module in embeds or (linear_names is not None and module not in linear_names):
            continue
        if target is not None and not _matches(target, module):
            continue
        bkey = module + ".bias"
        if bkey in base_sd and bkey in tuned_sd and tuple(base_sd[bkey].shape) == tuple(tuned_sd[bkey].shape):
            bn = float((tuned_sd[bkey].double() - base_sd[bkey].to(tuned_sd[bkey].device).double()).norm())
            if bn > 0:
                bias_changed.append(f"{module} (|Δbias| = {bn:.3g})")
        if key not in tuned_sd:
            raise KeyError(f"extract_lora: `{key}` is in base_sd but not in tuned_sd")
        w_tuned = tuned_sd[key]
        if w_tuned.shape != w_base.shape:
            raise ValueError(f"extract_lora: `{key}` has shape {tuple(w_base.shape)} in base_sd but "
                             f"{tuple(w_tuned.shape)} in tuned_sd")
        cdt = torch.float64 if w_tuned.dtype == torch.float64 else torch.float32
        delta = w_tuned.to(cdt) - w_base.to(device=w_tuned.device, dtype=cdt)
        if not bool(delta.any()):
            continue
        kmax = min(delta.shape)
        if rank is not None:
            U, S, Vh = linalg.rsvd(delta, min(rank, kmax), n_iter=n_iter, seed=seed)
        else:
            U, S, Vh = _rank_for_energy(delta, energy, min(max_rank or kmax, kmax), n_iter, seed)
        if S.numel() == 0:
            continue
        factors[module] = (U, S, Vh, w_tuned.dtype)
    if bias_changed:
        warnings.warn(f"extract_lora: the bias of {len(bias_changed)} module(s) changed and is NOT in the "
                      f"extracted adapter (no lora_bias support): {', '.join(bias_changed[:8])}"
                      f"{' ...' if len(bias_changed) > 8 else ''}", UserWarning, stacklevel=3)  # 3: past torch.no_grad's wrapper
    if not factors:
        raise ValueError(f"extract_lora: no 2-D weight differs between base_sd and tuned_sd (target={target!r})")

    ranks = {m: f[1].numel() for m, f in factors.items()}
    r = max(ranks.values())  # with `rank`, every layer has min(rank, min(out, in))
    rank_pattern = {m: k for m, k in ranks.items() if k != r}
    config = LoRA(r=r, alpha=float(r), rank_pattern=rank_pattern)
    state: dict[str, Tensor] = {}
    for m, (U, S, Vh, dtype) in factors.items():
        k = ranks[m]
        s = r / k  # alpha = r for every layer, so s = r / k
        root = (S / s).sqrt()
        state[f"{_PREFIX}{m}.lora_A.weight"] = (root.unsqueeze(1) * Vh).to(dtype).contiguous()
        state[f"{_PREFIX}{m}.lora_B.weight"] = (U * root).to(dtype).contiguous()
    if out_dir is not None:
        _save(state, config, sorted(factors), out_dir)
    return state, config


def _save(state: dict[str, Tensor], config: LoRA, modules: list[str], out_dir) -> None:
    from .io import write_adapter_files

    write_adapter_files(out_dir, state, config.to_peft_dict(modules))
