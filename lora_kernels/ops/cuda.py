"""The CUDA C++ extension (``csrc/``): loader, status and op wrappers.

Two inference ops, registered from C++ with ``TORCH_LIBRARY_FRAGMENT(lora_kernels, ...)``:

``torch.ops.lora_kernels.cuda_lora_linear``        fused single-task forward
``torch.ops.lora_kernels.cuda_lora_linear_mixed``  mixed-task forward (BGMV / segmented)

The wrappers :func:`lora_linear` and :func:`lora_linear_mixed` have the reference's signatures.

Loading. Importing :mod:`lora_kernels` (or this module) never builds or loads anything. The first
call loads the extension built by ``setup.py`` (``lora_kernels/_cuda*.so``) or, when there is
none, JIT-builds ``csrc/`` with ninja + nvcc through ``torch.utils.cpp_extension.load`` into the
torch extensions cache (``~/.cache/torch_extensions``, or ``TORCH_EXTENSIONS_DIR``), printing one
line; later processes reuse the cached build. :func:`status` says, cheaply and without building,
whether the backend can run here and why not.

Autograd. The kernels are forward-only (inference; decode is where a C++ launch pays off). When
a call needs a backward (grad mode on and an input requires grad), the forward still runs the CUDA
op and the backward recomputes the reference forward (:mod:`lora_kernels.ops.reference`) under
autograd and differentiates it: exact reference gradients, at the cost of one extra forward.
Training should use the Triton backend (``auto`` never picks ``cuda`` when a backward is needed).
``dropout_p > 0`` (training only) and float64 inputs run the reference path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .checks import check_lora_linear, check_lora_linear_mixed
from .cuda_toolkit import DEFAULT_ARCH_LIST, cuda_home
from .dispatch import BackendStatus
from .routing import Routing

__all__ = ["status", "build_path", "load", "lora_linear", "lora_linear_mixed", "csrc_dir", "EXT_NAME"]

EXT_NAME = "lora_kernels_cuda"      # JIT build name
PREBUILT = "lora_kernels._cuda"     # setup.py's extension module
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_loaded: str | None = None          # how it was loaded, once loaded
_failure: str | None = None         # why loading/building failed, once it has
_status: BackendStatus | None = None


def csrc_dir() -> Path | None:
    """The ``csrc/`` sources: shipped inside the package, or the source tree's (editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here.parents[1] / "csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    return None


def _prebuilt() -> str | None:
    try:
        spec = importlib.util.find_spec(PREBUILT)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def _find_nvcc() -> str | None:
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def _has_ninja() -> bool:
    return shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None


def _compute_status() -> BackendStatus:
    if _failure is not None:
        return BackendStatus(False, f"the CUDA extension failed to build or load: {_failure}")
    if torch.version.cuda is None:
        return BackendStatus(False, f"this torch ({torch.__version__}) is a CPU-only build; the CUDA extension needs a CUDA build of torch")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA GPU visible to torch")
    if _loaded is not None:
        return BackendStatus(True, f"CUDA extension loaded ({_loaded})")
    if _prebuilt() is not None:
        return BackendStatus(True, "CUDA extension prebuilt by setup.py (loads on first use)")
    if csrc_dir() is None:
        return BackendStatus(False, "no prebuilt CUDA extension and no csrc/ sources to JIT-build it from")
    nvcc = _find_nvcc()
    if nvcc is None:
        return BackendStatus(False, "no prebuilt CUDA extension, and no nvcc to JIT-build it (install the CUDA toolkit or set CUDA_HOME)")
    if not _has_ninja():
        return BackendStatus(False, "no prebuilt CUDA extension, and ninja (needed for the JIT build) is missing: pip install ninja")
    return BackendStatus(True, f"CUDA extension JIT-built with {nvcc} on first use (cached afterwards)")


def status() -> BackendStatus:
    """Whether the CUDA backend can run here, and why not. Cheap (cached); never builds."""
    global _status
    if _status is None:
        _status = _compute_status()
    return _status


