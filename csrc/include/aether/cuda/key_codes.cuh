// Key codes and refine scores: the second stage of two-stage selection (KeyCodesParams and
// RefineScoresParams in params.h).
//
// 1. key_codes_kernel<T>, grid (batch * kv_heads, slices), 128 threads: one CTA rebuilds one group
//    (Pg * block_size <= 128 tokens) at a time. A thread per channel takes the channel's min / max
//    over the group's valid tokens straight from the cache (consecutive threads read consecutive
//    channels of a token row, so the loads coalesce), rounds them to bf16 and publishes lo and
//    step in shared memory; then a thread per (token, code byte) quantises the byte's 8 / bits
//    channels (division and rint as the CPU kernel: bit-identical codes). A group is always
//    rebuilt from all of its tokens, so an append (first_block set) equals a full build; the
//    append only launches enough CTAs to fill the GPU once (block_build_slices).
// 2. refine_scores_kernel<T, kHeadDim>, grid (batch * kv_heads, ceil(L / 8)), 256 threads: a warp
//    per entry of the candidate list (the entries past num_candidates exit at once). Lane l owns
//    channels [l C, l C + C), C = D / 32, so its codes of one token are C * bits <= 32 contiguous
//    bits of one aligned 32-bit word and a token row is one coalesced read per warp. Per query
//    head of the group the lane folds the group's ranges into base = sum_c q_c lo_c and
//    w_c = q_c step_c, so a token costs C FMAs and a 5-step warp sum; an online log-sum-exp over
//    the block's tokens gives the block's log-mass estimate, which lane 0 writes. The scores are
//    float32 sums in another order than the CPU kernel's: they agree to rounding, not bit for bit
//    (radar_select given equal scores selects identically; tests compare scores with a tolerance).
//    Bytes read per candidate token: D * bits / 8 (+ 4D range bytes per group and candidate).
#pragma once

#include <cmath>

#include "aether/cuda/common.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kCodesThreads = 128;
constexpr int kRefineThreads = 256;
constexpr int kRefineWarps = kRefineThreads / kWarpSize;
constexpr int kMaxCodesHeadDim = 256;

template <typename T>
__device__ __forceinline__ const T* codes_key_row(const KeyCodesParams& p, int b, int h, int m, int t) {
  // Token t of group m (Pg blocks): paged, each block of the group is its own page.
  const T* data = static_cast<const T*>(p.k.data);
  const int bs = p.block_size;
  const int64_t token = static_cast<int64_t>(m) * p.blocks_per_group * bs + t;
  if (p.k.block_table == nullptr) {
    return data + b * p.k.stride_seq + h * p.k.stride_head + token * p.k.stride_token;
  }
  const int64_t page = p.k.block_table[b * p.k.block_table_stride + token / bs];
  return data + page * p.k.stride_seq + h * p.k.stride_head + (token % bs) * p.k.stride_token;
}

