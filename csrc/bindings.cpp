// Torch bindings of the CUDA ops: the one file of csrc/ that sees torch.
//
//   torch.ops.lora_kernels.cuda_lora_linear(x, weight, bias, lora_a, lora_b, scale) -> y
//   torch.ops.lora_kernels.cuda_lora_linear_mixed(x, weight, bias, lora_a, lora_b, scales,
//                                                 task_ids, order, tiles, tile_tokens) -> y
//
// Registered as a TORCH_LIBRARY_FRAGMENT of the `lora_kernels` namespace: the Triton ops register
// `lora_kernels::lora_linear` / `lora_linear_mixed` from Python (also fragments), so these ops
// carry a `cuda_` prefix and neither side owns the namespace. Only a CUDA kernel is registered;
// the fake (meta) implementations live in lora_kernels/ops/cuda.py (torch.library.register_fake),
// so torch.compile traces through the ops without running them.
//
// Inputs are checked here (device, dtype, shapes) and made contiguous explicitly (a no-op for the
// usual contiguous activations and parameters); the launchers then get raw pointers and run on
// the current stream, so the ops capture in CUDA graphs.
//
// Which kernels run (lora_kernels::fused_max_rows): up to 64 rows on the 16-byte tensor-core path
// (fp16/bf16 on sm_80+, K % 8 == 0 and 16-byte aligned rows), and up to 8 rows on the 8-token paths
// (fp16/bf16 rows that are not 16-byte aligned: the vector path; fp32 and pre-sm_80: the scalar
// path), the fused kernels compute the whole output, reading W once. Above that (prefill, and fp32
// or misaligned inputs with more than 8 rows, where an 8-token kernel would read W once per 8 rows)
// x·Wᵀ + b runs on cuBLAS and the kernels add the LoRA term in place (accumulate mode: shrink +
// expand, see csrc/lora_linear.cu).
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lora_kernels.cuh"

namespace {

using lora_kernels::DType;

DType dtype_of(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": x has dtype ", x.scalar_type(), "; the CUDA kernels take float32, float16 or bfloat16");
  }
  return DType::kFloat32;
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type());
}

void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, ": launching the ", what, " kernel failed: ", cudaGetErrorString(err));
}

struct Device {
  int num_sms;
  bool mma;  // sm_80+: mma.sync with bf16/fp16
  bool pdl;  // sm_90+: Programmatic Dependent Launch of the fused kernel (LORA_KERNELS_CUDA_PDL=0 turns it off)
};

// Per-device facts, queried once per device (c10/cuda headers only: ATen/cuda/CUDAContext.h would
// pull in cuBLAS/cuSPARSE headers that a minimal toolkit lacks).
Device device_info(int index) {
  static std::mutex mu;
  static std::unordered_map<int, Device> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(index);
  if (it != known.end()) return it->second;
  int sms = 0, major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
  const char* env = std::getenv("LORA_KERNELS_CUDA_PDL");
  const bool pdl_ok = env == nullptr || std::string(env) != "0";
  const Device dev{sms, major >= 8, major >= 9 && pdl_ok};
  known.emplace(index, dev);
  return dev;
}

// The weight as the kernels read it: rows of K contiguous elements, any row stride (ldw). A weight
// that is a row slice or a column slice of a bigger matrix is used in place; only one whose rows are
// not contiguous (e.g. a transposed view) is copied, and that copy is the whole W (32 MiB at
// 4096x4096 bf16, several times the kernel's own time) on every call: warn (Python shows it once per
// call site), naming the fix.
at::Tensor rows_of_weight(const at::Tensor& weight, const char* op) {
  if ((weight.stride(1) == 1 && weight.stride(0) >= weight.size(1)) || weight.is_contiguous()) return weight;
  TORCH_WARN(op, ": weight with strides ", weight.strides(), " has non-contiguous rows, so it is copied to a ",
             "contiguous tensor on every call (", weight.numel() * weight.element_size(), " bytes); store it ",
             "contiguous once (weight.data = weight.contiguous()) to avoid the copy");
  return weight.contiguous();
}

