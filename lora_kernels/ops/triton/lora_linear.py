"""Fused single-task LoRA linear in Triton: forward and backward.

    y = x @ W.T + b + s * (dropout(x) @ A.T) @ B.T

Shape: x [..., K], weight W [N, K], bias b [N] or None, lora_a A [r, K], lora_b B [N, r] -> y [..., N].
The leading dims of x are flattened to M rows.

This file stacks, top to bottom: Triton kernels -> launchers (check, allocate, launch) -> the
``torch.library`` custom ops (``lora_kernels::lora_linear`` and its helpers) with fake (meta)
implementations -> autograd (``register_autograd``) -> the public :func:`lora_linear`.

Design (numbers for an H200: 132 SMs, ~4.8 TB/s HBM, ~990 TFLOP/s dense bf16, ridge point ~200
flop/byte; a [M, K] x [K, N] bf16 GEMM has an intensity of ~M flop/byte, so M <= ~128 is
memory-bound, "decode", and larger M is compute-bound, "prefill"):

* **Two paths, chosen by M** (:func:`_cublas_base`; the launch plan, ``python -m lora_kernels
  plan``, predicts both for every benchmark case and ``tests/test_plan.py`` checks the choice):
    - decode (M <= 128): ``_lora_fused_kernel`` produces each [BM, BN] tile of y: it streams x
      and W once over K into an fp32 accumulator, adds ``s * h @ B.T`` and the bias in the
      epilogue and writes y once (one launch; the base GEMM is memory-bound there).
    - prefill (M > 128): ``_lora_term_kernel`` writes ``bias + s * h @ B.T`` into y (one launch:
      it reads x once for h and keeps h in registers), then cuBLAS adds ``x @ W.T`` into y
      (``addmm_``, beta = 1: cuBLAS reads y as C in its epilogue, under the GEMM's compute). A
      Triton main loop without TMA / persistent tiles is taken at 0.8x cuBLAS's tensor-core rate
      on Hopper by the plan: 1.36x the base at M = 8192 for the fused tile, 1.09x this way (the
      pass over x and the write of y are ~4 % each at K = N = 4096; H200, predicted).
* **Where the shrink h = x_d @ A.T (fp32, [M, r]) of the fused path is computed**, chosen per
  call by :func:`_shrink_in_tile` (not measured on a GPU yet: chosen from these estimates):
    - r <= 64, no dropout: *inside every output tile*, in the same K loop that already holds
      the x tile in shared memory. The extra MMA work is r/BN of the tile (free: the tile is
      memory-bound) and the extra bytes are A re-read from L2 per column tile. A preceding
      kernel would cost a launch (~3-4 us, i.e. +40-60 % on a 7 us decode GEMM).
    - r > 64, or dropout: *a tiny preceding kernel* (``_shrink_kernel``): A re-read per tile
      from L2 (N/BN * r*K*2 B = 128 MiB at r = 256) would exceed the W stream, and with dropout
      the philox mask would be regenerated N/BN times in-tile; once is enough.
  The preceding kernel splits K over programs when there are too few row tiles to fill the GPU
  (decode: one row tile, K/BK/4 splits); each split writes its own fp32 partial and one small
  reduction sums them in a fixed order. No float atomics anywhere: forward and backward are bitwise
  deterministic run to run (no opt-in nondeterministic path is offered).
* **fp32 everywhere it matters:** all dots accumulate in fp32; h stays fp32; for 16-bit inputs the
  expand multiplies ``s*h`` split into a hi and a lo 16-bit part (two MMAs: 2*r/K extra work, 0.8 %
  at r = 16, K = 4096), so the LoRA term is as precise as fp32 h times the 16-bit B. fp32 inputs
  use ``input_precision="ieee"`` (no tf32), matching torch's default matmul precision.
* **Rank padding:** the rank is padded to ``BR = max(16, next_pow2(r))`` inside the kernels, with
  masked loads (zeros beyond r), so every ``tl.dot`` has dims >= 16 as the GPU requires. The
  expand of a precomputed h loops over rank chunks of 32 (16 for fp32; keeps registers bounded at
  r = 256).
* **Dropout** (on the LoRA input only) is a philox mask ``tl.rand(seed, m*K + k) >= p`` over the
  element index of x (int64), regenerated wherever needed (forward shrink, backward shrink, the
  dx epilogue, dA's x_d); no dropped copy of x is saved for backward. :func:`dropout_mask`
  materialises it for tests. The ``1/(1-p)`` factor is folded into the scalar applied to h.
* **int64 offsets:** every tile's base offset (``pid * BM * stride``, the product that passes
  2**31 first: M = 64k rows of K = 32k) is formed in int64; offsets inside a tile stay int32
  (the launcher checks ``BM * stride`` and ``BK * stride`` stay below 2**31) and pointers advance
  by ``BK * stride`` per step, so the int64 math is per tile, not per element. The dropout
  counter ``m*K + k`` is int64. Strides are passed for x, W, A, B and h, so transposed or
  sliced weights and strided x run without copies; x is reshaped to [M, K] (a copy only when its
  leading dims cannot be flattened as a view: deliberate), bias is made contiguous (N elements).
* **Backward** (frozen base: dx, dA, dB; dW = dy.T @ x and db = sum(dy) only when asked for).
  The forward saves ``hs = s * x_d @ A.T`` ([M, r] in x's dtype, stored by the forward kernel
  itself), so no shrink over x is recomputed. ``dx = dy @ W + s * (dy @ B) @ A`` runs the
  forward's paths on transposed views (W.T as the "weight", B.T in A's role so that
  g = dy @ B comes out of the same K loop, A.T in B's role, the dropout mask applied to the
  LoRA term in the epilogue), and stores ``gs = s * g``. Then ``dA = gs.T @ x_d`` and
  ``dB = dy.T @ hs`` are single GEMMs over the M tokens (cuBLAS) -- except for a decode batch
  that fits one row tile of the dx kernel, where g is complete inside every program and the
  same launch writes dA and dB too (``LORA_GRADS``): the whole LoRA backward is one launch, as
  cheap as the base's dx launch. Passes over the big operands, prefill: dy twice (LoRA-term
  kernel, cuBLAS dx) + once (dB), x once (dA); decode: dy and W once, x once.
* **Configs:** a small table per regime (decode M <= 16, decode M <= 128; middle and prefill
  tiles remain for ``cublas_base=False`` and as the plan's comparison; the shrink and the
  LoRA-term kernel per rank band) and dtype width, chosen by :func:`_fused_regime`,
  :func:`_shrink_cfg`, :func:`_term_cfg` and :func:`_bk`; no autotuning at import or at call.
  fp32 ("ieee" dots on FMA units, no tensor cores) uses the two decode tiles up to M = 128 (the
  cuBLAS base above), a quarter of the K step and in-tile shrink only up to r = 16. Every
  shipped entry is compiled for sm_90 and sm_80 in ``tests/test_triton_aot.py`` (see
  :func:`aot_specs`) on Triton 3.9 and 3.6: no spills, shared memory <= 112 KiB, wgmma in the
  16-bit BM >= 64 tiles.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import check_lora_linear

__all__ = ["lora_linear", "dropout_mask", "aot_specs"]


# =============================================================================================
# Kernels
# =============================================================================================


@triton.jit
def _keep(seed, rows, cols, row_len, drop_p):
    """Philox keep-mask for x elements (rows [BM], cols [BC]): the same bits everywhere."""
    offs = rows.to(tl.int64)[:, None] * row_len + cols.to(tl.int64)[None, :]
    return tl.rand(seed, offs) >= drop_p


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulate.

    INTERPRET works around Triton 3.9's interpreter, whose dot runs ``np.matmul`` on the raw
    uint16 bits of bf16 operands: there (only) bf16 operands are widened to fp32 first.
    """
    if INTERPRET:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _expand(acc, hs, bt, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += hs @ bt with hs fp32 [BM, BR] and bt [BR, BN] in the input dtype.

    For 16-bit bt, hs is split into hi + lo 16-bit parts so the fp32 precision of h survives the
    16-bit tensor-core MMA (the lo part carries the bits the hi rounding drops).
    """
    if bt.dtype == tl.float32:
        acc = _mma(hs, bt, acc, DOT_PREC, INTERPRET)
    else:
        hi = hs.to(bt.dtype)
        lo = (hs - hi.to(tl.float32)).to(bt.dtype)
        acc = _mma(hi, bt, acc, DOT_PREC, INTERPRET)
        acc = _mma(lo, bt, acc, DOT_PREC, INTERPRET)
    return acc


@triton.jit
def _lora_fused_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, h_ptr, out_ptr, hs_ptr, xg_ptr, hg_ptr, da_ptr, db_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_hm, stride_om,
    stride_gm, stride_gk,
    scale, h_scale, drop_p, seed, grad_scale,
    HAS_BIAS: tl.constexpr,
    SHRINK_IN_TILE: tl.constexpr,  # compute h = x_d @ A.T in the K loop (else read h from h_ptr)
    DROP_MODE: tl.constexpr,  # 0: none; 1: mask x for the in-tile shrink; 2: mask the LoRA term of out
    STORE_H: tl.constexpr,  # column tile 0 writes hs = h_scale * h [M, R] (out's dtype, contiguous) for backward
    LORA_GRADS: tl.constexpr,  # dx with g in-tile and one row tile (M <= BM): also dA and dB (see below)
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    BR: tl.constexpr,  # padded rank (in-tile) or rank chunk of the expand loop (precomputed h)
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[M, N] = x @ W.T + bias + scale * h @ B.T, h = x_d @ A.T (in-tile) or given (fp32).

    Shape: x [M, K], W [N, K], A [R, K], B [N, R], h [M, R] fp32, out [M, N]; all by strides;
    hs [M, R] contiguous in out's dtype (STORE_H). ``scale`` already includes 1/(1-p) when
    DROP_MODE == 1; with DROP_MODE == 2 the LoRA term is masked elementwise by the philox mask of
    out's own [M, N] index space, times 1/(1-p) in scale. Every column tile computes the same h
    (same loop, same order: the same bits), so column tile 0 alone stores it: backward reads
    these M x R values instead of recomputing the shrink (one pass over x saved).

    LORA_GRADS (the backward of a decode batch, run as dx on transposed operands: x = dy
    [M, N_dy], out = dx [M, K_x], in-tile h = g = dy @ B): the whole batch is this one row tile,
    so g is complete here and the LoRA gradients need no cross-program reduction. Each program
    writes dA[:, its column tile] = grad_scale * g.T @ (mask * xg)[:, tile] (xg: the forward's x
    [M, K_x] by strides ``stride_gm``, ``stride_gk``) and the rows of dB = dy.T @ hg (hg: the
    forward's hs [M, R], contiguous) for the K steps it owns (step j with j % column tiles ==
    its column index): dy is re-read from L2, once in all. dA [R, N] and dB [K, R] contiguous.
    One launch for the whole frozen-base backward instead of three; no atomics.

    Offsets: each tile's base pointer is formed in int64 (``pid * BM * stride`` passes 2**31 at
    M = 64k, K = 32k); offsets inside a tile stay int32 (the launcher checks BM * stride < 2**31)
    and pointers advance by BK * stride per K step, which keeps the pointer tiles in registers lean.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped order: GROUP_M row tiles share each W column tile while it is hot in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    off_m = pid_m.to(tl.int64) * BM
    off_n = pid_n.to(tl.int64) * BN

    lm = tl.arange(0, BM)
    ln = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = lm < M - off_m
    n_ok = ln < N - off_n
    # Rows / columns past the edge read row 0 of the tile instead of being masked (their results
    # are never stored): the K loop's loads then need no mask at all when BK divides K (EVEN_K).
    lm_in = tl.where(m_ok, lm, 0)
    ln_in = tl.where(n_ok, ln, 0)
    x_ptrs = x_ptr + off_m * stride_xm + (lm_in[:, None] * stride_xm + rk[None, :] * stride_xk)
    w_ptrs = w_ptr + off_n * stride_wn + (rk[:, None] * stride_wk + ln_in[None, :] * stride_wn)  # [BK, BN]

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if SHRINK_IN_TILE:
        rr = tl.arange(0, BR)
        r_ok = rr < R
        a_ptrs = a_ptr + (rk[:, None] * stride_ak + rr[None, :] * stride_ar)  # [BK, BR]
        h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = rk < K - k0
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _mma(xt, wt, acc, DOT_PREC, INTERPRET)
        if SHRINK_IN_TILE:
            at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if DROP_MODE == 1:
                xt = tl.where(_keep(seed, off_m + lm, k0 + rk, K, drop_p), xt, 0.0).to(at.dtype)
            h = _mma(xt, at, h, DOT_PREC, INTERPRET)
            a_ptrs += BK * stride_ak
        x_ptrs += BK * stride_xk
        w_ptrs += BK * stride_wk

    b_ptrs = b_ptr + off_n * stride_bn + ln[None, :] * stride_bn  # [1, BN]
    hs_ptrs = hs_ptr + off_m * R + lm[:, None] * R  # [BM, 1] rows of hs (contiguous [M, R])
    hs_ok = lm < tl.where(pid_n == 0, M - off_m, 0)  # rows column tile 0 stores (the others store none)
    if SHRINK_IN_TILE:
        if STORE_H:
            tl.store(hs_ptrs + rr[None, :], (h * h_scale).to(hs_ptr.dtype.element_ty),
                     mask=hs_ok[:, None] & r_ok[None, :])
        bt = tl.load(b_ptrs + rr[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if DROP_MODE == 2:
            lora = _expand(tl.zeros((BM, BN), dtype=tl.float32), h * scale, bt, DOT_PREC, INTERPRET)
            acc += tl.where(_keep(seed, off_m + lm, off_n + ln, N, drop_p), lora, 0.0)
        else:
            acc = _expand(acc, h * scale, bt, DOT_PREC, INTERPRET)
    else:
        rc = tl.arange(0, BR)
        h_ptrs = h_ptr + off_m * stride_hm + (lm[:, None] * stride_hm + rc[None, :])
        if DROP_MODE == 2:
            lora = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, BR):
            r_ok = rc < R - r0
            ht = tl.load(h_ptrs + r0, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            if STORE_H:
                tl.store(hs_ptrs + (r0 + rc)[None, :], (ht * h_scale).to(hs_ptr.dtype.element_ty),
                         mask=hs_ok[:, None] & r_ok[None, :])
            bt = tl.load(b_ptrs + (r0 + rc)[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if DROP_MODE == 2:
                lora = _expand(lora, ht * scale, bt, DOT_PREC, INTERPRET)
            else:
                acc = _expand(acc, ht * scale, bt, DOT_PREC, INTERPRET)
        if DROP_MODE == 2:
            acc += tl.where(_keep(seed, off_m + lm, off_n + ln, N, drop_p), lora, 0.0)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + off_n + ln, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + off_m * stride_om + off_n + (lm[:, None] * stride_om + ln[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    if LORA_GRADS:  # requires SHRINK_IN_TILE and one row tile (off_m = 0): see the docstring
        g = tl.where(m_ok[:, None], h, 0.0)  # rows past M re-read row 0 of dy: they must not count
        xg = tl.load(xg_ptr + (lm[:, None] * stride_gm + (off_n + ln)[None, :] * stride_gk),
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if DROP_MODE == 2:
            xg = tl.where(_keep(seed, lm, off_n + ln, N, drop_p), xg, 0.0).to(xg.dtype)
        da = _expand(tl.zeros((BR, BN), dtype=tl.float32), tl.trans(g) * grad_scale, xg, DOT_PREC, INTERPRET)
        tl.store(da_ptr + (rr[:, None] * N + (off_n + ln)[None, :]), da.to(da_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & n_ok[None, :])
        hg = tl.load(hg_ptr + (lm[:, None] * R + rr[None, :]), mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        dy_rows = x_ptr + lm[:, None] * stride_xm
        for k0 in range(pid_n * BK, K, num_n * BK):
            cols = k0 + rk
            c_ok = cols < K
            dyt = tl.load(dy_rows + cols[None, :] * stride_xk, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            db = _mma(tl.trans(dyt), hg, tl.zeros((BK, BR), dtype=tl.float32), DOT_PREC, INTERPRET)
            tl.store(db_ptr + (cols[:, None] * R + rr[None, :]), db.to(db_ptr.dtype.element_ty),
                     mask=c_ok[:, None] & r_ok[None, :])


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hs, stride_hm,
    h_scale, drop_p, seed,
    DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """h[M, R] (fp32) = h_scale * x_d @ A.T; with SPLIT_K > 1 program (m, s) writes the partial
    sum of its K range to slice ``s`` of h [SPLIT_K, M, R], summed by the launcher in a fixed
    order (no atomics: the bits of h do not depend on the order programs finish).

    Shape: x [M, K], A [R, K] (by strides), h [SPLIT_K, M, R] fp32 (slice stride ``stride_hs``,
    row stride ``stride_hm``).
    Offsets as in ``_lora_fused_kernel``: int64 tile bases, int32 in-tile offsets.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    off_m = pid_m.to(tl.int64) * BM
    lm = tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rk = tl.arange(0, BK)
    m_ok = lm < M - off_m
    r_ok = rr < R
    k_per_split = tl.cdiv(tl.cdiv(K, BK), SPLIT_K) * BK
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    lm_in = tl.where(m_ok, lm, 0)  # edge rows re-read row 0: no row mask on loads
    x_ptrs = x_ptr + off_m * stride_xm + k_start.to(tl.int64) * stride_xk + (lm_in[:, None] * stride_xm + rk[None, :] * stride_xk)
    a_ptrs = a_ptr + k_start.to(tl.int64) * stride_ak + (rk[:, None] * stride_ak + rr[None, :] * stride_ar)
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        k_ok = rk < k_end - k0
        if EVEN_K:
            xt = tl.load(x_ptrs)
        else:
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DROPOUT:
            xt = tl.where(_keep(seed, off_m + lm, k0 + rk, K, drop_p), xt, 0.0).to(at.dtype)
        h = _mma(xt, at, h, DOT_PREC, INTERPRET)
        x_ptrs += BK * stride_xk
        a_ptrs += BK * stride_ak
    h = h * h_scale
    h_ptrs = h_ptr + pid_k.to(tl.int64) * stride_hs + off_m * stride_hm + (lm[:, None] * stride_hm + rr[None, :])
    tl.store(h_ptrs, h, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_term_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, hs_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_om,
    scale, h_scale, drop_p, seed, n_split,
    HAS_BIAS: tl.constexpr, DROP_MODE: tl.constexpr, STORE_H: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[M, N] = bias + scale * h @ B.T with h = x_d @ A.T (fp32): the LoRA half of the
    "cuBLAS base" path, whose base GEMM then adds x @ W.T into out (``addmm_``, beta = 1).

    Shape: x [M, K], A [R, K], B [N, R] (by strides), bias [N], out [M, N] (row stride
    ``stride_om``), hs [M, R] contiguous in out's dtype. Program ``pid`` owns row tile
    ``pid // n_split``: it streams its x rows and A once over K into h (fp32 registers), stores
    ``hs = h_scale * h`` when STORE_H (split 0 only), then writes the column tiles ``pid % n_split``,
    ``+ n_split``, ... of out (``n_split`` is a runtime int: no recompile per value). The splits of one row tile are adjacent
    programs, so their re-reads of the same x rows hit L2. DROP_MODE as in ``_lora_fused_kernel``
    (1: mask x in the shrink, 2: mask the LoRA term by out's [M, N] philox index).
    """
    pid = tl.program_id(0)
    pid_m = pid // n_split
    pid_n = pid % n_split
    off_m = pid_m.to(tl.int64) * BM
    lm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, BR)
    ln = tl.arange(0, BN)
    m_ok = lm < M - off_m
    r_ok = rr < R
    lm_in = tl.where(m_ok, lm, 0)  # edge rows re-read row 0: no row mask on loads
    x_ptrs = x_ptr + off_m * stride_xm + (lm_in[:, None] * stride_xm + rk[None, :] * stride_xk)
    a_ptrs = a_ptr + (rk[:, None] * stride_ak + rr[None, :] * stride_ar)  # [BK, BR]
    h = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = rk < K - k0
        if EVEN_K:
            xt = tl.load(x_ptrs)
        else:
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DROP_MODE == 1:
            xt = tl.where(_keep(seed, off_m + lm, k0 + rk, K, drop_p), xt, 0.0).to(at.dtype)
        h = _mma(xt, at, h, DOT_PREC, INTERPRET)
        x_ptrs += BK * stride_xk
        a_ptrs += BK * stride_ak
    if STORE_H:
        hs_ptrs = hs_ptr + off_m * R + (lm[:, None] * R + rr[None, :])
        hs_ok = lm < tl.where(pid_n == 0, M - off_m, 0)  # split 0 stores, the others none
        tl.store(hs_ptrs, (h * h_scale).to(hs_ptr.dtype.element_ty), mask=hs_ok[:, None] & r_ok[None, :])
    h = h * scale
    out_rows = out_ptr + off_m * stride_om + lm[:, None] * stride_om
    for n0 in range(pid_n * BN, N, n_split * BN):
        cols = n0 + ln
        n_ok = cols < N
        bt = tl.load(b_ptr + (rr[:, None] * stride_br + cols[None, :] * stride_bn), mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        acc = _expand(tl.zeros((BM, BN), dtype=tl.float32), h, bt, DOT_PREC, INTERPRET)
        if DROP_MODE == 2:
            acc = tl.where(_keep(seed, off_m + lm, cols, N, drop_p), acc, 0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_rows + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dropout_kernel(
    x_ptr, out_ptr, M, K, stride_xm, stride_xk, drop_p, drop_inv, seed,
    WRITE_MASK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """out[M, K] = the keep-mask (int8) or x_d = x * mask / (1 - p), contiguous."""
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    ok = (rm < M)[:, None] & (rk < K)[None, :]
    keep = _keep(seed, rm, rk, K, drop_p)
    out_ptrs = out_ptr + rm[:, None] * K + rk[None, :]
    if WRITE_MASK:
        tl.store(out_ptrs, keep.to(tl.int8), mask=ok)
    else:
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=ok, other=0.0)
        xd = tl.where(keep, xt.to(tl.float32) * drop_inv, 0.0)
        tl.store(out_ptrs, xd.to(out_ptr.dtype.element_ty), mask=ok)


# =============================================================================================
# Config table and heuristic
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class Config:
    BM: int
    BN: int
    BK: int  # for 16-bit inputs with 16-aligned strides; see _bk for fp32 and odd strides
    num_warps: int
    num_stages: int
    GROUP_M: int = 1


# Output-tile configs (forward y and backward dx). Shared memory per stage, bf16:
#   decode_s  x 16x128 + W 128x32 (+ A 128x64 in-tile) = 4 + 8 (+16) KiB -> 4 stages: 112 KiB
#   decode_l  x 64x64  + W 64x32  (+ A 64x64)         = 8 + 4 (+8)  KiB -> 4 stages:  80 KiB
#   prefill   x 128x64 + W 64x128                     = 16 + 16     KiB -> 3 stages:  96 KiB
# all under A100's 163 KiB per block. Decode is memory-bound: what matters is that the grid covers
# the SMs with enough bytes in flight. BN = 32 gives 128 column tiles at N = 4096 (97 % of an
# H200's 132 SMs; BN = 64 left half of them idle: 64 CTAs, ~2.6 MB in flight, predicted 1.2x the
# base by the launch plan), and 3 stages of 12 KiB in flight per CTA (~4.7 MB over 128 CTAs:
# Little's law at ~0.7 us asks ~3.4 MB for 4.8 TB/s). Prefill is the classic 128x128x64 / 8 warps
# tile (two warpgroups of wgmma m64n128k16 on sm_90).
FUSED_CONFIGS = {
    "decode_s": Config(BM=16, BN=32, BK=128, num_warps=4, num_stages=4),
    "decode_l": Config(BM=64, BN=32, BK=64, num_warps=4, num_stages=4),
    "prefill": Config(BM=128, BN=128, BK=64, num_warps=8, num_stages=3, GROUP_M=8),
    # backward dx with dropout: the epilogue holds a second [BM, BN] fp32 accumulator (the LoRA
    # term, masked after the expand) plus the philox state for the tile; at BN = 128 that spilled
    # 96 B (sm_90) / 2.4 KB (sm_80) in ptxas -v, at BN = 64 it fits in ~200 registers.
    "prefill_dx_drop": Config(BM=128, BN=64, BK=64, num_warps=8, num_stages=3, GROUP_M=8),
    # The middle regime (128 < M <= 1024): 128 x 128 tiles gave 64 CTAs at M = 256, N = 4096 (1 per
    # SM at 246 registers: half of an H200's tensor cores idle, predicted 2.8x the base by the
    # launch plan); 64 x 128 over 8 warps gives 128 CTAs there (4 warps hit 255 registers and spilled).
    "middle": Config(BM=64, BN=128, BK=64, num_warps=8, num_stages=3, GROUP_M=8),  # 4 warps: 255 regs, spills
}
MIDDLE_M = 1024
# Shrink configs by rank band (BR = padded rank): the [BM, BR] fp32 accumulator is at most
# 64x256x4 B = 64 KiB = 64 registers/thread over 8 warps; A's [BK, BR] tile dominates shared
# memory (64x256x2 B = 32 KiB per stage).
SHRINK_CONFIGS = {
    "r_le_64": Config(BM=64, BN=0, BK=64, num_warps=4, num_stages=3),
    "r_gt_64": Config(BM=64, BN=0, BK=64, num_warps=8, num_stages=3),
    # fp32 ("ieee" dot on FMA units, operands in registers): BM = 64 spilled 28-388 B at r >= 64
    # in ptxas -v, BM = 32 still 16 B at r = 256 (Triton 3.6 on sm_80, 3.9 on sm_90 with the JIT's
    # divisibility hints); 16 rows over 8 warps fit every rank up to 256 on both.
    "fp32": Config(BM=16, BN=0, BK=64, num_warps=8, num_stages=2),
}
# Rank chunk of the expand loop when h is precomputed: a [BM, 32] fp32 chunk of h plus its hi/lo
# halves; at 64 the 128x128 prefill tile spilled 48 B on sm_80. fp32 inputs use 16: their
# "ieee" dot runs on FMA units with both operand chunks in registers (32 spilled 16-48 B).
EXPAND_CHUNK = 32
EXPAND_CHUNK_FP32 = 16
IN_TILE_MAX_RANK = 64
IN_TILE_MAX_RANK_FP32 = 16  # an fp32 [64, 64] h accumulator next to the FMA tile spilled 1.4 KB
# dx with dropout keeps a second [BM, BN] fp32 accumulator (the masked LoRA term): with an in-tile
# g of rank 64 the decode_l tile spilled 168 B on sm_80, so dropout's dx computes g in-tile to r = 16.
IN_TILE_MAX_RANK_DX_DROP = 16
# The LoRA term of the cuBLAS-base path (``_lora_term_kernel``): a memory-bound kernel (it reads
# x once and writes out once). 64 rows per program keep x and A streaming in 16 KiB stages at
# large M; 16 rows at r > 64 (an fp32 h of [16, 256] is 32 registers/thread over 4 warps) and at
# M <= 1024, where 64-row tiles would leave too few row tiles, and the column splits that fill
# the GPU would re-read each row tile's x from L2 (x of 64 rows x 4096 = 512 KiB per split).
TERM_CONFIGS = {
    "rows64": Config(BM=64, BN=64, BK=64, num_warps=4, num_stages=3),
    "rows16": Config(BM=16, BN=64, BK=64, num_warps=4, num_stages=3),
    # fp32 ("ieee" FMA dots, operands in registers): at r = 256 with dropout, 16 x 32 tiles spilled
    # 8-24 B in ptxas -v (4 warps on sm_80, 8 warps on sm_90); 16 x 16 over 8 warps fits.
    "fp32": Config(BM=16, BN=16, BK=64, num_warps=8, num_stages=2),
}
TERM_ROWS64_MIN_M = 1024
DECODE_M = 128
# M > CUBLAS_BASE_M runs the base GEMM on cuBLAS (``addmm_`` into an out that
# ``_lora_term_kernel`` has filled with bias + the LoRA term) instead of Triton's fused tile: the
# launch plan (lora_kernels/plan/triton.py) predicts it faster for every compute-bound case of
# the benchmark matrix on H100, H200 and A100 (a Triton main loop without TMA / persistence is
# taken at 0.8x cuBLAS's tensor-core rate on Hopper; the LoRA term costs one more pass over x and
# one write of out, ~4 % each at K = N = 4096); tests/test_plan.py checks the plan agrees.
CUBLAS_BASE_M = DECODE_M
_NUM_SMS = 132  # H200; only used to size split-K / column splits, any GPU gets a correct result


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division: ``triton.cdiv`` is a jit function, 5-23 us per call from Python
    (timeit on this 2-core machine, idle to loaded); four of them were a third of the host path."""
    return -(-a // b)


def _pad_rank(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())  # next power of two, at least 16


def _bk(cfg: Config, elem: int, aligned: bool = True) -> int:
    """K step: the table's for 16-bit; a quarter for fp32, whose "ieee" dot runs on FMA units with
    the [BM, BK] and [BK, BN] operands in registers (BK / 2 still spilled 8-992 B in ptxas -v);
    halved again when the row strides are not multiples of 16 elements (K = 2049): the loads
    cannot vectorize, every element needs its own address register, and the full step spilled in
    the 64- and 128-row tiles."""
    bk = cfg.BK if elem <= 2 else max(16, cfg.BK // 4)
    return bk if aligned else max(16, bk // 2)


def _stages(cfg: Config, elem: int) -> int:
    """Pipeline depth: the table's for 16-bit and 16-row tiles; at most 2 for fp32 tiles of 64+
    rows, whose FMA dot keeps operand tiles in registers (decode_l's 4 stages spilled 16-24 B on
    Triton 3.6, sm_80 and sm_90; decode_s at 2 stages spilled there instead: 16-24 B on sm_90)."""
    return cfg.num_stages if elem <= 2 or cfg.BM < 64 else min(2, cfg.num_stages)


def _expand_chunk(elem: int) -> int:
    return EXPAND_CHUNK if elem <= 2 else EXPAND_CHUNK_FP32


def _aligned(*strides: int) -> bool:
    """Unit or multiple-of-16 strides: what the JIT's divisibility hints need to vectorize loads."""
    return all(st == 1 or st % 16 == 0 for st in strides)


def _fused_regime(m: int, elem: int = 2) -> str:
    if elem > 2:
        # fp32 runs "ieee" dots on FMA units (no tensor cores: compute-bound at any M, ~1/15 of the
        # bf16 rate), where a 128x128 tile only adds register pressure (it spilled 16-176 B).
        return "decode_s" if m <= 16 else "decode_l"
    return "decode_s" if m <= 16 else "decode_l" if m <= DECODE_M else "middle" if m <= MIDDLE_M else "prefill"


def _shrink_in_tile(m: int, r: int, dropout: bool, elem: int = 2, save: bool = False) -> bool:
    max_rank = IN_TILE_MAX_RANK if elem <= 2 else IN_TILE_MAX_RANK_FP32
    if save and elem > 2 and _fused_regime(m, elem) == "decode_l":
        return False  # fp32 64-row tile + the store of hs spilled 8 B on sm_90 with Triton 3.6
    return m <= DECODE_M and _pad_rank(r) <= max_rank and not dropout


def _dx_in_tile(m: int, r: int, dropout: bool, elem: int = 2) -> bool:
    """Whether dx computes g = dy @ B inside every output tile (else the shrink kernel runs first)."""
    return _shrink_in_tile(m, r, False, elem) and (not dropout or _pad_rank(r) <= IN_TILE_MAX_RANK_DX_DROP)


def _cublas_base(m: int, n: int, r: int) -> bool:
    """Whether the base GEMM of an [m, K] x [K, n] call at rank r runs on cuBLAS (see CUBLAS_BASE_M).

    M alone decides today. The launch plan shows where that is off (``python -m lora_kernels plan``,
    column "other"): at M = 64 the cuBLAS base is predicted faster for N = 14336 and for r = 64 at
    N = 6144 / 14336 (the 64-row fused tile re-reads x from L2 in each of N/32 column tiles), the
    fused tile for r = 64 at N = 4096; a rule in n and r that matches every case is open.
    """
    return m > CUBLAS_BASE_M


def _term_cfg(m: int, r: int, elem: int = 2) -> Config:
    if elem > 2:
        return TERM_CONFIGS["fp32"]
    return TERM_CONFIGS["rows64" if m > TERM_ROWS64_MIN_M and _pad_rank(r) <= 64 else "rows16"]


def _term_split(m: int, n: int, cfg: Config) -> int:
    """Programs per row tile of ``_lora_term_kernel``: enough to give every SM one, at most one per column tile."""
    return max(1, min(_cdiv(n, cfg.BN), _cdiv(_NUM_SMS, _cdiv(m, cfg.BM))))


def _shrink_cfg(r: int, elem: int = 2) -> Config:
    if elem > 2:
        return SHRINK_CONFIGS["fp32"]
    return SHRINK_CONFIGS["r_le_64" if _pad_rank(r) <= 64 else "r_gt_64"]


def _split_k(m: int, k: int, bm: int, bk: int) -> int:
    tiles = _cdiv(m, bm)
    if tiles >= _NUM_SMS:
        return 1
    max_split = max(1, _cdiv(k, 4 * bk))  # at least 4 K-steps per program
    return max(1, min(max_split, _cdiv(2 * _NUM_SMS, tiles)))


def _interpret() -> bool:
    from ..dispatch import triton_interpreter

    return triton_interpreter()


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit dots


# =============================================================================================
# Launchers
# =============================================================================================


def _as_rows(x: Tensor) -> Tensor:
    """x [..., K] as [M, K]: a view when the leading dims flatten, else a deliberate copy."""
    return x.reshape(-1, x.shape[-1])


def _launch_fused(x2: Tensor, w_nk: Tensor, bias: Tensor | None, a_rk: Tensor, b_nr: Tensor, h: Tensor | None,
                  out: Tensor, scale: float, drop_p: float, seed: int, drop_mode: int, in_tile: bool,
                  regime: str | None = None, hs: Tensor | None = None, h_scale: float = 1.0,
                  grads: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, grad_scale: float = 1.0) -> Tensor:
    """out = x2 @ w_nk.T + bias + scale * h @ b_nr.T (h = x2_d @ a_rk.T when ``in_tile``);
    also ``hs = h_scale * h`` in out's dtype when ``hs`` is given (for backward).

    Shape: x2 [M, K], w_nk [N, K], a_rk [r, K], b_nr [N, r], h [M, r] fp32 or None, out [M, N]
    (row-major, any row stride), hs [M, r] contiguous or None. Every operand goes by its strides.
    ``grads = (xg, hg, da, db)``: the LORA_GRADS epilogue of a dx launch (one row tile, in-tile g).
    """
    m, k = x2.shape
    n, r = b_nr.shape
    if m == 0 or n == 0:
        return out
    elem = x2.element_size()
    regime = regime or _fused_regime(m, elem)
    if regime == "prefill" and drop_mode == 2:
        regime = "prefill_dx_drop"
    cfg = FUSED_CONFIGS[regime]
    bk = _bk(cfg, elem, _aligned(x2.stride(0), w_nk.stride(0), w_nk.stride(1)))
    # In-tile offsets are int32 (see the kernel): refuse the (absurd) strides that would overflow.
    for name, st, rows in (("x", x2.stride(0), cfg.BM), ("x", x2.stride(1), bk), ("weight", w_nk.stride(0), cfg.BN),
                           ("weight", w_nk.stride(1), bk), ("out", out.stride(0), cfg.BM)):
        if abs(st) * rows >= 2**31:
            raise ValueError(f"lora_linear: {name} stride {st} too large for int32 in-tile offsets; make it contiguous")
    br = _pad_rank(r) if in_tile else min(_expand_chunk(elem), _pad_rank(r))
    if h is None:
        h = out  # unused (SHRINK_IN_TILE); any pointer of the right kind
    if grads is not None and not (in_tile and m <= cfg.BM):
        raise ValueError("lora_linear: the LoRA gradients ride on a dx launch with g in-tile and one row tile only")
    xg, hg, da, db = grads if grads is not None else (out, out, out, out)
    grid = (_cdiv(m, cfg.BM) * _cdiv(n, cfg.BN),)
    _lora_fused_kernel[grid](
        x2, w_nk, bias if bias is not None else out, a_rk, b_nr, h, out, hs if hs is not None else out, xg, hg, da, db,
        m, n, k, r,
        x2.stride(0), x2.stride(1), w_nk.stride(0), w_nk.stride(1), a_rk.stride(0), a_rk.stride(1),
        b_nr.stride(0), b_nr.stride(1), h.stride(0), out.stride(0), xg.stride(0), xg.stride(1),
        float(scale), float(h_scale), float(drop_p), int(seed), float(grad_scale),
        HAS_BIAS=bias is not None, SHRINK_IN_TILE=in_tile, DROP_MODE=drop_mode, STORE_H=hs is not None,
        LORA_GRADS=grads is not None,
        BM=cfg.BM, BN=cfg.BN, BK=bk, BR=br, GROUP_M=cfg.GROUP_M,
        EVEN_K=k % bk == 0, DOT_PREC=_dot_prec(x2.dtype), INTERPRET=_interpret(),
        num_warps=cfg.num_warps, num_stages=_stages(cfg, elem),
    )
    return out


def _launch_shrink(x2: Tensor, a_rk: Tensor, h_scale: float, drop_p: float, seed: int) -> Tensor:
    """h [M, r] fp32 = h_scale * dropout(x2) @ a_rk.T. Shape: x2 [M, K], a_rk [r, K] (any strides)."""
    m, k = x2.shape
    r = a_rk.shape[0]
    elem = x2.element_size()
    cfg = _shrink_cfg(r, elem)
    bk = _bk(cfg, elem, _aligned(x2.stride(0), a_rk.stride(0), a_rk.stride(1)))
    split = _split_k(m, k, cfg.BM, bk)
    h = torch.empty((split, m, r), dtype=torch.float32, device=x2.device)
    if m == 0:
        return h[0]
    grid = (_cdiv(m, cfg.BM), split)
    _shrink_kernel[grid](
        x2, a_rk, h, m, k, r,
        x2.stride(0), x2.stride(1), a_rk.stride(0), a_rk.stride(1), h.stride(0), h.stride(1),
        float(h_scale), float(drop_p), int(seed),
        DROPOUT=drop_p > 0, SPLIT_K=split, BM=cfg.BM, BK=bk, BR=_pad_rank(r),
        EVEN_K=k % bk == 0, DOT_PREC=_dot_prec(x2.dtype), INTERPRET=_interpret(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # The split partials ([split, M, r] fp32: 4 x 16 x 4 B per row at r = 16, tiny next to x) are
    # summed in a fixed order by one small reduction: deterministic, where atomics were not.
    return h[0] if split == 1 else h.sum(0)


def _launch_term(x2: Tensor, a_rk: Tensor, b_nr: Tensor, bias: Tensor | None, out: Tensor, hs: Tensor | None,
                 scale: float, h_scale: float, drop_p: float, seed: int, drop_mode: int) -> Tensor:
    """out = bias + scale * h @ b_nr.T, h = x2_d @ a_rk.T (fp32, never in HBM); hs = h_scale * h.

    Shape: x2 [M, K], a_rk [r, K], b_nr [N, r] (any strides), out [M, N] (unit column stride),
    hs [M, r] contiguous or None. The caller then adds the base GEMM into out (``addmm_``).
    """
    m, k = x2.shape
    n, r = b_nr.shape
    if m == 0 or n == 0:
        return out
    elem = x2.element_size()
    cfg = _term_cfg(m, r, elem)
    bk = _bk(cfg, elem, _aligned(x2.stride(0), a_rk.stride(0), a_rk.stride(1)))
    for name, st, rows in (("x", x2.stride(0), cfg.BM), ("x", x2.stride(1), bk), ("out", out.stride(0), cfg.BM)):
        if abs(st) * rows >= 2**31:
            raise ValueError(f"lora_linear: {name} stride {st} too large for int32 in-tile offsets; make it contiguous")
    split = _term_split(m, n, cfg)
    _lora_term_kernel[(_cdiv(m, cfg.BM) * split,)](
        x2, a_rk, b_nr, bias if bias is not None else out, out, hs if hs is not None else out,
        m, n, k, r,
        x2.stride(0), x2.stride(1), a_rk.stride(0), a_rk.stride(1), b_nr.stride(0), b_nr.stride(1), out.stride(0),
        float(scale), float(h_scale), float(drop_p), int(seed), split,
        HAS_BIAS=bias is not None, DROP_MODE=drop_mode, STORE_H=hs is not None,
        BM=cfg.BM, BN=cfg.BN, BK=bk, BR=_pad_rank(r), EVEN_K=k % bk == 0, DOT_PREC=_dot_prec(x2.dtype),
        INTERPRET=_interpret(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _launch_dropout(x2: Tensor, drop_p: float, seed: int, write_mask: bool) -> Tensor:
    m, k = x2.shape
    out = torch.empty((m, k), dtype=torch.int8 if write_mask else x2.dtype, device=x2.device)
    if m and k:
        bm, bk = 32, 128
        _dropout_kernel[(_cdiv(m, bm), _cdiv(k, bk))](
            x2, out, m, k, x2.stride(0), x2.stride(1), float(drop_p), 1.0 / (1.0 - drop_p), int(seed),
            WRITE_MASK=write_mask, BM=bm, BK=bk)
    return out


def lora_linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                        scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0, *, out: Tensor | None = None,
                        shrink_in_tile: bool | None = None, regime: str | None = None, cublas_base: bool | None = None,
                        save_h: bool = False, check: bool = True) -> tuple[Tensor, Tensor | None]:
    """The forward launcher: checks, allocates (or writes into ``out`` [M, N]) and launches.

    Shape: x [..., K] -> (y [..., N], hs [M, r] or None). ``hs = scale * dropout(x) @ A.T`` in x's
    dtype is written when ``save_h`` (backward's dB = dy.T @ hs reads it: no shrink recomputed).
    Two paths (see CUBLAS_BASE_M): M <= 128, one fused Triton kernel (the shrink inside every
    output tile when r <= 64 and no dropout, else a tiny preceding shrink kernel); M > 128,
    ``_lora_term_kernel`` writes bias + the LoRA term into y and cuBLAS adds x @ W.T (beta = 1).
    ``shrink_in_tile`` / ``regime`` / ``cublas_base`` override the heuristic (tests use them to
    cover every path on small shapes). ``check=False``: the caller has run ``check_lora_linear``
    already (the public entry does; one check per call, not two).
    """
    if check:
        check_lora_linear(x, weight, bias, lora_a, lora_b, dropout_p)
    x2 = _as_rows(x)
    m, k = x2.shape
    n, r = lora_b.shape
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with unit column stride, got {tuple(out.shape)} {out.dtype}")
    hs = torch.empty((m, r), dtype=x.dtype, device=x.device) if save_h else None
    bias = bias.contiguous() if bias is not None else None  # N elements: a copy only when strided
    dropout = dropout_p > 0
    inv = 1.0 / (1.0 - dropout_p)
    if _cublas_base(m, n, r) if cublas_base is None else cublas_base:
        _launch_term(x2, lora_a, lora_b, bias, out, hs, scale * inv, scale * inv, dropout_p, seed, 1 if dropout else 0)
        if m and n and k:
            out.addmm_(x2, weight.t())  # cuBLAS: out = x @ W.T + out (the LoRA term and bias)
        return out.view(*x.shape[:-1], n), hs
    in_tile = _shrink_in_tile(m, r, dropout, x.element_size(), save_h) if shrink_in_tile is None else shrink_in_tile
    if in_tile:
        _launch_fused(x2, weight, bias, lora_a, lora_b, None, out, scale * inv, dropout_p, seed,
                      1 if dropout else 0, True, regime, hs, scale * inv)
    else:
        h = _launch_shrink(x2, lora_a, inv, dropout_p, seed)
        _launch_fused(x2, weight, bias, lora_a, lora_b, h, out, scale, 0.0, 0, 0, False, regime, hs, scale)
    return out.view(*x.shape[:-1], n), hs


def lora_linear_dx(dy: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout_p: float, seed: int,
                   *, out: Tensor | None = None, shrink_in_tile: bool | None = None, regime: str | None = None,
                   cublas_base: bool | None = None) -> tuple[Tensor, Tensor]:
    """(dx [M, K], gs [M, r]): dx = dy @ W + mask * (scale/(1-p)) * g @ A with g = dy @ B (fp32),
    and ``gs = scale * g`` in dy's dtype (dA = gs.T @ dropout(x) reads it).

    Shape: dy [M, N], weight [N, K], lora_a [r, K], lora_b [N, r]. The forward's paths on
    transposed operands (W.T [K, N] is the "weight", B.T [r, N] plays A, A.T [K, r] plays B):
    M <= 128, one fused kernel with g computed inside every output tile (r <= 64; else g by the
    shrink kernel first) and the dropout mask applied to the LoRA term in the epilogue; M > 128,
    ``_lora_term_kernel`` writes the LoRA term and cuBLAS adds dy @ W.
    """
    m, n = dy.shape
    k = weight.shape[1]
    r = lora_a.shape[0]
    if out is None:
        out = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    gs = torch.empty((m, r), dtype=dy.dtype, device=dy.device)
    inv = 1.0 / (1.0 - dropout_p)
    drop_mode = 2 if dropout_p > 0 else 0
    if _cublas_base(m, k, r) if cublas_base is None else cublas_base:
        _launch_term(dy, lora_b.t(), lora_a.t(), None, out, gs, scale * inv, scale, dropout_p, seed, drop_mode)
        if m and n and k:
            out.addmm_(dy, weight)  # cuBLAS: dx = dy @ W + the LoRA term
        return out, gs
    in_tile = _dx_in_tile(m, r, dropout_p > 0, dy.element_size()) if shrink_in_tile is None else shrink_in_tile
    g = None if in_tile else _launch_shrink(dy, lora_b.t(), 1.0, 0.0, 0)
    _launch_fused(dy, weight.t(), None, lora_b.t(), lora_a.t(), g, out, scale * inv, dropout_p, seed, drop_mode, in_tile,
                  regime, gs, scale)
    return out, gs


def lora_linear_backward(dy: Tensor, x2: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, hs: Tensor, scale: float,
                         dropout_p: float, seed: int, *, shrink_in_tile: bool | None = None,
                         cublas_base: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [M, K], dA [r, K], dB [N, r]) of a frozen-base layer: the whole backward but dW, db.

    Shape: dy [M, N], x2 [M, K] (the forward's x), weight [N, K], lora_a [r, K], lora_b [N, r],
    hs [M, r] = scale * dropout(x) @ A.T from the forward (contiguous, x's dtype). A decode batch
    that fits one row tile of the fused dx kernel with g in-tile (M <= 64 and r <= 64; r <= 16
    with dropout) gets all three from that one launch (LORA_GRADS); otherwise dx by
    :func:`lora_linear_dx`, then dA = gs.T @ x_d and dB = dy.T @ hs as two GEMMs.
    """
    m, n = dy.shape
    k = weight.shape[1]
    r = lora_a.shape[0]
    inv = 1.0 / (1.0 - dropout_p)
    drop_mode = 2 if dropout_p > 0 else 0
    cfg = FUSED_CONFIGS[_fused_regime(m, dy.element_size())]
    cublas = _cublas_base(m, k, r) if cublas_base is None else cublas_base
    in_tile = _dx_in_tile(m, r, dropout_p > 0, dy.element_size()) if shrink_in_tile is None else shrink_in_tile
    if not cublas and in_tile and 0 < m <= cfg.BM:
        dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
        da = torch.empty((r, k), dtype=dy.dtype, device=dy.device)
        db = torch.empty((n, r), dtype=dy.dtype, device=dy.device)
        _launch_fused(dy, weight.t(), None, lora_b.t(), lora_a.t(), None, dx, scale * inv, dropout_p, seed, drop_mode, True,
                      grads=(x2, hs, da, db), grad_scale=scale * inv)
        return dx, da, db
    dx, gs = lora_linear_dx(dy, weight, lora_a, lora_b, scale, dropout_p, seed, shrink_in_tile=shrink_in_tile,
                            cublas_base=cublas_base)
    xd = _launch_dropout(x2, dropout_p, seed, False) if dropout_p > 0 else x2
    return dx, gs.t() @ xd, dy.t() @ hs  # cuBLAS GEMMs over the M tokens


def dropout_mask(x: Tensor, dropout_p: float, seed: int | Tensor) -> Tensor:
    """The keep-mask (bool, shape of x) the kernels apply for ``dropout_p`` and ``seed``.

    Shape: x [..., K] -> [..., K]. Element (m, k) of x flattened to [M, K] is kept iff
    ``philox_uniform(seed, m*K + k) >= p``. The forward, the backward and this function draw the
    same bits, so ``reference(x * mask / (1 - p))`` is the kernels' exact dropout.
    """
    x2 = _as_rows(x)
    return _launch_dropout(x2, dropout_p, int(seed), True).view(x.shape).bool()


def new_seed() -> Tensor:
    """A fresh dropout seed from torch's default CPU generator (int64 [1], no device sync)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


# =============================================================================================
# torch.library custom ops + fake implementations
# =============================================================================================


def _seed_int(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0  # a CPU tensor: no device sync


@torch.library.custom_op("lora_kernels::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                    dropout_p: float, seed: Optional[Tensor], save_h: bool) -> tuple[Tensor, Tensor]:
    """(y [..., N], hs [M, r]): y = x @ W.T + b + scale * (dropout(x) @ A.T) @ B.T (fused Triton
    forward) and hs = scale * dropout(x) @ A.T in x's dtype for backward ([0, r] unless ``save_h``).
    No argument has a default: a schema default costs ~15 % of the host path (torch fills
    defaults on every autograd call).

    Internal: reached through :func:`lora_linear`, which has checked the arguments."""
    y, hs = lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, _seed_int(seed), save_h=save_h,
                                check=False)
    return y, hs if hs is not None else x.new_empty((0, lora_a.shape[0]))


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, save_h):
    rows = x.shape[:-1].numel() if save_h else 0
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, lora_a.shape[0]))


@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=())
def _lora_shrink_op(x: Tensor, lora_a: Tensor, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """h [M, r] fp32 = dropout(x) @ A.T, x [..., K] flattened to M rows, A [r, K] (any strides)."""
    return _launch_shrink(_as_rows(x), lora_a, 1.0 / (1.0 - dropout_p), dropout_p, _seed_int(seed))


@_lora_shrink_op.register_fake
def _(x, lora_a, dropout_p, seed):
    return x.new_empty((x.shape[:-1].numel(), lora_a.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lora_kernels::lora_linear_dx", mutates_args=())
def _lora_linear_dx_op(dy: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout_p: float,
                       seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(dx [M, K], gs [M, r]): dx = dy @ W + dropout_mask * scale/(1-p) * (dy @ B) @ A, gs = scale * dy @ B
    (dy's dtype). dy [M, N]; one fused Triton pass (M <= 128) or the LoRA-term kernel + cuBLAS."""
    return lora_linear_dx(dy, weight, lora_a, lora_b, scale, dropout_p, _seed_int(seed))


@_lora_linear_dx_op.register_fake
def _(dy, weight, lora_a, lora_b, scale, dropout_p, seed):
    return dy.new_empty((dy.shape[0], weight.shape[1])), dy.new_empty((dy.shape[0], lora_a.shape[0]))


@torch.library.custom_op("lora_kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, hs: Tensor,
                             scale: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [M, K], dA [r, K], dB [N, r]) of a frozen-base layer from dy [M, N], x [M, K] and the
    forward's hs [M, r]: one fused launch for a decode batch, else dx + two GEMMs."""
    return lora_linear_backward(dy, x, weight, lora_a, lora_b, hs, scale, dropout_p, _seed_int(seed))


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, hs, scale, dropout_p, seed):
    return x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


@torch.library.custom_op("lora_kernels::lora_dropout", mutates_args=())
def _lora_dropout_op(x: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """x_d [M, K] = x * mask / (1 - p) with the kernels' philox mask; x [..., K] flattened."""
    return _launch_dropout(_as_rows(x), dropout_p, _seed_int(seed), False)


@_lora_dropout_op.register_fake
def _(x, dropout_p, seed):
    return x.new_empty((x.shape[:-1].numel(), x.shape[-1]))


# =============================================================================================
# Autograd
# =============================================================================================


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, save_h = inputs
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.has_bias = bias is not None
    # Saved: the inputs (x, W, A, B, seed) and hs = s * x_d @ A.T [M, r] from the forward (tiny:
    # r values per row), so dB needs no second shrink over x; the dropout mask is regenerated from the seed.
    ctx.save_for_backward(x, weight, lora_a, lora_b, seed, output[1])


def _backward(ctx, dy, dhs):
    """Passes over the big operands (frozen base): dx reads dy and W once (fused, or the LoRA-term
    kernel + cuBLAS: dy twice), dA = gs.T @ x_d reads x once, dB = dy.T @ hs reads dy once; a
    decode batch gets dx, dA and dB from one launch (``lora_linear_backward``)."""
    x, weight, lora_a, lora_b, seed, hs = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
    s, p = ctx.scale, ctx.dropout_p
    n, k = weight.shape
    dy2 = dy.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = dw = db = da = dlb = gs = None
    if need_x and need_a and need_lb and hs.shape[0] == x2.shape[0]:  # LoRA training: one op, often one launch
        dx, da, dlb = torch.ops.lora_kernels.lora_linear_backward(dy2, x2, weight, lora_a, lora_b, hs, s, p, seed)
        dx = dx.view(x.shape)
        need_x = need_a = need_lb = False
    if need_x:
        dx, gs = torch.ops.lora_kernels.lora_linear_dx(dy2, weight, lora_a, lora_b, s, p, seed)
        dx = dx.view(x.shape)
    elif need_a:  # no dx wanted: only g = dy @ B
        gs = (torch.ops.lora_kernels.lora_shrink(dy2, lora_b.t(), 0.0, None) * s).to(x.dtype)
    if need_a:
        xd = torch.ops.lora_kernels.lora_dropout(x2, p, seed) if p > 0 else x2
        da = gs.t() @ xd  # [r, K]; cuBLAS GEMM over the M tokens
    if need_lb:
        if hs.shape[0] != x2.shape[0]:  # the forward ran without save_h (a direct op call)
            hs = (torch.ops.lora_kernels.lora_shrink(x2, lora_a, p, seed) * s).to(x.dtype)
        dlb = dy2.t() @ hs  # [N, r]
    if need_w:
        dw = dy2.t() @ x2  # [N, K]
    if need_b and ctx.has_bias:
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, da, dlb, None, None, None, None


torch.library.register_autograd("lora_kernels::lora_linear", _backward, setup_context=_setup_context)


# =============================================================================================
# Public entry point
# =============================================================================================


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float = 1.0,
                *, dropout_p: float = 0.0) -> Tensor:
    """``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T`` on Triton.

    Shape: x [..., K], weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r] -> y [..., N].
    Differentiable in x, weight, bias, lora_a and lora_b. Dropout (``dropout_p > 0``) masks the
    LoRA input only, with a fresh seed from torch's default CPU generator per call (see
    :func:`dropout_mask`). float64 inputs run on the torch reference (Triton's fp64 dot is not a
    path worth shipping: no tensor cores, and nothing in the contract needs it fast).
    """
    check_lora_linear(x, weight, bias, lora_a, lora_b, dropout_p)
    if x.dtype == torch.float64:
        from .. import reference

        return reference._lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p)
    dropout_p = float(dropout_p)
    seed = new_seed() if dropout_p > 0 else None
    save_h = torch.is_grad_enabled() and lora_b.requires_grad  # hs feeds dB only
    return torch.ops.lora_kernels.lora_linear(x, weight, bias, lora_a, lora_b, float(scale), dropout_p, seed, save_h)[0]


# =============================================================================================
# AOT specs: every shipped kernel config, for tests/test_triton_aot.py
# =============================================================================================

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs(dtypes=(torch.bfloat16, torch.float32)) -> Iterator[tuple[str, object, dict, dict, int, int]]:
    """Yield ``(name, kernel, signature, constexprs, num_warps, num_stages)`` for every config the
    heuristic can pick: the fused forward (in-tile shrink or precomputed h, with and without the
    ``-save`` of hs for backward) and dx (in-tile g or precomputed, epilogue dropout) per decode
    regime; the middle / prefill fused tiles (the alternative the launch plan compares the cuBLAS
    base against; reachable with ``cublas_base=False``); the LoRA-term kernel of the cuBLAS-base
    path per row band and rank (forward, dropout, dx); the shrink per rank band (forward x @ A.T
    with and without dropout, backward dy @ B, split-K). The signatures are what the JIT sees for
    contiguous torch tensors with M, K, N, r multiples of 16: unit strides become constexpr 1, the
    other strides and the sizes carry the divisible-by-16 hint (``"i32:16"``); ``*-m1`` entries and
    the split-K shrink (run at small M) take M = 1 as the constant the JIT makes of it; ``*-odd``
    entries drop the hints (K, N = 2049).
    """
    for dtype in dtypes:
        t, elem = _TL[dtype], torch.tensor([], dtype=dtype).element_size()
        prec = _dot_prec(dtype)
        chunk = _expand_chunk(elem)
        ptrs = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}",
                "h_ptr": "*fp32", "out_ptr": f"*{t}", "hs_ptr": f"*{t}", "xg_ptr": f"*{t}", "hg_ptr": f"*{t}",
                "da_ptr": f"*{t}", "db_ptr": f"*{t}", "M": "i32", "N": "i32", "K": "i32", "R": "i32"}
        strides = ("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ar", "stride_ak",
                   "stride_bn", "stride_br", "stride_hm", "stride_om", "stride_gm", "stride_gk")
        # (name, unit strides, strides divisible by 16): forward [x, W, A, B row-major],
        # dx [dy, W.T, B.T (as A: [r, N], stride r), A.T (as B: [K, r], stride K)]
        # (unused xg strides: the JIT sees out's, [M, N] row-major; dx: the forward's x, [M, K] row-major)
        layouts = {"fwd": (("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_gk"),
                           ("stride_xm", "stride_wn", "stride_ar", "stride_om", "stride_gm")),
                   "dx": (("stride_xk", "stride_wn", "stride_ar", "stride_bn", "stride_gk"),
                          ("stride_xm", "stride_wk", "stride_ak", "stride_br", "stride_om", "stride_gm")),
                   "fwd-odd": (("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_gk"), ())}
        for regime, cfg in FUSED_CONFIGS.items():
            if elem > 2 and regime in ("middle", "prefill", "prefill_dx_drop"):
                continue  # never picked for fp32 (see _fused_regime)
            # (name, layout, in-tile shrink, DROP_MODE, BR, store hs, LoRA grads)
            if regime == "prefill_dx_drop":
                variants = [("h_drop", "dx", False, 2, chunk, True, False)]
            elif regime in ("middle", "prefill"):
                variants = [("h", "fwd", False, 0, chunk, False, False), ("h", "dx", False, 0, chunk, True, False)]
            else:
                variants = [("h", "fwd", False, 0, chunk, False, False), ("h-save", "fwd", False, 0, chunk, True, False),
                            ("h", "fwd-odd", False, 0, chunk, False, False),
                            ("h", "dx", False, 0, chunk, True, False), ("h_drop", "dx", False, 2, chunk, True, False)]
                for br in (16, IN_TILE_MAX_RANK) if elem <= 2 else (16,):
                    variants += [(f"intile_r{br}", "fwd", True, 0, br, False, False)]
                    if elem <= 2 or regime != "decode_l":  # see _shrink_in_tile
                        variants.append((f"intile_r{br}-save", "fwd", True, 0, br, True, False))
                    variants += [(f"intile_r{br}", "dx", True, 0, br, True, False),
                                 (f"intile_r{br}-grads", "dx", True, 0, br, False, True)]
                    if br <= IN_TILE_MAX_RANK_DX_DROP:
                        variants += [(f"intile_r{br}_drop", "dx", True, 2, br, True, False),
                                     (f"intile_r{br}_drop-grads", "dx", True, 2, br, False, True)]
                variants.append(("intile_r16", "fwd-odd", True, 0, 16, False, False))
            if regime == "decode_s":  # M = 1 (one token): the JIT makes M a constant 1
                variants += [(v + "-m1", lay, *rest) for v, lay, *rest in variants if lay == "fwd"]
            for vname, layout, in_tile, drop_mode, br, store_h, grads in variants:
                units, div16 = layouts[layout]
                aligned = layout != "fwd-odd"
                sig = dict(ptrs)
                # The JIT's specialisation of the int args: 1 -> constant, multiple of 16 -> hint
                # (M = 16, 64, ...; N, K, r = 16, 64 when aligned; odd K, N = 2049 get none).
                sig.update({"M": "constexpr" if vname.endswith("-m1") else "i32:16" if aligned else "i32",
                            "N": "i32:16" if aligned else "i32", "K": "i32:16" if aligned else "i32",
                            "R": "i32:16" if aligned else "i32"})
                sig.update({st: "constexpr" if st in units else "i32:16" if st in div16 else "i32" for st in strides})
                sig.update({"scale": "fp32", "h_scale": "fp32", "drop_p": "fp32", "seed": "i32", "grad_scale": "fp32"})
                consts = {st: 1 for st in units}
                if vname.endswith("-m1"):
                    consts["M"] = 1
                consts.update({"HAS_BIAS": layout != "dx", "SHRINK_IN_TILE": in_tile, "DROP_MODE": drop_mode,
                               "STORE_H": store_h, "LORA_GRADS": grads, "BM": cfg.BM,
                               "BN": cfg.BN, "BK": _bk(cfg, elem, layout != "fwd-odd"), "BR": br, "GROUP_M": cfg.GROUP_M,
                               "EVEN_K": layout != "fwd-odd", "DOT_PREC": prec,
                               "INTERPRET": False})
                sig.update({c: "constexpr" for c in consts})
                yield (f"fused/{regime}/{vname}/{layout}/{t}", _lora_fused_kernel, sig, consts, cfg.num_warps,
                       _stages(cfg, elem))
        # The LoRA-term kernel (cuBLAS-base path): forward [x, A, B row-major], dx [dy, B.T, A.T].
        term_layouts = {"fwd": (("stride_xk", "stride_ak", "stride_br"), ("stride_xm", "stride_ar", "stride_bn", "stride_om")),
                        "dx": (("stride_xk", "stride_ar", "stride_bn"), ("stride_xm", "stride_ak", "stride_br", "stride_om")),
                        "fwd-odd": (("stride_xk", "stride_ak", "stride_br"), ())}
        term_bands = (("rows64", (16, 64)), ("rows16", (16, 64, 128, 256))) if elem <= 2 else (("fp32", (16, 64, 128, 256)),)
        for band, ranks in term_bands:
            cfg = TERM_CONFIGS[band]
            for br in ranks:
                # (name, layout, DROP_MODE, store hs)
                for vname, layout, drop_mode, store_h in (("plain", "fwd", 0, False), ("save", "fwd", 0, True),
                                                          ("drop-save", "fwd", 1, True), ("plain", "fwd-odd", 0, False),
                                                          ("gs", "dx", 0, True), ("drop-gs", "dx", 2, True)):
                    units, div16 = term_layouts[layout]
                    aligned = layout != "fwd-odd"
                    hint = "i32:16" if aligned else "i32"
                    sig = {"x_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}", "bias_ptr": f"*{t}", "out_ptr": f"*{t}",
                           "hs_ptr": f"*{t}", "M": hint, "N": hint, "K": hint, "R": hint}
                    sig.update({st: "constexpr" if st in units else "i32:16" if st in div16 else "i32"
                                for st in ("stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_bn", "stride_br",
                                           "stride_om")})
                    sig.update({"scale": "fp32", "h_scale": "fp32", "drop_p": "fp32", "seed": "i32", "n_split": "i32"})
                    consts = {st: 1 for st in units}
                    consts.update({"HAS_BIAS": layout != "dx", "DROP_MODE": drop_mode, "STORE_H": store_h, "BM": cfg.BM,
                                   "BN": cfg.BN, "BK": _bk(cfg, elem, aligned), "BR": br, "EVEN_K": aligned,
                                   "DOT_PREC": prec, "INTERPRET": False})
                    sig.update({c: "constexpr" for c in consts})
                    yield f"term/{band}/r{br}/{vname}/{layout}/{t}", _lora_term_kernel, sig, consts, cfg.num_warps, cfg.num_stages
        bands = (("r_le_64", (16, 64)), ("r_gt_64", (128, 256))) if elem <= 2 else (("fp32", (16, 64, 128, 256)),)
        for band, ranks in bands:
            cfg = SHRINK_CONFIGS[band]
            for br in ranks:
                # x @ A.T (forward, A [r, K] row-major), dy @ B (backward, B.T as [r, N]: stride_ar = 1)
                for use, units, div16, dropout, split in (("xA", ("stride_xk", "stride_ak"), ("stride_xm", "stride_ar"), False, 1),
                                                          ("xA_drop", ("stride_xk", "stride_ak"), ("stride_xm", "stride_ar"), True, 4),
                                                          ("dyB", ("stride_xk", "stride_ar"), ("stride_xm",), False, 4),
                                                          ("xA-odd", ("stride_xk", "stride_ak"), (), False, 1)):
                    odd = use.endswith("odd")
                    # split-K runs at small M (decode: M = 1, a JIT constant); K, r hinted when aligned.
                    sig = {"x_ptr": f"*{t}", "a_ptr": f"*{t}", "h_ptr": "*fp32",
                           "M": "constexpr" if split > 1 else "i32" if odd else "i32:16",
                           "K": "i32" if odd else "i32:16", "R": "i32:16"}
                    sig.update({st: "constexpr" if st in units else "i32:16" if st in div16 else "i32"
                                for st in ("stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_hs", "stride_hm")})
                    sig.update({"h_scale": "fp32", "drop_p": "fp32", "seed": "i32"})
                    consts = {st: 1 for st in units}
                    if split > 1:
                        consts["M"] = 1
                    consts.update({"DROPOUT": dropout, "SPLIT_K": split, "BM": cfg.BM, "BK": _bk(cfg, elem, not odd), "BR": br,
                                   "EVEN_K": not odd,
                                   "DOT_PREC": prec, "INTERPRET": False})
                    sig.update({c: "constexpr" for c in consts if c not in units})
                    yield f"shrink/{band}/r{br}/{use}/split{split}/{t}", _shrink_kernel, sig, consts, cfg.num_warps, cfg.num_stages
