// union_blocks: the union of two block lists per (b, kv head), in ascending order (UnionBlocksParams
// in params.h). Two-stage selection joins the last step's final blocks to the first stage's
// candidates with it; done with torch ops (two scatters and a segmented sort) the same union was
// about twenty small launches per step.
//
// One CTA per row: the row's blocks as a bitmap in shared memory (NB / 8 bytes, 256 bytes at
// 2048 blocks), one atomicOr per list entry, then a compaction: each thread owns a contiguous run
// of words, an exclusive scan of their popcounts gives where its blocks go, and it writes them in
// order. The output does not depend on the lists' order or duplicates.
#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/common.cuh"
#include "aether/cuda/launchers.h"

namespace aether {
namespace cuda {
namespace {

constexpr int kUnionThreads = 256;
constexpr int kUnionWarps = kUnionThreads / kWarpSize;

__device__ __forceinline__ void mark_blocks(uint32_t* words, const int32_t* list, int32_t length, int32_t count,
                                            int32_t num_blocks) {
  const int32_t n = min(max(count, 0), length);
  for (int32_t i = threadIdx.x; i < n; i += kUnionThreads) {
    const int32_t j = list[i];
    if (j >= 0 && j < num_blocks) atomicOr(&words[j >> 5], 1u << (j & 31));
  }
}

__global__ void __launch_bounds__(kUnionThreads) union_blocks_kernel(const UnionBlocksParams p) {
  pdl_begin();  // before any global read (common.cuh)
  extern __shared__ uint32_t words[];
  __shared__ int warp_totals[kUnionWarps];
  const int64_t row = blockIdx.x;
  const int num_words = (p.num_blocks + 31) >> 5;
  for (int w = threadIdx.x; w < num_words; w += kUnionThreads) words[w] = 0u;
  __syncthreads();
  mark_blocks(words, p.indices + row * p.indices_length, p.indices_length, p.counts[row], p.num_blocks);
  mark_blocks(words, p.extra + row * p.extra_length, p.extra_length, p.extra_counts[row], p.num_blocks);
  __syncthreads();

  // Thread t owns words [t * per, (t + 1) * per): contiguous runs keep the output ascending.
  const int per = (num_words + kUnionThreads - 1) / kUnionThreads;
  const int begin = min(static_cast<int>(threadIdx.x) * per, num_words);
  const int end = min(begin + per, num_words);
  int mine = 0;
  for (int w = begin; w < end; ++w) mine += __popc(words[w]);
  const int lane = threadIdx.x & (kWarpSize - 1), warp = threadIdx.x / kWarpSize;
  int inclusive = mine;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const int v = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kUnionWarps; ++w) {
    before += w < warp ? warp_totals[w] : 0;
    total += warp_totals[w];
  }
  int32_t* out = p.out + row * p.num_blocks;
  int pos = before + inclusive - mine;
  for (int w = begin; w < end; ++w) {
    for (uint32_t bits = words[w]; bits != 0u; bits &= bits - 1u) out[pos++] = (w << 5) + __ffs(bits) - 1;
  }
  for (int j = total + threadIdx.x; j < p.num_blocks; j += kUnionThreads) out[j] = -1;
  if (threadIdx.x == 0) p.out_counts[row] = total;
}

}  // namespace

cudaError_t union_blocks(const UnionBlocksParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::union_blocks"};
  const UnionBlocksParams& p = params;
  if (p.batch < 0 || p.kv_heads < 0 || p.indices_length < 0 || p.extra_length < 0 || p.num_blocks < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.indices == nullptr || p.counts == nullptr || p.extra == nullptr || p.extra_counts == nullptr ||
      p.out == nullptr || p.out_counts == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;  // grid.x
  const size_t bytes = static_cast<size_t>((p.num_blocks + 31) / 32) * sizeof(uint32_t);
  const size_t static_bytes = sizeof(int) * kUnionWarps;
  if (bytes + static_bytes > 48 * 1024) {  // past the default limit (NB > ~393,000 blocks)
    int optin = 0;
    AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
    if (bytes + static_bytes > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
    AETHER_CUDA_TRY(cudaFuncSetAttribute(union_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
  }
  return launch_kernel(union_blocks_kernel, dim3(static_cast<unsigned>(rows)), dim3(kUnionThreads), bytes, stream, p);
}

}  // namespace cuda
}  // namespace aether
