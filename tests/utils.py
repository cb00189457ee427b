"""Shared test helpers: per-dtype tolerances against the float64 oracle, poisoned buffers."""

from __future__ import annotations

import torch

# Relative error ||out - ref|| / ||ref|| allowed per dtype of the computation. fp32 accumulate in
# every backend; the bound covers the rounding of inputs and outputs to the dtype (bf16 has 8 bits
# of mantissa: 2^-8 ~ 4e-3 per element, far less in the norm).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Elementwise: every element must satisfy |out - ref| <= atol * rms(ref) + rtol * |ref|. The norm
# alone lets a few wrong elements through (one zeroed element of an 8 x 4096 bf16 output moves the
# norm by ~0.6%, under REL_TOL). Why these numbers: an element is a sum of a few rounded terms
# (base x·Wᵀ, bias, the LoRA term, each of magnitude up to a few rms), each rounded once to the dtype
# (half an ulp: bf16 2^-9 ~ 2e-3, fp16 2^-12 ~ 2.4e-4 relative), plus the output's own rounding;
# atol covers the terms' roundings, scaled by the output's rms (so elements near zero after
# cancellation are judged against the size of what cancelled, not their own size), rtol the output's.
ELEM_TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 2e-3),
            torch.bfloat16: (3e-2, 1e-2)}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    """``out`` (any dtype) matches the float64 ``ref`` within ``dtype``'s tolerance, in norm and elementwise.

    Fails with the relative error, the number of elements outside the elementwise tolerance and the
    worst one, so a failure says how bad it is and where, not just that it is bad.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all() or not torch.isfinite(ref64).all(), (
        f"{what}: {int((~torch.isfinite(out64)).sum())}/{out.numel()} non-finite values where the reference is finite")
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    rel = err / denom if denom > 0 else err
    atol, rtol = ELEM_TOL[dtype]
    rms = denom / max(ref64.numel(), 1) ** 0.5
    diff = (out64 - ref64).abs()
    bound = atol * (rms if rms > 0 else 1.0) + rtol * ref64.abs()
    bad = ~(diff <= bound)  # NaN counts as bad
    nbad = int(bad.sum())
    worst = ""
    if nbad:
        i = int(torch.argmax(torch.where(bad, diff - bound, torch.zeros_like(diff)).flatten().nan_to_num(float("inf"))))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), ref64.shape))
        worst = f"; worst at {idx}: {out64.flatten()[i].item():.6g} vs {ref64.flatten()[i].item():.6g}"
    assert rel <= REL_TOL[dtype] and nbad == 0, (
        f"{what}: relative error {rel:.3e} (limit {REL_TOL[dtype]:.1e}) for {dtype}; {nbad}/{out.numel()} elements "
        f"outside |out - ref| <= {atol:g}·rms(ref) + {rtol:g}·|ref|{worst}")


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A buffer full of NaN: any element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
