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
#include "aether/cuda/mma.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kCodesThreads = 256;
constexpr int kRefineThreads = 256;
constexpr int kRefineWarps = kRefineThreads / kWarpSize;
constexpr int kRefineTile = 16;    // tokens per MMA tile (the m of m16n8k16)
constexpr int kRefineStages = 4;   // tiles in flight per warp (cp.async ring)

// Shared memory of refine_scores: the group's queries as float32, then per warp kRefineStages
// stages of one tile's codes and one group's bf16 ranges.
__host__ __device__ inline size_t refine_query_smem_bytes(int group, int head_dim) {
  return sizeof(float) * static_cast<size_t>(group) * head_dim;
}
__host__ __device__ inline size_t refine_stage_bytes(int head_dim, int bits) {
  return static_cast<size_t>(kRefineTile) * head_dim * bits / 8 + 4 * static_cast<size_t>(head_dim);
}
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

// Two codes of one token at bit `shift` of `word` (channels c, c + 1) as a bf16 pair: OR-ing a code
// into the mantissa of 128.0 gives 128 + code exactly (codes < 128), and one packed subtraction
// leaves the code (no integer-to-float conversions).
template <int kBits>
__device__ __forceinline__ uint32_t code_pair(uint32_t word, int shift) {
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  const uint32_t x = word >> shift;
  const uint32_t biased = (x & kMask) | ((x << (16 - kBits)) & (kMask << 16)) | 0x43004300u;
  const __nv_bfloat162 v = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                                   __floats2bfloat162_rn(128.0f, 128.0f));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// (max, sum of exp) pairs merged, -inf maxima (no valid token yet) included.
__device__ __forceinline__ void merge_log_sum(float& top, float& sum, float other_top, float other_sum) {
  const float t = fmaxf(top, other_top);
  if (t == -INFINITY) return;
  sum = (top == -INFINITY ? 0.0f : sum * expf(top - t)) + (other_top == -INFINITY ? 0.0f : other_sum * expf(other_top - t));
  top = t;
}

