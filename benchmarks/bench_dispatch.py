"""Host-path overhead of one op call (the CPU-measurable part of a decode step).

At decode sizes a GPU kernel takes a few microseconds, so what the host spends per call (argument
checks, backend resolution, custom-op dispatch, autograd bookkeeping) is a visible share of a
layer's time. These benchmarks time that path on tiny CPU tensors, where the math is negligible:
``aten`` is a bare ``F.linear`` (the floor: one aten op), the others are the public ops on the
torch backend, with and without autograd, and the checks alone. On a GPU machine the Triton
custom-op path is timed too (it launches kernels, so it is skipped here under the interpreter).

    pytest benchmarks/bench_dispatch.py --benchmark-only    # timings
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels.ops.checks import check_lora_linear, check_lora_linear_mixed
from lora_kernels.ops.routing import Routing

K = N = 64
R = 8


def _inputs(device="cpu", grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, K, generator=g).to(device)
    w = torch.randn(N, K, generator=g).to(device)
    b = torch.randn(N, generator=g).to(device)
    a = torch.randn(R, K, generator=g).to(device).requires_grad_(grad)
    bb = torch.randn(N, R, generator=g).to(device).requires_grad_(grad)
    return x, w, b, a, bb


def _check_result(y, x, w, b, a, bb):
    ref = lk.ops.reference.lora_linear(x.double(), w.double(), b.double(), a.detach().double(), bb.detach().double(), 0.5)
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-5)


CASES = ["aten", "checks", "torch", "torch-autograd", "mixed-torch", "triton"]


@pytest.mark.parametrize("case", CASES)
def test_dispatch_overhead(benchmark, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grad = case == "torch-autograd"
    x, w, b, a, bb = _inputs(device, grad)
    if case == "aten":
        benchmark(F.linear, x, w, b)
        return
    if case == "checks":
        benchmark(check_lora_linear, x, w, b, a, bb, 0.0)
        return
    if case.startswith("mixed"):
        a3, b3, scales = a.detach()[None].repeat(4, 1, 1), bb.detach()[None].repeat(4, 1, 1), torch.full((4,), 0.5)
        routing = Routing(torch.tensor([2]), 4)
        check_lora_linear_mixed(x, w, b, a3, b3, scales, 1)
        with lk.ops.use_backend("torch"):
            y = benchmark(lk.ops.lora_linear_mixed, x, w, b, a3, b3, scales, routing)
        _check_result(y, x, w, b, a, bb)
        return
    backend = "torch" if case.startswith("torch") else "triton"
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton call path is timed on a GPU (the interpreter would time itself)")
    with lk.ops.use_backend(backend):
        y = benchmark(lk.ops.lora_linear, x, w, b, a, bb, 0.5)
    _check_result(y, x, w, b, a, bb)
