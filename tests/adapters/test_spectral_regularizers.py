"""Regularisers and trainable sets of SORSA, KaSA, SALT and LoLDU checked against the papers
and the authors' reference code (see each function's docstring for the source)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters
from lowrank_ops.adapters.kasa import KaSALinear
from lowrank_ops.adapters.salt import SALTLinear
from lowrank_ops.adapters.sorsa import SORSALinear
from lowrank_ops.adapters.spectral_common import orthonormality_gap

from .tiny_models import make

TARGET = r".*(q_proj|v_proj|up_proj|down_proj)$"
N_LAYERS = 8  # 2 blocks x 4 targeted linears


def _perturb(params, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _ids(seed=0):
    return torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(seed))


def _eye(n):
    return torch.eye(n, dtype=torch.float64)


# ----------------------------------------------------------------------------- SORSA


def test_orthonormality_gap_is_plain_frobenius_norm():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(7, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(orthonormality_gap(m, rows=False), torch.linalg.matrix_norm(m.T @ m - _eye(3)))
    torch.testing.assert_close(orthonormality_gap(m.T, rows=True), torch.linalg.matrix_norm(m.T @ m - _eye(3)))
    # 2x a semi-orthogonal matrix: MᵀM − I = 3I, plain norm 3√r (squared would be 9r)
    q, _ = torch.linalg.qr(m)
    assert orthonormality_gap(2 * q, rows=False).item() == pytest.approx(3 * 3 ** 0.5, rel=1e-12)


def test_sorsa_layer_regularizer_plain_norms():
    model = adapters.inject(make(dtype=torch.float64), adapters.SORSA(r=4), target=TARGET)
    _perturb(_trainable(model))
    for m in (m for m in model.modules() if isinstance(m, SORSALinear)):
        want = torch.linalg.matrix_norm(m.sorsa_U.T @ m.sorsa_U - _eye(4)) + \
            torch.linalg.matrix_norm(m.sorsa_Vh @ m.sorsa_Vh.T - _eye(4))
        torch.testing.assert_close(m.orthogonal_regularizer(), want)


def test_sorsa_regularizer_is_mean_over_matrices():
    """Authors' calc_ortho: Σ over all U/V matrices of ‖·‖_F divided by their count (2 per layer)."""
    model = adapters.inject(make(dtype=torch.float64), adapters.SORSA(r=4), target=TARGET)
    layers = [m for m in model.modules() if isinstance(m, SORSALinear)]
    assert len(layers) == N_LAYERS
    assert adapters.sorsa_regularizer(model).item() < 1e-12  # orthonormal at init
    _perturb(_trainable(model))
    norms = []
    for m in layers:
        norms.append(torch.linalg.matrix_norm(m.sorsa_U.T @ m.sorsa_U - _eye(4)))
        norms.append(torch.linalg.matrix_norm(m.sorsa_Vh @ m.sorsa_Vh.T - _eye(4)))
    torch.testing.assert_close(adapters.sorsa_regularizer(model), torch.stack(norms).mean())


def test_sorsa_gamma_default_is_the_authors_value():
    assert adapters.SORSA().gamma == 4e-4  # scripts/train_sorsa.sh: --lr 3e-5 --gamma 4e-4


def test_sorsa_regularizer_lr_scaling():
    model = adapters.inject(make(dtype=torch.float64), adapters.SORSA(r=4), target=TARGET)
    _perturb(_trainable(model))
    reg = adapters.sorsa_regularizer(model)
    torch.testing.assert_close(adapters.sorsa_regularizer(model, lr=3e-5), (4e-4 / 3e-5) * reg)
    torch.testing.assert_close(adapters.sorsa_regularizer(model, lr=1e-3, gamma=2e-4), 0.2 * reg)
    custom = adapters.inject(make(dtype=torch.float64), adapters.SORSA(r=4, gamma=1e-3), target=TARGET)
    _perturb(_trainable(custom))
    torch.testing.assert_close(adapters.sorsa_regularizer(custom, lr=1e-4),
                               10.0 * adapters.sorsa_regularizer(custom))
    with pytest.raises(ValueError, match="lr"):
        adapters.sorsa_regularizer(model, gamma=4e-4)
    with pytest.raises(ValueError, match="lr must be > 0"):
        adapters.sorsa_regularizer(model, lr=0.0)


