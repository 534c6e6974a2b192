// qsketch score kernel, head_dim 128.
#include "aether/cuda/key_sketch.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_sketch_score<128>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);
}  // namespace cuda
}  // namespace aether
