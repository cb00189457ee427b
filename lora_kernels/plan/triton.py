"""Launch plan of the Triton backend: what each benchmark case launches on an H100 / H200 / A100,
and how long it should take. **Every time here is a prediction**, not a measurement.

For each case of the benchmark matrix (DESIGN §7, bf16) the plan replays the launchers' own
decisions (the same config tables and heuristics: ``lora_linear._fused_regime``,
``_shrink_in_tile``, ``_split_k``; ``lora_linear_mixed._fused_config``, the BGMV rule) and lists
every kernel launched with its grid, its CTAs per SM (from the AOT-compiled registers and shared
memory in ``triton_resources.json``), waves, HBM bytes and FLOPs.

Roofline model (stated; a GPU run that disagrees corrects it):

* per kernel ``t = max(t_hbm, t_l2, t_mma, t_serial) + launch`` with
  ``t_hbm = bytes / BW_att``, ``BW_att = min(BW * bw_eff, in_flight / LATENCY, SMs_busy * SM_BW)``
  (Little's law: a grid with few CTAs cannot keep enough bytes in flight to reach the peak;
  ``in_flight`` = CTAs resident x (stages - 1) pipeline stages of operand tiles),
  ``t_l2 = L2 bytes / (L2_BW_RATIO * BW)`` (operands re-read by several CTAs),
  ``t_mma = flops / (P * tc_eff * TRITON_TC_EFF * busy)`` with ``busy = grid / (waves * slots)``
  (wave quantisation), and ``t_serial`` = dependent round trips on a CTA's critical path
  (loads whose address or use waits for the previous one: un-pipelined loops) x ``LATENCY``;
  an epilogue's dependent round trips after the pipelined main loop (the mixed expand) are added:
  ``waves x tail_steps x LATENCY`` (its loads wait while the SM's main-loop traffic has ended);
* ``launch`` = ``gpu.launch_s`` per kernel (host enqueue + tail), torch ops in the backward included;
* the base peer (cuBLAS ``F.linear``) is the ideal: ``max(min bytes / (BW * bw_eff), flops /
  (P * tc_eff)) + launch``: no quantisation, no serial latency.

``python -m lora_kernels plan`` prints the table; ``tests/test_plan.py`` asserts the design rules
(decode grids fill the SMs at N >= 4096, HBM bytes within a few % of the minimum, no spills).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field

from .gpus import GPUS, GPU

# ---- model constants (assumptions, labelled; not measured here) -------------------------------
LATENCY_S = 0.7e-6      # loaded HBM round trip a CTA waits for when a load is not pipelined
SM_BW = 110e9           # bytes/s one SM can pull from L2/HBM (~64 B/clk at ~1.7 GHz)
L2_BW_RATIO = 2.5       # L2 bandwidth / HBM bandwidth
TRITON_TC_EFF = {90: 0.80, 80: 0.95}  # Triton's non-persistent, non-TMA main loop vs cuBLAS on the
#                                       same GPU (Hopper: cuBLAS uses TMA + persistent warp-specialised
#                                       tiles; Ampere: both cp.async + mma.sync)
ELEM = 2                # bf16

# ---- the benchmark matrix (benchmarks/benchlib.py, DESIGN §7) ---------------------------------
SHAPES = ((4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 1024))  # K -> N
RANKS = (8, 16, 64)
TOKENS = (1, 16, 64, 256, 2048, 8192)
MIXED_TASKS = 64        # "distinct": min(M, 64) tasks

RESOURCES_PATH = os.path.join(os.path.dirname(__file__), "triton_resources.json")


@functools.lru_cache(maxsize=None)
def resources() -> dict:
    """AOT resources per config name and arch: {"triton": version, "sm90": {name: {...}}, "sm80": ...}.

    Regenerate with ``python tests/triton_aot.py --write-resources lora_kernels/plan/triton_resources.json``
    (``tests/test_plan.py`` checks it is current for the installed Triton).
    """
    with open(RESOURCES_PATH) as f:
        return json.load(f)


@dataclass
class Launch:
    """One kernel launch of a case. ``config`` names an AOT spec (None: a cuBLAS / torch op)."""
    what: str
    config: str | None
    grid: int
    warps: int = 4
    stages: int = 1
    stage_bytes: int = 0         # operand bytes one pipeline stage loads per CTA
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    flops: float = 0.0
    serial_steps: int = 0        # dependent round trips on a CTA's critical path
    tail_steps: int = 0          # dependent round trips after the main loop (per wave; added, not overlapped)
    tensor_cores: bool = True
    # filled by predict():
    regs: int = 0
    smem: int = 0
    spills: int = 0
    ctas_per_sm: int = 0
    waves: int = 0
    t: float = 0.0


@dataclass
class Case:
    op: str                      # "fwd", "fwdbwd" (frozen base) or "mixed"
    k: int
    n: int
    r: int
    m: int
    tasks: int = 1
    launches: list = field(default_factory=list)
    min_bytes: float = 0.0       # what any implementation must move from HBM
    base_t: float = 0.0          # predicted cuBLAS base (fwd, or fwd + dx for fwdbwd)
    t: float = 0.0               # predicted time of all launches
    target: float = 0.0          # the DESIGN §7 ratio limit vs the base (mixed: see mixed_target)
    cublas_base: bool = False    # single-task: the base GEMM on cuBLAS + the LoRA-term kernel
    alt_t: float = 0.0           # single-task: predicted time of the other path (0: not computed)

    @property
    def name(self) -> str:
        extra = f" T{self.tasks}" if self.op == "mixed" else ""
        return f"{self.op} {self.k}->{self.n} r{self.r} M{self.m}{extra}"

    @property
    def ratio(self) -> float:
        return self.t / self.base_t

    @property
    def hbm_bytes(self) -> float:
        return sum(launch.hbm_bytes for launch in self.launches)


def occupancy(gpu: GPU, regs: int, smem: int, warps: int) -> int:
    """CTAs per SM from registers (allocated per warp in units of 256), shared memory (+1 KiB
    reserved per CTA), threads and the block limit."""
    threads = 32 * warps
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // (per_warp * warps)
    by_smem = gpu.smem_per_sm // (smem + 1024) if smem else gpu.max_blocks_per_sm
    return max(0, min(by_regs, by_smem, gpu.max_threads_per_sm // threads, gpu.max_blocks_per_sm))


def predict(launch: Launch, gpu: GPU) -> float:
    """Fill the launch's resources and predicted seconds on ``gpu`` (see the module docstring)."""
    if launch.config is None:  # cuBLAS / torch: the ideal roofline
        t_mem = launch.hbm_bytes / (gpu.bw * gpu.bw_eff)
        peak = (gpu.tc_bf16 * gpu.tc_eff) if launch.tensor_cores else gpu.fp32 * 0.8
        launch.t = max(t_mem, launch.flops / peak) + gpu.launch_s
        return launch.t
    res = resources()[f"sm{gpu.cc}"][launch.config]
    launch.regs, launch.smem, launch.spills = res["registers"], res["shared"], res["spills"]
    launch.ctas_per_sm = occupancy(gpu, launch.regs, launch.smem, launch.warps)
    slots = launch.ctas_per_sm * gpu.sms
    launch.waves = math.ceil(launch.grid / slots)
    resident = min(launch.grid, slots)
    in_flight = resident * max(1, launch.stages - 1) * launch.stage_bytes
    bw = min(gpu.bw * gpu.bw_eff, in_flight / LATENCY_S, min(launch.grid, gpu.sms) * SM_BW)
    t_hbm = launch.hbm_bytes / bw
    t_l2 = launch.l2_bytes / (L2_BW_RATIO * gpu.bw)
    busy = launch.grid / (launch.waves * slots) * launch.ctas_per_sm if launch.ctas_per_sm else 1.0
    busy = min(1.0, busy)
    peak = gpu.tc_bf16 * gpu.tc_eff * TRITON_TC_EFF[gpu.cc] if launch.tensor_cores else gpu.fp32 * 0.8
    t_mma = launch.flops / (peak * busy)
    t_serial = launch.serial_steps * LATENCY_S
    launch.t = max(t_hbm, t_l2, t_mma, t_serial) + launch.waves * launch.tail_steps * LATENCY_S + gpu.launch_s
    return launch.t


