"""SVD- and data-driven LoRA inits (PiSSA, MiLoRA, OLoRA, EVA) and LoRA-SB: each init's
defining identity, peft as oracle where peft has the init, save/load in peft layout,
the exact conversion to a plain LoRA on the original base, and torch.compile."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters
from lowrank_ops.adapters.inject import adapter_state
from lowrank_ops.adapters.lora.init import _IncrementalSVD, allocate_ranks
from lowrank_ops.nn import LoRALinear

from .tiny_models import make

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TARGETS = ["q_proj", "v_proj", "up_proj"]
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _linear(out_f, in_f, dtype=torch.float32, seed=0, decay=True):
    """An nn.Linear whose weight has a decaying spectrum (like trained weights)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64)).Q
    k = min(out_f, in_f)
    s = (torch.arange(1, k + 1, dtype=torch.float64) ** -0.7) if decay else torch.ones(k, dtype=torch.float64)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_((U[:, :k] * s) @ V[:, :k].T)
    return lin


def _identity_err(layer: LoRALinear, W0: torch.Tensor) -> tuple[float, float]:
    """max |W_res + s·B·A − W| (in fp64 from the stored values) and one ulp of W_res."""
    w = layer.base_layer.weight.double()
    recon = w + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    return (recon - W0.double()).abs().max().item(), EPS[layer.base_layer.weight.dtype] * w.abs().max().item()


# --------------------------------------------------------------------------- PiSSA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_iter", [None, 4])
@pytest.mark.parametrize("shape", [(40, 24), (17, 33)])
def test_pissa_residual_identity_and_principal_part(dtype, n_iter, shape):
    lin = _linear(*shape, dtype=dtype)
    W0 = lin.weight.detach().clone()
    layer = LoRALinear(lin, r=5, alpha=3.0)  # s = 0.6: the scale must be divided out of the factors
    adapters.lora.pissa_init_(layer, n_iter=n_iter)
    err, ulp = _identity_err(layer, W0)
    # one rounding of W_res plus the fp32/fp64 product's own error
    assert err <= 1.0 * ulp + 64 * EPS[torch.float32 if dtype != torch.float64 else dtype] * W0.abs().max().item(), (err, ulp)
    # s·B·A is the best rank-r approximation of W (up to the factors' rounding)
    U, S, Vh = torch.linalg.svd(W0.double())
    best = (U[:, :5] * S[:5]) @ Vh[:5]
    got = layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    if n_iter is None:
        tol = 1e-10 if dtype == torch.float64 else 4e-5 if dtype == torch.float32 else 8 * EPS[dtype]
        assert (got - best).abs().max().item() <= tol * S[0].item()
    else:  # randomized: rank-r error within linalg.rsvd's contract (1.05x optimal), rounding aside
        err = torch.linalg.matrix_norm(W0.double() - got).item()
        opt = S[5:].square().sum().sqrt().item()
        assert err <= 1.05 * opt + 4 * EPS[dtype] * torch.linalg.matrix_norm(W0.double()).item()
    # ‖W_res‖₂ = σ_{r+1} (PiSSA's defining split)
    if dtype == torch.float64 and n_iter is None:
        assert torch.linalg.matrix_norm(layer.base_layer.weight, 2).item() == pytest.approx(S[5].item(), rel=1e-12)


def test_pissa_fast_path_is_exact_on_low_rank_weight():
    lin = _linear(64, 48, dtype=torch.float64)
    with torch.no_grad():  # rank 6 exactly
        U, S, Vh = torch.linalg.svd(lin.weight)
        lin.weight.copy_((U[:, :6] * S[:6]) @ Vh[:6])
    W0 = lin.weight.clone()
    layer = LoRALinear(lin, r=6, alpha=6.0)
    adapters.lora.pissa_init_(layer, n_iter=2)
    assert layer.base_layer.weight.abs().max().item() < 1e-12  # residual ≈ 0
    assert _identity_err(layer, W0)[0] < 1e-14


