"""Install lora_kernels: ``pip install -e ".[test]"``.

The CUDA extension in ``csrc/`` is built here only when a CUDA build of torch and nvcc are present
(``LORA_KERNELS_BUILD_CUDA=1`` forces the build, ``=0`` skips it); otherwise it is JIT-built with
ninja on first use. Importing ``lora_kernels`` never builds or loads it.
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "lora_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _cuda_extensions():
    """The CUDA extension, when it should and can be built here (see module docstring).

    Needs torch importable in the build environment: pip's default build isolation hides the
    installed torch, so ``pip install -e .`` builds no extension (the first use JIT-builds it);
    ``pip install --no-build-isolation -e .`` with a CUDA torch and nvcc builds it now.
    ``TORCH_CUDA_ARCH_LIST`` picks the architectures and ``MAX_JOBS`` the parallel compiles
    (both read by torch's CUDAExtension / BuildExtension).
    """
    flag = os.environ.get("LORA_KERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return [], {}
    force = flag == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        if force:
            raise RuntimeError("LORA_KERNELS_BUILD_CUDA=1, but torch is not importable in the build environment "
                               "(pip build isolation?): use pip install --no-build-isolation") from e
        return [], {}
    missing = ("torch is a CPU-only build" if torch.version.cuda is None
               else "nvcc was not found (set CUDA_HOME)" if CUDA_HOME is None else None)
    if missing:
        if force:
            raise RuntimeError(f"LORA_KERNELS_BUILD_CUDA=1, but {missing}")
        return [], {}
    csrc = os.path.join(HERE, "csrc")
    sources = ["csrc/bindings.cpp"] + sorted(f"csrc/{f}" for f in os.listdir(csrc) if f.endswith(".cu"))
    ext = CUDAExtension(
        name="lora_kernels._cuda",  # a plain shared library of torch ops, loaded with torch.ops.load_library
        sources=sources,
        include_dirs=[csrc],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
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
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    include_package_data=True,
    package_data={"lora_kernels": ["csrc/*"]},
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
