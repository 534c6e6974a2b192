// Key codes and refine scores: the second stage of two-stage selection (KeyCodesParams and
// RefineScoresParams in params.h).
//
// 1. key_codes_kernel<T>, grid (batch * kv_heads, slices), 256 threads: one CTA rebuilds one group
//    (Pg * block_size <= 128 tokens) at a time. The group's keys are staged in shared memory as
//    float32 with independent 16-byte loads (the first version read each channel's tokens from
//    global memory in a loop: a chain of 128 L2 latencies, 28 us for an append at 8 x 32k on the
//    H200); a thread per channel takes its min / max, rounds them to bf16 and publishes lo and
//    step; then a thread per (token, code byte) quantises the byte's 8 / bits channels (division
//    and rint as the CPU kernel: bit-identical codes). A group is always
//    rebuilt from all of its tokens, so an append (first_block set) equals a full build; the
//    append only launches enough CTAs to fill the GPU once (block_build_slices).
// 2. refine_scores_kernel<T, kHeadDim>, grid (batch * kv_heads, slices), 256 threads: one wave of
//    CTAs whose warps stride over the candidate list, a warp per entry at a time; the CTA stages
//    its group's queries in shared memory, and a warp reads the block ids of its next 32 entries
//    with one load per lane. Lane l owns channels [l C, l C + C), C = D / 32, so its codes of one
//    token are C * bits <= 32 contiguous bits of one aligned 32-bit word and a token row is one
//    coalesced read per warp; a block's ranges and its first 16 tokens' words are loaded together
//    (one memory latency per entry). Per query head the lane folds the group's ranges into
//    base = sum_c q_c lo_c and w_c = q_c step_c, so a token costs C FMAs per head; codes are
//    converted to float exactly by the 2^23 mantissa trick (no I2F), and two heads x 16 tokens of
//    partial dot products are summed over the warp with one reduce-scatter (31 shuffles instead of
//    160; lane l ends with head l / 16, token l % 16); a 16-lane max and sum give each head's chunk
//    log-sum-exp, merged into its running one. History (30% candidates at 8 x 32k, 16-token blocks,
//    H200, ncu): a CTA per 8 entries with a warp sum, an exp and a load per token, 171 us (a latency
//    chain per warp, 16k CTAs mostly retiring at once); one wave of striding warps, 140 us; with
//    4 heads x 8 tokens per reduce-scatter at 128 registers (fewer resident warps), 224 us: the
//    kernel is bound by the memory latency per entry (block id, then ranges and codes), so what
//    counts is how many entries are in flight per SM; this design (80 registers, 24 warps per SM),
//    127 us. Even so it is far from its bytes (~5 us): a candidate token costs G x D = 512 FMAs
//    on the CUDA cores (~20 M warp instructions in all), so the next step is tensor cores (codes
//    are small integers, exact in bf16; an m16n8k16 MMA per 16 tokens and 8 heads), and the
//    radar_score pass that only copies the given scores into group scores (28 us) before the
//    second select.
//    (radar_select given equal scores selects identically; tests compare scores with a tolerance).
//    Bytes read per candidate token: D * bits / 8 (+ 4D range bytes per group and candidate).
#pragma once

#include <cmath>

#include "aether/cuda/common.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kCodesThreads = 256;
constexpr int kRefineThreads = 256;
constexpr int kRefineWarps = kRefineThreads / kWarpSize;
constexpr int kRefineChunk = 16;  // tokens per chunk; two heads x 16 tokens = one 32-value reduce-scatter
constexpr int kMaxGroupTokens = 128;

