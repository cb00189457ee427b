"""Host-path overhead of one op call (the CPU-measurable part of a decode step).

At decode sizes a GPU kernel takes a few microseconds, so what the host spends per call (argument
checks, backend resolution, custom-op dispatch, autograd bookkeeping) is a visible share of a
layer's time. These benchmarks time that path on tiny CPU tensors, where the math is negligible:
``aten`` is a bare ``F.linear`` (the floor: one aten op), the others are the public ops on the
torch backend, with and without autograd, and the checks alone. On a GPU machine the Triton
custom-op path is timed too (it launches kernels, so it is skipped here under the interpreter).
``triton-host`` / ``triton-host-autograd`` time the Triton single-task call on any machine with
its kernel launches replaced by no-ops: the check, the custom-op dispatch, the autograd node,
the launcher's config choice and its output allocations -- everything the host does per call
except Triton's own launch (argument binding and the driver call, ~20-40 us in Triton 3.x per
launch by its own benchmarks; a GPU run measures it in ``triton``).

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
HOST_CASES = ["triton-host", "triton-host-autograd"]


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


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("case", HOST_CASES)
def test_triton_host_path(benchmark, monkeypatch, case):
    pytest.importorskip("triton")
    from lora_kernels.ops.triton import lora_linear as tl_mod

    for name in ("_lora_fused_kernel", "_shrink_kernel", "_lora_term_kernel", "_dropout_kernel"):
        monkeypatch.setattr(tl_mod, name, _NoLaunch())
    x, w, b, a, bb = _inputs("cpu", grad=case.endswith("autograd"))
    y = benchmark(tl_mod.lora_linear, x, w, b, a, bb, 0.5)
    assert y.shape == (1, N) and y.requires_grad == case.endswith("autograd")  # values: none (no kernel ran)
