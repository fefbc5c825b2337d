"""Merging kernels: magnitude selection, TIES, DARE, n:m masks, sign consensus.

Python halves of the ops declared in ``cpp/registration.cpp`` (family ``merge``):
typed wrappers and fake kernels.  The numerics live in ``cpp/merge/*.cpp`` and
``cuda/merge/merge_kernels.cu``; ``lowrank_ops.reference.merge`` is the oracle.

None of these ops is differentiable: their outputs are masks, counts, a
selected order statistic, or a sign-gated combination whose discrete parts have
no gradient.  Their registered autograd raises on a backward through them
(also inside a larger graph, where a silently dropped contribution would be a
wrong gradient); on inputs that do not require grad, or under ``no_grad``, the
outputs do not require grad.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_lib = torch.ops.lowrank_ops


def magnitude_threshold(x: Tensor, density: float) -> Tensor:
    """The k-th largest ``|x|`` (0-d tensor in ``x``'s dtype), by selection in O(numel).

    ``k = max(1, floor(density * numel))`` for ``0 < density < 1`` (mergekit's
    ``sparsify.magnitude`` rule: a positive density keeps at least one entry),
    ``k = numel`` at ``density == 1`` (the threshold is ``min |x|``) and ``k = 0``
    at ``density == 0`` or an empty ``x`` (the threshold is ``+inf``: keep nothing).

    Keep policy used by every op of this family: keep ``|x| >= threshold``, so
    exact ties at the threshold are all kept (mergekit's ``argsort`` keeps an
    arbitrary exactly-k subset of them).  NaN ranks above every magnitude and
    a NaN entry is always kept; if ``k`` does not exceed the number of NaNs the
    threshold is NaN.  Raises for ``density`` outside ``[0, 1]``.
    """
    return _lib.magnitude_threshold(x, float(density))


def ties_merge(
    deltas: Tensor, weights: Tensor, density: float, sign_method: str = "sum", normalize: bool = True
) -> Tensor:
    """TIES-Merging of ``N`` task vectors (Yadav et al. 2023, Alg. 1), fused.

    With ``τ̂_i`` = ``deltas[i]`` trimmed to its top-``density`` magnitudes (see
    :func:`magnitude_threshold`) and ``s_i = w_i·τ̂_i`` (mergekit multiplies the
    weights in before the election):

    * elect ``γ = sign(Σ_i s_i)`` (``"sum"``, Alg. 1 step 2) or
      ``sign(Σ_i sign(s_i))`` (``"count"``); ``γ = +1`` where that is 0;
    * disjoint merge ``τ = Σ_{i: sign(s_i)=γ} s_i / Σ_{i: sign(s_i)=γ} w_i``
      (Alg. 1 step 3 with mergekit's weights; no division if ``normalize`` is
      False or the divisor is 0).

    Args:
        deltas: ``(N, P)`` task vectors, one flattened tensor per row (fp64/fp32/bf16/fp16).
        weights: ``(N,)`` floating, same device.
        density: fraction kept per model, in ``[0, 1]``.
        sign_method: ``"sum"`` or ``"count"``.
        normalize: divide by the agreeing weights (mergekit's default for ``ties``).

    Returns:
        ``(P,)`` merged delta in ``deltas``' dtype, accumulated in fp32 (fp64 for fp64).
        NaN wherever ``Σ_i s_i`` is NaN (a kept NaN delta).
    """
    return _lib.ties_merge(deltas, weights, float(density), sign_method, bool(normalize))


def dare_merge(
    deltas: Tensor,
    weights: Tensor,
    density: float,
    seed: int,
    consensus: str = "none",
    sign_method: str = "sum",
    normalize: bool = False,
) -> Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario", Eq. 2-3) + linear or TIES merge.

    Each ``deltas[i, p]`` is kept with probability ``density`` and rescaled by
    ``1/density`` (the paper's ``1/(1-p)``; mergekit 0.1.5 instead rescales to
    the original L1 norm), so ``E[output] = Σ_i w_i·deltas[i]``.  The drop mask
    is a counter-based hash of ``(seed, i, p)`` (``merge_math.h``), so it is the
    same on any thread count and on CPU and CUDA, and the reference reproduces
    it exactly.  The keep probability is ``floor(density·2²⁴)/2²⁴``.

    ``consensus="none"``: ``Σ_i w_i·τ̃_i`` (÷ ``Σ_i w_i`` if ``normalize``);
    ``consensus="ties"``: the election and disjoint sum of :func:`ties_merge` on
    the dropped-and-rescaled ``τ̃_i`` (÷ agreeing weights if ``normalize``).
    mergekit's ``dare_linear`` / ``dare_ties`` default to ``normalize=False``.

    Returns ``(P,)`` in ``deltas``' dtype.
    """
    return _lib.dare_merge(deltas, weights, float(density), int(seed), consensus, sign_method, bool(normalize))


def nm_mask(x: Tensor, n: int, m: int, forbidden: Optional[Tensor] = None) -> Tensor:
    """n:m magnitude mask along the last dim (CABS, Yang et al. 2025, balanced sparsification).

    In every group of ``m`` consecutive entries of the last dim, True marks the
    ``n`` largest ``|x|`` among positions where ``forbidden`` is False (CABS's
    conflict-aware step: positions kept by earlier task vectors are forbidden
    for later ones).  Equal magnitudes go to the lower index; NaN ranks as
    ``+inf``; a group with fewer than ``n`` allowed positions keeps all of them.
    The last dim must be a multiple of ``m`` (pad first).

    Returns a bool tensor of ``x``'s shape.
    """
    return _lib.nm_mask(x, int(n), int(m), forbidden)


def sign_consensus(
    deltas: Tensor, weights: Optional[Tensor] = None, eps: float = 0.0, sign_method: str = "sum"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-coordinate sign election and support over ``N`` task vectors.

    Model ``i`` contributes at ``p`` when ``|deltas[i, p]| > eps`` (NaN never
    contributes).  Over the contributors, with ``s_i = w_i·deltas[i, p]``:
    ``sign = +1 if Σ s_i >= 0 else -1`` (``"sum"``; ``"count"`` sums ``sign(s_i)``),
    ``support`` = contributors with ``sign(s_i) == sign``, ``count`` = contributors.

    NegMerge (Kim et al. 2025) keeps the coordinates where every model agrees
    (``support == N``); RAM (Reinforced Agent Merging) averages where
    ``count > 1`` and keeps unique updates (``count == 1``).

    Returns ``(sign (P) in deltas' dtype, support (P) int32, count (P) int32)``.
    """
    return _lib.sign_consensus(deltas, weights, float(eps), sign_method)


# --------------------------------------------------------------------------- fakes


def _check_dw(op, deltas, weights):
    torch._check(deltas.dim() == 2, lambda: f"{op}: `deltas` must be (N, P), got shape {tuple(deltas.shape)}")
    torch._check(deltas.dtype.is_floating_point, lambda: f"{op}: `deltas` must be floating, got {deltas.dtype}")
    if weights is not None:
        torch._check(
            weights.dim() == 1 and weights.shape[0] == deltas.shape[0],
            lambda: f"{op}: `weights` must be (N,) = ({deltas.shape[0]},), got shape {tuple(weights.shape)}",
        )


def _check_density(op, density):
    torch._check(0.0 <= density <= 1.0, lambda: f"{op}: `density` must be in [0, 1], got {density}")


@torch.library.register_fake("lowrank_ops::magnitude_threshold")
def _magnitude_threshold_fake(x, density):
    torch._check(x.dtype.is_floating_point, lambda: f"magnitude_threshold: `x` must be floating, got {x.dtype}")
    _check_density("magnitude_threshold", density)
    return x.new_empty(())


@torch.library.register_fake("lowrank_ops::ties_merge")
def _ties_merge_fake(deltas, weights, density, sign_method="sum", normalize=True):
    _check_dw("ties_merge", deltas, weights)
    _check_density("ties_merge", density)
    torch._check(sign_method in ("sum", "count"), lambda: f"ties_merge: unknown `sign_method` {sign_method!r}")
    return deltas.new_empty((deltas.shape[1],))


@torch.library.register_fake("lowrank_ops::dare_merge")
def _dare_merge_fake(deltas, weights, density, seed, consensus="none", sign_method="sum", normalize=False):
    _check_dw("dare_merge", deltas, weights)
    _check_density("dare_merge", density)
    torch._check(consensus in ("none", "ties"), lambda: f"dare_merge: unknown `consensus` {consensus!r}")
    torch._check(sign_method in ("sum", "count"), lambda: f"dare_merge: unknown `sign_method` {sign_method!r}")
    return deltas.new_empty((deltas.shape[1],))


@torch.library.register_fake("lowrank_ops::nm_mask")
def _nm_mask_fake(x, n, m, forbidden=None):
    torch._check(m >= 1 and 0 <= n <= m, lambda: f"nm_mask: need 0 <= n <= m and m >= 1, got n={n}, m={m}")
    torch._check(x.dim() >= 1 and x.shape[-1] % m == 0,
                 lambda: f"nm_mask: the last dim of `x` {tuple(x.shape)} must be a multiple of m={m}")
    return x.new_empty(x.shape, dtype=torch.bool)


@torch.library.register_fake("lowrank_ops::sign_consensus")
def _sign_consensus_fake(deltas, weights=None, eps=0.0, sign_method="sum"):
    _check_dw("sign_consensus", deltas, weights)
    P = deltas.shape[1]
    return deltas.new_empty((P,)), deltas.new_empty((P,), dtype=torch.int32), deltas.new_empty((P,), dtype=torch.int32)


# --------------------------------------------------------------------------- autograd

from .linalg import _not_differentiable, _setup_nothing  # noqa: E402

for _name in ("magnitude_threshold", "ties_merge", "dare_merge", "nm_mask", "sign_consensus"):
    torch.library.register_autograd(
        f"lowrank_ops::{_name}", _not_differentiable(_name, "or call it under torch.no_grad() (merging has no gradient)"),
        setup_context=_setup_nothing)
