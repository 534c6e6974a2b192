// block_stats kernel: per-block key statistics (centroid, channel box, radius, spread).
//
// One CTA of kStatsThreads threads computes one (batch, kv_head, block) at a time and strides over
// the blocks of its (b, h) (grid.y slices). Keys are read as 16-byte chunks of 8 elements; the
// threads of a CTA cover kRowsPerPass token rows per pass. Two passes over the block's keys: the
// float32 mean first, then the distances to that mean (the second pass re-reads the block, which
// is then in L1/L2: 16 KiB for 64 tokens x 128 dims in bf16).
#pragma once

#include "aether/cuda/common.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kStatsThreads = 128;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kStatsThreads)
block_stats_kernel(const BlockStatsParams p) {
  pdl_begin();  // before any global read (common.cuh)
  constexpr int kChunks = kHeadDim / 8;  // 8-element (16-byte for 16-bit types) chunks per key row
  constexpr int kRowsPerPass = kStatsThreads / kChunks;
  static_assert(kHeadDim % 8 == 0, "head_dim must be a multiple of 8");
  static_assert(kStatsThreads % kChunks == 0, "a pass must cover whole rows");
  static_assert(kChunks <= kWarpSize && kWarpSize % kChunks == 0,
                "the chunks of one row must sit in one warp for the shuffle reduction");

  __shared__ float s_sum[kRowsPerPass][kHeadDim];
  __shared__ float s_lo[kRowsPerPass][kHeadDim];
  __shared__ float s_hi[kRowsPerPass][kHeadDim];
  __shared__ float s_mean[kHeadDim];
  __shared__ float s_reduce[kStatsThreads / kWarpSize];

  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int len = max(p.seq_lens[b], 0);
  const int n_blocks = min((len + p.block_size - 1) / p.block_size, p.num_blocks);
  const int begin = p.first_block != nullptr ? max(p.first_block[b], 0) : 0;
  // A full build also zero-fills the blocks past the end so that every output element is written.
  const int end = p.first_block != nullptr ? n_blocks : p.num_blocks;

  const int tid = threadIdx.x;
  const int chunk = tid % kChunks;
  const int row0 = tid / kChunks;
  const T* data = static_cast<const T*>(p.k.data);

  for (int j = begin + blockIdx.y; j < end; j += gridDim.y) {
    const int64_t stat_row = static_cast<int64_t>(bh) * p.num_blocks + j;
    float* centroid = p.stats.centroid + stat_row * kHeadDim;
    float* lo = p.stats.lo + stat_row * kHeadDim;
    float* hi = p.stats.hi + stat_row * kHeadDim;

    if (j >= n_blocks) {  // uniform over the CTA
      for (int d = tid; d < kHeadDim; d += kStatsThreads) {
        centroid[d] = 0.0f;
        lo[d] = 0.0f;
        hi[d] = 0.0f;
      }
      if (tid == 0) {
        p.stats.radius[stat_row] = 0.0f;
        p.stats.spread[stat_row] = 0.0f;
      }
      continue;
    }

    const int n_tokens = min(p.block_size, len - j * p.block_size);
    const T* block_base;
    if (p.k.block_table == nullptr) {
      block_base = data + b * p.k.stride_seq + h * p.k.stride_head +
                   static_cast<int64_t>(j) * p.block_size * p.k.stride_token;
    } else {
      const int64_t page = p.k.block_table[b * p.k.block_table_stride + j];
      block_base = data + page * p.k.stride_seq + h * p.k.stride_head;
    }
    const T* chunk_base = block_base + chunk * 8;

    // Pass 1: channel sums, minima and maxima over this thread's rows.
    float sum[8], mn[8], mx[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      sum[i] = 0.0f;
      mn[i] = INFINITY;
      mx[i] = -INFINITY;
    }
#pragma unroll 4
    for (int t = row0; t < n_tokens; t += kRowsPerPass) {
      float x[8];
      load8_as_float(chunk_base + t * p.k.stride_token, x);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        sum[i] += x[i];
        mn[i] = fminf(mn[i], x[i]);
        mx[i] = fmaxf(mx[i], x[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      s_sum[row0][chunk * 8 + i] = sum[i];
      s_lo[row0][chunk * 8 + i] = mn[i];
      s_hi[row0][chunk * 8 + i] = mx[i];
    }
    __syncthreads();
    const float inv_n = 1.0f / static_cast<float>(n_tokens);
    for (int d = tid; d < kHeadDim; d += kStatsThreads) {
      float total = 0.0f, dmin = INFINITY, dmax = -INFINITY;
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        total += s_sum[r][d];
        dmin = fminf(dmin, s_lo[r][d]);
        dmax = fmaxf(dmax, s_hi[r][d]);
      }
      const float mean = total * inv_n;
      s_mean[d] = mean;
      centroid[d] = mean;
      lo[d] = dmin;
      hi[d] = dmax;
    }
    __syncthreads();

    // Pass 2: squared distance of every key to the float32 mean.
    float mean[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) mean[i] = s_mean[chunk * 8 + i];
    float max_sq = 0.0f, sum_sq = 0.0f;
    for (int t0 = 0; t0 < n_tokens; t0 += kRowsPerPass) {  // uniform trip count: shuffles below
      const int t = t0 + row0;
      float sq = 0.0f;
      if (t < n_tokens) {
        float x[8];
        load8_as_float(chunk_base + t * p.k.stride_token, x);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float diff = x[i] - mean[i];
          sq = fmaf(diff, diff, sq);
        }
      }
#pragma unroll
      for (int offset = kChunks / 2; offset > 0; offset >>= 1) {
        sq += __shfl_xor_sync(kFullMask, sq, offset);
      }
      if (t < n_tokens && chunk == 0) {
        max_sq = fmaxf(max_sq, sq);
        sum_sq += sq;
      }
    }
    const float block_max_sq = block_reduce(max_sq, s_reduce, MaxOp());
    const float block_sum_sq = block_reduce(sum_sq, s_reduce, SumOp());
    if (tid == 0) {
      p.stats.radius[stat_row] = sqrtf(block_max_sq);
      p.stats.spread[stat_row] = block_sum_sq * inv_n;
    }
    __syncthreads();  // s_sum / s_mean are rewritten by the next block
  }
}

// Launch for one (dtype, head_dim); the caller has validated the params.
template <typename T, int kHeadDim>
cudaError_t launch_block_stats(const BlockStatsParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (heads == 0 || p.num_blocks == 0) return cudaSuccess;
  int64_t slices = 0;
  AETHER_CUDA_TRY(block_build_slices(p.num_blocks, heads, p.first_block != nullptr, &slices));
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(slices));
  return launch_kernel(block_stats_kernel<T, kHeadDim>, dim3(grid), dim3(kStatsThreads), 0, stream, p);
}

}  // namespace cuda
}  // namespace aether
