// Runs csrc/lora_linear.cu on the host through include/emu.h; called from tests/cuda_emu/emulator.py
// with ctypes. Mirrors what csrc/bindings.cpp does around the launchers (workspace sizing, shrink
// then fused / expand-only, PDL for the fused launch right behind the shrink), with the fp32
// workspace poisoned with NaN, every global load checked against the input buffers (bounds and
// alignment), and the PDL race modelled (see emu.h).
#include "lora_linear.cu"

#include <cmath>
#include <string>
#include <vector>

using namespace lora_kernels;

namespace {
float to_float(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}
void store(DType dt, void* p, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}
// y = x·Wᵀ + b rounded to the dtype: what cuBLAS gives bindings.cpp above fused_max_rows.
void base_into(DType dt, const void* x, const void* w, int64_t ldw, const void* bias, void* y, int64_t M, int64_t N,
               int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias != nullptr ? to_float(dt, bias, n) : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(to_float(dt, x, m * K + k)) * to_float(dt, w, n * ldw + k);
      store(dt, y, m * N + n, static_cast<float>(acc));
    }
}

void add_range(const void* p, int64_t count, size_t elem, const char* name) {
  if (p == nullptr || count <= 0) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  emu::g_ranges.push_back({b, b + static_cast<uintptr_t>(count) * elem, name});
}
}  // namespace

// cp.async schedule of the next calls: 0 deferred (lands at the wait), 1 eager (lands at issue); see emu.h.
extern "C" void emu_set_cp_async_eager(int eager) { emu::g_cp_eager = eager != 0; }

// The launcher's choices for a bf16 decode shape on the tensor-core path: kparts * 10 + wide
// (tests compare them with lora_kernels.plan.cuda, which models the same choices).
extern "C" int emu_fused_choice(int64_t M, int64_t N, int64_t K, int num_sms) {
  int kparts = 1;
  int64_t k_per_part = K;
  fused_parts(M, N, K, true, num_sms, &kparts, &k_per_part);
  return kparts * 10 + (fused_wide(M, N, true, num_sms) ? 1 : 0);
}

// The first bad load of the last call ("" when none).
extern "C" const char* emu_fault() { return emu::g_fault; }

// The load widths the last call made in buffer `name` ("x", "weight", "lora_a", ...): bit b set for
// a 2^b-byte load, so a test can tell the 16-byte, the vector (4- or 2-byte) and the scalar paths apart.
namespace {
std::vector<emu::Range> g_last_ranges;
int64_t g_mmas[2];  // warp MMAs of the last call's shrink and fused launches
}
extern "C" int64_t emu_mma_count(int fused) { return g_mmas[fused != 0]; }
extern "C" unsigned emu_load_sizes(const char* name) {
  for (const emu::Range& r : g_last_ranges)
    if (std::string(r.name) == name) return r.sizes;
  return 0;
}

// The host's rule (csrc/bindings.cpp): rows up to which the forward runs fused.
extern "C" int64_t emu_fused_max_rows(int dtype, const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t K,
                                      int allow_mma) {
  return fused_max_rows(static_cast<DType>(dtype), allow_mma != 0, x, ldx, w, ldw, K);
}

