"""Test setup: without a GPU, Triton kernels run through the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set here,
before the tests import the kernels. Nothing probes the hardware at collection time beyond
``torch.cuda.is_available()``, which is cheap on CPU builds.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    # CI profile: derandomized and bounded, so the suite is reproducible and fits the CI budget.
    settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=100, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the [test] extra
    pass


@pytest.fixture
def device() -> str:
    """The device the op tests run on: CUDA when present, else CPU (Triton via the interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules of tiny ops: on a loaded 2-core box, OpenMP's intra-op threads spin against other
    processes (measured: a 3-row mixed forward 108 ms with 2 threads, 2.8 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
