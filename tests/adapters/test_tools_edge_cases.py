"""Edge cases of the adapter tools: EVA's token masking, extract_lora on embeddings and
biases, combine's refusal of unsupported adapters, LoRA-SB's rank check."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lowrank_ops  # noqa: F401
from lowrank_ops import adapters
from lowrank_ops.adapters.inject import adapter_state

from .tiny_models import make

P = "base_model.model."


# --------------------------------------------------------------------------- EVA


class _EmbMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.fc2(torch.tanh(self.fc1(self.emb(input_ids))))


def _token_batches(n=6, b=4, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 20, (b, t), generator=g) for _ in range(n)]


def _eva_A(batches, cfg=None, **kw):
    torch.manual_seed(0)
    m = adapters.inject(_EmbMLP(), cfg or adapters.EVA(r=3, rho=1.0, tau=1.0), target=["fc1", "fc2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapters.eva_init(m, batches, **kw)
    return m, {n: m.get_submodule(n).lora_A.weight.detach().clone() for n in ("fc1", "fc2")}


def _proj(A):
    return A.double().T @ A.double()


def _pad(ids, extra, pad_id=0):
    padded = torch.cat([ids, torch.full((ids.shape[0], extra), pad_id)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(ids.shape[0], extra, dtype=ids.dtype)], 1)
    return padded, mask


def test_eva_padding_positions_do_not_influence_A():
    ids = _token_batches()
    _, A_ref = _eva_A([{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids])
    padded = [dict(zip(("input_ids", "attention_mask"), _pad(x, 6))) for x in ids]
    _, A_pad = _eva_A(padded)
    for n in A_ref:
        torch.testing.assert_close(A_pad[n], A_ref[n], rtol=0, atol=1e-5)
    # without the mask (a user prepare_layer_inputs_fn that keeps every row) the padding counts
    _, A_all = _eva_A(padded, prepare_layer_inputs_fn=lambda x, batch, name: x.reshape(-1, x.shape[-1]))
    assert (_proj(A_all["fc1"]) - _proj(A_ref["fc1"])).abs().max() > 1e-2


def test_eva_label_mask_follows_use_label_mask_and_is_saved(tmp_path):
    ids = _token_batches()
    padded = [_pad(x, 6) for x in ids]
    # labels == -100 on the extra positions, attention_mask all ones: the label mask drops them
    lab = []
    for x, am in padded:
        labels = x.clone()
        labels[am == 0] = -100
        lab.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels})
    _, A_ref = _eva_A([{"input_ids": x, "attention_mask": am} for x, am in padded])
    m, A_lab = _eva_A(lab)
    for n in A_ref:
        torch.testing.assert_close(A_lab[n], A_ref[n], rtol=0, atol=1e-5)
    adapters.save_pretrained(m, tmp_path / "on")
    e = json.loads((tmp_path / "on" / "adapter_config.json").read_text())["eva_config"]
    assert e["use_label_mask"] is True and e["label_mask_value"] == -100
    # use_label_mask=False: the labels are ignored, and the saved config says so
    m2, A_nolab = _eva_A(lab, cfg=adapters.EVA(r=3, rho=1.0, tau=1.0, use_label_mask=False))
    assert (_proj(A_nolab["fc1"]) - _proj(A_ref["fc1"])).abs().max() > 1e-2
    adapters.save_pretrained(m2, tmp_path / "off")
    e = json.loads((tmp_path / "off" / "adapter_config.json").read_text())["eva_config"]
    assert e["use_label_mask"] is False
    fresh = adapters.load_pretrained(_EmbMLP(), tmp_path / "off")
    assert adapter_state(fresh)["config"].use_label_mask is False
    # a custom label_mask_value
    lab7 = [{**b, "labels": torch.where(b["labels"] == -100, 7, b["labels"] + 100)} for b in lab]
    _, A7 = _eva_A(lab7, cfg=adapters.EVA(r=3, rho=1.0, tau=1.0, label_mask_value=7))
    for n in A_ref:
        torch.testing.assert_close(A7[n], A_ref[n], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- extract_lora


def _tuned(base, names=None, scale=0.05, bias=True):
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if names is not None and not any(k in n for k in names):
                continue
            if n.endswith(".bias") and not bias:
                continue
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return tuned


def test_extract_skips_embeddings_and_loads(tmp_path):
    base = make()
    tuned = _tuned(base, bias=False)  # the embedding moved too
    state, cfg = adapters.extract_lora(base.state_dict(), tuned.state_dict(), rank=2, out_dir=tmp_path)
    modules = {k[len(P):].split(".lora_")[0] for k in state}
    assert "embed" not in modules and "head" in modules and "layers.0.q_proj" in modules
    assert "embed" not in json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    adapters.load_pretrained(copy.deepcopy(base), tmp_path)  # refused before: embed is not a Linear
    # a target naming an embedding is refused
    with pytest.raises(ValueError, match=r"\['embed'\].*embeddings"):
        adapters.extract_lora(base.state_dict(), tuned.state_dict(), rank=2, target=["embed", "q_proj"])


def test_extract_with_model_decides_by_module_type():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 8)  # no conventional embedding name
            self.proj = nn.Linear(8, 8, bias=False)

    base = M()
    tuned = _tuned(base)
    state, _ = adapters.extract_lora(base.state_dict(), tuned.state_dict(), rank=2, model=base)
    assert {k[len(P):].split(".lora_")[0] for k in state} == {"proj"}
    with pytest.raises(ValueError, match=r"\['tok'\].*not nn.Linear"):
        adapters.extract_lora(base.state_dict(), tuned.state_dict(), rank=2, target=["tok"], model=base)


def test_extract_warns_about_bias_deltas():
    base = make(dtype=torch.float64)
    tuned = _tuned(base, names=["q_proj"])
    with pytest.warns(UserWarning, match=r"bias of 2 module.*layers\.0\.q_proj \(\|Δbias\| = .*layers\.1\.q_proj"):
        adapters.extract_lora(base.state_dict(), tuned.state_dict(), rank=2, target=["q_proj"])
    # no warning when only the weights moved
    tuned = _tuned(base, names=["q_proj"], bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapters.extract_lora(base.state_dict(), tuned.state_dict(), rank=2, target=["q_proj"])


# --------------------------------------------------------------------------- combine


def _linear_adapter(ranks, r=8, rank_pattern=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m, k in ranks.items():
        sd[f"{P}{m}.lora_A.weight"] = torch.randn(k, 6, generator=g)
        sd[f"{P}{m}.lora_B.weight"] = torch.randn(5, k, generator=g)
    return sd, {"peft_type": "LORA", "r": r, "lora_alpha": 8, "rank_pattern": rank_pattern or {},
                "target_modules": list(ranks)}


def _embedding_adapter():
    sd = {f"{P}emb.lora_embedding_A": torch.randn(8, 10), f"{P}emb.lora_embedding_B": torch.randn(4, 8)}
    return sd, {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["emb"]}


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_combine_refuses_embedding_adapters(method):
    e = _embedding_adapter()
    with pytest.raises(ValueError, match="lora_embedding_A"):
        adapters.combine([e, e], [1, 1], method=method)
    a = _linear_adapter({"m1": 8})
    mixed = ({**a[0], **e[0]}, a[1])
    with pytest.raises(ValueError, match="lora_embedding"):
        adapters.combine([a, mixed], [1, 1], method=method)


def test_combine_refuses_empty_adapters():
    empty = ({}, {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": []})
    with pytest.raises(ValueError, match="no `.lora_A.weight`"):
        adapters.combine([empty, empty], [1, 1], method="cat")


def test_combine_linear_names_the_module_with_mismatching_ranks():
    a = _linear_adapter({"m1": 8, "m2": 4}, rank_pattern={"m2": 4})
    b = _linear_adapter({"m1": 8, "m2": 8}, seed=1)
    with pytest.raises(ValueError, match=r"`m2` has ranks \[4, 8\]"):
        adapters.combine([a, b], [1, 1], method="linear")
    adapters.combine([a, b], [1, 1], method="cat")  # other methods still accept it


# --------------------------------------------------------------------------- LoRA-SB


def test_lora_sb_rank_above_min_dim_refused_at_construction():
    with pytest.raises(ValueError, match=r"r=6 exceeds min\(out, in\)=4"):
        adapters.inject(nn.Sequential(nn.Linear(6, 4)), adapters.LoRASB(r=6), target=["0"])
    m = adapters.inject(nn.Sequential(nn.Linear(6, 4)), adapters.LoRASB(r=4), target=["0"])
    assert m[0].r == 4


def test_combine_names_itself_when_refusing_an_init():
    """An init the config parser cannot take (e.g. loftq) is refused by combine, in combine's words."""
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"], "init_lora_weights": "loftq"}
    sd = {"base_model.model.q.lora_A.weight": torch.zeros(2, 4), "base_model.model.q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(NotImplementedError, match=r"^combine: cannot combine this adapter: init_lora_weights='loftq'"):
        adapters.combine([(sd, cfg), (sd, cfg)], [1.0, 1.0], method="cat")
