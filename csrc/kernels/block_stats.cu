// block_stats launcher: validation and (dtype, head_dim) dispatch to the instantiations in
// block_stats_{fp16,bf16,fp32}.cu.
#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/block_stats.cuh"
#include "aether/cuda/launchers.h"

namespace aether {
namespace cuda {

#define AETHER_EXTERN_BLOCK_STATS(T)                                                              \
  extern template cudaError_t launch_block_stats<T, 64>(const BlockStatsParams&, cudaStream_t);  \
  extern template cudaError_t launch_block_stats<T, 128>(const BlockStatsParams&, cudaStream_t); \
  extern template cudaError_t launch_block_stats<T, 256>(const BlockStatsParams&, cudaStream_t);
AETHER_EXTERN_BLOCK_STATS(__half)
AETHER_EXTERN_BLOCK_STATS(__nv_bfloat16)
AETHER_EXTERN_BLOCK_STATS(float)
#undef AETHER_EXTERN_BLOCK_STATS

namespace {

template <typename T>
cudaError_t dispatch_head_dim(const BlockStatsParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_block_stats<T, 64>(p, stream);
    case 128: return launch_block_stats<T, 128>(p, stream);
    case 256: return launch_block_stats<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;  // unsupported head_dim
  }
}

}  // namespace

cudaError_t block_stats(const BlockStatsParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::block_stats"};
  if (params.batch < 0 || params.kv_heads < 0 || params.block_size <= 0 || params.num_blocks < 0) {
    return cudaErrorInvalidValue;
  }
  if (params.k.block_table != nullptr && params.k.page_size != params.block_size) return cudaErrorInvalidValue;
  // Keys are read in 16-byte chunks: every row must start on a 16-byte boundary.
  if (reinterpret_cast<uintptr_t>(params.k.data) % 16 != 0 || params.k.stride_seq % 8 != 0 ||
      params.k.stride_head % 8 != 0 || params.k.stride_token % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  switch (params.dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(params, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(params, stream);
    case DType::kFloat32: return dispatch_head_dim<float>(params, stream);
  }
  return cudaErrorInvalidValue;  // unsupported dtype
}

}  // namespace cuda
}  // namespace aether
