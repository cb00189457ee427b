// Fused LoRA forward kernels for decode-sized batches (M <= 64 rows), single-task and mixed-task.
//
//   y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ            (single task)
//   y[m] = x[m]·Wᵀ + b + s_t·(x[m]·A_tᵀ)·B_tᵀ,  t = task_ids[m], t < 0: base only   (mixed)
//
// Why this shape of kernel. At decode an H200 reads W (4096x4096 bf16 = 32 MiB) in ~7 us at
// 4.8 TB/s while the math is 2·M·N·K flops: the op is memory bound, so the only goal is to stream
// W, A and B exactly once at full bandwidth and keep x, h = x·Aᵀ and the partial sums on chip.
// Two launches per op:
//
//  1. shrink_kernel: h_part[s, m, :] = x[m, Ks]·A[t]ᵀ (fp32) for K-split s. h is tiny (M x r), but
//     A is r x K (0.5 MiB at r=64): one block per (16 rows of A, K split, token tile) so that
//     ~2 blocks per SM pull A in parallel; partials go to an fp32 workspace and are summed by the
//     consumer (no atomics, no memset, deterministic). Mixed batches: each token tile holds rows of
//     one task (rows sorted by task, from Routing), so a tile reads only its own A_t: the BGMV
//     shrink for one token per task, the SGMV shrink for longer segments.
//  2. The fused forward, skinny_kernel (up to 16 tokens; N = 1024 up to 64): one block owns 16 output
//     columns and a tile of 8..64 tokens; its 8 warps split K (interleaved 32-element steps, so at
//     any moment the block reads 8 x 64 B contiguous of every W row it owns) and a shared-memory
//     reduction joins them; or wide_kernel (17..64 tokens, see there): 64 columns per block with x
//     staged once per block in shared memory, since re-reading x per 16 columns would pull
//     (1 + M/16)·|W| through L2. Computing h per output block
//     instead would re-read A once per block (256 blocks x 0.5 MiB = 128 MiB of L2 traffic for
//     4096 columns at r=64), far more than one small extra launch (~2-3 us of host time, but
//     back to back on the GPU, and both ops capture in a CUDA graph). The epilogue adds the bias
//     and the expand s·h·B[t][n]ᵀ in fp32 (h never rounds to bf16) and writes y once; bias,
//     scales and the B rows are fetched before the K loop, so after it only h (the shrink's
//     output, behind the PDL wait) is waited for.
//
// Keeping HBM busy. Little's law: 4.3 TB/s x ~700 ns of loaded latency = ~3 MB in flight, ~22 KiB
// per SM on an H200. The K loop is software-pipelined in registers (Stage): the next stage's
// U·(2 + MT) 16-byte loads, all unpredicated, issue before the current stage's MMAs, so at M <= 16
// a thread keeps 12-16 loads (8 of W) in flight, ~62 KiB of W per SM at 2 blocks per SM. Rows past
// N and empty token slots read a valid row (never stored) instead of being predicated; the last
// partial stage runs in a guarded, peeled tail.
//
// Math units. fp16/bf16 use mma.sync.m16n8k16 (tensor cores, sm_80+) with the "swap AB" trick:
// W's 16 columns are the MMA's M side and the (few) tokens its N side, so a warp computes a
// 16 x (8·MT) tile and nothing is padded to 16 tokens. Fragments are loaded straight from global
// memory with 16-byte loads: the dot product over k does not care about the order of k, so thread
// (g, t) gives physical k = 8t..8t+7 of a 32-wide step to the fragment slots of logical k
// {2t, 2t+1, 2t+8, 2t+9} of two MMAs; W and x use the same permutation, so no shared memory or
// ldmatrix is needed. On CUDA cores alone M = 16 would already be compute bound (16·2·N·K flops at
// ~60 TFLOP/s fp32 ≈ 9 us > 7 us of memory time). fp16/bf16 rows that are not 16-byte aligned
// (K % 8 != 0, odd offsets or strides) take the vector path: the same kernel and fragments, each
// thread's 8-element chunk read with 4- or 2-byte loads (mma_load_width: the widest the rows allow),
// the K tail guarded per element group, in 8-token blocks (one tile size: nvcc time). fp32 inputs
// and GPUs before sm_80 take a scalar CUDA-core path (8 tokens per block): correct, slower.
//
// Larger M (prefill) is compute bound; there the host code uses cuBLAS for x·Wᵀ + b and these
// kernels for the shrink and for the expand only (accumulate mode: y += s·h·Bᵀ in place). The
// 8-token paths (vector, scalar) would read W once per 8 rows, so they run fused only up to 8 rows
// and switch to cuBLAS + the LoRA term above (fused_max_rows; the 16-byte path: up to 64 rows).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_kernels.cuh"

// A launch; tests/cuda_emu defines its own to run the kernels on the host. `pdl`: Programmatic
// Dependent Launch (sm_90+): the kernel may start while the previous kernel on the stream (the
// shrink) still runs, and waits for it with griddepcontrol.wait only where it needs its output.
#ifndef LK_LAUNCH
#define LK_LAUNCH(kernel, grid, block, stream, pdl, ...) launch_ex(kernel, grid, block, stream, pdl, __VA_ARGS__)
#define LK_LAUNCH_EX 1
#endif

