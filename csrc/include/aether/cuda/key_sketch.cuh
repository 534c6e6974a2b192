// Key sketch kernels: the 4-bit token sketch (key_sketch) and the "qsketch" block score.
//
// 1. key_sketch_kernel<T, kHeadDim>, grid (batch * kv_heads, slices), kSketchThreads threads: one
//    CTA builds one block at a time. The block's keys are staged in shared memory as float32
//    (rows padded by one float against bank conflicts), then each thread computes whole
//    coefficients x_tr = key_proj_h^T k_t (a D-long dot product from shared memory, no shuffles:
//    the first version reduced every coefficient over a warp and was latency-bound, ~40 us for
//    one block per head), a warp per coefficient takes its min / max (bf16, round to nearest
//    even), and all threads quantise and pack two codes per byte. A block is always rebuilt from
//    all of its tokens, so an append (first_block set) equals a full build, as for block_stats.
// 2. sketch_score_kernel<kHeadDim, kRank>, grid (batch * kv_heads, slices), kSketchThreads
//    threads. The CTA stages u_g = query_proj_g^T q_g (8 lanes per output) and, for a centroid
//    weight a != 0, q'_g = q_g - key_proj_h u_g for the G heads of its group. Then 8 lanes
//    score one block (a warp covers 4 consecutive blocks): each lane first loads its share of
//    the block's codes (16-byte vectors) and float32 centroid (a != 0) into registers, then for
//    four heads at a time runs an online log-sum-exp over its tokens of
//    s * (base_g + sum_r w_gr code_tr), base_g = u_g . lo + a q'_g . centroid, w_gr = u_gr step_r,
//    and the 8 lanes merge their (max, sum) pairs with 3 shuffles. History (8 x 32k, H200): a
//    warp per block with warp reductions per head took 121 us, a lane per block with loads in
//    the token loop 45 us (latency chains of 16 dependent loads per lane, 8 warps per SM). The score
//    bytes per block are bs * R / 2 codes + 4R range bytes (+ 4D centroid bytes when a != 0):
//    288 B for a 64-token block at R = 8. It writes the same outputs as radar_score_kernel
//    (group score = max over the heads, per-head scores when asked), so radar_select_kernel
//    selects unchanged.
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

