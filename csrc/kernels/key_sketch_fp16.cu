// key_sketch kernels for float16 keys, head_dim 64 / 128 / 256.
#include "aether/cuda/key_sketch.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_key_sketch<__half, 64>(const KeySketchParams&, cudaStream_t);
template cudaError_t launch_key_sketch<__half, 128>(const KeySketchParams&, cudaStream_t);
template cudaError_t launch_key_sketch<__half, 256>(const KeySketchParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