namespace lora_kernels {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kCols = 16;  // output columns (rows of W or A) per block: the MMA's M side
constexpr int kStep = 32;  // k per warp step (4 threads x 8 elements)
constexpr int kRC = 64;    // rank chunk staged in shared memory by the expand epilogue
// Steps per main-loop iteration by MT (index): U·(2 + MT) 16-byte loads in flight per thread, 2U of
// them W's. More for few tokens, where W dominates; capped by registers (4·U·(2 + MT) for the loads).
constexpr int kUnroll[9] = {0, 4, 2, 0, 1, 0, 0, 0, 1};
// Blocks per SM the register allocation must allow (__launch_bounds__): 2 for the tensor-core
// kernels up to 32 tokens (<= 128 registers, no spills; ptxas would take ~160 otherwise and leave
// one block, 8 warps, per SM); the 64-token kernel and the scalar path need more registers than
// that without spilling (tests/test_cuda_ext.py requires no spills).
constexpr int kMinBlocks(bool mma, int mt) { return mma && mt <= 4 ? 2 : 1; }

template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float f(float v) { return v; }
  static __device__ __forceinline__ float of(float v) { return v; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half of(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 of(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ uint4 ld16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// 8 consecutive 2-byte elements at p (one thread's chunk of a k step) as a uint4, read with loads of
// V elements (V = 8, 2, 1: 16-, 4-, 2-byte loads; p must be 2V-byte aligned). The register layout
// is the 16-byte load's (element i in half i of the uint4, low half first), so the MMA fragment
// permutation is the same for every V. V < 8 is the vector path for rows that are not 16-byte
// aligned (K % 8 != 0, odd offsets or strides): the same tensor-core math with narrower loads.
// No 8-byte variant: rows 8- but not 16-byte aligned take V = 2 (the same sectors, twice the load
// instructions), which saves a third set of kernels' compile time.
template <int V>
__device__ __forceinline__ uint4 ld_chunk(const void* p) {
  static_assert(V == 8 || V == 2 || V == 1, "V: elements per load");
  if constexpr (V == 8) {
    return ld16(p);
  } else if constexpr (V == 2) {
    const unsigned* q = static_cast<const unsigned*>(p);
    return make_uint4(__ldg(q), __ldg(q + 1), __ldg(q + 2), __ldg(q + 3));
  } else {
    const unsigned short* q = static_cast<const unsigned short*>(p);
    unsigned e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = __ldg(q + i);
    return make_uint4(e[0] | e[1] << 16, e[2] | e[3] << 16, e[4] | e[5] << 16, e[6] | e[7] << 16);
  }
}

// A plain (coherent) global load, for data that another grid may still be writing while this one
// runs: h, the shrink's output, under programmatic dependent launch (__ldg's non-coherent path is
// only for data that is read-only for the kernel's whole life). tests/cuda_emu checks its bounds
// and alignment like every __ldg.
template <typename T>
__device__ __forceinline__ T ld(const T* p) {
#ifdef LK_CHECKED
  return *LK_CHECKED(p);
#else
  return *p;
#endif
}

// A load cached in L2 only (ld.global.cg): for data that other blocks of the same grid wrote (the K
// parts' partials), which this SM's L1, not coherent across SMs, must not serve.
__device__ __forceinline__ float ld_cg(const float* p) {
#ifdef LK_CHECKED
  return *LK_CHECKED(p);
#else
  return __ldcg(p);
#endif
}

// d += a·b for one m16n8k16 tile, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(LK_EMULATE_MMA)  // tests/cuda_emu: the kernels run on the host, MMA emulated per PTX layout
  LK_EMULATE_MMA(d, a0, a1, a2, a3, b0, b1, __half);
#else
  __trap();  // the host never picks the MMA path below sm_80
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(LK_EMULATE_MMA)
  LK_EMULATE_MMA(d, a0, a1, a2, a3, b0, b1, __nv_bfloat16);
#else
  __trap();
#endif
}

// cp.async (sm_80+): a 16-byte global -> shared copy that does not pass through registers; with
// `ok` false it fills zeros and reads nothing (src-size 0). Copies complete in commit groups:
// cp_async_wait<N>() returns when all but the newest N groups have landed (for this thread; a
// __syncthreads after it publishes them to the block). tests/cuda_emu models the late landing.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(ok ? 16 : 0) : "memory");
#elif defined(LK_EMULATE_CP_ASYNC)
  LK_EMULATE_CP_ASYNC(smem, gmem, ok);
#else
  __trap();  // the host never picks the wide kernel below sm_80
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(LK_EMULATE_CP_ASYNC)
  LK_EMULATE_CP_COMMIT();
#endif
}
// A 16-byte read of a staged shared-memory buffer (tests/cuda_emu checks it for races with cp.async).
template <typename T>
__device__ __forceinline__ uint4 lds16(const T* p) {
#ifdef LK_SMEM_READ
  return *reinterpret_cast<const uint4*>(LK_SMEM_READ(p));
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(LK_EMULATE_CP_ASYNC)
  LK_EMULATE_CP_WAIT(N);
#endif
}

// Programmatic Dependent Launch. The shrink lets the fused kernel launch at once, so the fused
// kernel streams W (the ~7 us bulk at 4096x4096) while the shrink (~2 us, latency bound: A is
// only 0.1-0.5 MiB) runs; the fused kernel waits for the shrink's h right before its epilogue.
// Both instructions are no-ops when the launch carries no programmatic dependency.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#elif defined(LK_EMULATE_PDL_WAIT)  // tests/cuda_emu: models the wait (and its absence below sm_90)
  LK_EMULATE_PDL_WAIT();
#endif
}

// One 32-wide k step of a warp: the 16 columns of (wa, wb) against the 8·MT tokens of xv.
// Thread (g, t4) holds physical k = 8·t4 .. 8·t4+7 of W rows g (wa) and g+8 (wb) and of token rows
// g (+8j); they fill the fragment slots of logical k {2t4, 2t4+1, 2t4+8, 2t4+9} of two MMAs, the
// same permutation for W and x, so the dot product over k is unchanged.
template <typename T, int MT>
__device__ __forceinline__ void mma_step(float (&acc)[MT][4], const uint4& wa, const uint4& wb, const uint4 (&xv)[MT]) {
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    mma16816<T>(acc[j], wa.x, wb.x, wa.y, wb.y, xv[j].x, xv[j].y);
    mma16816<T>(acc[j], wa.z, wb.z, wa.w, wb.w, xv[j].z, xv[j].w);
  }
}

// The same chunk in the K tail of the vector path: only the elements before kend are loaded, the
// others are zero (k: the chunk's first element). K % V == 0 (mma_load_width), so a group of V
// elements is wholly in or out of the row: the guard is per group, i.e. per element for V = 1.
template <int V, typename T>
__device__ __forceinline__ uint4 ld_chunk_tail(const T* row, int64_t k, int64_t kend) {
  static_assert(V == 2 || V == 1, "the 16-byte path guards whole chunks");
  unsigned e[8];  // 32-bit words (V = 2: e[0..3]) or 16-bit elements (V = 1)
  if constexpr (V == 2) {
    const unsigned* q = reinterpret_cast<const unsigned*>(row + k);
#pragma unroll
    for (int g = 0; g < 4; ++g) e[g] = k + 2 * g < kend ? __ldg(q + g) : 0u;  // per-group tail guard
    return make_uint4(e[0], e[1], e[2], e[3]);
  } else {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(row + k);
#pragma unroll
    for (int g = 0; g < 8; ++g) e[g] = k + g < kend ? __ldg(q + g) : 0u;  // per-element tail guard
    return make_uint4(e[0] | e[1] << 16, e[2] | e[3] << 16, e[4] | e[5] << 16, e[6] | e[7] << 16);
  }
}

// U k-steps of a warp's W rows (g, g+8) and token rows, as 16-byte registers: one stage of the
// software pipeline of the fused / shrink main loop. k0: this thread's first element; step u is at
// k0 + u·kWarps·kStep. No predicates: the caller only loads whole stages. V: elements per load.
template <typename T, int MT, int U, int V>
struct Stage {
  uint4 wa[U], wb[U], xv[U][MT];
  __device__ __forceinline__ void load(const T* w0, const T* w1, const T* const* xr, int64_t k0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * kWarps * kStep;
      wa[u] = ld_chunk<V>(w0 + k);
      wb[u] = ld_chunk<V>(w1 + k);
#pragma unroll
      for (int j = 0; j < MT; ++j) xv[u][j] = ld_chunk<V>(xr[j] + k);
    }
  }
  __device__ __forceinline__ void multiply(float (&acc)[MT][4]) const {
#pragma unroll
    for (int u = 0; u < U; ++u) mma_step<T, MT>(acc, wa[u], wb[u], xv[u]);
  }
};

// Prefetch the 128-byte line holding p into L2 (a hint: no fault, no result). tests/cuda_emu checks
// the address like a load, since a prefetch of a wrong address is a wrong address all the same.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#elif defined(LK_CHECKED)
  (void)LK_CHECKED(static_cast<const char*>(p));
#endif
}

