"""Spectral adapters (SVFT, SORSA, SVF, KaSA, SALT, LaMDA, QR-LoRA, LoLDU) checked against their math."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters, linalg
from lowrank_ops.adapters.kasa import KaSALinear
from lowrank_ops.adapters.lamda import LaMDALinear
from lowrank_ops.adapters.loldu import LoLDULinear
from lowrank_ops.adapters.qrlora import QRLoRALinear
from lowrank_ops.adapters.salt import SALTLinear
from lowrank_ops.adapters.sorsa import SORSALinear
from lowrank_ops.adapters.svf import SVFLinear
from lowrank_ops.adapters.svft import SVFTLinear
from lowrank_ops.adapters.svft.layer import band_count

from .tiny_models import make

# name -> (config factory, trainable parameter names, "residual" | "truncated" | "additive")
METHODS = {
    "svft-plain": (lambda: adapters.SVFT(), {"svft_m"}, "additive"),
    "svft-banded": (lambda: adapters.SVFT(pattern="banded", off_diag=2), {"svft_values"}, "additive"),
    "svft-random": (lambda: adapters.SVFT(pattern="random", off_diag=1, r=6), {"svft_values"}, "additive"),
    "svft-topk": (lambda: adapters.SVFT(pattern="top_k", off_diag=1), {"svft_values"}, "additive"),
    "sorsa": (lambda: adapters.SORSA(r=4), {"sorsa_U", "sorsa_S", "sorsa_Vh"}, "residual"),
    "svf": (lambda: adapters.SVF(), {"svf_sigma"}, "additive"),
    "svf-scale-r": (lambda: adapters.SVF(r=5, parametrization="scale"), {"svf_sigma"}, "additive"),
    "kasa": (lambda: adapters.KaSA(r=3, alpha=6), {"kasa_A", "kasa_B", "kasa_diag"}, "truncated"),
    "salt": (lambda: adapters.SALT(r=3, lora_r=2), {"salt_alpha", "salt_beta", "salt_X", "salt_Y"}, "additive"),
    "lamda": (lambda: adapters.LaMDA(r=4), {"lamda_S", "lamda_B"}, "residual"),
    "lamda-zero": (lambda: adapters.LaMDA(r=4, init="zero"), {"lamda_S", "lamda_B"}, "additive"),
    "qrlora": (lambda: adapters.QRLoRA(r=5), {"qrlora_lambda"}, "additive"),
    "qrlora-energy": (lambda: adapters.QRLoRA(energy=0.9), {"qrlora_lambda"}, "additive"),
    "loldu": (lambda: adapters.LoLDU(r=4, alpha=2.0), {"loldu_z"}, "residual"),  # the paper trains only the diagonal
}
NAMES = list(METHODS)
SHAPES = [(13, 9), (6, 11)]  # (in, out): wide and tall, non-multiple sizes
TARGET = r".*(q_proj|v_proj|up_proj|down_proj)$"


def _linear(in_f, out_f, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _wrap(name, lin):
    """One adapter layer around (a copy of) ``lin`` via the config's ``create_layer``."""
    return METHODS[name][0]().create_layer(copy.deepcopy(lin), {})


