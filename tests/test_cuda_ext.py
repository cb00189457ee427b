"""The CUDA C++ extension (csrc/ + lora_kernels/ops/cuda.py).

Without a GPU (CI):
- every csrc/*.cu compiles standalone with the machine's nvcc for sm_80 and sm_90a (one nvcc call
  with two -gencode, torch's extension flags), without register spills, and the fp16/bf16 kernels issue
  tensor-core HMMA instructions;
- the kernel files include CUDA headers only; the binding file compiles (syntax) against this
  torch's headers;
- the whole extension (bindings + kernels, linked against a CUDA build of torch) builds, when such
  a torch is at hand (this interpreter, or ``LORA_KERNELS_CUDA_PYTHON=/path/to/python``);
- status / loader / setup.py behaviour on a CPU-only torch, fake implementations, tile building.

On a GPU (``-m gpu``): the ops against the float64 reference and the Triton ops on odd shapes,
ranks 1..256, -1 rows, poisoned buffers, misaligned rows, autograd, torch.compile, CUDA graphs.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lora_kernels.ops import cuda, reference
from lora_kernels.ops.routing import Routing
from tests.utils import assert_close, poisoned

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_FILES = sorted(CSRC.glob("*.cu"))
ARCHES = ("sm_80", "sm_90a")
# The defines torch's cpp_extension passes to nvcc: the kernels must compile under them.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr"]


def _nvcc() -> str | None:
    return cuda._find_nvcc()


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # ships cuobjdump in its NVIDIA backend
    except ImportError:
        return None
    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.is_file() else None


# --- compile checks (no GPU) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every kernel file once for both arches: one nvcc call, two -gencode, --threads 2.

    -O3, as setup.py and the JIT build: the registers and the SASS checked below are the shipped ones."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): cannot compile csrc/*.cu")
    out = tmp_path_factory.mktemp("nvcc")
    gencode = [f for arch in ARCHES for f in ("-gencode", f"arch=compute_{arch[3:]},code={arch}")]
    results = {}
    for src in KERNEL_FILES:
        obj = out / f"{src.stem}.o"
        cmd = [nvcc, "-c", "-O3", "-std=c++20", "--threads", "2", *TORCH_NVCC_DEFINES, f"-I{CSRC}", *gencode,
               "-Xptxas", "-v", str(src), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        results[src.name] = (proc.returncode, proc.stdout + proc.stderr, obj, " ".join(cmd))
    return results


def test_kernels_compile_for_both_arches(compiled):
    assert KERNEL_FILES, "csrc/ has no .cu files"
    for name, (rc, log, obj, cmd) in compiled.items():
        assert rc == 0, f"{name} failed to compile:\n{cmd}\n{log[-4000:]}"
        for arch in ARCHES:
            assert f"for '{arch}'" in log, f"{name}: no kernel compiled for {arch}:\n{log[-2000:]}"


def test_kernels_do_not_spill(compiled):
    for name, (rc, log, obj, cmd) in compiled.items():
        assert rc == 0
        spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        assert spills and max(spills) == 0, f"{name} spills registers:\n{log[-4000:]}"


def _sass(compiled, arch: str) -> str:
    """The SASS of the compiled ``lora_linear.cu`` for ``arch`` (skips when no cuobjdump is found)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel ship it)")
    rc, _, obj, _ = compiled["lora_linear.cu"]
    assert rc == 0
    return subprocess.run([tool, "-sass", "-arch", arch, str(obj)], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.parametrize("arch", ARCHES)
def test_half_kernels_use_tensor_cores(compiled, arch):
    sass = _sass(compiled, arch)
    assert "HMMA" in sass, f"no HMMA (mma.sync) instructions in the {arch} SASS of lora_linear.cu"


# The fused bf16 forward kernels, as (kernel, MT) -> mangled name prefix.
FUSED_BF16 = {**{("skinny", mt): f"skinny_kernelI13__nv_bfloat16Li{mt}ELb1ELb0ELi8EE" for mt in (1, 2, 4, 8)},
              **{("wide", mt): f"wide_kernelI13__nv_bfloat16Li{mt}E" for mt in (4, 8)}}


def _plan_tables(plan, kernel):
    """(registers, shared memory, loads in flight) tables of lora_kernels.plan.cuda for ``kernel``."""
    if kernel == "wide":
        return plan.WIDE_REGS, plan.WIDE_SMEM, plan.WIDE_LOADS_IN_FLIGHT
    return plan.REGS, plan.SMEM, plan.LOADS_IN_FLIGHT


def _ptxas_resources(log: str, arch: str) -> dict:
    """{kernel's mangled name: (registers, static smem bytes)} for ``arch`` from ``-Xptxas -v``."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"_cu_\w{8}\d+(\w+?)EvNS0_6ParamsE' for '(\w+)'", line)
        if "Compiling entry" in line:
            cur = m.group(1) if m and m.group(2) == arch else None
        used = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if used and cur is not None:
            out[cur] = (int(used.group(1)), int(used.group(2)))
            cur = None
    return out


def test_launch_plan_resources_match_the_compile(compiled):
    """lora_kernels.plan.cuda's registers and shared memory are what ptxas reports (sm_90a, fused bf16)."""
    from lora_kernels.plan import cuda as plan

    rc, log, _, _ = compiled["lora_linear.cu"]
    assert rc == 0
    res = _ptxas_resources(log, "sm_90a")
    for (kernel, mt), name in FUSED_BF16.items():
        found = [v for k, v in res.items() if k.startswith(name)]
        assert len(found) == 1, f"{name} not (or twice) in the ptxas report: {sorted(res)}"
        regs, smem = found[0]
        plan_regs, plan_smem, _ = _plan_tables(plan, kernel)
        assert smem == plan_smem[mt], f"{kernel} MT={mt}: ptxas says {smem} B of shared memory, the plan {plan_smem[mt]}"
        assert regs == plan_regs[mt], f"{kernel} MT={mt}: ptxas says {regs} registers, the plan {plan_regs[mt]}"


# --- loads in flight, read from the SASS ---------------------------------------------------------

_SASS_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def _sass_functions(sass: str) -> dict[str, list[tuple[int, str, list[str]]]]:
    """{mangled name: [(address, opcode, operands)]} from ``cuobjdump -sass``."""
    out: dict[str, list] = {}
    body = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            body = out.setdefault(m.group(1), [])
            continue
        i = _SASS_INSN.search(line)
        if i and body is not None:
            ops = [o.strip() for o in i.group(3).split(",")] if i.group(3).strip() else []
            body.append((int(i.group(1), 16), i.group(2), ops))
    return out


def _regs(operand: str) -> list[int]:
    return [int(r) for r in re.findall(r"\bR(\d+)\b", operand)]


def _main_loop(body):
    """The instructions of the backward branch's loop that holds the most HMMAs (the K loop)."""
    best, loop = -1, []
    for addr, opc, ops in body:
        target = re.match(r"(0x[0-9a-f]+)", ops[-1]) if opc.startswith("BRA") and ops else None
        if target and int(target.group(1), 16) < addr:
            cand = [i for i in body if int(target.group(1), 16) <= i[0] <= addr]
            n = sum(i[1].startswith("HMMA") for i in cand)
            if n > best:
                best, loop = n, cand
    return loop


def sass_loads_in_flight(loop, width: int = 16) -> tuple[int, int]:
    """(``width``-byte global loads per iteration, most of them in flight at once) in a loop's SASS.

    A load is in flight from its LDG (LDG.E.128 for 16 bytes, LDG.E for 4, LDG.E.U16 for 2) until the
    first instruction that reads one of its destination registers. Two passes over the body: a
    software pipeline's loads are read in the next iteration, so the second pass sees what the back
    edge carries. cp.async's LDGSTS (global -> shared, no register destination) is not counted: it
    is awaited by DEPBAR, not by a register read.
    """
    suffix = {16: ".128", 8: ".64", 4: "", 2: ".U16"}[width]
    nregs = max(1, width // 4)
    pending: list[int] = []
    per_iter = peak = 0
    for second in (False, True):
        for _, opc, ops in loop:
            srcs = [o for o in ops if "[" in o] if opc.startswith(("LDG", "STG", "LDS", "STS")) else ops[1:]
            used = {r for o in srcs for r in _regs(o)}
            pending = [p for p in pending if not used & set(range(p, p + nregs))]
            size = re.match(r"LDG\.E((?:\.(?:128|64|U16|S16|U8|S8))?)", opc)
            if size and size.group(1) == suffix:
                pending.append(_regs(ops[0])[0])
                per_iter += not second
            if second:
                peak = max(peak, len(pending))
    return per_iter, peak


@pytest.mark.parametrize("arch", ARCHES)
def test_launch_plan_loads_in_flight_match_the_sass(compiled, arch):
    """The loads in flight that the launch plan uses are counted in the compiled K loop (bf16 fused
    kernel, per MT: W and x in skinny_kernel, W alone in wide_kernel, whose x goes by cp.async); on sm_80 they must be the same (one source, one schedule shape). Every load of an
    iteration is in flight at once: the software pipeline was not undone by the scheduler."""
    from lora_kernels.plan import cuda as plan

    sass = _sass(compiled, arch)
    found = {}
    for name, body in _sass_functions(sass).items():
        for key, prefix in FUSED_BF16.items():
            if prefix in name:
                found[key] = sass_loads_in_flight(_main_loop(body))
    assert sorted(found) == sorted(FUSED_BF16), f"fused bf16 kernels not found in the {arch} SASS: {sorted(found)}"
    for (kernel, mt), (per_iter, peak) in found.items():
        print(f"{arch} {kernel} MT={mt}: {per_iter} LDG.E.128 per iteration, {peak} in flight")
        want = _plan_tables(plan, kernel)[2][mt]
        assert peak == want, (f"{arch} {kernel} MT={mt}: {peak} 16-byte loads in flight in the SASS, the plan says "
                              f"{want}: update lora_kernels/plan/cuda.py")
        assert peak >= 0.8 * per_iter, f"{arch} {kernel} MT={mt}: only {peak} of {per_iter} loads in flight: loads wait on MMAs"


@pytest.mark.parametrize("arch", ARCHES)
def test_vector_path_loads_in_the_sass(compiled, arch):
    """The vector path (rows not 16-byte aligned) really loads 4 or 2 bytes at a time, none wider, and
    keeps as many loads in flight as the plan says (VECTOR_LOADS_IN_FLIGHT), for the fused and the
    shrink kernels of both 2-byte dtypes."""
    from lora_kernels.plan import cuda as plan

    sass = _sass(compiled, arch)
    seen = set()
    for name, body in _sass_functions(sass).items():
        m = re.search(r"skinny_kernelI(13__nv_bfloat16|6__half)Li1ELb1ELb([01])ELi([12])EE", name)
        if not m:
            continue
        v = int(m.group(3))
        seen.add((m.group(1), m.group(2), v))
        loop = _main_loop(body)
        widths = {re.match(r"LDG\.E((?:\.(?:128|64|U16|S16|U8|S8))?)", o).group(1) for _, o, _ in loop
                  if o.startswith("LDG")}
        assert widths == {"" if v == 2 else ".U16"}, f"{name}: loads {widths} in the K loop, expected {2 * v}-byte only"
        per_iter, peak = sass_loads_in_flight(loop, width=2 * v)
        print(f"{arch} {m.group(1)} shrink={m.group(2)} V={v}: {per_iter} loads per iteration, {peak} in flight")
        assert peak == plan.VECTOR_LOADS_IN_FLIGHT[v], (f"{name}: {peak} loads in flight in the SASS, the plan says "
                                                        f"{plan.VECTOR_LOADS_IN_FLIGHT[v]}")
    assert len(seen) == 8, f"vector-path kernels missing from the {arch} SASS: {sorted(seen)}"


def test_sass_counter_sees_an_interleaved_loop():
    """The counter itself: loads each read right after issue are 1 in flight; loads all issued
    before their readers are all in flight (a counter that always says 'many' would pass anything)."""
    def insn(a, opc, *ops):
        return (a, opc, list(ops))
    serial = [insn(0, "LDG.E.128.CONSTANT", "R4", "desc[UR6][R2.64]"), insn(16, "HMMA.16816.F32.BF16", "R8", "R4", "R6", "R8"),
              insn(32, "LDG.E.128.CONSTANT", "R12", "desc[UR6][R2.64+0x200]"),
              insn(48, "HMMA.16816.F32.BF16", "R8", "R12", "R14", "R8"), insn(64, "BRA", "0x0")]
    assert sass_loads_in_flight(serial) == (2, 1)
    hoisted = [serial[0], serial[2], serial[1], serial[3], serial[4]]
    assert sass_loads_in_flight(hoisted) == (2, 2)
    # A cp.async (global -> shared) is not a load into registers: not counted.
    staged = [insn(0, "LDGSTS.E.BYPASS.128", "[R5]", "desc[UR6][R2.64]", "P1"), *hoisted]
    assert sass_loads_in_flight(staged) == (2, 2)


def test_launch_plan_rules():
    """Design rules of the CUDA kernels' launch plan (predictions; printed for the report)."""
    from lora_kernels.plan import cuda as plan
    from lora_kernels.plan.gpus import GPUS

    for gpu in GPUS.values():
        rows = plan.plan_rows(gpu, ranks=(8, 16, 64), ms=(1, 16, 32, 64))
        rows += plan.plan_rows(gpu, ranks=(16,), ms=(16, 64), distinct=True)
        print(f"\n{gpu.name} (predictions)\n" + plan.format_rows(rows))
        for r in rows:
            where = f"{gpu.name} {r['K']}->{r['N']} r={r['r']} M={r['M']} T={r['T']}"
            assert r["label"] == "prediction"
            assert r["bytes_ratio"] <= 1.03, f"{where}: moves {r['bytes_ratio']}x the minimum bytes"
            # Every grid fills the SMs (N = 1024: K split across blocks).
            assert r["blocks_per_sm_grid"] >= 1, f"{where}: the grid leaves SMs idle"
            # Decode up to 16 tokens: W in flight covers the bandwidth-latency product and L2 serves the x
            # re-reads, so the kernel is predicted within ~5% of the base GEMM (r = 64: A and B add bytes).
            if r["M"] <= 16 and r["T"] == 1:
                assert r["in_flight_kib_per_sm"] >= r["needed_kib_per_sm"], f"{where}: too few loads in flight"
                assert r["predicted_vs_base"] <= 1.06, f"{where}: predicted {r['predicted_vs_base']}x the base GEMM"
            # 17..64 tokens on the wide kernel: x staged once per 64 columns keeps L2 traffic under what L2
            # serves in W's HBM time (the 16-column kernel pulled (1 + M/16)·|W|: 1.4-1.6x predicted); what
            # is left is the K parts' join. N = 1024 stays on skinny_kernel and misses (README).
            if r["kernels"] == "shrink+wide" and r["T"] == 1:
                assert r["in_flight_kib_per_sm"] >= r["needed_kib_per_sm"], f"{where}: too few loads in flight"
                assert r["l2_bytes_per_w"] <= 2.5, f"{where}: L2 traffic {r['l2_bytes_per_w']}x W"
                assert r["predicted_vs_base"] <= 1.08, f"{where}: predicted {r['predicted_vs_base']}x the base GEMM"


def test_kernel_files_include_only_cuda_headers():
    allowed_std = {"cstdint", "cstddef", "climits", "cfloat", "cmath", "type_traits", "utility", "algorithm"}
    for path in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")):
        for inc in re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.M):
            ok = (inc in allowed_std or re.fullmatch(r"(cuda|cuda_[a-z0-9_]+|mma|cooperative_groups)(\.h|\.hpp)?", inc)
                  or (CSRC / inc).is_file() and inc.endswith(".cuh"))
            assert ok, f"{path.name} includes {inc!r}: kernel files may include CUDA headers only (torch goes in bindings.cpp)"


def test_bindings_compile_against_torch_headers(tmp_path):
    """Syntax-check csrc/bindings.cpp with this torch's headers (C++20, as torch's cpp_extension).

    A CPU-only torch ships the c10/cuda headers but not the one generated at build time,
    c10/cuda/impl/cuda_cmake_macros.h; a stand-in with the CUDA wheels' content (one define) is
    put on the include path then. The full compile and link is test_whole_extension_builds.
    """
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    nvcc = _nvcc()
    if cxx is None or nvcc is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers (nvcc not found)")
    cuda_inc = Path(cuda.cuda_home()) / "include"
    if not (cuda_inc / "cuda_runtime.h").is_file():
        pytest.skip(f"no cuda_runtime.h under {cuda_inc}")
    incs = [f"-I{p}" for p in include_paths()]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in include_paths()):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(f"-I{tmp_path}")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", *incs, f"-I{cuda_inc}", f"-I{CSRC}", str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bindings.cpp does not compile:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"