// A PDL launch is safe only if the code that runs has the wait compiled in, i.e. was compiled
// for sm_90+. That is a property of the binary the driver picked for this device, not of the
// device: an sm_80 cubin (or compute_80 PTX JIT-compiled) on an H100 has no griddepcontrol.wait
// and would read h before the shrink wrote it. cudaFuncGetAttributes reports the binary's
// architecture and the PTX it came from; the answer is cached per device (one query per device).
template <typename Kernel>
bool binary_has_pdl_wait(Kernel kernel) {
  static signed char known[64] = {};  // 0 unknown, 1 yes, -1 no; per device ordinal
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < 64 && known[dev] != 0) return known[dev] > 0;
  cudaFuncAttributes fa{};
  const bool ok = cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.binaryVersion >= 90 && fa.ptxVersion >= 90;
  if (dev >= 0 && dev < 64) known[dev] = ok ? 1 : -1;
  return ok;
}

#ifdef LK_LAUNCH_EX
template <typename Kernel, typename Arg>
cudaError_t launch_ex(Kernel kernel, dim3 grid, int block, cudaStream_t stream, bool pdl, const Arg& arg) {
  if (!pdl) {
    kernel<<<grid, block, 0, stream>>>(arg);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, arg);
}
#endif

// Everything a launch needs; one struct for both kernels (unused fields are ignored).
struct Params {
  const void* x; int64_t ldx;
  const void* w; int64_t ldw; int64_t w_task_stride;  // W (fused) or A (shrink: rows = r)
  int64_t M, N, K;                                     // N = r for the shrink
  const int64_t* order; const int32_t* tiles; int tile_tokens; int subs;  // token tiling
  int64_t z_offset;
  int64_t k_per_split;                                 // K per blockIdx.y (shrink splits, fused parts)
  float* h_out;                                        // shrink output [ksplit, M, r]
  int* tickets; int64_t num_tickets;                   // fused K parts' tickets (zeroed by the shrink)
  int kparts; float* part;                             // fused K parts and their partials [kparts, M, N]
  const void* bias; void* y; int64_t ldy;
  const float* h_part; int ksplit; int64_t r;
  const void* b; int64_t b_task_stride; int64_t ldb;
  const int64_t* task_ids; const float* scales; float scale; bool accumulate;
  bool pdl;
};

// The fused kernels' epilogue. After the K loop a block holds out = x·Wᵀ (fp32) for its TM tokens and
// COLS columns; thread tid owns column n = n0 + tid % COLS and tokens tok0 + kTokStride·q (q < Q).
// finish() joins the K parts (K split across blocks), adds the bias and the expand s·h·B[t]ᵀ
// (fp32: h never rounds to the input dtype) and writes y once. prefetch() runs before the K loop:
// epilogue operands no other grid writes (bias, scales, the B rows) are fetched then, so they
// arrive while W streams and after the loop only h waits on the PDL dependency (B is prefetched
// into L2, so the expand reads it from there rather than from cold HBM).
template <typename T, int TM, int COLS>
struct FusedEpilogue {
  static constexpr int kTokStride = kThreads / COLS;
  static constexpr int Q = (TM + kTokStride - 1) / kTokStride;
  int c, tok0;
  int64_t n;
  float bias_v = 0.f;

  // Before the K loop: fills scale_s (shared [TM]: each token's scale, 0 for rows without a task;
  // read by finish() after a barrier) and prefetches this thread's bias element and B rows into L2.
  // Nothing is held in registers across the loop (the wide kernel has none to spare).
  static __device__ __forceinline__ void prefetch(const Params& p, int tid, int64_t n0, const int64_t* rows_s,
                                                  const int* task_s, float* scale_s) {
    if (tid < TM) {
      const int t = task_s[tid];
      scale_s[tid] = rows_s[tid] < 0 || t < 0 ? 0.f : p.scales != nullptr ? __ldg(p.scales + t) : p.scale;
    }
    const int64_t n = n0 + tid % COLS;
    if (n >= p.N) return;
    if (p.bias != nullptr) prefetch_l2(static_cast<const T*>(p.bias) + n);
    int prev = -1;  // the last task whose B row was prefetched (a thread's tokens mostly share one)
#pragma unroll 1
    for (int q = 0; q < Q; ++q) {
      const int tok = tid / COLS + kTokStride * q;
      if (tok >= TM || rows_s[tok] < 0 || task_s[tok] < 0 || task_s[tok] == prev) continue;
      const int t = prev = task_s[tok];
      const char* brow = reinterpret_cast<const char*>(static_cast<const T*>(p.b) + t * p.b_task_stride + n * p.ldb);
      for (int64_t off = 0; off < p.r * static_cast<int64_t>(sizeof(T)); off += 128) prefetch_l2(brow + off);
    }
  }

  // After the K loop: this thread's column and bias (an L2 hit by now).
  __device__ __forceinline__ FusedEpilogue(const Params& p, int tid, int64_t n0)
      : c(tid % COLS), tok0(tid / COLS), n(n0 + tid % COLS) {
    const T* bias = static_cast<const T*>(p.bias);
    if (bias != nullptr && n < p.N) bias_v = Num<T>::f(__ldg(bias + n));
  }

