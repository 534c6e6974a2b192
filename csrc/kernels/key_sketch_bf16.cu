// key_sketch kernels for bfloat16 keys, head_dim 64 / 128 / 256.
#include "aether/cuda/key_sketch.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_key_sketch<__nv_bfloat16, 64>(const KeySketchParams&, cudaStream_t);
template cudaError_t launch_key_sketch<__nv_bfloat16, 128>(const KeySketchParams&, cudaStream_t);
template cudaError_t launch_key_sketch<__nv_bfloat16, 256>(const KeySketchParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
