// code_channels kernels (float16, bfloat16 and float32 queries; any head_dim up to 256).
#include "aether/cuda/channel_scores.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_code_channels<__half>(const CodeChannelsParams&, cudaStream_t);
template cudaError_t launch_code_channels<__nv_bfloat16>(const CodeChannelsParams&, cudaStream_t);
template cudaError_t launch_code_channels<float>(const CodeChannelsParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