  // o: shared [TM][COLS], x·Wᵀ over this block's K range; thread tid reads and writes only its own
  // elements (tok0 + kTokStride·q, c), so no barrier guards o. In shared memory rather than Q
  // registers: a loop over q can then stay rolled (Q = 16 in wide_kernel: unrolled, the expand alone
  // took ~15k instructions and spilled). hs: TM·(kRC + 1) floats, disjoint from o and no longer read
  // by any thread, for the h chunks.
  __device__ __forceinline__ void finish(const Params& p, float* o, float* hs, int split, int64_t z,
                                         const int64_t* rows_s, const int* task_s, const float* scale_s, int tid) {
    if (p.kparts > 1) {
      // K split across blocks (small grids, e.g. N = 1024: 64 column blocks for 132 SMs). Each part
      // stores its fp32 partial; the last part of this tile to finish (an integer ticket: no float
      // atomics) sums all parts in part order, so the result does not depend on which block came
      // last, and runs the epilogue. The tickets were zeroed by the shrink: wait for it first.
#pragma unroll 4
      for (int q = 0; q < Q; ++q) {
        const int tok = tok0 + kTokStride * q;
        if (tok < TM && rows_s[tok] >= 0 && n < p.N)
          p.part[(static_cast<int64_t>(split) * p.M + rows_s[tok]) * p.N + n] = o[tok * COLS + c];
      }
      pdl_wait();  // the tickets are zeroed by the shrink
      __threadfence();  // this block's partials are visible before its ticket is
      __shared__ int last_s;
      __syncthreads();
      if (tid == 0) last_s = atomicAdd(p.tickets + blockIdx.x + static_cast<int64_t>(gridDim.x) * z, 1) == p.kparts - 1;
      __syncthreads();
      if (!last_s) return;
      __threadfence();  // the other parts' partials, made visible by their fences, are read after the ticket
      if constexpr (COLS == kCols) {
        // skinny_kernel: a partial tile is 16 columns (<= 4 KiB): read every part back, in part order.
#pragma unroll 4
        for (int q = 0; q < Q; ++q) {
          const int tok = tok0 + kTokStride * q;
          float v = 0.f;
          if (tok < TM && rows_s[tok] >= 0 && n < p.N)
            for (int s = 0; s < p.kparts; ++s) v += ld_cg(p.part + (static_cast<int64_t>(s) * p.M + rows_s[tok]) * p.N + n);
          if (tok < TM) o[tok * COLS + c] = v;
        }
      } else {
        // wide_kernel: a partial tile is up to 16 KiB and the join is serial after the W stream. This
        // block's own part is still in o, so only the other kparts - 1 are read back; parts outer and
        // this thread's Q outputs inner, so the Q loads of a part are in flight together (kparts - 1
        // round trips to L2, not Q·(kparts - 1)). The sum runs in part order whichever block is last:
        // deterministic.
        static_assert(TM % kTokStride == 0, "every q is a token of the tile (no tok < TM guards)");
        float v[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) v[q] = 0.f;
        const float* part = p.part + n;
        for (int s = 0; s < p.kparts; ++s, part += p.M * p.N) {
#pragma unroll
          for (int q = 0; q < Q; ++q) {
            const int tok = tok0 + kTokStride * q;
            if (rows_s[tok] < 0 || n >= p.N) continue;
            v[q] += s == split ? o[tok * COLS + c] : ld_cg(part + rows_s[tok] * p.N);  // own part from shared memory
          }
        }
#pragma unroll
        for (int q = 0; q < Q; ++q) o[(tok0 + kTokStride * q) * COLS + c] = v[q];
      }
    }
    // Expand: o += s(t) · sum_j h[row, j] · B[t][n, j], h staged in kRC-wide chunks (fp32).
    bool mine = false;  // does this block have a row with a task?
    if (tid < TM) mine = rows_s[tid] >= 0 && task_s[tid] >= 0;
    pdl_wait();  // h_part is the shrink's output (and y, in accumulate mode, is read below)
    const bool any_task = __syncthreads_or(mine);
    if (any_task) {
      const T* B = static_cast<const T*>(p.b);
      constexpr int VEC = 16 / sizeof(T);
      const bool vec = (reinterpret_cast<uintptr_t>(B) % 16 == 0) && (p.ldb % VEC == 0) && (p.b_task_stride % VEC == 0);
      for (int64_t j0 = 0; j0 < p.r; j0 += kRC) {
        const int jn = static_cast<int>(min(static_cast<int64_t>(kRC), p.r - j0));
        __syncthreads();  // previous chunk (or what the kernel kept there) no longer read
        for (int e = tid; e < TM * kRC; e += kThreads) {
          const int i = e / kRC, jj = e % kRC;
          const int64_t row = rows_s[i];
          float v = 0.f;
          if (row >= 0 && task_s[i] >= 0 && jj < jn) {
            for (int s = 0; s < p.ksplit; ++s) v += ld(p.h_part + (static_cast<int64_t>(s) * p.M + row) * p.r + j0 + jj);
          }
          hs[i * (kRC + 1) + jj] = v;
        }
        __syncthreads();
#pragma unroll 2
        for (int q = 0; q < Q; ++q) {
          const int tok = tok0 + kTokStride * q;
          if (tok >= TM || rows_s[tok] < 0 || task_s[tok] < 0 || n >= p.N) continue;
          const T* brow = B + task_s[tok] * p.b_task_stride + n * p.ldb + j0;
          const float* hrow = hs + tok * (kRC + 1);
          float a = 0.f;
          int jj = 0;
          if (vec) {
            for (; jj + VEC <= jn; jj += VEC) {
              const uint4 raw = ld16(brow + jj);
              const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
              for (int v = 0; v < VEC; ++v) a = fmaf(hrow[jj + v], Num<T>::f(e[v]), a);
            }
          }
          for (; jj < jn; ++jj) a = fmaf(hrow[jj], Num<T>::f(__ldg(brow + jj)), a);
          o[tok * COLS + c] = fmaf(scale_s[tok], a, o[tok * COLS + c]);
        }
      }
    }
    T* y = static_cast<T*>(p.y);
#pragma unroll 4
    for (int q = 0; q < Q; ++q) {
      const int tok = tok0 + kTokStride * q;
      if (tok >= TM || n >= p.N) continue;
      const int64_t row = rows_s[tok];
      if (row < 0) continue;
      const int t = task_s[tok];
      T* yp = y + row * p.ldy + n;
      const float v = o[tok * COLS + c];
      if (p.accumulate) {  // o is the LoRA term alone (K = 0)
        if (t >= 0) *yp = Num<T>::of(Num<T>::f(*yp) + v);  // t < 0: untouched, bit-exact base
      } else {
        *yp = Num<T>::of(v + bias_v);  // t < 0: x·Wᵀ + b only, no LoRA term (not + 0·garbage)
      }
    }
  }
};

// The scalar path runs fp32 everywhere but fp16/bf16 only below sm_80: on sm_80+ the host gives every
// fp16/bf16 input the tensor-core path (mma_load_width >= 1), so those bodies are not compiled there
// (nvcc time: CI builds csrc/ several times).
template <typename T>
constexpr bool kScalarCompiled =
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    sizeof(T) == 4;
#else
    true;
#endif