# --------------------------------------------------------------------------- MiLoRA


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_milora_takes_minor_components(dtype):
    lin = _linear(30, 20, dtype=dtype)
    W0 = lin.weight.detach().clone()
    layer = LoRALinear(lin, r=4, alpha=8.0)
    adapters.lora.milora_init_(layer)
    err, ulp = _identity_err(layer, W0)
    assert err <= ulp + 64 * 2.0**-23 * W0.abs().max().item()
    S = torch.linalg.svdvals(W0.double())
    delta = layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    Sd = torch.linalg.svdvals(delta)
    tol = 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    # the adapter carries exactly the 4 smallest singular values ...
    torch.testing.assert_close(Sd[:4], S[-4:], rtol=tol, atol=tol * S[0].item())
    assert Sd[4:].max().item() <= tol * S[0].item()
    # ... and the residual the 16 largest
    if dtype == torch.float64:
        Sr = torch.linalg.svdvals(layer.base_layer.weight)
        torch.testing.assert_close(Sr[:16], S[:16], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- OLoRA


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 24), (17, 33)])
def test_olora_orthonormal_up_and_triangular_down(dtype, shape):
    lin = _linear(*shape, dtype=dtype)
    W0 = lin.weight.detach().clone()
    layer = LoRALinear(lin, r=6, alpha=12.0)
    adapters.lora.olora_init_(layer)
    err, ulp = _identity_err(layer, W0)
    assert err <= ulp + 64 * 2.0**-23 * W0.abs().max().item()
    B, A = layer.lora_B.weight.double(), layer.lora_A.weight.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(B.T @ B, torch.eye(6, dtype=torch.float64), rtol=0, atol=tol)
    assert torch.equal(A[:, :6], torch.triu(A[:, :6]))  # the first r rows of R are upper triangular
    # B·A is the first-r-columns-of-Q part of W = Q·R, as peft (no division by s)
    Q, R = torch.linalg.qr(W0.double())
    torch.testing.assert_close(B @ A, Q[:, :6] @ R[:6], rtol=0, atol=tol * W0.abs().max().item() * 4)


def test_rank_too_large_is_a_clear_error():
    for fn in (adapters.lora.pissa_init_, adapters.lora.milora_init_, adapters.lora.olora_init_):
        layer = LoRALinear(nn.Linear(6, 5), r=7)
        with pytest.raises(ValueError, match=r"rank r=7 exceeds min\(out, in\)=5"):
            fn(layer)
    with pytest.raises(ValueError, match="n_iter"):
        adapters.PiSSA(r=4, n_iter=-1)
    with pytest.raises(ValueError, match="rho"):
        adapters.EVA(r=4, rho=0.5)


# --------------------------------------------------------------------------- configs, save / load, convert


@pytest.mark.parametrize("cfg, init_value", [
    (adapters.PiSSA(r=4, alpha=8), "pissa"),
    (adapters.PiSSA(r=4, alpha=8, n_iter=4), "pissa_niter_4"),
    (adapters.MiLoRA(r=4, alpha=8), "milora"),
    (adapters.OLoRA(r=4, alpha=8), "olora"),
])
def test_config_injects_saves_and_reloads_on_the_original_base(tmp_path, cfg, init_value):
    base = make()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = base(ids)
    model = adapters.inject(copy.deepcopy(base), cfg, target=TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), y0, rtol=1e-5, atol=1e-5)  # init keeps the function
        for p in adapters.trainable_parameters(model):  # "train"
            p.add_(0.05 * torch.randn_like(p))
        y = model(ids)
    adapters.save_pretrained(model, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["init_lora_weights"] == init_value and d["peft_type"] == "LORA"
    back = adapters.load_pretrained(copy.deepcopy(base), tmp_path)  # the init runs again on the original W
    assert type(adapter_state(back)["config"]) is type(cfg)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [adapters.PiSSA(r=4, alpha=8), adapters.OLoRA(r=3, alpha=3, use_rslora=True),
                                 adapters.MiLoRA(r=2, alpha=4)])
def test_convert_to_lora_is_exact_on_the_original_base(tmp_path, cfg):
    base = make(dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    model = adapters.inject(copy.deepcopy(base), cfg, target=TARGETS)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
        y = model(ids)
    adapters.save_pretrained(model, tmp_path, convert_to_lora=True)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["init_lora_weights"] is True and d["r"] == 2 * cfg.r
    plain = adapters.load_pretrained(copy.deepcopy(base), tmp_path)
    assert type(adapter_state(plain)["config"]) is adapters.LoRA
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), y, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="initial factors"):
        adapters.save_pretrained(adapters.inject(make(), adapters.LoRA(r=2), target=TARGETS), tmp_path / "x",
                                 convert_to_lora=True)


