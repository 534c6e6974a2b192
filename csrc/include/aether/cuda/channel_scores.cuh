// The "qcodes" score (CodeChannelsParams and ChannelScoresParams in params.h): per (b, kv head) the
// query's heaviest channels, then every block scored from the channel-major key codes of those
// channels only, the other channels at their group's mid-range.
//
// 1. code_channels_kernel<T>, one CTA of 256 threads per (b, kv head) row. The row's ranges are
//    [NG, 2, D] bf16 (a group's lo row, then its hi row); a thread takes one 16-byte vector of 8
//    channels and a strided slice of the groups (D / 8 vectors per row, 256 / (D / 8) slices), and
//    keeps 8 double partial sums of (hi - lo)^2. A thread per channel looping over all groups
//    would wait one DRAM latency per group (a 32k-token row at 128-token groups: 256 groups); here
//    8 to 32 slices each unrolled by 4 keep 64 to 256 loads in flight per CTA. The slices are then
//    added in shared memory (in double; the order does not matter at double precision: the
//    squares of bf16 differences are exact in double and their sums nearly always are) and
//    w_d = (sum_g q_gd^2) * spread_d. Channel d is chosen iff its rank, the number of channels e
//    with w_e > w_d or w_e == w_d and e < d, is below num_channels (compared as order-preserving
//    integer keys: a total order even with NaN, so exactly num_channels are chosen); a warp ballot
//    and a prefix count over the warps write them ascending.
// 2. channel_scores_kernel<T, kHeadDim>, grid (batch * kv_heads, slices), 128 threads; a CTA
//    takes a contiguous range of its row's 128-token tiles (TG = 128 / group tokens groups each;
//    the slices fill one wave of resident CTAs). Layout read: codes [B, Hkv, NG, D, run] with
//    run = Pg * bs * bits / 8 bytes per channel and group (token t of the group at bit t * bits),
//    ranges [B, Hkv, NG, 2, D]. The CTA first compacts channels[b, h, :] into a list of distinct
//    valid channels and a flag per channel, and stages the G queries as float32. Per tile, the
//    chosen channels' runs and the ranges of its groups arrive by cp.async into a ring of
//    kChannelScoresStages buffers, several tiles ahead of the one scored (only those bytes are
//    read). The tile's runs are transposed in shared memory (byte r of every chosen channel's run
//    side by side) and
//      coef_g,i = 2^bits q_g,d_i step_d_i                                  (chosen channel i)
//      base_g   = sum_d q_gd (chosen_d ? lo_d - 2^bits step_d : (lo_d + hi_d) / 2)
//      logit_gt = scale log2(e) (base_g + sum_i coef_g,i (1 + code_t,i / 2^bits))
//    (1 + code / 2^bits is the code OR-ed into the mantissa of 1.0: no integer-to-float
//    conversion), with a thread per token of the tile: one 16-byte load gives 16 channels' codes
//    of its token, one FMA per (channel, head), heads in passes of 1, 2, 4 or 8 (the coefficients
//    of a channel head-contiguous for one vector load, the same address for the lanes of a group).
//    Each block's log-sum-exp stays in registers: shuffles within the block's lanes (bs <= 32),
//    and for 64- and 128-token blocks the warps' (max, sum) through shared memory; MUFU ex2 / lg2
//    in log2 units. Tiles past the end of the row are not read: their blocks get -inf. No runtime
//    integer division per tile (every size that is divided is a power of two). CUDA cores only.
//    History (H200, 8 x 32k, 32q/8kv, d128, 16-token blocks, 128-token groups, 32 channels, ncu):
//    a thread per (token, channel slice) writing logits to shared memory, then a warp per (block,
//    head) for the log-sum-exp, ~6 barriers per group: 229 us; a thread per token with the
//    log-sum-exp in registers and a 6-stage ring: 194 us, 80 M instructions (the per-tile integer
//    divisions and index arithmetic, a byte load and an I2F per code); this version (transposed
//    codes, no I2F, no per-tile division): 162 us in a CUDA graph, 177 us and 73 M instructions in
//    ncu, issue-bound at ~54% with 16 warps per SM. Precomputing the steps per (group, channel)
//    raised the registers (168 at 3 CTAs per SM) and was slower (202 us). ~1000 instructions per
//    warp and tile against ~560 counted in the source: not explained yet (needs the SASS view of
//    ncu). Bytes read per group:
//    num_channels * run + 4 D (1.5 KB at d128, 32 channels, 2 bits) against D * run for every
//    channel.
#pragma once

