// A host emulator of the few CUDA features csrc/*.cu uses, so that the kernels run (slowly) on a
// machine without a GPU: each block runs as 256 fibers (ucontext) on one OS thread, switched only
// at barriers (__syncthreads, __syncwarp, the warp-collective shuffle and MMA), so a block costs
// no OS scheduling; `static` stands for __shared__ (blocks run one at a time); mma.sync.m16n8k16
// is computed from the fragment layout in the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type"), written independently of the kernel.
// The fake cuda_runtime.h / cuda_fp16.h / cuda_bf16.h beside it include this file.
#pragma once

#include <math.h>

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct cudaFuncAttributes { int binaryVersion; int ptxVersion; };
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half h) {
  const uint32_t s = (h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
  float f;
  if (e == 0) {
    f = ldexpf(static_cast<float>(m), -24);
    return s ? -f : f;
  }
  uint32_t u = e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112) << 23) | (m << 13));
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t s = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = fabsf(f);
  if (a != a) return {static_cast<uint16_t>(s | 0x7e00)};
  if (a >= 65520.f) return {static_cast<uint16_t>(s | 0x7c00)};
  if (a < ldexpf(1.f, -14)) {  // subnormal: multiples of 2^-24, nearbyint rounds to even
    return {static_cast<uint16_t>(s | static_cast<uint16_t>(nearbyintf(a * ldexpf(1.f, 24))))};
  }
  int ex;
  const float mant = frexpf(a, &ex);  // a = mant * 2^ex, mant in [0.5, 1)
  float q = nearbyintf(mant * 2048.f);  // 11 significant bits
  if (q >= 2048.f) { q /= 2.f; ex += 1; }
  const uint32_t e = static_cast<uint32_t>(ex - 1 + 15);
  if (e >= 31) return {static_cast<uint16_t>(s | 0x7c00)};
  return {static_cast<uint16_t>(s | (e << 10) | (static_cast<uint32_t>(q) - 1024))};
}

inline uint3 threadIdx;  // set by the scheduler before it resumes a fiber
inline uint3 blockIdx;
inline uint3 gridDim;  // set by launch()

using std::max;
using std::min;

namespace emu {
constexpr int kThreads = 256;

// --- Checked global loads: every __ldg must read inside a buffer the harness registered, at the
// alignment of its type (a 16-byte load of a 2-byte-aligned row is a misaligned-address fault on a
// GPU, and a read past a tensor's end is garbage or a fault there). A bad load is recorded (the
// first one, for the report) and reads zero instead of touching the memory.
// `sizes`: the load widths seen in this buffer (bit b set: a 2^b-byte load), so a test can tell
// which load path ran.
struct Range { uintptr_t begin, end; const char* name; unsigned sizes = 0; };
inline std::vector<Range> g_ranges;
inline char g_fault[256] = "";
inline void check_load(const void* ptr, size_t bytes, size_t align) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  if (g_fault[0]) return;
  if (p % align != 0) {
    snprintf(g_fault, sizeof g_fault, "misaligned %zu-byte load at %#lx (needs %zu-byte alignment)", bytes,
             static_cast<unsigned long>(p), align);
    return;
  }
  for (Range& r : g_ranges)
    if (p >= r.begin && p + bytes <= r.end) {
      r.sizes |= 1u << __builtin_ctzl(bytes);
      return;
    }
  snprintf(g_fault, sizeof g_fault, "out-of-bounds %zu-byte load at %#lx (in no input buffer)", bytes,
           static_cast<unsigned long>(p));
}