def test_sorsa_sgd_step_follows_paper_update_rule():
    """W_p ← W_p − η∇L_train − γ∇L_reg when (γ/η)·L_reg is added to the loss and SGD runs at η."""
    lr, gamma = 0.05, 4e-4
    model = adapters.inject(make(dtype=torch.float64), adapters.SORSA(r=4, gamma=gamma), target=TARGET)
    _perturb(_trainable(model))
    params = _trainable(model)
    ids = _ids()
    g_train = torch.autograd.grad(model(ids).square().mean(), params)
    g_reg = torch.autograd.grad(adapters.sorsa_regularizer(model), params, allow_unused=True)
    want = [p.detach() - lr * gt - gamma * (gr if gr is not None else 0) for p, gt, gr in zip(params, g_train, g_reg)]
    opt = torch.optim.SGD(params, lr=lr)
    (model(ids).square().mean() + adapters.sorsa_regularizer(model, lr=lr)).backward()
    opt.step()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in g_reg)


def test_sorsa_regularizer_gradient_finite_at_init():
    model = adapters.inject(make(dtype=torch.float64), adapters.SORSA(r=4), target=TARGET)
    adapters.sorsa_regularizer(model, lr=3e-5).backward()
    for p in _trainable(model):
        assert p.grad is None or torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- KaSA


def test_kasa_regularizer_is_mean_over_layers():
    """Authors' main.py loss_fn: (β ΣL2 + γ ΣL3) / block_num, block_num = number of adapted layers."""
    model = adapters.inject(make(dtype=torch.float64), adapters.KaSA(r=3, beta=0.5, gamma=0.25), target=TARGET)
    _perturb(_trainable(model))
    layers = [m for m in model.modules() if isinstance(m, KaSALinear)]
    assert len(layers) == N_LAYERS
    terms = []
    for m in layers:
        l3 = torch.linalg.matrix_norm(m.kasa_B.T @ m.kasa_B - _eye(3)) + torch.linalg.matrix_norm(m.kasa_A @ m.kasa_A.T - _eye(3))
        terms.append(0.5 * m.kasa_diag.square().sum() + 0.25 * l3)
    torch.testing.assert_close(adapters.kasa_regularizer(model), torch.stack(terms).mean())
    torch.testing.assert_close(adapters.kasa_regularizer(model, beta=1.0, gamma=0.0),
                               torch.stack([m.kasa_diag.square().sum() for m in layers]).mean())


# ----------------------------------------------------------------------------- SALT


def _salt_reference(m: SALTLinear) -> torch.Tensor:
    """The authors' per-layer reg_loss, with the dense n×n matrices their code builds."""
    sigma = m.salt_sigma
    scale_shift = torch.diag(m.salt_alpha * sigma + m.salt_beta) - torch.diag(sigma)
    reg = torch.linalg.matrix_norm(scale_shift)
    if m.salt_X is not None:
        reg = reg + torch.linalg.matrix_norm(m.salt_X @ m.salt_Y)
    return reg


def test_salt_regularizer_exported():
    assert "salt_regularizer" in adapters.__all__ and callable(adapters.salt_regularizer)
    assert adapters.SALT().reg_multiplier == 0.01  # authors' train_dl default


def test_salt_regularizer_matches_authors_reg_loss():
    model = adapters.inject(make(dtype=torch.float64), adapters.SALT(r=3, lora_r=2), target=TARGET)
    layers = [m for m in model.modules() if isinstance(m, SALTLinear)]
    assert len(layers) == N_LAYERS
    assert adapters.salt_regularizer(model).item() == 0.0  # α = 1, β = 0, X = 0 at init
    _perturb(_trainable(model), std=0.3)
    for m in layers:
        torch.testing.assert_close(m.regularizer(), _salt_reference(m))
    want = 0.01 * torch.stack([_salt_reference(m) for m in layers]).sum()  # summed over layers, not averaged
    torch.testing.assert_close(adapters.salt_regularizer(model), want)
    torch.testing.assert_close(adapters.salt_regularizer(model, reg_multiplier=1.0), 100 * want)
    custom = adapters.inject(make(dtype=torch.float64), adapters.SALT(r=3, lora_r=2, reg_multiplier=0.5), target=TARGET)
    _perturb(_trainable(custom), std=0.3)
    torch.testing.assert_close(adapters.salt_regularizer(custom), 0.5 * torch.stack(
        [_salt_reference(m) for m in custom.modules() if isinstance(m, SALTLinear)]).sum())


