"""SVFT layer: ``ΔW = U·M·Vᵀ`` on the frozen singular vectors of ``W`` with a sparse trainable ``M``.

Lingam et al. 2024, "SVFT: Parameter-Efficient Fine-Tuning with Singular
Vectors", https://arxiv.org/abs/2405.19597 (NeurIPS 2024).  §3.1, Eq. (1):
``h = W₀x + ΔWx = U(Σ + M)Vᵀx`` with the *full* SVD ``W₀ = UΣVᵀ`` and ``M`` sparse
with an a-priori fixed pattern Ω, i.e. ``ΔW = Σ_{(i,j)∈Ω} m_ij u_i v_jᵀ`` (Eq. (2)).
Patterns of ``M`` (§3.1):

* ``plain`` — diagonal (singular-value tuning); ``core`` is the ``(n,)`` vector itself.
* ``banded`` — ``M_ij = 0`` unless ``i − d ≤ j ≤ i + d``: ``n(2d+1) − d(d+1)`` coefficients
  (Appendix B, Table 8).
* ``random`` — "randomly selecting k elements to be learnable" (§3.1), with ``k`` the
  banded budget ``n(2d+1) − d(d+1)`` (§5.5 / Table 7 align the budgets; the official
  ``svft_layers.py`` uses this ``k``): ``k`` distinct ``(row, col)`` pairs drawn uniformly
  over the whole ``n × n`` matrix (seeded).  The official code draws the pairs with
  replacement (``randint``), so repeats can leave fewer than ``k`` distinct entries; we
  draw without replacement so the budget is exact.
* ``top_k`` — the paper's alignment rule: the ``n(2d+1) − d(d+1)`` pairs
  ``(i, j)`` with the largest ``⟨u_i, v_j⟩`` (signed, as the authors' code).
  For a non-square ``W`` the vectors have different lengths; we take the inner
  product over the first ``min(out, in)`` coordinates (our choice; the paper
  only defines the square case).

Initialisation of ``M`` and the gate.  The paper does not state how ``M`` is
initialised and has no gate; ``M = 0`` makes Eq. (1) the pre-trained layer, so our
default ``init="zeros"`` (identity at init) is within the paper.  The official
layer instead draws the learnable values ``kaiming_normal_`` (std ``√(2/k)`` for ``k``
values) and multiplies them by ``sigmoid(gate)`` with one trainable scalar ``gate``
per layer starting at 0 (so ``M`` starts at half its draw, not at 0); that is
``init="kaiming", gate=True`` here.

Rank.  The paper's method uses all singular vectors (Eq. (1); Appendix C.4 / Table 12
shows truncating them hurts).  Our default ``r=None`` is exactly Eq. (1) with the thin
SVD (``n = min(out, in)``; the rows/columns of a full ``d₁ × d₂`` ``M`` beyond ``n`` only
meet the null space and the patterns above are defined on the leading ``n × n`` block,
as in the official code).  For ``r < n`` the paper's ablation (C.4) and the official
layer *replace* ``W`` by ``U_r(Σ_r + M)V_rᵀ``, dropping the tail ``Σ_{i>r} σ_i u_i v_iᵀ``
(the layer is then not the pre-trained one at init): ``drop_tail=True``.  Our default
``drop_tail=False`` keeps ``W`` whole and adds ``U_r M V_rᵀ``, which *is* Eq. (1) with
Ω restricted to the leading ``r × r`` block (same trainable coefficients, identity at
init, only the memory of ``U``/``V`` shrinks).

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
INITS = ("zeros", "normal", "kaiming")


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
    at ``(svft_rows, svft_cols)`` (other patterns), times ``sigmoid(svft_gate)`` when
    ``gate=True``.  ``n = r`` (default ``min(out, in)``: the paper's full-rank bases); a
    smaller ``r`` keeps the top-r singular vectors, with the base weight whole
    (``drop_tail=False``) or truncated to ``U_r Σ_r V_rᵀ`` (``drop_tail=True``)."""

    def __init__(self, base_layer: nn.Linear, pattern: str = "plain", off_diag: int = 1, r: Optional[int] = None,
                 init: str = "zeros", seed: int = 0, save_bases: bool = True, gate: bool = False,
                 drop_tail: bool = False) -> None:
        super().__init__(base_layer)
        if pattern not in PATTERNS:
            raise ValueError(f"SVFT: pattern must be one of {PATTERNS}, got {pattern!r}")
        if not isinstance(off_diag, int) or off_diag < 0:
            raise ValueError(f"SVFT: off_diag must be an int >= 0, got {off_diag!r}")
        if init not in INITS:
            raise ValueError(f"SVFT: init must be one of {INITS}, got {init!r}")
        k = min(self.in_features, self.out_features)
        n = resolve_rank("SVFT", r, k)
        self.pattern, self.off_diag, self.r = pattern, off_diag, n
        self.gate, self.drop_tail = bool(gate), bool(drop_tail)
        U, S, Vh = thin_svd(base_layer.weight)
        U, S, Vh = U[:, :n], S[:n], Vh[:n]
        if self.drop_tail and n < k:  # W -> U_r Σ_r V_rᵀ (paper App. C.4, official layer)
            self._set_base((U * S) @ Vh)
        self._basis("svft_U", U, save_bases)
        self._basis("svft_Vh", Vh, save_bases)
        if pattern == "plain":
            self.svft_m = self._param(torch.zeros(n))
        else:
            rows, cols = self._pattern_indices(U, Vh, n, seed)
            self.register_buffer("svft_rows", rows.to(base_layer.weight.device))
            self.register_buffer("svft_cols", cols.to(base_layer.weight.device))
            self.svft_values = self._param(torch.zeros(rows.numel()))
        if self.gate:  # official layer: M·sigmoid(gate), one trainable scalar per layer, gate = 0 at init
            self.svft_gate = self._param(torch.zeros(1))
        self.reset_parameters(init, seed)

    def _pattern_indices(self, U: Tensor, Vh: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        d = min(self.off_diag, n - 1)
        if self.pattern == "banded":
            return band_indices(n, d)
        if self.pattern == "random":
            # k = n(2d+1) − d(d+1) distinct entries anywhere in M (the banded budget)
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n * n, generator=g)[:band_count(n, d)].sort().values
            return idx // n, idx % n
        # top_k: alignment ⟨u_i, v_j⟩ over the common leading coordinates
        p = min(U.shape[0], Vh.shape[1])
        scores = U[:p].T @ Vh[:, :p].T  # (n, n): scores[i, j] = ⟨u_i[:p], v_j[:p]⟩
        idx = scores.reshape(-1).topk(band_count(n, d)).indices.cpu()
        return idx // n, idx % n

    @torch.no_grad()
    def reset_parameters(self, init: str = "zeros", seed: int = 0) -> None:
        """``"zeros"``: ``M = 0`` (ΔW = 0 at init); ``"normal"``: ``N(0, 1/r)`` values (a
        non-zero start for tests); ``"kaiming"``: the official layer's ``kaiming_normal_``
        draw, std ``√(2/k)`` over the ``k`` learnable values.  The gate restarts at 0."""
        p = self.svft_m if self.pattern == "plain" else self.svft_values
        if init == "zeros":
            p.zero_()
        elif init == "normal":
            g = torch.Generator().manual_seed(seed + 1)
            p.copy_(torch.randn(p.shape, generator=g) / max(1, self.r) ** 0.5)
        elif init == "kaiming":  # fan_in = k for the official (1, k) view; gain √2
            g = torch.Generator().manual_seed(seed + 1)
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / max(1, p.numel())) ** 0.5)
        else:
            raise ValueError(f"SVFT: init must be one of {INITS}, got {init!r}")
        if self.gate:
            self.svft_gate.zero_()

    def _values(self) -> Tensor:
        v = self.svft_m if self.pattern == "plain" else self.svft_values
        return v * torch.sigmoid(self.svft_gate) if self.gate else v

    def core_matrix(self) -> Tensor:
        """``M`` as a dense ``(n, n)`` matrix (scattered from the sparse values, gate applied)."""
        v = self._values()
        if self.pattern == "plain":
            return torch.diag(v)
        n = self.r
        flat = v.new_zeros(n * n).index_add(0, self.svft_rows * n + self.svft_cols, v)
        return flat.view(n, n)

    def factors(self):
        core = self._values() if self.pattern == "plain" else self.core_matrix()
        return self.svft_Vh, self.svft_U, core, 1.0

    def extra_repr(self) -> str:
        nnz = self.r if self.pattern == "plain" else self.svft_values.numel()
        return (f"{super().extra_repr()}, pattern={self.pattern}, r={self.r}, nnz={nnz}, gate={self.gate}, "
                f"drop_tail={self.drop_tail}")