// --- Programmatic dependent launch. On an sm_90 GPU the fused kernel launched with PDL runs while
// the shrink still writes h: what it reads of the shrink's output before griddepcontrol.wait is
// stale. Modelled as: at a PDL launch the harness hides the primary's output (fills it with NaN)
// and the first executed wait restores it. A wait only exists in code compiled for sm_90+
// (`g_binary_version`: the architecture of the binary the driver runs, which cudaFuncGetAttributes
// reports), as on the GPU where `griddepcontrol.wait` is compiled only under __CUDA_ARCH__ >= 900.
inline int g_binary_version = 90;
inline int g_device = 0;
inline std::function<void()> g_pdl_hide, g_pdl_release;
inline bool g_pdl_pending = false;
inline void pdl_begin(bool pdl) {
  if (pdl && g_pdl_hide) {
    g_pdl_hide();
    g_pdl_pending = true;
  }
}
inline void pdl_wait() {
  if (g_binary_version >= 90 && g_pdl_pending) {
    g_pdl_pending = false;
    g_pdl_release();
  }
}
inline void pdl_end() {  // the primary has long finished once the dependent grid completes
  if (g_pdl_pending) {
    g_pdl_pending = false;
    g_pdl_release();
  }
}
// --- cp.async: a 16-byte global -> shared copy that lands late. Per thread, copies queue in commit
// groups and cp.async.wait_group N performs all but the newest N groups. Two schedules, both legal
// on a GPU, catch different missing synchronisation (harness: emu_set_cp_async_eager):
//  - deferred (default): a copy lands at its thread's wait, so shared memory read before the wait,
//    or before the barrier that follows every thread's wait, is stale;
//  - eager: a copy lands at issue, so a buffer refilled while other threads still read it (a
//    missing barrier between the reads and the next refill) is overwritten under them.
// The source is checked like a load (bounds, 16-byte alignment); the destination's alignment too.
// Races on the copies' destination (a racecheck of its own): shared-memory reads of the kernels'
// staged buffers go through LK_SMEM_READ, which records each 16-byte granule's reader and the block
// barrier epoch (the barrier generation); a copy landing on a granule that another thread read in
// the same epoch, or a read of a granule another thread's copy landed on in the same epoch, is a
// race: nothing orders the two on a GPU.
struct Touch { int epoch = -1, tid = -1; };
struct SmemTouch { Touch read, landed; };
inline std::unordered_map<uintptr_t, SmemTouch> g_smem;
inline int epoch();
inline void race(const char* what) {
  if (!g_fault[0]) snprintf(g_fault, sizeof g_fault, "shared-memory race: %s in one barrier interval", what);
}
struct CpAsync { void* dst; const void* src; bool ok; int tid; };
inline std::vector<CpAsync> g_cp_open[kThreads];
inline std::vector<std::vector<CpAsync>> g_cp_groups[kThreads];  // committed, oldest first
inline bool g_cp_eager = false;
inline void cp_land(const CpAsync& c) {
  unsigned char v[16] = {};
  if (c.ok) {
    check_load(c.src, 16, 16);
    if (!g_fault[0]) std::memcpy(v, c.src, 16);
  }
  if (reinterpret_cast<uintptr_t>(c.dst) % 16 != 0 && !g_fault[0])
    snprintf(g_fault, sizeof g_fault, "misaligned cp.async destination in shared memory");
  SmemTouch& t = g_smem[reinterpret_cast<uintptr_t>(c.dst) / 16];
  if (t.read.epoch == epoch() && t.read.tid != c.tid) race("a cp.async landed on bytes another thread read");
  t.landed = {epoch(), c.tid};
  std::memcpy(c.dst, v, 16);
}
template <class T> inline const T* smem_read(const T* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const int tid = static_cast<int>(threadIdx.x);
  for (uintptr_t g = a / 16; g <= (a + sizeof(T) - 1) / 16; ++g) {
    SmemTouch& t = g_smem[g];
    if (t.landed.epoch == epoch() && t.landed.tid != tid) race("a read of bytes another thread's cp.async landed on");
    t.read = {epoch(), tid};
  }
  return p;
}
inline void cp_async16(void* dst, const void* src, bool ok) {
  const CpAsync c{dst, src, ok, static_cast<int>(threadIdx.x)};
  if (g_cp_eager) cp_land(c);
  else g_cp_open[threadIdx.x].push_back(c);
}
inline void cp_commit() {
  g_cp_groups[threadIdx.x].push_back(std::move(g_cp_open[threadIdx.x]));
  g_cp_open[threadIdx.x].clear();
}
inline void cp_wait(int newest_pending) {
  auto& groups = g_cp_groups[threadIdx.x];
  while (static_cast<int>(groups.size()) > newest_pending) {
    for (const CpAsync& c : groups.front()) cp_land(c);
    groups.erase(groups.begin());
  }
}
inline void cp_reset() {  // a new block: nothing in flight, no shared-memory history
  for (int t = 0; t < kThreads; ++t) {
    g_cp_open[t].clear();
    g_cp_groups[t].clear();
  }
  g_smem.clear();
}

