"""LiNeS: λ(ℓ) = α + β·ℓ/(L−1) scales the task vector by depth; composes with another method."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops import merge
from lowrank_ops.merge.config import infer_num_layers, layer_index


def test_layer_index_parsing():
    assert layer_index("model.layers.10.mlp.up_proj.weight") == 10
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("blocks.0.norm.weight") == 0
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert infer_num_layers(["a.layers.0.w", "a.layers.5.w", "lm_head.weight"]) == 6


def test_scales_by_depth():
    base = torch.randn(3, 3, dtype=torch.float64)
    ft = base + 1.0
    L, a, b = 4, 0.2, 0.6
    for i in range(L):
        out = merge.lines.merge_tensor(f"model.layers.{i}.w", base, [ft], alpha=a, beta=b, num_layers=L)
        torch.testing.assert_close(out - base, torch.full((3, 3), a + b * i / (L - 1), dtype=torch.float64))
    emb = merge.lines.merge_tensor("model.embed_tokens.weight", base, [ft], alpha=a, beta=b, num_layers=L)
    torch.testing.assert_close(emb - base, torch.full((3, 3), a, dtype=torch.float64))
    head = merge.lines.merge_tensor("lm_head.weight", base, [ft], alpha=a, beta=b, num_layers=L, non_layer_scale=1.0)
    torch.testing.assert_close(head, ft)


def test_task_arithmetic_sum_by_default_with_weights():
    base = torch.zeros(4, dtype=torch.float64)
    t1, t2 = torch.ones(4, dtype=torch.float64), 2 * torch.ones(4, dtype=torch.float64)
    out = merge.lines.merge_tensor("h.1.w", base, [t1, t2], [0.5, 1.0], alpha=0.0, beta=1.0, num_layers=3)
    torch.testing.assert_close(out, 0.5 * (0.5 * t1 + t2))


def test_composes_with_another_method():
    base = torch.randn(5, 5, dtype=torch.float64)
    ts = [base + torch.randn(5, 5, dtype=torch.float64) + 1.0 for _ in range(2)]
    inner = merge.model_stock.merge_tensor("blocks.2.w", base, ts)
    out = merge.lines.merge_tensor("blocks.2.w", base, ts, alpha=0.1, beta=0.3, num_layers=5, base_method="model_stock")
    torch.testing.assert_close(out, base + (0.1 + 0.3 * 2 / 4) * (inner - base))


def test_needs_num_layers_for_layer_tensors():
    with pytest.raises(ValueError, match="num_layers"):
        merge.lines.merge_tensor("layers.1.w", torch.zeros(2), [torch.ones(2)])
    with pytest.raises(ValueError, match="num_layers=2"):
        merge.lines.merge_tensor("layers.3.w", torch.zeros(2), [torch.ones(2)], num_layers=2)
