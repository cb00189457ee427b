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
    if dtype != torch.float32:  # every fp16/bf16 shape runs on tensor cores (K % 8 != 0: narrower loads)
        assert min(emulator.mma_counts(emu)) > 0, f"expected the tensor-core path, harness says {info}"
        assert emulator.load_sizes(emu, "weight") == ({16} if k % 8 == 0 else {2})
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
    assert info % 100 == 12, f"expected wide_kernel on tensor cores, harness says {info}"
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.75), dtype)
    ids = torch.randint(-1, 3, (m,), generator=torch.Generator().manual_seed(m)).long()
    x, w, bias, a, b = _inputs(m, k, n, 5, dtype, t=3, seed=k)
    scales = torch.rand(3, generator=torch.Generator().manual_seed(k)) + 0.5
    y, info = run(emu, x, w, bias, a, b, scales=scales, routing=Routing(ids, 3), num_sms=num_sms, cp_async_eager=eager)
    assert info % 100 == 12
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


def _width(k, *operands):
    """The load width (elements) the host must pick: the widest of 8, 2, 1 that K, every row stride
    and every base address allow (independent of csrc/'s mma_load_width, which it checks)."""
    for v in (8, 2):
        if k % v == 0 and all(t.data_ptr() % (2 * v) == 0 and t.stride(0) % v == 0 for t in operands):
            return v
    return 1


VECTOR = [  # (M, K, N, r, x offset, W row pad): rows that are not 16-byte aligned
    (1, 17, 40, 1, 0, 0), (5, 2049, 24, 4, 0, 0), (8, 1001, 33, 16, 0, 0),  # odd K: 2-byte loads
    (3, 4100, 20, 8, 0, 0), (7, 4098, 18, 1, 0, 0),  # K % 8 = 4, 2: 4-byte loads
    (4, 264, 24, 8, 1, 0), (4, 264, 24, 70, 2, 0), (6, 1032, 24, 8, 4, 0),  # x 2-, 4-, 8-byte aligned
    (2, 520, 40, 4, 0, 1), (2, 520, 40, 4, 0, 2),  # W a column slice: odd / even row stride
    (2, 3, 20, 1, 0, 0), (3, 1001, 24, 2, 3, 5),  # K < 8 (tail only); odd K, x offset and odd W stride together
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n,r,x_off,w_pad", VECTOR)
def test_vector_path(emu, m, k, n, r, x_off, w_pad, dtype):
    """fp16/bf16 rows that are not 16-byte aligned run on tensor cores with 4- or 2-byte loads (the
    widest the rows allow; the emulator faults a load wider than its address's alignment), the K tail
    guarded per element, against float64 with a poisoned output and NaN around every row."""
    x0, w0, bias, a, b = _inputs(m, k, n, r, dtype, seed=k + x_off)
    x, w = emulator.placed(x0, x_off), emulator.placed(w0, 0, w_pad)
    y, info = run(emu, x, w, bias, a, b, scale=0.75)
    v_fused, v_shrink = _width(k, x, w), _width(k, x, a)
    assert (v_fused, v_shrink) != (8, 8), "the case must not be 16-byte aligned"
    shrink_mmas, fused_mmas = emulator.mma_counts(emu)
    assert shrink_mmas > 0 and fused_mmas > 0, f"expected the tensor-core kernels, harness says {info}"
    assert emulator.load_sizes(emu, "weight") == {2 * v_fused}, emulator.load_sizes(emu, "weight")
    assert emulator.load_sizes(emu, "lora_a") == {2 * v_shrink}, emulator.load_sizes(emu, "lora_a")
    assert emulator.load_sizes(emu, "x") == {2 * v_fused, 2 * v_shrink}, emulator.load_sizes(emu, "x")
    ref = reference.lora_linear(x0.double(), w0.double(), bias.double(), a.double(), b.double(), 0.75)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_aligned_rows_keep_16_byte_loads(emu, dtype):
    x, w, bias, a, b = _inputs(5, 1040, 24, 8, dtype)
    y, _ = run(emu, x, w, bias, a, b, scale=0.5)
    assert emulator.load_sizes(emu, "weight") == {16} and emulator.load_sizes(emu, "x") == {16}
    assert_close(y, reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5), dtype)


