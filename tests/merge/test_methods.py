"""The sparsify/consensus merge methods against their formulas on small tensors."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import merge
from lowrank_ops.merge.sparsify import apply_disjoint_masks_, disjoint_masks, tensor_seed
from lowrank_ops.reference.merge import dare_merge_ref, nm_mask_ref, ties_merge_ref, trim_mask_ref

METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cabs", "negmerge", "ram", "pcb"]


def _states(n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(8, 16, generator=g, dtype=dtype), "b": torch.randn(8, generator=g, dtype=dtype),
            "pos": torch.arange(4)}
    sds = [{"w": base["w"] + 0.1 * torch.randn(8, 16, generator=g, dtype=dtype),
            "b": base["b"] + 0.1 * torch.randn(8, generator=g, dtype=dtype), "pos": torch.arange(4)} for _ in range(n)]
    return base, sds


def _tau(base, sds, k):
    return torch.stack([sd[k].reshape(-1) - base[k].reshape(-1) for sd in sds])


@pytest.mark.parametrize("name", METHODS)
def test_registered_with_paper(name):
    m = merge.METHODS[name]
    assert m.url.startswith("https://arxiv.org/abs/") and m.paper and m.tensor_fn is not None
    assert getattr(merge, name) is m
    base, sds = _states()
    out = m(base, sds)
    assert set(out) == set(base) and out["w"].dtype == base["w"].dtype and out["w"].shape == base["w"].shape
    assert torch.equal(out["pos"], base["pos"])


def test_task_arithmetic_formula():
    base, sds = _states(dtype=torch.float64)
    w = [1.0, -0.5, 2.0]
    out = merge.task_arithmetic(base, sds, weights=w, **{"lambda": 0.3})
    for k in ("w", "b"):
        expect = base[k] + 0.3 * sum(wi * (sd[k] - base[k]) for wi, sd in zip(w, sds))
        torch.testing.assert_close(out[k], expect, rtol=0, atol=1e-12)
    out = merge.task_arithmetic(base, sds, weights=w, normalize=True)
    expect = base["w"] + sum(wi * (sd["w"] - base["w"]) for wi, sd in zip(w, sds)) / sum(w)
    torch.testing.assert_close(out["w"], expect, rtol=0, atol=1e-12)


def test_ties_formula_and_api():
    base, sds = _states(dtype=torch.float64)
    out = merge.ties(base, [sds[0], sds[1]], weights=[1, 1], density=0.2)  # DESIGN §4 call
    tau = _tau(base, sds[:2], "w")
    expect = base["w"] + ties_merge_ref(tau, torch.ones(2, dtype=torch.float64), 0.2).reshape(8, 16)
    torch.testing.assert_close(out["w"], expect, rtol=0, atol=1e-12)
    out = merge.ties(base, sds, weights=[1, 2, 0.5], density=0.5, sign_method="count", **{"lambda": 0.7})
    tau = _tau(base, sds, "b")
    expect = base["b"] + 0.7 * ties_merge_ref(tau, torch.tensor([1, 2, 0.5], dtype=torch.float64), 0.5, "count")
    torch.testing.assert_close(out["b"], expect, rtol=0, atol=1e-12)


def test_dare_formula():
    base, sds = _states(dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    for name, cons in (("dare_linear", "none"), ("dare_ties", "ties")):
        out = merge.METHODS[name](base, sds, weights=w.tolist(), density=0.4, seed=5)
        tau = _tau(base, sds, "w")
        expect = base["w"] + dare_merge_ref(tau, w, 0.4, tensor_seed(5, "w"), cons).reshape(8, 16)
        torch.testing.assert_close(out["w"], expect, rtol=0, atol=1e-12)
    # per-tensor seeds differ: same-shaped tensors do not share a mask
    assert tensor_seed(5, "a.weight") != tensor_seed(5, "b.weight")


def test_magnitude_prune_formula():
    base, sds = _states(dtype=torch.float64)
    out = merge.magnitude_prune(base, sds, weights=[1, 2, 3], density=0.25)
    tau = _tau(base, sds, "w")
    pruned = torch.stack([torch.where(trim_mask_ref(t, 0.25), t, 0) for t in tau])
    expect = base["w"] + (torch.tensor([1.0, 2, 3], dtype=torch.float64)[:, None] * pruned).sum(0).reshape(8, 16)
    torch.testing.assert_close(out["w"], expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic"])
def test_density_one_single_model_is_identity(name):
    base, sds = _states(n=1, dtype=torch.float64)
    kw = {} if name == "task_arithmetic" else {"density": 1.0}
    out = merge.METHODS[name](base, sds, **kw)
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], sds[0][k], rtol=0, atol=1e-12)


def test_density_one_is_task_arithmetic():
    base, sds = _states(dtype=torch.float64)
    ta = merge.task_arithmetic(base, sds, weights=[1, 0.5, 2])
    for name in ("dare_linear", "magnitude_prune"):
        out = merge.METHODS[name](base, sds, weights=[1, 0.5, 2], density=1.0)
        torch.testing.assert_close(out["w"], ta["w"], rtol=0, atol=1e-12)


def test_cabs_masks_and_formula():
    base, sds = _states(n=3, dtype=torch.float64)
    tau = _tau(base, sds, "w")
    masks = disjoint_masks(tau, n=1, m=4, shape=(8, 16))
    assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any() and not (masks[1] & masks[2]).any()
    assert (masks.reshape(3, -1, 4).sum(-1) == 1).all()  # 1:4 per model, and 3 models fill 3 of every 4
    # first model's mask is its plain 1:4 mask; later ones avoid earlier picks
    assert torch.equal(masks[0], nm_mask_ref(tau[0].reshape(8, 16), 1, 4).reshape(-1))
    assert torch.equal(masks[1], nm_mask_ref(tau[1].reshape(8, 16), 1, 4, masks[0].reshape(8, 16)).reshape(-1))
    out = merge.cabs(base, sds, weights=[1, 2, 0.5], **{"lambda": 0.8})
    w = torch.tensor([1, 2, 0.5], dtype=torch.float64)
    expect = base["w"] + 0.8 * (w[:, None] * tau * masks).sum(0).reshape(8, 16)
    torch.testing.assert_close(out["w"], expect, rtol=0, atol=1e-12)
    # order changes who gets first pick
    m_rev = disjoint_masks(tau, n=1, m=4, shape=(8, 16), order=[2, 1, 0])
    assert torch.equal(m_rev[2], nm_mask_ref(tau[2].reshape(8, 16), 1, 4).reshape(-1))
    # density-based CA: disjoint, each keeps ≤ density·P, never a zero
    md = disjoint_masks(tau, density=0.2)
    assert (md.sum(0) <= 1).all() and (md.sum(1) <= int(0.2 * 128)).all() and (md.sum(1) >= 1).all()
    # bias (8,) is not a multiple of m=16 -> density-based fallback with n/m
    out = merge.cabs(base, sds, n=1, m=16)
    assert torch.isfinite(out["b"]).all()
    with pytest.raises(ValueError, match="order"):
        disjoint_masks(tau, n=1, m=4, order=[0, 0, 1])


@pytest.mark.parametrize("shape,kw", [((8, 16), {"n": 1, "m": 4}), ((6, 10), {"n": 2, "m": 4}),
                                      ((8, 16), {"n": 1, "m": 4, "order": [2, 0, 1]}), ((8, 16), {"density": 0.3}),
                                      ((0, 16), {"n": 1, "m": 4})])
@pytest.mark.parametrize("chunk", [1, 12, 1 << 20])
def test_cabs_in_place_masks_match_the_masks(shape, kw, chunk):
    """The in-place form works in chunks of groups (n:m) or model by model (density); either way it equals
    deltas ⊙ disjoint_masks — including a (6, 10) tensor whose 1:4 groups run across its rows."""
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(3, int(torch.tensor(shape).prod()), generator=g, dtype=torch.float64)
    tau[:, ::7] = 0  # zeros are never kept
    expect = tau * disjoint_masks(tau, shape=shape, **kw)
    got = apply_disjoint_masks_(tau.clone(), shape=shape, chunk=chunk, **kw)
    assert torch.equal(got, expect)


def test_negmerge_hand_computed():
    base = {"w": torch.zeros(5)}
    sds = [{"w": torch.tensor([1.0, 2.0, -1.0, 0.0, 3.0])},
           {"w": torch.tensor([3.0, -1.0, -3.0, 1.0, 1.0])}]
    out = merge.negmerge(base, sds, **{"lambda": 0.5})
    # agree & nonzero at 0, 2, 4; mean [2, ., -2, ., 2]; θ = 0 - 0.5·τ
    assert out["w"].tolist() == [-1.0, 0.0, 1.0, 0.0, -1.0]


def test_ram_hand_computed():
    base = {"w": torch.zeros(4)}
    sds = [{"w": torch.tensor([1.0, 2.0, 0.0, 1e-7])},
           {"w": torch.tensor([3.0, 0.0, 0.0, 5.0])},
           {"w": torch.tensor([-1.0, 0.0, 0.0, 1.0])}]
    out = merge.ram(base, sds)
    # col0 shared by 3: mean 1; col1 unique: kept 2; col2 none: 0; col3: 1e-7 < ε, shared by 2: mean 3
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 2.0, 0.0, 3.0]))
    # RAM+: model 0 has 1 shared (col0) + 1 unique (col1) -> ρ=1, scale 1 + 0.5·min(1, 0.2) = 1.1
    out = merge.ram(base, sds, r=0.5, alpha=0.2)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 2.2, 0.0, 3.0]))


def test_bf16_states():
    base, sds = _states(dtype=torch.bfloat16)
    out = merge.ties(base, sds, density=0.5)
    assert out["w"].dtype == torch.bfloat16
    tau = torch.stack([sd["w"].float().reshape(-1) - base["w"].float().reshape(-1) for sd in sds])
    expect = (base["w"].float() + ties_merge_ref(tau, torch.ones(3), 0.5).reshape(8, 16)).bfloat16()
    torch.testing.assert_close(out["w"], expect, rtol=0, atol=0)


def test_unknown_parameter_is_an_error():
    base, sds = _states()
    with pytest.raises(TypeError, match=r"merge method 'ties': unknown parameter\(s\) \['densty'\]"):
        merge.ties(base, sds, densty=0.3)