// The body shared by the shrink (SHRINK) and the fused forward. TM = 8·MT tokens per block.
// V: elements per global load of x and W (A) on the tensor-core path (8: 16-byte loads; 2, 1:
// the vector path for rows that are not 16-byte aligned, see mma_load_width); 8 on the scalar path.
template <typename T, int MT, bool MMA, bool SHRINK, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks(MMA, MT)) skinny_kernel(const Params p) {
  constexpr int TM = 8 * MT;
  using Epi = FusedEpilogue<T, TM, kCols>;
  constexpr int Q = Epi::Q;  // outputs per thread after the reduction
  // Warp partials [warp][token][col]; reused by the epilogue for h chunks [TM][kRC + 1].
  __shared__ __align__(16) float smem[kWarps * TM * kCols];
  static_assert(TM * (kRC + 1) <= kWarps * TM * kCols, "h chunk must fit in the reduction buffer");
  __shared__ int64_t rows_s[TM];
  __shared__ int task_s[TM];
  __shared__ float scale_s[TM];
  __shared__ float o_s[SHRINK ? 1 : TM * kCols];  // the fused epilogue's output tile

  if (SHRINK) pdl_launch_dependents();  // let the fused kernel start streaming W now
  // The shrink zeroes the fused kernel's K-part tickets: the fused kernel touches them only after its
  // PDL wait, i.e. after this grid has finished, so no separate memset launch is needed.
  if (SHRINK && p.tickets != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && p.z_offset == 0)
    for (int64_t i = threadIdx.x; i < p.num_tickets; i += kThreads) p.tickets[i] = 0;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kCols;
  const int split = blockIdx.y;
  const int64_t z = blockIdx.z + p.z_offset;

  // Rows of this block: a slice [sub·TM, sub·TM + TM) of token tile `tile`.
  if (tid < TM) {
    int64_t row = -1;
    int task = 0;
    if (p.tiles != nullptr) {
      const int64_t tile = z / p.subs;
      const int64_t i = (z % p.subs) * TM + tid;
      const int32_t* tl = p.tiles + 3 * tile;
      task = __ldg(tl);
      if (i < __ldg(tl + 2)) row = __ldg(p.order + __ldg(tl + 1) + i);
    } else {
      const int64_t m = z * TM + tid;
      if (m < p.M) row = m;
    }
    if (!SHRINK && row >= 0 && p.task_ids != nullptr) task = static_cast<int>(__ldg(p.task_ids + row));
    rows_s[tid] = row;
    task_s[tid] = task;
  }
  __syncthreads();

  // After the reduction, thread tid owns column c of the block and tokens tok0 + 16q (as the epilogue).
  const int c = tid & (kCols - 1);
  const int tok0 = tid >> 4;
  const int64_t n = n0 + c;
  if (!SHRINK) Epi::prefetch(p, tid, n0, rows_s, task_s, scale_s);

  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  if (SHRINK) w += static_cast<int64_t>(task_s[0]) * p.w_task_stride;  // one task per tile
  const int64_t kbeg = split * p.k_per_split;
  const int64_t kend = min(p.K, kbeg + p.k_per_split);
  float* red = smem + warp * TM * kCols;

  if constexpr (MMA) {
    const int g = lane >> 2, t4 = lane & 3;
    // Rows past N (last column block) read row N-1 and empty token slots read row 0 of x instead:
    // their results are never stored, and every load of the main loop is then unpredicated.
    const T* w0 = w + min(n0 + g, p.N - 1) * p.ldw;
    const T* w1 = w + min(n0 + g + 8, p.N - 1) * p.ldw;
    const T* xr[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int64_t row = rows_s[8 * j + g];
      xr[j] = x + (row >= 0 ? row : 0) * p.ldx;
    }
    float acc[MT][4];
#pragma unroll
    for (int j = 0; j < MT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    // Main loop, software-pipelined in registers: the U whole steps of the next iteration are
    // loaded (no predicate on any load) before the MMAs of the current one, so all U·(2 + MT)
    // 16-byte loads of a stage are in flight while the previous stage is multiplied; a load is only
    // waited for one iteration after it was issued. (Loading and multiplying the same stage lets
    // ptxas interleave loads with the MMAs that consume them: ~4 in flight, measured in the SASS.)
    // tests/test_cuda_ext.py counts the loads in flight in the SASS; lora_kernels/plan/cuda.py uses it.
    // With 2-byte loads (V = 1) every element in flight holds a 32-bit register of its own: half the
    // steps per stage, so the registers in flight stay those of the 16-byte path (no spills).
    constexpr int U = V == 1 && kUnroll[MT] > 1 ? kUnroll[MT] / 2 : kUnroll[MT];
    constexpr int64_t kWarpStride = kWarps * kStep;
    constexpr int64_t kStage = U * kWarpStride;
    int64_t kb = kbeg + warp * kStep;
    const int64_t kfull = kend - ((U - 1) * kWarpStride + kStep);  // a stage at kb is whole iff kb <= kfull
    if (kb <= kfull) {  // warp-uniform
      Stage<T, MT, U, V> cur;
      cur.load(w0, w1, xr, kb + t4 * 8);
      for (kb += kStage; kb <= kfull; kb += kStage) {
        Stage<T, MT, U, V> next;
        next.load(w0, w1, xr, kb + t4 * 8);
        cur.multiply(acc);
        cur = next;
      }
      cur.multiply(acc);  // the last whole stage
    }
    // Peeled tail: this warp's last (fewer than U) steps one at a time, guarded: elements at or past
    // kend read as zero and are never loaded. V = 8: K % 8 == 0, so a thread's chunk is wholly in or
    // out; the vector path guards each group of V elements (K % 8 != 0 never reads the next row).
    for (; kb < kend; kb += kWarpStride) {  // warp-uniform
      const int64_t k = kb + t4 * 8;
      uint4 xv[MT];
      if constexpr (V == 8) {
        const bool ok = k < kend;  // the tail guard
        const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < MT; ++j) xv[j] = ok ? ld16(xr[j] + k) : zero;
        mma_step<T, MT>(acc, ok ? ld16(w0 + k) : zero, ok ? ld16(w1 + k) : zero, xv);
      } else {
#pragma unroll
        for (int j = 0; j < MT; ++j) xv[j] = ld_chunk_tail<V>(xr[j], k, kend);
        mma_step<T, MT>(acc, ld_chunk_tail<V>(w0, k, kend), ld_chunk_tail<V>(w1, k, kend), xv);
      }
    }
    // C fragment: c0,c1 = (col g, tokens 2t4, 2t4+1), c2,c3 = (col g+8, same tokens).
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const int tok = 8 * j + 2 * t4;
      red[tok * kCols + g] = acc[j][0];
      red[(tok + 1) * kCols + g] = acc[j][1];
      red[tok * kCols + g + 8] = acc[j][2];
      red[(tok + 1) * kCols + g + 8] = acc[j][3];
    }
  } else if constexpr (kScalarCompiled<T>) {
    static_assert(MT == 1 || MMA, "the scalar path handles 8 tokens per block");
    // Lane l takes k = kb + l: a warp reads 32 consecutive elements of each of the 16 rows.
    float acc[kCols][8];
#pragma unroll
    for (int c = 0; c < kCols; ++c)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[c][i] = 0.f;
    for (int64_t kb = kbeg + warp * kStep; kb < kend; kb += kWarps * kStep) {
      const int64_t k = kb + lane;
      if (k < kend) {
        float xv[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t row = rows_s[i];
          xv[i] = row >= 0 ? Num<T>::f(__ldg(x + row * p.ldx + k)) : 0.f;
        }
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const float wv = (n0 + c < p.N) ? Num<T>::f(__ldg(w + (n0 + c) * p.ldw + k)) : 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[c][i] = fmaf(wv, xv[i], acc[c][i]);
        }
      }
    }
    // Sum the 128 per-lane partials over the 32 lanes: 4 rounds of a 32x32 transpose through
    // shared memory (row stride 33: conflict-free both ways), 64 shared accesses per lane
    // instead of 640 shuffles.
    __shared__ float scratch[kWarps][32][33];
    float* sc = &scratch[warp][0][0];
#pragma unroll
    for (int round = 0; round < kCols * 8 / 32; ++round) {
#pragma unroll
      for (int j = 0; j < 32; ++j) sc[lane * 33 + j] = acc[(round * 32 + j) / 8][(round * 32 + j) % 8];
      __syncwarp();
      float v = 0.f;
#pragma unroll 8
      for (int l = 0; l < 32; ++l) v += sc[l * 33 + lane];
      const int o = round * 32 + lane;  // o = c * 8 + i
      red[(o % 8) * kCols + o / 8] = v;
      __syncwarp();
    }
  } else {
    __trap();  // fp16/bf16 scalar path in an sm_80+ binary: the host gives those the tensor cores
  }
  __syncthreads();

  // Join the warps (fixed order: deterministic).
  float out[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int tok = tok0 + 16 * q;
    float v = 0.f;
    if (tok < TM) {
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) v += smem[(wi * TM + tok) * kCols + c];
    }
    out[q] = v;
    if (!SHRINK && tok < TM) o_s[tok * kCols + c] = v;  // the epilogue's tile (each element: its owner only)
  }

  if constexpr (SHRINK) {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int tok = tok0 + 16 * q;
      if (tok < TM && rows_s[tok] >= 0 && n < p.N)
        p.h_out[(static_cast<int64_t>(split) * p.M + rows_s[tok]) * p.N + n] = out[q];
    }
    return;
  } else {
    Epi(p, tid, n0).finish(p, o_s, smem, split, z, rows_s, task_s, scale_s, tid);
  }
}