def _randomize(module, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _svd(w):
    return torch.linalg.svd(w.double(), full_matrices=False)


def _dense_delta(layer):
    """ΔW from each method's defining formula, written independently of ``factors()``."""
    if isinstance(layer, SVFTLinear):
        n = layer.r
        M = torch.zeros(n, n, dtype=layer.svft_U.dtype)
        if layer.pattern == "plain":
            M = torch.diag(layer.svft_m.detach())
        else:
            for i, j, v in zip(layer.svft_rows.tolist(), layer.svft_cols.tolist(), layer.svft_values.detach()):
                M[i, j] += v
        return layer.svft_U @ M @ layer.svft_Vh
    if isinstance(layer, SVFLinear):
        s = layer.svf_sigma.detach()
        new = s if layer.parametrization == "additive" else layer.svf_sigma0 * s
        return layer.svf_U @ torch.diag(new - layer.svf_sigma0) @ layer.svf_Vh
    if isinstance(layer, SORSALinear):
        return layer.sorsa_U.detach() @ torch.diag(layer.sorsa_S.detach()) @ layer.sorsa_Vh.detach()
    if isinstance(layer, KaSALinear):
        return layer.scaling * layer.kasa_B.detach() @ torch.diag(layer.kasa_diag.detach()) @ layer.kasa_A.detach()
    if isinstance(layer, SALTLinear):
        n, k = layer.salt_U.shape[1], layer.r
        C = torch.zeros(n, n, dtype=layer.salt_U.dtype)
        sig = layer.salt_sigma
        C[:k, :k] = torch.diag(torch.relu(layer.salt_alpha.detach() * sig + layer.salt_beta.detach()) - sig)
        if layer.salt_X is not None:
            C[k:, k:] = layer.salt_X.detach() @ layer.salt_Y.detach()
        return layer.salt_U @ C @ layer.salt_Vh
    if isinstance(layer, LaMDALinear):
        return layer.lamda_B.detach() @ layer.lamda_S.detach() @ layer.lamda_A
    if isinstance(layer, QRLoRALinear):
        out = torch.zeros(layer.out_features, layer.in_features, dtype=layer.qrlora_Q.dtype)
        for i in range(layer.r):
            out += layer.qrlora_lambda.detach()[i] * torch.outer(layer.qrlora_Q[:, i], layer.qrlora_R[i])
        return out
    if isinstance(layer, LoLDULinear):
        P = torch.zeros(layer.out_features, layer.out_features, dtype=layer.loldu_L.dtype)
        P[torch.arange(layer.out_features), layer.loldu_perm] = 1
        return layer.loldu_scale.detach() * P @ layer.loldu_L @ torch.diag(layer.loldu_z.detach()) @ layer.loldu_U
    raise TypeError(type(layer))


# ----------------------------------------------------------------------------- init


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_init_is_the_papers(name, shape):
    lin = _linear(*shape)
    layer = _wrap(name, lin)
    kind = METHODS[name][2]
    x = torch.randn(3, 5, shape[0], dtype=torch.float64)
    W = lin.weight.detach()
    if kind == "additive":  # base untouched, ΔW = 0: the layer is the base layer
        assert torch.equal(layer.base_layer.weight, W)
        assert torch.count_nonzero(layer.delta_weight()) == 0
        torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-13)
    elif kind == "residual":  # W_res + ΔW == W (SORSA/LaMDA/LoLDU split)
        torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), W, rtol=0, atol=1e-12)
        assert not torch.allclose(layer.base_layer.weight, W)
        torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-12)
    else:  # KaSA: the base loses its r minor singular components, ΔW = 0
        U, S, Vh = _svd(W)
        keep = min(shape) - layer.r
        torch.testing.assert_close(layer.base_layer.weight, (U[:, :keep] * S[:keep]) @ Vh[:keep], rtol=0, atol=1e-12)
        assert torch.count_nonzero(layer.delta_weight()) == 0
        torch.testing.assert_close(layer(x), F.linear(x, layer.base_layer.weight, lin.bias), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_weights(name, dtype):
    lin = _linear(24, 20, dtype=dtype)
    layer = _wrap(name, lin)
    for t in list(layer.parameters()) + [b for b in layer.buffers() if b.is_floating_point()]:
        assert t.dtype == dtype
    x = torch.randn(4, 24).to(dtype)
    w = layer.base_layer.weight if METHODS[name][2] == "truncated" else lin.weight
    ref = F.linear(x.double(), w.double(), lin.bias.double())
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=tol * ref.abs().max().item())


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_delta_match_the_defining_formula(name, shape):
    layer = _wrap(name, _linear(*shape))
    _randomize(layer)
    dW = _dense_delta(layer)
    assert dW.abs().max() > 1e-3  # the adapter really moved
    torch.testing.assert_close(layer.delta_weight(), dW, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, shape[0], 3, dtype=torch.float64).transpose(1, 2)  # batched, non-contiguous
    ref = F.linear(x, layer.base_layer.weight + dW, layer.base_layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


RANK_ONE = {
    "svft-banded": lambda: adapters.SVFT(pattern="banded", off_diag=2),
    "svft-topk": lambda: adapters.SVFT(pattern="top_k"),
    "svf": lambda: adapters.SVF(),
    "sorsa": lambda: adapters.SORSA(r=1),
    "salt": lambda: adapters.SALT(r=1, lora_r=2),  # no residual block left: no LoRA part
    "lamda": lambda: adapters.LaMDA(r=1),
    "qrlora": lambda: adapters.QRLoRA(r=1),
    "loldu": lambda: adapters.LoLDU(r=1),
}


@pytest.mark.parametrize("name", list(RANK_ONE))
@pytest.mark.parametrize("shape", [(5, 1), (1, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_rank_one_layers_and_empty_batches(name, shape):
    lin = _linear(*shape, bias=False)
    layer = RANK_ONE[name]().create_layer(copy.deepcopy(lin), {})
    x = torch.randn(3, shape[0], dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-12)
    assert layer(x[:0]).shape == (0, shape[1])
    _randomize(layer)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.base_layer.weight + _dense_delta(layer)), rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_trainables(name):
    layer = _wrap(name, _linear(8, 6))
    _randomize(layer)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    vals = tuple(layer.get_parameter(n).detach().clone().requires_grad_() for n in names)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *v):
        return torch.func.functional_call(layer, dict(zip(names, v)), (x,))

    assert torch.autograd.gradcheck(f, (x, *vals))


@pytest.mark.parametrize("name", NAMES)
def test_merge_equals_unmerged_and_unmerge_restores(name):
    layer = _wrap(name, _linear(10, 7))
    _randomize(layer)
    x = torch.randn(4, 10, dtype=torch.float64)
    y = layer(x)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    assert layer.merged and not torch.allclose(layer.base_layer.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-13)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_svft_patterns():
    n, d = 9, 2
    lin = _linear(9, 9)
    band = adapters.SVFT(pattern="banded", off_diag=d).create_layer(copy.deepcopy(lin), {})
    rows, cols = band.svft_rows, band.svft_cols
    assert band.svft_values.numel() == band_count(n, d) == n * (2 * d + 1) - d * (d + 1)
    assert ((rows - cols).abs() <= d).all() and len(set(zip(rows.tolist(), cols.tolist()))) == rows.numel()
    _randomize(band)
    M = band.core_matrix()
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert (M[(i - j).abs() > d] == 0).all() and (M[(i - j).abs() <= d] != 0).all()
    # three diagonals already give a full-rank update (SVFT's claim vs LoRA at equal budget)
    assert torch.linalg.matrix_rank(band.delta_weight()) == n

    rnd = adapters.SVFT(pattern="random", off_diag=1, seed=3).create_layer(copy.deepcopy(lin), {})
    # the paper's random pattern: the banded budget k = n(2d+1) − d(d+1), distinct pairs anywhere in M
    assert rnd.svft_values.numel() == band_count(n, 1)
    assert len(set(zip(rnd.svft_rows.tolist(), rnd.svft_cols.tolist()))) == band_count(n, 1)
    other = adapters.SVFT(pattern="random", off_diag=1, seed=4).create_layer(copy.deepcopy(lin), {})
    assert not torch.equal(rnd.svft_cols, other.svft_cols)

    top = adapters.SVFT(pattern="top_k", off_diag=1).create_layer(copy.deepcopy(lin), {})
    U, Vh = top.svft_U, top.svft_Vh
    scores = U.T @ Vh.T  # ⟨u_i, v_j⟩ for a square W
    k = band_count(n, 1)
    chosen = scores[top.svft_rows, top.svft_cols]
    assert chosen.numel() == k and chosen.min() >= scores.flatten().topk(k).values.min()

    plain = adapters.SVFT().create_layer(copy.deepcopy(lin), {})
    _randomize(plain)
    torch.testing.assert_close(plain.delta_weight(), U @ torch.diag(plain.svft_m.detach()) @ Vh)
    # plain SVFT spans the same updates as SVF: σ' − σ = m
    U0, S0, Vh0 = _svd(lin.weight)
    torch.testing.assert_close(plain.svft_U.abs(), U0.abs(), rtol=0, atol=1e-10)  # full-rank bases

    trunc = adapters.SVFT(r=4).create_layer(copy.deepcopy(lin), {})
    assert trunc.svft_U.shape == (9, 4) and trunc.svft_m.shape == (4,)
    torch.testing.assert_close(trunc.svft_Vh.abs(), Vh0[:4].abs(), rtol=0, atol=1e-10)


def test_svf_singular_values():
    lin = _linear(12, 8)
    layer = _wrap("svf", lin)
    U, S, Vh = _svd(lin.weight)
    torch.testing.assert_close(layer.svf_sigma0, S, rtol=0, atol=1e-12)
    with torch.no_grad():
        layer.svf_sigma.mul_(2.0)  # doubling σ doubles W
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), 2 * lin.weight, rtol=0, atol=1e-12)
    # the gradient of σ is diag(Uᵀ G V) with G = ∂L/∂W (CLIP-SVD's oracle)
    x = torch.randn(5, 12, dtype=torch.float64)
    g = torch.randn(5, 8, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    G = g.T @ x
    torch.testing.assert_close(layer.svf_sigma.grad, torch.diagonal(layer.svf_U.T @ G @ layer.svf_Vh.T))


def test_sorsa_regularizer_and_gradients():
    model = adapters.inject(make(dtype=torch.float64), adapters.SORSA(r=4), target=TARGET)
    layers = [m for m in model.modules() if isinstance(m, SORSALinear)]
    reg = adapters.sorsa_regularizer(model)
    assert reg.item() < 1e-13  # orthonormal singular vectors at init (plain norms: rounding ~1e-15)
    _randomize(model, std=0.05)
    reg = adapters.sorsa_regularizer(model)
    # the mean over the 2·L matrices U, V of ‖·ᵀ· − I‖_F (plain norms, the official normalisation)
    torch.testing.assert_close(reg, sum(m.orthogonal_regularizer() for m in layers) / (2 * len(layers)))
    m = layers[0]
    manual = torch.linalg.matrix_norm(m.sorsa_U.T @ m.sorsa_U - torch.eye(4, dtype=torch.float64)) + \
        torch.linalg.matrix_norm(m.sorsa_Vh @ m.sorsa_Vh.T - torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(m.orthogonal_regularizer(), manual)
    assert reg.item() > 1e-6
    reg.backward()
    for layer in layers:
        assert layer.sorsa_U.grad.abs().sum() > 0 and layer.sorsa_Vh.grad.abs().sum() > 0
        assert layer.sorsa_S.grad is None or layer.sorsa_S.grad.abs().sum() == 0  # Σ is not regularised
    with pytest.raises(ValueError, match="no SORSA layers"):
        adapters.sorsa_regularizer(make())


def test_kasa_regularizer():
    model = adapters.inject(make(dtype=torch.float64), adapters.KaSA(r=3, beta=0.5, gamma=0.25), target=TARGET)
    layers = [m for m in model.modules() if isinstance(m, KaSALinear)]
    eye = torch.eye(3, dtype=torch.float64)
    expected = 0.0
    for m in layers:
        ortho = torch.linalg.matrix_norm(m.kasa_B.T @ m.kasa_B - eye) + torch.linalg.matrix_norm(m.kasa_A @ m.kasa_A.T - eye)
        expected = expected + 0.5 * m.kasa_diag.square().sum() + 0.25 * ortho
    torch.testing.assert_close(adapters.kasa_regularizer(model), expected / len(layers))  # mean over layers
    torch.testing.assert_close(adapters.kasa_regularizer(model, beta=0.0, gamma=0.0), torch.zeros((), dtype=torch.float64))


def test_qrlora_basis():
    lin = _linear(11, 8)
    W = lin.weight.detach()
    Q, R, perm = linalg.pivoted_qr(W)
    torch.testing.assert_close(W[:, perm], Q @ R, rtol=0, atol=1e-12)
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=Q.dtype), rtol=0, atol=1e-12)
    d = torch.diagonal(R).abs()
    assert (d[:-1] >= d[1:] - 1e-12).all()
    full = adapters.QRLoRA(r=8).create_layer(copy.deepcopy(lin), {})
    torch.testing.assert_close(full.qrlora_Q, Q)
    torch.testing.assert_close(full.qrlora_Q @ full.qrlora_R, W, rtol=0, atol=1e-12)  # Σ_i Q_i R_iᵀ = W
    torch.testing.assert_close(full.qrlora_R[:, full.qrlora_perm], R)
    with torch.no_grad():
        full.qrlora_lambda.fill_(1.0)  # λ = 1 doubles W
    torch.testing.assert_close(full.delta_weight(), W, rtol=0, atol=1e-12)
    # energy rule: smallest r covering 90% of Σ|R_ii|
    layer = _wrap("qrlora-energy", lin)
    frac = d.cumsum(0) / d.sum()
    r = int((frac < 0.9).sum()) + 1
    assert layer.r == r and frac[r - 1] >= 0.9 and (r == 1 or frac[r - 2] < 0.9)