template <typename T>
__global__ void __launch_bounds__(kCodesThreads) key_codes_kernel(const KeyCodesParams p) {
  __shared__ float s_lo[kMaxCodesHeadDim];
  __shared__ float s_step[kMaxCodesHeadDim];
  const int D = p.head_dim;
  const int bits = p.bits;
  const int levels = (1 << bits) - 1;
  const int per_byte = 8 / bits;
  const int token_bytes = D * bits / 8;
  const int P = p.blocks_per_group;
  const int gt = P * p.block_size;  // tokens of a group
  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int tid = threadIdx.x;
  const int len = max(p.seq_lens[b], 0);
  const int capacity = p.num_blocks / P;  // groups
  const int n_groups = min((len + gt - 1) / gt, capacity);
  const int begin = p.first_block != nullptr ? max(p.first_block[b], 0) / P : 0;
  const int end = p.first_block != nullptr ? n_groups : capacity;
  const int group_bytes = gt * token_bytes;  // the codes of the group's P blocks are contiguous

  for (int m = begin + blockIdx.y; m < end; m += gridDim.y) {
    const int64_t row = static_cast<int64_t>(bh) * capacity + m;
    uint8_t* codes = p.codes + row * group_bytes;
    uint16_t* ranges = p.ranges + row * 2 * D;
    const int n = m < n_groups ? min(gt, len - m * gt) : 0;
    if (n == 0) {  // past the end (full build only): zeros; uniform over the CTA
      for (int i = tid; i < group_bytes; i += kCodesThreads) codes[i] = 0;
      for (int i = tid; i < 2 * D; i += kCodesThreads) ranges[i] = 0;
      continue;
    }
    for (int d = tid; d < D; d += kCodesThreads) {
      float mn = INFINITY, mx = -INFINITY;
      for (int t = 0; t < n; ++t) {
        const float x = to_float(codes_key_row<T>(p, b, h, m, t)[d]);
        mn = fminf(mn, x);
        mx = fmaxf(mx, x);
      }
      const __nv_bfloat16 lo = __float2bfloat16_rn(mn);
      const __nv_bfloat16 hi = __float2bfloat16_rn(mx);
      ranges[d] = __bfloat16_as_ushort(lo);
      ranges[D + d] = __bfloat16_as_ushort(hi);
      s_lo[d] = __bfloat162float(lo);
      s_step[d] = __fdiv_rn(__fsub_rn(__bfloat162float(hi), __bfloat162float(lo)), static_cast<float>(levels));
    }
    __syncthreads();
    for (int i = tid; i < group_bytes; i += kCodesThreads) {
      const int t = i / token_bytes;
      const int first = (i % token_bytes) * per_byte;  // first channel of this byte
      unsigned byte = 0;
      if (t < n) {
        const T* key = codes_key_row<T>(p, b, h, m, t);
        for (int e = 0; e < per_byte; ++e) {
          const int d = first + e;
          const float step = s_step[d];
          if (!(step > 0.0f)) continue;
          const float level = rintf(__fdiv_rn(__fsub_rn(to_float(key[d]), s_lo[d]), step));
          byte |= static_cast<unsigned>(fminf(fmaxf(level, 0.0f), static_cast<float>(levels))) << (e * bits);
        }
      }
      codes[i] = static_cast<uint8_t>(byte);
    }
    __syncthreads();  // s_lo and s_step are rewritten by the next group
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kRefineThreads) refine_scores_kernel(const RefineScoresParams p) {
  constexpr int kC = kHeadDim / kWarpSize;  // channels per lane: 2, 4 or 8
  const int item = blockIdx.x;              // (b, kv head)
  const int b = item / p.kv_heads;
  const int h = item % p.kv_heads;
  const int lane = threadIdx.x % kWarpSize;
  const int NB = p.num_blocks;
  const int L = p.list_length;
  const int i = blockIdx.y * kRefineWarps + threadIdx.x / kWarpSize;
  const int count = min(max(p.num_candidates[item], 0), L);
  if (i >= count) return;  // uniform over the warp
  const int j = p.candidates[static_cast<int64_t>(item) * L + i];
  const int bs = p.block_size;
  const int len = max(p.seq_lens[b], 0);
  const int n_blocks = min((len + bs - 1) / bs, NB);
  if (j < 0 || j >= n_blocks || j >= L) return;  // padding or past the end: nothing to score
  const int n = min(bs, len - j * bs);
  const int bits = p.bits;
  const unsigned mask = (1u << bits) - 1u;
  const int token_bytes = kHeadDim * bits / 8;
  const int d0 = lane * kC;

  const uint16_t* lo_bits = p.ranges + ((static_cast<int64_t>(item) * (NB / p.blocks_per_group)) + j / p.blocks_per_group) * 2 * kHeadDim;
  float lo[kC], step[kC];
  const float levels = static_cast<float>(mask);
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    lo[c] = __bfloat162float(__ushort_as_bfloat16(lo_bits[d0 + c]));
    const float hi = __bfloat162float(__ushort_as_bfloat16(lo_bits[kHeadDim + d0 + c]));
    step[c] = __fdiv_rn(__fsub_rn(hi, lo[c]), levels);
  }
  const uint8_t* block_codes = p.codes + (static_cast<int64_t>(item) * NB + j) * bs * token_bytes;
  const int bit = d0 * bits;  // the lane's first bit in a token row; C * bits <= 32 bits, aligned
  const int word = bit / 32;
  const int shift = bit % 32;
  const int G = p.q_heads / p.kv_heads;
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_stride_batch;

  for (int g = 0; g < G; ++g) {
    const int head = h * G + g;
    const T* qg = q_base + static_cast<int64_t>(head) * p.q_stride_head + d0;
    float base = 0.0f, w[kC];
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const float qc = to_float(qg[c]);
      base = fmaf(qc, lo[c], base);
      w[c] = qc * step[c];
    }
    float top = -INFINITY, sum = 0.0f;
    for (int t = 0; t < n; ++t) {
      const unsigned bits_row =
          __ldg(reinterpret_cast<const unsigned*>(block_codes + static_cast<int64_t>(t) * token_bytes) + word) >> shift;
      float part = base;
#pragma unroll
      for (int c = 0; c < kC; ++c) part = fmaf(w[c], static_cast<float>((bits_row >> (c * bits)) & mask), part);
      const float x = p.scale * warp_sum(part);
      if (x > top) {
        sum = sum * expf(top - x) + 1.0f;
        top = x;
      } else {
        sum += expf(x - top);
      }
    }
    if (lane == 0) p.head_scores[(static_cast<int64_t>(b) * p.q_heads + head) * L + j] = top + logf(sum);
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_refine_scores(const RefineScoresParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (heads == 0 || p.num_blocks == 0 || p.list_length == 0) return cudaSuccess;
  const int64_t chunks = ceil_div(p.list_length, kRefineWarps);
  if (chunks > 65535 || heads > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(chunks));
  refine_scores_kernel<T, kHeadDim><<<grid, kRefineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_key_codes(const KeyCodesParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int groups = p.num_blocks / p.blocks_per_group;
  if (heads == 0 || groups == 0) return cudaSuccess;
  int64_t slices = 0;
  AETHER_CUDA_TRY(block_build_slices(groups, heads, p.first_block != nullptr, &slices));
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(slices));
  key_codes_kernel<T><<<grid, kCodesThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace aether
