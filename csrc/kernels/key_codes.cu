// key_codes and refine_scores launchers: validation and (dtype, head_dim) dispatch to the
// instantiations in key_codes_{fp16,bf16,fp32}.cu and refine_scores_hd{64,128,256}.cu.
#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/key_codes.cuh"
#include "aether/cuda/launchers.h"

namespace aether {
namespace cuda {

extern template cudaError_t launch_key_codes<__half>(const KeyCodesParams&, cudaStream_t);
extern template cudaError_t launch_key_codes<__nv_bfloat16>(const KeyCodesParams&, cudaStream_t);
extern template cudaError_t launch_key_codes<float>(const KeyCodesParams&, cudaStream_t);

#define AETHER_EXTERN_REFINE(D)                                                                            \
  extern template cudaError_t launch_refine_scores<__half, D>(const RefineScoresParams&, cudaStream_t);   \
  extern template cudaError_t launch_refine_scores<__nv_bfloat16, D>(const RefineScoresParams&, cudaStream_t); \
  extern template cudaError_t launch_refine_scores<float, D>(const RefineScoresParams&, cudaStream_t);
AETHER_EXTERN_REFINE(64)
AETHER_EXTERN_REFINE(128)
AETHER_EXTERN_REFINE(256)
#undef AETHER_EXTERN_REFINE

namespace {

// The grouping both kernels index by: bits 2 or 4, a power-of-two group of at most 128 tokens
// dividing num_blocks, a head_dim the kernels are built for.
bool valid_grouping(int bits, int per, int block_size, int num_blocks, int head_dim) {
  if (bits != 2 && bits != 4) return false;
  if (per < 1 || per > kMaxBlocksPerGroup || (per & (per - 1)) != 0) return false;
  if (block_size <= 0 || block_size * per > 128 || num_blocks < 0 || num_blocks % per != 0) return false;
  return head_dim == 64 || head_dim == 128 || head_dim == 256;
}

template <typename T>
cudaError_t dispatch_refine(const RefineScoresParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_refine_scores<T, 64>(p, stream);
    case 128: return launch_refine_scores<T, 128>(p, stream);
    case 256: return launch_refine_scores<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t key_codes(const KeyCodesParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::key_codes"};
  if (params.batch < 0 || params.kv_heads < 0) return cudaErrorInvalidValue;
  if (!valid_grouping(params.bits, params.blocks_per_group, params.block_size, params.num_blocks, params.head_dim)) {
    return cudaErrorInvalidValue;
  }
  if (params.codes == nullptr || params.ranges == nullptr || params.seq_lens == nullptr) return cudaErrorInvalidValue;
  if (params.k.block_table != nullptr && params.k.page_size != params.block_size) return cudaErrorInvalidValue;
  // Channel-major runs are written a 32-bit word at a time (key_codes.cuh).
  if (params.channel_major && reinterpret_cast<uintptr_t>(params.codes) % 4 != 0) return cudaErrorInvalidValue;
  // A channel pool: channel-major only, 1..head_dim stored runs (params.h).
  if (params.channel_slots != nullptr &&
      (!params.channel_major || params.stored_channels < 1 || params.stored_channels > params.head_dim)) {
    return cudaErrorInvalidValue;
  }
  switch (params.dtype) {
    case DType::kFloat16: return launch_key_codes<__half>(params, stream);
    case DType::kBFloat16: return launch_key_codes<__nv_bfloat16>(params, stream);
    case DType::kFloat32: return launch_key_codes<float>(params, stream);
  }
  return cudaErrorInvalidValue;  // unsupported dtype
}

cudaError_t refine_scores(const RefineScoresParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::refine_scores"};
  if (params.batch < 0 || params.kv_heads <= 0 || params.q_heads % params.kv_heads != 0 || params.list_length < 0) {
    return cudaErrorInvalidValue;
  }
  if (!valid_grouping(params.bits, params.blocks_per_group, params.block_size, params.num_blocks, params.head_dim)) {
    return cudaErrorInvalidValue;
  }
  if (params.codes == nullptr || params.ranges == nullptr || params.seq_lens == nullptr ||
      params.candidates == nullptr || params.num_candidates == nullptr || params.head_scores == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (params.dtype) {
    case DType::kFloat16: return dispatch_refine<__half>(params, stream);
    case DType::kBFloat16: return dispatch_refine<__nv_bfloat16>(params, stream);
    case DType::kFloat32: return dispatch_refine<float>(params, stream);
  }
  return cudaErrorInvalidValue;  // unsupported dtype
}

}  // namespace cuda
}  // namespace aether