// ---- wide_kernel: the fused forward for 17..64 tokens (MT = 4, 8; tensor cores, 16-byte aligned rows).
// Why a second kernel: skinny_kernel gives a block 16 columns and every block reads the tile's x rows,
// so L2 -> SM traffic is (1 + M/16)·|W|: 3|W| at M = 32, 5|W| at M = 64, more than L2 serves in the
// time HBM streams W once (~2.5x HBM bandwidth). Here a block owns kWideCols = 64 columns (4 column
// warps x 16) and stages the tile's x in shared memory once for all of them, chunk by chunk through a
// double buffer that cp.async fills (x never passes through registers): (1 + M/64)·|W| plus the K
// parts' partials, which fused_parts keeps small. The 8 warps are 4 column warps x 2 K halves: warps
// w and w + 4 take alternate 32-wide k steps of the same columns and are joined through shared
// memory after the loop (fixed order). W streams as in skinny_kernel, straight from global memory
// into MMA fragments with 16-byte loads: the S = 2 steps x 2 rows of the next chunk are issued before
// the current chunk's MMAs, so a thread keeps 4 loads of W in flight (31 KiB per SM at 2 blocks per
// SM, against ~22 KiB that an H200's bandwidth-latency product needs).
constexpr int kWideCols = 64;
constexpr int kWideColWarps = kWideCols / kCols;  // 4
// k per staged x chunk: two buffers of TM x (chunk + kXPad) elements stay under the 48 KiB of static
// shared memory (20 KiB at MT = 4, 40 KiB at MT = 8). A warp takes S = 2 steps of each chunk, so it
// keeps 4 loads of W in flight: a 256-wide chunk (8 in flight) needs ~32 more registers than the
// 128 that 2 blocks per SM allow.
constexpr int kWideChunk = 128;
// Padding of each staged x row: rows 16 banks apart, so the 8 lanes of a quarter warp (rows g, g+1,
// 16 bytes each at 4 k offsets) read 32 distinct banks.
constexpr int kXPad = 32;

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 2) wide_kernel(const Params p) {
  constexpr int TM = 8 * MT;
  constexpr int KC = kWideChunk;
  constexpr int LDS = KC + kXPad;       // row stride of a staged x chunk, elements
  constexpr int S = KC / (2 * kStep);   // k steps per warp per chunk
  constexpr int kPieces = TM * KC / 8;  // 16-byte pieces per x chunk
  constexpr int kXBytes = static_cast<int>(2 * TM * LDS * sizeof(T));
  using Epi = FusedEpilogue<T, TM, kWideCols>;
  static_assert(kPieces % kThreads == 0, "every thread copies the same number of x pieces");
  static_assert(2 * TM * kWideCols * sizeof(float) <= kXBytes, "the K-half join must fit in the x buffers");
  static_assert(TM * (kWideCols + kRC + 1) * sizeof(float) <= kXBytes, "the output tile and an h chunk must fit");
  // The x double buffer [2][TM][LDS]; after the K loop the same bytes hold the K-half join
  // [2][TM][kWideCols] (fp32), then the epilogue's output tile [TM][kWideCols] and its h chunks.
  __shared__ __align__(16) unsigned char smem_raw[kXBytes];
  __shared__ int64_t rows_s[TM];
  __shared__ int task_s[TM];
  __shared__ float scale_s[TM];
  T* xs = reinterpret_cast<T*>(smem_raw);
  float* fs = reinterpret_cast<float*>(smem_raw);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int wn = warp % kWideColWarps, wk = warp / kWideColWarps;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kWideCols;
  const int split = blockIdx.y;
  const int64_t z = blockIdx.z + p.z_offset;
  if (tid < TM) {
    const int64_t m = z * TM + tid;
    const int64_t row = m < p.M ? m : -1;
    rows_s[tid] = row;
    task_s[tid] = row >= 0 && p.task_ids != nullptr ? static_cast<int>(__ldg(p.task_ids + row)) : 0;
  }
  __syncthreads();
  Epi::prefetch(p, tid, n0, rows_s, task_s, scale_s);

  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  // k is 32-bit here (the host launches this kernel only for K < 2^31): registers are tight.
  const int kbeg = static_cast<int>(split * p.k_per_split);
  const int kend = static_cast<int>(min(p.K, split * p.k_per_split + p.k_per_split));
  const int span = kend > kbeg ? kend - kbeg : 0;
  const int full = span / KC;                  // whole chunks: unpredicated W loads
  const int chunks = full + (span % KC != 0);  // + the last, partial one
  // Rows past N (last column block) read row N-1: never stored, and the W loads stay unpredicated.
  const int64_t col = n0 + wn * kCols;
  const T* w0 = w + min(col + g, p.N - 1) * p.ldw;
  const T* w1 = w + min(col + g + 8, p.N - 1) * p.ldw;

  // x chunk c into buffer c & 1, one commit group per chunk. Thread tid copies the 16-byte pieces at
  // k offset xk of rows xr0 + kRowStep·i (the tile's rows are z·TM + i, contiguous, so one pointer
  // and a stride address them all: a pointer per piece would stay live across the K loop). Rows past
  // M and k past kend are zero-filled, never read, so the MMAs need no guard.
  constexpr int kPiecesPerRow = KC / 8;
  constexpr int kRowStep = kThreads / kPiecesPerRow;
  const int xr0 = tid / kPiecesPerRow, xk = (tid % kPiecesPerRow) * 8;
  const int rows = static_cast<int>(min(static_cast<int64_t>(TM), p.M - z * TM));  // valid rows of the tile
  const T* xsrc = x + (z * TM + min(xr0, rows - 1)) * p.ldx + kbeg + xk;
  auto stage_x = [&](int c) {
    T* buf = xs + (c & 1) * TM * LDS + xr0 * LDS + xk;
    const bool k_ok = kbeg + c * KC + xk < kend;
#pragma unroll
    for (int i = 0; i < kPieces / kThreads; ++i) {
      const bool ok = k_ok && xr0 + kRowStep * i < rows;
      cp_async16(buf + kRowStep * i * LDS, ok ? xsrc + kRowStep * i * p.ldx + c * KC : x, ok);
    }
  };
  // W of this warp for one chunk: steps s = wk, wk + 2, ... of the chunk, rows g and g + 8, as MMA
  // fragments.
  struct WChunk { uint4 a[S], b[S]; };
  const int k0 = kbeg + wk * kStep + t4 * 8;  // this thread's first k
  auto load_w = [&](WChunk& wc, int c) {  // a whole chunk: no predicate
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int k = k0 + c * KC + s * 2 * kStep;
      wc.a[s] = ld16(w0 + k);
      wc.b[s] = ld16(w1 + k);
    }
  };
  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  auto multiply = [&](const WChunk& wc, int c) {
    const T* buf = xs + (c & 1) * TM * LDS;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int kk = (wk + 2 * s) * kStep + t4 * 8;
#pragma unroll
      for (int j = 0; j < MT; ++j) {  // x of tokens 8j + g from shared memory, right before its two MMAs
        const uint4 xv = lds16(buf + (8 * j + g) * LDS + kk);
        mma16816<T>(acc[j], wc.a[s].x, wc.b[s].x, wc.a[s].y, wc.b[s].y, xv.x, xv.y);
        mma16816<T>(acc[j], wc.a[s].z, wc.b[s].z, wc.a[s].w, wc.b[s].w, xv.z, xv.w);
      }
    }
  };

  if (chunks > 0) {  // block-uniform
    stage_x(0);
    cp_async_commit();
    WChunk now;
    if (full > 0) load_w(now, 0);
    // Main loop over whole chunks: chunk c + 1's x copies and W loads are issued before chunk c is
    // multiplied, so they are in flight during its MMAs (the W loads of the next chunk only if it is
    // whole: the partial one is loaded, guarded, in the peeled tail).
    for (int c = 0; c < full; ++c) {
      if (c + 1 < chunks) stage_x(c + 1);
      cp_async_commit();  // possibly empty: keeps "all but the newest group" = chunk c
      WChunk ahead;
      if (c + 1 < full) load_w(ahead, c + 1);
      cp_async_wait<1>();
      __syncthreads();  // every thread's copies of chunk c have landed
      multiply(now, c);
      __syncthreads();  // chunk c's buffer is read by all before chunk c + 2 refills it
      now = ahead;  // chunk c + 1's W fragments
    }
    if (full < chunks) {  // peeled tail: the last, partial chunk; k past kend is never loaded
      const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int k = k0 + full * KC + s * 2 * kStep;
        const bool ok = k < kend;  // the wide tail guard
        now.a[s] = ok ? ld16(w0 + k) : zero;
        now.b[s] = ok ? ld16(w1 + k) : zero;
      }
      cp_async_wait<0>();
      __syncthreads();
      multiply(now, full);
      __syncthreads();  // the x buffers are free again: the join below reuses them
    }
  }

  Epi epi(p, tid, n0);
  // Join the two K halves: C fragments (col g / g + 8, tokens 2t4, 2t4 + 1 (+ 8j)) to shared memory,
  // then each thread sums its outputs' two halves in a fixed order (deterministic).
  float* half_out = fs + wk * TM * kWideCols;
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int tok = 8 * j + 2 * t4, cc = wn * kCols + g;
    half_out[tok * kWideCols + cc] = acc[j][0];
    half_out[(tok + 1) * kWideCols + cc] = acc[j][1];
    half_out[tok * kWideCols + cc + 8] = acc[j][2];
    half_out[(tok + 1) * kWideCols + cc + 8] = acc[j][3];
  }
  __syncthreads();
  // In place: each element of half 0 becomes the sum, read and written by its owner only; half 1's
  // bytes then hold the h chunks (finish() starts with a barrier).
