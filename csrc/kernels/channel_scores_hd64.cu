// channel_scores kernels for head_dim 64 (float16, bfloat16 and float32 queries).
#include "aether/cuda/channel_scores.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_channel_scores<__half, 64>(const ChannelScoresParams&, cudaStream_t);
template cudaError_t launch_channel_scores<__nv_bfloat16, 64>(const ChannelScoresParams&, cudaStream_t);
template cudaError_t launch_channel_scores<float, 64>(const ChannelScoresParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
