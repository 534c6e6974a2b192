// sparse_decode kernel for bfloat16, head_dim 128.
#include "aether/cuda/sparse_decode.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_sparse_decode<__nv_bfloat16, 128>(const SparseDecodeParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
