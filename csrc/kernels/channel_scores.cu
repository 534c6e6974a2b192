// code_channels and channel_scores launchers (the "qcodes" score): validation and (dtype,
// head_dim) dispatch to the instantiations in code_channels.cu and channel_scores_hd{64,128,256}.cu.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/channel_scores.cuh"
#include "aether/cuda/launchers.h"

namespace aether {
namespace cuda {

extern template cudaError_t launch_code_channels<__half>(const CodeChannelsParams&, cudaStream_t);
extern template cudaError_t launch_code_channels<__nv_bfloat16>(const CodeChannelsParams&, cudaStream_t);
extern template cudaError_t launch_code_channels<float>(const CodeChannelsParams&, cudaStream_t);

#define AETHER_EXTERN_CHANNEL_SCORES(D)                                                                         \
  extern template cudaError_t launch_channel_scores<__half, D>(const ChannelScoresParams&, cudaStream_t);       \
  extern template cudaError_t launch_channel_scores<__nv_bfloat16, D>(const ChannelScoresParams&, cudaStream_t); \
  extern template cudaError_t launch_channel_scores<float, D>(const ChannelScoresParams&, cudaStream_t);
AETHER_EXTERN_CHANNEL_SCORES(64)
AETHER_EXTERN_CHANNEL_SCORES(128)
AETHER_EXTERN_CHANNEL_SCORES(256)
#undef AETHER_EXTERN_CHANNEL_SCORES

namespace {

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// What both kernels index by: q_heads a multiple of kv_heads, a power-of-two group of at most 128
// tokens dividing num_blocks, a head_dim the kernels are built for, 1 <= num_channels <= head_dim,
// and 16-byte aligned ranges (read as 16-byte vectors).
bool valid_channel_args(int batch, int q_heads, int kv_heads, int per, int block_size, int num_blocks, int head_dim,
                        int num_channels, const void* ranges) {
  if (batch < 0 || kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0) return false;
  if (per < 1 || per > kMaxBlocksPerGroup || (per & (per - 1)) != 0) return false;
  if (block_size <= 0 || block_size * per > kChannelScoresMaxGroupTokens || num_blocks < 0 || num_blocks % per != 0) {
    return false;
  }
  if (head_dim != 64 && head_dim != 128 && head_dim != 256) return false;
  if (num_channels < 1 || num_channels > head_dim) return false;
  return ranges != nullptr && aligned(ranges, 16);
}

// A channel pool stores 1..head_dim runs per group (params.h).
bool valid_pool(const int32_t* channel_slots, int stored_channels, int head_dim) {
  return channel_slots == nullptr || (stored_channels >= 1 && stored_channels <= head_dim);
}

template <typename T>
cudaError_t dispatch_channel_scores(const ChannelScoresParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_channel_scores<T, 64>(p, stream);
    case 128: return launch_channel_scores<T, 128>(p, stream);
    case 256: return launch_channel_scores<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// AETHER_CHANNEL_LSE=tile: channel_scores' log-sum-exps always on per-m-tile maxima (the exact
// path of ChannelScoresParams::lse_group_max), to compare both in one build.
bool lse_per_tile_forced() {
  static const bool forced = [] {
    const char* env = std::getenv("AETHER_CHANNEL_LSE");
    return env != nullptr && std::strcmp(env, "tile") == 0;
  }();
  return forced;
}

}  // namespace

cudaError_t code_channels(const CodeChannelsParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::code_channels"};
  if (!valid_channel_args(params.batch, params.q_heads, params.kv_heads, params.blocks_per_group, params.block_size,
                          params.num_blocks, params.head_dim, params.num_channels, params.ranges)) {
    return cudaErrorInvalidValue;
  }
  if (params.q == nullptr || params.seq_lens == nullptr || params.channels == nullptr) return cudaErrorInvalidValue;
  if (!valid_pool(params.channel_slots, params.stored_channels, params.head_dim)) return cudaErrorInvalidValue;
  switch (params.dtype) {
    case DType::kFloat16: return launch_code_channels<__half>(params, stream);
    case DType::kBFloat16: return launch_code_channels<__nv_bfloat16>(params, stream);
    case DType::kFloat32: return launch_code_channels<float>(params, stream);
  }
  return cudaErrorInvalidValue;  // unsupported dtype
}

cudaError_t channel_scores(const ChannelScoresParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::channel_scores"};
  if (!valid_channel_args(params.batch, params.q_heads, params.kv_heads, params.blocks_per_group, params.block_size,
                          params.num_blocks, params.head_dim, params.num_channels, params.ranges)) {
    return cudaErrorInvalidValue;
  }
  if (params.bits != 2 && params.bits != 4) return cudaErrorInvalidValue;
  if (!valid_pool(params.channel_slots, params.stored_channels, params.head_dim)) return cudaErrorInvalidValue;
  // The kernel scores 16-token m-tiles (m16n8k16): power-of-two blocks of 16 to 128 tokens (a
  // channel's run of a group is then a whole number of words, copied in 4-, 8- or 16-byte pieces).
  if (params.block_size < 16 || (params.block_size & (params.block_size - 1)) != 0) return cudaErrorInvalidValue;
  // Without a channel list the kernel chooses the channels from the running spreads.
  if (params.q == nullptr || params.codes == nullptr || params.seq_lens == nullptr ||
      (params.channels == nullptr && params.spreads == nullptr) || params.head_scores == nullptr ||
      !aligned(params.codes, 16)) {
    return cudaErrorInvalidValue;
  }
  ChannelScoresParams p = params;
  if (lse_per_tile_forced()) p.lse_group_max = 0;
  switch (p.dtype) {
    case DType::kFloat16: return dispatch_channel_scores<__half>(p, stream);
    case DType::kBFloat16: return dispatch_channel_scores<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return dispatch_channel_scores<float>(p, stream);
  }
  return cudaErrorInvalidValue;  // unsupported dtype
}

}  // namespace cuda
}  // namespace aether
