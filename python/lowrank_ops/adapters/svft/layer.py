"""SVFT layer: ``ΔW = U·M·Vᵀ`` on the frozen singular vectors of ``W`` with a sparse trainable ``M``.

Lingam et al. 2024, "SVFT: Parameter-Efficient Fine-Tuning with Singular
Vectors", https://arxiv.org/abs/2405.19597, method section (``W = U(Σ + M)Vᵀ``,
i.e. ``ΔW = U M Vᵀ``).  Patterns of ``M``:

* ``plain`` — diagonal (singular-value tuning); ``core`` is the ``(n,)`` vector itself.
* ``banded`` — the main diagonal and ``off_diag`` diagonals on each side:
  ``n(2d+1) − d(d+1)`` coefficients.
* ``random`` — ``min(2d+1, n)`` distinct random columns in every row (seeded;
  the same budget per row as ``banded``).
* ``top_k`` — the paper's alignment rule: the ``n(2d+1) − d(d+1)`` pairs
  ``(i, j)`` with the largest ``⟨u_i, v_j⟩`` (signed, as the authors' code).
  For a non-square ``W`` the vectors have different lengths; we take the inner
  product over the first ``min(out, in)`` coordinates (our choice; the paper
  only defines the square case).

Sparse patterns store only the ``nnz`` values (a parameter) and fixed
``(row, col)`` index buffers; each forward scatters them into a dense
``(n, n)`` core for ``lowrank_linear``.  Cost: ``n²`` temporary memory and
``T·n²`` core FLOPs per forward (``T`` tokens) instead of the ``T·nnz`` of a
true sparse product — still less than the authors' code, which forms the dense
``(out, in)`` weight each step.  ``plain`` needs no scatter.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..spectral_common import SpectralLinear, resolve_rank, thin_svd

PATTERNS = ("plain", "banded", "random", "top_k")


def band_indices(n: int, d: int) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of the ``2d+1`` central diagonals of an ``n × n`` matrix."""
    rows, cols = [], []
    for o in range(-d, d + 1):
        i = torch.arange(max(0, -o), min(n, n - o))
        rows.append(i)
        cols.append(i + o)
    return torch.cat(rows), torch.cat(cols)


def band_count(n: int, d: int) -> int:
    d = min(d, n - 1)
    return n * (2 * d + 1) - d * (d + 1)


class SVFTLinear(SpectralLinear):
    """``y = W x + b + U·M·Vᵀ x`` with ``U (out, n)``, ``Vᵀ (n, in)`` frozen (``svft_U``,
    ``svft_Vh``) and ``M`` given by ``svft_m`` (plain, ``(n,)``) or ``svft_values``
    at ``(svft_rows, svft_cols)`` (other patterns).  ``n = r`` (default
    ``min(out, in)``: the paper's full-rank bases); a smaller ``r`` keeps the top-r
    singular vectors (the base weight stays whole)."""

    def __init__(self, base_layer: nn.Linear, pattern: str = "plain", off_diag: int = 1, r: Optional[int] = None,
                 init: str = "zeros", seed: int = 0, save_bases: bool = True) -> None:
        super().__init__(base_layer)
        if pattern not in PATTERNS:
            raise ValueError(f"SVFT: pattern must be one of {PATTERNS}, got {pattern!r}")
        if not isinstance(off_diag, int) or off_diag < 0:
            raise ValueError(f"SVFT: off_diag must be an int >= 0, got {off_diag!r}")
        k = min(self.in_features, self.out_features)
        n = resolve_rank("SVFT", r, k)
        self.pattern, self.off_diag, self.r = pattern, off_diag, n
        U, _, Vh = thin_svd(base_layer.weight)
        U, Vh = U[:, :n], Vh[:n]
        self._basis("svft_U", U, save_bases)
        self._basis("svft_Vh", Vh, save_bases)
        if pattern == "plain":
            self.svft_m = self._param(torch.zeros(n))
        else:
            rows, cols = self._pattern_indices(U, Vh, n, seed)
            self.register_buffer("svft_rows", rows.to(base_layer.weight.device))
            self.register_buffer("svft_cols", cols.to(base_layer.weight.device))
            self.svft_values = self._param(torch.zeros(rows.numel()))
        self.reset_parameters(init, seed)

    def _pattern_indices(self, U: Tensor, Vh: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        d = min(self.off_diag, n - 1)
        if self.pattern == "banded":
            return band_indices(n, d)
        if self.pattern == "random":
            per_row = min(2 * d + 1, n)
            g = torch.Generator().manual_seed(seed)
            cols = torch.rand(n, n, generator=g).topk(per_row, dim=1).indices
            rows = torch.arange(n).unsqueeze(1).expand(n, per_row)
            return rows.reshape(-1), cols.reshape(-1)
        # top_k: alignment ⟨u_i, v_j⟩ over the common leading coordinates
        p = min(U.shape[0], Vh.shape[1])
        scores = U[:p].T @ Vh[:, :p].T  # (n, n): scores[i, j] = ⟨u_i[:p], v_j[:p]⟩
        idx = scores.reshape(-1).topk(band_count(n, d)).indices.cpu()
        return idx // n, idx % n

    @torch.no_grad()
    def reset_parameters(self, init: str = "zeros", seed: int = 0) -> None:
        p = self.svft_m if self.pattern == "plain" else self.svft_values
        if init == "zeros":
            p.zero_()
        elif init == "normal":  # non-zero start, for tests / the authors' random init
            g = torch.Generator().manual_seed(seed + 1)
            p.copy_(torch.randn(p.shape, generator=g) / max(1, self.r) ** 0.5)
        else:
            raise ValueError(f"SVFT: init must be 'zeros' or 'normal', got {init!r}")

    def core_matrix(self) -> Tensor:
        """``M`` as a dense ``(n, n)`` matrix (scattered from the sparse values)."""
        if self.pattern == "plain":
            return torch.diag(self.svft_m)
        n = self.r
        flat = self.svft_values.new_zeros(n * n).index_add(0, self.svft_rows * n + self.svft_cols, self.svft_values)
        return flat.view(n, n)

    def factors(self):
        core = self.svft_m if self.pattern == "plain" else self.core_matrix()
        return self.svft_Vh, self.svft_U, core, 1.0

    def extra_repr(self) -> str:
        nnz = self.r if self.pattern == "plain" else self.svft_values.numel()
        return f"{super().extra_repr()}, pattern={self.pattern}, r={self.r}, nnz={nnz}"