// Returns kparts * 100000 + ksplit * 1000 + 100 (shrink on tensor cores) + 10 (fused on tensor cores)
// + 1 (expand-only: y held the base) + 2 (fused forward by wide_kernel), -1 when a launcher failed, -2 when a load was out of bounds or
// misaligned (emu_fault() says which).
// ldw: W's row stride (>= K). accumulate: 1 = y holds x·Wᵀ + b, add the LoRA term (K = 0); 0 = fused;
// -1 = as bindings.cpp: fused up to fused_max_rows, else the base is computed here (in double, the
// stand-in for cuBLAS) and the LoRA term added. binary_version: the architecture of the binary "the
// driver runs" (80: no PDL wait compiled in).
extern "C" int emu_forward(int dtype, const void* x, const void* w, int64_t ldw, const void* bias, const void* a,
                           const void* b, void* y, int64_t M, int64_t N, int64_t K, int64_t r, int64_t T,
                           const int64_t* task_ids, const int64_t* order, const int32_t* tiles, int64_t num_tiles,
                           int tile_tokens, const float* scales, float scale, int allow_mma, int accumulate,
                           int num_sms, int binary_version) {
  const DType dt = static_cast<DType>(dtype);
  const size_t es = dt == DType::kFloat32 ? 4 : 2;
  if (accumulate < 0) {
    accumulate = M > fused_max_rows(dt, allow_mma != 0, x, K, w, ldw, K);
    if (accumulate) base_into(dt, x, w, ldw, bias, y, M, N, K);
  }
  const int tt = tiles != nullptr ? tile_tokens : tile_tokens_for(M);
  const int64_t split_tiles = tiles != nullptr ? num_tiles : (M + tt - 1) / tt;
  int ksplit = 1;
  int64_t kps = 0;
  shrink_splits(K, r, split_tiles, tt, num_sms, &ksplit, &kps);
  std::vector<float> h(static_cast<size_t>(ksplit * M * r), NAN);
  // The fused kernel's K parts (as bindings.cpp): partials poisoned with NaN, tickets with garbage
  // that the shrink must zero.
  const bool launched = M > 0 && (tiles == nullptr || num_tiles > 0);
  // As bindings.cpp: the fused tiles (and the K-part tickets) follow the 16-byte path's tile size;
  // the vector and scalar paths take 8 tokens per block.
  const bool mma_fused = allow_mma && can_use_mma(dt, x, K, w, ldw, 0, K);
  int kparts = 1;
  int64_t k_per_part = K;
  if (!accumulate && launched) fused_parts(M, N, K, mma_fused, num_sms, &kparts, &k_per_part);
  const int64_t fused_tm = mma_fused ? tile_tokens_for(M) : 8;
  const int64_t num_tickets = (N + 15) / 16 * ((M + fused_tm - 1) / fused_tm);
  std::vector<float> part(kparts > 1 ? static_cast<size_t>(kparts * M * N) : 0, NAN);
  std::vector<int> tickets(kparts > 1 ? static_cast<size_t>(num_tickets) : 0, 0x5a5a5a5a);
  emu::g_fault[0] = 0;
  emu::g_ranges.clear();
  add_range(x, M * K, es, "x");
  add_range(w, (N - 1) * ldw + K, es, "weight");
  add_range(bias, N, es, "bias");
  add_range(a, T * r * K, es, "lora_a");
  add_range(b, T * N * r, es, "lora_b");
  add_range(y, M * N, es, "y");
  add_range(task_ids, M, 8, "task_ids");
  add_range(order, M, 8, "order");
  add_range(tiles, 3 * num_tiles, 4, "tiles");
  add_range(scales, T, 4, "scales");
  add_range(h.data(), static_cast<int64_t>(h.size()), 4, "h workspace");
  add_range(part.data(), static_cast<int64_t>(part.size()), 4, "K-part workspace");
  emu::g_binary_version = binary_version;
  emu::g_device = binary_version;  // one "device" per binary, so the per-device PDL answer is not shared

  ShrinkArgs sa{};
  sa.dtype = dt; sa.x = x; sa.ldx = K; sa.a = a; sa.a_task_stride = r * K; sa.M = M; sa.K = K; sa.r = r;
  sa.order = order; sa.tiles = tiles; sa.num_tiles = num_tiles; sa.tile_tokens = tt;
  sa.h_part = h.data(); sa.ksplit = ksplit; sa.k_per_split = kps;
  sa.use_mma = allow_mma && dt != DType::kFloat32;  // the launcher picks the load width
  sa.tickets = kparts > 1 ? tickets.data() : nullptr;
  sa.num_tickets = kparts > 1 ? num_tickets : 0;
  emu::g_mma_count = 0;
  if (launch_shrink(sa, nullptr) != cudaSuccess) return -1;
  g_mmas[0] = emu::g_mma_count;
  emu::g_mma_count = 0;

  FusedArgs fa{};
  fa.dtype = dt; fa.x = x; fa.ldx = K; fa.w = w; fa.ldw = ldw; fa.bias = accumulate ? nullptr : bias;
  fa.y = y; fa.ldy = N; fa.M = M; fa.N = N; fa.K = accumulate ? 0 : K;
  fa.h_part = h.data(); fa.ksplit = ksplit; fa.r = r; fa.b = b; fa.b_task_stride = N * r; fa.ldb = r;
  fa.task_ids = task_ids; fa.scales = scales; fa.scale = scale; fa.accumulate = accumulate != 0;
  fa.use_mma = allow_mma && dt != DType::kFloat32;
  fa.pdl = launched && !accumulate;  // as bindings.cpp on an sm_90 device
  fa.wide = fused_wide(M, N, fa.use_mma && (accumulate || mma_fused), num_sms);  // as bindings.cpp
  fa.kparts = kparts; fa.k_per_part = k_per_part;
  fa.part = kparts > 1 ? part.data() : nullptr;
  fa.tickets = kparts > 1 ? tickets.data() : nullptr;
  // Under PDL the fused kernel may run before the shrink has written h and zeroed the tickets:
  // hide both until a wait.
  std::vector<float> written;
  std::vector<int> zeroed;
  emu::g_pdl_hide = [&] {
    written = h;
    zeroed = tickets;
    std::fill(h.begin(), h.end(), NAN);
    std::fill(tickets.begin(), tickets.end(), 0x5a5a5a5a);
  };
  emu::g_pdl_release = [&] {
    std::copy(written.begin(), written.end(), h.begin());
    std::copy(zeroed.begin(), zeroed.end(), tickets.begin());
  };
  const cudaError_t err = launch_fused(fa, nullptr);
  g_mmas[1] = emu::g_mma_count;
  emu::g_pdl_hide = nullptr;
  emu::g_pdl_release = nullptr;
  g_last_ranges = emu::g_ranges;
  emu::g_ranges.clear();
  if (err != cudaSuccess) return -1;
  if (emu::g_fault[0]) return -2;
  return kparts * 100000 + ksplit * 1000 + (sa.use_mma ? 100 : 0) + (fa.use_mma ? 10 : 0) + (accumulate ? 1 : 0) +
         (fa.wide ? 2 : 0);
}
