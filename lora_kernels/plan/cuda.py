"""Launch plan of the CUDA extension's kernels (csrc/lora_linear.cu), per benchmark case and GPU.

Every time here is a **prediction** of a stated model, not a measurement; a GPU run
(``python/gpu_check_cuda.py``) that disagrees corrects the constants below.

Per op call (decode, M <= 64: shrink + fused; prefill: cuBLAS base + shrink + expand-only), a row gives:
the kernels and grids, blocks per SM (256-thread blocks, from the registers and shared memory that
``nvcc -Xptxas -v`` reports, checked by tests/test_cuda_ext.py), HBM bytes against the minimum
(W, x, y once and each present task's A and B once), and the time as the largest of
- the HBM time: ``bytes / min(BW, SMs x bytes in flight per SM / latency)`` (Little's law), with the
  16-byte loads of W each thread keeps in flight as read in the SASS (LOADS_IN_FLIGHT, counted by
  tests/test_cuda_ext.py in the compiled kernel) and the blocks per SM that are both resident and
  present in the grid;
- the L2 time: what the SMs pull from L2 (W once, x once per column block, the K parts' partials
  written and read back) at ``L2_BW_RATIO x`` HBM bandwidth (the Triton plan's constant);
- the tensor-core time;
plus the serial join of the K parts (the last block of a tile reads every part's partial tile at one
SM's bandwidth) and one launch.

The fused forward is ``skinny_kernel`` up to 16 tokens (16 columns per block: x re-read per block is
M/16 of W, at most 1x) and ``wide_kernel`` for 17..64 tokens (64 columns per block, x staged once per
block in shared memory by cp.async: M/64 of W).
"""

from __future__ import annotations

import math

from .gpus import GPU
from .triton import L2_BW_RATIO, SM_BW

THREADS = 256               # per block, both kernels
WIDE_COLS = 64              # output columns per wide_kernel block (skinny_kernel: COLS)
COLS = 16
WIDE_CHUNK = 128            # k per x chunk staged by wide_kernel (kWideChunk): its K-part unit
# Registers/thread and static shared memory (bytes) of the fused bf16/fp16 kernels per MT (tokens per
# block = 8·MT), as ptxas reports for sm_90a (nvcc 13.0, -O3); tests/test_cuda_ext.py checks them
# against the compile, so they cannot drift from the code.
REGS = {1: 128, 2: 122, 4: 108, 8: 186}
SMEM = {1: 4752, 2: 9488, 4: 18960, 8: 37904}
WIDE_REGS = {4: 104, 8: 126}
WIDE_SMEM = {4: 21008, 8: 42000}
# 16-byte loads in flight per thread in the main K loop, per MT, **read from the SASS** of the sm_90a
# build: the most loads issued and not yet read by any instruction, over two passes of the loop body
# (the software pipeline carries a stage across the back edge). tests/test_cuda_ext.py re-counts them
# in the compiled kernel and fails when they differ. skinny_kernel: of the 2 + MT loads of a k step,
# 2 are W's (rows g and g+8), the MT of x hit L2. wide_kernel: all are W's (x goes global -> shared by
# cp.async, not through registers).
LOADS_IN_FLIGHT = {1: 12, 2: 16, 4: 10, 8: 18}
WIDE_LOADS_IN_FLIGHT = {4: 4, 8: 4}
# The vector path (fp16/bf16 rows that are not 16-byte aligned: K % 8 != 0, odd offsets or strides;
# csrc/lora_linear.cu ld_chunk) runs the same tensor-core kernel in 8-token blocks with V-element
# loads, V = 2 (4-byte) or 1 (2-byte): 8/V loads per thread per 16-byte chunk. Loads in flight per
# thread in its K loop, read from the SASS like LOADS_IN_FLIGHT (tests/test_cuda_ext.py): 48 for
# both, i.e. 192 B (V = 2, as the 16-byte path at MT = 1) or 96 B (V = 1) per thread, 2/3 of it W.
# Not in plan_rows (the benchmark shapes are aligned). Prediction, not modelled here: 4- and 2-byte
# loads move the same sectors with 4x / 8x the load instructions, so the vector path is expected to
# be bound by L1 request throughput below the 16-byte path's bandwidth, most for V = 1.
VECTOR_LOADS_IN_FLIGHT = {2: 48, 1: 48}
HBM_LATENCY_S = 700e-9      # loaded HBM latency (H100/H200 class), a model constant
FUSED_MAX_ROWS = 64         # csrc fused_max_rows on the 16-byte tensor-core path (8-token paths: 8)


