// key_sketch kernels for float32 keys, head_dim 64 / 128 / 256.
#include "aether/cuda/key_sketch.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_key_sketch<float, 64>(const KeySketchParams&, cudaStream_t);
template cudaError_t launch_key_sketch<float, 128>(const KeySketchParams&, cudaStream_t);
template cudaError_t launch_key_sketch<float, 256>(const KeySketchParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
