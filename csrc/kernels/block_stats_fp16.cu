// block_stats kernels for float16 keys, head_dim 64 / 128 / 256.
#include "aether/cuda/block_stats.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_block_stats<__half, 64>(const BlockStatsParams&, cudaStream_t);
template cudaError_t launch_block_stats<__half, 128>(const BlockStatsParams&, cudaStream_t);
template cudaError_t launch_block_stats<__half, 256>(const BlockStatsParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