def test_fused_rows_rule(emu):
    """Rows up to which the forward runs fused: 64 on the 16-byte tensor-core kernels, 8 on the 8-token
    ones (vector loads, fp32 and pre-sm_80 scalar), which would read W once per 8 rows above that."""
    x, w, *_ = _inputs(4, 64, 16, 1, torch.bfloat16)
    assert emulator.fused_max_rows(emu, x, w) == 64
    assert emulator.fused_max_rows(emu, x, w, allow_mma=False) == 8
    assert emulator.fused_max_rows(emu, emulator.placed(x, 1), w) == 8
    assert emulator.fused_max_rows(emu, x, emulator.placed(w, 0, 2)) == 8
    x, w, *_ = _inputs(4, 66, 16, 1, torch.float16)
    assert emulator.fused_max_rows(emu, x, w) == 8
    x, w, *_ = _inputs(4, 64, 16, 1, torch.float32)
    assert emulator.fused_max_rows(emu, x, w) == 8


@pytest.mark.parametrize("dtype,k,x_off", [(torch.float32, 72, 0), (torch.float32, 37, 0), (torch.bfloat16, 1001, 0),
                                           (torch.float16, 264, 1)], ids=str)
@pytest.mark.parametrize("m", [8, 9, 16, 64])
def test_8_token_paths_above_8_rows_run_the_lora_term_only(emu, m, k, x_off, dtype):
    """fp32 and the vector path above 8 rows: x·Wᵀ + b from the base GEMM (the harness stands in for
    cuBLAS), the kernels add the LoRA term only (W is not re-read once per 8 rows); up to 8 rows fused."""
    n, r = 24, 5
    x0, w, bias, a, b = _inputs(m, k, n, r, dtype, seed=m)
    x = emulator.placed(x0, x_off)
    y, info = run(emu, x, w, bias, a, b, scale=1.5, accumulate="auto")
    assert info % 10 == (1 if m > 8 else 0), f"M={m}: expected {'the LoRA term only' if m > 8 else 'fused'}, got {info}"
    ref = reference.lora_linear(x0.double(), w.double(), bias.double(), a.double(), b.double(), 1.5)
    assert_close(y, ref, dtype)


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


MIXED_VECTOR = [(6, 1001, 24, 8, 3, 0), (20, 4098, 17, 5, 4, 0), (8, 17, 40, 1, 8, 0), (8, 264, 33, 16, 3, 1),
                (12, 264, 20, 3, 5, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n,r,t,x_off", MIXED_VECTOR)
def test_mixed_tasks_vector_path(emu, m, k, n, r, t, x_off, dtype):
    """Mixed tasks (with -1 rows) on rows that are not 16-byte aligned, as the host runs them: fused up
    to 8 rows, the LoRA term on the base GEMM's output above; -1 rows are exactly the base."""
    x0, w, bias, a, b = _inputs(m, k, n, r, dtype, t=t, seed=k)
    x = emulator.placed(x0, x_off)
    scales = torch.rand(t, generator=torch.Generator().manual_seed(1)) + 0.5
    ids = _ids("random", m, t, seed=m)
    ids[0] = -1
    y, info = run(emu, x, w, bias, a, b, scales=scales, routing=Routing(ids, t), accumulate="auto")
    assert emulator.mma_counts(emu)[0] > 0 and emulator.load_sizes(emu, "lora_a") == {2 * _width(k, x, a[0])}
    ref = reference.lora_linear_mixed(x0.double(), w.double(), bias.double(), a.double(), b.double(), scales.double(), ids)
    assert_close(y, ref, dtype)
    base, _ = run(emu, x, w, bias, a, b, scales=scales, routing=Routing(torch.full_like(ids, -1), t), accumulate="auto")
    assert torch.equal(y[ids < 0], base[ids < 0]), "-1 rows must be exactly the base output"


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