#pragma unroll 4
  for (int q = 0; q < Epi::Q; ++q) {
    const int e = (epi.tok0 + Epi::kTokStride * q) * kWideCols + epi.c;
    fs[e] += fs[TM * kWideCols + e];
  }
  epi.finish(p, fs, fs + TM * kWideCols, split, z, rows_s, task_s, scale_s, tid);
}

// One kernel over a grid; gridDim.z is capped at 65535, so long token grids go in several launches.
// `fused`: the fused forward, launched with PDL behind the shrink when the binary has the wait.
template <typename Kernel>
cudaError_t launch(Kernel kernel, bool fused, const Params& p0, unsigned gx, unsigned gy, int64_t gz,
                   cudaStream_t stream) {
  for (int64_t off = 0; off < gz; off += 65535) {
    Params p = p0;
    p.z_offset = off;
    const unsigned z = static_cast<unsigned>(gz - off < 65535 ? gz - off : 65535);
    const bool pdl = fused && p.pdl && off == 0 && binary_has_pdl_wait(kernel);
    const cudaError_t err = LK_LAUNCH(kernel, dim3(gx, gy, z), kThreads, stream, pdl, p);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// vec: 0 for the scalar path, else the tensor-core path's elements per load (mma_load_width). The
// 16-byte kernels come in every tile size (MT); the vector path (vec < 8) in 8-token blocks only, as
// the scalar path: its other sizes would cost more compile time (all of csrc/ is built several times
// in CI) than they would save, since the host runs it fused only for M <= 8 (fused_max_rows).
// `wide`: the fused forward of a 32- or 64-token tile on the 16-byte path runs as wide_kernel (64
// columns per block: gx is cdiv(N, kWideCols) then, see launch_fused); every other launch is skinny_kernel.
template <typename T, bool SHRINK>
cudaError_t launch_mt(const Params& p, int vec, int mt, bool wide, unsigned gx, unsigned gy, int64_t gz,
                      cudaStream_t stream) {
  if (vec == 0) return launch(skinny_kernel<T, 1, false, SHRINK, 8>, !SHRINK, p, gx, gy, gz, stream);
  if constexpr (sizeof(T) == 2) {
    if (vec != 8 && (mt != 1 || wide)) return cudaErrorInvalidValue;
    if constexpr (!SHRINK) {
      if (wide) return mt == 4 ? launch(wide_kernel<T, 4>, true, p, gx, gy, gz, stream)
                               : launch(wide_kernel<T, 8>, true, p, gx, gy, gz, stream);
    }
    switch (vec) {
      case 2: return launch(skinny_kernel<T, 1, true, SHRINK, 2>, !SHRINK, p, gx, gy, gz, stream);
      case 1: return launch(skinny_kernel<T, 1, true, SHRINK, 1>, !SHRINK, p, gx, gy, gz, stream);
      case 8: break;
      default: return cudaErrorInvalidValue;  // never a load wider than the rows allow
    }
    switch (mt) {
      case 1: return launch(skinny_kernel<T, 1, true, SHRINK, 8>, !SHRINK, p, gx, gy, gz, stream);
      case 2: return launch(skinny_kernel<T, 2, true, SHRINK, 8>, !SHRINK, p, gx, gy, gz, stream);
      case 4: return launch(skinny_kernel<T, 4, true, SHRINK, 8>, !SHRINK, p, gx, gy, gz, stream);
      default: return launch(skinny_kernel<T, 8, true, SHRINK, 8>, !SHRINK, p, gx, gy, gz, stream);
    }
  }
  return cudaErrorInvalidValue;  // fp32 never takes the MMA path
}

template <bool SHRINK>
cudaError_t launch_dtype(DType dt, const Params& p, int vec, int mt, bool wide, unsigned gx, unsigned gy,
                         int64_t gz, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return launch_mt<float, SHRINK>(p, 0, 1, false, gx, gy, gz, stream);
    case DType::kFloat16: return launch_mt<__half, SHRINK>(p, vec, mt, wide, gx, gy, gz, stream);
    case DType::kBFloat16: return launch_mt<__nv_bfloat16, SHRINK>(p, vec, mt, wide, gx, gy, gz, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int tile_tokens_for(int64_t rows) { return rows <= 8 ? 8 : rows <= 16 ? 16 : rows <= 32 ? 32 : 64; }

void shrink_splits(int64_t K, int64_t r, int64_t num_tiles, int tile_tokens, int num_sms, int* ksplit,
                   int64_t* k_per_split) {
  // Enough blocks for ~2 per SM, but every extra split is re-read by every fused block's
  // epilogue (TM x r floats each), so bigger token tiles get fewer splits: 16, 8, 4, 2.
  const int64_t base = cdiv(r, kCols) * (num_tiles > 0 ? num_tiles : 1);
  const int64_t unit = kWarps * kStep;  // one step of every warp
  int64_t want = cdiv(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132), base);
  const int64_t cap = 128 / (tile_tokens > 0 ? tile_tokens : 8);
  if (want > cap) want = cap;
  if (want > cdiv(K, unit)) want = cdiv(K, unit);
  if (want < 1) want = 1;
  const int64_t kps = cdiv(cdiv(K > 0 ? K : 1, want), unit) * unit;
  *k_per_split = kps;
  *ksplit = static_cast<int>(K > 0 ? cdiv(K, kps) : 1);
}

bool fused_wide(int64_t M, int64_t N, bool use_mma, int num_sms) {
  // wide_kernel stages x once per 64 columns (L2 -> SM traffic (1 + M/64)·|W| instead of (1 + M/16)·|W|)
  // but has 4x fewer blocks: a grid that needs more than 4 K parts to fill the SMs (N = 1024: 16 column
  // blocks, 16 parts) pays more in its serial join of the parts (the last block reads every part's
  // 16 KiB tile) than it saves, so small N keeps skinny_kernel. Prefill (M > 64, accumulate) always
  // takes the wide one: its grid is large.
  const int tm = tile_tokens_for(M);
  if (!use_mma || tm <= 16) return false;
  const int64_t blocks = cdiv(N, kWideCols) * cdiv(M, tm);
  const int64_t sms = num_sms > 0 ? num_sms : 132;
  return 2 * sms / blocks <= 4;
}

void fused_parts(int64_t M, int64_t N, int64_t K, bool use_mma, int num_sms, int* kparts, int64_t* k_per_part) {
  // A grid of column blocks x token tiles smaller than the SM count leaves SMs without loads (N = 1024:
  // 64 blocks for 132 SMs): split K so that there are ~2 blocks per SM (what the register budget
  // allows the <= 32-token kernels; ~62 KiB of W in flight per SM). Larger grids are not split: a
  // split costs the partials' round trip through L2 and a serial join. Parts are whole pipeline
  // stages per warp (kUnroll[1] x 256 = 1024 elements), so a part still runs the unpredicated loop.
  // wide_kernel (17..64 tokens) has 4x fewer, 64-column blocks: its parts are whole x chunks, and at
  // most 2 blocks per SM (floor, not ceil: its partials are 4-8x larger per column than skinny's, and
  // a third block per SM would only queue behind the two resident ones).
  const int tm = use_mma ? tile_tokens_for(M) : 8;
  const bool wide = fused_wide(M, N, use_mma, num_sms);
  const int64_t blocks = cdiv(N, wide ? kWideCols : kCols) * cdiv(M, tm);
  const int64_t unit = wide ? kWideChunk : static_cast<int64_t>(kUnroll[1]) * kWarps * kStep;
  const int64_t sms = num_sms > 0 ? num_sms : 132;
  int64_t want = wide ? 2 * sms / blocks : blocks >= sms ? 1 : cdiv(2 * sms, blocks);
  if (want > K / unit) want = K / unit;
  if (want < 2) {
    *kparts = 1;
    *k_per_part = K;
    return;
  }
  *k_per_part = cdiv(cdiv(K, want), unit) * unit;
  *kparts = static_cast<int>(cdiv(K, *k_per_part));
}

int mma_load_width(DType dtype, const void* p0, int64_t ld0, const void* p1, int64_t ld1, int64_t task_stride,
                   int64_t K) {
  if (dtype == DType::kFloat32) return 0;
  // Every load of V elements is at a row start plus a multiple of 8 elements (a thread's chunk) or,
  // in the tail, of V: aligned to 2V bytes iff every row start is. K % V == 0 makes the tail's
  // V-element groups wholly in or out of the row.
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(p0), a1 = reinterpret_cast<uintptr_t>(p1);
  for (const int v : {8, 2}) {
    if (K % v == 0 && ld0 % v == 0 && ld1 % v == 0 && task_stride % v == 0 && a0 % (2 * v) == 0 && a1 % (2 * v) == 0)
      return v;
  }
  return 1;
}

bool can_use_mma(DType dtype, const void* p0, int64_t ld0, const void* p1, int64_t ld1, int64_t task_stride, int64_t K) {
  return mma_load_width(dtype, p0, ld0, p1, ld1, task_stride, K) == 8;
}

int64_t fused_max_rows(DType dtype, bool use_mma, const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t K) {
  // 16-byte tensor-core kernels: up to 64 tokens per block, W read once for M <= 64. The vector
  // path and the scalar path (fp32, pre-sm_80) take 8 tokens per block: above 8 rows they would
  // read W once per 8 rows, where cuBLAS reads it about once.
  const int vec = use_mma ? mma_load_width(dtype, x, ldx, w, ldw, 0, K) : 0;
  return vec == 8 ? 64 : 8;
}

cudaError_t launch_shrink(const ShrinkArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.r == 0) return cudaSuccess;
  Params p{};
  p.x = a.x; p.ldx = a.ldx;
  p.w = a.a; p.ldw = a.K; p.w_task_stride = a.a_task_stride;
  p.M = a.M; p.N = a.r; p.K = a.K;
  p.k_per_split = a.k_per_split;
  p.h_out = a.h_part;
  p.ksplit = a.ksplit; p.r = a.r;
  p.tickets = a.tickets; p.num_tickets = a.num_tickets;
  const int tt = a.tile_tokens;
  const int vec = a.use_mma ? mma_load_width(a.dtype, a.x, a.ldx, a.a, a.K, a.a_task_stride, a.K) : 0;
  const int tm = vec == 8 ? tt : 8;  // tokens per block: the vector and scalar paths take 8
  int64_t gz;
  if (a.tiles != nullptr) {
    if (a.num_tiles == 0) return cudaSuccess;
    p.order = a.order; p.tiles = a.tiles; p.tile_tokens = tt; p.subs = tt / tm;
    gz = a.num_tiles * p.subs;
  } else {
    p.subs = 1;
    gz = cdiv(a.M, tm);
  }
  return launch_dtype<true>(a.dtype, p, vec, tm / 8, false, static_cast<unsigned>(cdiv(a.r, kCols)),
                            static_cast<unsigned>(a.ksplit), gz, stream);
}

cudaError_t launch_fused(const FusedArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  Params p{};
  p.x = a.x; p.ldx = a.ldx;
  p.w = a.w; p.ldw = a.ldw;
  p.M = a.M; p.N = a.N; p.K = a.K;
  p.subs = 1;
  p.bias = a.bias; p.y = a.y; p.ldy = a.ldy;
  p.h_part = a.h_part; p.ksplit = a.ksplit; p.r = a.r;
  p.b = a.b; p.b_task_stride = a.b_task_stride; p.ldb = a.ldb;
  p.task_ids = a.task_ids; p.scales = a.scales; p.scale = a.scale; p.accumulate = a.accumulate;
  p.pdl = a.pdl;
  p.kparts = a.kparts > 1 ? a.kparts : 1;
  p.k_per_split = p.kparts > 1 ? a.k_per_part : a.K;
  p.part = a.part; p.tickets = a.tickets;
  // Accumulate mode (K = 0) loads no x or W: the 16-byte kernel's 64-token tiles whatever the rows.
  const int vec = !a.use_mma || a.dtype == DType::kFloat32 ? 0
                  : a.K == 0 ? 8 : mma_load_width(a.dtype, a.x, a.ldx, a.w, a.ldw, 0, a.K);
  const int tm = vec == 8 ? tile_tokens_for(a.M) : 8;
  if (a.wide && !(vec == 8 && tm > 16)) return cudaErrorInvalidValue;  // not what fused_wide() answers
  if (a.wide && a.K >= (int64_t{1} << 31)) return cudaErrorInvalidValue;  // its k offsets are 32-bit
  const int cols = a.wide ? kWideCols : kCols;
  return launch_dtype<false>(a.dtype, p, vec, tm / 8, a.wide, static_cast<unsigned>(cdiv(a.N, cols)),
                             static_cast<unsigned>(p.kparts), cdiv(a.M, tm), stream);
}

}  // namespace lora_kernels
