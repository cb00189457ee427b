"""Shared test helpers: per-dtype tolerances against the float64 oracle, poisoned buffers."""

from __future__ import annotations

import torch

# Relative error ||out - ref|| / ||ref|| allowed per dtype of the computation. fp32 accumulate in
# every backend; the bound covers the rounding of inputs and outputs to the dtype (bf16 has 8 bits
# of mantissa: 2^-8 ~ 4e-3 per element, far less in the norm).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Elementwise check used to count mismatches for the report.
ELEM_TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    """``out`` (any dtype) matches the float64 ``ref`` within ``dtype``'s tolerance.

    Fails with the relative error and the number of elements outside the elementwise tolerance,
    so a failure says how bad it is, not just that it is bad.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all() or not torch.isfinite(ref64).all(), f"{what}: non-finite values where the reference is finite"
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    rel = err / denom if denom > 0 else err
    atol, rtol = ELEM_TOL[dtype]
    bad = ~torch.isclose(out64, ref64, rtol=rtol, atol=atol * max(ref64.abs().max().item(), 1.0))
    assert rel <= REL_TOL[dtype], (f"{what}: relative error {rel:.3e} > {REL_TOL[dtype]:.1e} for {dtype}; "
                                   f"{int(bad.sum())}/{out.numel()} elements outside tolerance")


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A buffer full of NaN: any element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
