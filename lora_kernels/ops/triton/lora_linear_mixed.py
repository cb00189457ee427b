"""Mixed-task LoRA linear in Triton: segmented gather, forward and backward.

    y[m] = x[m] @ W.T + b + s_t * (x[m] @ A_t.T) @ B_t.T,   t = task_ids[m]   (t = -1: base only)

Shape: x [M, K] (or [B, ..., K] with one id per dim-0 sample, or [..., K] with one id per
flattened row), weight [N, K], bias [N] | None, lora_a [T, r, K], lora_b [T, N, r], scales [T],
task_ids [M] int or a :class:`~lora_kernels.ops.routing.Routing`.

Everything works in *sorted row space*: position ``p`` holds row ``order[p]``, where ``order`` is the
stable sort of the ids (``-1`` rows first, then task 0, 1, ...). Task ``t`` owns the contiguous
positions ``[seg_off[t], seg_off[t + 1])``. Three device tensors describe a batch -- ``order``
(int64 [M]), ``sorted_ids`` (int32 [M]) and ``seg_off`` (int32 [T + 1]) -- built once per batch
(cached on the Routing) and passed to the custom op as plain tensors. Every kernel derives the
tasks of its row tile from them on the device: a tile ``[p0, p1)`` covers the tasks
``sorted_ids[p0] .. sorted_ids[p1 - 1]`` and nothing else, so no host-side tile map (and no host
sync) is needed, which is what lets ``torch.compile`` trace the op with raw ids.

Kernels (this file stacks kernels -> launchers -> custom ops + fakes -> autograd):

``_shrink_bgmv_kernel``  h[p] = s_t * x[order[p]] @ A_t.T, one program per (row, rank block)
                         (GEMV on CUDA cores). Decode: a row's A_t is the only thing read, nothing
                         is padded to a 16-row MMA tile when every row has its own task; the rank
                         is split over programs and each loads a long K slice per step, so the
                         grid keeps enough loads in flight (see ``_bgmv_tile``).
``_shrink_sgmv_kernel``  the same over BLOCK_M consecutive sorted rows with ``tl.dot``, looping
                         over the (few) task segments that intersect the tile. Prefill: long
                         segments make almost every tile single-task.
``_fused_kernel``        y tile = x @ W.T + b (shared base GEMM, every row) plus the LoRA term --
                         base and LoRA in one output tile, y written once (scattered back to
                         original rows). Short segments (M <= 128 or the BGMV rule): a gathered
                         per-row expand, every row loading its own task's B slice, with a fixed
                         number of steps however many tasks share the tile. Long segments: per
                         segment in the tile, h_seg @ B_t.T on tensor cores. A tile inside one segment
                         adds its term straight into the accumulator; a tile that several
                         segments share computes each segment's term apart and selects it into
                         that segment's rows only, so a non-finite adapter never reaches other
                         tasks' rows or ``-1`` rows (0 * Inf would be NaN), and ``-1`` rows are
                         the base output whatever the tile holds (the shrinks mask likewise).
``_segsum_kernel``       out[t] = P_seg(t).T @ Q[order[seg(t)]] -- the per-task weight gradients
                         as a segmented reduction: one program owns a (task, r-block, d-block)
                         output tile and loops over its segment's rows in a fixed order. No
                         atomics, so gradients are bitwise deterministic; long segments are split
                         in a fixed number of chunks whose fp32 partials are summed by torch in
                         a fixed order.

Backward reuses them through strides: g = s_t * dy @ B_t is a shrink with B_t viewed as [r, N];
dx = dy @ W + g @ A_t is the fused kernel with W viewed as [K, N] and A_t as [K, r];
dA_t = g_seg.T @ x_seg and dB_t = dy_seg.T @ h_seg are segment sums. dW = dy.T @ x and db are
plain torch (cuBLAS is already at the floor for that GEMM) and only computed when needed.

Precision: fp32 accumulate everywhere; h = x @ A.T stays fp32 in memory (it is [M, r], tiny) and
enters the 16-bit expand MMA as hi + lo halves (two MMAs), or the gathered expand's fp32 FMAs, so its
fp32 precision survives. fp32 inputs use
``input_precision="ieee"`` (no TF32) so fp32 matches torch's default numerics.

Ranks: the stacks are zero-padded to the largest rank R. Passing ``ranks`` ([T] int32, the true
rank of each task, validated to lie in [0, R]; the padding beyond it is never read, so it is absent
whatever it holds, as in the reference) makes every kernel bound its r loops by ``ranks[t]``:
a rank-8 task in a stack padded to 64 then reads 8/64 of its A_t/B_t rows and does 8/64 of the
shrink/expand MACs. In decode (memory-bound: bytes of A_t/B_t dominate the LoRA cost) that is the
whole saving; in prefill it is ~r/N of the base GEMM and mostly invisible.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import check_lora_linear_mixed
from ..routing import Routing

__all__ = ["lora_linear_mixed", "batch_metadata", "shipped_configs", "BGMV_MAX_M"]

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b, fp32 accumulate. Triton 3.9's interpreter multiplies the raw uint16 bits of
    bf16 operands (np.matmul on the storage); there, and only there, bf16 is widened first."""
    if INTERPRET:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _mma_f32a(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with ``a`` fp32 (h, g: kept fp32 by contract) and ``b`` in the input dtype.

    For 16-bit ``b`` the MMA needs 16-bit operands: ``a = hi + lo`` (both 16-bit), two MMAs, so
    ~16 mantissa bits of ``a`` survive instead of 8 (bf16). The extra MMA costs r/K of the base
    GEMM's tensor-core time (< 2% at r = 64, K = 4096) and no extra memory traffic.
    """
    if b.dtype == tl.float32:
        acc = _mma(a, b, acc, PRECISION, INTERPRET)
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        acc = _mma(hi, b, acc, PRECISION, INTERPRET)
        acc = _mma(lo, b, acc, PRECISION, INTERPRET)
    return acc


@triton.jit
def _shrink_bgmv_kernel(
    x_ptr, a_ptr, s_ptr, h_ptr, order_ptr, sid_ptr, rank_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_at, stride_ar, stride_ak, stride_hm, stride_hr,
    HAS_RANKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """h[p, r] = s_t * sum_k x[order[p], k] * A[t, r, k]; one program per (sorted row, r-block).

    Rows with t = -1 (and r-blocks past the task's rank) loop zero times and store zeros.
    """
    p = tl.program_id(0)
    pid_r = tl.program_id(1)
    row = tl.load(order_ptr + p).to(tl.int64)
    t = tl.load(sid_ptr + p)
    tt = tl.maximum(t, 0).to(tl.int64)
    if HAS_RANKS:
        r_t = tl.minimum(tl.maximum(tl.load(rank_ptr + tt), 0), R)  # clamped: never past the stacks
    else:
        r_t = R
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < r_t
    k_end = tl.where((t >= 0) & (pid_r * BLOCK_R < r_t), K, 0)
    x_ptrs = x_ptr + row * stride_xm + offs_k.to(tl.int64) * stride_xk
    a_ptrs = a_ptr + tt * stride_at + offs_r[:, None].to(tl.int64) * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_mask = offs_k < K - k0
        xv = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
        av = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    s = tl.load(s_ptr + tt)
    acc = tl.where(t >= 0, acc * s, 0.0)
    tl.store(h_ptr + tl.cast(p, tl.int64) * stride_hm + offs_r.to(tl.int64) * stride_hr, acc, mask=offs_r < R)


@triton.jit
def _shrink_sgmv_kernel(
    x_ptr, a_ptr, s_ptr, h_ptr, order_ptr, sid_ptr, seg_ptr, rank_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_at, stride_ar, stride_ak, stride_hm, stride_hr,
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """h tile [BLOCK_M sorted rows, BLOCK_R] = s_t * x_seg @ A_t.T for each segment in the tile."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    p0 = pid_m * BLOCK_M
    p1 = tl.minimum(p0 + BLOCK_M, M)
    offs_p = p0 + tl.arange(0, BLOCK_M)
    p_mask = offs_p < M
    rows = tl.load(order_ptr + offs_p, mask=p_mask, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    t_first = tl.load(sid_ptr + p0)
    t_last = tl.load(sid_ptr + p1 - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # Sorted ids: the tasks in [t_first, t_last] either own rows of this tile or none at all.
    for t in range(tl.maximum(t_first, 0), t_last + 1):
        lo = tl.load(seg_ptr + t)
        hi = tl.load(seg_ptr + t + 1)
        if HAS_RANKS:
            r_t = tl.minimum(tl.maximum(tl.load(rank_ptr + t), 0), R)  # clamped: never past the stacks
        else:
            r_t = R
        if (hi > lo) & (pid_r * BLOCK_R < r_t):
            in_seg = (offs_p >= lo) & (offs_p < hi)
            r_mask = offs_r < r_t
            x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
            a_ptrs = (a_ptr + tl.cast(t, tl.int64) * stride_at + offs_r[None, :].to(tl.int64) * stride_ar
                      + offs_k[:, None].to(tl.int64) * stride_ak)
            # A per-segment accumulator, selected into the tile's rows at the end: rows of other
            # segments load x = 0, and 0 * Inf = NaN, so a non-finite A_t must not reach them.
            seg = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_mask = offs_k < K - k0
                xt = tl.load(x_ptrs, mask=in_seg[:, None] & k_mask[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                seg = _mma(xt, at, seg, PRECISION, INTERPRET)
                x_ptrs += BLOCK_K * stride_xk
                a_ptrs += BLOCK_K * stride_ak
            # Segments are disjoint row sets: scale each row once, by its own task's scale.
            acc = tl.where(in_seg[:, None], seg * tl.load(s_ptr + t), acc)
    h_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_r[None, :].to(tl.int64) * stride_hr
    tl.store(h_ptrs, acc, mask=p_mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def _fused_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr, order_ptr, sid_ptr, seg_ptr, rank_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr,
    stride_bt, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, GATHER: tl.constexpr,
):
    """y[order[p], n] = x[order[p]] @ W[n] + b[n] + h[p] @ B[t_p, n] for a [BLOCK_M, BLOCK_N] tile.

    Shape (as strides): x [M, K], W [N, K], h [M, R] fp32 (sorted rows), B [T, N, R], y [M, N].
    ``GATHER``: the LoRA term as a per-row gathered expand (every row loads its own task's
    [BLOCK_N, BLOCK_R] slice of B, fp32 FMAs, ceil(R / BLOCK_R) steps for any task mix); else one
    MMA per task segment of the tile (long segments).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles share each W column panel while it is hot in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    p0 = pid_m * BLOCK_M
    p1 = tl.minimum(p0 + BLOCK_M, M)
    offs_p = p0 + tl.arange(0, BLOCK_M)
    p_mask = offs_p < M
    rows = tl.load(order_ptr + offs_p, mask=p_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    # Base GEMM: shared by every row, whatever its task.
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(xt, wt, acc, PRECISION, INTERPRET)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    if GATHER:
        # Short segments (decode, small M): a per-row expand with a fixed trip count, whatever
        # the number of tasks in the tile. Row p reads only B[t_p] (rows of other tasks, -1 rows
        # and rank padding load nothing: a non-finite adapter cannot reach them), so each task's
        # B slice is read from HBM once per column tile -- the byte floor -- and the loads of all
        # rows are issued together instead of one segment after another.
        t_rows = tl.load(sid_ptr + offs_p, mask=p_mask, other=-1)
        tt = tl.maximum(t_rows, 0).to(tl.int64)
        if HAS_RANKS:
            r_rows = tl.minimum(tl.maximum(tl.load(rank_ptr + tt, mask=t_rows >= 0, other=0), 0), R)
        else:
            r_rows = tl.full((BLOCK_M,), R, tl.int32)
        r_rows = tl.where(t_rows >= 0, r_rows, 0)
        r_hi = tl.max(r_rows, axis=0)  # the tile's largest rank: padding past it is never read
        offs_g = tl.arange(0, BLOCK_R)
        h_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_g[None, :].to(tl.int64) * stride_hr
        b_ptrs = (b_ptr + tt[:, None, None] * stride_bt + offs_n[None, :, None].to(tl.int64) * stride_bn
                  + offs_g[None, None, :].to(tl.int64) * stride_br)
        for r0 in range(0, r_hi, BLOCK_R):
            r_in = (offs_g[None, :] < r_rows[:, None] - r0)                    # [BM, BR]
            ht = tl.load(h_ptrs, mask=r_in, other=0.0)
            bt = tl.load(b_ptrs, mask=r_in[:, None, :] & n_mask[None, :, None], other=0.0)
            acc += tl.sum(ht[:, None, :] * bt.to(tl.float32), axis=2)       # fp32 FMAs: h keeps its bits
            h_ptrs += BLOCK_R * stride_hr
            b_ptrs += BLOCK_R * stride_br
    else:
        # LoRA expand: one MMA per task segment intersecting the tile, reading only that task's B_t.
        t_first = tl.load(sid_ptr + p0)
        t_last = tl.load(sid_ptr + p1 - 1)
        offs_r = tl.arange(0, BLOCK_R)
        for t in range(tl.maximum(t_first, 0), t_last + 1):
            lo = tl.load(seg_ptr + t)
            hi = tl.load(seg_ptr + t + 1)
            if HAS_RANKS:
                r_t = tl.minimum(tl.maximum(tl.load(rank_ptr + t), 0), R)  # clamped: never past the stacks
            else:
                r_t = R
            if hi > lo:
                in_seg = (offs_p >= lo) & (offs_p < hi)
                h_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_r[None, :].to(tl.int64) * stride_hr
                b_ptrs = (b_ptr + tl.cast(t, tl.int64) * stride_bt + offs_r[:, None].to(tl.int64) * stride_br
                          + offs_n[None, :].to(tl.int64) * stride_bn)
                if (lo <= p0) & (hi >= p1):
                    # The whole tile is this task's (long segments: most prefill tiles): straight
                    # into the one accumulator.
                    for r0 in range(0, r_t, BLOCK_R):
                        r_mask = offs_r < r_t - r0
                        ht = tl.load(h_ptrs, mask=p_mask[:, None] & r_mask[None, :], other=0.0)
                        bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                        acc = _mma_f32a(ht, bt, acc, PRECISION, INTERPRET)
                        h_ptrs += BLOCK_R * stride_hr
                        b_ptrs += BLOCK_R * stride_br
                else:
                    # Rows of other segments (and -1 rows) must gain nothing, not 0 * B_t: a
                    # non-finite B_t would turn their h = 0 into NaN. The segment's term is
                    # accumulated apart and selected into its rows only.
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for r0 in range(0, r_t, BLOCK_R):
                        r_mask = offs_r < r_t - r0
                        ht = tl.load(h_ptrs, mask=in_seg[:, None] & r_mask[None, :], other=0.0)
                        bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                        part = _mma_f32a(ht, bt, part, PRECISION, INTERPRET)
                        h_ptrs += BLOCK_R * stride_hr
                        b_ptrs += BLOCK_R * stride_br
                    acc = tl.where(in_seg[:, None], acc + part, acc)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & n_mask[None, :])


@triton.jit
def _segsum_kernel(
    p_ptr, q_ptr, out_ptr, order_ptr, seg_ptr, rank_ptr,
    R, D, SPLIT,
    stride_pm, stride_pr, stride_qm, stride_qd, stride_os, stride_ot, stride_or, stride_od,
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[split, t, r, d] = sum over chunk ``split`` of task t's rows p of P[p, r] * Q[order[p], d].

    Shape (as strides): P [M, R] fp32 (sorted rows), Q [M, D] (original rows), out [S, T, R, D] fp32.
    Absent tasks (and r-blocks past a task's rank) loop zero times and store zeros.
    """
    pid0 = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_d = tl.program_id(2)
    t = pid0 // SPLIT
    sp = pid0 % SPLIT
    lo = tl.load(seg_ptr + t)
    hi = tl.load(seg_ptr + t + 1)
    if HAS_RANKS:
        r_t = tl.minimum(tl.maximum(tl.load(rank_ptr + t), 0), R)  # clamped: never past the stacks
    else:
        r_t = R
    # Fixed, BLOCK_M-aligned chunking of the segment: the summation order depends only on the batch.
    chunk = tl.cdiv(tl.cdiv(hi - lo, SPLIT), BLOCK_M) * BLOCK_M
    c_lo = lo + sp * chunk
    c_hi = tl.minimum(c_lo + chunk, hi)
    c_hi = tl.where(pid_r * BLOCK_R < r_t, c_hi, c_lo)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    r_mask = offs_r < r_t
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(c_lo, c_hi, BLOCK_M):
        offs_p = m0 + offs_m
        pm = offs_p < c_hi
        rows = tl.load(order_ptr + offs_p, mask=pm, other=0).to(tl.int64)
        pt = tl.load(p_ptr + offs_p[None, :].to(tl.int64) * stride_pm + offs_r[:, None].to(tl.int64) * stride_pr,
                     mask=pm[None, :] & r_mask[:, None], other=0.0)
        qt = tl.load(q_ptr + rows[:, None] * stride_qm + offs_d[None, :].to(tl.int64) * stride_qd,
                     mask=pm[:, None] & d_mask[None, :], other=0.0)
        acc = _mma_f32a(pt, qt, acc, PRECISION, INTERPRET)
    o_ptrs = (out_ptr + tl.cast(sp, tl.int64) * stride_os + tl.cast(t, tl.int64) * stride_ot
              + offs_r[:, None].to(tl.int64) * stride_or + offs_d[None, :].to(tl.int64) * stride_od)
    tl.store(o_ptrs, acc, mask=(offs_r[:, None] < R) & d_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Configs and launchers
# ----------------------------------------------------------------------------------------------

#: At most this many rows: the shrink runs BGMV-style (programs per row, see _bgmv_tile). A 16-row MMA tile
#: of a decode batch with distinct tasks holds one useful row in 16; the GEMV reads the same
#: bytes (A_t) without the idle lanes. Above it, or when segments are long, SGMV tiles win.
BGMV_MAX_M = 64
#: Mean rows per task segment below which the SGMV shrink would run mostly masked tiles
#: (only known when a Routing is given; raw ids under torch.compile use the M rule alone).
BGMV_MAX_MEAN_SEGMENT = 16
#: Row count above which the per-task weight-gradient reduction is split into fixed chunks.
SEGSUM_SPLIT_ROWS = 2048
#: fp32 partial-buffer budget for the split reduction (bytes).
SEGSUM_SPLIT_BYTES = 1 << 28

def _interpret() -> bool:
    from ..dispatch import triton_interpreter

    return triton_interpreter()


def _empty(shape, *, dtype, device) -> Tensor:
    """Every buffer the launchers allocate (the tests swap in NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}


class FusedConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


#: r-chunk of the fused kernel's expand loop (any rank: the loop runs ceil(r_t / 16) MMAs of
#: k = 16, wgmma's native k for 16-bit). 64-wide chunks keep a [BM, 64] fp32 h tile and its hi/lo
#: halves live next to the [BM, BN] accumulator and spill at BM >= 64 (AOT: 0.6-2.4 KB on sm_90).
FUSED_BLOCK_R = 16


#: At most this many rows: the fused kernel's LoRA term is the per-row gathered expand (fixed trip
#: count, all rows' B loads in flight together); above it, one MMA per task segment of the tile
#: (prefill: long segments make most tiles single-task, and the MMA runs on tensor cores).
GATHER_MAX_M = 128
#: Elements of the gathered [BLOCK_M, BLOCK_N, BLOCK_R] B tile per step: 8192 / 128 threads = 64
#: fp32 values each (AOT: no spills next to the base GEMM's pipeline).
GATHER_TILE = 8192


def _gather_r(cfg: "FusedConfig", aligned: bool = True) -> int:
    """Rank chunk of the gathered expand: as much of the rank per step as GATHER_TILE per 4 warps
    allows (16 at the 16 x 32 decode tile: one step for r <= 16). Odd strides load element by
    element (a 64-bit address each): a quarter of the tile (AOT: the full one spilled 32-976 B)."""
    tile = GATHER_TILE * cfg.num_warps // 4 // (1 if aligned else 4)
    return max(1, min(16, tile // (cfg.block_m * cfg.block_n)))


def _use_gather(m: int, short: bool) -> bool:
    """Gathered per-row expand (fixed trip count) or one MMA per segment of a tile (long segments)."""
    return m <= GATHER_MAX_M or (short and GATHER_SHORT_SEGMENTS)


#: Short segments above GATHER_MAX_M rows (e.g. 256 rows over 64 tasks) take the gathered expand
#: too: a 128-row tile then holds ~32 segments, which the per-segment loop walks one by one.
GATHER_SHORT_SEGMENTS = True


def _aligned(*strides: int) -> bool:
    """Whether the JIT will see every non-unit stride divisible by 16 (vectorized 16-byte loads)."""
    return all(s == 1 or s % 16 == 0 for s in strides)


def _fused_config(m: int, elem: int, aligned: bool = True) -> FusedConfig:
    """Tile of the fused base+LoRA kernel by row count. Picked for bf16 on an H200 from the
    standard Hopper GEMM tiles, untuned (no GPU in CI); smem per stage = (BM + BN) * BK * elem
    bytes, every config checked by the AOT tests against sm_80's 163 KB and for spills."""
    if elem == 4:  # fp32 is "ieee" (no tensor cores): FMA tiles; deeper pipelines spill 8-80 B (AOT)
        return FusedConfig(16, 32, 32, 4, 2) if m <= 16 else FusedConfig(32, 32, 32, 4, 1)
    if not aligned and m > 16:  # odd K / N (e.g. 2049): scalar loads; bigger tiles spill (AOT)
        return FusedConfig(64, 32, 32, 4, 3)
    if m <= 16:  # decode: memory-bound GEMV-like; narrow N tiles give >= 128 CTAs for N = 4096
        return FusedConfig(16, 32, 128, 4, 3)  # 4 stages spilled 8 B on sm_80 next to the segment term
    if m <= 128:  # 64 x 32: 128 CTAs at N = 4096 fill an H200's 132 SMs (64 x 64 gave 64). Memory-
        # bound: 2 stages of 24 KB in flight per CTA keep ~3 MB in flight (HBM latency x bandwidth);
        # 8 warps give the gathered expand 8 rank columns per step (2 steps at r = 16). AOT: no spills.
        return FusedConfig(64, 32, 128, 8, 3)
    # A tile shared by several segments holds a second [BM, BN] fp32 term (see the kernel): at
    # 128 x 128 that spilled 112-352 B (AOT, sm_80 / sm_90); 128 x 64 over 8 warps fits.
    return FusedConfig(128, 64, 64, 8, 3)


def _block_r(r: int, elem: int = 2) -> int:
    """Rank tile of the shrink outputs and weight-gradient tiles: up to 64 (32 for fp32, whose
    FMA dot holds both operands in registers; 64 spills there per AOT)."""
    return max(16, min(64 if elem == 2 else 32, triton.next_power_of_2(r)))


def _shrink_tile(m: int, elem: int, aligned: bool = True, block_r: int = 64) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) of the SGMV shrink. A GEMV-like pass over x (r is
    tiny): what counts is bytes in flight, so 32-row tiles (twice the programs of 64: 64 at M = 2048)
    with 3 stages of 12 KB in flight at r <= 16; r-blocks of 64 keep BK = 64 (BK = 128 spilled 12 B
    on sm_90, AOT) and take 64-row (wgmma-sized) tiles once segments are long. fp32 (FMA) and odd
    strides keep small tiles."""
    if elem == 4:  # FMA dot: BK = 32 / 3 stages spill 8-48 B on sm_80 (AOT)
        return 32, 16, 4, 2
    if not aligned:
        return 32, 32, 4, 3
    if block_r <= 16:
        return 32, 128, 4, 4
    return (64 if m >= 1024 else 32), 64, 4, 3


#: Elements of the [BLOCK_R, BLOCK_K] A_t tile one BGMV program loads per K step (bf16: 8192 / 128
#: threads = 64 values each, AOT: no spills). fp32 tiles hold half as many.
BGMV_TILE = 8192
#: Programs the BGMV shrink aims for: enough to keep every SM's loads in flight (132 SMs).
BGMV_PROGRAMS = 512


def _bgmv_programs() -> int:
    """BGMV_PROGRAMS on a GPU; 1 under the Triton interpreter, which runs programs one after another
    in Python (no loads in flight to gain, ~8x the test time): one program per row there.
    ``test_bgmv_rank_split`` runs the GPU's split through the interpreter."""
    return 1 if _interpret() else BGMV_PROGRAMS


def _bgmv_tile(m: int, r: int, r_unit_stride: bool, elem: int, aligned: bool = True, k: int = 4096,
               programs: int = BGMV_PROGRAMS) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K) of the per-row shrink.

    One program owns one (row, r-block): a sum over K in a fixed order, so h is deterministic
    (no split-K atomics). What limits a GEMV on a GPU is bytes in flight per round trip: with one
    program per row (decode: 16 programs) and a 16 x 256 tile, K = 4096 took 16 dependent round
    trips. So the rank is split over programs (BLOCK_R down to 1: ~BGMV_PROGRAMS programs) and
    each program loads a long K slice per step (BLOCK_R * BLOCK_K = BGMV_TILE): at K <= 4096 a
    row's slice of A_t arrives in one round trip. x rows are re-read per r-block (from L2).
    ``r_unit_stride`` (dy @ B_t: B's rank is its contiguous dim): whole rank rows per program,
    so loads stay coalesced along r.
    """
    full = _block_r(r, elem) if aligned else 16  # odd strides: [BM, 64] tiles from scalar loads spill
    if r_unit_stride:
        br = full
    else:
        want = m * triton.next_power_of_2(max(r, 1)) // programs
        br = max(1, min(full, triton.next_power_of_2(want) if want > 1 else 1))
    return br, _bgmv_block_k(br, elem, k)


def _bgmv_block_k(block_r: int, elem: int, k: int = 4096) -> int:
    # K <= 4096 in one step from BLOCK_R <= 2 on; never wider than K (masked lanes cost registers)
    return min(4096, (BGMV_TILE if elem == 2 else BGMV_TILE // 2) // block_r, max(16, triton.next_power_of_2(k)))


def _segsum_tile(elem: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps, num_stages) of the segmented weight-gradient reduction."""
    # bf16: 3 stages spilled 8 B at r = 64 on Triton 3.6 / sm_80 once D and R carry the JIT's hints
    return (32, 64, 4, 2) if elem == 2 else (32, 32, 4, 3)


def _shrink(x: Tensor, a_strides, a: Tensor, scales: Tensor, ranks: Tensor | None, order: Tensor, sorted_ids: Tensor,
            seg_off: Tensor, r: int, bgmv: bool) -> Tensor:
    """h [M, r] fp32, sorted rows: h[p] = s_t * x[order[p]] @ A_t.T with A_t given by ``a_strides``
    (t, r, k). Rows without a task (and ranks' padding) are zero."""
    m, k = x.shape
    h = _empty((m, r), device=x.device, dtype=torch.float32)
    if m == 0:
        return h
    elem = x.element_size()
    aligned = _aligned(x.stride(0), x.stride(1), *a_strides)
    br = _block_r(r, elem) if aligned else 16  # odd strides: [BM, 64] tiles from scalar loads spill
    rk = ranks if ranks is not None else sorted_ids  # dummy pointer when HAS_RANKS is False
    if bgmv:
        br, bk = _bgmv_tile(m, r, a_strides[1] == 1, elem, aligned, k, _bgmv_programs())
        _shrink_bgmv_kernel[(m, triton.cdiv(r, br))](
            x, a, scales, h, order, sorted_ids, rk, m, k, r,
            x.stride(0), x.stride(1), *a_strides, h.stride(0), h.stride(1),
            HAS_RANKS=ranks is not None, BLOCK_K=bk, BLOCK_R=br, num_warps=4, num_stages=1)
    else:
        bm, bk, nw, ns = _shrink_tile(m, elem, aligned, br)
        _shrink_sgmv_kernel[(triton.cdiv(m, bm), triton.cdiv(r, br))](
            x, a, scales, h, order, sorted_ids, seg_off, rk, m, k, r,
            x.stride(0), x.stride(1), *a_strides, h.stride(0), h.stride(1),
            HAS_RANKS=ranks is not None, PRECISION=_PRECISION[x.dtype], INTERPRET=_interpret(),
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=nw, num_stages=ns)
    return h


def _fused(x: Tensor, w_strides, w: Tensor, n: int, bias: Tensor | None, h: Tensor, b_strides, b: Tensor,
           ranks: Tensor | None, order: Tensor, sorted_ids: Tensor, seg_off: Tensor, r: int, short: bool) -> Tensor:
    """y [M, n] = x @ W.T + bias + per-segment h @ B_t.T, with W (n, k) and B (t, n, r) given by strides.
    ``short``: the batch's task segments are short (the BGMV rule): the gathered expand at any M."""
    m, k = x.shape
    y = _empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    aligned = _aligned(x.stride(0), x.stride(1), *w_strides, *b_strides, y.stride(0))
    cfg = _fused_config(m, x.element_size(), aligned)
    gather = _use_gather(m, short)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fused_kernel[grid](
        x, w, bias if bias is not None else x, h, b, y, order, sorted_ids, seg_off,
        ranks if ranks is not None else sorted_ids, m, n, k, r,
        x.stride(0), x.stride(1), *w_strides, h.stride(0), h.stride(1), *b_strides, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_RANKS=ranks is not None, PRECISION=_PRECISION[x.dtype], INTERPRET=_interpret(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=_gather_r(cfg, aligned) if gather else FUSED_BLOCK_R, GROUP_M=8, GATHER=gather,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def _segsum(p: Tensor, q: Tensor, order: Tensor, seg_off: Tensor, ranks: Tensor | None, t: int, r: int,
            transpose_out: bool, out_dtype: torch.dtype) -> Tensor:
    """out[t] = P[seg t].T @ Q[order[seg t]]: [T, r, D] (or [T, D, r] with ``transpose_out``)."""
    m, d = q.shape
    split = 1
    if m > SEGSUM_SPLIT_ROWS:
        split = min(8, m // SEGSUM_SPLIT_ROWS * 2)
        while split > 1 and split * t * r * d * 4 > SEGSUM_SPLIT_BYTES:
            split //= 2
    shape = (split, t, d, r) if transpose_out else (split, t, r, d)
    buf = _empty(shape, device=q.device, dtype=torch.float32)
    if buf.numel():
        s_or, s_od = (buf.stride(3), buf.stride(2)) if transpose_out else (buf.stride(2), buf.stride(3))
        bm, bd, nw, ns = _segsum_tile(q.element_size())
        br = _block_r(r, q.element_size())
        _segsum_kernel[(t * split, triton.cdiv(r, br), triton.cdiv(d, bd))](
            p, q, buf, order, seg_off, ranks if ranks is not None else seg_off, r, d, split,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), buf.stride(0), buf.stride(1), s_or, s_od,
            HAS_RANKS=ranks is not None, PRECISION=_PRECISION[q.dtype], INTERPRET=_interpret(),
            BLOCK_M=bm, BLOCK_R=br, BLOCK_D=bd, num_warps=nw, num_stages=ns)
    out = buf[0] if split == 1 else buf.sum(0)  # fixed-order reduction of the chunk partials
    return out.to(out_dtype)


def _a_as_rk(a: Tensor):  # A [T, r, K] read as (t, r, k)
    return a.stride(0), a.stride(1), a.stride(2)


def _b_as_nr(b: Tensor):  # B [T, N, r] read as (t, n, r)
    return b.stride(0), b.stride(1), b.stride(2)


# ----------------------------------------------------------------------------------------------
# Custom ops (+ fakes) and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::lora_linear_mixed", mutates_args=(), device_types=None)
def _op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
        ranks: Tensor | None, order: Tensor, sorted_ids: Tensor, seg_off: Tensor, bgmv: bool) -> tuple[Tensor, Tensor]:
    """Mixed-task forward on sorted-row metadata. Returns (y [M, N], h [M, r] fp32 sorted rows)."""
    r = lora_a.shape[1]
    h = _shrink(x, _a_as_rk(lora_a), lora_a, scales, ranks, order, sorted_ids, seg_off, r, bgmv)
    w_strides = (weight.stride(0), weight.stride(1))
    y = _fused(x, w_strides, weight, weight.shape[0], bias, h, _b_as_nr(lora_b), lora_b, ranks, order, sorted_ids, seg_off, r,
               bgmv)
    return y, h


@_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, ranks, order, sorted_ids, seg_off, bgmv):
    m = x.shape[0]
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, lora_a.shape[1]), dtype=torch.float32)


@torch.library.custom_op("lora_kernels::lora_linear_mixed_backward", mutates_args=(), device_types=None)
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor, ranks: Tensor | None,
            h: Tensor, order: Tensor, sorted_ids: Tensor, seg_off: Tensor, bgmv: bool,
            need_dx: bool, need_dlora: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [M, K], dA [T, r, K], dB [T, N, r]); an output not asked for is an empty [0] tensor."""
    t, r, k = lora_a.shape
    n = weight.shape[0]
    # g[p] = s_t * dy[order[p]] @ B_t: the shrink with B_t read as (t, r, n).
    g = _shrink(dy, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), lora_b, scales, ranks, order, sorted_ids,
                seg_off, r, bgmv)
    empty = dy.new_empty((0,))
    dx = empty
    if need_dx:
        # dx = dy @ W + g @ A_t: the fused kernel with W read as (k, n) and A_t as (t, k, r).
        dx = _fused(dy, (weight.stride(1), weight.stride(0)), weight, k, None, g,
                    (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), lora_a, ranks, order, sorted_ids, seg_off, r,
                    bgmv)
    da = db = empty
    if need_dlora:
        da = _segsum(g, x, order, seg_off, ranks, t, r, transpose_out=False, out_dtype=lora_a.dtype)
        db = _segsum(h, dy, order, seg_off, ranks, t, r, transpose_out=True, out_dtype=lora_b.dtype)
    return dx, da, db


@_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, scales, ranks, h, order, sorted_ids, seg_off, bgmv, need_dx, need_dlora):
    empty = dy.new_empty((0,))
    dx = x.new_empty(x.shape) if need_dx else empty
    da = lora_a.new_empty(lora_a.shape) if need_dlora else empty
    db = lora_b.new_empty(lora_b.shape) if need_dlora else empty
    return dx, da, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales, ranks, order, sorted_ids, seg_off, bgmv = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scales, ranks, order, sorted_ids, seg_off, output[1])
    ctx.bgmv = bgmv
    ctx.has_bias = bias is not None


def _backward(ctx, dy, dh):
    x, weight, lora_a, lora_b, scales, ranks, order, sorted_ids, seg_off, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dw, need_db, need_dlora = need[0], need[1], need[2], need[3] or need[4]
    dx = da = db = dw = dbias = None
    if need_dx or need_dlora:
        dx, da, db = _bwd_op(dy, x, weight, lora_a, lora_b, scales, ranks, h, order, sorted_ids, seg_off, ctx.bgmv,
                             need_dx, need_dlora)
        dx = dx if need_dx else None
        da, db = (da if need[3] else None), (db if need[4] else None)
    if need_dw:  # the shared base GEMM's weight gradient: one cuBLAS GEMM over all rows
        dw = dy.t().mm(x)
    if need_db and ctx.has_bias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


class BatchMetadata(NamedTuple):
    """Device tensors of a batch's row grouping (see the module docstring)."""
    order: Tensor       # [M] int64: sorted position -> row
    sorted_ids: Tensor  # [M] int32: task of each sorted position (-1 first)
    seg_off: Tensor     # [T + 1] int32: task t owns positions [seg_off[t], seg_off[t + 1])


def _metadata_from_ids(ids: Tensor, num_tasks: int) -> BatchMetadata:
    """Traceable (no host sync): what ``torch.compile`` uses when given raw ids."""
    sorted_ids, order = torch.sort(ids.to(torch.int64), stable=True)
    bounds = torch.arange(num_tasks + 1, device=ids.device, dtype=torch.int64)
    seg_off = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    return BatchMetadata(order, sorted_ids.to(torch.int32), seg_off)


def batch_metadata(routing: Routing, device) -> BatchMetadata:
    """The routing's device metadata, built once per batch (cached on the routing)."""
    def build():
        r = routing.to(device)
        return BatchMetadata(r.order, r.task_ids[r.order].to(torch.int32),
                             torch.tensor(r.starts, dtype=torch.int32, device=device))
    return routing.cached(("triton.lora_linear_mixed", str(torch.device(device))), build)


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                      task_ids: "Tensor | Routing", *, ranks: Tensor | None = None) -> Tensor:
    """Per-row task LoRA linear (see the module docstring); differentiable in x, weight, bias, lora_a, lora_b.

    Shape: x [M, K] | [B, ..., K] (ids per dim-0 sample) | [..., K] (ids per flattened row),
    weight [N, K], bias [N] | None, lora_a [T, r, K], lora_b [T, N, r], scales [T],
    task_ids [M] int (-1 = no task) or a Routing, ranks [T] int (optional, each in [0, r]; A/B
    rows / columns at or past a task's rank are never read: absent whatever they hold) -> y [..., N].
    """
    num_tasks = lora_a.shape[0] if lora_a.dim() == 3 else -1
    compiling = torch.compiler.is_compiling()
    ids = None
    if isinstance(task_ids, Routing):
        routing = Routing.of(task_ids, num_tasks)
    elif compiling:  # no host sync in a traced graph: the ids are sorted and searched on the device
        routing, ids = None, task_ids
    else:
        routing = Routing(task_ids, num_tasks)
    num_rows = routing.num_rows if routing is not None else ids.numel()
    check_lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales, num_rows, ranks)
    if x.dtype == torch.float64 or num_tasks == 0:
        # float64: as lora_linear, no fp64 tensor-core path worth shipping. T = 0: nothing to add,
        # and the kernels would read element 0 of the empty scales / ranks.
        from .. import reference

        return reference.lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales,
                                           routing if routing is not None else ids, ranks=ranks)
    if ranks is not None:
        ranks = ranks.to(device=x.device, dtype=torch.int32)
    k, n = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    rows_per_id = lead.numel() // x.shape[0] if (x.dim() >= 2 and num_rows == x.shape[0]) else 1
    # [B, S, K] with one id per sample: the flattened rows' routing (built once per batch and S).
    # reshape copies only when the leading dims cannot be flattened as a view: made contiguous on purpose.
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if routing is not None and (rows_per_id == 1 or not compiling):
        routing = routing.expand(rows_per_id)
        if compiling:  # traced: the host tuple `starts` is a constant, no cache mutation in the graph
            meta = BatchMetadata(routing.order.to(x.device), routing.task_ids.to(x.device)[routing.order.to(x.device)].to(torch.int32),
                                 torch.tensor(routing.starts, dtype=torch.int32, device=x.device))
        else:
            meta = batch_metadata(routing, x.device)
        active = m - routing.starts[0]
        bgmv = m <= BGMV_MAX_M or active < BGMV_MAX_MEAN_SEGMENT * max(1, len(routing.present))
    else:
        ids = routing.task_ids if routing is not None else ids
        if rows_per_id != 1:
            ids = ids.repeat_interleave(rows_per_id)
        meta = _metadata_from_ids(ids.to(x.device), num_tasks)
        bgmv = m <= BGMV_MAX_M
    scales32 = scales.to(device=x.device, dtype=torch.float32)
    y, _ = torch.ops.lora_kernels.lora_linear_mixed(x2, weight, bias, lora_a, lora_b, scales32, ranks,
                                                    meta.order, meta.sorted_ids, meta.seg_off, bgmv)
    return y.view(*lead, n)


