// key_codes kernel for float32 keys.
#include "aether/cuda/key_codes.cuh"

namespace aether {
namespace cuda {
template cudaError_t launch_key_codes<float>(const KeyCodesParams&, cudaStream_t);
}  // namespace cuda
}  // namespace aether