// Dynamic shared memory of the build kernel, in floats: keys [bs][D + 1], key_proj [D][R],
// coefficients [bs][R], lo and step [R].
inline size_t key_sketch_smem_bytes(int block_size, int head_dim, int rank) {
  return sizeof(float) * (static_cast<size_t>(block_size) * (head_dim + 1) + static_cast<size_t>(head_dim) * rank +
                          static_cast<size_t>(block_size) * rank + 2 * kMaxSketchRank);
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSketchThreads)
key_sketch_kernel(const KeySketchParams p) {
  constexpr int kRow = kHeadDim + 1;  // padded key row
  constexpr int kChunks = kHeadDim / 8;
  extern __shared__ __align__(16) float s_dyn[];
  const int R = p.rank;
  float* s_keys = s_dyn;                            // [bs][kRow]
  float* s_proj = s_keys + p.block_size * kRow;     // [D][R]
  float* s_x = s_proj + kHeadDim * R;               // [bs][R]
  float* s_lo = s_x + p.block_size * R;             // [kMaxSketchRank]
  float* s_step = s_lo + kMaxSketchRank;            // [kMaxSketchRank]

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
    for (int i = tid; i < n_tokens * kChunks; i += kSketchThreads) {
      const int t = i / kChunks, c = i % kChunks;
      float x[8];
      load8_as_float(block_base + t * p.k.stride_token + c * 8, x);
#pragma unroll
      for (int e = 0; e < 8; ++e) s_keys[t * kRow + c * 8 + e] = x[e];
    }
    __syncthreads();  // also publishes s_proj on the first block
    for (int pair = tid; pair < n_tokens * R; pair += kSketchThreads) {
      const int t = pair / R, r = pair % R;
      const float* key = s_keys + t * kRow;
      float x = 0.0f;
#pragma unroll 8
      for (int d = 0; d < kHeadDim; ++d) x = fmaf(key[d], s_proj[d * R + r], x);
      s_x[pair] = x;
    }
    __syncthreads();
    for (int r = warp; r < R; r += kSketchWarps) {
      float mn = INFINITY, mx = -INFINITY;
      for (int t = lane; t < n_tokens; t += kWarpSize) {
        mn = fminf(mn, s_x[t * R + r]);
        mx = fmaxf(mx, s_x[t * R + r]);
      }
      mn = -warp_max(-mn);
      mx = warp_max(mx);
      if (lane == 0) {
        const __nv_bfloat16 lo = __float2bfloat16_rn(mn);
        const __nv_bfloat16 hi = __float2bfloat16_rn(mx);
        ranges[r] = __bfloat16_as_ushort(lo);
        ranges[R + r] = __bfloat16_as_ushort(hi);
        s_lo[r] = __bfloat162float(lo);
        s_step[r] = __fdiv_rn(__fsub_rn(__bfloat162float(hi), __bfloat162float(lo)), static_cast<float>(kSketchLevels));
      }
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
    __syncthreads();  // s_keys, s_x, s_lo, s_step are rewritten by the next block
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_key_sketch(const KeySketchParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (heads == 0 || p.num_blocks == 0) return cudaSuccess;
  int64_t slices = 0;  // as block_stats
  AETHER_CUDA_TRY(block_build_slices(p.num_blocks, heads, p.first_block != nullptr, &slices));
  const size_t smem = key_sketch_smem_bytes(p.block_size, kHeadDim, p.rank);
  auto kernel = key_sketch_kernel<T, kHeadDim>;
  if (smem > 48 * 1024) {
    AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(slices));
  kernel<<<grid, kSketchThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// qsketch scores.

// Shared memory of the score kernel, in floats: q [G][D], q' [G][D] (a != 0), u [G][R].
inline size_t sketch_score_smem_bytes(int group, int head_dim, int rank, bool centroid) {
  return sizeof(float) * (static_cast<size_t>(group) * head_dim * (centroid ? 2 : 1) +
                          static_cast<size_t>(group) * rank);
}

constexpr int kSketchHeadTile = 2;  // heads scored per pass over a block's codes (4: 255 registers at R = 8)

template <int kHeadDim, int kRank>
__global__ void __launch_bounds__(kSketchThreads)
sketch_score_kernel(const RadarSelectParams p, const RadarWorkspace ws) {
  constexpr int kTokensPerVec = 32 / kRank;  // tokens per 16-byte vector of codes
  static_assert(kRank >= 2 && kRank <= kMaxSketchRank && (kRank & (kRank - 1)) == 0, "rank: 2, 4, 8 or 16");
  extern __shared__ __align__(16) float s_dyn[];
  const int G = p.q_heads / p.kv_heads;
  const bool use_centroid = p.centroid_weight != 0.0f;
  float* s_q = s_dyn;                                        // [G][D]
  float* s_qrest = s_q + G * kHeadDim;                       // [G][D] when use_centroid
  float* s_u = s_qrest + (use_centroid ? G * kHeadDim : 0);  // [G][kRank]

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
  // u: each output is a D-long dot product split over 8 lanes (uniform trip count: shuffles).
  constexpr int kLanesPerOutput = 8;
  for (int base = 0; base < G * kRank; base += kSketchThreads / kLanesPerOutput) {
    const int o = base + tid / kLanesPerOutput;
    const int sub = tid % kLanesPerOutput;
    float partial = 0.0f;
    if (o < G * kRank) {
      const int g = o / kRank, r = o % kRank;
      const float* proj = p.sketch_query_proj + (static_cast<int64_t>(h) * G + g) * kHeadDim * kRank + r;
#pragma unroll 8
      for (int d = sub; d < kHeadDim; d += kLanesPerOutput) partial = fmaf(__ldg(proj + d * kRank), s_q[g * kHeadDim + d], partial);
    }
#pragma unroll
    for (int offset = kLanesPerOutput / 2; offset > 0; offset >>= 1) partial += __shfl_xor_sync(kFullMask, partial, offset);
    if (o < G * kRank && sub == 0) s_u[o] = partial;
  }
  __syncthreads();
  if (use_centroid) {
    for (int i = tid; i < G * kHeadDim; i += kSketchThreads) {
      const int g = i / kHeadDim, d = i % kHeadDim;
      const float* proj = p.sketch_key_proj + (static_cast<int64_t>(h) * kHeadDim + d) * kRank;
      float projected = 0.0f;
#pragma unroll
      for (int r = 0; r < kRank; ++r) projected = fmaf(__ldg(proj + r), s_u[g * kRank + r], projected);
      s_qrest[i] = s_q[i] - projected;
    }
    __syncthreads();
  }

  // Eight lanes per block, four blocks per warp: every lane preloads its share of the block's
  // codes (and centroid) before any arithmetic, so a lane waits for memory once per block.
  constexpr int kLanesPerBlock = 8;
  constexpr int kBlocksPerWarp = kWarpSize / kLanesPerBlock;
  constexpr int kMaxVecs = (kMaxSketchBlockSize * kRank / 32 + kLanesPerBlock - 1) / kLanesPerBlock;
  constexpr int kCentroidVecs = kHeadDim / 4 / kLanesPerBlock;  // float4 per lane
  const int sub = lane % kLanesPerBlock;
  const int code_bytes = p.block_size * kRank / 2;
  const int n_vecs = code_bytes / 16;
  const int n_spans = (p.num_blocks + kBlocksPerWarp - 1) / kBlocksPerWarp;
  for (int span = blockIdx.y * kSketchWarps + warp; span < n_spans; span += gridDim.y * kSketchWarps) {
    const int j = span * kBlocksPerWarp + lane / kLanesPerBlock;
    const bool active = j < n_blocks;
    if (!active && j < p.num_blocks && sub == 0) {
      for (int g = 0; g < G; ++g) {
        if (ws.head_scores_out != nullptr) ws.head_scores_out[(q_head0 + g) * p.num_blocks + j] = -INFINITY;
      }
      ws.group_scores[row0 + j] = -INFINITY;
    }
    const int n_tokens = active ? min(p.block_size, len - j * p.block_size) : 0;
    const int64_t row = row0 + (active ? j : 0);
    const uint4* codes = reinterpret_cast<const uint4*>(p.sketch_codes + row * code_bytes);
    uint4 vec[kMaxVecs];
#pragma unroll
    for (int i = 0; i < kMaxVecs; ++i) {
      const int v = sub + i * kLanesPerBlock;
      vec[i] = (v < n_vecs && v * kTokensPerVec < n_tokens) ? __ldg(codes + v) : make_uint4(0u, 0u, 0u, 0u);
    }
    float4 cen[kCentroidVecs];
#pragma unroll
    for (int i = 0; i < kCentroidVecs; ++i) {
      cen[i] = (use_centroid && active)
                   ? __ldg(reinterpret_cast<const float4*>(p.centroid + row * kHeadDim) + sub + i * kLanesPerBlock)
                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    const uint16_t* ranges = p.sketch_ranges + row * 2 * kRank;
    float lo[kRank], step[kRank];
#pragma unroll
    for (int r = 0; r < kRank; ++r) {
      lo[r] = active ? __bfloat162float(__ushort_as_bfloat16(__ldg(ranges + r))) : 0.0f;
      const float hi = active ? __bfloat162float(__ushort_as_bfloat16(__ldg(ranges + kRank + r))) : 0.0f;
      step[r] = __fdiv_rn(__fsub_rn(hi, lo[r]), static_cast<float>(kSketchLevels));
    }

    float group = -INFINITY;
    for (int g0 = 0; g0 < G; g0 += kSketchHeadTile) {  // uniform over the warp
      float base[kSketchHeadTile], w[kSketchHeadTile][kRank], m[kSketchHeadTile], sum[kSketchHeadTile];
#pragma unroll
      for (int gg = 0; gg < kSketchHeadTile; ++gg) {
        const int g = min(g0 + gg, G - 1);  // a short last tile repeats a head; not written
        float bsum = 0.0f;
#pragma unroll
        for (int r = 0; r < kRank; ++r) {
          const float u = s_u[g * kRank + r];
          bsum = fmaf(u, lo[r], bsum);
          w[gg][r] = u * step[r];
        }
        base[gg] = bsum;
        m[gg] = -INFINITY;
        sum[gg] = 0.0f;
      }
      if (use_centroid) {
        float dot[kSketchHeadTile];
#pragma unroll
        for (int gg = 0; gg < kSketchHeadTile; ++gg) {
          const float* qr = s_qrest + min(g0 + gg, G - 1) * kHeadDim;
          float acc = 0.0f;
#pragma unroll
          for (int i = 0; i < kCentroidVecs; ++i) {
            const float4 q4 = *reinterpret_cast<const float4*>(qr + 4 * (sub + i * kLanesPerBlock));
            acc = fmaf(q4.x, cen[i].x, fmaf(q4.y, cen[i].y, fmaf(q4.z, cen[i].z, fmaf(q4.w, cen[i].w, acc))));
          }
#pragma unroll
          for (int offset = kLanesPerBlock / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(kFullMask, acc, offset);
          dot[gg] = acc;
        }
#pragma unroll
        for (int gg = 0; gg < kSketchHeadTile; ++gg) base[gg] = fmaf(p.centroid_weight, dot[gg], base[gg]);
      }
#pragma unroll
      for (int i = 0; i < kMaxVecs; ++i) {
        const int v = sub + i * kLanesPerBlock;
        const uint32_t words[4] = {vec[i].x, vec[i].y, vec[i].z, vec[i].w};
#pragma unroll
        for (int tt = 0; tt < kTokensPerVec; ++tt) {
          if (v * kTokensPerVec + tt >= n_tokens) break;
          float code[kRank];
#pragma unroll
          for (int r = 0; r < kRank; ++r) {
            const int nibble = tt * kRank + r;
            code[r] = static_cast<float>((words[nibble / 8] >> (4 * (nibble % 8))) & 0xFu);
          }
#pragma unroll
          for (int gg = 0; gg < kSketchHeadTile; ++gg) {
            float x = base[gg];
#pragma unroll
            for (int r = 0; r < kRank; ++r) x = fmaf(w[gg][r], code[r], x);
            x *= p.scale;
            // Online log-sum-exp; a -inf logit adds nothing (and must not form -inf - -inf).
            if (x > m[gg]) {
              sum[gg] = sum[gg] * expf(m[gg] - x) + 1.0f;
              m[gg] = x;
            } else if (x != -INFINITY) {
              sum[gg] += expf(x - m[gg]);
            }
          }
        }
      }
      // Merge the eight lanes' (max, sum) pairs of each head.
#pragma unroll
      for (int gg = 0; gg < kSketchHeadTile; ++gg) {
#pragma unroll
        for (int offset = kLanesPerBlock / 2; offset > 0; offset >>= 1) {
          const float m_o = __shfl_xor_sync(kFullMask, m[gg], offset);
          const float s_o = __shfl_xor_sync(kFullMask, sum[gg], offset);
          const float top = fmaxf(m[gg], m_o);
          if (top != -INFINITY) {
            sum[gg] = (m[gg] == -INFINITY ? 0.0f : sum[gg] * expf(m[gg] - top)) +
                      (m_o == -INFINITY ? 0.0f : s_o * expf(m_o - top));
            m[gg] = top;
          }
        }
      }
#pragma unroll
      for (int gg = 0; gg < kSketchHeadTile; ++gg) {
        const int g = g0 + gg;
        if (g >= G) break;
        const float score = m[gg] + logf(sum[gg]);
        if (active && sub == 0 && ws.head_scores_out != nullptr) {
          ws.head_scores_out[(q_head0 + g) * p.num_blocks + j] = score;
        }
        group = fmaxf(group, score);
      }
    }
    if (active && sub == 0) ws.group_scores[row0 + j] = group;
  }
}

// grid (batch * kv_heads, slices): a warp scores 4 consecutive blocks (8 lanes each) at a time
// and strides over the spans of its (b, kv_head); slices fill one wave of resident CTAs. (No M_g
// partials: qsketch has no bound, radar_needs_mlo is false).
template <int kHeadDim, int kRank>
cudaError_t launch_sketch_score_rank(const RadarSelectParams& p, RadarWorkspace* ws, cudaStream_t stream) {
  int optin = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  const int G = p.q_heads / p.kv_heads;
  const size_t smem = sketch_score_smem_bytes(G, kHeadDim, kRank, p.centroid_weight != 0.0f);
  if (smem + 1024 > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // G too large
  auto kernel = sketch_score_kernel<kHeadDim, kRank>;
  if (smem > 48 * 1024) {
    AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // One wave of resident CTAs: every CTA recomputes u and q' for its group (G * D * R loads), so
  // more CTAs than fit at once pay that prologue again per wave (measured: 4 waves at 8 x 32k
  // cost 70 us, most of it prologues).
  int num_sms = 0, per_sm = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kSketchThreads, smem));
  const int64_t heads_kv = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t spans = ceil_div(p.num_blocks, 4);  // kBlocksPerWarp
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * num_sms;
  const int64_t slices = std::min<int64_t>(
      std::max<int64_t>(1, std::min(ceil_div(spans, kSketchWarps), ceil_div(resident, heads_kv))), 65535);
  const dim3 grid(static_cast<unsigned>(heads_kv), static_cast<unsigned>(slices));
  kernel<<<grid, kSketchThreads, smem, stream>>>(p, *ws);
  return cudaGetLastError();
}

// One instantiation per head_dim (sketch_score_hd*.cu) covering the ranks 2, 4, 8, 16.
template <int kHeadDim>
cudaError_t launch_sketch_score(const RadarSelectParams& p, RadarWorkspace* ws, cudaStream_t stream) {
  switch (p.sketch_rank) {
    case 2: return launch_sketch_score_rank<kHeadDim, 2>(p, ws, stream);
    case 4: return launch_sketch_score_rank<kHeadDim, 4>(p, ws, stream);
    case 8: return launch_sketch_score_rank<kHeadDim, 8>(p, ws, stream);
    case 16: return launch_sketch_score_rank<kHeadDim, 16>(p, ws, stream);
    default: return cudaErrorInvalidValue;  // ranks are powers of two
  }
}

}  // namespace cuda
}  // namespace aether
