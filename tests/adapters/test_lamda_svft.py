"""LaMDA's gradual PMB freezing and scale α; SVFT's random budget, kaiming/gate init and
tail-dropping truncation — checked against the papers (see the layer docstrings)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters
from lowrank_ops.adapters.lamda import LaMDALinear, freeze_schedule
from lowrank_ops.adapters.svft.layer import band_count

from .test_spectral import _linear, _randomize
from .tiny_models import make

TARGET = r".*(q_proj|v_proj|up_proj|down_proj)$"


def _ids(seed=0, shape=(2, 7)):
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def _lamda_layers(model):
    return [m for m in model.modules() if isinstance(m, LaMDALinear)]


# =============================================================================== LaMDA


def test_lamda_schedule_freezes_all_of_pmb_after_t_i():
    # component j freezes at ceil((j+1)·T/r); all r frozen from step T on (Fig. 1: "after t_i iterations")
    assert [freeze_schedule(4, 8, s) for s in range(11)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert [freeze_schedule(8, 3, s) for s in range(5)] == [0, 2, 5, 8, 8]
    assert freeze_schedule(5, 0, 0) == 5  # t_i = 0: PMB never trains
    for r, t in [(3, 7), (6, 4), (1, 5)]:
        counts = [freeze_schedule(r, t, s) for s in range(t + 2)]
        assert counts == sorted(counts) and counts[0] == 0 and counts[t] == r and counts[t - 1] < r


@pytest.mark.parametrize("order", ["largest_first", "smallest_first"])
def test_lamda_gradual_freezing_under_adamw(order):
    """Frozen PMB components stay bit-exactly fixed under AdamW with momentum and weight
    decay, in singular-value order; the rest keep training; at t_i only the LDA trains."""
    r, T = 4, 8
    model = adapters.inject(make(dtype=torch.float64), adapters.LaMDA(r=r, freeze_steps=T, freeze_order=order),
                            target=TARGET)
    layers = _lamda_layers(model)
    opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=3e-2, weight_decay=0.5, betas=(0.9, 0.99))
    order_cols = list(range(r)) if order == "largest_first" else list(range(r - 1, -1, -1))
    history = []  # effective PMB of every layer before each step
    for step in range(T + 3):
        n = adapters.lamda_freeze_step(model, step)
        assert n == freeze_schedule(r, T, step)
        for layer in layers:
            assert layer.lamda_B_mask.tolist() == [c in order_cols[:n] for c in range(r)]
        history.append([layer.effective_b().detach().clone() for layer in layers])
        opt.zero_grad()
        model(_ids(step)).logsumexp(-1).mean().backward()
        for layer in layers:
            if layer.lamda_B.requires_grad:
                assert (layer.lamda_B.grad[:, layer.lamda_B_mask] == 0).all()  # exact zero gradient
                assert (layer.lamda_B.grad[:, ~layer.lamda_B_mask].abs().sum(0) > 0).all()
            else:
                assert layer.lamda_B.grad is None
            assert layer.lamda_S.grad.abs().sum() > 0
        opt.step()
    history.append([layer.effective_b().detach().clone() for layer in layers])
    for li, layer in enumerate(layers):
        for j, col in enumerate(order_cols):
            t_j = -(-(j + 1) * T // r)
            cols = [h[li][:, col] for h in history]
            assert all(torch.equal(c, cols[t_j]) for c in cols[t_j:]), (li, col)  # fixed from t_j on
            assert not torch.equal(cols[t_j], cols[0]), (li, col)  # it did train before freezing
        assert not layer.lamda_B.requires_grad
        # the optimizer kept moving the stale parameter columns; the forward ignores them
        assert not torch.equal(layer.lamda_B.detach(), layer.effective_b())
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"lamda_S"}


def test_lamda_freezing_is_monotone_and_refuses_without_schedule():
    model = adapters.inject(make(), adapters.LaMDA(r=4), target=TARGET)
    with pytest.raises(ValueError, match="no freeze schedule"):
        adapters.lamda_freeze_step(model, 3)
    assert adapters.lamda_freeze_step(model, 3, freeze_steps=8) == 1
    assert adapters.lamda_freeze_step(model, 0, freeze_steps=8) == 1  # never unfreezes
    assert adapters.lamda_freeze_step(model, 100, freeze_steps=8) == 4
    with pytest.raises(ValueError, match="no LaMDA layers"):
        adapters.lamda_freeze_step(make(), 0, freeze_steps=4)
    with pytest.raises(ValueError, match="freeze_order"):
        adapters.LaMDA(freeze_order="random")
    with pytest.raises(ValueError, match="freeze_steps"):
        adapters.LaMDA(freeze_steps=-1)
    with pytest.raises(ValueError, match="alpha"):
        adapters.LaMDA(alpha=0)


@pytest.mark.parametrize("init", ["svd", "zero"])
@pytest.mark.parametrize("alpha", [1.0, 0.25, 3.0])
def test_lamda_scale_alpha(init, alpha):
    """Y = XW + α·XASB; identity at init for every α (svd: S = Σ_r/α on the residual base)."""
    lin = _linear(11, 7)
    layer = adapters.LaMDA(r=3, init=init, alpha=alpha).create_layer(copy.deepcopy(lin), {})
    x = torch.randn(4, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-12)
    if init == "svd":
        U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        torch.testing.assert_close(layer.lamda_S.detach(), torch.diag(S[:3]) / alpha, rtol=1e-12, atol=1e-12)
    _randomize(layer)
    dW = alpha * layer.lamda_B.detach() @ layer.lamda_S.detach() @ layer.lamda_A
    torch.testing.assert_close(layer.delta_weight(), dW, rtol=1e-12, atol=1e-12)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.base_layer.weight + dW, lin.bias), rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_lamda_merge_uses_the_frozen_snapshot():
    layer = adapters.LaMDA(r=4, freeze_steps=4).create_layer(_linear(10, 8), {})
    _randomize(layer)
    layer.freeze_step(2)  # components 0 and 1 frozen
    frozen = layer.lamda_B.detach()[:, :2].clone()
    with torch.no_grad():
        layer.lamda_B.add_(1.0)  # what an optimizer's weight decay / momentum might do
    b_eff = torch.cat([frozen, layer.lamda_B.detach()[:, 2:]], 1)
    torch.testing.assert_close(layer.effective_b(), b_eff, rtol=0, atol=0)
    x = torch.randn(5, 10, dtype=torch.float64)
    dW = b_eff @ layer.lamda_S.detach() @ layer.lamda_A
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.base_layer.weight + dW, layer.base_layer.bias),
                               rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_lamda_compiled_fullgraph_follows_the_mask():
    """The mask changes in place between steps: a fullgraph-compiled forward must see it
    (frozen columns: zero gradient) and match eager."""
    torch._dynamo.reset()
    eager = adapters.LaMDA(r=4, alpha=0.5, freeze_steps=4).create_layer(_linear(12, 12, dtype=torch.float32), {})
    _randomize(eager, std=0.1)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 12)
    for step in range(6):
        eager.freeze_step(step)
        twin.freeze_step(step)
        with torch.no_grad():  # perturb the parameter as an optimizer would
            for m in (eager, twin):
                m.lamda_B.add_(0.01 * (step + 1))
                m.lamda_S.add_(0.01)
        outs = []
        for m, fn in ((eager, eager), (twin, compiled)):
            for p in m.parameters():
                p.grad = None
            y = fn(x)
            y.square().mean().backward()
            outs.append((y.detach(), m.lamda_B.grad, m.lamda_S.grad))
        (ye, gbe, gse), (yc, gbc, gsc) = outs
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gsc, gse, rtol=1e-4, atol=1e-6)
        if eager.lamda_B.requires_grad:
            torch.testing.assert_close(gbc, gbe, rtol=1e-4, atol=1e-6)
            assert (gbc[:, twin.lamda_B_mask] == 0).all() and (gbc[:, ~twin.lamda_B_mask] != 0).any()
        else:
            assert gbe is None and gbc is None


def test_lamda_save_load_round_trip_mid_freeze(tmp_path):
    cfg = adapters.LaMDA(r=4, alpha=0.5, freeze_steps=6, freeze_order="smallest_first")
    model = adapters.inject(make(dtype=torch.float64), cfg, target=TARGET)
    _randomize(model)
    adapters.lamda_freeze_step(model, 3)  # 2 of 4 components frozen
    _randomize(model, seed=2)  # the stale parameter columns drift; the forward ignores them
    ids = _ids()
    y = model(ids)
    adapters.save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LAMDA" and meta["alpha"] == 0.5 and meta["freeze_steps"] == 6
    assert meta["freeze_order"] == "smallest_first"
    fresh = adapters.load_pretrained(make(dtype=torch.float64), tmp_path)
    assert fresh._lowrank_ops_adapter["config"] == cfg
    torch.testing.assert_close(fresh(ids), y, rtol=0, atol=1e-12)
    for a, b in zip(_lamda_layers(model), _lamda_layers(fresh)):
        assert torch.equal(a.lamda_B_mask, b.lamda_B_mask) and a.lamda_B_mask.tolist() == [False, False, True, True]
        torch.testing.assert_close(b.effective_b(), a.effective_b(), rtol=0, atol=0)
    # training resumes on the same schedule
    assert adapters.lamda_freeze_step(fresh, 6) == 4
    torch.testing.assert_close(fresh(ids), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapters.merge_and_unload(fresh)(ids), y, rtol=1e-10, atol=1e-10)


def test_lamda_projection_freezing_all_at_once_still_works():
    model = adapters.inject(make(), adapters.LaMDA(r=4), target=TARGET)
    assert adapters.lamda_freeze_projection_b(model) == 8
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lamda_S"}
    assert all(bool(m.lamda_B_mask.all()) for m in _lamda_layers(model))


# =============================================================================== SVFT


def test_svft_random_pattern_has_the_banded_budget_anywhere_in_m():
    n = 9
    lin = _linear(9, 9)
    for d, seed in [(1, 3), (2, 0), (4, 5)]:
        rnd = adapters.SVFT(pattern="random", off_diag=d, seed=seed).create_layer(copy.deepcopy(lin), {})
        k = n * (2 * d + 1) - d * (d + 1)
        pairs = set(zip(rnd.svft_rows.tolist(), rnd.svft_cols.tolist()))
        assert rnd.svft_values.numel() == k == band_count(n, d) == len(pairs)  # k distinct entries
        assert all(0 <= i < n and 0 <= j < n for i, j in pairs)
    # not a per-row rule: over seeds, rows get different counts and entries leave the band
    counts, outside = set(), False
    for seed in range(6):
        rnd = adapters.SVFT(pattern="random", off_diag=1, seed=seed).create_layer(copy.deepcopy(lin), {})
        counts |= set(torch.bincount(rnd.svft_rows, minlength=n).tolist())
        outside |= bool(((rnd.svft_rows - rnd.svft_cols).abs() > 1).any())
    assert len(counts) > 1 and outside
    a = adapters.SVFT(pattern="random", seed=3).create_layer(copy.deepcopy(lin), {})
    b = adapters.SVFT(pattern="random", seed=3).create_layer(copy.deepcopy(lin), {})
    assert torch.equal(a.svft_rows, b.svft_rows) and torch.equal(a.svft_cols, b.svft_cols)
    full = adapters.SVFT(pattern="random", off_diag=20).create_layer(copy.deepcopy(lin), {})
    assert full.svft_values.numel() == n * n  # d >= n-1: every entry of M


@pytest.mark.parametrize("pattern", ["plain", "banded", "random", "top_k"])
def test_svft_gate_and_kaiming_init(pattern):
    lin = _linear(13, 9)
    x = torch.randn(4, 13, dtype=torch.float64)
    # default: M = 0 (the paper's Eq. (1) is then the pre-trained layer); the gate keeps it so
    zero = adapters.SVFT(pattern=pattern, off_diag=2, gate=True).create_layer(copy.deepcopy(lin), {})
    torch.testing.assert_close(zero(x), lin(x), rtol=0, atol=1e-13)
    assert zero.svft_gate.requires_grad and zero.svft_gate.item() == 0.0
    # official layer: kaiming_normal_ values times sigmoid(gate), gate = 0 at init
    off = adapters.SVFT(pattern=pattern, off_diag=2, gate=True, init="kaiming").create_layer(copy.deepcopy(lin), {})
    vals = off.svft_m if pattern == "plain" else off.svft_values
    assert vals.abs().sum() > 0 and off.svft_gate.item() == 0.0
    n = off.r
    M = torch.zeros(n, n, dtype=torch.float64)
    rows, cols = (torch.arange(n), torch.arange(n)) if pattern == "plain" else (off.svft_rows, off.svft_cols)
    _randomize(off)
    g = torch.sigmoid(off.svft_gate.detach())
    for i, j, v in zip(rows.tolist(), cols.tolist(), (off.svft_m if pattern == "plain" else off.svft_values).detach()):
        M[i, j] += v * g.item()
    dW = off.svft_U @ M @ off.svft_Vh
    torch.testing.assert_close(off.delta_weight(), dW, rtol=1e-12, atol=1e-12)
    y = off(x)
    torch.testing.assert_close(y, F.linear(x, lin.weight + dW, lin.bias), rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert off.svft_gate.grad.abs().item() > 0
    off.merge()
    torch.testing.assert_close(off(x), y, rtol=1e-12, atol=1e-12)


def test_svft_kaiming_std():
    lin = _linear(64, 64)
    layer = adapters.SVFT(pattern="banded", off_diag=8, init="kaiming", seed=7).create_layer(lin, {})
    k = layer.svft_values.numel()
    assert k == band_count(64, 8)
    std = layer.svft_values.detach().std().item()
    assert abs(std / (2.0 / k) ** 0.5 - 1) < 0.1


def test_svft_only_intended_parameters_train_with_gate():
    model = adapters.inject(make(), adapters.SVFT(pattern="banded", off_diag=1, gate=True), target=TARGET)
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"svft_values", "svft_gate"}
    _randomize(model, std=0.05)
    model(_ids()).float().square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, n


@pytest.mark.parametrize("pattern", ["plain", "banded"])
def test_svft_drop_tail_is_the_papers_truncation(pattern):
    """App. C.4: U, V reduced to rank r and Σ, M truncated: W' = U_r(Σ_r + M)V_rᵀ."""
    lin = _linear(13, 9)
    W = lin.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = 4
    trunc = adapters.SVFT(pattern=pattern, r=r, drop_tail=True).create_layer(copy.deepcopy(lin), {})
    torch.testing.assert_close(trunc.base_layer.weight, (U[:, :r] * S[:r]) @ Vh[:r], rtol=0, atol=1e-12)
    _randomize(trunc)
    M = trunc.core_matrix().detach()
    W_new = trunc.svft_U @ (torch.diag(S[:r]) + M) @ trunc.svft_Vh
    x = torch.randn(3, 13, dtype=torch.float64)
    y = trunc(x)
    torch.testing.assert_close(y, F.linear(x, W_new, lin.bias), rtol=1e-12, atol=1e-12)
    trunc.merge()
    torch.testing.assert_close(trunc(x), y, rtol=1e-12, atol=1e-12)
    # default keeps W whole: Eq. (1) with Ω inside the top r×r block, identity at init
    keep = adapters.SVFT(pattern=pattern, r=r).create_layer(copy.deepcopy(lin), {})
    assert torch.equal(keep.base_layer.weight, W)
    # full rank: nothing to drop
    full = adapters.SVFT(pattern=pattern, drop_tail=True).create_layer(copy.deepcopy(lin), {})
    assert torch.equal(full.base_layer.weight, W)