# ----------------------------------------------------------------------------------------------
# Shipped configs (for the AOT tests: every config the launchers can pick)
# ----------------------------------------------------------------------------------------------

_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Argument lists (kernel order, constexprs excluded) and, per use, the strides the JIT sees as 1
# (specialized to constexpr) and those divisible by 16 (K, N multiples of 16, contiguous tensors).
_ARGS = {
    _shrink_bgmv_kernel: ("x_ptr a_ptr s_ptr h_ptr order_ptr sid_ptr rank_ptr M K R stride_xm stride_xk stride_at "
                          "stride_ar stride_ak stride_hm stride_hr"),
    _shrink_sgmv_kernel: ("x_ptr a_ptr s_ptr h_ptr order_ptr sid_ptr seg_ptr rank_ptr M K R stride_xm stride_xk "
                          "stride_at stride_ar stride_ak stride_hm stride_hr"),
    _fused_kernel: ("x_ptr w_ptr bias_ptr h_ptr b_ptr y_ptr order_ptr sid_ptr seg_ptr rank_ptr M N K R stride_xm "
                    "stride_xk stride_wn stride_wk stride_hm stride_hr stride_bt stride_bn stride_br stride_ym stride_yn"),
    _segsum_kernel: ("p_ptr q_ptr out_ptr order_ptr seg_ptr rank_ptr R D SPLIT stride_pm stride_pr stride_qm stride_qd "
                     "stride_os stride_ot stride_or stride_od"),
}
_LAYOUTS = {  # (kernel, use): (unit strides, strides divisible by 16)
    ("shrink", "xA"): ("stride_xk stride_ak stride_hr", "stride_xm stride_at stride_ar"),   # x @ A_t.T
    ("shrink", "dyB"): ("stride_xk stride_ar stride_hr", "stride_xm stride_at"),            # dy @ B_t
    # h [M, R] and B [T, N, R] contiguous: stride_hm = stride_bn = R, a multiple of 16 when R is.
    ("fused", "fwd"): ("stride_xk stride_wk stride_hr stride_br stride_yn",
                       "stride_xm stride_wn stride_hm stride_bt stride_bn stride_ym"),
    ("fused", "dx"): ("stride_xk stride_wn stride_hr stride_bn stride_yn",
                      "stride_xm stride_wk stride_hm stride_bt stride_br stride_ym"),
    ("segsum", "dA"): ("stride_pr stride_qd stride_od", "stride_qm stride_os stride_ot stride_or"),
    ("segsum", "dB"): ("stride_pr stride_qd stride_or", "stride_qm stride_os stride_ot"),
}


