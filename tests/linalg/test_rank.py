"""select_rank / allocate_ranks on hand-computed spectra and against a brute-force allocation."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lowrank_ops.linalg import allocate_ranks, select_rank


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


# --------------------------------------------------------------------------- select_rank, energy


@pytest.mark.parametrize("energy,k", [(0.5, 1), (9 / 14, 1), (0.65, 2), (0.9, 2), (13 / 14, 2), (0.95, 3), (1.0, 3)])
def test_energy_hand_computed(energy, k):
    # S² = 9, 4, 1; cumulative 9/14 = 0.643, 13/14 = 0.929, 1
    assert select_rank(t(3, 2, 1), energy=energy) == k


def test_energy_boundary_and_order():
    assert select_rank(t(1, 1, 1, 1), energy=0.5) == 2  # exactly half at k = 2: ">=" keeps 2
    assert select_rank(t(1, 3, 2), energy=0.6) == 1  # sorted first: 9/14 >= 0.6
    assert select_rank(torch.tensor([2.0, 0.0, 0.0]), energy=1.0) == 1
    assert select_rank(torch.zeros(4), energy=0.9) == 1
    S = torch.rand(500, dtype=torch.float32).sort(descending=True).values + 1e-3
    assert select_rank(S, energy=1.0) == 500  # every positive value is needed for all of the energy
    assert select_rank(torch.cat([S, torch.zeros(20)]), energy=1.0) == 500  # trailing zeros are not


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_elbow_geometric_spectrum_in_low_precision(dtype):
    """An exactly geometric spectrum has no elbow in any dtype: the rounding of S in float32 or
    bfloat16 (log errors up to eps/2) is not taken for one (it gave k = 6 in float32 before).  The
    spectra stop above S₀·eps, where values are floored by design (numerically zero in that dtype)."""
    eps = torch.finfo(dtype).eps
    for ratio in (0.9, 0.5, 10 ** -0.25):
        n = min(20, int(math.log(10 * eps) / math.log(ratio)) + 1)
        S = (ratio ** torch.arange(n, dtype=torch.float64)).to(dtype)
        assert select_rank(S, elbow=True) == 1
    noisy = torch.cat([torch.tensor([8.0, 6.0, 5.0, 4.0]), torch.full((12,), 0.01)]).to(dtype)
    assert select_rank(noisy, elbow=True) == 4  # a real elbow is still found


# --------------------------------------------------------------------------- select_rank, elbow


def test_elbow_hand_computed():
    # y = log S = 0, -0.5, -1, -4, -4.2, -4.4; chord 0 → -4.4 over 5 steps: 0, -0.88, -1.76, -2.64, -3.52, -4.4;
    # chord - y = 0, -0.38, -0.76, 1.36, 0.68, 0  → furthest below the chord at index 3.
    S = torch.exp(t(0, -0.5, -1, -4, -4.2, -4.4))
    assert select_rank(S, elbow=True) == 3


def test_elbow_low_rank_plus_noise():
    for r in (1, 5, 17, 40):
        S = torch.cat([torch.linspace(10, 8, r, dtype=torch.float64), torch.full((50 - r,), 1e-3, dtype=torch.float64)])
        assert select_rank(S, elbow=True) == r
    # exact zeros are a drop to the floor, not -inf
    assert select_rank(torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0, 0.0]), elbow=True) == 3


def test_elbow_power_law_and_degenerate():
    # y = -log(i+1): chord - y is maximal where the slope -1/(i+1) equals the chord's: i + 1 = (n-1)/log n.
    n = 1000
    S = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    assert abs(select_rank(S, elbow=True) - ((n - 1) / math.log(n) - 1)) <= 1
    assert select_rank(t(3.0), elbow=True) == 1
    assert select_rank(t(3.0, 1.0), elbow=True) == 1
    # Concave log spectra (no point below the chord): one past the point furthest above it.
    # log(4, 3.9, 3.8, 0.1) = 1.386, 1.361, 1.335, -2.303; chord 1.386, 0.157, -1.073, -2.303 → above by 0, 1.20, 2.41
    assert select_rank(t(4, 3.9, 3.8, 0.1), elbow=True) == 3
    # y = -(0, .1, .3, .55, 1, 1.5), chord 0, -.3, ..., -1.5: above by 0, .2, .3, .35, .2, 0 → max at 3
    assert select_rank(torch.exp(-t(0, 0.1, 0.3, 0.55, 1.0, 1.5)), elbow=True) == 4
    # straight log lines have no elbow
    assert select_rank(torch.ones(7), elbow=True) == 1
    assert select_rank(0.5 ** torch.arange(20, dtype=torch.float64), elbow=True) == 1


def test_select_rank_errors():
    with pytest.raises(ValueError, match="exactly one criterion"):
        select_rank(t(1, 2))
    with pytest.raises(ValueError, match="exactly one criterion"):
        select_rank(t(1, 2), energy=0.5, elbow=True)
    for e in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
            select_rank(t(1, 2), energy=e)
    with pytest.raises(ValueError, match="1-D tensor"):
        select_rank(torch.ones(2, 2), energy=0.5)
    with pytest.raises(ValueError, match="non-negative"):
        select_rank(t(1, -2), energy=0.5)
    with pytest.raises(ValueError, match="at least one"):
        select_rank(torch.zeros(0), energy=0.5)


# --------------------------------------------------------------------------- allocate_ranks


SPECTRA = {"a": t(3, 2, 1), "b": t(1, 1)}  # ρ: a = 9/14, 4/14, 1/14; b = 1/2, 1/2


@pytest.mark.parametrize("budget,kw,expected", [
    (2, {}, {"a": 1, "b": 1}),
    (3, {}, {"a": 1, "b": 2}),  # b's 0.5 beats a's 0.286
    (4, {}, {"a": 2, "b": 2}),
    (5, {}, {"a": 3, "b": 2}),
    (9, {}, {"a": 3, "b": 2}),  # more budget than components: everyone at the cap
    (4, {"max_rank": 1}, {"a": 1, "b": 1}),
    (1, {"min_rank": 0}, {"a": 1, "b": 0}),  # a's 0.643 is the single largest
    (3, {"min_rank": 0}, {"a": 1, "b": 2}),  # 0.643, then b's tie 0.5, 0.5
    (4, {"min_rank": 2}, {"a": 2, "b": 2}),
])
def test_allocate_hand_computed(budget, kw, expected):
    out = allocate_ranks(SPECTRA, budget, **kw)
    assert out == expected and list(out) == ["a", "b"]


def test_allocate_matches_brute_force():
    """The greedy pick maximizes the total explained variance Σ ρ (EVA's objective) under the budget."""
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        spectra = {f"l{i}": torch.rand(int(torch.randint(1, 5, (1,), generator=g)), generator=g, dtype=torch.float64) ** 3
                   for i in range(3)}
        rho = {k: (s.sort(descending=True).values ** 2) / (s ** 2).sum() for k, s in spectra.items()}
        budget = int(torch.randint(3, 9, (1,), generator=g))
        out = allocate_ranks(spectra, budget, min_rank=1, max_rank=3)
        assert sum(out.values()) == min(budget, sum(min(3, s.numel()) for s in spectra.values()))
        best = -1.0
        for combo in itertools.product(*[range(1, min(3, s.numel()) + 1) for s in spectra.values()]):
            if sum(combo) <= budget:
                best = max(best, sum(float(r[:c].sum()) for r, c in zip(rho.values(), combo)))
        got = sum(float(rho[k][:c].sum()) for k, c in out.items())
        assert got == pytest.approx(best, rel=1e-12), (trial, out)


def test_allocate_errors():
    with pytest.raises(ValueError, match="budget 1 is below the 2"):
        allocate_ranks(SPECTRA, 1)
    with pytest.raises(ValueError, match="max_rank .* must be >= min_rank"):
        allocate_ranks(SPECTRA, 4, min_rank=2, max_rank=1)
    with pytest.raises(ValueError, match="min_rank must be >= 0"):
        allocate_ranks(SPECTRA, 4, min_rank=-1)
    with pytest.raises(ValueError, match=r"spectra\['x'\] must be a 1-D tensor"):
        allocate_ranks({"x": torch.ones(2, 2)}, 2)


def test_allocate_zero_spectrum_layer():
    # The all-zero layer explains nothing (ρ = 0, not NaN): a takes what it can, z gets the rest by order.
    assert allocate_ranks({"z": torch.zeros(3), "a": t(2, 1)}, 3) == {"z": 1, "a": 2}
    assert allocate_ranks({"z": torch.zeros(3), "a": t(2, 1)}, 4) == {"z": 2, "a": 2}
