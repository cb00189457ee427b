"""The CUDA kernels of csrc/lora_linear.cu run on the CPU through a host emulator (no GPU needed).

tests/cuda_emu/include/ holds stand-ins for cuda_runtime.h / cuda_fp16.h / cuda_bf16.h: a block
runs as 256 fibers on one thread, switched at barriers (__syncthreads, warp collectives;
`static` for __shared__), and mma.sync.m16n8k16 is computed from the PTX fragment layout. The
same kernel source as the GPU build is compiled with g++ (tests/cuda_emu/harness.cpp), so this
checks the kernels' indexing, tiling, K splits, tails, the tensor-core fragment mapping, the
expand epilogue, -1 rows and the mixed-task tiles against the float64 reference, with poisoned
outputs and a NaN-poisoned workspace. Every global load is checked against the input buffers
(bounds and alignment: a read past a tensor or a misaligned 16-byte load fails the test), and the
programmatic-dependent-launch race is modelled: the fused kernel launched with PDL sees the shrink's
output only after its wait, and a binary without the wait (sm_80 code) must not be launched with PDL.
What it cannot check: speed, races that only real
concurrency shows, and the torch bindings (tests/test_cuda_ext.py covers those on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from lora_kernels.ops import reference
from lora_kernels.ops.routing import Routing
from tests.cuda_emu import emulator
from tests.cuda_emu.emulator import inputs as _inputs
from tests.cuda_emu.emulator import run
from tests.utils import assert_close


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if emulator.compiler() is None:
        pytest.skip("no C++ compiler")
    return emulator.build(tmp_path_factory.mktemp("emu") / "emu.so")


SINGLE = [  # (M, K, N, r): tails in every dim, r over the 64-wide expand chunk, several K splits
    (1, 64, 48, 1), (3, 72, 40, 16), (8, 264, 33, 8), (13, 40, 24, 70), (17, 600, 20, 5), (40, 96, 18, 3),
    (64, 256, 17, 2), (5, 37, 19, 4), (64, 1040, 20, 16), (24, 2056, 24, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n,r", SINGLE)
def test_single_task(emu, m, k, n, r, dtype):
    x, w, bias, a, b = _inputs(m, k, n, r, dtype)
    y, info = run(emu, x, w, bias, a, b, scale=0.75)
    if dtype != torch.float32 and k % 8 == 0:
        assert info % 1000 // 10 == 11, f"expected the tensor-core path, harness says {info}"
    ref = reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.75)
    assert_close(y, ref, dtype)


WIDE = [  # (M, K, N, num_sms): few SMs, so that wide_kernel's grid needs <= 4 K parts (fused_wide)
    (17, 128, 64, 1),    # one whole x chunk, 17 of a 32-token tile
    (32, 200, 70, 1),    # a whole chunk + a partial one, N past a 64-column block
    (33, 1000, 70, 4),   # 4 K parts, the last ending in a partial chunk; 33 of a 64-token tile
    (64, 392, 130, 2),   # 3 whole chunks + 8: both x buffers refilled; 3 column blocks
    (48, 2056, 24, 1),   # 16 chunks, N < 16 of the last block's 64 columns
]


@pytest.mark.parametrize("eager", [False, True], ids=["cp.async-late", "cp.async-at-issue"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n,num_sms", WIDE)
def test_wide_kernel(emu, m, k, n, num_sms, dtype, eager):
    """wide_kernel (17..64 tokens, 64 columns per block, x staged in shared memory by cp.async) against
    the float64 reference, single task and mixed tasks with -1 rows, under both cp.async schedules of
    the emulator (copies landing at their wait or at issue) with its shared-memory race check."""
    x, w, bias, a, b = _inputs(m, k, n, 5, dtype, seed=m + k)
    y, info = run(emu, x, w, bias, a, b, scale=0.75, num_sms=num_sms, cp_async_eager=eager)
    assert info % 100 == 11, f"expected wide_kernel on tensor cores, harness says {info}"
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.75), dtype)
    ids = torch.randint(-1, 3, (m,), generator=torch.Generator().manual_seed(m)).long()
    x, w, bias, a, b = _inputs(m, k, n, 5, dtype, t=3, seed=k)
    scales = torch.rand(3, generator=torch.Generator().manual_seed(k)) + 0.5
    y, info = run(emu, x, w, bias, a, b, scales=scales, routing=Routing(ids, 3), num_sms=num_sms, cp_async_eager=eager)
    assert info % 100 == 11
    ref = reference.lora_linear_mixed(x.double(), w.double(), bias.double(), a.double(), b.double(), scales.double(), ids)
    assert_close(y, ref, dtype)


def test_launch_plan_models_the_launchers_choices(emu):
    """lora_kernels.plan.cuda mirrors csrc's fused_wide and fused_parts (the kernel and the K parts per
    shape) exactly, over the benchmark shapes and odd ones, on 108 and 132 SMs; and fused_wide picks
    wide_kernel for 17..64 tokens at N = 4096 and skinny_kernel at N = 1024 (16 parts would be needed)."""
    from lora_kernels.plan import cuda as plan
    for sms in (108, 132):
        for k, n in plan.CASES_KN + [(4096, 2048), (4096, 3072), (1000, 70), (2056, 130), (128, 64)]:
            for m in (1, 8, 9, 16, 17, 32, 33, 48, 64):
                got = emu.emu_fused_choice(m, n, k, sms)
                assert (got // 10, got % 10 == 1) == (plan.fused_parts(m, n, k, sms), plan.is_wide(m, n, sms)), (
                    f"M={m} K={k} N={n} SMs={sms}: csrc chooses {got}, the plan models otherwise")
    assert emu.emu_fused_choice(64, 4096, 4096, 132) % 10 == 1 and emu.emu_fused_choice(17, 4096, 4096, 132) % 10 == 1
    assert emu.emu_fused_choice(64, 1024, 4096, 132) % 10 == 0 and emu.emu_fused_choice(16, 4096, 4096, 132) % 10 == 0


@pytest.mark.parametrize("num_sms", [1, 8, 132])
def test_k_splits_and_no_bias(emu, num_sms):
    dtype = torch.bfloat16
    x, w, _, a, b = _inputs(4, 1032, 30, 16, dtype, seed=2)
    y, info = run(emu, x, w, None, a, b, scale=2.0, num_sms=num_sms)
    if num_sms == 132:
        assert info // 1000 % 100 > 1, "expected a split shrink"
    assert_close(y, reference.lora_linear(x.double(), w.double(), None, a.double(), b.double(), 2.0), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m,k,n,num_sms", [(1, 4104, 24, 132), (16, 2056, 40, 132), (9, 3080, 17, 8), (64, 2048, 20, 132)])
def test_fused_k_split_across_blocks(emu, m, k, n, num_sms, dtype):
    """Small grids (few column blocks) split K across blocks: partials joined in part order by the
    last block of each tile (an int ticket the shrink zeroed), tails in the last part included."""
    x, w, bias, a, b = _inputs(m, k, n, 8, dtype, seed=k + n)
    y, info = run(emu, x, w, bias, a, b, scale=0.5, num_sms=num_sms)
    assert info // 100000 > 1, f"expected the fused kernel to split K, harness says {info}"
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5), dtype)
    ids = torch.randint(-1, 3, (m,), generator=torch.Generator().manual_seed(m)).long()
    x, w, bias, a, b = _inputs(m, k, n, 8, dtype, t=3, seed=k)
    scales = torch.rand(3) + 0.5
    y, info = run(emu, x, w, bias, a, b, scales=scales, routing=Routing(ids, 3), num_sms=num_sms)
    ref = reference.lora_linear_mixed(x.double(), w.double(), bias.double(), a.double(), b.double(), scales.double(), ids)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_misaligned_rows_take_the_scalar_path(emu, dtype):
    m, k, n, r = 3, 64, 24, 4
    x, w, bias, a, b = _inputs(m, k, n, r, dtype)
    xs = torch.empty(m * k + 1, dtype=dtype)[1:].view(m, k)  # 2-byte aligned only
    xs.copy_(x)
    y, info = run(emu, xs, w, bias, a, b, scale=1.0)
    assert info % 1000 == 0, f"misaligned x must not take the 16-byte path, harness says {info}"
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 1.0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expand_only_accumulates_into_base(emu, dtype):
    """Prefill (M > 64): y holds x·Wᵀ + b (cuBLAS on the GPU); the kernel adds the LoRA term only."""
    m, k, n, r = 70, 48, 20, 6
    x, w, bias, a, b = _inputs(m, k, n, r, dtype)
    base = torch.nn.functional.linear(x, w, bias)
    y, _ = run(emu, x, w, bias, a, b, scale=0.5, accumulate=True, y=base.clone())
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5), dtype)


def _ids(kind, m, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"same": torch.full((m,), t - 1), "distinct": torch.arange(m) % t, "none": torch.full((m,), -1),
            "random": torch.randint(-1, t, (m,), generator=g)}[kind].long()


MIXED = [(1, 64, 40, 4, 1), (6, 72, 33, 8, 3), (20, 40, 17, 70, 4), (64, 96, 24, 3, 64), (37, 37, 18, 5, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["same", "distinct", "random", "none"])
@pytest.mark.parametrize("m,k,n,r,t", MIXED)
def test_mixed_tasks(emu, m, k, n, r, t, kind, dtype):
    x, w, bias, a, b = _inputs(m, k, n, r, dtype, t=t)
    scales = torch.rand(t, generator=torch.Generator().manual_seed(1)) + 0.5
    ids = _ids(kind, m, t)
    routing = Routing(ids, t)
    y, _ = run(emu, x, w, bias, a, b, scales=scales, routing=routing)
    ref = reference.lora_linear_mixed(x.double(), w.double(), bias.double(), a.double(), b.double(), scales.double(), ids)
    assert_close(y, ref, dtype)
    base, _ = run(emu, x, w, bias, a, b, scales=scales, routing=Routing(torch.full_like(ids, -1), t))
    none = ids < 0
    assert torch.equal(y[none], base[none]), "-1 rows must be exactly the base output"


def test_mixed_expand_only(emu):
    dtype = torch.bfloat16
    m, t = 80, 5
    x, w, bias, a, b = _inputs(m, 40, 24, 8, dtype, t=t)
    scales = torch.rand(t) + 0.5
    ids = _ids("random", m, t, seed=3)
    base = torch.nn.functional.linear(x, w, bias)
    y, _ = run(emu, x, w, bias, a, b, scales=scales, routing=Routing(ids, t), accumulate=True, y=base.clone())
    ref = reference.lora_linear_mixed(x.double(), w.double(), bias.double(), a.double(), b.double(), scales.double(), ids)
    assert_close(y, ref, dtype)
    assert torch.equal(y[ids < 0], base[ids < 0]), "-1 rows must keep the base output bit for bit"


@pytest.mark.parametrize("binary_version", [80, 90])
def test_pdl_only_when_the_binary_has_the_wait(emu, binary_version):
    """On an sm_90 device running sm_80 code (no griddepcontrol.wait compiled in), PDL would read h
    before the shrink wrote it: the launcher must decide on the binary's architecture."""
    dtype = torch.bfloat16
    x, w, bias, a, b = _inputs(8, 264, 24, 8, dtype, seed=4)
    y, _ = run(emu, x, w, bias, a, b, scale=0.5, binary_version=binary_version)
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5), dtype)


@pytest.mark.parametrize("r", [1, 3, 5, 12])
def test_b_rows_not_16_byte_aligned(emu, r):
    """Ranks whose B rows are not a multiple of 16 bytes: the expand must not use 16-byte loads."""
    dtype = torch.bfloat16
    x, w, bias, a, b = _inputs(4, 64, 20, r, dtype, seed=r)
    y, _ = run(emu, x, w, bias, a, b, scale=1.0)
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 1.0), dtype)