def _cuda_torch_python() -> str | None:
    env = os.environ.get("LORA_KERNELS_CUDA_PYTHON")
    if env:
        return env
    return sys.executable if torch.version.cuda is not None else None


def test_whole_extension_builds(tmp_path):
    """bindings.cpp + kernels, compiled and linked by torch.utils.cpp_extension.load (nvcc + ninja).

    Needs a CUDA build of torch: this interpreter's, or the python named by
    LORA_KERNELS_CUDA_PYTHON (e.g. a venv with ``pip install torch==2.14.1`` + ninja: ~1 min to
    install from the local wheel cache, ~40 s to build here for sm_90a). No GPU needed.
    """
    python = _cuda_torch_python()
    if python is None:
        pytest.skip("no CUDA build of torch here (set LORA_KERNELS_CUDA_PYTHON to a python that has one)")
    if _nvcc() is None:
        pytest.skip("nvcc not found")
    script = textwrap.dedent(f"""
        import sys, torch
        from torch.utils import cpp_extension
        assert torch.version.cuda is not None, "not a CUDA build of torch: " + torch.__version__
        src = {str(CSRC)!r}
        cpp_extension.load(name="lora_kernels_cuda_citest", sources=[src + "/bindings.cpp"] + {[str(p) for p in KERNEL_FILES]!r},
                           extra_include_paths=[src], extra_cflags=["-O1"], extra_cuda_cflags=["-O1"],
                           is_python_module=False, build_directory={str(tmp_path)!r})
        for op in ("cuda_lora_linear", "cuda_lora_linear_mixed"):
            print(getattr(torch.ops.lora_kernels, op).default._schema)
        # The fake implementations: registered from lora_kernels.ops.cuda (the module the C++
        # set_python_module names), run on meta tensors (no GPU needed).
        sys.path.insert(0, {str(ROOT)!r})
        from lora_kernels.ops import cuda
        cuda._register_fakes()
        x = torch.empty(3, 5, 64, device="meta", dtype=torch.bfloat16)
        w = torch.empty(48, 64, device="meta", dtype=torch.bfloat16)
        a, b = torch.empty(8, 64, device="meta", dtype=torch.bfloat16), torch.empty(48, 8, device="meta", dtype=torch.bfloat16)
        y = torch.ops.lora_kernels.cuda_lora_linear(x, w, None, a, b, 1.0)
        assert y.shape == (3, 5, 48), y.shape
        ids = torch.empty(15, device="meta", dtype=torch.long)
        ym = torch.ops.lora_kernels.cuda_lora_linear_mixed(x.reshape(15, 64), w, None, a[None], b[None], torch.empty(1, device="meta"),
                                                           ids, ids, torch.empty(2, 3, device="meta", dtype=torch.int32), 8)
        assert ym.shape == (15, 48), ym.shape
        print("fakes ok")
    """)
    # One arch: both are already compiled by test_kernels_compile_for_both_arches; this is the link.
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0a", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.setdefault("CUDA_HOME", cuda.cuda_home())
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"the extension did not build:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "lora_kernels::cuda_lora_linear(" in proc.stdout and "lora_kernels::cuda_lora_linear_mixed(" in proc.stdout
    assert "fakes ok" in proc.stdout


# --- CPU behaviour -----------------------------------------------------------------------------

def test_import_never_loads_the_extension():
    code = ("import sys, lora_kernels as lk; lk.available_backends(); from lora_kernels.ops import cuda; "
            "assert cuda._loaded is None, cuda._loaded; "
            "assert not any(m.startswith('lora_kernels._cuda') for m in sys.modules); "
            "assert 'torch.utils.cpp_extension' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_status_gives_a_reason():
    st = cuda.status()
    assert isinstance(st.reason, str) and st.reason
    if torch.version.cuda is None:
        assert not st.available and "CPU-only" in st.reason
    elif not torch.cuda.is_available():
        assert not st.available and "GPU" in st.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_explicit_cuda_backend_raises_with_reason():
    import lora_kernels as lk

    x, w, a, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: .+"):
        lk.ops.lora_linear(x, w, None, a, b, backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda.lora_linear(x, w, None, a, b)


def test_fake_implementations_shapes():
    x = torch.empty(3, 5, 16, device="meta", dtype=torch.bfloat16)
    w = torch.empty(24, 16, device="meta", dtype=torch.bfloat16)
    y = cuda.fake_lora_linear(x, w, None, torch.empty(4, 16, device="meta"), torch.empty(24, 4, device="meta"), 1.0)
    assert y.shape == (3, 5, 24) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    y = cuda.fake_lora_linear_mixed(x[0], w, None, None, None, None, None, None, None, 8)
    assert y.shape == (5, 24)


@pytest.mark.parametrize("ids, want_tt", [
    ([0, 1, 2, 3], 8),                       # one token per task: BGMV tiles
    ([-1, 2, 2, -1, 0], 8),
    ([1] * 20 + [0] * 3, 32),                # a long segment: SGMV tiles
    ([0] * 130, 64),
    ([-1, -1], 8),                           # no task at all: no tile
])
def test_tiles_cover_each_task_row_once(ids, want_tt):
    routing = Routing(torch.tensor(ids), 4)
    tiles, tt = cuda.tiles_of(routing, "cpu")
    assert tt == want_tt and tiles.dtype == torch.int32 and tiles.shape[1] == 3
    seen = []
    for task, start, count in tiles.tolist():
        assert 1 <= count <= tt
        rows = routing.order[start:start + count].tolist()
        assert all(ids[r] == task for r in rows)
        seen += rows
    assert sorted(seen) == [i for i, t in enumerate(ids) if t >= 0]
    assert cuda.tiles_of(routing, "cpu")[0] is tiles  # cached on the routing: built once per batch


def _setup_cuda_extensions():
    """setup.py's _cuda_extensions, without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_cuda_extensions")
    ns = {"os": os, "HERE": str(ROOT)}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    return ns["_cuda_extensions"]


def test_setup_cuda_extensions_flags(monkeypatch):
    fn = _setup_cuda_extensions()
    monkeypatch.setenv("LORA_KERNELS_BUILD_CUDA", "0")
    assert fn() == ([], {})
    if torch.version.cuda is None:
        monkeypatch.delenv("LORA_KERNELS_BUILD_CUDA")
        assert fn() == ([], {})  # CPU torch: nothing to build, pip install still works
        monkeypatch.setenv("LORA_KERNELS_BUILD_CUDA", "1")
        with pytest.raises(RuntimeError, match="CPU-only"):
            fn()
    elif _nvcc() is not None:
        monkeypatch.delenv("LORA_KERNELS_BUILD_CUDA")
        exts, cmd = fn()
        assert exts[0].name == "lora_kernels._cuda" and "build_ext" in cmd
        assert any(s.endswith("bindings.cpp") for s in exts[0].sources)


def test_setup_without_torch_builds_nothing(tmp_path):
    """pip's isolated build env has no torch: _cuda_extensions must return nothing, not fail."""
    src = (ROOT / "setup.py").read_text()
    code = textwrap.dedent("""
        import builtins, os, sys
        real = builtins.__import__
        def no_torch(name, *a, **k):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("no torch in the isolated build env")
            return real(name, *a, **k)
        builtins.__import__ = no_torch
        import ast
        tree = ast.parse(open(sys.argv[1]).read())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_cuda_extensions")
        ns = {"os": os, "HERE": os.path.dirname(sys.argv[1])}
        exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
        print(ns["_cuda_extensions"]())
    """)
    env = {k: v for k, v in os.environ.items() if k != "LORA_KERNELS_BUILD_CUDA"}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "setup.py")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "([], {})" in proc.stdout, proc.stderr[-2000:]
    assert "_cuda_extensions" in src


# --- GPU ---------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    st = cuda.status()
    assert st.available, f"a GPU is visible but the CUDA backend is not available: {st.reason}"
    cuda.load()  # builds on first use: a failure here is a test failure, not a skip
    return cuda


def _poison_pool(*numels, dtype=torch.float32, copies=4):
    """Fill the caching allocator's free blocks of these sizes with NaN: reused memory is poisoned."""
    bufs = [poisoned((n,), dtype, "cuda") for n in numels for _ in range(copies)]
    torch.cuda.synchronize()
    del bufs


def _single_inputs(m, k, n, r, dtype, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    bb = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    a = (torch.randn(r, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, r, device="cuda", generator=g).to(dtype)
    return x, w, bb, a, b


def _ref_single(x, w, bb, a, b, s):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.lora_linear(d(x), d(w), d(bb), d(a), d(b), s)


SINGLE_CASES = [  # (M, K, N, r)
    (1, 64, 48, 1), (3, 2049, 129, 16), (8, 4096, 4096, 16), (13, 264, 1000, 256),
    (16, 1024, 2048, 64), (33, 520, 72, 7), (64, 4096, 1024, 64), (65, 256, 136, 16), (300, 1032, 520, 33),
    # wide_kernel (17..64 tokens where its grid needs <= 4 K parts) and the wide expand-only of prefill
    (48, 4096, 4096, 16), (20, 1032, 6000, 8), (130, 512, 4096, 16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,r", SINGLE_CASES)
def test_single_vs_reference(ext, m, k, n, r, dtype):
    x, w, bb, a, b = _single_inputs(m, k, n, r, dtype)
    _poison_pool(m * n, m * n // 2 + 1, 64 * r * m, dtype=dtype)
    with torch.no_grad():
        y = ext.lora_linear(x, w, bb, a, b, 0.75)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, _ref_single(x, w, bb, a, b, 0.75), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_single_misaligned_and_strided(ext, dtype):
    m, k, n, r = 5, 512, 260, 8
    x, w, bb, a, b = _single_inputs(m, k, n, r, dtype)
    xs = torch.empty(m * k + 1, device="cuda", dtype=dtype)[1:].view(m, k)  # contiguous, 2-byte aligned only
    xs.copy_(x)
    wt = w.t().contiguous().t()  # non-contiguous weight: made contiguous by the op
    with torch.no_grad():
        y = ext.lora_linear(xs, wt, bb, a, b, 2.0)
        y3 = ext.lora_linear(x.view(1, m, k), w, None, a, b, 2.0)
    ref = _ref_single(x, w, bb, a, b, 2.0)
    assert_close(y, ref, dtype)
    assert_close(y3, _ref_single(x, w, None, a, b, 2.0).view(1, m, n), dtype)


ODD_K_CASES = [  # (M, K, N, r): K % 8 != 0. M <= 8: the vector path; M > 8: cuBLAS base + LoRA-term kernels
    (1, 17, 129, 1), (5, 2049, 1000, 16), (8, 1001, 4096, 64), (3, 4100, 520, 8), (8, 4098, 256, 1),
    (9, 1001, 264, 8), (33, 4098, 520, 16), (64, 17, 136, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r", ODD_K_CASES)
def test_single_odd_k_vs_reference(ext, m, k, n, r, dtype):
    x, w, bb, a, b = _single_inputs(m, k, n, r, dtype, seed=k)
    _poison_pool(m * n, 64 * r * m, dtype=dtype)
    with torch.no_grad():
        y = ext.lora_linear(x, w, bb, a, b, 0.75)
    assert_close(y, _ref_single(x, w, bb, a, b, 0.75), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_off,w_pad", [(1, 0), (2, 0), (4, 0), (0, 1), (0, 2), (3, 3)])
@pytest.mark.parametrize("m", [1, 8, 9, 40])
def test_misaligned_rows_vs_reference(ext, m, x_off, w_pad, dtype):
    """x starting 2, 4 or 8 bytes past a 16-byte boundary, W a column slice with an odd or even row
    stride: 2- or 4-byte loads on tensor cores (M <= 8), cuBLAS + LoRA-term kernels above."""
    k, n, r = 1032, 264, 8
    x, w, bb, a, b = _single_inputs(m, k, n, r, dtype, seed=m + x_off)
    xs = torch.full((m * k + x_off,), float("nan"), device="cuda", dtype=dtype)[x_off:].view(m, k)
    xs.copy_(x)
    wide = torch.full((n, k + w_pad), float("nan"), device="cuda", dtype=dtype)
    ws = wide[:, :k]
    ws.copy_(w)
    with torch.no_grad():
        y = ext.lora_linear(xs, ws, bb, a, b, 1.5)
    assert_close(y, _ref_single(x, w, bb, a, b, 1.5), dtype)
    ids = _ids("random", m, 3, seed=m).cuda()
    a3, b3 = a.expand(3, r, k).contiguous(), b.expand(3, n, r).contiguous()
    scales = torch.tensor([0.5, 1.0, 2.0], device="cuda")
    with torch.no_grad():
        ym = ext.lora_linear_mixed(xs, ws, bb, a3, b3, scales, ids)
    ref = reference.lora_linear_mixed(x.double(), w.double(), bb.double(), a3.double(), b3.double(), scales.double(), ids)
    assert_close(ym, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [8, 9, 16, 64, 65])
def test_fp32_above_8_rows_vs_reference(ext, m):
    """fp32 above 8 rows: cuBLAS for x·Wᵀ + b, the kernels for the LoRA term only (the scalar fused
    kernel would read W once per 8 rows)."""
    dtype = torch.float32
    x, w, bb, a, b = _single_inputs(m, 2049, 1000, 16, dtype, seed=m)
    _poison_pool(m * 1000, dtype=dtype)
    with torch.no_grad():
        y = ext.lora_linear(x, w, bb, a, b, 0.5)
    assert_close(y, _ref_single(x, w, bb, a, b, 0.5), dtype)
    x, w, bb, a, b, scales = _mixed_inputs(m, 520, 264, 8, 4, dtype, seed=m)
    ids = _ids("random", m, 4, seed=m).cuda()
    with torch.no_grad():
        y = ext.lora_linear_mixed(x, w, bb, a, b, scales, ids)
        base = ext.lora_linear_mixed(x, w, bb, a, b, scales, torch.full_like(ids, -1))
    ref = reference.lora_linear_mixed(x.double(), w.double(), bb.double(), a.double(), b.double(), scales.double(), ids)
    assert_close(y, ref, dtype)
    assert torch.equal(y[ids < 0], base[ids < 0])


@pytest.mark.gpu
def test_weight_slices_are_not_copied(ext):
    """A weight with contiguous rows and a longer row stride (a column slice) is read in place: no
    per-call copy of W; one with non-contiguous rows (a transposed view) is copied with a warning."""
    dtype = torch.bfloat16
    m, k, n, r = 4, 512, 264, 8
    x, w, bb, a, b = _single_inputs(m, k, n, r, dtype, seed=7)
    wide = torch.randn(n, k + 64, device="cuda", dtype=dtype)
    wide[:, :k] = w
    ws = wide[:, :k]  # row stride k + 64
    torch.cuda.synchronize()
    with torch.no_grad():
        before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
        y = ext.lora_linear(x, ws, bb, a, b, 1.0)
        torch.cuda.synchronize()
        allocs = torch.cuda.memory_stats().get("allocation.all.allocated", 0) - before
    assert_close(y, _ref_single(x, w, bb, a, b, 1.0), dtype)
    assert allocs <= 2, f"{allocs} allocations for a strided weight: expected y and the h workspace only"
    with torch.no_grad(), pytest.warns(UserWarning, match="non-contiguous rows"):
        yt = ext.lora_linear(x, w.t().contiguous().t(), bb, a, b, 1.0)
    assert_close(yt, _ref_single(x, w, bb, a, b, 1.0), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r", [(1, 4096, 4096, 16), (16, 2048, 3000, 64), (100, 512, 1024, 8)])
def test_single_vs_triton(ext, m, k, n, r, dtype):
    import lora_kernels as lk

    if not lk.available_backends()["triton"].available:
        pytest.skip("triton not available")
    x, w, bb, a, b = _single_inputs(m, k, n, r, dtype, seed=3)
    with torch.no_grad():
        y = ext.lora_linear(x, w, bb, a, b, 0.5)
        yt = lk.ops.lora_linear(x, w, bb, a, b, 0.5, backend="triton")
    assert_close(y, yt.double(), dtype, "cuda vs triton")


def _mixed_inputs(m, k, n, r, t, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    bb = torch.randn(n, device="cuda", generator=g).to(dtype)
    a = (torch.randn(t, r, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(t, n, r, device="cuda", generator=g).to(dtype)
    scales = torch.rand(t, device="cuda", generator=g) + 0.5
    return x, w, bb, a, b, scales


def _ids(kind, m, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "same":
        return torch.full((m,), t - 1, dtype=torch.long)
    if kind == "distinct":
        return torch.arange(m) % t
    if kind == "none":
        return torch.full((m,), -1, dtype=torch.long)
    return torch.randint(-1, t, (m,), generator=g)  # "random", with -1 rows


MIXED_CASES = [  # (M, K, N, r, T)
    (1, 64, 48, 1, 1), (5, 2049, 129, 16, 3), (16, 1024, 2056, 64, 16), (64, 4096, 1024, 16, 64),
    (40, 520, 264, 256, 4), (100, 264, 136, 8, 5), (257, 1032, 520, 33, 3), (64, 2048, 4096, 16, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["same", "distinct", "random", "none"])
@pytest.mark.parametrize("m,k,n,r,t", MIXED_CASES)
def test_mixed_vs_reference(ext, m, k, n, r, t, kind, dtype):
    x, w, bb, a, b, scales = _mixed_inputs(m, k, n, r, t, dtype)
    ids = _ids(kind, m, t).cuda()
    _poison_pool(m * n, m * r * 16, dtype=dtype)
    with torch.no_grad():
        y = ext.lora_linear_mixed(x, w, bb, a, b, scales, ids)
        base = ext.lora_linear_mixed(x, w, bb, a, b, scales, torch.full_like(ids, -1))
    ref = reference.lora_linear_mixed(x.double(), w.double(), bb.double(), a.double(), b.double(), scales.double(), ids)
    assert_close(y, ref, dtype)
    none = ids < 0
    # -1 rows: exactly the base output (no LoRA term), bit for bit; above 64 rows that is cuBLAS's.
    assert torch.equal(y[none], base[none])
    if m > 64:
        assert torch.equal(y[none], torch.nn.functional.linear(x, w, bb)[none])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,t", [(4, 4), (64, 64), (128, 3)])
def test_mixed_vs_triton(ext, m, t, dtype):
    import lora_kernels as lk

    if not lk.available_backends()["triton"].available:
        pytest.skip("triton not available")
    x, w, bb, a, b, scales = _mixed_inputs(m, 1024, 2048, 16, t, dtype, seed=5)
    ids = _ids("random", m, t, seed=1).cuda()
    with torch.no_grad():
        y = ext.lora_linear_mixed(x, w, bb, a, b, scales, ids)
        yt = lk.ops.lora_linear_mixed(x, w, bb, a, b, scales, ids, backend="triton")
    assert_close(y, yt.double(), dtype, "cuda vs triton")


@pytest.mark.gpu
def test_mixed_per_sample_ids_and_routing_reuse(ext):
    dtype = torch.bfloat16
    x, w, bb, a, b, scales = _mixed_inputs(12, 256, 136, 8, 3, dtype)
    x3 = x.view(3, 4, 256)  # one id per sample, 4 rows each
    routing = Routing(torch.tensor([2, -1, 0]), 3)
    with torch.no_grad():
        y1 = ext.lora_linear_mixed(x3, w, bb, a, b, scales, routing)
        y2 = ext.lora_linear_mixed(x3, w, bb, a, b, scales, routing)  # cached tiles
    ref = reference.lora_linear_mixed(x3.double(), w.double(), bb.double(), a.double(), b.double(), scales.double(), routing)
    assert_close(y1, ref, dtype)
    assert torch.equal(y1, y2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_uses_reference_backward(ext, dtype):
    x, w, bb, a, b = _single_inputs(6, 264, 72, 8, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, bb, a, b)]
    y = ext.lora_linear(*leaves, 1.5)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_leaves = [t.double().clone().requires_grad_(True) for t in (x, w, bb, a, b)]
    reference.lora_linear(*ref_leaves, 1.5).backward(dy.double())
    for got, want, name in zip(leaves, ref_leaves, ["x", "weight", "bias", "lora_a", "lora_b"]):
        assert_close(got.grad, want.grad, dtype, f"grad {name}")
    # mixed
    x, w, bb, a, b, scales = _mixed_inputs(7, 264, 72, 8, 3, dtype)
    ids = torch.tensor([0, -1, 2, 2, 1, -1, 0], device="cuda")
    la = a.clone().requires_grad_(True)
    ext.lora_linear_mixed(x, w, bb, la, b, scales, ids).sum().backward()
    la64 = a.double().clone().requires_grad_(True)
    reference.lora_linear_mixed(x.double(), w.double(), bb.double(), la64, b.double(), scales.double(), ids).sum().backward()
    assert_close(la.grad, la64.grad, dtype, "grad lora_a (mixed)")


@pytest.mark.gpu
def test_torch_compile_and_cuda_graph(ext):
    dtype = torch.bfloat16
    x, w, bb, a, b = _single_inputs(4, 1024, 512, 16, dtype)

    def f(x):
        return ext.lora_linear(x, w, bb, a, b, 0.5)

    with torch.no_grad():
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True)(x)
        assert torch.equal(eager, compiled)
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            f(static_x)  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f(static_x)
        static_x.copy_(x * 2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, f(x * 2))


@pytest.mark.gpu
def test_op_checks_are_clear(ext):
    x, w, bb, a, b = _single_inputs(2, 64, 32, 4, torch.float16)
    with pytest.raises(RuntimeError, match="lora_b must be"):
        torch.ops.lora_kernels.cuda_lora_linear(x, w, bb, a, b[:, :3], 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.lora_kernels.cuda_lora_linear(x, w.float(), bb, a, b, 1.0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        torch.ops.lora_kernels.cuda_lora_linear(x, w.cpu(), bb, a, b, 1.0)
