"""Shared test parameters and tolerances (STYLE.md, Tests).

Import as ``from utils import ...``; ``tests/conftest.py`` puts this folder on ``sys.path``.

Tolerance rule for matmul-like ops (flash-attention's): the error of our kernel
against an fp64 reference must be at most ``factor`` times the error of plain
PyTorch computing the same thing in the same dtype (the reference run in that
dtype), plus a small absolute floor.  fp64 and fp32 are also held to a direct,
tight bound against the fp64 reference.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pytest
import torch
from torch import Tensor

import lowrank_ops  # noqa: F401  (loads the library; registers fakes and autograd)

# --------------------------------------------------------------------------- parameters

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def has_cuda_kernel(op: str = "lowrank_ops::lowrank_linear") -> bool:
    """A GPU is visible and this build registered a CUDA kernel for ``op``."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


HAS_CUDA = has_cuda_kernel()

#: Skip marker for tests that only make sense on a GPU (e.g. CUDA vs CPU agreement).
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the lowrank_ops CUDA kernels")


def cuda_param(*values, id: Optional[str] = None):
    """A parametrize entry that carries the ``cuda`` marker (select with ``-m cuda``) and skips without a GPU."""
    return pytest.param(*values, id=id, marks=[pytest.mark.cuda, requires_cuda])


#: CPU always; CUDA only when it can run (so CPU-only runs collect no CUDA cases).
DEVICES = [pytest.param("cpu", id="cpu")] + ([cuda_param("cuda", id="cuda")] if HAS_CUDA else [])


# --------------------------------------------------------------------------- tolerances

#: Absolute floor added to the rule, in units of the output's scale (``max |ref_fp64|``).
#: It only matters where PyTorch's own error is ~0 (e.g. tiny reductions that round
#: exactly), where ours may still differ by reordering:
#:   float64  1e-12  (fp64 sums of a few hundred terms in another order; ~5e3 ulp, still tight)
#:   float32  1e-6   (~8 ulp)
#:   bfloat16 2**-7  (one bf16 ulp at the output's scale)
#:   float16  2**-10 (one fp16 ulp at the output's scale)
ATOL_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}

#: Direct bound against the fp64 reference for the precise dtypes, relative to the output's scale.
DIRECT_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _max_abs_err(a: Tensor, ref: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    # NaN anywhere makes the max NaN and every comparison below False.
    return (a.detach().to(torch.float64) - ref).abs().max().item()


def output_scale(ref_fp64: Tensor) -> float:
    """``max |ref|``, or 1 for an all-zero / empty reference (then the floor is absolute)."""
    if ref_fp64.numel() == 0:
        return 1.0
    s = ref_fp64.abs().max().item()
    return s if s > 0 else 1.0


def assert_close_to_ref(
    ours: Tensor,
    torch_same_dtype: Tensor,
    ref_fp64: Tensor,
    factor: float = 2.0,
    atol_floor: Optional[float] = None,
    name: str = "output",
) -> None:
    """Assert ``err(ours) <= factor * err(torch_same_dtype) + floor``, errors vs ``ref_fp64``.

    Args:
        ours: our op's result in the tested dtype.
        torch_same_dtype: the PyTorch reference computed in the same dtype and device.
        ref_fp64: the PyTorch reference computed in float64 from the same (rounded) inputs.
        factor: allowed multiple of PyTorch's own error (2 as in flash-attention's tests).
        atol_floor: floor in units of ``max |ref_fp64|``; defaults to ``ATOL_FLOOR[dtype]``.
        name: what is compared, for the failure message.
    """
    dtype = torch_same_dtype.dtype
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype}, expected {dtype}"
    assert ours.device == torch_same_dtype.device, f"{name}: device {ours.device}, expected {torch_same_dtype.device}"
    assert ours.shape == ref_fp64.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref_fp64.shape)}"
    ref_fp64 = ref_fp64.detach().to(device=ours.device, dtype=torch.float64)
    scale = output_scale(ref_fp64)
    floor = (ATOL_FLOOR[dtype] if atol_floor is None else atol_floor) * scale
    err_ours = _max_abs_err(ours, ref_fp64)
    err_torch = _max_abs_err(torch_same_dtype, ref_fp64)
    if not math.isfinite(err_torch) and bool(torch.isfinite(ref_fp64).all()):
        # PyTorch's own reduced-precision result is non-finite where the fp64 one is not (seen: a bf16
        # matmul of a column slice reading the NaN padding beyond it, with oneDNN on Intel CPUs), so it
        # gives no error scale: hold ours to the floor alone.
        err_torch = 0.0
    bound = factor * err_torch + floor
    assert err_ours <= bound, (
        f"{name} ({dtype}): max error vs fp64 reference {err_ours:.3e} > {factor} x PyTorch's "
        f"{err_torch:.3e} + floor {floor:.3e} (output scale {scale:.3e})"
    )
    if dtype in DIRECT_RTOL:
        direct = DIRECT_RTOL[dtype] * scale
        assert err_ours <= direct, (
            f"{name} ({dtype}): max error vs fp64 reference {err_ours:.3e} > {DIRECT_RTOL[dtype]} x "
            f"output scale {scale:.3e}"
        )


def assert_grads_close_to_ref(
    names: Sequence[str],
    ours: Sequence[Optional[Tensor]],
    torch_same_dtype: Sequence[Optional[Tensor]],
    ref_fp64: Sequence[Optional[Tensor]],
    **kwargs,
) -> None:
    """``assert_close_to_ref`` per gradient; a gradient missing on one side only is a failure."""
    for n, a, b, r in zip(names, ours, torch_same_dtype, ref_fp64, strict=True):
        assert (a is None) == (r is None) == (b is None), f"grad of {n}: ours {a is None=}, ref {r is None=}"
        if a is not None:
            assert_close_to_ref(a, b, r, name=f"grad of {n}", **kwargs)


# --------------------------------------------------------------------------- inputs


def randn(*shape: int, dtype: torch.dtype, device: str, std: float = 1.0, generator=None) -> Tensor:
    """Standard normal drawn in fp64 on the CPU (device-independent values), then cast."""
    t = torch.randn(*shape, dtype=torch.float64, generator=generator) * std
    return t.to(device=device, dtype=dtype)


def to_fp64(t: Optional[Tensor]) -> Optional[Tensor]:
    """Detached fp64 copy that keeps the values the tested dtype rounded to."""
    return None if t is None else t.detach().to(torch.float64)
