// Key sketch kernels: the 4-bit token sketch (key_sketch) and the "qsketch" block score.
//
// 1. key_sketch_kernel<T, kHeadDim>, grid (batch * kv_heads, slices), kSketchThreads threads: one
//    CTA builds one block at a time. The warps split the block's tokens, the lanes a key's
//    channels; each of the R coefficients x_tr = key_proj_h^T k_t is a warp sum. Then R threads
//    take the per-coefficient min / max (bf16, round to nearest even) and all threads quantise
//    and pack two codes per byte. A block is always rebuilt from all of its tokens, so an append
//    (first_block set) equals a full build, as for block_stats.
// 2. sketch_score_kernel<kHeadDim>, grid (batch * kv_heads, slices), kSketchThreads threads: each
//    CTA stages u_g = query_proj_g^T q_g and (centroid weight a != 0) q'_g = q_g - key_proj_h u_g
//    for the G heads of its group in shared memory, then every warp scores one block at a time:
//    the lanes hold the packed codes of tokens lane, lane + 32, ... (one 4-byte word per 8
//    coefficients), and for each head the per-token logits s * (base + sum_r w_r code_tr) (with
//    base = u . lo + a q' . centroid and w_r = u_r step_r) are reduced to a log-sum-exp with a
//    warp max and a warp sum. The score bytes per block are bs * R / 2 codes + 4R range bytes
//    (+ 4D centroid bytes when a != 0): 288 B for a 64-token block at R = 8, 1.8% of its K+V at
//    head_dim 64, 0.9% at 128. It writes the same outputs as radar_score_kernel (group score =
//    max over the heads, per-head scores when asked), so radar_select_kernel selects unchanged.
#pragma once

#include <cmath>