#include <cmath>

#include "aether/cuda/common.cuh"
#include "aether/cuda/mma.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kCodeChannelsThreads = 256;
constexpr int kChannelScoresThreads = 128;
constexpr int kChannelScoresWarps = kChannelScoresThreads / kWarpSize;
constexpr int kChannelScoresMaxPass = 8;         // query heads per pass of the token loop
constexpr int kChannelScoresMaxGroupTokens = 128;  // Pg * block_size <= 128 (params.h)
constexpr int kChannelMaxHeadDim = 256;
// Tiles in flight per CTA (cp.async ring). A tile is ~1.5 KB of scattered 32-byte runs and little
// arithmetic: with two stages the kernel waited a DRAM round trip per tile (199 us at 8 x 32k).
constexpr int kChannelScoresStages = 6;
static_assert(kCodeChannelsThreads >= kChannelMaxHeadDim, "code_channels ranks a channel per thread");
static_assert(kChannelScoresThreads == kChannelScoresMaxGroupTokens, "a thread per token of the largest group");

// ---------------------------------------------------------------------------------------------
// code_channels.

template <typename T>
__global__ void __launch_bounds__(kCodeChannelsThreads, 2) code_channels_kernel(const CodeChannelsParams p) {
  pdl_begin();  // before any global read (common.cuh)
  // Partial spreads [slices][D]: slices * D = 8 * threads for every head_dim.
  __shared__ double s_part[8 * kCodeChannelsThreads];
  __shared__ double s_energy[kChannelMaxHeadDim];  // sum_g q_gd^2
  __shared__ unsigned long long s_key[kChannelMaxHeadDim];
  __shared__ int s_count[kCodeChannelsThreads / kWarpSize];
  const int D = p.head_dim;
  const int row = blockIdx.x;
  const int b = row / p.kv_heads;
  const int h = row % p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  const int tid = threadIdx.x;
  const int gt = p.blocks_per_group * p.block_size;
  const int NG = p.num_blocks / p.blocks_per_group;
  const int64_t len = max(p.seq_lens[b], 0);
  const int n_groups = static_cast<int>(std::min<int64_t>((len + gt - 1) / gt, NG));

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + static_cast<int64_t>(h) * G * p.q_stride_head;
  for (int d = tid; d < D; d += kCodeChannelsThreads) {
    double energy = 0.0;
    for (int g = 0; g < G; ++g) {
      const double x = to_float(q[static_cast<int64_t>(g) * p.q_stride_head + d]);
      energy += x * x;  // x * x is exact in double (x has at most 24 significant bits)
    }
    s_energy[d] = energy;
  }

  const int chunks = D / 8;  // 16-byte vectors of a range row
  const int slices = kCodeChannelsThreads / chunks;
  const int c = tid % chunks;
  const int slice = tid / chunks;
  const uint16_t* ranges = p.ranges + static_cast<int64_t>(row) * NG * 2 * D;
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  // kBatch groups' loads issued before any is used (8 16-byte loads in flight per thread, checked
  // in the SASS). Guarded loads (a plain unrolled loop, or `if (m < n_groups)` here) sank to their
  // use: one pair in flight. So every load is unconditional, a group past the end re-reading the
  // last valid group, and its widths are dropped by a select. ptxas also sank them, at 52
  // registers, until the launch bound allowed 128 (2 CTAs of 256 threads per SM).
  constexpr int kBatch = 4;
  for (int m0 = slice; m0 < n_groups; m0 += kBatch * slices) {
    uint4 lo[kBatch], hi[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int m = min(m0 + k * slices, n_groups - 1);
      const uint16_t* group = ranges + static_cast<int64_t>(m) * 2 * D;
      lo[k] = __ldg(reinterpret_cast<const uint4*>(group) + c);
      hi[k] = __ldg(reinterpret_cast<const uint4*>(group + D) + c);
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const bool valid = m0 + k * slices < n_groups;
      const uint32_t lo_w[4] = {lo[k].x, lo[k].y, lo[k].z, lo[k].w};
      const uint32_t hi_w[4] = {hi[k].x, hi[k].y, hi[k].z, hi[k].w};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        // bf16 bits of channel 8c + e (little-endian: the even channel in the low half-word)
        const uint32_t lo_bits = e % 2 == 0 ? lo_w[e / 2] << 16 : lo_w[e / 2] & 0xffff0000u;
        const uint32_t hi_bits = e % 2 == 0 ? hi_w[e / 2] << 16 : hi_w[e / 2] & 0xffff0000u;
        const double width = static_cast<double>(__uint_as_float(hi_bits)) - static_cast<double>(__uint_as_float(lo_bits));
        acc[e] += valid ? width * width : 0.0;
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) s_part[slice * D + c * 8 + e] = acc[e];
  __syncthreads();
  for (int d = tid; d < D; d += kCodeChannelsThreads) {
    double spread = 0.0;
    for (int s = 0; s < slices; ++s) spread += s_part[s * D + d];
    s_key[d] = ordered_key(s_energy[d] * spread);
  }
  __syncthreads();

  const int d = tid;  // D <= threads: one channel per thread
  bool chosen = false;
  if (d < D) {
    const unsigned long long key = s_key[d];
    int rank = 0;
    for (int e = 0; e < D; ++e) {
      const unsigned long long other = s_key[e];
      rank += other > key || (other == key && e < d);
    }
    chosen = rank < p.num_channels;
  }
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const unsigned ballot = __ballot_sync(kFullMask, chosen);
  if (lane == 0) s_count[warp] = __popc(ballot);
  __syncthreads();
  if (chosen) {
    int slot = __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) slot += s_count[w];
    if (slot < p.num_channels) p.channels[static_cast<int64_t>(row) * p.num_channels + slot] = d;
  }
}

