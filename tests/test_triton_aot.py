"""Every shipped Triton config of the fused LoRA linear compiles for real GPUs, on this CPU machine.

``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (H100/H200) and ``("cuda", 80, 32)`` (A100),
through :mod:`tests.triton_aot`: each config must compile (legal ``tl.dot`` shapes: the interpreter
accepts any), fit the per-block shared memory (227 KiB / 163 KiB), spill no registers (ptxas -v),
and, on sm_90, issue wgmma for every 16-bit tile with BM >= 64 (a warpgroup MMA is m64; the decode
tile with BM = 16 uses mma.sync by design, and fp32 inputs run ``input_precision="ieee"``, which
has no tensor-core path).

The configs come from :func:`lora_kernels.ops.triton.lora_linear.aot_specs`, generated from the
same table the launch heuristic reads, so a config cannot ship without being compiled here, with
the specialisations Triton's JIT applies at launch (divisible-by-16 hints on sizes and strides,
M = 1 a constant), so the binaries checked are the ones that run. CI runs this file (and the mixed
AOT tests) on the installed Triton and on Triton 3.6, the oldest supported (see ``.ci/run``).
bf16 covers the 16-bit path (fp16 has the same tiles and instructions); fp32 has its own tiles
(FMA "ieee" dots), all compiled too except the shrink's middle ranks (same config as r16/r256).
Cold (empty Triton cache for these configs) this file took 6 min on 2 CPU cores shared with
four other jobs (97 configs x 2 archs); warm (~/.triton/cache kept between runs) much less,
ptxas -v still runs per config.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from lora_kernels.ops.triton.lora_linear import aot_specs  # noqa: E402
from tests.triton_aot import SMEM_LIMIT, aot_compile  # noqa: E402


def _fp32_core(name: str) -> bool:
    """fp32: every output-tile variant; the shrink and the LoRA-term kernel (one fp32 config for
    all ranks each) at the largest padded rank, plus their plain forward at the smallest."""
    if name.startswith("term/"):
        return "/r256/" in name or name.startswith("term/fp32/r16/plain/fwd/")
    return name.startswith("fused/") or "/r16/" in name or "/r256/" in name


def _bf16_core(name: str) -> bool:
    """bf16: everything, except that the shrink's and the LoRA-term kernel's dropout / backward /
    odd-stride / hs-storing variants are compiled at the largest padded rank of each band only
    (shrink r64, r256; term rows64 r64, rows16 r256), their plain forward at every rank:
    registers and shared memory grow with BR within a band's config, so that rank is the band's
    worst case."""
    if name.startswith("term/"):
        return name.startswith(("term/rows64/r16/plain/fwd/", "term/rows16/r16/plain/fwd/", "term/rows64/r64/",
                                "term/rows16/r256/"))
    if name.startswith(("fused/middle/", "fused/prefill")):
        return False  # not run by default (M > 128 runs the cuBLAS base); the launch plan reads their resources
    if "-save" in name:  # the fused forward plus one masked store of hs: compiled at the larger rank only
        return "intile_r64-save" in name and "-m1" not in name
    return not (name.startswith("shrink/") and ("/r16/" in name or "/r128/" in name) and "/xA/" not in name)


SPECS = ([s for s in aot_specs((torch.bfloat16,)) if _bf16_core(s[0])]
         + [s for s in aot_specs((torch.float32,)) if _fp32_core(s[0])])


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s[0])
def test_config_compiles_fits_and_does_not_spill(spec, arch):
    name, kernel, signature, constexprs, num_warps, num_stages = spec
    res = aot_compile(kernel, signature, constexprs, arch, num_warps, num_stages)
    assert res.shared_bytes <= SMEM_LIMIT[arch], f"{name}: {res.shared_bytes} B shared > {SMEM_LIMIT[arch]} B on sm_{arch}"
    assert res.spills == 0, f"{name}: ptxas reports {res.spills} B of register spills on sm_{arch} ({res.registers} registers)"
    assert 0 < res.registers <= 255
    sixteen_bit = signature["x_ptr"] in ("*bf16", "*fp16")
    if arch == 90 and sixteen_bit and constexprs["BM"] >= 64:
        assert res.has_wgmma, f"{name}: no wgmma.mma_async in the sm_90 PTX"
    if arch == 80:
        assert not res.has_wgmma
        if sixteen_bit:
            assert "mma.sync" in res.ptx, f"{name}: no tensor-core mma.sync in the sm_80 PTX"


def test_aot_reports_compile_errors():
    """A config the GPU cannot run (a 16x8 dot tile) fails here, where the interpreter would pass."""
    name, kernel, signature, constexprs, warps, stages = next(s for s in SPECS if "shrink" in s[0])
    bad = dict(constexprs, BK=8)
    with pytest.raises(RuntimeError, match="AOT compile|CompilationError|dot"):
        aot_compile(kernel, signature, bad, 90, warps, stages)


_FLOAT_ATOMIC = re.compile(r"\b(?:atom|red)(?:\.global)?(?:\.\w+)*\.add(?:\.\w+)*\.f(?:32|16|64)\b|\b(?:atom|red)(?:\.\w+)*\.f32\.add")


def test_default_path_has_no_float_atomics():
    """Deterministic by default: no shipped config adds floats atomically (their order varies run
    to run, so would the bits of h, y and the gradients). Checked on the sm_90 PTX of every spec."""
    offenders = []
    for name, kernel, signature, constexprs, num_warps, num_stages in SPECS:
        res = aot_compile(kernel, signature, constexprs, 90, num_warps, num_stages)
        if _FLOAT_ATOMIC.search(res.ptx):
            offenders.append(name)
    assert not offenders, f"float atomics (nondeterministic sums) in: {offenders}"