#include "aether/cuda/common.cuh"
#include "aether/cuda/radar_select.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kSketchThreads = 128;
constexpr int kSketchWarps = kSketchThreads / kWarpSize;
constexpr int kMaxSketchBlockSize = 128;  // the API's largest block; sizes the shared buffers
constexpr int kMaxTokensPerLane = kMaxSketchBlockSize / kWarpSize;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSketchThreads)
key_sketch_kernel(const KeySketchParams p) {
  constexpr int kPerLane = kHeadDim / kWarpSize;  // channels per lane
  __shared__ float s_proj[kHeadDim * kMaxSketchRank];            // [D][R]
  __shared__ float s_x[kMaxSketchBlockSize * kMaxSketchRank];    // [bs][R]
  __shared__ float s_lo[kMaxSketchRank], s_step[kMaxSketchRank];

  const int R = p.rank;
  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int len = max(p.seq_lens[b], 0);
  const int n_blocks = min((len + p.block_size - 1) / p.block_size, p.num_blocks);
  const int begin = p.first_block != nullptr ? max(p.first_block[b], 0) : 0;
  const int end = p.first_block != nullptr ? n_blocks : p.num_blocks;
  if (begin + static_cast<int>(blockIdx.y) >= end) return;  // uniform over the CTA

  for (int i = tid; i < kHeadDim * R; i += kSketchThreads) {
    s_proj[i] = p.key_proj[static_cast<int64_t>(h) * kHeadDim * R + i];
  }
  __syncthreads();
  const T* data = static_cast<const T*>(p.k.data);
  const int code_bytes = p.block_size * R / 2;

  for (int j = begin + blockIdx.y; j < end; j += gridDim.y) {
    const int64_t row = static_cast<int64_t>(bh) * p.num_blocks + j;
    uint8_t* codes = p.sketch.codes + row * code_bytes;
    uint16_t* ranges = p.sketch.ranges + row * 2 * R;
    const int n_tokens = j < n_blocks ? min(p.block_size, len - j * p.block_size) : 0;
    if (n_tokens == 0) {  // past the end (full build only): zeros; uniform over the CTA
      for (int i = tid; i < code_bytes; i += kSketchThreads) codes[i] = 0;
      for (int i = tid; i < 2 * R; i += kSketchThreads) ranges[i] = 0;
      continue;
    }
    const T* block_base;
    if (p.k.block_table == nullptr) {
      block_base = data + b * p.k.stride_seq + h * p.k.stride_head +
                   static_cast<int64_t>(j) * p.block_size * p.k.stride_token;
    } else {
      const int64_t page = p.k.block_table[b * p.k.block_table_stride + j];
      block_base = data + page * p.k.stride_seq + h * p.k.stride_head;
    }
    // Coefficients: warp w takes tokens w, w + 4, ...; lane l channels [l * kPerLane, +kPerLane).
    for (int t = warp; t < n_tokens; t += kSketchWarps) {
      float key[kPerLane];
      const T* src = block_base + t * p.k.stride_token + lane * kPerLane;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) key[c] = to_float(src[c]);
      for (int r = 0; r < R; ++r) {
        float partial = 0.0f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) partial = fmaf(key[c], s_proj[(lane * kPerLane + c) * R + r], partial);
        partial = warp_sum(partial);
        if (lane == 0) s_x[t * R + r] = partial;
      }
    }
    __syncthreads();
    if (tid < R) {
      float mn = INFINITY, mx = -INFINITY;
      for (int t = 0; t < n_tokens; ++t) {
        mn = fminf(mn, s_x[t * R + tid]);
        mx = fmaxf(mx, s_x[t * R + tid]);
      }
      const __nv_bfloat16 lo = __float2bfloat16_rn(mn);
      const __nv_bfloat16 hi = __float2bfloat16_rn(mx);
      ranges[tid] = __bfloat16_as_ushort(lo);
      ranges[R + tid] = __bfloat16_as_ushort(hi);
      s_lo[tid] = __bfloat162float(lo);
      s_step[tid] = __fdiv_rn(__fsub_rn(__bfloat162float(hi), __bfloat162float(lo)), static_cast<float>(kSketchLevels));
    }
    __syncthreads();
    auto quantise = [&](int t, int r) -> unsigned {
      const float step = s_step[r];
      if (t >= n_tokens || !(step > 0.0f)) return 0u;
      const float code = rintf(__fdiv_rn(__fsub_rn(s_x[t * R + r], s_lo[r]), step));
      return static_cast<unsigned>(fminf(fmaxf(code, 0.0f), static_cast<float>(kSketchLevels)));
    };
    for (int i = tid; i < code_bytes; i += kSketchThreads) {
      const int t = i / (R / 2);
      const int r = 2 * (i % (R / 2));
      codes[i] = static_cast<uint8_t>(quantise(t, r) | (quantise(t, r + 1) << 4));
    }
    __syncthreads();  // s_x, s_lo, s_step are rewritten by the next block
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_key_sketch(const KeySketchParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (heads == 0 || p.num_blocks == 0) return cudaSuccess;
  // As block_stats: a full build gives every block a CTA, an append only enough to fill the GPU.
  int64_t slices = p.num_blocks;
  if (p.first_block != nullptr) {
    int num_sms = 0;
    AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
    slices = std::min<int64_t>(slices, std::max<int64_t>(1, ceil_div(4 * num_sms, heads)));
  }
  slices = std::min<int64_t>(slices, 65535);
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(slices));
  key_sketch_kernel<T, kHeadDim><<<grid, kSketchThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// qsketch scores.

// Shared memory of the score kernel, in floats: q [G][D], q' [G][D] (a != 0), u [G][R].
inline size_t sketch_score_smem_bytes(int group, int head_dim, bool centroid) {
  return sizeof(float) * (static_cast<size_t>(group) * head_dim * (centroid ? 2 : 1) +
                          static_cast<size_t>(group) * kMaxSketchRank);
}