template <typename T>
cudaError_t launch_code_channels(const CodeChannelsParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff || p.head_dim % 8 != 0 || p.head_dim > kChannelMaxHeadDim) return cudaErrorInvalidValue;
  return launch_kernel(code_channels_kernel<T>, dim3(static_cast<unsigned>(rows)), dim3(kCodeChannelsThreads), 0,
                       stream, p);
}

// ---------------------------------------------------------------------------------------------
// channel_scores.

// Query heads per pass of the token loop for a group of G heads: G itself up to 2, else 4 or 8.
__host__ __device__ constexpr int channel_scores_pass(int group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : kChannelScoresMaxPass;
}

// Dynamic shared memory of channel_scores, byte offsets of its regions (each 16-byte aligned). A
// tile is 128 tokens, TG = 128 / (group tokens) groups; m = the channel list's length rounded up
// to 16. kChannelScoresStages stages of (the TG groups' chosen runs [TG][num_channels][run], then
// their ranges [TG][2][D] bf16); the scored tile's codes transposed [TG][run byte][m + 16 pad]
// (byte r of every chosen channel's run side by side, so a thread loads 16 channels' codes of its
// token with one vector load); the coefficients [TG][m][Gp] (Gp: G rounded up to a power of two);
// the bases [TG][Gp]; the queries [G][D] float32; the channel list; the flags [D]; the warps'
// log-sum-exp partials of blocks longer than a warp.
struct ChannelScoresSmem {
  int run_bytes = 0;     // one channel's codes of one group
  int tile_groups = 0;   // TG
  int ranges_at = 0;     // in a stage: the runs padded to 16 bytes, then the ranges
  int stage_bytes = 0;
  int channels_padded = 0;  // m
  int tr_stride = 0;        // bytes per transposed row: m + 16 (conflict-free vector loads)
  int heads_padded = 0;     // Gp
  size_t tr = 0, coef = 0, base = 0, q = 0, list = 0, flags = 0, part = 0, total = 0;
};