// Dynamic shared memory of the build kernel: the group's keys as float32 [tokens][D], lo and step [D].
inline size_t key_codes_smem_bytes(int group_tokens, int head_dim) {
  return sizeof(float) * (static_cast<size_t>(group_tokens) * head_dim + 2 * static_cast<size_t>(head_dim));
}

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
  extern __shared__ __align__(16) float s_codes_dyn[];
  const int D = p.head_dim;
  const int bits = p.bits;
  const int levels = (1 << bits) - 1;
  const int per_byte = 8 / bits;
  const int token_bytes = D * bits / 8;
  const int P = p.blocks_per_group;
  const int gt = P * p.block_size;  // tokens of a group
  float* s_keys = s_codes_dyn;      // [gt][D]
  float* s_lo = s_keys + gt * D;    // [D]
  float* s_step = s_lo + D;         // [D]
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
  const int chunks = D / 8;

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
    // Stage the group's keys: 16-byte vector loads, all independent (one latency, not n).
    for (int i = tid; i < n * chunks; i += kCodesThreads) {
      const int t = i / chunks, c = i % chunks;
      float x[8];
      load8_as_float(codes_key_row<T>(p, b, h, m, t) + c * 8, x);
#pragma unroll
      for (int e = 0; e < 8; ++e) s_keys[t * D + c * 8 + e] = x[e];
    }
    __syncthreads();
    for (int d = tid; d < D; d += kCodesThreads) {
      float mn = INFINITY, mx = -INFINITY;
#pragma unroll 8
      for (int t = 0; t < n; ++t) {
        mn = fminf(mn, s_keys[t * D + d]);
        mx = fmaxf(mx, s_keys[t * D + d]);
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
        for (int e = 0; e < per_byte; ++e) {
          const int d = first + e;
          const float step = s_step[d];
          if (!(step > 0.0f)) continue;
          const float level = rintf(__fdiv_rn(__fsub_rn(s_keys[t * D + d], s_lo[d]), step));
          byte |= static_cast<unsigned>(fminf(fmaxf(level, 0.0f), static_cast<float>(levels))) << (e * bits);
        }
      }
      codes[i] = static_cast<uint8_t>(byte);
    }
    __syncthreads();  // s_keys, s_lo and s_step are rewritten by the next group
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kRefineThreads, 3) refine_scores_kernel(const RefineScoresParams p) {
  constexpr int kC = kHeadDim / kWarpSize;  // channels per lane: 2, 4 or 8
  extern __shared__ float s_q[];            // [G][kHeadDim]: the group's queries, float32
  const int item = blockIdx.x;              // (b, kv head)
  const int b = item / p.kv_heads;
  const int h = item % p.kv_heads;
  const int lane = threadIdx.x % kWarpSize;
  const int G = p.q_heads / p.kv_heads;
  {
    const T* q_group = static_cast<const T*>(p.q) + b * p.q_stride_batch + static_cast<int64_t>(h) * G * p.q_stride_head;
    for (int x = threadIdx.x; x < G * kHeadDim; x += kRefineThreads) {
      s_q[x] = to_float(q_group[static_cast<int64_t>(x / kHeadDim) * p.q_stride_head + x % kHeadDim]);
    }
  }
  __syncthreads();
  const int L = p.list_length;
  const int count = min(max(p.num_candidates[item], 0), L);
  const int bs = p.block_size;
  const int len = max(p.seq_lens[b], 0);
  const int NB = p.num_blocks;
  const int n_blocks = min((len + bs - 1) / bs, min(NB, L));
  const int bits = p.bits;
  const unsigned mask = (1u << bits) - 1u;
  const float levels = static_cast<float>(mask);
  const int token_bytes = kHeadDim * bits / 8;
  const int d0 = lane * kC;
  const int bit = d0 * bits;  // the lane's first bit in a token row; C * bits <= 32 bits, aligned
  const int word = bit / 32;
  const int shift = bit % 32;
  const int lane_head = lane / kRefineChunk;  // after the reduce-scatter: this lane's head of the pair
  const int tok = lane % kRefineChunk;         // ... and its token of the chunk
  const int32_t* list = p.candidates + static_cast<int64_t>(item) * L;
  const int stride = gridDim.y * kRefineWarps;  // warps stride over the list

  for (int i0 = blockIdx.y * kRefineWarps + threadIdx.x / kWarpSize; i0 < count; i0 += kWarpSize * stride) {
    // The block ids of this warp's next 32 entries, one load per lane (not one latency per entry).
    const int mine = i0 + lane * stride;
    const int my_j = mine < count ? list[mine] : -1;
    for (int k = 0; k < kWarpSize && i0 + k * stride < count; ++k) {
      const int j = __shfl_sync(kFullMask, my_j, k);
      if (j < 0 || j >= n_blocks) continue;  // padding or past the end: nothing to score (uniform)
      const int n = min(bs, len - j * bs);
      const uint16_t* lo_bits =
          p.ranges + (static_cast<int64_t>(item) * (NB / p.blocks_per_group) + j / p.blocks_per_group) * 2 * kHeadDim;
      const uint8_t* block_codes = p.codes + (static_cast<int64_t>(item) * NB + j) * bs * token_bytes;
      // The ranges and the first chunk's code words are independent loads: one latency.
      unsigned words[kRefineChunk];
#pragma unroll
      for (int e = 0; e < kRefineChunk; ++e) {
        words[e] = e < n ? __ldg(reinterpret_cast<const unsigned*>(block_codes + static_cast<int64_t>(e) * token_bytes) +
                                 word) >> shift
                         : 0u;
      }
      float lo[kC], step[kC];
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        lo[c] = __bfloat162float(__ushort_as_bfloat16(__ldg(lo_bits + d0 + c)));
        const float hi = __bfloat162float(__ushort_as_bfloat16(__ldg(lo_bits + kHeadDim + d0 + c)));
        step[c] = __fdiv_rn(__fsub_rn(hi, lo[c]), levels);
      }

      for (int g0 = 0; g0 < G; g0 += 2) {  // two heads per pass: 2 x 16 values, one reduce-scatter
        float base[2], w[2][kC];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const bool real = g0 + u < G;  // an odd G leaves the second head of the last pair empty
          const float* qg = s_q + (real ? g0 + u : g0) * kHeadDim + d0;
          base[u] = 0.0f;
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            const float qc = real ? qg[c] : 0.0f;
            base[u] = fmaf(qc, lo[c], base[u]);
            w[u][c] = qc * step[c];
          }
        }
        float top = -INFINITY, sum = 0.0f;  // this lane's head (g0 + lane_head): running log-sum-exp
        for (int t0 = 0; t0 < n; t0 += kRefineChunk) {
          if (t0 > 0 || g0 > 0) {  // later chunks, and the first again for later heads (L1 hits)
#pragma unroll
            for (int e = 0; e < kRefineChunk; ++e) {
              words[e] = t0 + e < n ? __ldg(reinterpret_cast<const unsigned*>(
                                                block_codes + static_cast<int64_t>(t0 + e) * token_bytes) + word) >> shift
                                    : 0u;
            }
          }
          float part[2 * kRefineChunk];
#pragma unroll
          for (int e = 0; e < kRefineChunk; ++e) {
            // Each code converted exactly by OR-ing it into the mantissa of 2^23 and subtracting
            // 2^23: a LOP3 and an FADD instead of an I2F (quarter rate).
            float code[kC];
#pragma unroll
            for (int c = 0; c < kC; ++c) {
              code[c] = __uint_as_float(0x4B000000u | ((words[e] >> (c * bits)) & mask)) - 8388608.0f;
            }
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              float x = base[u];
#pragma unroll
              for (int c = 0; c < kC; ++c) x = fmaf(w[u][c], code[c], x);
              part[u * kRefineChunk + e] = x;
            }
          }
          warp_reduce_scatter<2 * kRefineChunk>(part, lane);
          const bool valid = t0 + tok < n;
          const float x = valid ? p.scale * part[0] : -INFINITY;
          float chunk_top = x;  // max over the 16 lanes of this head (token t0 is valid: finite)
#pragma unroll
          for (int off = kRefineChunk / 2; off > 0; off >>= 1) {
            chunk_top = fmaxf(chunk_top, __shfl_xor_sync(kFullMask, chunk_top, off));
          }
          const float new_top = fmaxf(top, chunk_top);
          float e = valid ? expf(x - new_top) : 0.0f;
#pragma unroll
          for (int off = kRefineChunk / 2; off > 0; off >>= 1) e += __shfl_xor_sync(kFullMask, e, off);
          sum = sum * expf(top - new_top) + e;
          top = new_top;
        }
        if (tok == 0 && g0 + lane_head < G) {
          p.head_scores[(static_cast<int64_t>(b) * p.q_heads + h * G + g0 + lane_head) * L + j] = top + logf(sum);
        }
      }
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_refine_scores(const RefineScoresParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (heads == 0 || p.num_blocks == 0 || p.list_length == 0) return cudaSuccess;
  if (heads > 0x7fffffff) return cudaErrorInvalidValue;
  const int G = p.q_heads / p.kv_heads;
  const size_t smem = sizeof(float) * static_cast<size_t>(G) * kHeadDim;
  auto kernel = refine_scores_kernel<T, kHeadDim>;
  if (smem > 48 * 1024) {
    int optin = 0;
    AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
    if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // G too large
    AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // One wave of resident CTAs whose warps stride over the lists: a CTA per 8 list entries would
  // launch (and mostly retire at once) 16k CTAs at 8 x 32k with 16-token blocks.
  int num_sms = 0, per_sm = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kRefineThreads, smem));
  const int64_t wave = static_cast<int64_t>(num_sms) * std::max(per_sm, 1);
  const int64_t slices = std::min<int64_t>({ceil_div(wave, heads), ceil_div(p.list_length, kRefineWarps), 65535});
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(std::max<int64_t>(slices, 1)));
  kernel<<<grid, kRefineThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_key_codes(const KeyCodesParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int groups = p.num_blocks / p.blocks_per_group;
  if (heads == 0 || groups == 0) return cudaSuccess;
  int64_t slices = 0;
  AETHER_CUDA_TRY(block_build_slices(groups, heads, p.first_block != nullptr, &slices));
  const size_t smem = key_codes_smem_bytes(p.block_size * p.blocks_per_group, p.head_dim);
  auto kernel = key_codes_kernel<T>;
  if (smem > 48 * 1024) {
    AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(slices));
  kernel<<<grid, kCodesThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace aether