const void* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Shrink into a fresh fp32 workspace [ksplit, M, r]; returns it (and ksplit via the out param).
at::Tensor run_shrink(const char* op, DType dt, const Device& dev, const at::Tensor& x2, const at::Tensor& a,
                      int64_t r, const at::Tensor* order, const at::Tensor* tiles, int tile_tokens, int* ksplit,
                      bool* launched, const at::Tensor* tickets, cudaStream_t stream) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const int64_t num_tiles = tiles != nullptr ? tiles->size(0) : 0;
  const int64_t tiles_for_split = tiles != nullptr ? num_tiles : (M + tile_tokens - 1) / tile_tokens;
  int64_t kps = 0;
  lora_kernels::shrink_splits(K, r, tiles_for_split, tile_tokens, dev.num_sms, ksplit, &kps);
  at::Tensor h = at::empty({*ksplit, M, r}, x2.options().dtype(at::kFloat));
  lora_kernels::ShrinkArgs args{};
  args.dtype = dt;
  args.x = x2.data_ptr(); args.ldx = K;
  args.a = a.data_ptr(); args.a_task_stride = r * K;
  args.M = M; args.K = K; args.r = r;
  args.order = order != nullptr ? order->data_ptr<int64_t>() : nullptr;
  args.tiles = tiles != nullptr ? tiles->data_ptr<int32_t>() : nullptr;
  args.num_tiles = num_tiles;
  args.tile_tokens = tile_tokens;
  args.h_part = h.data_ptr<float>();
  args.ksplit = *ksplit;
  args.k_per_split = kps;
  args.use_mma = dev.mma && dt != DType::kFloat32;  // the launcher picks the load width from the rows
  args.tickets = tickets != nullptr ? tickets->data_ptr<int32_t>() : nullptr;
  args.num_tickets = tickets != nullptr ? tickets->numel() : 0;
  check_launch(lora_kernels::launch_shrink(args, stream), op, "shrink");
  *launched = M > 0 && (tiles == nullptr || num_tiles > 0);
  return h;
}

// The fused kernel's K split across blocks (small grids, e.g. N = 1024): decided before the shrink,
// which zeroes the tickets (no memset launch). Empty tensors when there is no split.
struct FusedParts {
  int kparts = 1;
  int64_t k_per_part = 0;
  at::Tensor part, tickets;
};

FusedParts plan_fused_parts(DType dt, const Device& dev, const at::Tensor& x2, const at::Tensor& w, bool shrink_runs) {
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  FusedParts fp;
  fp.k_per_part = K;
  const int64_t max_rows = lora_kernels::fused_max_rows(dt, dev.mma, x2.data_ptr(), K, w.data_ptr(), w.stride(0), K);
  if (M > max_rows || !shrink_runs) return fp;  // cuBLAS base, or no shrink to zero the tickets
  // 16-byte path: tiles of tile_tokens_for(M); the vector and scalar paths: 8-token blocks.
  const bool mma = dev.mma && lora_kernels::can_use_mma(dt, x2.data_ptr(), K, w.data_ptr(), w.stride(0), 0, K);
  lora_kernels::fused_parts(M, N, K, mma, dev.num_sms, &fp.kparts, &fp.k_per_part);
  if (fp.kparts > 1) {
    const int64_t tm = mma ? lora_kernels::tile_tokens_for(M) : 8;
    fp.part = at::empty({fp.kparts, M, N}, x2.options().dtype(at::kFloat));
    fp.tickets = at::empty({(N + 15) / 16 * ((M + tm - 1) / tm)}, x2.options().dtype(at::kInt));
  }
  return fp;
}