def _cublas(what: str, m: int, n: int, k: int) -> Launch:
    return Launch(what, None, 0, hbm_bytes=ELEM * (m * k + k * n + m * n), flops=2.0 * m * n * k)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- single-task: the launchers' decisions replayed --------------------------------------------


def _fused_launch(what, m, n, k, r, in_tile, dx=False, save=False, regime=None, grads=False) -> Launch:
    """The fused kernel (``_lora_fused_kernel``): forward y, or dx on transposed operands (``dx``:
    x = dy [M, N], "weight" W.T, so ``n`` is K and ``k`` is N here); ``save``: it also stores hs / gs;
    ``grads``: dx with the LORA_GRADS epilogue (dA, dB in the same launch)."""
    from ..ops.triton import lora_linear as ll

    regime = regime or ll._fused_regime(m, ELEM)
    cfg = ll.FUSED_CONFIGS[regime]
    br = ll._pad_rank(r) if in_tile else min(ll._expand_chunk(ELEM), ll._pad_rank(r))
    layout = "dx" if dx else "fwd"
    variant = f"intile_r{16 if br <= 16 else 64}" if in_tile else "h"
    if not dx and save and regime.startswith("decode"):
        variant += "-save"
    if regime == "decode_s" and m == 1 and not dx:
        variant += "-m1"
    if grads:
        variant += "-grads"
    grid = _cdiv(m, cfg.BM) * _cdiv(n, cfg.BN)
    rows_read = _cdiv(m, cfg.BM) * cfg.BM
    stage = (cfg.BM + cfg.BN + (br if in_tile else 0)) * cfg.BK * ELEM
    # HBM: x once per column tile is L2-resident after the first read; W once; y once; A, B, h; hs.
    hbm = ELEM * (m * k + n * k + m * n + r * k + n * r) + (0 if in_tile else 4 * m * r) + (ELEM * m * r if save or dx else 0)
    # L2: every column tile re-reads its x rows (and A when in-tile); every row tile re-reads W.
    l2 = _cdiv(n, cfg.BN) * (rows_read * k + (r * k if in_tile else 0)) * ELEM + _cdiv(m, cfg.BM) * n * k * ELEM
    flops = 2.0 * rows_read * n * k + 2.0 * 2 * rows_read * n * br  # base + hi/lo expand
    if in_tile:
        flops += 2.0 * rows_read * br * k * _cdiv(n, cfg.BN)
    if grads:  # + x [m, n] and hs read, dA [r, n] and dB [k, r] written; dy re-read from L2
        hbm += ELEM * (m * n + m * r + r * n + k * r) - ELEM * m * r
        l2 += ELEM * m * k
        flops += 2.0 * 2 * br * rows_read * n + 2.0 * k * rows_read * br
    return Launch(what, f"fused/{regime}/{variant}/{layout}/bf16", grid, cfg.num_warps, cfg.num_stages, stage,
                  hbm, l2, flops)