def tile_tokens(m: int) -> int:
    return 8 if m <= 8 else 16 if m <= 16 else 32 if m <= 32 else 64


def is_wide(m: int, n: int, sms: int) -> bool:
    """wide_kernel runs the fused forward (csrc/lora_linear.cu fused_wide): 32/64-token tiles whose
    64-column grid needs at most 4 K parts to fill the SMs (below that, skinny_kernel's smaller join wins)."""
    if tile_tokens(m) <= 16:
        return False
    blocks = math.ceil(n / WIDE_COLS) * math.ceil(m / tile_tokens(m))
    return 2 * sms // blocks <= 4


def fused_parts(m: int, n: int, k: int, sms: int) -> int:
    """K parts of the fused kernel (csrc/lora_linear.cu fused_parts, tensor-core path): a grid smaller
    than the SM count splits K across blocks, in parts of whole pipeline stages (skinny: ~2 blocks per
    SM, rounded up) or whole x chunks (wide: at most 2 blocks per SM)."""
    wide = is_wide(m, n, sms)
    blocks = math.ceil(n / (WIDE_COLS if wide else COLS)) * math.ceil(m / tile_tokens(m))
    unit = WIDE_CHUNK if wide else 4 * 8 * 32
    want = 2 * sms // blocks if wide else 1 if blocks >= sms else math.ceil(2 * sms / blocks)
    want = min(want, k // unit)
    if want < 2:
        return 1
    per_part = math.ceil(math.ceil(k / want) / unit) * unit
    return math.ceil(k / per_part)


def blocks_per_sm(gpu: GPU, mt: int, wide: bool = False) -> int:
    """Resident 256-thread blocks per SM, by registers, shared memory and threads."""
    regs, smem = (WIDE_REGS[mt], WIDE_SMEM[mt]) if wide else (REGS[mt], SMEM[mt])
    by_regs = gpu.regs_per_sm // (regs * THREADS)
    by_smem = gpu.smem_per_sm // smem
    by_threads = gpu.max_threads_per_sm // THREADS
    return max(1, min(by_regs, by_smem, by_threads, gpu.max_blocks_per_sm))


def plan_row(gpu: GPU, k: int, n: int, r: int, m: int, tasks: int = 1, elem: int = 2) -> dict:
    """One case: ``m`` tokens, ``tasks`` distinct tasks present (1 = single task), bf16/fp16 (elem = 2)."""
    fused = m <= FUSED_MAX_ROWS
    tm = tile_tokens(m) if fused else 64
    mt = tm // 8
    wide = is_wide(m, n, gpu.sms) if fused else True  # prefill's expand-only: a large grid
    cols = WIDE_COLS if wide else COLS
    kparts = fused_parts(m, n, k, gpu.sms) if fused else 1
    grid = math.ceil(n / cols) * math.ceil(m / tm) * kparts
    resident = blocks_per_sm(gpu, mt, wide)
    per_sm = grid / gpu.sms
    active = min(per_sm, resident)  # blocks streaming W at once per SM (first wave)
    t = max(1, min(tasks, m))
    w_bytes = n * k * elem
    adapters = t * r * (k + n) * elem
    io = m * (k + n) * elem
    minimum = w_bytes + adapters + io
    # What the kernels move: + the fp32 h partials (written once, read by every column block's epilogue
    # from L2, so HBM sees them once) and, for prefill, cuBLAS's y write + the expand's y read-modify-write.
    h_bytes = 2 * m * r * 4
    # K parts: fp32 partials written and read back by the tile's last block within the kernel; they stay
    # in L2 (<= 8 MiB in these cases, 50 MiB of L2), so they are L2 traffic, not HBM bytes.
    part_l2_bytes = 2 * kparts * m * n * 4 if kparts > 1 else 0
    moved = minimum + h_bytes + (0 if fused else 2 * m * n * elem)
    bw = gpu.bw * gpu.bw_eff
    w_loads = WIDE_LOADS_IN_FLIGHT[mt] if wide else LOADS_IN_FLIGHT[mt] * 2 / (2 + mt)  # W's loads in flight / thread
    in_flight = active * THREADS * w_loads * 16  # bytes of W in flight per SM
    bw_latency = min(bw, gpu.sms * in_flight / HBM_LATENCY_S)
    # L2 -> SM: W once, x once per column block, the partials, and every column block's h (fp32).
    x_l2_bytes = math.ceil(n / cols) * m * k * elem if fused else 0
    l2_bytes = w_bytes + x_l2_bytes + part_l2_bytes + math.ceil(n / cols) * h_bytes
    t_l2 = l2_bytes / (L2_BW_RATIO * gpu.bw)
    # The join: the last block of a tile reads the partial tiles [tm, cols] (fp32) at one SM's rate: the
    # other kparts - 1 in wide_kernel (its own is still in shared memory), all kparts in skinny_kernel.
    t_join = (kparts - (1 if wide else 0)) * tm * cols * 4 / SM_BW if kparts > 1 else 0.0
    flops = 2 * m * n * k + 2 * m * r * (k + n)
    compute = flops / (gpu.tc_bf16 * gpu.tc_eff)
    launches = 2 if fused else 3
    base_time = max(w_bytes + io, 0) / bw if fused else max((w_bytes + io) / bw, 2 * m * n * k / (gpu.tc_bf16 * gpu.tc_eff))
    predicted = max(moved / bw_latency, t_l2, compute) + t_join + gpu.launch_s  # PDL overlaps the shrink
    return {
        "gpu": gpu.name, "K": k, "N": n, "r": r, "M": m, "T": t,
        "kernels": ("shrink+" + ("wide" if wide else "skinny")) if fused else "cuBLAS+shrink+expand",
        "launches": launches, "cols": cols,
        "kparts": kparts, "part_l2_bytes": part_l2_bytes,
        "grid": grid, "blocks_per_sm_resident": resident, "blocks_per_sm_grid": round(per_sm, 2),
        "warps_per_sm": round(active * THREADS / 32, 1),
        "bytes": moved, "bytes_min": minimum, "bytes_ratio": round(moved / minimum, 4),
        "l2_bytes_per_w": round(l2_bytes / w_bytes, 2),
        "w_loads_in_flight": round(w_loads, 1),
        "in_flight_kib_per_sm": round(in_flight / 1024, 1),
        "needed_kib_per_sm": round(bw * HBM_LATENCY_S / gpu.sms / 1024, 1),
        "join_us": round(t_join * 1e6, 2),
        "predicted_us": round(predicted * 1e6, 2),
        "base_predicted_us": round((base_time + gpu.launch_s) * 1e6, 2),
        "predicted_vs_base": round(predicted / (base_time + gpu.launch_s), 3),
        "label": "prediction",
    }


CASES_KN = [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 1024)]


def plan_rows(gpu: GPU, ranks=(16,), ms=(1, 16, 64), distinct=False) -> list[dict]:
    """The launch plan of the CUDA kernels for the benchmark shapes (DESIGN §7) on ``gpu``.

    ``distinct``: every token its own task (T = M), the mixed-task worst case.
    """
    return [plan_row(gpu, k, n, r, m, tasks=m if distinct else 1) for k, n in CASES_KN for r in ranks for m in ms]


def format_rows(rows: list[dict]) -> str:
    cols = ["K", "N", "r", "M", "T", "cols", "kparts", "grid", "blocks_per_sm_grid", "warps_per_sm", "bytes_ratio",
            "l2_bytes_per_w", "in_flight_kib_per_sm", "needed_kib_per_sm", "join_us", "predicted_us",
            "base_predicted_us", "predicted_vs_base"]
    out = [" | ".join(cols), " | ".join("---" for _ in cols)]
    out += [" | ".join(str(r[c]) for c in cols) for r in rows]
    return "\n".join(out)
