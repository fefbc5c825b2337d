"""LoRA-space merges: cat exact, svd exact at full rank, linear/cat/svd against peft's add_weighted_adapter."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_ops import adapters as lro_adapters
from lowrank_ops.merge.lora import merge_lora_adapters, read_lora

TARGETS = ["q_proj", "v_proj"]
SHAPES = {"q_proj": (12, 10), "v_proj": (7, 10)}  # (out, in)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(10, 12)
        self.v_proj = nn.Linear(10, 7)
        self.o = nn.Linear(12 + 7, 10)

    def forward(self, x):
        return self.o(torch.cat([self.q_proj(x), torch.tanh(self.v_proj(x))], -1))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.layers:
            x = x + b(x)
        return x


def _write_adapter(path, r, alpha, seed, rslora=False, modules=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for li in range(2):
        for t in modules or TARGETS:
            out_f, in_f = SHAPES[t]
            pre = f"base_model.model.layers.{li}.{t}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": TARGETS,
           "lora_dropout": 0.0, "bias": "none", "task_type": None, "fan_in_fan_out": False, "use_dora": False,
           "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": None,
           "inference_mode": True, "modules_to_save": None}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _dense_deltas(dirs, weights):
    """{module: Σ wᵢ·sᵢ·Bᵢ·Aᵢ} in fp64, from the files."""
    out = {}
    for d, w in zip(dirs, weights):
        ad = read_lora(d)
        for m, (A, B) in ad.modules.items():
            out[m] = out.get(m, 0) + w * ad.scaling * (B.double() @ A.double())
    return out


def _merged_deltas(path):
    ad = read_lora(path)
    assert ad.scaling == 1.0
    return {m: B.double() @ A.double() for m, (A, B) in ad.modules.items()}


@pytest.fixture
def three(tmp_path):
    return [_write_adapter(tmp_path / "a", 2, 4.0, 1), _write_adapter(tmp_path / "b", 3, 3.0, 2, rslora=True),
            _write_adapter(tmp_path / "c", 2, 1.0, 3)]


def test_cat_is_exact_and_the_merged_model_equals_the_sum(tmp_path, three):
    w = [1.0, -0.5, 2.0]
    info = merge_lora_adapters(three, tmp_path / "out", method="cat", weights=w)
    assert info["rank"] == 7
    ref = _dense_deltas(three, w)
    got = _merged_deltas(tmp_path / "out")
    for m in ref:
        torch.testing.assert_close(got[m], ref[m], atol=1e-4, rtol=1e-5)
    # merged adapter loaded into a model = the base model with every adapter's delta added
    base = Tiny()
    x = torch.randn(5, 10)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, mod in dense.named_modules():
            key = f"base_model.model.{name}"
            if key in ref:
                mod.weight += ref[key].float()
    model = lro_adapters.load_pretrained(copy.deepcopy(base), tmp_path / "out")
    torch.testing.assert_close(model(x), dense(x), atol=1e-4, rtol=1e-4)


def test_svd_exact_at_full_rank_and_optimal_when_truncated(tmp_path, three):
    w = [0.7, 1.0, -1.3]
    ref = _dense_deltas(three, w)
    merge_lora_adapters(three, tmp_path / "full", method="svd", weights=w, rank=7)
    for m, d in _merged_deltas(tmp_path / "full").items():
        torch.testing.assert_close(d, ref[m], atol=1e-4, rtol=1e-5)
    merge_lora_adapters(three, tmp_path / "r3", method="svd", weights=w, rank=3)
    for m, d in _merged_deltas(tmp_path / "r3").items():
        s = torch.linalg.svdvals(ref[m])
        torch.testing.assert_close(torch.linalg.matrix_norm(ref[m] - d), s[3:].norm(), atol=1e-4, rtol=1e-4)


def test_linear_is_the_sum_of_scaled_factors_not_of_products(tmp_path):
    dirs = [_write_adapter(tmp_path / "a", 3, 6.0, 1), _write_adapter(tmp_path / "b", 3, 3.0, 2)]
    w = [1.0, -2.0]
    merge_lora_adapters(dirs, tmp_path / "out", method="linear", weights=w)
    a, b = read_lora(dirs[0]), read_lora(dirs[1])
    ca, cb = w[0] * a.scaling, w[1] * b.scaling
    got = _merged_deltas(tmp_path / "out")
    for m in a.modules:
        (A1, B1), (A2, B2) = a.modules[m], b.modules[m]
        A = ca ** 0.5 * A1.double() - abs(cb) ** 0.5 * A2.double()
        B = ca ** 0.5 * B1.double() + abs(cb) ** 0.5 * B2.double()
        torch.testing.assert_close(got[m], B @ A, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(got[m], ca * B1.double() @ A1.double() + cb * B2.double() @ A2.double(), atol=1e-2)
    with pytest.raises(ValueError, match="equal rank"):
        merge_lora_adapters([dirs[0], _write_adapter(tmp_path / "c", 2, 2.0, 3)], tmp_path / "x", method="linear")


def _dense_ties(deltas, density):
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    k = max(1, int(density * flat.shape[1]))  # ops.magnitude_threshold: floor, at least one
    thr = flat.abs().sort(dim=1, descending=True).values[:, k - 1:k]
    trimmed = flat * (flat.abs() >= thr)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return ((trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)).reshape(deltas.shape[1:])


def test_ties_and_dare_through_dense_tiles(tmp_path, three):
    w = [1.0, 1.0, 0.5]
    per_task = [_dense_deltas([d], [wi]) for d, wi in zip(three, w)]
    info = merge_lora_adapters(three, tmp_path / "ties", method="ties", weights=w, density=0.4, rank=10, tile_rows=64)
    got = _merged_deltas(tmp_path / "ties")
    for m, d in got.items():
        ref = _dense_ties(torch.stack([p[m] for p in per_task]), 0.4)
        if min(ref.shape) <= 10:  # full rank: only the (exact) compression is in between
            torch.testing.assert_close(d, ref, atol=1e-4, rtol=1e-4)
            assert info["errors"][m] < 1e-5
    # DARE keeping everything is the plain weighted sum; fixed seed -> same file
    merge_lora_adapters(three, tmp_path / "dare1", method="dare", weights=w, density=1.0, rank=10, tile_rows=4)
    ref = _dense_deltas(three, w)
    for m, d in _merged_deltas(tmp_path / "dare1").items():
        torch.testing.assert_close(d, ref[m], atol=1e-4, rtol=1e-4)
    for out in ("d1", "d2"):
        merge_lora_adapters(three, tmp_path / out, method="dare_ties", weights=w, density=0.5, rank=4, seed=3)
    f1, f2 = (load_file(str(tmp_path / o / "adapter_model.safetensors")) for o in ("d1", "d2"))
    assert all(torch.equal(f1[k], f2[k]) for k in f1)
    info = merge_lora_adapters(three, tmp_path / "d3", method="dare", density=0.5, rank=2)
    assert all(0 < e < 1 for e in info["errors"].values())


def test_bad_inputs(tmp_path, three):
    with pytest.raises(ValueError, match="unknown method 'mean'"):
        merge_lora_adapters(three, tmp_path / "o", method="mean")
    odd = _write_adapter(tmp_path / "odd", 2, 2.0, 5, modules=["q_proj"])
    with pytest.raises(ValueError, match="adapts different modules"):
        merge_lora_adapters([three[0], odd], tmp_path / "o", method="cat")
    cfg = json.loads((three[0] / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (three[0] / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="DoRA"):
        merge_lora_adapters(three, tmp_path / "o", method="cat")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_lora_adapters([tmp_path / "nowhere"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.peft
@pytest.mark.parametrize("method,weights", [("cat", [1.0, 0.5]), ("svd", [1.0, -0.5]), ("linear", [0.8, 0.3])])
def test_matches_peft_add_weighted_adapter(tmp_path, method, weights):
    peft = pytest.importorskip("peft")
    r = 3
    dirs = [_write_adapter(tmp_path / "a", r, 6.0, 1), _write_adapter(tmp_path / "b", r, 2.0, 2, rslora=True)]
    pm = peft.PeftModel.from_pretrained(Tiny(), str(dirs[0]), adapter_name="a")
    pm.load_adapter(str(dirs[1]), adapter_name="b")
    kw = {"svd_rank": 4} if method == "svd" else {}
    pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=method, **kw)
    merge_lora_adapters(dirs, tmp_path / "ours", method=method, weights=weights, rank=4 if method == "svd" else None)
    ours = _merged_deltas(tmp_path / "ours")
    seen = 0
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            key = f"base_model.model.{name}"
            torch.testing.assert_close(ours[key], mod.get_delta_weight("m").double(), atol=1e-4, rtol=1e-4)
            seen += 1
    assert seen == len(ours) == 4
