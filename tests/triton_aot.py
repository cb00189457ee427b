"""Ahead-of-time compile of Triton kernels for real GPUs, on a machine without one.

    from tests.triton_aot import aot_compile, SMEM_LIMIT
    res = aot_compile(my_kernel, {"x_ptr": "*bf16", "M": "i32", "BLOCK": "constexpr"}, {"BLOCK": 64},
                      arch=90, num_warps=4, num_stages=3)
    assert res.spills == 0 and res.shared_bytes <= SMEM_LIMIT[90] and res.has_wgmma

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a kernel to PTX and a
cubin with the ptxas that ships inside the triton wheel, so it catches what the interpreter cannot:
illegal ``tl.dot`` shapes, shared-memory overflow, register spills, a missing wgmma path.

Why a subprocess: under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` on CPU machines)
``@triton.jit`` returns an ``InterpretedFunction`` that ``ASTSource`` cannot compile, and the
interpreter patches ``triton.language`` in place once it has run. So when ``kernel`` is not a
``JITFunction``, the compile runs in one long-lived worker process started with
``TRITON_INTERPRET=0`` that imports the kernel's module afresh (by ``fn.__module__`` and
``fn.__qualname__``, with this process's ``sys.path``). The worker starts once per test session
(about 3 s for importing torch and triton) and compiles are cached per arguments in this process.

Results: ``shared_bytes`` is the dynamic shared memory Triton requests (``metadata.shared``);
``registers`` and ``spills`` (spill-store + spill-load bytes) come from ``ptxas -v`` re-run on the
PTX for the same ``sm_80`` / ``sm_90a`` target; ``has_wgmma`` says whether the PTX issues
Hopper's ``wgmma.mma_async``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any, BinaryIO

__all__ = ["AotResult", "aot_compile", "SMEM_LIMIT"]

# Largest dynamic shared memory one block may request (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# Hopper has 228 KB per SM of which 227 KB for one block; A100 164 KB per SM, 163 KB per block.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclasses.dataclass(frozen=True)
class AotResult:
    shared_bytes: int  # dynamic shared memory the launch requests
    spills: int        # bytes of spill stores + spill loads reported by ptxas (0 = no spills)
    registers: int     # registers per thread reported by ptxas
    ptx: str
    has_wgmma: bool    # the PTX contains wgmma.mma_async (Hopper warpgroup MMA)


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` on ``ptx`` for ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the same ptxas Triton itself uses for this arch (bundled in the wheel)
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", out], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{log}")
    regs = sum(int(m) for m in re.findall(r"Used (\d+) registers", log))
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    return regs, spills


def _compile_here(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, (name, ty) in enumerate(signature.items()):
        ty, _, hint = ty.partition(":")
        sig[name] = ty
        # What the JIT does for torch tensors (base pointers 16-byte aligned) and for ints passed
        # with a ":16" suffix (values divisible by 16): tt.divisibility lets loads vectorize.
        if ty.startswith("*") or hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, dict(constexprs), attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_report(ptx, arch)
    return AotResult(shared_bytes=int(compiled.metadata.shared), spills=spills, registers=regs, ptx=ptx,
                     has_wgmma="wgmma.mma_async" in ptx)


def _resolve(module: str, qualname: str):
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------- worker protocol: length-prefixed pickles


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream: BinaryIO) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("AOT worker closed its pipe")
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(stream.read(n))


def _worker_main() -> None:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the compiler prints goes to stderr, never into the protocol stream
    proto_in = os.fdopen(os.dup(0), "rb")
    while True:
        try:
            req = _recv(proto_in)
        except EOFError:
            return
        try:
            sys.path[:] = req["sys_path"]
            kernel = _resolve(req["module"], req["qualname"])
            res = _compile_here(kernel, req["signature"], req["constexprs"], req["arch"], req["num_warps"], req["num_stages"])
            _send(proto_out, ("ok", dataclasses.asdict(res)))
        except BaseException as e:  # report, keep serving
            import traceback

            _send(proto_out, ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ, TRITON_INTERPRET="0")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 default, stated to silence its warning
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lock = threading.Lock()

    def call(self, req: dict) -> AotResult:
        with self.lock:
            _send(self.proc.stdin, req)
            status, payload = _recv(self.proc.stdout)
        if status != "ok":
            raise RuntimeError(f"AOT compile of {req['module']}.{req['qualname']} for sm_{req['arch']} failed: {payload}")
        return AotResult(**payload)


_worker: _Worker | None = None
_cache: dict[Any, AotResult] = {}


def _key(signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int) -> tuple:
    return (tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())), arch, num_warps, num_stages)


def aot_compile(kernel, signature: dict[str, str], constexprs: dict[str, object], arch: int, num_warps: int,
                num_stages: int) -> AotResult:
    """Compile ``kernel`` for ``GPUTarget("cuda", arch, 32)`` and report its resource use.

    ``signature`` maps every argument name, in the kernel's order, to a Triton type (``"*fp16"``,
    ``"i32"``, ``"i64"``, ``"fp32"``, or ``"constexpr"``); an int type may carry a ``":16"`` suffix
    (``"i32:16"``) to say the value is divisible by 16, as the JIT specializes it at launch.
    Pointers are taken as 16-byte aligned (torch's allocator guarantees far more), as the JIT does.
    ``constexprs`` gives the values of the constexpr arguments (an int arg the JIT would see as 1,
    e.g. a unit stride, is passed as ``"constexpr"`` with value 1).
    Raises ``RuntimeError`` with the compiler's message when the kernel does not compile.
    """
    global _worker
    from triton.runtime.jit import JITFunction

    fn = getattr(kernel, "fn", kernel)
    key = (fn.__module__, fn.__qualname__) + _key(signature, constexprs, arch, num_warps, num_stages)
    if key in _cache:
        return _cache[key]
    if isinstance(kernel, JITFunction) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        res = _compile_here(kernel, signature, constexprs, arch, num_warps, num_stages)
    else:
        if _worker is None or _worker.proc.poll() is not None:
            _worker = _Worker()
        res = _worker.call({"sys_path": list(sys.path), "module": fn.__module__, "qualname": fn.__qualname__,
                            "signature": dict(signature), "constexprs": dict(constexprs), "arch": arch,
                            "num_warps": num_warps, "num_stages": num_stages})
    _cache[key] = res
    return res


def plan_specs():
    """(name, kernel, signature, constexprs, num_warps, num_stages) of every bf16 config the launch
    plan (``lora_kernels/plan/triton.py``) reads resources for: single-task and mixed, aligned."""
    import torch

    from lora_kernels.ops.triton import lora_linear as ll
    from lora_kernels.ops.triton import lora_linear_mixed as mx

    for name, kernel, sig, cx, nw, ns in ll.aot_specs((torch.bfloat16,)):
        if "odd" not in name:
            yield name, kernel, sig, cx, nw, ns
    for name, kernel, sig, cx, nw, ns, _ in mx.shipped_configs():
        if "/bf16/" in name and "/ranks0/k16" in name and not name.startswith("segsum"):
            yield name, kernel, sig, cx, nw, ns


def write_resources(path: str) -> None:
    """Compile :func:`plan_specs` for sm_90 and sm_80 and write their resources as JSON to ``path``."""
    import json

    import triton

    out = {"triton": triton.__version__, "sm90": {}, "sm80": {}}
    for name, kernel, sig, cx, nw, ns in plan_specs():
        for arch in (90, 80):
            res = aot_compile(kernel, sig, cx, arch, nw, ns)
            out[f"sm{arch}"][name] = {"registers": res.registers, "shared": res.shared_bytes, "spills": res.spills}
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
elif __name__ == "__main__" and sys.argv[1:2] == ["--write-resources"] and len(sys.argv) == 3:
    # python tests/triton_aot.py --write-resources lora_kernels/plan/triton_resources.json
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the worker: the JIT's default, stated
    write_resources(sys.argv[2])