// y = base + LoRA. Fused (M <= fused_max_rows) or cuBLAS base + in-place LoRA (accumulate).
at::Tensor run_fused(const char* op, DType dt, const Device& dev, const at::Tensor& x2, const at::Tensor& w,
                     const std::optional<at::Tensor>& bias, const at::Tensor& h, int ksplit, int64_t r,
                     const at::Tensor& b, const int64_t* task_ids, const float* scales, float scale,
                     bool after_shrink, const FusedParts& parts, cudaStream_t stream) {
  const int64_t M = x2.size(0), K = x2.size(1), N = w.size(0);
  const bool fused = M <= lora_kernels::fused_max_rows(dt, dev.mma, x2.data_ptr(), K, w.data_ptr(), w.stride(0), K);
  at::Tensor y;
  if (fused) {
    y = at::empty({M, N}, x2.options());
  } else {
    // Compute-bound regime (or an 8-token kernel above 8 rows): cuBLAS is at the flop floor for x·Wᵀ
    // (+ bias in its epilogue) and reads W about once.
    y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  }
  lora_kernels::FusedArgs args{};
  args.dtype = dt;
  args.x = x2.data_ptr(); args.ldx = K;
  args.w = w.data_ptr(); args.ldw = w.stride(0);
  args.bias = fused ? opt_ptr(bias) : nullptr;
  args.y = y.data_ptr(); args.ldy = N;
  args.M = M; args.N = N; args.K = fused ? K : 0;
  args.h_part = h.data_ptr<float>(); args.ksplit = ksplit; args.r = r;
  args.b = b.data_ptr(); args.b_task_stride = N * r; args.ldb = r;
  args.task_ids = task_ids; args.scales = scales; args.scale = scale;
  args.accumulate = !fused;
  // The launcher picks the load width (16-byte, or the vector path's 4/2-byte loads) from the rows;
  // accumulate mode loads no x or W (K = 0) and takes the 64-token tiles (B rows read once per 64 rows).
  args.use_mma = dev.mma && dt != DType::kFloat32;
  // wide_kernel: only on the 16-byte path (its tiles), as fused_parts' choice above.
  const bool mma16 = args.use_mma && (!fused || lora_kernels::can_use_mma(dt, x2.data_ptr(), K, w.data_ptr(),
                                                                          w.stride(0), 0, K));
  args.wide = lora_kernels::fused_wide(M, N, mma16, dev.num_sms);
  // PDL only right behind a shrink launch: the fused kernel reads x before its griddepcontrol.wait,
  // so its programmatic predecessor must be a kernel that itself started after x was written.
  args.pdl = dev.pdl && after_shrink && fused;  // accumulate mode: cuBLAS runs in between
  args.kparts = fused ? parts.kparts : 1;
  args.k_per_part = parts.k_per_part;
  args.part = parts.kparts > 1 ? parts.part.data_ptr<float>() : nullptr;
  args.tickets = parts.kparts > 1 ? parts.tickets.data_ptr<int32_t>() : nullptr;
  check_launch(lora_kernels::launch_fused(args, stream), op, fused ? "fused forward" : "expand");
  return y;
}