constexpr size_t kStack = 64 * 1024;

struct Fiber {
  ucontext_t ctx;
  bool done;
  const int* wait_gen;  // waiting until *wait_gen != gen
  int gen;
};
struct Block {
  ucontext_t sched;
  Fiber fibers[kThreads];
  int cur = 0;
  int count = 0, gen = 0;                            // block barrier
  int wcount[kThreads / 32] = {}, wgen[kThreads / 32] = {};  // warp barriers
  float shfl[kThreads / 32][32];
  uint32_t mma_a[kThreads / 32][32][4];
  uint32_t mma_b[kThreads / 32][32][2];
  int orv = 0;
};
inline Block* g_block = nullptr;
inline int epoch() { return g_block->gen; }  // block barriers completed so far
inline const std::function<void()>* g_body = nullptr;

inline void fiber_entry() {
  (*g_body)();
  g_block->fibers[g_block->cur].done = true;  // returning resumes the scheduler (uc_link)
}

// Arrive; wait (yielding to the scheduler) until all n have arrived.
inline void barrier(int& count, int& gen, int n) {
  Block& bk = *g_block;
  const int g = gen;
  if (++count == n) {
    count = 0;
    ++gen;
    return;
  }
  Fiber& f = bk.fibers[bk.cur];
  f.wait_gen = &gen;
  f.gen = g;
  swapcontext(&f.ctx, &bk.sched);
}
inline void block_barrier() { barrier(g_block->count, g_block->gen, kThreads); }
inline void warp_barrier() {
  const int w = threadIdx.x >> 5;
  barrier(g_block->wcount[w], g_block->wgen[w], 32);
}

inline void launch(const std::function<void()>& body, dim3 grid, int threads) {
  if (threads != kThreads) std::abort();
  static std::vector<char> stacks(kThreads * kStack);
  g_body = &body;
  gridDim = {grid.x, grid.y, grid.z};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block* bk = new Block();
        g_block = bk;
        cp_reset();
        blockIdx = {x, y, z};
        for (int t = 0; t < kThreads; ++t) {
          Fiber& f = bk->fibers[t];
          f.done = false;
          f.wait_gen = nullptr;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks.data() + t * kStack;
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &bk->sched;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        int left = kThreads;
        while (left > 0) {
          bool ran = false;
          for (int t = 0; t < kThreads; ++t) {
            Fiber& f = bk->fibers[t];
            if (f.done || (f.wait_gen != nullptr && *f.wait_gen == f.gen)) continue;
            f.wait_gen = nullptr;
            bk->cur = t;
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            swapcontext(&bk->sched, &f.ctx);
            ran = true;
            if (f.done) --left;
          }
          if (!ran) std::abort();  // deadlock: a barrier that not every thread reaches
        }
        delete bk;
      }
}

template <class T> inline float tof(uint16_t bits) { return __half2float(__half{bits}); }
template <> inline float tof<__nv_bfloat16>(uint16_t bits) { return __bfloat162float(__nv_bfloat16{bits}); }

// Warp-level MMAs executed (counted once per warp, by lane 0): tells a test the tensor-core path ran.
inline int64_t g_mma_count = 0;