def test_loldu_factors():
    lin = _linear(10, 7)
    W = lin.weight.detach()
    layer = adapters.LoLDU(r=7, alpha=7.0).create_layer(copy.deepcopy(lin), {})  # full rank, s = 1
    L, U = layer.loldu_L, layer.loldu_U
    k = 7
    assert torch.equal(torch.diagonal(L), torch.ones(k, dtype=L.dtype)) and torch.equal(L, torch.tril(L))
    assert torch.equal(torch.diagonal(U), torch.ones(k, dtype=U.dtype)) and torch.equal(U, torch.triu(U))
    P = torch.zeros(7, 7, dtype=W.dtype)
    P[torch.arange(7), layer.loldu_perm] = 1
    torch.testing.assert_close(P @ L @ torch.diag(layer.loldu_z.detach()) @ U, W, rtol=0, atol=1e-12)  # W = P L D U
    torch.testing.assert_close(layer.base_layer.weight, torch.zeros_like(W), rtol=0, atol=1e-12)  # full rank: no residual
    part = _wrap("loldu", lin)
    assert part.loldu_scale.item() == pytest.approx(0.5) and part.loldu_z.shape == (4,)


def test_lamda_projection_freezing():
    model = adapters.inject(make(), adapters.LaMDA(r=4), target=TARGET)
    assert adapters.lamda_freeze_projection_b(model) == 8
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"lamda_S"}
    layer = next(m for m in model.modules() if isinstance(m, LaMDALinear))
    assert layer.lamda_S.shape == (4, 4)  # dense low-dimensional core
    torch.testing.assert_close(layer.lamda_A @ layer.lamda_A.T, torch.eye(4), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training / injection


@pytest.mark.parametrize("name", NAMES)
def test_only_intended_parameters_train(name):
    cfg, trainable, _ = METHODS[name]
    model = adapters.inject(make(), cfg(), target=TARGET)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in names} == trainable
    assert all(n.startswith("layers.") for n in names) and len(names) == 8 * len(trainable)
    _randomize(model, std=0.05)
    model(torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))).float().square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_loldu_fixed_scale():
    model = adapters.inject(make(), adapters.LoLDU(r=4, train_scale=False), target=TARGET)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"loldu_z"}


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    cfg = METHODS[name][0]()
    model = adapters.inject(make(dtype=torch.float64), cfg, target=TARGET)
    _randomize(model)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    y = model(ids)
    adapters.save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == cfg.peft_type == type(cfg).__name__.upper() and meta["format"] == "lowrank_ops"
    fresh = adapters.load_pretrained(make(dtype=torch.float64), tmp_path)
    assert type(fresh._lowrank_ops_adapter["config"]) is type(cfg) and fresh._lowrank_ops_adapter["config"] == cfg
    torch.testing.assert_close(fresh(ids), y, rtol=0, atol=1e-12)
    sd = adapters.adapter_state_dict(model)
    sd2 = adapters.adapter_state_dict(fresh)
    assert sd.keys() == sd2.keys()
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=0, atol=0)
    merged = adapters.merge_and_unload(fresh)
    torch.testing.assert_close(merged(ids), y, rtol=1e-10, atol=1e-10)