at::Tensor cuda_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  constexpr const char* op = "lora_kernels::cuda_lora_linear";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  const DType dt = dtype_of(x, op);
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K], got a scalar");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features but weight is [N=", N, ", K=", K, "]");
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K && lora_a.size(0) >= 1, op, ": lora_a must be [r >= 1, K=", K,
              "], got ", lora_a.sizes());
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == N && lora_b.size(1) == r, op, ": lora_b must be [N=", N,
              ", r=", r, "], got ", lora_b.sizes());
  check_like(op, "weight", weight, x);
  check_like(op, "lora_a", lora_a, x);
  check_like(op, "lora_b", lora_b, x);
  if (bias.has_value()) {
    check_like(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N=", N, "], got ", bias->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return at::empty(out_shape, x.options());
  const at::Tensor w = rows_of_weight(weight, op), a = lora_a.contiguous(), b = lora_b.contiguous();
  std::optional<at::Tensor> bc;
  if (bias.has_value()) bc = bias->contiguous();
  const Device dev = device_info(x.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int tt = lora_kernels::tile_tokens_for(M);
  int ksplit = 1;
  bool launched = false;
  const FusedParts parts = plan_fused_parts(dt, dev, x2, w, /*shrink_runs=*/true);
  const at::Tensor h = run_shrink(op, dt, dev, x2, a, r, nullptr, nullptr, tt, &ksplit, &launched,
                                  parts.kparts > 1 ? &parts.tickets : nullptr, stream);
  at::Tensor y = run_fused(op, dt, dev, x2, w, bc, h, ksplit, r, b, nullptr, nullptr, static_cast<float>(scale),
                           launched, parts, stream);
  return y.view(out_shape);
}

at::Tensor cuda_lora_linear_mixed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scales,
                                  const at::Tensor& task_ids, const at::Tensor& order, const at::Tensor& tiles,
                                  int64_t tile_tokens) {
  constexpr const char* op = "lora_kernels::cuda_lora_linear_mixed";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  const DType dt = dtype_of(x, op);
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K] (the Python wrapper flattens), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got ", weight.sizes());
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " features but weight is [N=", N, ", K=", K, "]");
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == K && lora_a.size(1) >= 1, op, ": lora_a must be [T, r >= 1, K=",
              K, "], got ", lora_a.sizes());
  const int64_t T = lora_a.size(0), r = lora_a.size(1);
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == T && lora_b.size(1) == N && lora_b.size(2) == r, op,
              ": lora_b must be [T=", T, ", N=", N, ", r=", r, "], got ", lora_b.sizes());
  check_like(op, "weight", weight, x);
  check_like(op, "lora_a", lora_a, x);
  check_like(op, "lora_b", lora_b, x);
  if (bias.has_value()) {
    check_like(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N=", N, "], got ", bias->sizes());
  }
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == T, op, ": scales must be [T=", T, "], got ", scales.sizes());
  TORCH_CHECK(scales.is_floating_point(), op, ": scales must be floating point, got ", scales.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"task_ids", task_ids}, {"order", order}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == M, op, ": ", name, " must be [M=", M, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  }
  TORCH_CHECK(tiles.dim() == 2 && tiles.size(1) == 3 && tiles.scalar_type() == at::kInt, op,
              ": tiles must be int32 [num_tiles, 3] (task, start, count), got ", tiles.scalar_type(), " ", tiles.sizes());
  TORCH_CHECK(tiles.device() == x.device(), op, ": tiles is on ", tiles.device(), " but x is on ", x.device());
  TORCH_CHECK(tile_tokens == 8 || tile_tokens == 16 || tile_tokens == 32 || tile_tokens == 64, op,
              ": tile_tokens must be 8, 16, 32 or 64, got ", tile_tokens);
  // The contents of task_ids / order / tiles are trusted (checking them would cost a device sync
  // per call): they come from a Routing, which validated the ids once per batch.
  const c10::cuda::CUDAGuard guard(x.device());
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  const at::Tensor x2 = x.contiguous(), w = rows_of_weight(weight, op), a = lora_a.contiguous(), b = lora_b.contiguous();
  const at::Tensor ids = task_ids.contiguous(), ord = order.contiguous(), tl = tiles.contiguous();
  const at::Tensor s32 = scales.to(x.device(), at::kFloat).contiguous();
  std::optional<at::Tensor> bc;
  if (bias.has_value()) bc = bias->contiguous();
  const Device dev = device_info(x.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int ksplit = 1;
  bool launched = false;
  // The shrink runs (and zeroes the tickets) only when some tile has a task: tl.size(0) > 0.
  const FusedParts parts = plan_fused_parts(dt, dev, x2, w, /*shrink_runs=*/tl.size(0) > 0);
  const at::Tensor h = run_shrink(op, dt, dev, x2, a, r, &ord, &tl, static_cast<int>(tile_tokens), &ksplit,
                                  &launched, parts.kparts > 1 ? &parts.tickets : nullptr, stream);
  return run_fused(op, dt, dev, x2, w, bc, h, ksplit, r, b, ids.data_ptr<int64_t>(), s32.data_ptr<float>(), 1.0f,
                   launched, parts, stream);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  // The fake (meta) implementations are registered from this Python module (register_fake).
  m.set_python_module("lora_kernels.ops.cuda");
  m.def("cuda_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale) -> Tensor");
  m.def(
      "cuda_lora_linear_mixed(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scales, "
      "Tensor task_ids, Tensor order, Tensor tiles, int tile_tokens) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cuda_lora_linear", &cuda_lora_linear);
  m.impl("cuda_lora_linear_mixed", &cuda_lora_linear_mixed);
}