def test_svft_gate_compiles_fullgraph():
    torch._dynamo.reset()
    eager = adapters.SVFT(pattern="random", off_diag=2, gate=True, init="kaiming").create_layer(
        _linear(12, 10, dtype=torch.float32), {})
    _randomize(eager, std=0.1)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 12)
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    ye.square().mean().backward()
    yc.square().mean().backward()
    for n, p in eager.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, n
            torch.testing.assert_close(twin.get_parameter(n).grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("make_cfg", [
    lambda: adapters.SVFT(pattern="random", off_diag=2, seed=4, gate=True, init="kaiming"),
    lambda: adapters.SVFT(pattern="banded", off_diag=1, r=5, drop_tail=True, gate=True),
    lambda: adapters.SVFT(pattern="plain", r=6, drop_tail=True, save_bases=False),
], ids=["random-gate", "banded-droptail", "plain-droptail-nobases"])
def test_svft_save_load_round_trip(make_cfg, tmp_path):
    cfg = make_cfg()
    model = adapters.inject(make(dtype=torch.float64), cfg, target=TARGET)
    _randomize(model)
    ids = _ids()
    y = model(ids)
    adapters.save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["gate"] == cfg.gate and meta["drop_tail"] == cfg.drop_tail
    fresh = adapters.load_pretrained(make(dtype=torch.float64), tmp_path)
    assert fresh._lowrank_ops_adapter["config"] == cfg
    torch.testing.assert_close(fresh(ids), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapters.merge_and_unload(fresh)(ids), y, rtol=1e-10, atol=1e-10)


def test_svft_bad_init():
    with pytest.raises(ValueError, match="SVFT: init"):
        adapters.SVFT(init="uniform")
