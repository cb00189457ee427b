"""CI step: build and load the real CUDA extension with a CUDA build of torch, on a machine without a GPU.

    python python/cuda_build_check.py            # from the repo root, in any python

1. A venv with a CUDA build of torch (``LORA_KERNELS_CUDA_TORCH``, default ``torch==2.14.1``) + ninja,
   cached across runs in ``LORA_KERNELS_CUDA_VENV`` (default ``~/.cache/lora_kernels/cuda-venv``).
   If it cannot be installed (no network, no wheel, a CPU-only wheel) or no CUDA toolkit is found,
   the step prints SKIP and exits 0: it never fails CI for want of a CUDA torch.
2. setup.py: ``pip wheel --no-build-isolation`` with ``LORA_KERNELS_BUILD_CUDA=1`` (a failed build is
   an error here) and TORCH_CUDA_ARCH_LIST unset (the no-GPU default, 8.0;9.0+PTX); the wheel must
   hold ``lora_kernels/_cuda*.so`` and ``lora_kernels/csrc/``; it is installed into the venv.
3. From outside the source tree (so the installed wheel is what is imported): ``lora-kernels info``
   names the prebuilt extension; the library loads; both ops and their fakes register; ``opcheck``
   runs on meta tensors.
4. JIT from the installed wheel's own ``lora_kernels/csrc`` through the loader's build function.
Prints one line per stage with its seconds; exits 1 on a failure after the venv exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("LORA_KERNELS_CUDA_TORCH", "torch==2.14.1")
VENV = Path(os.environ.get("LORA_KERNELS_CUDA_VENV", Path.home() / ".cache" / "lora_kernels" / "cuda-venv"))
PY = VENV / "bin" / "python"


def _run(cmd, timeout, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# The build tools and the package's own run-time dependencies (setup.py's install_requires; the wheel
# is installed with --no-deps so that pip never touches the CUDA torch).
VENV_DEPS = ("ninja", "setuptools", "wheel", "numpy", "safetensors", "tqdm", "regex")


def _stage(name, t0):
    print(f"[cuda-build] {name}: {time.time() - t0:.0f} s", flush=True)


def ensure_venv() -> str | None:
    """The cached venv with a CUDA torch; returns a reason to skip, or None."""
    marker = VENV / f".ok-{TORCH}-{'-'.join(VENV_DEPS)}"  # a new dependency list rebuilds the cached venv
    if marker.is_file():
        return None
    t0 = time.time()
    shutil.rmtree(VENV, ignore_errors=True)
    try:
        p = _run([sys.executable, "-m", "venv", str(VENV)], 120)
        if p.returncode != 0:
            return f"cannot create a venv: {p.stderr.strip()[-300:]}"
        p = _run([str(PY), "-m", "pip", "install", "-q", TORCH, *VENV_DEPS], 1800)
    except subprocess.TimeoutExpired:
        return f"installing {TORCH} took over 30 min"
    if p.returncode != 0:
        return f"cannot install {TORCH}: {p.stderr.strip()[-300:]}"
    p = _run([str(PY), "-c", "import torch; assert torch.version.cuda, 'CPU-only'; print(torch.__version__)"], 300)
    if p.returncode != 0:
        return f"{TORCH} installed a CPU-only build here"
    marker.write_text(p.stdout)
    _stage(f"cached venv with {p.stdout.strip()} installed (cold)", t0)
    return None


CHECK = textwrap.dedent("""
    import os, sys, torch
    from lora_kernels.ops import cuda
    assert "site-packages" in cuda.__file__, cuda.__file__
    pre = cuda._prebuilt()
    assert pre is not None, "no prebuilt lora_kernels._cuda in the installed wheel"
    assert cuda.csrc_dir() is not None and (cuda.csrc_dir() / "lora_linear.cu").is_file(), "csrc/ not shipped"
    torch.ops.load_library(pre)
    cuda._register_fakes()
    for op in ("cuda_lora_linear", "cuda_lora_linear_mixed"):
        print(getattr(torch.ops.lora_kernels, op).default._schema)
    m = dict(device="meta", dtype=torch.bfloat16)
    x, w, bias = torch.empty(3, 5, 64, **m), torch.empty(48, 64, **m), torch.empty(48, **m)
    a, b = torch.empty(8, 64, **m), torch.empty(48, 8, **m)
    y = torch.ops.lora_kernels.cuda_lora_linear(x, w, bias, a, b, 1.0)
    assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16, y
    ids = torch.empty(15, device="meta", dtype=torch.long)
    tiles = torch.empty(2, 3, device="meta", dtype=torch.int32)
    margs = (x.reshape(15, 64), w, bias, a[None], b[None], torch.empty(1, device="meta"), ids, ids, tiles, 8)
    assert torch.ops.lora_kernels.cuda_lora_linear_mixed(*margs).shape == (15, 48)
    # schema, fake tensor and dynamic-shape checks of the registrations (no GPU: meta tensors)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in ((torch.ops.lora_kernels.cuda_lora_linear.default, (x, w, bias, a, b, 1.0)),
                     (torch.ops.lora_kernels.cuda_lora_linear_mixed.default, margs)):
        res = torch.library.opcheck(op, args, test_utils=tests)
        assert all(v == "SUCCESS" for v in res.values()), res
        print("opcheck", op, res)
    print("prebuilt ok")
