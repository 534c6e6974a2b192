// key_codes kernel for bfloat16 keys.
#include "aether/cuda/key_codes.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_key_codes<__nv_bfloat16>(const KeyCodesParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