# --------------------------------------------------------------------------- peft as oracle

def _peft():
    return pytest.importorskip("peft")


@pytest.mark.peft
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_init_as_peft(init, dtype):
    peft = _peft()
    base = make(dtype=dtype)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS,
                                                                  init_lora_weights=init))
    cfg = adapters.PiSSA(r=4, alpha=6) if init == "pissa" else adapters.OLoRA(r=4, alpha=6)
    ours = adapters.inject(copy.deepcopy(base), cfg, target=TARGETS)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    n = 0
    for name, layer in adapters.adapter_layers(ours):
        pl = pm.base_model.model.get_submodule(name)
        # residual weights: same up to round-off
        torch.testing.assert_close(layer.base_layer.weight.float(), pl.base_layer.weight.float(), **tol, msg=name)
        # the factors up to the sign of each singular pair: compare the products
        ours_d = layer.scaling * layer.lora_B.weight.float() @ layer.lora_A.weight.float()
        peft_d = pl.scaling["default"] * pl.lora_B["default"].weight.float() @ pl.lora_A["default"].weight.float()
        torch.testing.assert_close(ours_d, peft_d, **tol, msg=name)
        n += 1
    assert n == 2 * len(TARGETS)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), pm(ids).float(), **tol)


@pytest.mark.peft
def test_peft_loads_our_pissa_file_and_its_conversion(tmp_path):
    peft = _peft()
    base = make()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    model = adapters.inject(copy.deepcopy(base), adapters.PiSSA(r=4, alpha=8), target=TARGETS)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
        y = model(ids)
    adapters.save_pretrained(model, tmp_path / "pissa")
    adapters.save_pretrained(model, tmp_path / "lora", convert_to_lora=True)
    with torch.no_grad():
        for sub in ("pissa", "lora"):  # peft re-runs PiSSA's SVD on the original base for "pissa"
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / sub)
            torch.testing.assert_close(pm(ids), y, rtol=1e-4, atol=1e-4, msg=sub)


@pytest.mark.peft
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_file_loads_into_ours(tmp_path, init):
    peft = _peft()
    base = make()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  init_lora_weights=init))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    ours = adapters.load_pretrained(copy.deepcopy(base), tmp_path)  # re-runs the init on the original base
    assert type(adapter_state(ours)["config"]) is (adapters.PiSSA if init == "pissa" else adapters.OLoRA)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), pm(ids), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- EVA


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_incremental_svd_equals_batch_svd_of_stacked_rows(dtype):
    g = torch.Generator().manual_seed(0)
    n, rank = 24, 5
    basis = torch.randn(rank, n, generator=g, dtype=torch.float64)
    batches = [(torch.randn(t, rank, generator=g, dtype=torch.float64) @ basis).to(dtype) for t in (3, 9, 1, 16, 7)]
    inc = _IncrementalSVD(k=8)
    for b in batches:
        inc.update(b)
    X = torch.cat(batches).double()
    S = torch.linalg.svdvals(X)
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(inc.S[:rank].double(), S[:rank], rtol=tol, atol=0)
    P = inc.Vh[:rank].double()
    torch.testing.assert_close(P.T @ P, Vh[:rank].T @ Vh[:rank], rtol=0, atol=tol)  # same subspace
    assert inc.energy == pytest.approx(float(X.square().sum()), rel=1e-6)


def test_incremental_svd_close_to_batch_with_noise():
    g = torch.Generator().manual_seed(1)
    n = 32
    scales = torch.cat([torch.tensor([10.0, 8, 6, 4]), 0.05 * torch.ones(n - 4)]).double()
    batches = [torch.randn(20, n, generator=g, dtype=torch.float64) * scales for _ in range(6)]
    inc = _IncrementalSVD(k=8)
    for b in batches:
        inc.update(b)
    _, S, Vh = torch.linalg.svd(torch.cat(batches), full_matrices=False)
    P = inc.Vh[:4]
    assert (P.T @ P - Vh[:4].T @ Vh[:4]).abs().max() < 2e-3
    torch.testing.assert_close(inc.S[:4], S[:4], rtol=1e-3, atol=0)