template <typename T, int kHeadDim, int kBits>
__device__ __forceinline__ void refine_scores_warp(const RefineScoresParams& p, const float* s_q, char* s_warp,
                                                   int* s_j, int* s_new_group, int item, int warp_id, int num_warps) {
  constexpr int kSteps = kHeadDim / 16;                 // m16n8k16 k-steps over the channels
  constexpr int kTokenBytes = kHeadDim * kBits / 8;     // one token's codes
  constexpr int kTileBytes = kRefineTile * kTokenBytes; // 16 tokens
  constexpr int kRangeBytes = 2 * kHeadDim * 2;         // bf16 lo[D], hi[D] of one group
  constexpr int kStageBytes = kTileBytes + kRangeBytes;
  constexpr int kWordsPerStep = kBits / 2;              // 32-bit words of 16 channels of one token
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4;  // MMA group: token rows g, g + 8 of A; column g of B
  const int t = lane % 4;
  const int b = item / p.kv_heads;
  const int h = item % p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  const int L = p.list_length;
  const int count = min(max(p.num_candidates[item], 0), L);
  const int bs = p.block_size;
  const int tiles = bs / kRefineTile;
  const int len = max(p.seq_lens[b], 0);
  const int NB = p.num_blocks;
  const int n_blocks = min((len + bs - 1) / bs, min(NB, L));
  const float levels = static_cast<float>((1u << kBits) - 1u);
  // This warp's contiguous slice of the list: consecutive candidates mostly share a group, whose
  // weights are then built once.
  const int per = (count + num_warps - 1) / num_warps;
  const int begin = min(count, warp_id * per);
  const int end = min(count, begin + per);
  const int units_begin = begin * tiles, units_end = end * tiles;  // a unit = one 16-token tile
  if (units_begin >= units_end) return;
  const int32_t* list = p.candidates + static_cast<int64_t>(item) * L;
  const int groups = NB / p.blocks_per_group;
  const uint8_t* item_codes = p.codes + static_cast<int64_t>(item) * NB * bs * kTokenBytes;
  const uint16_t* item_ranges = p.ranges + static_cast<int64_t>(item) * groups * 2 * kHeadDim;

  for (int quad = 0; quad * 4 < G; ++quad) {  // 4 heads per pass (8 MMA columns: high and residual parts)
    // Block ids of the list read 32 at a time, one load per lane; the copies of a stage are issued
    // kRefineStages - 1 units ahead of its use.
    int window = begin;
    int my_j = begin + lane < end ? list[begin + lane] : -1;
    int issued_group = -1;
    auto issue = [&](int unit, int stage) {
      if (unit < units_end) {
        const int e = unit / tiles, tile = unit % tiles;
        if (e >= window + kWarpSize) {  // uniform: e only grows
          window = e;
          my_j = e + lane < end ? list[e + lane] : -1;
        }
        const int j = __shfl_sync(kFullMask, my_j, e - window);
        const bool valid = j >= 0 && j < n_blocks;
        char* dst = s_warp + stage * kStageBytes;
        if (valid) {
          const int n = min(bs, len - j * bs) - tile * kRefineTile;  // valid tokens of the tile (may be <= 0)
          const uint8_t* src = item_codes + (static_cast<int64_t>(j) * bs + tile * kRefineTile) * kTokenBytes;
          for (int c = lane; c < kTileBytes / 16; c += kWarpSize) {
            const int token = c * 16 / kTokenBytes;
            cp_async_16(shared_address(dst + c * 16), src + c * 16, token < n ? 16u : 0u);
          }
          const int group = j / p.blocks_per_group;
          const bool fresh = group != issued_group;  // the ranges travel with the group's first tile
          if (fresh) {
            const uint16_t* ranges = item_ranges + static_cast<int64_t>(group) * 2 * kHeadDim;
            for (int c = lane; c < kRangeBytes / 16; c += kWarpSize) {
              cp_async_16(shared_address(dst + kTileBytes + c * 16), reinterpret_cast<const char*>(ranges) + c * 16, 16u);
            }
            issued_group = group;
          }
          if (lane == 0) {
            s_j[stage] = j;
            s_new_group[stage] = fresh;
          }
        } else if (lane == 0) {
          s_j[stage] = -1;
        }
      }
      cp_async_commit();
    };

    for (int s = 0; s < kRefineStages - 1; ++s) issue(units_begin + s, s);
    // B fragments: w = q * step of channel k, head 4 quad + (g & 3); columns 0-3 its bf16 rounding,
    // columns 4-7 the residual, so high + residual carry ~16 mantissa bits of w.
    uint32_t bfrag[kSteps][2];
    float base_a = 0.0f, base_b = 0.0f;  // sum_c q_c lo_c of this lane's output heads 2 (t & 1) (+1)
    const int head_ha = quad * 4 + 2 * (t & 1);
    float top_a = -INFINITY, sum_a = 0.0f, top_b = -INFINITY, sum_b = 0.0f;
    for (int unit = units_begin; unit < units_end; ++unit) {
      const int rel = unit - units_begin;
      issue(unit + kRefineStages - 1, (rel + kRefineStages - 1) % kRefineStages);
      cp_async_wait<kRefineStages - 1>();
      __syncwarp();
      const int stage = rel % kRefineStages;
      const char* src = s_warp + stage * kStageBytes;
      const int j = s_j[stage];
      const int tile = unit % tiles;
      if (j >= 0) {
        if (s_new_group[stage]) {
          const uint16_t* lo_bits = reinterpret_cast<const uint16_t*>(src + kTileBytes);
          const int head = quad * 4 + (g & 3);
          const bool real = head < G;
          const float* q = s_q + (real ? head : 0) * kHeadDim;
          float base = 0.0f;
#pragma unroll
          for (int s = 0; s < kSteps; ++s) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int c = 16 * s + 2 * t + 8 * half;
              float w[2];
#pragma unroll
              for (int u = 0; u < 2; ++u) {
                const float lo = __bfloat162float(__ushort_as_bfloat16(lo_bits[c + u]));
                const float hi = __bfloat162float(__ushort_as_bfloat16(lo_bits[kHeadDim + c + u]));
                const float step = __fdiv_rn(__fsub_rn(hi, lo), levels);
                const float qc = real ? q[c + u] : 0.0f;
                base = fmaf(qc, lo, base);
                w[u] = qc * step;
              }
              const __nv_bfloat162 high = __floats2bfloat162_rn(w[0], w[1]);
              const float2 hf = __bfloat1622float2(high);
              const __nv_bfloat162 part = g < 4 ? high : __floats2bfloat162_rn(w[0] - hf.x, w[1] - hf.y);
              bfrag[s][half] = *reinterpret_cast<const uint32_t*>(&part);
            }
          }
          base += __shfl_xor_sync(kFullMask, base, 1);  // lanes 4g .. 4g + 3 hold the channels' quarters
          base += __shfl_xor_sync(kFullMask, base, 2);
          base_a = __shfl_sync(kFullMask, base, 4 * (2 * (t & 1)));
          base_b = __shfl_sync(kFullMask, base, 4 * (2 * (t & 1) + 1));
        }
        // A fragments from the staged codes: rows g and g + 8 of the tile, channels 2t, 2t + 1
        // (+ 8) of each k-step. Two accumulators halve the chain of dependent MMAs.
        const uint32_t* row0 = reinterpret_cast<const uint32_t*>(src + g * kTokenBytes);
        const uint32_t* row1 = reinterpret_cast<const uint32_t*>(src + (g + 8) * kTokenBytes);
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
          uint32_t a[4];
          if (kBits == 2) {  // 16 channels = one word; channel c at bit 2c
            const uint32_t w0 = row0[s], w1 = row1[s];
            a[0] = code_pair<kBits>(w0, 4 * t);
            a[1] = code_pair<kBits>(w1, 4 * t);
            a[2] = code_pair<kBits>(w0, 16 + 4 * t);
            a[3] = code_pair<kBits>(w1, 16 + 4 * t);
          } else {  // 16 channels = two words; channel c at bit 4 (c % 8) of word c / 8
            a[0] = code_pair<kBits>(row0[kWordsPerStep * s], 8 * t);
            a[1] = code_pair<kBits>(row1[kWordsPerStep * s], 8 * t);
            a[2] = code_pair<kBits>(row0[kWordsPerStep * s + 1], 8 * t);
            a[3] = code_pair<kBits>(row1[kWordsPerStep * s + 1], 8 * t);
          }
          mma_16816<__nv_bfloat16>(acc[s & 1], a, bfrag[s][0], bfrag[s][1]);
        }
        float c[4];
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          c[v] = acc[0][v] + acc[1][v];
          c[v] += __shfl_xor_sync(kFullMask, c[v], 2);  // columns 2t (+1) and 2t + 4 (+1): high + residual
        }
        const int n = min(bs, len - j * bs) - tile * kRefineTile;
        const float x[4] = {g < n ? p.scale * (base_a + c[0]) : -INFINITY, g < n ? p.scale * (base_b + c[1]) : -INFINITY,
                            g + 8 < n ? p.scale * (base_a + c[2]) : -INFINITY,
                            g + 8 < n ? p.scale * (base_b + c[3]) : -INFINITY};
        merge_log_sum(top_a, sum_a, fmaxf(x[0], x[2]), 0.0f);  // running maxima first, then the sums
        merge_log_sum(top_b, sum_b, fmaxf(x[1], x[3]), 0.0f);
        sum_a += (x[0] == -INFINITY ? 0.0f : expf(x[0] - top_a)) + (x[2] == -INFINITY ? 0.0f : expf(x[2] - top_a));
        sum_b += (x[1] == -INFINITY ? 0.0f : expf(x[1] - top_b)) + (x[3] == -INFINITY ? 0.0f : expf(x[3] - top_b));
        if (tile == tiles - 1) {  // the block's last tile: reduce over the 8 row groups and write
#pragma unroll
          for (int off = 4; off < kWarpSize; off <<= 1) {
            const float ta = __shfl_xor_sync(kFullMask, top_a, off), sa = __shfl_xor_sync(kFullMask, sum_a, off);
            const float tb = __shfl_xor_sync(kFullMask, top_b, off), sb = __shfl_xor_sync(kFullMask, sum_b, off);
            merge_log_sum(top_a, sum_a, ta, sa);
            merge_log_sum(top_b, sum_b, tb, sb);
          }
          if (g == 0 && t < 2) {
            float* out = p.head_scores + (static_cast<int64_t>(b) * p.q_heads + h * G + head_ha) * L + j;
            if (head_ha < G) out[0] = top_a + logf(sum_a);
            if (head_ha + 1 < G) out[L] = top_b + logf(sum_b);
          }
          top_a = top_b = -INFINITY;
          sum_a = sum_b = 0.0f;
        }
      }
      __syncwarp();  // the stage is refilled by the next iteration's issue
    }
    cp_async_wait<0>();
    __syncwarp();
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kRefineThreads, 2) refine_scores_kernel(const RefineScoresParams p) {
  extern __shared__ __align__(16) char s_mem[];  // queries [G][D] float32, then each warp's stages
  __shared__ int s_j[kRefineWarps][kRefineStages];
  __shared__ int s_new_group[kRefineWarps][kRefineStages];
  float* s_q = reinterpret_cast<float*>(s_mem);
  const int item = blockIdx.x;  // (b, kv head)
  const int b = item / p.kv_heads;
  const int h = item % p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  {
    const T* q_group = static_cast<const T*>(p.q) + b * p.q_stride_batch + static_cast<int64_t>(h) * G * p.q_stride_head;
    for (int x = threadIdx.x; x < G * kHeadDim; x += kRefineThreads) {
      s_q[x] = to_float(q_group[static_cast<int64_t>(x / kHeadDim) * p.q_stride_head + x % kHeadDim]);
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  char* s_warp = s_mem + refine_query_smem_bytes(G, kHeadDim) +
                 static_cast<size_t>(warp) * kRefineStages * refine_stage_bytes(kHeadDim, p.bits);
  const int warp_id = blockIdx.y * kRefineWarps + warp;
  const int num_warps = gridDim.y * kRefineWarps;
  if (p.bits == 2) {
    refine_scores_warp<T, kHeadDim, 2>(p, s_q, s_warp, s_j[warp], s_new_group[warp], item, warp_id, num_warps);
  } else {
    refine_scores_warp<T, kHeadDim, 4>(p, s_q, s_warp, s_j[warp], s_new_group[warp], item, warp_id, num_warps);
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_refine_scores(const RefineScoresParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (heads == 0 || p.num_blocks == 0 || p.list_length == 0) return cudaSuccess;
  if (heads > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.block_size % kRefineTile != 0 || (p.bits != 2 && p.bits != 4)) return cudaErrorInvalidValue;
  const int G = p.q_heads / p.kv_heads;
  const size_t smem = refine_query_smem_bytes(G, kHeadDim) +
                      static_cast<size_t>(kRefineWarps) * kRefineStages * refine_stage_bytes(kHeadDim, p.bits);
  auto kernel = refine_scores_kernel<T, kHeadDim>;
  if (smem > 48 * 1024) {
    int optin = 0;
    AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
    if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // G too large
    AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // One wave of resident CTAs; each warp takes a contiguous slice of its row's list.
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
