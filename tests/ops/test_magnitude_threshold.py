"""magnitude_threshold: k-th largest |x| by selection vs the sort-based reference (exact)."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.ops import magnitude_threshold
from lowrank_ops.reference.merge import magnitude_threshold_ref, topk_count
from utils import DEVICES, DTYPES, randn

SIZES = [0, 1, 2, 7, 769, 70_001]  # 70_001 > 4·2^14 takes the sampled-bracket path
DENSITIES = [0.0, 1e-6, 0.2, 0.5, 0.999, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(device, dtype, n):
    x = randn(n, dtype=dtype, device=device)
    for density in DENSITIES:
        got = magnitude_threshold(x, density)
        ref = magnitude_threshold_ref(x, density)
        assert got.shape == () and got.dtype == dtype
        assert torch.equal(got, ref) or (torch.isinf(got) and torch.isinf(ref)), (n, density, got, ref)
        k = topk_count(density, n)
        if 0 < k:
            # exactly k kept for distinct magnitudes (random normal draws; bf16/fp16 may tie)
            kept = int((x.abs() >= got).sum())
            assert kept >= k and (dtype in (torch.bfloat16, torch.float16) or kept == k)


def test_k_rule_matches_mergekit():
    assert [topk_count(d, 10) for d in (0.0, 0.05, 0.2, 0.25, 0.99, 1.0)] == [0, 1, 2, 2, 9, 10]
    x = torch.arange(1.0, 11.0)
    assert magnitude_threshold(x, 0.05).item() == 10.0  # positive density keeps at least one
    assert magnitude_threshold(x, 0.25).item() == 9.0   # floor(2.5) = 2
    assert magnitude_threshold(x, 1.0).item() == 1.0    # density 1: min |x|
    assert magnitude_threshold(x, 0.0).item() == float("inf")


@pytest.mark.parametrize("n", [769, 200_003])
def test_ties_heavy_and_multithreaded(n):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-5, 6, (n,), generator=g).float()  # 11 values: heavy ties at the threshold
    x[::7] = -x[::7]
    nt = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for density in (0.1, 0.3, 0.75):
            assert torch.equal(magnitude_threshold(x, density), magnitude_threshold_ref(x, density))
    finally:
        torch.set_num_threads(nt)


def test_noncontiguous_and_batched_shape():
    x = randn(64, 33, dtype=torch.float32, device="cpu")
    xt = x.t()
    assert torch.equal(magnitude_threshold(xt, 0.3), magnitude_threshold_ref(xt.contiguous(), 0.3))
    assert torch.equal(magnitude_threshold(x[:, ::2], 0.3), magnitude_threshold_ref(x[:, ::2].contiguous(), 0.3))


def test_nan_ranks_largest():
    x = torch.tensor([1.0, float("nan"), -3.0, 2.0, float("nan")])
    assert torch.isnan(magnitude_threshold(x, 0.4))  # k = 2: both NaNs
    assert magnitude_threshold(x, 0.6).item() == 3.0
    assert magnitude_threshold_ref(x, 0.6).item() == 3.0


def test_bad_inputs():
    with pytest.raises(RuntimeError, match=r"magnitude_threshold: `density` must be in \[0, 1\]"):
        magnitude_threshold(torch.ones(3), 1.5)
    with pytest.raises(RuntimeError, match="magnitude_threshold: `density`"):
        magnitude_threshold(torch.ones(3), -0.1)
    with pytest.raises(RuntimeError, match="magnitude_threshold: `x` must be float"):
        magnitude_threshold(torch.ones(3, dtype=torch.int64), 0.5)


def test_opcheck_and_not_differentiable():
    x = torch.randn(50)
    torch.library.opcheck(torch.ops.lowrank_ops.magnitude_threshold, (x, 0.3))
    xr = x.clone().requires_grad_()
    out = magnitude_threshold(xr, 0.3)
    with pytest.raises(RuntimeError, match="magnitude_threshold is not differentiable"):
        out.backward()
    with torch.no_grad():
        assert not magnitude_threshold(xr, 0.3).requires_grad


def test_sample_bracket_miss_falls_back_exactly():
    # Make the kernel's deterministic sample (positions mix64(j + 1) % n, j < 2^14) unrepresentative:
    # every sampled entry is huge, so the bracket lands among the huge values and misses the
    # true k-th magnitude; the exact fallback must still return it.
    from lowrank_ops.reference.merge import _mix64

    n = 70_001
    x = torch.randn(n, dtype=torch.float64)
    pos = torch.tensor(sorted({_mix64(j + 1) % n for j in range(1 << 14)}))
    x[pos] = 1e6 + torch.rand(len(pos), dtype=torch.float64)
    for density in (0.05, 0.5, 0.9):
        assert torch.equal(magnitude_threshold(x, density), magnitude_threshold_ref(x, density))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_with_specials_vector_band_scan(dtype):
    # n > 4·2^14 and n % 8 != 0: the sampled-bracket path, whose fp32 band scan runs 8 keys per step
    # (AVX2) plus a scalar tail.  NaNs with several payloads (one canonical key), ±inf, ±0 and
    # subnormals must rank exactly as in the reference, with the threshold inside and at the edges.
    g = torch.Generator().manual_seed(3)
    n = 70_003
    x = torch.randn(n, generator=g, dtype=dtype)
    idx = torch.randperm(n, generator=g)
    x[idx[:40]] = float("inf")
    x[idx[40:80]] = float("-inf")
    x[idx[80:120]] = 0.0
    x[idx[120:160]] = -0.0
    x[idx[160:200]] = torch.finfo(dtype).tiny / 4
    if dtype == torch.float32:
        payloads = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, -1], dtype=torch.int32)  # -1: sign-set NaN
        x[idx[200:204]] = payloads.view(torch.float32)
    else:
        x[idx[200:204]] = float("nan")
    assert int(torch.isnan(x).sum()) == 4
    for density in (1e-5, 4 / n, 50 / n, 1e-3, 0.2, 0.5, 0.997, 1.0):
        got, ref = magnitude_threshold(x, density), magnitude_threshold_ref(x, density)
        assert torch.equal(got, ref) or (torch.isnan(got) and torch.isnan(ref)), (density, got, ref)