def test_save_without_bases(tmp_path):
    cfg = adapters.SVFT(pattern="banded", save_bases=False)
    model = adapters.inject(make(dtype=torch.float64), cfg, target=TARGET)
    _randomize(model)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    adapters.save_pretrained(model, tmp_path)
    keys = set(adapters.adapter_state_dict(model))
    assert not any(k.endswith(("svft_U", "svft_Vh")) for k in keys) and any(k.endswith("svft_rows") for k in keys)
    fresh = adapters.load_pretrained(make(dtype=torch.float64), tmp_path)  # bases recomputed: same backend
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=1e-12)


def test_load_refuses_mismatches(tmp_path):
    model = adapters.inject(make(), adapters.SVF(r=4), target=TARGET)
    adapters.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="carries"):
        adapters.load_pretrained(adapters.inject(make(), adapters.LoRA(r=4), target=TARGET), tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    d["peft_type"] = "SPECTRAL_UNKNOWN"
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(NotImplementedError, match="SPECTRAL_UNKNOWN"):
        adapters.load_pretrained(make(), tmp_path)


def test_bad_arguments():
    lin = _linear(6, 4)
    with pytest.raises(ValueError, match="SVFT: pattern"):
        adapters.SVFT(pattern="diagonal")
    with pytest.raises(ValueError, match=r"SVFT: r=5 exceeds min\(out_features, in_features\)=4"):
        adapters.SVFT(r=5).create_layer(lin, {})
    with pytest.raises(ValueError, match="KaSA: r=4 must be < "):
        adapters.KaSA(r=4).create_layer(lin, {})
    with pytest.raises(ValueError, match="SORSA: r must be an int >= 1"):
        adapters.SORSA(r=0).create_layer(lin, {})
    with pytest.raises(ValueError, match="SALT: lora_r"):
        adapters.SALT(r=2, lora_r=-1).create_layer(lin, {})
    with pytest.raises(ValueError, match="QRLoRA: energy"):
        adapters.QRLoRA(energy=1.5)
    with pytest.raises(ValueError, match="LaMDA: init"):
        adapters.LaMDA(init="pissa")
    with pytest.raises(ValueError, match="SVF: parametrization"):
        adapters.SVF(parametrization="mul")


# ----------------------------------------------------------------------------- compile

COMPILE = ["svft-banded", "svft-plain", "svf", "sorsa", "kasa", "salt", "lamda", "qrlora", "loldu"]


class _Stack(nn.Module):
    """A tiny model with one adapter layer of every method in turn (one compile covers them all)."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(METHODS[n][0]().create_layer(nn.Linear(d, d), {}) for n in COMPILE)
        self.head = nn.Linear(d, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = x + F.gelu(blk(x))
        return self.head(x)


def test_compiled_train_step_and_inference_match_eager():
    torch._dynamo.reset()
    eager = _Stack()
    for p in list(eager.embed.parameters()) + list(eager.head.parameters()):
        p.requires_grad_(False)
    _randomize(eager, std=0.1)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))

    def step(fn, model):
        loss = fn(ids).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_e, grads_e = step(eager, eager)
    loss_c, grads_c = step(compiled, compiled_model)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == sum(len(METHODS[n][1]) for n in COMPILE)
    for n in grads_e:
        assert grads_e[n].abs().sum() > 0, n
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), eager(ids), rtol=1e-5, atol=1e-5)
