// channel_scores kernels for head_dim 128 (float16, bfloat16 and float32 queries).
#include "aether/cuda/channel_scores.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_channel_scores<__half, 128>(const ChannelScoresParams&, cudaStream_t);
template cudaError_t launch_channel_scores<__nv_bfloat16, 128>(const ChannelScoresParams&, cudaStream_t);
template cudaError_t launch_channel_scores<float, 128>(const ChannelScoresParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