def build_path() -> str:
    """Which way the extension comes (or would come) to this process, for ``lora-kernels info``.

    Cheap and side-effect free: looks at files and the toolkit, never builds or loads.
    """
    if _loaded is not None:
        return f"loaded ({_loaded})"
    pre = _prebuilt()
    if pre is not None:
        return f"prebuilt by setup.py: {pre}"
    src = csrc_dir()
    if src is None:
        return "no prebuilt extension and no csrc/ sources: cannot be built (reinstall lora_kernels)"
    home = cuda_home()
    if home is None:
        return f"JIT from {src} on first use, but no CUDA toolkit found (set CUDA_HOME)"
    return f"JIT from {src} with {home}/bin/nvcc on first use (cached in the torch extensions folder)"


def built() -> bool:
    """True once the extension is loaded or was prebuilt by setup.py.

    ``auto`` uses the CUDA backend only then (DESIGN §4: "cuda (extension built)"), so that a first
    inference call never stalls on a one-minute JIT build; ``backend="cuda"`` or :func:`load` builds it.
    """
    return _failure is None and (_loaded is not None or _prebuilt() is not None)


def _jit_build(src: Path) -> None:
    home = cuda_home()
    os.environ.setdefault("CUDA_HOME", home)  # read when cpp_extension is first imported
    from torch.utils import cpp_extension

    if not cpp_extension.CUDA_HOME or not os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h")):
        cpp_extension.CUDA_HOME = home  # it was imported before, and guessed a folder without the toolkit
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask (a build-only machine): torch would fail with an IndexError. Same default as setup.py.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST + "+PTX"
    sources = [str(src / "bindings.cpp")] + sorted(str(p) for p in src.glob("*.cu"))
    try:
        where = cpp_extension._get_build_directory(EXT_NAME, verbose=False)
    except Exception:  # noqa: BLE001 - private helper; only used for the message
        where = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions"
    if not os.path.isfile(os.path.join(where, f"{EXT_NAME}.so")):
        print(f"lora_kernels: building the CUDA extension from {src} (first use, ~1-2 min; cached in {where})",
              file=sys.stderr)
    cpp_extension.load(
        name=EXT_NAME,
        sources=sources,
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=os.environ.get("LORA_KERNELS_VERBOSE_BUILD", "0") not in ("", "0"),
    )


def load() -> None:
    """Load (or JIT-build, then load) the extension; idempotent and thread-safe. Raises with the reason."""
    global _loaded, _failure, _status
    if _loaded is not None:
        return
    with _lock:
        if _loaded is not None:
            return
        st = status()
        if not st.available:
            raise RuntimeError(f"backend 'cuda' cannot run: {st.reason}")
        path = _prebuilt()
        try:
            if path is not None:
                torch.ops.load_library(path)
                how = f"prebuilt {os.path.basename(path)}"
            else:
                _jit_build(csrc_dir())
                how = "JIT build"
            _register_fakes()
        except Exception as e:  # noqa: BLE001 - any build or load error makes the backend unavailable
            _failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            _status = None
            raise RuntimeError(f"backend 'cuda' cannot run: building or loading the CUDA extension failed ({_failure})") from e
        _loaded = how
        _status = None


# Fake (meta) implementations: output shapes only, so torch.compile can trace the ops.
def fake_lora_linear(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def fake_lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, task_ids, order, tiles, tile_tokens):
    return x.new_empty((x.shape[0], weight.shape[0]))


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    torch.library.register_fake("lora_kernels::cuda_lora_linear")(fake_lora_linear)
    torch.library.register_fake("lora_kernels::cuda_lora_linear_mixed")(fake_lora_linear_mixed)
    _fakes_registered = True


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_cuda(op: str, x: Tensor) -> None:
    if x.device.type != "cuda":
        raise ValueError(f"{op}: the CUDA backend needs CUDA tensors, got x on {x.device}")


def _reference_grads(fn, inputs, dy):
    """Gradients of ``fn(*inputs)`` (the reference forward, recomputed) for the inputs that need them."""
    leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in inputs]
    with torch.enable_grad():
        y = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True)) if wanted else iter(())
    return [next(grads) if t is not None and t.requires_grad else None for t in leaves]


# --- single task -------------------------------------------------------------------------------

def _single_op(x, weight, bias, lora_a, lora_b, scale):
    return torch.ops.lora_kernels.cuda_lora_linear(x, weight, bias, lora_a, lora_b, float(scale))