__host__ __device__ inline size_t round_up_16(size_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

__host__ __device__ inline ChannelScoresSmem channel_scores_smem(int group, int head_dim, int num_channels,
                                                                 int group_tokens, int bits) {
  ChannelScoresSmem s;
  s.run_bytes = group_tokens * bits / 8;
  s.tile_groups = kChannelScoresMaxGroupTokens / group_tokens;
  s.ranges_at = static_cast<int>(round_up_16(static_cast<size_t>(s.tile_groups) * num_channels * s.run_bytes));
  s.stage_bytes = s.ranges_at + s.tile_groups * 4 * head_dim;
  s.channels_padded = (num_channels + 15) / 16 * 16;
  s.tr_stride = s.channels_padded + 16;
  s.heads_padded = next_pow2(group);  // >= the pass: 1, 2, 4, then multiples of 8
  s.tr = kChannelScoresStages * static_cast<size_t>(s.stage_bytes);
  s.coef = s.tr + round_up_16(static_cast<size_t>(s.tile_groups) * s.run_bytes * s.tr_stride);
  s.base = s.coef + round_up_16(sizeof(float) * static_cast<size_t>(s.tile_groups) * s.channels_padded * s.heads_padded);
  s.q = s.base + round_up_16(sizeof(float) * static_cast<size_t>(s.tile_groups) * s.heads_padded);
  s.list = s.q + round_up_16(sizeof(float) * static_cast<size_t>(group) * head_dim);
  s.flags = s.list + round_up_16(sizeof(int) * static_cast<size_t>(num_channels));
  s.part = s.flags + round_up_16(sizeof(int) * static_cast<size_t>(head_dim));
  s.total = s.part + sizeof(float2) * kChannelScoresWarps * kChannelScoresMaxPass;
  return s;
}

template <int kHeads>
__device__ __forceinline__ void load_heads(const float* src, float (&w)[kHeads]) {
  if constexpr (kHeads % 4 == 0) {
#pragma unroll
    for (int v = 0; v < kHeads / 4; ++v) {
      const float4 x = reinterpret_cast<const float4*>(src)[v];
      w[4 * v] = x.x; w[4 * v + 1] = x.y; w[4 * v + 2] = x.z; w[4 * v + 3] = x.w;
    }
  } else if constexpr (kHeads == 2) {
    const float2 x = *reinterpret_cast<const float2*>(src);
    w[0] = x.x; w[1] = x.y;
  } else {
    w[0] = src[0];
  }
}

// What one thread of a tile needs to know about its token.
struct TileToken {
  bool valid;                // a token of the sequence (t < len)
  bool in_row;               // its group exists (< NG): its block's score is written
  int64_t block;             // its block (index within the row)
  int64_t tile_first_block;  // the tile's first block
  int tile_blocks;           // the tile's blocks that exist (< NB)
};

// 1 + code / 2^bits as a float, from a code already in bits 0.. of x: OR-ed into the mantissa of
// 1.0 (exact; no integer-to-float conversion, which runs at a quarter of the FMA rate). The
// coefficients are scaled by 2^bits and the base lowered by their sum to match.
template <int kBits, int kByte>
__device__ __forceinline__ float code_as_float(uint32_t x) {
  constexpr int kShift = 23 - kBits - 8 * kByte;  // code at bit 8 * kByte -> bit 23 - kBits
  constexpr uint32_t kMask = ((1u << kBits) - 1u) << (23 - kBits);
  const uint32_t bits = kShift >= 0 ? x << kShift : x >> -kShift;
  return __uint_as_float((bits & kMask) | 0x3F800000u);
}

// Heads g0 .. g0 + kHeads - 1 of one tile: thread t scores token t from the chosen channels, 16
// channels' codes per vector load of its transposed row, one FMA per (channel, head); in log2
// units. Then each block's log-sum-exp: lanes of one block reduce with shuffles (bs <= 32), longer
// blocks add the warps' partials through shared memory. Called by every thread of the CTA (uniform).
template <int kBits, int kHeads>
__device__ __forceinline__ void channel_scores_tile(const uint8_t* tr_row, int shift, int m_pad, const float* coef,
                                                    int Gp, const float* base, int g0, int G,
                                                    const TileToken& tok, int bs, float scale2, float2* s_part,
                                                    float* out, int NB) {
  constexpr float kLn2 = 0.69314718055994531f;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  float acc[kHeads];
#pragma unroll
  for (int hh = 0; hh < kHeads; ++hh) acc[hh] = 0.0f;
  for (int c16 = 0; c16 < m_pad; c16 += 16) {
    const uint4 w4 = *reinterpret_cast<const uint4*>(tr_row + c16);
    const uint32_t words[4] = {w4.x >> shift, w4.y >> shift, w4.z >> shift, w4.w >> shift};
#pragma unroll
    for (int j4 = 0; j4 < 4; ++j4) {
      float f[4];
      f[0] = code_as_float<kBits, 0>(words[j4]);
      f[1] = code_as_float<kBits, 1>(words[j4]);
      f[2] = code_as_float<kBits, 2>(words[j4]);
      f[3] = code_as_float<kBits, 3>(words[j4]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float w[kHeads];
        load_heads<kHeads>(coef + (c16 + 4 * j4 + j) * Gp + g0, w);
#pragma unroll
        for (int hh = 0; hh < kHeads; ++hh) acc[hh] = fmaf(w[hh], f[j], acc[hh]);
      }
    }
  }
  const int seg = min(bs, kWarpSize);  // lanes of one block within a warp (bs and 32 are powers of two)
#pragma unroll
  for (int hh = 0; hh < kHeads; ++hh) {
    const float x = tok.valid ? scale2 * (base[g0 + hh] + acc[hh]) : -INFINITY;
    float top = x;
    for (int offset = seg >> 1; offset > 0; offset >>= 1) top = fmaxf(top, __shfl_xor_sync(kFullMask, top, offset));
    float sum = top == -INFINITY ? 0.0f : fast_exp2(x - top);
    for (int offset = seg >> 1; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
    if (bs <= kWarpSize) {
      if ((lane & (seg - 1)) == 0 && tok.in_row && g0 + hh < G) {
        out[static_cast<int64_t>(g0 + hh) * NB + tok.block] = top == -INFINITY ? -INFINITY : (top + fast_log2(sum)) * kLn2;
      }
    } else if (lane == 0) {
      s_part[warp * kChannelScoresMaxPass + hh] = make_float2(top, sum);
    }
  }
  if (bs > kWarpSize) {  // uniform: blocks of 64 or 128 tokens span 2 or 4 warps
    __syncthreads();
    const int warps_per_block = bs / kWarpSize;
    const int x = threadIdx.x;  // (block of the tile, head)
    if (x < (kChannelScoresMaxGroupTokens / bs) * kHeads) {
      const int jt = x / kHeads, hh = x % kHeads;
      float top = -INFINITY;
      for (int w = 0; w < warps_per_block; ++w) top = fmaxf(top, s_part[(jt * warps_per_block + w) * kChannelScoresMaxPass + hh].x);
      float sum = 0.0f;
      if (top != -INFINITY) {
        for (int w = 0; w < warps_per_block; ++w) {
          const float2 part = s_part[(jt * warps_per_block + w) * kChannelScoresMaxPass + hh];
          sum += part.y * fast_exp2(part.x - top);
        }
      }
      if (g0 + hh < G && jt < tok.tile_blocks) {
        out[static_cast<int64_t>(g0 + hh) * NB + tok.tile_first_block + jt] =
            top == -INFINITY ? -INFINITY : (top + fast_log2(sum)) * kLn2;
      }
    }
    __syncthreads();  // s_part is rewritten by the next pass
  }
}

// One CTA's range of 128-token tiles of one (b, kv head) row (see the top of the file).
template <typename T, int kHeadDim, int kBits>
__device__ __forceinline__ void channel_scores_cta(const ChannelScoresParams& p, char* s_mem) {
  static_assert(kHeadDim % kWarpSize == 0 && kHeadDim <= kChannelMaxHeadDim, "head_dim: a multiple of 32, <= 256");
  constexpr int kLevels = (1 << kBits) - 1;
  constexpr float kLog2e = 1.4426950408889634f;
  __shared__ int s_n_chosen;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int row = blockIdx.x;
  const int b = row / p.kv_heads;
  const int h = row % p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  const int P = p.blocks_per_group;
  const int bs = p.block_size;
  const int gt = P * bs;
  const int NB = p.num_blocks;
  const int NG = NB / P;
  const int TG = kChannelScoresMaxGroupTokens / gt;  // groups per 128-token tile
  const int tiles = (NG + TG - 1) / TG;
  const int64_t len = max(p.seq_lens[b], 0);
  const int n_groups = static_cast<int>(std::min<int64_t>((len + gt - 1) / gt, NG));
  const int live_tiles = (n_groups + TG - 1) / TG;
  const int per = (tiles + gridDim.y - 1) / gridDim.y;
  const int begin = min(tiles, static_cast<int>(blockIdx.y) * per);
  const int end = min(tiles, begin + per);
  float* out = p.head_scores + (static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G) * NB;  // + g NB + j

  // Tiles past the end of the row: -inf for every block and head, nothing read.
  {
    const int dead = max(begin, live_tiles);
    const int first_block = dead * TG * P;
    const int blocks = min(end * TG, NG) * P - first_block;
    for (int x = tid; x < max(blocks, 0) * G; x += kChannelScoresThreads) {
      out[static_cast<int64_t>(x / blocks) * NB + first_block + x % blocks] = -INFINITY;
    }
  }
  const int live_end = min(end, live_tiles);
  if (begin >= live_end) return;  // uniform over the CTA

  const int m_cap = p.num_channels;
  const ChannelScoresSmem layout = channel_scores_smem(G, kHeadDim, m_cap, gt, kBits);
  const int run_bytes = layout.run_bytes;
  const int Gp = layout.heads_padded;
  const int m_pad = layout.channels_padded;
  const int tr_stride = layout.tr_stride;
  uint8_t* s_tr = reinterpret_cast<uint8_t*>(s_mem + layout.tr);
  float* s_coef = reinterpret_cast<float*>(s_mem + layout.coef);
  float* s_base = reinterpret_cast<float*>(s_mem + layout.base);
  float* s_q = reinterpret_cast<float*>(s_mem + layout.q);
  int* s_list = reinterpret_cast<int*>(s_mem + layout.list);
  int* s_flag = reinterpret_cast<int*>(s_mem + layout.flags);
  float2* s_part = reinterpret_cast<float2*>(s_mem + layout.part);

  // The chosen set: entries outside [0, D) ignored, duplicates once (params.h); listed ascending.
  const int32_t* listed = p.channels + static_cast<int64_t>(row) * m_cap;
  for (int d = tid; d < kHeadDim; d += kChannelScoresThreads) s_flag[d] = 0;
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + static_cast<int64_t>(h) * G * p.q_stride_head;
    for (int x = tid; x < G * kHeadDim; x += kChannelScoresThreads) {
      s_q[x] = to_float(q[static_cast<int64_t>(x / kHeadDim) * p.q_stride_head + x % kHeadDim]);
    }
  }
  __syncthreads();
  for (int i = tid; i < m_cap; i += kChannelScoresThreads) {
    const int d = listed[i];
    if (d >= 0 && d < kHeadDim) s_flag[d] = 1;
  }
  __syncthreads();
  if (warp == 0) {
    int count = 0;
#pragma unroll
    for (int d0 = 0; d0 < kHeadDim; d0 += kWarpSize) {
      const bool chosen = s_flag[d0 + lane] != 0;
      const unsigned ballot = __ballot_sync(kFullMask, chosen);
      if (chosen) s_list[count + __popc(ballot & ((1u << lane) - 1u))] = d0 + lane;
      count += __popc(ballot);
    }
    if (lane == 0) s_n_chosen = count;
  }
  __syncthreads();
  const int n_chosen = s_n_chosen;  // <= num_channels <= m_pad

  // Powers of two: shifts and masks instead of integer divisions in the per-tile loops.
  const int run_log2 = __ffs(run_bytes) - 1;
  const int gp_log2 = __ffs(Gp) - 1;
  const int gt_log2 = __ffs(gt) - 1;
  const int bs_log2 = __ffs(bs) - 1;
  // This thread's token of every tile: group tg, index tt in it; its code byte and bit.
  const int tg_mine = tid >> gt_log2;
  const int tt = tid & (gt - 1);
  const int shift = (tt * kBits) & 7;
  const uint8_t* tr_row = s_tr + (tg_mine * run_bytes + ((tt * kBits) >> 3)) * tr_stride;
  const float* coef_mine = s_coef + static_cast<size_t>(tg_mine) * m_pad * Gp;

  // cp.async of tile k's groups (their chosen runs, then their ranges) into stage `buf`; one commit
  // group per call. Groups past NG (a partial last tile) are not read.
  const uint8_t* row_codes = p.codes + static_cast<int64_t>(row) * NG * kHeadDim * run_bytes;
  const uint16_t* row_ranges = p.ranges + static_cast<int64_t>(row) * NG * 2 * kHeadDim;
  const int chunk = run_bytes % 16 == 0 ? 16 : 4;  // bytes per cp.async of a run
  const int chunk_log2 = chunk == 16 ? 4 : 2;
  const int per_run_log2 = run_log2 - chunk_log2;
  auto issue = [&](int tile, int buf) {
    char* dst = s_mem + static_cast<size_t>(buf) * layout.stage_bytes;
    const int g_first = tile * TG;
    const int n_tile_groups = min(TG, NG - g_first);
    for (int tg = 0; tg < n_tile_groups; ++tg) {
      const uint8_t* group = row_codes + static_cast<int64_t>(g_first + tg) * kHeadDim * run_bytes;
      char* group_dst = dst + tg * m_cap * run_bytes;
      for (int x = tid; x < (n_chosen << per_run_log2); x += kChannelScoresThreads) {
        const int i = x >> per_run_log2, k = (x & ((1 << per_run_log2) - 1)) << chunk_log2;
        const uint8_t* src = group + (s_list[i] << run_log2) + k;
        if (chunk == 16) {
          cp_async_16(shared_address(group_dst + (i << run_log2) + k), src, 16u);
        } else {
          cp_async_4(shared_address(group_dst + (i << run_log2) + k), src);
        }
      }
    }
    const char* ranges = reinterpret_cast<const char*>(row_ranges + static_cast<int64_t>(g_first) * 2 * kHeadDim);
    for (int x = tid; x < n_tile_groups * 4 * kHeadDim / 16; x += kChannelScoresThreads) {
      cp_async_16(shared_address(dst + layout.ranges_at + 16 * x), ranges + 16 * x, 16u);
    }
    cp_async_commit();
  };

  const int pass = channel_scores_pass(G);
  const float scale2 = p.scale * kLog2e;  // logits in log2 units until the write
  const float code_scale = static_cast<float>(1 << kBits);  // code_as_float gives 1 + code / 2^bits

  // A ring of kChannelScoresStages tiles: kStages - 1 in flight while one is scored. Every call of
  // issue (or an empty commit) is one cp.async group, so wait<kStages - 2> means "this tile landed".
  constexpr int kStages = kChannelScoresStages;
  for (int k = 0; k < kStages - 1; ++k) {
    if (begin + k < live_end) {
      issue(begin + k, k);
    } else {
      cp_async_commit();
    }
  }
  for (int tile = begin; tile < live_end; ++tile) {
    const int buf = (tile - begin) % kStages;
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile is visible to all; every thread is done with the previous tile
    if (tile + kStages - 1 < live_end) {
      issue(tile + kStages - 1, (buf + kStages - 1) % kStages);  // the slot the previous tile used
    } else {
      cp_async_commit();
    }
    const char* stage = s_mem + static_cast<size_t>(buf) * layout.stage_bytes;
    const uint8_t* runs = reinterpret_cast<const uint8_t*>(stage);
    const uint16_t* tile_ranges = reinterpret_cast<const uint16_t*>(stage + layout.ranges_at);
    const int g_first = tile * TG;
    const int n_tile_groups = min(TG, NG - g_first);

    for (int tg = 0; tg < n_tile_groups; ++tg) {
      const uint8_t* group_runs = runs + tg * m_cap * run_bytes;
      const uint16_t* r = tile_ranges + tg * 2 * kHeadDim;
      // Transposed codes: word (byte r of the run, channels 4c .. 4c + 3), 0 past the list.
      uint32_t* tr = reinterpret_cast<uint32_t*>(s_tr + tg * run_bytes * tr_stride);
      for (int x = tid; x < (m_pad >> 2) << run_log2; x += kChannelScoresThreads) {
        const int rb = x & (run_bytes - 1), c4 = x >> run_log2;
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int i = 4 * c4 + j;
          if (i < n_chosen) word |= static_cast<uint32_t>(group_runs[(i << run_log2) + rb]) << (8 * j);
        }
        tr[rb * (tr_stride >> 2) + c4] = word;
      }
      // coef[tg][i][g] = 2^bits q_g,d_i step_d_i (0 for the padding channels and heads).
      float* coef = s_coef + static_cast<size_t>(tg) * m_pad * Gp;
      for (int x = tid; x < m_pad << gp_log2; x += kChannelScoresThreads) {
        const int i = x >> gp_log2, g = x & (Gp - 1);
        float value = 0.0f;
        if (i < n_chosen && g < G) {
          const int d = s_list[i];
          const float lo = __uint_as_float(static_cast<uint32_t>(r[d]) << 16);
          const float hi = __uint_as_float(static_cast<uint32_t>(r[kHeadDim + d]) << 16);
          value = s_q[g * kHeadDim + d] * (__fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(kLevels)) * code_scale);
        }
        coef[x] = value;
      }
      // base[tg][g] = sum over every channel: the chosen ones at lo - 2^bits step (code_as_float's
      // offset), the others at the mid-range.
      for (int g = warp; g < Gp; g += kChannelScoresWarps) {
        float sum = 0.0f;
        if (g < G) {  // uniform over the warp
          for (int d = lane; d < kHeadDim; d += kWarpSize) {
            const float lo = __uint_as_float(static_cast<uint32_t>(r[d]) << 16);
            const float hi = __uint_as_float(static_cast<uint32_t>(r[kHeadDim + d]) << 16);
            const float step = __fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(kLevels)) * code_scale;
            sum = fmaf(s_q[g * kHeadDim + d], s_flag[d] ? lo - step : (lo + hi) * 0.5f, sum);
          }
          sum = warp_sum(sum);
        }
        if (lane == 0) s_base[tg * Gp + g] = sum;
      }
    }
    __syncthreads();

    TileToken tok;
    const int64_t token = (static_cast<int64_t>(g_first) << gt_log2) + tid;
    tok.in_row = tg_mine < n_tile_groups;
    tok.valid = tok.in_row && token < len;
    tok.block = token >> bs_log2;
    tok.tile_first_block = static_cast<int64_t>(g_first) * P;
    tok.tile_blocks = n_tile_groups * P;
    const float* base = s_base + tg_mine * Gp;
    for (int g0 = 0; g0 < G; g0 += pass) {
      switch (pass) {
        case 1:
          channel_scores_tile<kBits, 1>(tr_row, shift, m_pad, coef_mine, Gp, base, g0, G, tok, bs, scale2,
                                        s_part, out, NB);
          break;
        case 2:
          channel_scores_tile<kBits, 2>(tr_row, shift, m_pad, coef_mine, Gp, base, g0, G, tok, bs, scale2,
                                        s_part, out, NB);
          break;
        case 4:
          channel_scores_tile<kBits, 4>(tr_row, shift, m_pad, coef_mine, Gp, base, g0, G, tok, bs, scale2,
                                        s_part, out, NB);
          break;
        default:
          channel_scores_tile<kBits, kChannelScoresMaxPass>(tr_row, shift, m_pad, coef_mine, Gp, base, g0, G,
                                                            tok, bs, scale2, s_part, out, NB);
          break;
      }
    }
  }
  cp_async_wait<0>();
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kChannelScoresThreads) channel_scores_kernel(const ChannelScoresParams p) {
  pdl_begin();  // before any global read (common.cuh)
  extern __shared__ __align__(16) char s_channel_mem[];
  if (p.bits == 2) {
    channel_scores_cta<T, kHeadDim, 2>(p, s_channel_mem);
  } else {
    channel_scores_cta<T, kHeadDim, 4>(p, s_channel_mem);
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_channel_scores(const ChannelScoresParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int gt = p.blocks_per_group * p.block_size;
  const int groups = p.num_blocks / p.blocks_per_group;
  const int G = p.q_heads / p.kv_heads;
  if (rows == 0 || groups == 0 || G == 0) return cudaSuccess;
  if (rows > 0x7fffffff || gt > kChannelScoresMaxGroupTokens || (gt * p.bits) % 32 != 0) return cudaErrorInvalidValue;
  const size_t smem = channel_scores_smem(G, kHeadDim, p.num_channels, gt, p.bits).total;
  auto kernel = channel_scores_kernel<T, kHeadDim>;
  if (smem > 48 * 1024) {
    int optin = 0;
    AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
    const size_t static_smem = 64;
    if (smem + static_smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // G too large
    AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // One wave of resident CTAs over all rows; each takes a contiguous range of its row's groups.
  int num_sms = 0, per_sm = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kChannelScoresThreads, smem));
  const int64_t wave = static_cast<int64_t>(num_sms) * std::max(per_sm, 1);
  const int64_t tiles = ceil_div(groups, kChannelScoresMaxGroupTokens / gt);  // 128-token tiles per row
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>({ceil_div(wave, rows), tiles, 65535}));
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(slices));
  return launch_kernel(kernel, grid, dim3(kChannelScoresThreads), smem, stream, p);
}

}  // namespace cuda
}  // namespace aether
