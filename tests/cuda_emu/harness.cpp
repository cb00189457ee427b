// Runs csrc/lora_linear.cu on the host through include/emu.h; called from tests/cuda_emu/emulator.py
// with ctypes. Mirrors what csrc/bindings.cpp does around the launchers (workspace sizing, shrink
// then fused / expand-only, PDL for the fused launch right behind the shrink), with the fp32
// workspace poisoned with NaN, every global load checked against the input buffers (bounds and
// alignment), and the PDL race modelled (see emu.h).
#include "lora_linear.cu"

#include <cmath>
#include <vector>

using namespace lora_kernels;

namespace {
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

// Returns kparts * 100000 + ksplit * 1000 + 100 (shrink on tensor cores) + 10 (fused on tensor cores) + 1 (fused
// forward by wide_kernel), -1 when a
// launcher failed, -2 when a load was out of bounds or misaligned (emu_fault() says which).
// binary_version: the architecture of the binary "the driver runs" (80: no PDL wait compiled in).
extern "C" int emu_forward(int dtype, const void* x, const void* w, const void* bias, const void* a, const void* b,
                           void* y, int64_t M, int64_t N, int64_t K, int64_t r, int64_t T, const int64_t* task_ids,
                           const int64_t* order, const int32_t* tiles, int64_t num_tiles, int tile_tokens,
                           const float* scales, float scale, int allow_mma, int accumulate, int num_sms,
                           int binary_version) {
  const DType dt = static_cast<DType>(dtype);
  const size_t es = dt == DType::kFloat32 ? 4 : 2;
  const int tt = tiles != nullptr ? tile_tokens : tile_tokens_for(M);
  const int64_t split_tiles = tiles != nullptr ? num_tiles : (M + tt - 1) / tt;
  int ksplit = 1;
  int64_t kps = 0;
  shrink_splits(K, r, split_tiles, tt, num_sms, &ksplit, &kps);
  std::vector<float> h(static_cast<size_t>(ksplit * M * r), NAN);
  // The fused kernel's K parts (as bindings.cpp): partials poisoned with NaN, tickets with garbage
  // that the shrink must zero.
  const bool launched = M > 0 && (tiles == nullptr || num_tiles > 0);
  const bool mma_fused = allow_mma && can_use_mma(dt, x, K, w, K, 0, K);
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
  add_range(w, N * K, es, "weight");
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
  sa.use_mma = allow_mma && can_use_mma(dt, x, K, a, K, r * K, K);
  sa.tickets = kparts > 1 ? tickets.data() : nullptr;
  sa.num_tickets = kparts > 1 ? num_tickets : 0;
  if (launch_shrink(sa, nullptr) != cudaSuccess) return -1;

  FusedArgs fa{};
  fa.dtype = dt; fa.x = x; fa.ldx = K; fa.w = w; fa.ldw = K; fa.bias = accumulate ? nullptr : bias;
  fa.y = y; fa.ldy = N; fa.M = M; fa.N = N; fa.K = accumulate ? 0 : K;
  fa.h_part = h.data(); fa.ksplit = ksplit; fa.r = r; fa.b = b; fa.b_task_stride = N * r; fa.ldb = r;
  fa.task_ids = task_ids; fa.scales = scales; fa.scale = scale; fa.accumulate = accumulate != 0;
  fa.use_mma = allow_mma && (accumulate ? dt != DType::kFloat32 : mma_fused);
  fa.pdl = launched && !accumulate;  // as bindings.cpp on an sm_90 device
  fa.wide = fused_wide(M, N, fa.use_mma, num_sms);
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
  emu::g_pdl_hide = nullptr;
  emu::g_pdl_release = nullptr;
  emu::g_ranges.clear();
  if (err != cudaSuccess) return -1;
  if (emu::g_fault[0]) return -2;
  return kparts * 100000 + ksplit * 1000 + (sa.use_mma ? 100 : 0) + (fa.use_mma ? 10 : 0) + (fa.wide ? 1 : 0);
}