// d += A(16x16) B(16x8) for the warp; every lane passes its fragment registers.
template <class T>
void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) ++g_mma_count;
  Block& bk = *g_block;
  bk.mma_a[warp][lane][0] = a0; bk.mma_a[warp][lane][1] = a1; bk.mma_a[warp][lane][2] = a2; bk.mma_a[warp][lane][3] = a3;
  bk.mma_b[warp][lane][0] = b0; bk.mma_b[warp][lane][1] = b1;
  warp_barrier();
  auto half = [](uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu); };
  // PTX: A element a_i of lane (g, t): row g for i in {0,1,4,5}, g+8 otherwise; col 2t + (i&1) (+8 for i >= 4);
  // register j holds a_{2j} (low half) and a_{2j+1}. B element b_i: row 2t + (i&1) (+8 for i >= 2), col g.
  auto A = [&](int row, int k) {
    const int t = (k & 7) >> 1, reg = (k < 8 ? 0 : 2) + (row >= 8 ? 1 : 0);
    return tof<T>(half(bk.mma_a[warp][(row & 7) * 4 + t][reg], k & 1));
  };
  auto B = [&](int k, int col) {
    const int t = (k & 7) >> 1, reg = k < 8 ? 0 : 1;
    return tof<T>(half(bk.mma_b[warp][col * 4 + t][reg], k & 1));
  };
  const int g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {  // C: c0,c1 row g, c2,c3 row g+8; col 2t + (i&1)
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    out[i] = s;
  }
  warp_barrier();
  for (int i = 0; i < 4; ++i) d[i] += out[i];
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
inline int __syncthreads_or(int pred) {
  emu::Block& bk = *emu::g_block;
  emu::block_barrier();
  if (pred) bk.orv = 1;
  emu::block_barrier();
  const int r = bk.orv;
  emu::block_barrier();
  if (threadIdx.x == 0) bk.orv = 0;
  emu::block_barrier();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int off) {
  emu::Block& bk = *emu::g_block;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  bk.shfl[warp][lane] = v;
  emu::warp_barrier();
  const float r = bk.shfl[warp][lane ^ off];
  emu::warp_barrier();
  return r;
}
namespace emu {
// The pointer to read: p itself, or (after a bad load) a zero of the type, so nothing outside the
// inputs is ever touched.
template <class T> inline const T* checked(const T* p) {
  static const T zero{};
  check_load(p, sizeof(T), alignof(T));
  return g_fault[0] ? &zero : p;
}
}  // namespace emu
#define LK_CHECKED(p) ::emu::checked(p)
template <class T> inline T __ldg(const T* p) { return *emu::checked(p); }
template <class F> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->binaryVersion = a->ptxVersion = emu::g_binary_version;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::g_device;
  return cudaSuccess;
}
[[noreturn]] inline void __trap() { std::abort(); }
// Blocks run one at a time here, so an atomic is a plain read-modify-write and a fence orders nothing
// that is not already ordered; what these model is the kernels' use of them (the ticket's value).
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}

#define LK_EMULATE_MMA(d, a0, a1, a2, a3, b0, b1, T) ::emu::mma<T>(d, a0, a1, a2, a3, b0, b1)
#define LK_EMULATE_PDL_WAIT() ::emu::pdl_wait()
#define LK_EMULATE_CP_ASYNC(dst, src, ok) ::emu::cp_async16(dst, src, ok)
#define LK_EMULATE_CP_COMMIT() ::emu::cp_commit()
#define LK_EMULATE_CP_WAIT(n) ::emu::cp_wait(n)
#define LK_SMEM_READ(p) ::emu::smem_read(p)
#define LK_LAUNCH(kernel, grid, block, stream, pdl, ...) \
  (::emu::pdl_begin(pdl), ::emu::launch([&] { kernel(__VA_ARGS__); }, grid, block), ::emu::pdl_end(), cudaSuccess)