def test_allocate_ranks_by_explained_variance():
    spectra = {"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([4.0, 0.1]), "c": torch.tensor([1.0, 1.0])}
    # ratios: a: 9/14, 4/14, 1/14 = .643 .286 .071; b: ~1, .0006; c: .5 .5
    assert allocate_ranks(spectra, budget=4, min_rank=0) == {"a": 1, "b": 1, "c": 2}
    assert allocate_ranks(spectra, budget=5, min_rank=1) == {"a": 2, "b": 1, "c": 2}
    assert allocate_ranks(spectra, budget=4, min_rank=0, max_rank=1) == {"a": 1, "b": 1, "c": 1}
    # a truncated spectrum is scored against the layer's total energy
    assert allocate_ranks({"a": torch.tensor([3.0]), "b": torch.tensor([1.0])}, 1, 0, total={"a": 100.0, "b": 1.0}) == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(spectra, budget=2, min_rank=1)


class _MLP(nn.Module):
    def __init__(self, d=16, h=24):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.fc3 = nn.Linear(d, d)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) + self.fc3(x)  # fc1 and fc3 share their input, like q/k/v


def _eva_data(n_batches=12, d=16, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g) * torch.linspace(3, 0.5, rank).unsqueeze(1)
    return [torch.randn(4, 8, rank, generator=g) @ basis for _ in range(n_batches)]


def test_eva_init_sets_top_right_singular_vectors_and_redistributes(tmp_path):
    torch.manual_seed(0)
    model = _MLP()
    # x spans 3 directions: fc1/fc3 (input x) need only 3 ranks, fc2 (input tanh(fc1(x)),
    # spread over 24 dims) takes the rest of the budget 3·4 = 12, up to its cap rho·r = 8
    data = _eva_data(rank=3)
    W1, b1 = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    # tau = 1: never "converged", so every batch is used and the result is the SVD of all of them
    model = adapters.inject(model, adapters.EVA(r=4, alpha=8, rho=2.0, tau=1.0), target=["fc1", "fc2", "fc3"])
    with pytest.warns(UserWarning, match="converged"):
        ranks = adapters.eva_init(model, data)
    assert ranks == {"fc1": 3, "fc2": 6, "fc3": 3}
    # the activations: fc1/fc3 see x, fc2 sees tanh(fc1(x))
    layers = dict(adapters.adapter_layers(model))
    assert set(layers) == {"fc1", "fc2", "fc3"}
    X = torch.cat(data).reshape(-1, 16)
    inputs = {"fc1": X, "fc3": X, "fc2": torch.tanh(X @ W1.T + b1)}
    checked = []
    for name, L in layers.items():
        r = L.r
        assert r == ranks[name]
        assert torch.count_nonzero(L.lora_B.weight) == 0
        _, _, Vh = torch.linalg.svd(inputs[name].double(), full_matrices=False)
        A = L.lora_A.weight.double()
        torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-4)
        # batch SVD subspace (fc2's input has full rank: the incremental SVD truncated at the
        # cap 8 is an approximation there)
        tol = 1e-3 if name != "fc2" else 1e-2
        torch.testing.assert_close(A.T @ A, Vh[:r].T @ Vh[:r], rtol=0, atol=tol)
        # adjust_scaling_factors: alpha rescaled with the rank, so the scale 8/4 is kept
        assert L.alpha == pytest.approx(8 * r / 4)
        assert L.scaling == pytest.approx(8 / 4)
        checked.append(name)
    assert sorted(checked) == ["fc1", "fc2", "fc3"]
    cfg = adapter_state(model)["config"]
    assert cfg.rank_pattern == {"fc1": 3, "fc2": 6, "fc3": 3}
    assert cfg.alpha_pattern == {"fc1": 6.0, "fc2": 12.0, "fc3": 6.0}
    # saved with peft's fields, reloads with the same shapes
    adapters.save_pretrained(model, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["init_lora_weights"] == "eva" and d["eva_config"]["rho"] == 2.0
    assert d["rank_pattern"] == {"fc1": 3, "fc2": 6, "fc3": 3}
    assert d["alpha_pattern"] == {"fc1": 6.0, "fc2": 12.0, "fc3": 6.0}
    fresh = adapters.load_pretrained(_MLP(), tmp_path)
    for n, L in adapters.adapter_layers(fresh):
        torch.testing.assert_close(L.lora_A.weight, layers[n].lora_A.weight)


@pytest.mark.peft
def test_peft_loads_our_eva_file(tmp_path):
    peft = _peft()
    torch.manual_seed(0)
    base = _MLP()
    model = adapters.inject(copy.deepcopy(base), adapters.EVA(r=4, alpha=8, rho=2.0, tau=0.999), target=["fc1", "fc2", "fc3"])
    adapters.eva_init(model, _eva_data())
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    adapters.save_pretrained(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)


def test_eva_stops_once_converged():
    calls = []
    model = adapters.inject(_MLP(), adapters.EVA(r=2, tau=0.9), target=["fc1", "fc3"])
    adapters.eva_init(model, _eva_data(n_batches=30), forward_fn=lambda m, b: calls.append(m(b)))
    assert 2 <= len(calls) < 30


def test_eva_rank_zero_layer_is_removed_and_rho_one_keeps_ranks():
    torch.manual_seed(0)
    model = adapters.inject(_MLP(), adapters.EVA(r=3, rho=1.0, tau=0.99), target=["fc1", "fc2", "fc3"])
    ranks = adapters.eva_init(model, _eva_data())
    assert ranks == {"fc1": 3, "fc2": 3, "fc3": 3}  # rho = 1: no redistribution
    with pytest.raises(ValueError, match="EVA"):
        adapters.eva_init(adapters.inject(_MLP(), adapters.LoRA(r=2), target=["fc1"]), _eva_data())
    # a layer whose input has no variance loses its adapter when the budget is better spent elsewhere
    m = _MLP()
    with torch.no_grad():
        m.fc1.weight.zero_()
        m.fc1.bias.zero_()
    m = adapters.inject(m, adapters.EVA(r=2, rho=3.0, tau=0.99), target=["fc1", "fc2"])
    ranks = adapters.eva_init(m, _eva_data())
    assert ranks["fc2"] == 0 and isinstance(m.fc2, nn.Linear) and not isinstance(m.fc2, LoRALinear)
    assert adapter_state(m)["target"] == ["fc1"]


# --------------------------------------------------------------------------- LoRA-SB


def _lsq_problem(seed=0, d_in=20, d_out=12, n=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    Y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    lin = nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)
    batches = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, n, 16)]
    return lin, X, Y, batches


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).square().sum(-1).mean()


