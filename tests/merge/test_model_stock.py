"""Model Stock: t = N·cosθ / ((N−1)·cosθ + 1) toward the average, checked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops import merge


def test_orthogonal_equal_norm_deltas_give_the_base():
    base = torch.randn(4, 6, dtype=torch.float64)
    d1 = torch.zeros(4, 6, dtype=torch.float64)
    d2 = torch.zeros(4, 6, dtype=torch.float64)
    d1[0, :] = 1.0
    d2[1, :] = 1.0  # orthogonal, same norm
    out = merge.model_stock.merge_tensor("w", base, [base + d1, base + d2])
    torch.testing.assert_close(out, base)


def test_sixty_degrees_by_hand():
    base = torch.randn(3, dtype=torch.float64)
    d1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    d2 = torch.tensor([0.5, math.sqrt(3) / 2, 0.0], dtype=torch.float64)  # cos = 1/2
    t = 2 * 0.5 / (1 * 0.5 + 1)  # = 2/3
    out = merge.model_stock.merge_tensor("w", base, [base + d1, base + d2])
    torch.testing.assert_close(out, base + t * (d1 + d2) / 2)


def test_three_models_mean_pairwise_cosine_and_dtype():
    base = torch.randn(5, 5)
    ds = [torch.randn(5, 5) + 2.0 for _ in range(3)]  # positively correlated
    out = merge.model_stock.merge_tensor("w", base.bfloat16(), [(base + d).bfloat16() for d in ds])
    assert out.dtype == torch.bfloat16
    flat = [d.reshape(-1).double() for d in ds]
    cos = sum(float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())) for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    t = 3 * cos / (2 * cos + 1)
    ref = base.double() + t * sum(ds).double() / 3
    torch.testing.assert_close(out.double(), ref, atol=0.1, rtol=0.02)
    out32 = merge.model_stock.merge_tensor("w", base, [base + d for d in ds])
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)


def test_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2, dtype=torch.float64)
    # row 0: identical deltas (cos 1 -> t 1); row 1: orthogonal (cos 0 -> t 0)
    m1 = torch.tensor([[1.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    m2 = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    out = merge.model_stock.merge_tensor("w", base, [m1, m2], filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64))


def test_needs_two_models():
    with pytest.raises(ValueError, match="at least 2"):
        merge.model_stock.merge_tensor("w", torch.zeros(3), [torch.ones(3)])
    with pytest.raises(ValueError, match="needs a base"):
        merge.model_stock.merge_tensor("w", None, [torch.ones(3), torch.ones(3)])



@pytest.mark.parametrize("filter_wise", [False, True])
def test_matches_mergekit(filter_wise):
    mk = pytest.importorskip("mergekit.merge_methods.model_stock")
    base_mod = pytest.importorskip("mergekit.merge_methods.base")
    if not hasattr(base_mod, "TensorGroup"):
        pytest.skip("this mergekit has no TensorGroup API")
    base = torch.randn(6, 5)
    ts = [base + torch.randn(6, 5) + 0.5 for _ in range(3)]
    group = base_mod.TensorGroup.from_tensors([base] + ts, base_index=0)
    ref = mk.model_stock_merge_method.implementation(group, filter_wise=filter_wise)
    torch.testing.assert_close(merge.model_stock.merge_tensor("w", base, ts, filter_wise=filter_wise), ref,
                               atol=1e-5, rtol=1e-5)


def test_owned_inputs_reuse_base_storage_only_inside_the_engine():
    from lowrank_ops.merge._common import owned_inputs

    base = torch.randn(4, 4)
    ts = [base + torch.randn(4, 4) + 1.0 for _ in range(2)]
    keep = base.clone()
    ref = merge.model_stock.merge_tensor("w", base, ts)
    assert torch.equal(base, keep)  # the state-dict API never writes into the caller's tensors
    with owned_inputs():
        out = merge.model_stock.merge_tensor("w", base, ts)
    assert out.data_ptr() == base.data_ptr()
    torch.testing.assert_close(out, ref)
