// Runs csrc/lora_linear.cu on the host through include/emu.h; called from tests/test_cuda_emulated.py
// with ctypes. Mirrors what csrc/bindings.cpp does around the launchers (workspace sizing, shrink
// then fused / expand-only), with the fp32 workspace poisoned with NaN.
#include "../../csrc/lora_linear.cu"

#include <cmath>
#include <vector>

using namespace lora_kernels;

extern "C" int emu_forward(int dtype, const void* x, const void* w, const void* bias, const void* a, const void* b,
                           void* y, int64_t M, int64_t N, int64_t K, int64_t r, const int64_t* task_ids,
                           const int64_t* order, const int32_t* tiles, int64_t num_tiles, int tile_tokens,
                           const float* scales, float scale, int allow_mma, int accumulate, int num_sms) {
  const DType dt = static_cast<DType>(dtype);
  const int tt = tiles != nullptr ? tile_tokens : tile_tokens_for(M);
  const int64_t split_tiles = tiles != nullptr ? num_tiles : (M + tt - 1) / tt;
  int ksplit = 1;
  int64_t kps = 0;
  shrink_splits(K, r, split_tiles, tt, num_sms, &ksplit, &kps);
  std::vector<float> h(static_cast<size_t>(ksplit * M * r), NAN);
  ShrinkArgs sa{};
  sa.dtype = dt; sa.x = x; sa.ldx = K; sa.a = a; sa.a_task_stride = r * K; sa.M = M; sa.K = K; sa.r = r;
  sa.order = order; sa.tiles = tiles; sa.num_tiles = num_tiles; sa.tile_tokens = tt;
  sa.h_part = h.data(); sa.ksplit = ksplit; sa.k_per_split = kps;
  sa.use_mma = allow_mma && can_use_mma(dt, x, K, a, K, r * K, K);
  if (launch_shrink(sa, nullptr) != cudaSuccess) return -1;
  FusedArgs fa{};
  fa.dtype = dt; fa.x = x; fa.ldx = K; fa.w = w; fa.ldw = K; fa.bias = accumulate ? nullptr : bias;
  fa.y = y; fa.ldy = N; fa.M = M; fa.N = N; fa.K = accumulate ? 0 : K;
  fa.h_part = h.data(); fa.ksplit = ksplit; fa.r = r; fa.b = b; fa.b_task_stride = N * r; fa.ldb = r;
  fa.task_ids = task_ids; fa.scales = scales; fa.scale = scale; fa.accumulate = accumulate != 0;
  fa.use_mma = allow_mma && (accumulate ? dt != DType::kFloat32 : can_use_mma(dt, x, K, w, K, 0, K));
  if (launch_fused(fa, nullptr) != cudaSuccess) return -1;
  return ksplit * 1000 + (sa.use_mma ? 100 : 0) + (fa.use_mma ? 10 : 0);
}