class _LoraLinear(torch.autograd.Function):
    """CUDA forward; backward by differentiating the recomputed reference forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        ctx.save_for_backward(x, weight, bias, lora_a, lora_b)
        ctx.scale = scale
        return _single_op(x, weight, bias, lora_a, lora_b, scale)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        inputs = [(x, needs[0]), (weight, needs[1]), (bias, needs[2]), (lora_a, needs[3]), (lora_b, needs[4])]
        grads = _reference_grads(lambda *t: reference._lora_linear(*t, ctx.scale), inputs, dy)
        return (*grads, None)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float = 1.0,
                *, dropout_p: float = 0.0, backend: str | None = None) -> Tensor:
    """``y = x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T`` with the fused CUDA kernels.

    Shape: x [..., K], weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r] -> y [..., N].
    ``dropout_p > 0`` and float64 run the reference (see the module docstring for autograd).
    """
    check_lora_linear(x, weight, bias, lora_a, lora_b, dropout_p)
    _check_cuda("lora_linear", x)
    if dropout_p or x.dtype not in _KERNEL_DTYPES:
        return reference.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p)
    load()
    if _needs_grad(x, weight, bias, lora_a, lora_b):
        return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scale))
    return _single_op(x, weight, bias, lora_a, lora_b, scale)


# --- mixed tasks -------------------------------------------------------------------------------

def tiles_of(routing: Routing, device) -> tuple[Tensor, int]:
    """Token tiles of a routing for the mixed shrink: int32 [n, 3] (task, start in order, count), tile size.

    Each tile holds rows of one task (so a block reads one A_t); the tile size follows the longest
    segment (8 for one token per task: BGMV; up to 64 for long segments: SGMV). Built once per
    batch and device (cached on the routing), then reused by every layer.
    """
    def build():
        longest = max((routing.counts[t] for t in routing.present), default=0)
        tt = 8 if longest <= 8 else 16 if longest <= 16 else 32 if longest <= 32 else 64
        rows = [(t, s, min(tt, routing.starts[t + 1] - s))
                for t in routing.present for s in range(routing.starts[t], routing.starts[t + 1], tt)]
        tiles = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(device)
        return tiles, tt

    return routing.cached(("cuda_tiles", str(torch.device(device))), build)


def _mixed_op(x2, weight, bias, lora_a, lora_b, scales, routing: Routing):
    routing = routing.to(x2.device)
    tiles, tt = tiles_of(routing, x2.device)
    return torch.ops.lora_kernels.cuda_lora_linear_mixed(
        x2, weight, bias, lora_a, lora_b, scales, routing.task_ids, routing.order, tiles, tt)


class _LoraLinearMixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, scales, routing):
        ctx.save_for_backward(x2, weight, bias, lora_a, lora_b, scales)
        ctx.routing = routing
        return _mixed_op(x2, weight, bias, lora_a, lora_b, scales, routing)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, lora_a, lora_b, scales = ctx.saved_tensors
        needs = ctx.needs_input_grad
        inputs = [(x2, needs[0]), (weight, needs[1]), (bias, needs[2]), (lora_a, needs[3]), (lora_b, needs[4])]
        routing = ctx.routing.to(x2.device)
        grads = _reference_grads(
            lambda *t: reference.lora_linear_mixed(*t, scales.detach(), routing), inputs, dy)
        return (*grads, None, None)


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                      task_ids: "Tensor | Routing", *, backend: str | None = None) -> Tensor:
    """Per-row task LoRA linear with the CUDA kernels; semantics of :func:`reference.lora_linear_mixed`.

    Shape: x [M, K] (or [B, ..., K] with ids per sample, or [..., K] with ids per flattened row),
    lora_a [T, r, K], lora_b [T, N, r], scales [T], task_ids [M] int (-1 = no task) or a Routing.
    """
    routing = Routing.of(task_ids, lora_a.shape[0])
    check_lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, routing.num_rows)
    _check_cuda("lora_linear_mixed", x)
    if x.dtype not in _KERNEL_DTYPES:
        return reference.lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, routing)
    load()
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], n))
    if x.dim() >= 2 and routing.num_rows == x.shape[0]:
        routing = routing.expand(x2.shape[0] // x.shape[0])  # one id per sample -> one per row
    scales32 = scales.detach().to(device=x.device, dtype=torch.float32)
    if _needs_grad(x, weight, bias, lora_a, lora_b):
        y = _LoraLinearMixed.apply(x2, weight, bias, lora_a, lora_b, scales32, routing)
    else:
        y = _mixed_op(x2, weight, bias, lora_a, lora_b, scales32, routing)
    return y.view(*x.shape[:-1], n)
