"""Backend selection: ``auto`` | ``torch`` | ``triton`` | ``cuda``.

``auto`` picks, per call and from the tensors' device: the CUDA extension for inference (no grad
needed) on CUDA tensors once it is built (by setup.py, or by a first ``backend="cuda"`` call or
``lora_kernels.ops.cuda.load()``: ``auto`` never waits for a JIT build), then Triton on CUDA tensors, then the torch reference. All of
them compute the same math; ``auto`` never changes it. A backend asked for explicitly that cannot
run raises with the reason.

Nothing here imports Triton or loads the extension at import time: the probes run on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, NamedTuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

_default = os.environ.get("LORA_KERNELS_BACKEND", "auto")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("lora_kernels_backend", default=None)


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``LORA_KERNELS_BACKEND`` sets it at import)."""
    global _default
    _default = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` inside the ``with`` block (per thread / per async task)."""
    token = _override.set(_validate(name))
    try:
        yield
    finally:
        _override.reset(token)


def current_backend() -> str:
    if torch.compiler.is_compiling():
        return _default  # context variables are not traceable; compiled code uses the default
    return _override.get() or _default


def triton_interpreter() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "the triton package is not installed (pip install triton, Linux only)")
    if triton_interpreter():
        return BackendStatus(True, "Triton interpreter (TRITON_INTERPRET=1): runs on CPU tensors, slowly")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA GPU visible to torch (Triton kernels need one, or TRITON_INTERPRET=1)")
    return BackendStatus(True, f"Triton on {torch.cuda.get_device_name()}")


def _cuda_status() -> BackendStatus:
    from . import cuda

    return cuda.status()


def _cuda_built() -> bool:
    from . import cuda

    return cuda.built()


def available_backends() -> dict[str, BackendStatus]:
    """Each backend and whether it can run here, with the reason when it cannot."""
    return {
        "torch": BackendStatus(True, "pure-torch reference (any device)"),
        "triton": _triton_status(),
        "cuda": _cuda_status(),
    }


def resolve(backend: str | None, x: torch.Tensor, needs_grad: bool) -> str:
    """The backend that runs a call on ``x``: an explicit one is checked, ``auto`` picks."""
    name = _validate(backend or current_backend())
    if name == "auto":
        if x.device.type == "cuda":
            if not needs_grad and _cuda_status().available and _cuda_built():
                return "cuda"
            if _triton_status().available:
                return "triton"
        return "torch"
    if name == "triton":
        status = _triton_status()
        if not status.available:
            raise RuntimeError(f"backend 'triton' cannot run: {status.reason}")
        if x.device.type != "cuda" and not triton_interpreter():
            raise RuntimeError(f"backend 'triton' needs CUDA tensors (got {x.device}) or TRITON_INTERPRET=1")
    elif name == "cuda":
        status = _cuda_status()
        if not status.available:
            raise RuntimeError(f"backend 'cuda' cannot run: {status.reason}")
        if x.device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors, got {x.device}")
    return name