def _signature(kernel, dtype: str, use: tuple[str, str], constexprs: dict, aligned: bool, m: int | None = None) -> tuple[dict, dict]:
    """The JIT's view of a launch: unit strides constant, multiples of 16 hinted (strides and the
    sizes M, N, K, R, D when aligned), and M = 1 a constant (``m == 1``), as Triton specialises."""
    units, div16 = (set(v.split()) for v in _LAYOUTS[use])
    div16 |= {"N", "K", "R", "D"} | ({"M"} if m is None or m % 16 == 0 else set())
    if m == 1:
        units.add("M")
    sig = {}
    for name in _ARGS[kernel].split():
        if name.endswith("_ptr"):
            fp32 = name in ("s_ptr", "h_ptr", "p_ptr", "out_ptr")
            sig[name] = ("*fp32" if fp32 else "*i64" if name == "order_ptr"
                         else "*i32" if name in ("sid_ptr", "seg_ptr", "rank_ptr") else f"*{dtype}")
        elif name in units:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32:16" if aligned and name in div16 else "i32"
    consts = {name: 1 for name in units}
    consts.update(constexprs)
    sig.update({c: "constexpr" for c in constexprs})
    return sig, consts


def shipped_configs():
    """Every distinct kernel config the launchers can launch (see :func:`_all_configs`)."""
    seen = set()
    for cfg in _all_configs():
        name, kernel, sig, cx, nw, ns, _ = cfg
        key = (kernel, tuple(sig.items()), tuple(sorted((k, repr(v)) for k, v in cx.items())), nw, ns)
        if key not in seen:
            seen.add(key)
            yield cfg


