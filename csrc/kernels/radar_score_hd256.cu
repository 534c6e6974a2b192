// radar_select score kernels for head_dim 256 (all head tiles, with and without the box term).
#include "aether/cuda/radar_select.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_radar_score<256>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);
}  // namespace cuda
}  // namespace aether
