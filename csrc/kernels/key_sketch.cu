// key_sketch launcher: validation and (dtype, head_dim) dispatch to the instantiations in
// key_sketch_{fp16,bf16,fp32}.cu.
#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/key_sketch.cuh"
#include "aether/cuda/launchers.h"

namespace aether {
namespace cuda {

#define AETHER_EXTERN_KEY_SKETCH(T)                                                            \
  extern template cudaError_t launch_key_sketch<T, 64>(const KeySketchParams&, cudaStream_t);  \
  extern template cudaError_t launch_key_sketch<T, 128>(const KeySketchParams&, cudaStream_t); \
  extern template cudaError_t launch_key_sketch<T, 256>(const KeySketchParams&, cudaStream_t);
AETHER_EXTERN_KEY_SKETCH(__half)
AETHER_EXTERN_KEY_SKETCH(__nv_bfloat16)
AETHER_EXTERN_KEY_SKETCH(float)
#undef AETHER_EXTERN_KEY_SKETCH

namespace {

template <typename T>
cudaError_t dispatch_head_dim(const KeySketchParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_key_sketch<T, 64>(p, stream);
    case 128: return launch_key_sketch<T, 128>(p, stream);
    case 256: return launch_key_sketch<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;  // unsupported head_dim
  }
}

}  // namespace

cudaError_t key_sketch(const KeySketchParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::key_sketch"};
  if (params.batch < 0 || params.kv_heads < 0 || params.num_blocks < 0) return cudaErrorInvalidValue;
  if (params.block_size <= 0 || params.block_size > kMaxSketchBlockSize) return cudaErrorInvalidValue;
  // P = blocks_per_sketch: a power of two in 1..kMaxBlocksPerSketch dividing num_blocks, and a
  // sketch block of P * block_size tokens fits the kernel's shared buffers.
  const int per = params.blocks_per_sketch;
  if (per < 1 || per > kMaxBlocksPerSketch || (per & (per - 1)) != 0 || params.num_blocks % per != 0 ||
      params.block_size * per > kMaxSketchBlockSize) {
    return cudaErrorInvalidValue;
  }
  if (params.rank < 2 || params.rank > kMaxSketchRank || params.rank % 2 != 0) return cudaErrorInvalidValue;
  if (params.key_proj == nullptr || params.sketch.codes == nullptr || params.sketch.ranges == nullptr ||
      params.sketch.centroid == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (params.k.block_table != nullptr && params.k.page_size != params.block_size) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(params, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(params, stream);
    case DType::kFloat32: return dispatch_head_dim<float>(params, stream);
  }
  return cudaErrorInvalidValue;  // unsupported dtype
}

}  // namespace cuda
}  // namespace aether