template <int kHeadDim>
__global__ void __launch_bounds__(kSketchThreads)
sketch_score_kernel(const RadarSelectParams p, const RadarWorkspace ws) {
  constexpr int kPerLane = kHeadDim / kWarpSize;
  extern __shared__ __align__(16) float s_dyn[];
  const int G = p.q_heads / p.kv_heads;
  const int R = p.sketch_rank;
  const bool use_centroid = p.centroid_weight != 0.0f;
  float* s_q = s_dyn;                                            // [G][D]
  float* s_qrest = s_q + G * kHeadDim;                           // [G][D] when use_centroid
  float* s_u = s_qrest + (use_centroid ? G * kHeadDim : 0);      // [G][kMaxSketchRank]

  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int len = p.seq_lens[b];
  const int n_blocks = len <= 0 ? 0 : min((len + p.block_size - 1) / p.block_size, p.num_blocks);
  const int64_t q_head0 = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G;
  const int64_t row0 = static_cast<int64_t>(bh) * p.num_blocks;

  for (int i = tid; i < G * kHeadDim; i += kSketchThreads) {
    const int g = i / kHeadDim, d = i % kHeadDim;
    s_q[i] = load_q_element(p.q, p.dtype, b * p.q_stride_batch + (static_cast<int64_t>(h) * G + g) * p.q_stride_head + d);
  }
  __syncthreads();
  for (int i = tid; i < G * R; i += kSketchThreads) {
    const int g = i / R, r = i % R;
    const float* proj = p.sketch_query_proj + (static_cast<int64_t>(h) * G + g) * kHeadDim * R + r;
    float u = 0.0f;
    for (int d = 0; d < kHeadDim; ++d) u = fmaf(__ldg(proj + d * R), s_q[g * kHeadDim + d], u);
    s_u[g * kMaxSketchRank + r] = u;
  }
  __syncthreads();
  if (use_centroid) {
    for (int i = tid; i < G * kHeadDim; i += kSketchThreads) {
      const int g = i / kHeadDim, d = i % kHeadDim;
      const float* proj = p.sketch_key_proj + (static_cast<int64_t>(h) * kHeadDim + d) * R;
      float projected = 0.0f;
      for (int r = 0; r < R; ++r) projected = fmaf(__ldg(proj + r), s_u[g * kMaxSketchRank + r], projected);
      s_qrest[i] = s_q[i] - projected;
    }
    __syncthreads();
  }

  const int code_bytes = p.block_size * R / 2;
  const int words = R % 8 == 0 ? R / 8 : 0;  // 4-byte words per token (else bytes are read)
  const int n_warps = gridDim.y * kSketchWarps;
  for (int j = blockIdx.y * kSketchWarps + warp; j < p.num_blocks; j += n_warps) {
    if (j >= n_blocks) {  // uniform over the warp
      for (int g = lane; g < G; g += kWarpSize) {
        if (ws.head_scores_out != nullptr) ws.head_scores_out[(q_head0 + g) * p.num_blocks + j] = -INFINITY;
      }
      if (lane == 0) ws.group_scores[row0 + j] = -INFINITY;
      continue;
    }
    const int n_tokens = min(p.block_size, len - j * p.block_size);
    const uint8_t* codes = p.sketch_codes + (row0 + j) * code_bytes;
    const uint16_t* ranges = p.sketch_ranges + (row0 + j) * 2 * R;
    // Lane r < R holds coefficient r's lo and step.
    float lo = 0.0f, step = 0.0f;
    if (lane < R) {
      lo = __bfloat162float(__ushort_as_bfloat16(__ldg(ranges + lane)));
      const float hi = __bfloat162float(__ushort_as_bfloat16(__ldg(ranges + R + lane)));
      step = __fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(kSketchLevels));
    }
    // Packed codes of this lane's tokens (kMaxSketchRank / 2 = 8 bytes = 2 words per token).
    uint32_t packed[kMaxTokensPerLane][kMaxSketchRank / 8];
#pragma unroll
    for (int i = 0; i < kMaxTokensPerLane; ++i) {
      const int t = lane + i * kWarpSize;
#pragma unroll
      for (int w = 0; w < kMaxSketchRank / 8; ++w) packed[i][w] = 0u;
      if (t < n_tokens) {
        const uint8_t* src = codes + t * (R / 2);
        if (words > 0) {
#pragma unroll
          for (int w = 0; w < kMaxSketchRank / 8; ++w) {
            if (w < words) packed[i][w] = __ldg(reinterpret_cast<const uint32_t*>(src) + w);
          }
        } else {  // constant indices only, so that packed stays in registers
#pragma unroll
          for (int byte = 0; byte < kMaxSketchRank / 2; ++byte) {
            if (byte < R / 2) packed[i][byte / 4] |= static_cast<uint32_t>(__ldg(src + byte)) << (8 * (byte % 4));
          }
        }
      }
    }
    float centroid[kPerLane];
    if (use_centroid) {
      const float* src = p.centroid + (row0 + j) * kHeadDim + lane * kPerLane;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) centroid[c] = __ldg(src + c);
    }

    float group = -INFINITY;
    for (int g = 0; g < G; ++g) {
      const float u = lane < R ? s_u[g * kMaxSketchRank + lane] : 0.0f;
      float base = warp_sum(u * lo);
      if (use_centroid) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) dot = fmaf(s_qrest[g * kHeadDim + lane * kPerLane + c], centroid[c], dot);
        base = fmaf(p.centroid_weight, warp_sum(dot), base);
      }
      const float w_lane = u * step;
      float w[kMaxSketchRank];
