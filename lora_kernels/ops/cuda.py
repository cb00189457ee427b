"""The CUDA C++ extension (``csrc/``): loader and wrappers. Not built yet."""

from __future__ import annotations

from .dispatch import BackendStatus


def status() -> BackendStatus:
    return BackendStatus(False, "the CUDA extension is not part of this build yet")
