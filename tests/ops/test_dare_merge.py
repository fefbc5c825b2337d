"""dare_merge: counter-hash drop + rescale + linear/TIES vs the reference (identical masks), expectation, identity."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.ops import dare_merge
from lowrank_ops.reference.merge import dare_keep_mask_ref, dare_merge_ref
from utils import DEVICES, DTYPES, randn

SHAPES = [(1, 0), (1, 1), (3, 1), (1, 769), (4, 3001)]


def _close(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-2, equal_nan=True)
    else:
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        torch.testing.assert_close(got, ref, rtol=0, atol=tol * scale, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, shape):
    d = randn(*shape, dtype=dtype, device=device)
    w = torch.linspace(0.5, 1.5, shape[0], device=device)
    for density, seed, consensus, sm, norm in [(0.3, 0, "none", "sum", False), (0.7, 123, "ties", "sum", False),
                                               (0.5, 2**40 + 7, "ties", "count", True), (1.0, 5, "none", "sum", True),
                                               (0.0, 5, "ties", "sum", False)]:
        got = dare_merge(d, w, density, seed, consensus, sm, norm)
        ref = dare_merge_ref(d, w, density, seed, consensus, sm, norm)
        _close(got, ref, dtype)


def test_mask_is_exact_and_rescaled():
    # one model, weight 1, linear: output = mask ⊙ δ / density, mask = the reference hash exactly
    d = torch.randn(1, 5000, dtype=torch.float64)
    out = dare_merge(d, torch.ones(1, dtype=torch.float64), 0.25, 42)
    mask = dare_keep_mask_ref((1, 5000), 42, 0.25)[0]
    assert torch.equal(out != 0, mask)
    assert torch.equal(out[mask], d[0][mask] / 0.25)
    assert abs(mask.float().mean().item() - 0.25) < 0.02  # Bernoulli(0.25): 5000 draws, ~3.1 sd margin
    # different seeds and different models draw different masks
    out2 = dare_merge(d, torch.ones(1, dtype=torch.float64), 0.25, 43)
    assert not torch.equal(out2 != 0, mask)
    m2 = dare_keep_mask_ref((2, 5000), 42, 0.25)
    assert not torch.equal(m2[0], m2[1])


def test_hand_computed():
    d = torch.tensor([[2.0, -1.0], [4.0, 3.0]])
    w = torch.tensor([1.0, 0.5])
    m = dare_keep_mask_ref((2, 2), 7, 0.5)
    expect = (w[:, None] * torch.where(m, d / 0.5, 0)).sum(0)
    assert torch.equal(dare_merge(d, w, 0.5, 7), expect)
    # density 1: identity drop, linear sum Σ w δ; normalize divides by Σ w
    assert torch.equal(dare_merge(d, w, 1.0, 7), torch.tensor([4.0, 0.5]))
    assert torch.equal(dare_merge(d, w, 1.0, 7, normalize=True), torch.tensor([4.0, 0.5]) / 1.5)
    # density 1 + ties: c1 votes -1 + 1.5 = 0.5 -> +; only model 1 agrees -> 1.5 (÷ 0.5 if normalize -> 3)
    assert torch.equal(dare_merge(d, w, 1.0, 7, "ties"), torch.tensor([4.0, 1.5]))
    assert torch.equal(dare_merge(d, w, 1.0, 7, "ties", normalize=True), torch.tensor([4.0 / 1.5, 3.0]))


def test_expectation_is_linear_merge():
    # DARE keeps the expectation: mean over seeds → Σ w δ (Yu et al. 2024, Eq. 3)
    d = torch.randn(3, 400, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    outs = torch.stack([dare_merge(d, w, 0.5, s) for s in range(400)])
    target = (w[:, None] * d).sum(0)
    # per-coordinate sd of one draw ≤ sqrt(Σ w² δ²·(1-p)/p); the mean of 400 draws is 20x tighter
    sd = ((w[:, None] ** 2 * d ** 2).sum(0) * (0.5 / 0.5)).sqrt() / 20
    assert ((outs.mean(0) - target).abs() <= 5 * sd + 1e-12).all()


def test_deterministic_across_threads():
    d = torch.randn(3, 200_001)
    w = torch.ones(3)
    a = dare_merge(d, w, 0.4, 9, "ties")
    nt = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        b = dare_merge(d, w, 0.4, 9, "ties")
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(a, b)


def test_noncontiguous():
    d = torch.randn(301, 3).t()
    w = torch.ones(3)
    torch.testing.assert_close(dare_merge(d, w, 0.5, 1), dare_merge_ref(d.contiguous(), w, 0.5, 1), rtol=0, atol=1e-6)


def test_bad_inputs():
    d, w = torch.randn(2, 5), torch.ones(2)
    with pytest.raises(RuntimeError, match=r"dare_merge: `density` must be in \[0, 1\]"):
        dare_merge(d, w, -0.5, 0)
    with pytest.raises(RuntimeError, match="dare_merge: `consensus` must be \"none\" or \"ties\""):
        dare_merge(d, w, 0.5, 0, "magnitude")
    with pytest.raises(RuntimeError, match="dare_merge: `sign_method`"):
        dare_merge(d, w, 0.5, 0, "ties", "avg")
    with pytest.raises(RuntimeError, match=r"dare_merge: `weights` must be \(N,\) = \(2,\)"):
        dare_merge(d, torch.ones(3), 0.5, 0)


def test_opcheck():
    d, w = torch.randn(3, 37), torch.rand(3) + 0.5
    torch.library.opcheck(torch.ops.lowrank_ops.dare_merge, (d, w, 0.3, 11, "none", "sum", False))
    torch.library.opcheck(torch.ops.lowrank_ops.dare_merge, (d, w, 0.6, 11, "ties", "count", True))


def test_compile_fullgraph_inductor():
    d, w = torch.randn(3, 101), torch.tensor([1.0, 0.5, 2.0])

    def f(d, w):
        return dare_merge(d + 0.0, w, 0.5, 3, "ties") * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(d, w), f(d, w), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("consensus", ["none", "ties"])
def test_cuda_matches_cpu(consensus):
    # the counter hash makes the masks device-independent: same seed, same kept entries
    d = torch.randn(3, 100_003, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    cpu = dare_merge(d, w, 0.3, 77, consensus)
    gpu = dare_merge(d.cuda(), w.cuda(), 0.3, 77, consensus).cpu()
    assert torch.equal(cpu != 0, gpu != 0)
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-12)