def _all_configs():
    """Yield (name, kernel, signature, constexprs, num_warps, num_stages, is_mma) for every kernel
    config the launchers can choose: per dtype, rank block (16 and the largest), with and
    without per-task ranks, per regime and per use (forward, dx, dA, dB), for K, N multiples of 16
    and for odd K, N (no divisibility hints). ``is_mma``: a tensor-core tile big enough for wgmma on
    sm_90 (>= 64 rows, 16-bit inputs). Signatures follow tests/triton_aot.py's convention."""
    for dtype, tt in _TT.items():
        elem = torch.empty((), dtype=dtype).element_size()
        prec = _PRECISION[dtype]
        for br in (16, _block_r(256, elem)):
            for has_ranks in (False, True):
                for aligned in (True, False):
                    if has_ranks and not aligned:
                        continue
                    tag = f"{tt}/r{br}/ranks{int(has_ranks)}/{'k16' if aligned else 'odd'}"
                    for use in ("xA", "dyB"):
                        # BLOCK_R: the whole rank block (dyB) or, for x @ A_t.T, every split from one
                        # rank row per program up to it (1..16 with the r16 block, 32..64 with r64)
                        full = br if aligned else 16
                        splits = [full] if use == "dyB" else [b for b in (1, 2, 4, 8, 16, 32, 64)
                                                              if b <= full and (b > 16) == (full > 16)]
                        for b_r in splits:
                            b_k = _bgmv_block_k(b_r, elem)
                            sig, cx = _signature(_shrink_bgmv_kernel, tt, ("shrink", use),
                                                 {"HAS_RANKS": has_ranks, "BLOCK_K": b_k, "BLOCK_R": b_r}, aligned)
                            yield f"shrink_bgmv/{use}/{tag}/br{b_r}", _shrink_bgmv_kernel, sig, cx, 4, 1, False
                        for m in (64, 4096):
                            bm, bk, nw, ns = _shrink_tile(m, elem, aligned, br if aligned else 16)
                            sig, cx = _signature(_shrink_sgmv_kernel, tt, ("shrink", use),
                                                 {"HAS_RANKS": has_ranks, "PRECISION": prec, "INTERPRET": False, "BLOCK_M": bm, "BLOCK_K": bk,
                                                  "BLOCK_R": br if aligned else 16}, aligned)
                            yield f"shrink_sgmv/m{bm}/{use}/{tag}", _shrink_sgmv_kernel, sig, cx, nw, ns, False
                    for use in ("fwd", "dx"):
                        for m, gather in ((1, True), (64, True), (4096, False), (4096, True)):
                            if br != FUSED_BLOCK_R:
                                continue
                            cfg = _fused_config(m, elem, aligned)
                            sig, cx = _signature(_fused_kernel, tt, ("fused", use),
                                                 {"HAS_BIAS": use == "fwd", "HAS_RANKS": has_ranks, "PRECISION": prec,
                                                  "INTERPRET": False, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                                                  "BLOCK_R": _gather_r(cfg, aligned) if gather else FUSED_BLOCK_R, "GROUP_M": 8,
                                                  "GATHER": gather}, aligned, m)
                            yield (f"fused/m{cfg.block_m}{'/gather' if gather else ''}/{use}/{tag}", _fused_kernel, sig, cx, cfg.num_warps,
                                   cfg.num_stages, cfg.block_m >= 64 and elem == 2)
                    for use in ("dA", "dB"):
                        bm, bd, nw, ns = _segsum_tile(elem)
                        sig, cx = _signature(_segsum_kernel, tt, ("segsum", use),
                                             {"HAS_RANKS": has_ranks, "PRECISION": prec, "INTERPRET": False, "BLOCK_M": bm, "BLOCK_R": br,
                                              "BLOCK_D": bd}, aligned)
                        yield f"segsum/{use}/{tag}", _segsum_kernel, sig, cx, nw, ns, False
