"""Finding the CUDA toolkit, shared by ``setup.py`` and the JIT loader (:mod:`lora_kernels.ops.cuda`).

Plain standard library on purpose: ``setup.py`` loads this file by path (no ``import torch``, no
package ``__init__``), so the install-time build and the first-use JIT build agree on the toolkit.
"""

from __future__ import annotations

import os
import re
import shutil

# Architectures built when nothing says which: Ampere (sm_80: mma.sync) and Hopper (sm_90:
# mma.sync + programmatic dependent launch). Used when no GPU is visible at build time (docker, CI),
# where torch would otherwise find no architecture and fail.
DEFAULT_ARCH_LIST = "8.0;9.0"


def cuda_home() -> str | None:
    """The CUDA toolkit root: ``bin/nvcc`` and ``include/cuda_runtime.h`` under one folder, or None.

    Like torch.utils.cpp_extension (CUDA_HOME / CUDA_PATH, then nvcc on PATH, then
    /usr/local/cuda), except that a candidate must really hold the toolkit (torch takes
    ``/usr/local`` for an nvcc in ``/usr/local/bin`` and then fails on ``cuda_runtime.h``), and an
    nvcc on PATH that is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc) is followed to the toolkit.
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    found = shutil.which("nvcc")
    if found:
        cands += [os.path.dirname(os.path.dirname(found)), os.path.dirname(os.path.dirname(os.path.realpath(found)))]
        try:  # a wrapper script: the toolkit path it runs
            with open(found, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                cands += [os.path.dirname(os.path.dirname(p.decode())) for p in re.findall(rb"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    cands.append("/usr/local/cuda")
    for home in cands:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None
