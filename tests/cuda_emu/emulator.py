"""Build and call the host emulation of csrc/lora_linear.cu (see include/emu.h and harness.cpp).

Used by tests/test_cuda_emulated.py (the kernels against the float64 reference) and by the
mutation check (``python -m tests.cuda_emu.check``, run by tests/test_cuda_mutants.py).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

from lora_kernels.ops import cuda
from tests.utils import poisoned

EMU = Path(__file__).resolve().parent
ROOT = EMU.parents[1]
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


# AddressSanitizer + UndefinedBehaviorSanitizer build: catches what the checked loads do not see
# (stores out of bounds, shared-memory arrays indexed past their end: `__shared__` is `static` here,
# so a global-buffer-overflow; misaligned accesses, integer overflow). The python process must
# preload the runtimes: see sanitizer_env().
SANITIZE = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def sanitizer_env() -> dict:
    """Environment for a python subprocess that loads a sanitized build (python itself is not instrumented)."""
    libs = [subprocess.run([compiler(), f"-print-file-name={n}"], capture_output=True, text=True).stdout.strip()
            for n in ("libasan.so", "libubsan.so")]
    # detect_leaks=0: python's own allocations at exit are not ours to judge.
    return {"LD_PRELOAD": ":".join(libs), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def build(so: Path, csrc: Path = ROOT / "csrc", sanitize: bool = False, opt: str = "-O1") -> ctypes.CDLL:
    """Compile harness.cpp + ``csrc``'s kernels into ``so`` and load it. Raises with the compiler output.

    ``opt``: -O1 runs the kernels ~2x faster than -O0 but builds ~25 % slower; the mutation check
    (a build per mutant, ~1 s of cases) uses -O0."""
    cmd = [compiler(), "-std=c++20", opt, *(SANITIZE if sanitize else []), "-shared", "-fPIC",
           f"-I{EMU / 'include'}", f"-I{csrc}", str(EMU / "harness.cpp"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"the emulation harness does not compile:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    lib = ctypes.CDLL(str(so))
    lib.emu_forward.restype = ctypes.c_int
    lib.emu_fault.restype = ctypes.c_char_p
    lib.emu_set_cp_async_eager.argtypes = [ctypes.c_int]
    lib.emu_fused_choice.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.emu_forward.argtypes = [i32, p, p, i64, p, p, p, p, i64, i64, i64, i64, i64, p, p, p, i64, i32, p, f32, i32,
                                i32, i32, i32]
    lib.emu_load_sizes.restype = ctypes.c_uint
    lib.emu_load_sizes.argtypes = [ctypes.c_char_p]
    lib.emu_mma_count.restype = i64
    lib.emu_mma_count.argtypes = [i32]
    lib.emu_fused_max_rows.restype = i64
    lib.emu_fused_max_rows.argtypes = [i32, p, i64, p, i64, i64, i32]
    return lib


def load_sizes(lib, name: str) -> set[int]:
    """Byte widths of the global loads the last ``run`` made in buffer ``name`` ("x", "weight", "lora_a", ...)."""
    mask = lib.emu_load_sizes(name.encode())
    return {1 << b for b in range(32) if mask >> b & 1}


def mma_counts(lib) -> tuple[int, int]:
    """Warp-level MMAs of the last ``run``'s (shrink, fused) launches: > 0 iff it ran on tensor cores."""
    return lib.emu_mma_count(0), lib.emu_mma_count(1)


def fused_max_rows(lib, x, w, allow_mma=True) -> int:
    """The host's rule (csrc/lora_linear.cu fused_max_rows): rows up to which the forward runs fused."""
    return lib.emu_fused_max_rows(CODES[x.dtype], _ptr(x), x.shape[1], _ptr(w), w.stride(0), x.shape[1], int(allow_mma))


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def run(lib, x, w, bias, a, b, *, scale=1.0, scales=None, routing=None, allow_mma=True, accumulate=False, y=None,
        num_sms=132, binary_version=90, cp_async_eager=False):
    """One forward through the emulated kernels; returns (y, info code from the harness).

    ``x`` must be contiguous (as bindings.cpp makes it; it may start at any element), ``w`` may have a
    row stride above K (a column slice). ``accumulate``: False = fused, True = ``y`` holds x·Wᵀ + b,
    "auto" = as bindings.cpp (fused up to fused_max_rows, else the harness computes the base).
    ``cp_async_eager``: cp.async copies land at issue instead of at their wait (see include/emu.h).
    Fails (AssertionError) when a launcher failed or a load was out of bounds or misaligned.
    """
    m, k = x.shape
    assert x.is_contiguous() and w.stride(1) == 1 and all(t is None or t.is_contiguous() for t in (bias, a, b))
    n = w.shape[0]
    r = a.shape[-2]
    t = a.shape[0] if a.dim() == 3 else 1
    if y is None:
        y = poisoned((m, n), x.dtype, "cpu")
    tiles = order = ids = None
    num_tiles, tt = 0, 0
    if routing is not None:
        tiles, tt = cuda.tiles_of(routing, "cpu")
        order, ids, num_tiles = routing.order, routing.task_ids, tiles.shape[0]
    lib.emu_set_cp_async_eager(int(cp_async_eager))
    acc = -1 if accumulate == "auto" else int(accumulate)
    info = lib.emu_forward(CODES[x.dtype], _ptr(x), _ptr(w), w.stride(0), _ptr(bias), _ptr(a), _ptr(b), _ptr(y), m, n,
                           k, r, t, _ptr(ids), _ptr(order), _ptr(tiles), num_tiles, tt, _ptr(scales), float(scale),
                           int(allow_mma), acc, num_sms, binary_version)
    assert info != -2, f"the kernels made a bad global load: {lib.emu_fault().decode()}"
    assert info >= 0, f"a launcher failed (harness code {info})"
    return y, info


def inputs(m, k, n, r, dtype, t=None, seed=0):
    """randn inputs at unit-ish output scale: x [m, k], w [n, k], bias [n], a [(t,) r, k], b [(t,) n, r]."""
    g = torch.Generator().manual_seed(seed)
    lead = () if t is None else (t,)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    a = (torch.randn(*lead, r, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(*lead, n, r, generator=g).to(dtype)
    return x, w, bias, a, b


def placed(t, offset=0, row_pad=0):
    """A copy of 2-D ``t`` that starts ``offset`` elements into a fresh (64-byte aligned) buffer, rows
    ``row_pad`` elements apart beyond K. The pad and the lead are NaN: a kernel that reads them shows."""
    m, k = t.shape
    buf = torch.full((offset + m * (k + row_pad),), float("nan"), dtype=t.dtype)
    view = buf[offset:].view(m, k + row_pad)[:, :k]
    view.copy_(t)
    return view