""")

JIT = textwrap.dedent("""
    import os, torch
    from lora_kernels.ops import cuda
    src = cuda.csrc_dir()
    assert "site-packages" in str(src), src
    cuda._jit_build(src)  # the loader's own JIT path, from the wheel's sources
    cuda._register_fakes()
    print(torch.ops.lora_kernels.cuda_lora_linear.default._schema)
    print("jit ok")
""")


def main() -> int:
    t_all = time.time()
    skip = ensure_venv()
    if skip is None:
        sys.path.insert(0, str(ROOT / "lora_kernels" / "ops"))
        import cuda_toolkit  # the package's discovery, without importing torch here

        if cuda_toolkit.cuda_home() is None:
            skip = "no CUDA toolkit (nvcc) found"
    if skip is not None:
        print(f"[cuda-build] SKIP: {skip}")
        return 0
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME")}
    env.update(LORA_KERNELS_BUILD_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        # A clean copy of the tree: no build/ objects of an earlier build in the source folder.
        src = Path(tmp) / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", ".venv*", "*.egg-info", "*.so",
                                                                 "__pycache__", ".pytest_cache", ".hypothesis"))
        p = _run([str(PY), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp, str(src)], 1200,
                 env=env)
        if p.returncode != 0:
            print(f"[cuda-build] FAIL: setup.py build\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
            return 1
        wheel = next(Path(tmp).glob("lora_kernels-*.whl"))
        names = _run([str(PY), "-c", f"import zipfile; print('\\n'.join(zipfile.ZipFile({str(wheel)!r}).namelist()))"], 60).stdout
        if "lora_kernels/csrc/lora_linear.cu" not in names or "lora_kernels/_cuda" not in names:
            print(f"[cuda-build] FAIL: the wheel lacks the extension or the sources:\n{names}")
            return 1
        p = _run([str(PY), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], 300)
        if p.returncode != 0:
            print(f"[cuda-build] FAIL: installing the wheel\n{p.stderr[-3000:]}")
            return 1
        _stage("setup.py wheel built (sm_80, sm_90 + PTX) and installed", t0)
        t0 = time.time()
        info = _run([str(PY), "-m", "lora_kernels", "info"], 300, cwd=tmp)
        check = _run([str(PY), "-c", CHECK], 600, cwd=tmp)
        print(info.stdout.strip())
        if info.returncode != 0 or "prebuilt by setup.py" not in info.stdout or check.returncode != 0:
            print(f"[cuda-build] FAIL: loading the prebuilt extension\n{info.stderr[-2000:]}\n{check.stdout[-3000:]}\n"
                  f"{check.stderr[-5000:]}")
            return 1
        _stage("prebuilt extension loads; ops, fakes and opcheck on meta tensors ok", t0)
        t0 = time.time()
        jenv = dict(env, TORCH_EXTENSIONS_DIR=str(Path(tmp) / "ext"), TORCH_CUDA_ARCH_LIST="9.0")
        jenv.pop("LORA_KERNELS_BUILD_CUDA")
        jit = _run([str(PY), "-c", JIT], 900, cwd=tmp, env=jenv)
        if jit.returncode != 0 or "jit ok" not in jit.stdout:
            print(f"[cuda-build] FAIL: JIT build from the installed wheel\n{jit.stdout[-3000:]}\n{jit.stderr[-5000:]}")
            return 1
        _stage("JIT build from the installed wheel's csrc (sm_90) loads", t0)
        _run([str(PY), "-m", "pip", "uninstall", "-q", "-y", "lora_kernels"], 120)
    _stage("CUDA build step total", t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
