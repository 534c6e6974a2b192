// code_spreads (CodeSpreadsParams in params.h): the running channel spreads that let the qcodes
// channel choice (code_channels, channel_scores without a list) read one [D] row per (b, kv head)
// instead of every group's ranges. Not templated: it reads only the bf16 ranges.
#include <algorithm>
#include <cstdint>

#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/common.cuh"
#include "aether/cuda/launchers.h"

namespace aether {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// code_spreads: the running spreads (CodeSpreadsParams), a thread per channel walking the row's
// groups to rebuild in order. An append rebuilds one group: one step per thread. A build walks
// every group; the loads do not depend on the running sum, so kSpreadBatch groups' ranges are
// loaded (clamped to the last group, as in code_channels) before any is added.

constexpr int kCodeSpreadsThreads = 128;

__global__ void __launch_bounds__(kCodeSpreadsThreads) code_spreads_kernel(const CodeSpreadsParams p) {
  pdl_begin();  // the ranges come from the key-code build just before (common.cuh)
  const int D = p.head_dim;
  const int row = blockIdx.x;
  const int d = static_cast<int>(blockIdx.y) * kCodeSpreadsThreads + threadIdx.x;
  const int b = row / p.kv_heads;
  const int P = p.blocks_per_group;
  const int gt = P * p.block_size;
  const int NG = p.num_blocks / P;
  const int64_t len = max(p.seq_lens[b], 0);
  const int n_groups = static_cast<int>(std::min<int64_t>((len + gt - 1) / gt, NG));
  const int first = p.first_block == nullptr ? 0 : max(p.first_block[b], 0) / P;
  if (d >= D || first >= n_groups) return;
  const uint16_t* ranges = p.ranges + static_cast<int64_t>(row) * NG * 2 * D + d;
  double* spreads = p.spreads + static_cast<int64_t>(row) * NG * D + d;
  double acc = first > 0 ? spreads[static_cast<int64_t>(first - 1) * D] : 0.0;
  constexpr int kSpreadBatch = 8;
  for (int m0 = first; m0 < n_groups; m0 += kSpreadBatch) {
    uint16_t lo[kSpreadBatch], hi[kSpreadBatch];
#pragma unroll
    for (int k = 0; k < kSpreadBatch; ++k) {
      const int64_t m = min(m0 + k, n_groups - 1);
      lo[k] = ranges[m * 2 * D];
      hi[k] = ranges[(m * 2 + 1) * D];
    }
#pragma unroll
    for (int k = 0; k < kSpreadBatch; ++k) {
      if (m0 + k < n_groups) {
        // No fused multiply-add: the CPU kernel rounds the square and the sum separately too.
        const double width = __dsub_rn(static_cast<double>(__uint_as_float(static_cast<uint32_t>(hi[k]) << 16)),
                                       static_cast<double>(__uint_as_float(static_cast<uint32_t>(lo[k]) << 16)));
        acc = __dadd_rn(acc, __dmul_rn(width, width));
        spreads[static_cast<int64_t>(m0 + k) * D] = acc;
      }
    }
  }
}

cudaError_t launch_code_spreads(const CodeSpreadsParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (rows == 0 || p.num_blocks == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(p.head_dim, kCodeSpreadsThreads)));
  return launch_kernel(code_spreads_kernel, grid, dim3(kCodeSpreadsThreads), 0, stream, p);
}

}  // namespace

cudaError_t code_spreads(const CodeSpreadsParams& params, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::code_spreads"};
  const int per = params.blocks_per_group;
  if (params.batch < 0 || params.kv_heads <= 0 || params.head_dim <= 0 || params.block_size <= 0) {
    return cudaErrorInvalidValue;
  }
  if (per < 1 || params.num_blocks < 0 || params.num_blocks % per != 0) return cudaErrorInvalidValue;
  if (params.ranges == nullptr || params.seq_lens == nullptr || params.spreads == nullptr) return cudaErrorInvalidValue;
  return launch_code_spreads(params, stream);
}

}  // namespace cuda
}  // namespace aether
