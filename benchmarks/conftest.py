"""Benchmark suite setup: size selection, device, and collection of ``bench_*.py`` files.

    pytest benchmarks --benchmark-disable      # smoke: every benchmark once at tiny sizes (< 1 min)
    pytest benchmarks --quick                  # the CPU subset (< 3 min on 2 cores)
    pytest benchmarks --bench-size gpu         # the GPU subset run by python/gpu_check.py
    pytest benchmarks --full                   # the whole matrix of DESIGN.md §7
    python -m lora_kernels bench [--quick]     # runs the suite and prints the report (table + plot)

Default size: ``tiny`` (so a plain ``pytest`` over ``testpaths`` stays quick); timing runs name their
size. Options are namespaced (``--bench-*``) apart from ``--quick``/``--full``/``--tiny``;
``tests/conftest.py`` defines no options, so running both directories in one pytest call works.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for ``import benchlib``

if importlib.util.find_spec("pytest_benchmark") is None:  # pytest-benchmark is in the [test] extra
    collect_ignore_glob = ["bench_*.py"]


def pytest_addoption(parser):
    group = parser.getgroup("lora_kernels benchmarks")
    group.addoption("--bench-size", choices=("tiny", "quick", "gpu", "full"), default=None,
                    help="benchmark matrix size (default: tiny, the smoke sizes)")
    group.addoption("--quick", dest="bench_size", action="store_const", const="quick", help="--bench-size quick")
    group.addoption("--full", dest="bench_size", action="store_const", const="full", help="--bench-size full")
    group.addoption("--tiny", dest="bench_size", action="store_const", const="tiny", help="--bench-size tiny")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None, help="device (default: cuda when available)")
    group.addoption("--bench-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="dtype (default: bfloat16 on CUDA, float32 on CPU)")
    group.addoption("--bench-deadline", type=float, default=None,
                    help="Unix time after which the remaining benchmarks are skipped (the JSON is still written)")
    group.addoption("--bench-compile", action="store_true", default=False,
                    help="also run the torch.compile peer on CPU (slow to compile)")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` as test modules (unless python_files already does)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):  # named on the command line: pytest's python plugin collects it
        return None
    if any(p.startswith("bench_") for p in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_runtest_setup(item):
    deadline = item.config.getoption("bench_deadline", default=None)
    if deadline and "bench" in item.keywords and time.time() > deadline:
        pytest.skip("the time budget of this run is spent (--bench-deadline)")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a lora_kernels benchmark")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the settings, and on CUDA the peak FLOP/s and bandwidth measured in this run."""
    import benchlib

    s = benchlib.settings(config)
    info = {"size": s.size, "device": s.device, "dtype": s.dtype_name, "backends": benchlib.lk_backends(s.device)}
    if s.device == "cuda":
        import torch

        from lora_kernels.bench import measure_peaks

        info["gpu"] = torch.cuda.get_device_name()
        try:
            info.update(measure_peaks("cuda", s.dtype))
        except Exception as e:  # the table then has no floor column; never lose the run for it
            info["peak_error"] = f"{type(e).__name__}: {e}"
    machine_info["lora_kernels"] = info
