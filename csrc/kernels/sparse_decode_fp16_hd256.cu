// sparse_decode kernel for float16, head_dim 256.
#include "aether/cuda/sparse_decode.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_sparse_decode<__half, 256>(const SparseDecodeParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