#pragma unroll
      for (int r = 0; r < kMaxSketchRank; ++r) w[r] = __shfl_sync(kFullMask, w_lane, r);
      float logit[kMaxTokensPerLane];
      float local_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < kMaxTokensPerLane; ++i) {
        float x = base;
#pragma unroll
        for (int r = 0; r < kMaxSketchRank; ++r) {
          if (r < R) x = fmaf(w[r], static_cast<float>((packed[i][r / 8] >> (4 * (r % 8))) & 0xFu), x);
        }
        logit[i] = lane + i * kWarpSize < n_tokens ? p.scale * x : -INFINITY;
        local_max = fmaxf(local_max, logit[i]);
      }
      const float top = warp_max(local_max);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kMaxTokensPerLane; ++i) sum += logit[i] == -INFINITY ? 0.0f : expf(logit[i] - top);
      sum = warp_sum(sum);
      const float score = top + logf(sum);
      if (lane == 0 && ws.head_scores_out != nullptr) ws.head_scores_out[(q_head0 + g) * p.num_blocks + j] = score;
      group = fmaxf(group, score);
    }
    if (lane == 0) ws.group_scores[row0 + j] = group;
  }
}

// grid (batch * kv_heads, slices): about two waves of warps over the blocks, at most one slice
// per kSketchWarps blocks. Sets ws->n_chunks (no M_g partials: qsketch has no bound).
template <int kHeadDim>
cudaError_t launch_sketch_score(const RadarSelectParams& p, RadarWorkspace* ws, cudaStream_t stream) {
  int num_sms = 0, optin = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  const int G = p.q_heads / p.kv_heads;
  const size_t smem = sketch_score_smem_bytes(G, kHeadDim, p.centroid_weight != 0.0f);
  if (smem + 1024 > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // G too large
  auto kernel = sketch_score_kernel<kHeadDim>;
  if (smem > 48 * 1024) {
    AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t heads_kv = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t max_slices = ceil_div(p.num_blocks, kSketchWarps);
  const int64_t wanted = ceil_div(16LL * num_sms, heads_kv);  // ~16 CTAs of 4 warps per SM
  const int64_t slices = std::min<int64_t>(std::max<int64_t>(1, std::min(max_slices, wanted)), 65535);
  ws->n_chunks = static_cast<int32_t>(slices);
  const dim3 grid(static_cast<unsigned>(heads_kv), static_cast<unsigned>(slices));
  kernel<<<grid, kSketchThreads, smem, stream>>>(p, *ws);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace aether
