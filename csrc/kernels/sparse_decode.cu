// sparse_decode launcher: validation, split count, (dtype, head_dim) dispatch to the
// instantiations in sparse_decode_{fp16,bf16}_hd{64,128,256}.cu, and the merge of the splits.
#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/launchers.h"
#include "aether/cuda/sparse_decode.cuh"

namespace aether {
namespace cuda {

#define AETHER_EXTERN_SPARSE_DECODE(T)                                                                \
  extern template cudaError_t launch_sparse_decode<T, 64>(const SparseDecodeParams&, cudaStream_t);  \
  extern template cudaError_t launch_sparse_decode<T, 128>(const SparseDecodeParams&, cudaStream_t); \
  extern template cudaError_t launch_sparse_decode<T, 256>(const SparseDecodeParams&, cudaStream_t);
AETHER_EXTERN_SPARSE_DECODE(__half)
AETHER_EXTERN_SPARSE_DECODE(__nv_bfloat16)
#undef AETHER_EXTERN_SPARSE_DECODE

namespace {

// Splits beyond this add merge work without filling the GPU any better.
constexpr int kMaxSplits = 128;

bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The decode kernel copies K/V rows in 16-byte chunks: rows must start on 16-byte boundaries.
bool kv_layout_ok(const KVLayout& layout, int block_size) {
  if (layout.data == nullptr || !aligned_16(layout.data)) return false;
  if (layout.stride_seq % 8 != 0 || layout.stride_head % 8 != 0 || layout.stride_token % 8 != 0) return false;
  return layout.block_table == nullptr || layout.page_size == block_size;
}

cudaError_t validate(const SparseDecodeParams& p) {
  if (p.batch < 0 || p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  if (p.block_size <= 0 || p.num_blocks < 0) return cudaErrorInvalidValue;
  if (p.num_splits < 1 || p.num_splits > 65535) return cudaErrorInvalidValue;
  if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) return cudaErrorInvalidValue;
  if (p.selected != nullptr && p.num_selected == nullptr) return cudaErrorInvalidValue;
  if (p.q == nullptr || p.out == nullptr || p.lse == nullptr || p.seq_lens == nullptr) return cudaErrorInvalidValue;
  if (!kv_layout_ok(p.k, p.block_size) || !kv_layout_ok(p.v, p.block_size)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_head_dim(const SparseDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: AETHER_CUDA_TRY((launch_sparse_decode<T, 64>(p, stream))); break;
    case 128: AETHER_CUDA_TRY((launch_sparse_decode<T, 128>(p, stream))); break;
    case 256: AETHER_CUDA_TRY((launch_sparse_decode<T, 256>(p, stream))); break;
    default: return cudaErrorInvalidValue;  // unsupported head_dim
  }
  if (p.num_splits > 1) {
    nvtx3::scoped_range range{"aether::merge"};
    return launch_merge_splits<T>(p, stream);
  }
  return cudaSuccess;
}

}  // namespace

int sparse_decode_num_splits(int batch, int kv_heads, int max_selected_blocks, int num_sms) {
  const int64_t heads = static_cast<int64_t>(batch) * kv_heads;
  if (heads <= 0 || max_selected_blocks <= 1 || num_sms <= 0) return 1;
  // CTAs the GPU runs at once: two per SM at head_dim 128 (shared memory and registers of the
  // decode kernel; three fit at 64, one at 256). All CTAs do about the same work, so the time is
  // set by the number of waves: pick the split count whose CTAs fill the waves best ...
  const int64_t slots = 2 * static_cast<int64_t>(num_sms);
  // ... among those that leave every split at least two blocks (its fixed cost stays amortised).
  const int most = std::min(kMaxSplits, std::max(1, max_selected_blocks / 2));
  auto wave_fill = [&](int splits) {
    const int64_t ctas = heads * splits;
    return static_cast<double>(ctas) / static_cast<double>(ceil_div(ctas, slots) * slots);
  };
  double best = 0.0;
  for (int splits = 1; splits <= most; ++splits) best = std::max(best, wave_fill(splits));
  // The fewest splits within 5% of the best fill: fewer partial states to merge.
  for (int splits = 1; splits <= most; ++splits) {
    if (wave_fill(splits) >= 0.95 * best) return splits;
  }
  return 1;
}

cudaError_t sparse_decode(const SparseDecodeParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::sparse_decode"};
  AETHER_CUDA_TRY(validate(params));
  switch (params.dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(params, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(params, stream);
    default: return cudaErrorInvalidValue;  // float32 decode runs on the CPU path only
  }
}

}  // namespace cuda
}  // namespace aether