def test_salt_regularizer_gradients():
    model = adapters.inject(make(dtype=torch.float64), adapters.SALT(r=3, lora_r=2), target=TARGET)
    adapters.salt_regularizer(model).backward()  # at init: XY = 0 and the shift is 0
    for p in _trainable(model):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    model.zero_grad()
    _perturb(_trainable(model), std=0.3)
    params = _trainable(model)
    got = torch.autograd.grad(adapters.salt_regularizer(model), params)
    ref = torch.autograd.grad(0.01 * torch.stack([_salt_reference(m) for m in model.modules()
                                                  if isinstance(m, SALTLinear)]).sum(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_salt_regularizer_uses_pre_relu_shift_and_no_lora_block():
    torch.manual_seed(0)
    lin = nn.Linear(9, 7).double()
    layer = adapters.SALT(r=7, lora_r=4).create_layer(copy.deepcopy(lin), {})  # full rank: no XY block
    assert layer.salt_X is None
    with torch.no_grad():
        layer.salt_beta.fill_(-100.0)  # ReLU clamps every adapted σ to 0
    assert (layer.singular_values() == 0).all()
    assert layer.regularizer().item() == pytest.approx(100.0 * 7 ** 0.5, rel=1e-12)  # ‖β‖, before the ReLU


def test_salt_relu_acts_on_top_k_singular_values_only():
    """W' = U_k diag(ReLU(α⊙σ_k+β)) V_kᵀ + U_{>k}(Σ_{>k} + XY)V_{>k}ᵀ, negative entries of XY kept."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 8).double()
    layer = adapters.SALT(r=3, lora_r=2).create_layer(copy.deepcopy(lin), {})
    with torch.no_grad():
        layer.salt_X.copy_(torch.randn_like(layer.salt_X))
        layer.salt_beta.copy_(torch.tensor([0.1, -1e3, 0.2], dtype=torch.float64))
    xy = layer.salt_X @ layer.salt_Y
    assert (xy < 0).any()
    U, Vh, S = layer.salt_U, layer.salt_Vh, torch.linalg.svdvals(lin.weight.double())
    top = torch.relu(layer.salt_alpha * S[:3] + layer.salt_beta)
    want = (U[:, :3] * top) @ Vh[:3] + U[:, 3:] @ (torch.diag(S[3:]) + xy) @ Vh[3:]
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), want)


# ----------------------------------------------------------------------------- LoLDU


def test_loldu_trains_only_the_diagonal_by_default():
    assert adapters.LoLDU().train_scale is False
    model = adapters.inject(make(), adapters.LoLDU(r=4, alpha=2.0), target=TARGET)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"loldu_z"}
    ids = _ids()
    y0 = make()(ids)
    torch.testing.assert_close(model(ids), y0, rtol=1e-5, atol=1e-5)  # identity at init
    opt = torch.optim.SGD(_trainable(model), lr=0.1)
    model(ids).square().mean().backward()
    opt.step()
    scales = [m.loldu_scale.item() for m in model.modules() if hasattr(m, "loldu_scale")]
    assert scales == [pytest.approx(0.5)] * N_LAYERS  # σ = alpha/r stays fixed
    y = model(ids)
    merged = adapters.merge_and_unload(model)
    torch.testing.assert_close(merged(ids), y, rtol=1e-5, atol=1e-5)


def test_loldu_train_scale_opt_in():
    model = adapters.inject(make(), adapters.LoLDU(r=4, train_scale=True), target=TARGET)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"loldu_z", "loldu_scale"}