def _term_launch(what, m, n, k, r, variant, layout) -> Launch:
    """``_lora_term_kernel``: out [m, n] = bias + s h B^T with h = x A^T over ``k`` (forward: x; dx: dy)."""
    from ..ops.triton import lora_linear as ll

    cfg = ll._term_cfg(m, r, ELEM)
    br = ll._pad_rank(r)
    split = ll._term_split(m, n, cfg)
    tiles = _cdiv(m, cfg.BM)
    rows = tiles * cfg.BM
    band = next(b for b, c in ll.TERM_CONFIGS.items() if c == cfg)
    # HBM: x, A, B once, out written once, hs / gs stored. L2: each column split re-reads its x rows
    # and A; each row tile re-reads B.
    hbm = ELEM * (m * k + r * k + n * r + m * n + m * r)
    l2 = split * tiles * (cfg.BM * k + r * k) * ELEM + tiles * n * r * ELEM
    flops = 2.0 * rows * br * k * split + 2.0 * 2 * rows * n * br
    return Launch(what, f"term/{band}/r{br}/{variant}/{layout}/bf16", tiles * split, cfg.num_warps, cfg.num_stages,
                  (cfg.BM + br) * cfg.BK * ELEM, hbm, l2, flops)


def _shrink_launch(what, m, k, r, use="xA") -> list[Launch]:
    from ..ops.triton import lora_linear as ll

    cfg = ll._shrink_cfg(r, ELEM)
    br = ll._pad_rank(r)
    split = ll._split_k(m, k, cfg.BM, ll._bk(cfg, ELEM))
    band = "r_le_64" if br <= 64 else "r_gt_64"
    # AOT spec of this launch: split-K without dropout reads the dropout variant's resources (the
    # same body plus the philox mask: an upper bound); an unsplit dy @ B reads x @ A.T's.
    if split == 1:
        name = f"shrink/{band}/r{br}/xA/split1/bf16"
    else:
        name = f"shrink/{band}/r{br}/{'dyB' if use == 'dyB' else 'xA_drop'}/split4/bf16"
    grid = _cdiv(m, cfg.BM) * split
    stage = (cfg.BM + br) * cfg.BK * ELEM
    hbm = ELEM * (m * k + r * k) + 4 * m * r * split
    out = [Launch(what, name, grid, cfg.num_warps, cfg.num_stages, stage, hbm, 0.0,
                  2.0 * _cdiv(m, cfg.BM) * cfg.BM * br * k)]
    if split > 1:
        out.append(Launch("sum split partials (torch)", None, 0, hbm_bytes=4 * m * r * (split + 1), tensor_cores=False))
    return out


