"""ties_merge: fused TIES vs the stack-and-sort reference; hand-computed cases; errors; opcheck; compile."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.ops import ties_merge
from lowrank_ops.reference.merge import ties_merge_ref
from utils import DEVICES, DTYPES, randn

SHAPES = [(1, 0), (1, 1), (3, 1), (1, 769), (3, 769), (4, 70_001)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 0.0, torch.float16: 0.0}


def _close(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if dtype in (torch.bfloat16, torch.float16):
        # fp32 accumulation of the same few terms: at most one rounding step of the output dtype apart
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-3, equal_nan=True)
    else:
        scale = max(1.0, ref.abs().nan_to_num().max().item()) if ref.numel() else 1.0
        torch.testing.assert_close(got, ref, rtol=0, atol=TOL[dtype] * scale, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, shape):
    d = randn(*shape, dtype=dtype, device=device)
    w = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float32, device=device)
    for density, sign_method, normalize in [(0.2, "sum", True), (1.0, "count", True), (0.5, "sum", False),
                                            (0.0, "sum", True), (0.3, "count", False)]:
        got = ties_merge(d, w, density, sign_method, normalize)
        ref = ties_merge_ref(d, w, density, sign_method, normalize)
        _close(got, ref, dtype)


def test_hand_computed():
    # 3 models, 4 coordinates, density 0.5 -> each keeps its 2 largest |δ|.
    d = torch.tensor([[3.0, -1.0, 0.5, -4.0],
                      [-2.0, 2.0, 1.0, 0.1],
                      [1.0, -3.0, -5.0, 0.2]])
    # trimmed: m0 [3, 0, 0, -4], m1 [-2, 2, 0, 0], m2 [0, -3, -5, 0]
    # sums (w=1): [1, -1, -5, -4] -> signs [+, -, -, -]
    # agreeing: c0 {m0:3} -> 3;  c1 {m2:-3} -> -3;  c2 {m2:-5} -> -5;  c3 {m0:-4} -> -4
    w = torch.ones(3)
    assert torch.equal(ties_merge(d, w, 0.5), torch.tensor([3.0, -3.0, -5.0, -4.0]))
    # weights enter the election and the mean: w = [1, 2, 1]
    # weighted trimmed: m0 [3,0,0,-4], m1 [-4,4,0,0], m2 [0,-3,-5,0]; sums [-1, 1, -5, -4] -> [-, +, -, -]
    # c0 {m1: -4 / 2} = -2; c1 {m1: 4 / 2} = 2; c2 -5; c3 -4
    w2 = torch.tensor([1.0, 2.0, 1.0])
    assert torch.equal(ties_merge(d, w2, 0.5), torch.tensor([-2.0, 2.0, -5.0, -4.0]))
    assert torch.equal(ties_merge(d, w2, 0.5, normalize=False), torch.tensor([-4.0, 4.0, -5.0, -4.0]))
    # count: signs at c0 over trimmed = [+, -, 0] -> 0 -> +1 elected; mean over {m0} = 3
    assert ties_merge(d, w, 0.5, "count")[0].item() == 3.0
    # density 1, all same sign: the plain weighted mean
    e = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(ties_merge(e, torch.tensor([1.0, 3.0]), 1.0), (e[0] + 3 * e[1]) / 4)


def test_single_model_is_trim():
    d = torch.randn(1, 1000, dtype=torch.float64)
    out = ties_merge(d, torch.ones(1, dtype=torch.float64), 0.1)
    assert int((out != 0).sum()) == 100
    kept = out != 0
    assert torch.equal(out[kept], d[0][kept]) and d[0][kept].abs().min() >= d[0][~kept].abs().max()


def test_noncontiguous_and_weights_dtype():
    d = torch.randn(769, 3, dtype=torch.float64).t()
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float32)
    torch.testing.assert_close(ties_merge(d, w, 0.3), ties_merge_ref(d.contiguous(), w, 0.3), rtol=0, atol=1e-12)


def test_nan_policy():
    d = torch.tensor([[float("nan"), 1.0, 2.0], [1.0, 1.0, 2.0]])
    out = ties_merge(d, torch.ones(2), 1.0)
    assert torch.isnan(out[0]) and out[1:].tolist() == [1.0, 2.0]
    assert torch.isnan(ties_merge_ref(d, torch.ones(2), 1.0)[0])


def test_multithreaded_large():
    d = torch.randn(3, 300_001)
    w = torch.tensor([1.0, 0.7, 1.3])
    nt = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = ties_merge(d, w, 0.2)
    finally:
        torch.set_num_threads(nt)
    torch.testing.assert_close(got, ties_merge_ref(d, w, 0.2), rtol=0, atol=1e-6)


def test_bad_inputs():
    d, w = torch.randn(3, 10), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"ties_merge: `deltas` must be \(N, P\)"):
        ties_merge(torch.randn(10), torch.ones(1), 0.5)
    with pytest.raises(RuntimeError, match=r"ties_merge: `weights` must be \(N,\) = \(3,\)"):
        ties_merge(d, torch.ones(2), 0.5)
    with pytest.raises(RuntimeError, match=r"ties_merge: `density` must be in \[0, 1\]"):
        ties_merge(d, w, 1.2)
    with pytest.raises(RuntimeError, match="ties_merge: `sign_method` must be \"sum\" or \"count\""):
        ties_merge(d, w, 0.5, "mean")
    with pytest.raises(RuntimeError, match="ties_merge: `deltas` must be float"):
        ties_merge(d.long(), w, 0.5)


def test_opcheck():
    d, w = torch.randn(3, 37), torch.rand(3) + 0.5
    torch.library.opcheck(torch.ops.lowrank_ops.ties_merge, (d, w, 0.3, "sum", True))
    torch.library.opcheck(torch.ops.lowrank_ops.ties_merge, (d.double(), w, 0.3, "count", False))


def test_compile_fullgraph():
    d, w = torch.randn(3, 101), torch.tensor([1.0, 0.5, 2.0])

    def f(d, w):
        return ties_merge(d * 1.0, w, 0.3) * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(d, w)
    torch.testing.assert_close(got, f(d, w), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    d = randn(4, 100_003, dtype=dtype, device="cpu")
    w = torch.tensor([1.0, 0.5, 2.0, 0.7])
    cpu = ties_merge(d, w, 0.2)
    gpu = ties_merge(d.cuda(), w.cuda(), 0.2).cpu()
    assert torch.equal(cpu != 0, gpu != 0)  # same thresholds (radix select on the same keys), same election
    _close(gpu, cpu, dtype)


def test_rows_select_together_one_bracket_misses():
    # All N thresholds come from one streaming pass; row 1's deterministic sample
    # (positions mix64(j + 1) % P, j < 2^14) is made unrepresentative so only its
    # bracket misses and falls back exactly, while rows 0 and 2 finish from the band.
    from lowrank_ops.reference.merge import _mix64

    P = 70_001
    g = torch.Generator().manual_seed(4)
    d = torch.randn(3, P, generator=g)
    pos = torch.tensor(sorted({_mix64(j + 1) % P for j in range(1 << 14)}))
    d[1, pos] = 1e3 + torch.rand(len(pos), generator=g)
    w = torch.tensor([1.0, 0.6, 1.4])
    for density in (0.05, 0.5):
        torch.testing.assert_close(ties_merge(d, w, density), ties_merge_ref(d, w, density), rtol=0, atol=1e-6)
        torch.testing.assert_close(ties_merge(d.double(), w, density), ties_merge_ref(d.double(), w, density),
                                   rtol=0, atol=1e-12)
