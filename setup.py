"""Install lora_kernels: ``pip install -e ".[test]"``.

The CUDA extension in ``csrc/`` is compiled here only when torch is importable in the build
environment, is a CUDA build, and the CUDA toolkit is found (the same discovery as the JIT loader:
``lora_kernels/ops/cuda_toolkit.py``). ``LORA_KERNELS_BUILD_CUDA=1`` forces the build (any failure
is an error), ``=0`` skips it. Otherwise, whenever the build cannot be done or fails, the install
goes on without it with a warning, and the extension is JIT-built with ninja from the shipped
sources on first use. Importing ``lora_kernels`` never builds or loads it.

pip's default build isolation hides the installed torch (see pyproject.toml): use
``pip install --no-build-isolation .`` to compile at install time.
"""

import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "lora_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _note(msg: str) -> None:
    print(f"lora_kernels setup: {msg}", file=sys.stderr)


def _toolkit():
    """lora_kernels/ops/cuda_toolkit.py, loaded by path: no package __init__, no torch import."""
    path = os.path.join(HERE, "lora_kernels", "ops", "cuda_toolkit.py")
    spec = importlib.util.spec_from_file_location("_lora_kernels_cuda_toolkit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_extensions():
    """The CUDA extension and its build command, when it should and can be built here.

    Returns ``([], {})`` (install without it; JIT on first use) when torch is missing from the build
    environment, is a CPU-only build, or no CUDA toolkit is found, unless
    ``LORA_KERNELS_BUILD_CUDA=1`` asks for the build (then those are errors).
    ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0+PTX`` here: no GPU is
    probed at install time) and ``MAX_JOBS`` the parallel compiles.
    """
    flag = os.environ.get("LORA_KERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return [], {}
    force = flag == "1"
    jit = "the CUDA extension is not compiled now; it is JIT-built from the shipped sources on first use"
    try:
        import torch
    except ImportError as e:
        if force:
            raise RuntimeError("LORA_KERNELS_BUILD_CUDA=1, but torch is not importable in the build environment "
                               "(pip build isolation?): use pip install --no-build-isolation") from e
        return [], {}
    if torch.version.cuda is None:
        if force:
            raise RuntimeError(f"LORA_KERNELS_BUILD_CUDA=1, but torch {torch.__version__} is a CPU-only build")
        return [], {}
    toolkit = _toolkit()
    home = toolkit.cuda_home()
    if home is None:
        if force:
            raise RuntimeError("LORA_KERNELS_BUILD_CUDA=1, but no CUDA toolkit was found (set CUDA_HOME to the "
                               "folder with bin/nvcc and include/cuda_runtime.h)")
        _note(f"WARNING: no CUDA toolkit found (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda): {jit} "
              "(which needs nvcc then)")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: give it the toolkit found above
    # (its own guess from an nvcc wrapper in /usr/local/bin is /usr/local, without the headers).
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Unset, torch asks the visible GPUs, and with none (docker, CI) fails with an IndexError.
        os.environ["TORCH_CUDA_ARCH_LIST"] = toolkit.DEFAULT_ARCH_LIST + "+PTX"
        _note(f"TORCH_CUDA_ARCH_LIST is unset: building for {os.environ['TORCH_CUDA_ARCH_LIST']}")

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's build, except that a failed compile leaves an install without the extension."""

        failed: list = []

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler/linker error: fall back to the JIT path
                if force:
                    raise
                last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                _note(f"WARNING: building {ext.name} failed ({type(e).__name__}: {last}); {jit}. "
                      "LORA_KERNELS_BUILD_CUDA=1 makes this an error.")
                self.failed.append(ext.name)

        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):  # editable installs: copy only what was built
            keep, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = keep

        def get_outputs(self):
            return [o for o in super().get_outputs() if os.path.exists(o)]

    csrc = os.path.join(HERE, "csrc")
    sources = ["csrc/bindings.cpp"] + sorted(f"csrc/{f}" for f in os.listdir(csrc) if f.endswith(".cu"))
    ext = cpp_extension.CUDAExtension(
        name="lora_kernels._cuda",  # a plain shared library of torch ops, loaded with torch.ops.load_library
        sources=sources,
        include_dirs=[csrc],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    _note(f"building the CUDA extension with {home}/bin/nvcc")
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="lora_kernels",
    version=_version(),
    description="LoRA for any PyTorch model: many tasks, mixed-task batches, fused Triton and CUDA kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # lora_kernels.csrc is the top-level csrc/ folder: the CUDA sources ship inside the package
    # (site-packages/lora_kernels/csrc), so the JIT build works from a wheel too.
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]) + ["lora_kernels.csrc"],
    package_dir={"lora_kernels.csrc": "csrc"},
    package_data={"lora_kernels.csrc": ["*.cu", "*.cuh", "*.cpp"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors>=0.4",
        "regex>=2022.1.18",  # PEFT configs' patterns matched with a time limit
        "triton>=3.0; platform_system == 'Linux'",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "peft": ["peft>=0.13", "transformers>=4.45"],
        "bench": ["matplotlib", "tqdm", "loralib"],
    },
    entry_points={"console_scripts": ["lora-kernels=lora_kernels.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