def test_lora_sb_init_is_best_rank_r_approximation_of_first_full_step():
    lin, X, Y, batches = _lsq_problem()
    W0 = lin.weight.detach().clone()
    model = adapters.inject(nn.Sequential(lin), adapters.LoRASB(r=3), target=["0"])
    lr = 0.1
    adapters.lora_sb_init(model, batches, _loss, lr=lr, update="sgd", n_iter=None)
    # the full-FT first step (gradient averaged over the batches) in closed form
    G = sum(2 * (x @ W0.T - y).T @ x / x.shape[0] for x, y in batches) / len(batches)
    full = -lr * G
    L = model[0]
    delta = L.delta_weight().detach()
    U, S, Vh = torch.linalg.svd(full)
    torch.testing.assert_close(delta, (U[:, :3] * S[:3]) @ Vh[:3], rtol=0, atol=1e-10)  # Eckart–Young optimum
    err = torch.linalg.matrix_norm(delta - full) / torch.linalg.matrix_norm(full)
    assert err.item() == pytest.approx((S[3:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-8)
    assert torch.linalg.matrix_norm(L.base_layer.weight - W0) == 0  # base untouched


def test_lora_sb_only_core_trains_and_its_step_is_the_projected_full_step():
    lin, X, Y, batches = _lsq_problem(seed=1)
    model = adapters.inject(nn.Sequential(lin), adapters.LoRASB(r=4, alpha=8.0), target=["0"])
    adapters.lora_sb_init(model, batches, _loss, lr=0.05, update="adam", n_iter=4)
    L = model[0]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_core.weight"]
    B, A = L.lora_B.weight, L.lora_A.weight
    torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    loss = _loss(model, (X, Y))
    loss.backward()
    assert L.lora_A.weight.grad is None and L.lora_B.weight.grad is None and L.base_layer.weight.grad is None
    # gradient of the effective weight W + s·B·R·A at this point
    W_eff = (L.base_layer.weight + L.delta_weight()).detach().requires_grad_(True)
    ((X @ W_eff.T - Y).square().sum(-1).mean()).backward()
    G = W_eff.grad
    torch.testing.assert_close(L.lora_core.weight.grad, L.scaling * B.T @ G @ A.T, rtol=1e-10, atol=1e-12)
    # so an SGD step on R moves ΔW by the full step projected onto the fixed subspaces (× s²)
    eta = 0.01
    before = L.delta_weight().detach()
    with torch.no_grad():
        L.lora_core.weight -= eta * L.lora_core.weight.grad
    moved = L.delta_weight().detach() - before
    torch.testing.assert_close(moved, -eta * L.scaling**2 * (B @ B.T) @ G @ (A.T @ A), rtol=1e-9, atol=1e-12)


def test_lora_sb_bad_arguments():
    lin, X, Y, batches = _lsq_problem()
    model = adapters.inject(nn.Sequential(lin), adapters.LoRASB(r=2), target=["0"])
    with pytest.raises(ValueError, match="update must be 'adam' or 'sgd'"):
        adapters.lora_sb_init(model, batches, _loss, update="sign")
    with pytest.raises(ValueError, match="no batch"):
        adapters.lora_sb_init(model, [], _loss)
    with pytest.raises(ValueError, match="no LoRA-SB layers"):
        adapters.lora_sb_init(adapters.inject(nn.Sequential(nn.Linear(3, 3)), adapters.LoRA(r=1), target=["0"]), batches, _loss)
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        adapters.LoRASB(r=0)


def test_lora_sb_save_load_roundtrip(tmp_path):
    lin, X, Y, batches = _lsq_problem(seed=2)
    base = nn.Sequential(lin)
    model = adapters.inject(copy.deepcopy(base), adapters.LoRASB(r=2), target=["0"])
    adapters.lora_sb_init(model, batches, _loss, lr=0.05)
    adapters.save_pretrained(model, tmp_path)
    back = adapters.load_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(X), model(X), rtol=0, atol=0)


# --------------------------------------------------------------------------- compile


@pytest.mark.parametrize("cfg", [adapters.PiSSA(r=4, alpha=8, n_iter=2), adapters.LoRASB(r=4)], ids=["pissa", "lora_sb"])
def test_model_compiles_fullgraph_and_matches_eager(cfg):
    torch._dynamo.reset()
    eager = adapters.inject(make(), cfg, target=r".*(q_proj|v_proj|up_proj)$")
    if isinstance(cfg, adapters.LoRASB):  # a non-zero core, so the adapter term matters
        with torch.no_grad():
            for p in adapters.trainable_parameters(eager):
                p.normal_()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    le = eager(ids).logsumexp(-1).mean()
    lc = compiled(ids).logsumexp(-1).mean()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    le.backward()
    lc.backward()
    ge = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    gc = {n: p.grad for n, p in compiled_model.named_parameters() if p.requires_grad}
    assert ge.keys() == gc.keys() and ge
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    """bf16/fp16 weights: factorisations run in fp32; results match the fp32 run to the dtype's rounding."""
    lin32, X, Y, batches = _lsq_problem(seed=3)
    lin32 = lin32.float()
    batches32 = [(x.float(), y.float()) for x, y in batches]
    m32 = adapters.inject(nn.Sequential(copy.deepcopy(lin32)), adapters.LoRASB(r=2), target=["0"])
    adapters.lora_sb_init(m32, batches32, _loss, lr=0.1, update="sgd", n_iter=None)
    mlo = adapters.inject(nn.Sequential(copy.deepcopy(lin32).to(dtype)), adapters.LoRASB(r=2), target=["0"])
    adapters.lora_sb_init(mlo, [(x.to(dtype), y.to(dtype)) for x, y in batches32], lambda m, b: _loss(m, b).float(),
                          lr=0.1, update="sgd", n_iter=None)
    d32, dlo = m32[0].delta_weight().detach(), mlo[0].delta_weight().detach().float()
    assert dlo.dtype == torch.float32 and mlo[0].lora_core.weight.dtype == dtype
    assert (dlo - d32).abs().max() <= 0.05 * d32.abs().max()
    # EVA on a low-precision model: A has orthonormal rows up to the dtype's rounding
    model = adapters.inject(_MLP().to(dtype), adapters.EVA(r=3, tau=0.99), target=["fc1", "fc3"])
    adapters.eva_init(model, [b.to(dtype) for b in _eva_data()])
    A = model.fc1.lora_A.weight.float()
    assert A.dtype == torch.float32 and model.fc1.lora_A.weight.dtype == dtype
    torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), rtol=0, atol=2e-2)
