// Launchers of the lora_kernels CUDA ops. Plain C++ over raw pointers: this header (and the .cu
// files that implement it) include CUDA headers only, so they compile standalone with `nvcc -c`;
// the one torch-facing file is bindings.cpp.
//
// Shapes (row-major, last dim contiguous; ld* are row strides in elements):
//   x [M, K]   W [N, K]   bias [N] | null   A [T, r, K]   B [T, N, r]   y [M, N]
//   h partials (fp32 workspace) [ksplit, M, r]
// Element offsets are int64 throughout (M * K, T * N * r can pass 2^31).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lora_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tokens a block handles in the fused / shrink kernels: 8 * mt, mt in {1, 2, 4, 8}.
// The choice is a function of M only (or of the longest task segment for the mixed shrink), so
// the host code and the workspace sizing agree.
int tile_tokens_for(int64_t rows);

// Shrink: h_part[s, m, j] = sum_{k in split s} x[m, k] * A[t(m), j, k]   (fp32, no scale).
//
// Token tiles: with `tiles == nullptr` the rows are taken in order, `tile_tokens` per tile
// (single task, t = 0). Otherwise tile i is tiles[3i .. 3i+2] = (task, start, count) and its rows
// are order[start .. start+count) (count <= tile_tokens): the rows of one task, so every tile
// reads only its own task's A (segmented / BGMV-style shrink).
struct ShrinkArgs {
  DType dtype;
  const void* x; int64_t ldx;
  const void* a; int64_t a_task_stride;  // elements between A[t] and A[t+1]; rows of A are K long
  int64_t M, K, r;
  const int64_t* order;   // [M] or null
  const int32_t* tiles;   // [num_tiles, 3] or null
  int64_t num_tiles;      // ignored when tiles == null
  int tile_tokens;        // 8, 16, 32 or 64
  float* h_part;          // [ksplit, M, r]
  int ksplit;             // from shrink_splits()
  int64_t k_per_split;    // from shrink_splits()
  bool use_mma;           // tensor cores: fp16/bf16 on sm_80+ (the load width is mma_load_width's)
  int* tickets;           // the fused launch's K-part tickets, zeroed here (null when it has no parts)
  int64_t num_tickets;
};

// How many K splits the shrink uses (and so the workspace's first dim), and their length.
void shrink_splits(int64_t K, int64_t r, int64_t num_tiles, int tile_tokens, int num_sms,
                   int* ksplit, int64_t* k_per_split);

// How many blocks the fused forward splits K into (kparts, 1 = none) and their length: a grid of
// column blocks x token tiles under ~2 blocks per SM (e.g. N = 1024) takes K parts so that every SM
// streams W (for the kernel fused_wide() picks). kparts > 1 needs an fp32 workspace part [kparts, M, N]
// and int tickets [cdiv(N, 16) * token tiles] that the shrink launched just before zeroes
// (ShrinkArgs::tickets). Token tiles: tile_tokens_for(M) rows on the 16-byte tensor-core path (use_mma
// here means can_use_mma: the launcher picks that path exactly then), 8 rows on the vector and scalar paths.
void fused_parts(int64_t M, int64_t N, int64_t K, bool use_mma, int num_sms, int* kparts, int64_t* k_per_part);

// Whether the fused forward runs as wide_kernel (64 columns per block, x staged in shared memory:
// 17..64-token tiles when the grid needs at most 4 K parts, and prefill's expand-only) or as
// skinny_kernel (16 columns per block). FusedArgs::wide must be this answer.
bool fused_wide(int64_t M, int64_t N, bool use_mma, int num_sms);

// Fused forward: y[m, n] = x[m]·W[n] + bias[n] + s(t) * sum_j h[m, j] * B[t][n, j],
// h[m, j] = sum_s h_part[s, m, j], t = task_ids[m] (0 when task_ids is null), s(t) = scales[t]
// (or `scale` when scales is null). Rows with t < 0 get x[m]·W[n] + bias[n] only.
// accumulate: y already holds the base output (e.g. from cuBLAS): only the LoRA term is added
// (rows with t < 0 are not touched at all); pass K = 0 then.
struct FusedArgs {
  DType dtype;
  const void* x; int64_t ldx;
  const void* w; int64_t ldw;
  const void* bias;
  void* y; int64_t ldy;
  int64_t M, N, K;
  const float* h_part; int ksplit; int64_t r;
  const void* b; int64_t b_task_stride; int64_t ldb;
  const int64_t* task_ids;  // [M] or null
  const float* scales;      // [T] or null
  float scale;
  bool accumulate;
  bool use_mma;
  // Launch with Programmatic Dependent Launch after launch_shrink on the same stream (sm_90+):
  // W streams while the shrink runs; h is awaited before the epilogue.
  bool pdl;
  // K split across blocks (fused_parts): partials in `part`, joined in part order by the last block
  // of each tile (an int ticket). kparts <= 1: no split (part and tickets unused).
  int kparts; int64_t k_per_part;
  float* part;   // [kparts, M, N] fp32
  bool wide;     // fused_wide(M, N, use_mma, SMs)
  int* tickets;  // [cdiv(N, 16) * token tiles], zeroed by the preceding shrink launch
};

// Elements per global load of x and W (A) on the tensor-core path: the widest V in {8, 2, 1}
// (16-, 4-, 2-byte loads) with K, both row strides and the task stride multiples of V and both
// base pointers 2V-byte aligned; 0 for fp32 (no tensor-core path). The launchers pick it from the
// pointers they are given when use_mma is set; every fp16/bf16 input has a width (1 at worst).
int mma_load_width(DType dtype, const void* p0, int64_t ld0, const void* p1, int64_t ld1, int64_t task_stride,
                   int64_t K);
// True when the 16-byte loads may run: mma_load_width(...) == 8.
bool can_use_mma(DType dtype, const void* p0, int64_t ld0, const void* p1, int64_t ld1, int64_t task_stride, int64_t K);

// Rows up to which the forward runs fused (x·Wᵀ in the kernel, W read once): 64 on the 16-byte
// tensor-core path, 8 on the 8-token paths (vector loads, or fp32 / pre-sm_80 scalar). Above it the
// caller computes x·Wᵀ + b with cuBLAS and launch_fused adds the LoRA term (accumulate, K = 0).
// use_mma: sm_80+ (as the Args' use_mma); x, w, their row strides and K as given to launch_fused.
int64_t fused_max_rows(DType dtype, bool use_mma, const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t K);

cudaError_t launch_shrink(const ShrinkArgs& args, cudaStream_t stream);
cudaError_t launch_fused(const FusedArgs& args, cudaStream_t stream);

}  // namespace lora_kernels