def single_task(op: str, k: int, n: int, r: int, m: int, cublas_base: bool | None = None) -> Case:
    """The launches of ``lora_linear`` (``op`` "fwd") or of its forward + backward with a frozen
    base ("fwdbwd": dx, dA, dB), as the launchers decide them; ``cublas_base`` forces a path (the
    plan compares both: ``alt_t`` is the other path's predicted time)."""
    from ..ops.triton import lora_linear as ll

    case = Case(op, k, n, r, m, target=1.05 if op == "fwd" else 1.10)
    cublas = ll._cublas_base(m, n, r) if cublas_base is None else cublas_base
    case.cublas_base = cublas
    cublas_dx = ll._cublas_base(m, k, r) if cublas_base is None else cublas_base
    save = op == "fwdbwd"
    if cublas:  # the LoRA-term kernel writes bias + s h B^T into y, cuBLAS adds x W^T (reads y as C)
        case.launches.append(_term_launch("LoRA term y = b + s h B^T", m, n, k, r, "save" if save else "plain", "fwd"))
        case.launches.append(Launch("base y += x W^T (cuBLAS, beta 1)", None, 0,
                                    hbm_bytes=ELEM * (m * k + k * n + 2 * m * n), flops=2.0 * m * n * k))
    else:
        in_tile = ll._shrink_in_tile(m, r, False, ELEM)
        if not in_tile:
            case.launches += _shrink_launch("shrink h = x A^T", m, k, r)
        regime = None if m <= ll.DECODE_M else ll._fused_regime(m, ELEM)
        case.launches.append(_fused_launch("fused y = x W^T + b + s h B^T", m, n, k, r, in_tile, save=save, regime=regime))
    case.min_bytes = ELEM * (m * k + n * k + m * n + r * k + n * r)
    base = [_cublas("base y = x W^T", m, n, k)]
    if op == "fwdbwd":  # frozen base: dx, dA, dB (the backward of _backward)
        if cublas_dx:
            case.launches.append(_term_launch("LoRA term dx = s g A (g = dy B)", m, k, n, r, "gs", "dx"))
            case.launches.append(Launch("base dx += dy W (cuBLAS, beta 1)", None, 0,
                                        hbm_bytes=ELEM * (m * n + n * k + 2 * m * k), flops=2.0 * m * n * k))
        else:
            in_tile = ll._dx_in_tile(m, r, False, ELEM)
            regime = ll._fused_regime(m, ELEM)
            grads = in_tile and m <= ll.FUSED_CONFIGS[regime].BM  # lora_linear_backward's one-launch case
            if not in_tile:
                case.launches += _shrink_launch("shrink g = dy B", m, n, r, use="dyB")
            what = "fused dx, dA, dB (one row tile)" if grads else "fused dx = dy W + s g A"
            case.launches.append(_fused_launch(what, m, k, n, r, in_tile, dx=True, regime=regime, grads=grads))
        if cublas_dx or not grads:
            case.launches.append(Launch("dA = gs^T x (cuBLAS)", None, 0, hbm_bytes=ELEM * (m * k + r * k + m * r),
                                        flops=2.0 * m * r * k))
            case.launches.append(Launch("dB = dy^T hs (cuBLAS)", None, 0, hbm_bytes=ELEM * (m * n + n * r + m * r),
                                        flops=2.0 * m * n * r))
        base.append(_cublas("base dx = dy W", m, k, n))
        case.min_bytes += ELEM * (m * n + n * k + m * k + r * k + n * r)  # dy, W, dx, dA, dB
    case._base = base
    return case


# ---- mixed tasks -----------------------------------------------------------------------------


def mixed(k: int, n: int, r: int, m: int, tasks: int) -> Case:
    """``tasks`` distinct tasks over ``m`` rows (round robin), every row with a task."""
    from ..ops.triton import lora_linear_mixed as mx

    case = Case("mixed", k, n, r, m, tasks)
    short = m <= mx.BGMV_MAX_M or m < mx.BGMV_MAX_MEAN_SEGMENT * tasks  # the launcher's BGMV rule
    a_bytes = tasks * r * k * ELEM
    if short:
        # One program per (row, r-block), r split until ~BGMV_PROGRAMS programs; each loads a
        # [br, bk] slice of A_t and bk of x per step: cdiv(K, bk) dependent round trips.
        br, bk = mx._bgmv_tile(m, r, False, ELEM, True, k, mx.BGMV_PROGRAMS)
        name = f"shrink_bgmv/xA/bf16/r{16 if br <= 16 else 64}/ranks0/k16/br{br}"
        rblocks = _cdiv(r, br)
        case.launches.append(Launch("BGMV shrink (row x r-block)", name, m * rblocks, 4, 1,
                                    (br + 1) * min(bk, k) * ELEM, ELEM * m * k + a_bytes + 4 * m * r,
                                    ELEM * m * k * rblocks, 2.0 * m * rblocks * br * k, _cdiv(k, bk),
                                    tensor_cores=False))
    else:
        br = mx._block_r(r, ELEM)
        bm, bk, nw, ns = mx._shrink_tile(m, ELEM, True, br)
        segs = _cdiv(bm, max(1, m // tasks)) + 1  # segments per row tile
        case.launches.append(Launch("SGMV shrink (row tiles)", f"shrink_sgmv/m{bm}/xA/bf16/r{br}/ranks0/k16",
                                    _cdiv(m, bm) * _cdiv(r, br), nw, ns, (bm + br) * bk * ELEM,
                                    ELEM * m * k + a_bytes + 4 * m * r, 0.0, 2.0 * _cdiv(m, bm) * bm * br * k * segs,
                                    segs if segs > 1 else 0))
    cfg = mx._fused_config(m, ELEM)
    gather = mx._use_gather(m, short)
    tiles_m, tiles_n = _cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n)
    b_bytes = tasks * n * r * ELEM
    rows = tiles_m * cfg.block_m
    base_flops = 2.0 * rows * n * k
    hbm = ELEM * (m * k + n * k + m * n) + b_bytes + 4 * m * r
    l2 = tiles_n * rows * k * ELEM + tiles_m * n * k * ELEM
    if gather:
        # Per-row expand after the main loop: every row loads its task's [BN, r] slice of B
        # (HBM: once per task and column tile; L2/L1: once per row), cdiv(r, gr) dependent steps
        # of [BM, BN, gr] loads + fp32 FMAs.
        gr = mx._gather_r(cfg)
        what, name = "fused base + gathered expand", f"fused/m{cfg.block_m}/gather/fwd/bf16/r16/ranks0/k16"
        l2 += m * n * r * ELEM
        flops, tail = base_flops, _cdiv(r, gr)  # + 2 m n r CUDA-core FMAs: far below the base GEMM
    else:
        # The expand loops over the tile's task segments one after the other: each iteration loads
        # that task's B_t slice and h rows, then MMAs; the next waits (a dependent round trip).
        segs_per_tile = min(tasks, cfg.block_m) if tasks >= m // max(1, tiles_m) else _cdiv(cfg.block_m, m // tasks) + 1
        segs_per_tile = min(segs_per_tile, tasks)
        what, name = "fused base + per-segment expand", f"fused/m{cfg.block_m}/fwd/bf16/r16/ranks0/k16"
        flops = base_flops + 2.0 * 2 * rows * n * _cdiv(r, 16) * 16 * segs_per_tile
        tail = segs_per_tile if segs_per_tile > 1 else 0
    case.launches.append(Launch(what, name, tiles_m * tiles_n, cfg.num_warps, cfg.num_stages,
                                (cfg.block_m + cfg.block_n) * cfg.block_k * ELEM, hbm, l2, flops, tail_steps=tail))
    case.min_bytes = ELEM * (m * k + n * k + m * n) + a_bytes + b_bytes
    case._base = [_cublas("base y = x W^T", m, n, k)]
    return case


def mixed_target(case: Case, single: Case) -> float:
    """DESIGN §7: <= 1.15 x single-task fused time x (1 + T r (K + N) / (N K)), as a ratio vs base."""
    floor = 1 + case.tasks * case.r * (case.k + case.n) / (case.n * case.k)
    return 1.15 * single.t * floor / case.base_t


# ---- the whole plan -------------------------------------------------------------------------


def _finish(case: Case, gpu: GPU) -> Case:
    case.t = sum(predict(launch, gpu) for launch in case.launches)
    case.base_t = sum(predict(launch, gpu) for launch in case._base)
    return case


def plan(gpu: GPU) -> list[Case]:
    """Every benchmark case on ``gpu``, with predicted times (see the module docstring). Single-task
    cases carry ``alt_t``: the predicted time of the path the launcher did not take (fused Triton
    vs cuBLAS base + LoRA-term kernel)."""
    cases = []
    for k, n in SHAPES:
        for r in RANKS:
            for m in TOKENS:
                for op in ("fwd", "fwdbwd"):
                    case = _finish(single_task(op, k, n, r, m), gpu)
                    case.alt_t = _finish(single_task(op, k, n, r, m, cublas_base=not case.cublas_base), gpu).t
                    cases.append(case)
    for m in (16, 64, 256, 2048):
        t = min(m, MIXED_TASKS)
        case = _finish(mixed(4096, 4096, 16, m, t), gpu)
        single = _finish(single_task("fwd", 4096, 4096, 16, m), gpu)
        case.target = mixed_target(case, single)
        cases.append(case)
    return cases


def plan_rows(gpu: GPU) -> list[dict]:
    """One dict per case (the shape ``python -m lora_kernels plan`` prints, shared with other backends)."""
    rows = []
    for c in plan(gpu):
        rows.append({"backend": "triton", "case": c.name, "kernels": len(c.launches),
                     "grid": "+".join(str(launch.grid) if launch.config else "lib" for launch in c.launches),
                     "ctas_per_sm": "/".join(str(launch.ctas_per_sm) for launch in c.launches if launch.config),
                     "waves": max((launch.waves for launch in c.launches if launch.config), default=0),
                     "bytes_vs_min": c.hbm_bytes / c.min_bytes, "pred_us": c.t * 1e6, "base_us": c.base_t * 1e6,
                     "ratio": c.ratio, "target": c.target, "met": c.ratio <= c.target,
                     "path": "mixed" if c.op == "mixed" else "cuBLAS+term" if c.cublas_base else "fused",
                     "alt_ratio": c.alt_t / c.base_t if c.alt_t else None})
    return rows


def report(gpus=("H200-SXM", "H100-SXM", "A100-SXM-80GB"), detail: bool = False) -> str:
    lines = ["PREDICTED (roofline model of lora_kernels/plan/triton.py, AOT resources of Triton "
             f"{resources().get('triton', '?')}; not measured)", ""]
    for name in gpus:
        gpu = GPUS[name]
        rows = plan_rows(gpu)
        met = sum(r["met"] for r in rows)
        lines.append(f"== {name}: {met}/{len(rows)} cases meet their target (predicted)")
        lines.append(f"{'case':<34} {'path':>11} {'kern':>4} {'grid':>16} {'CTA/SM':>8} {'waves':>5} {'bytes/min':>9} "
                     f"{'pred us':>9} {'base us':>9} {'ratio':>6} {'other':>6} {'target':>6}")
        for r in rows:
            alt = f"{r['alt_ratio']:>6.2f}" if r["alt_ratio"] else f"{'':>6}"
            lines.append(f"{r['case']:<34} {r['path']:>11} {r['kernels']:>4} {r['grid'][:16]:>16} {r['ctas_per_sm'][:8]:>8} "
                         f"{r['waves']:>5} {r['bytes_vs_min']:>9.3f} {r['pred_us']:>9.1f} {r['base_us']:>9.1f} {r['ratio']:>6.2f} "
                         f"{alt} {r['target']:>6.2f}{'' if r['met'] else '  MISS'}")
        if detail:
            for c in plan(gpu):
                lines.append(f"-- {c.name}")
                for launch in c.launches:
                    lines.append(f"   {launch.what:<34} {launch.config or 'cuBLAS/torch':<44} grid {launch.grid:>5} "
                                 f"regs {launch.regs:>3} smem {launch.smem // 1024:>3}K CTA/SM {launch.ctas_per_sm} "
                                 f"waves {launch.waves} {launch.t * 1e6:8.1f} us")
        lines.append("")
    return "\n".join(lines)
