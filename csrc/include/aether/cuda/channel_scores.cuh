// The "qcodes" score (CodeChannelsParams and ChannelScoresParams in params.h): per (b, kv head) the
// query's heaviest channels, then every block scored from the channel-major key codes of those
// channels only, the other channels at their group's mid-range.
//
// 1. code_channels_kernel<T>, one CTA of 512 threads per (b, kv head) row. The row's ranges are
//    [NG, 2, D] bf16 (a group's lo row, then its hi row); a thread takes one 16-byte vector of 8
//    channels and a strided slice of the groups (D / 8 vectors per row, 512 / (D / 8) slices), and
//    keeps 8 double partial sums of (hi - lo)^2. A thread per channel looping over all groups
//    would wait one DRAM latency per group (a 32k-token row at 128-token groups: 256 groups); here
//    16 to 64 slices each unrolled by 4 keep 128 to 512 loads in flight per CTA. The slices are then
//    added in shared memory (in double; the order does not matter at double precision: the
//    squares of bf16 differences are exact in double and their sums nearly always are) and
//    w_d = (sum_g q_gd^2) * spread_d. Channel d is chosen iff its rank, the number of channels e
//    with w_e > w_d or w_e == w_d and e < d, is below num_channels (compared as order-preserving
//    integer keys: a total order even with NaN, so exactly num_channels are chosen); a warp ballot
//    and a prefix count over the warps write them ascending.
//    H200, 8 x 32k (64 rows): 10.1 us at 512 threads, 10.9 at 256. A cluster of 8 CTAs per row
//    (each a slice of the groups, the partial spreads added over distributed shared memory) took
//    22 us: 8-CTA clusters of 2-per-SM CTAs did not fit one wave (reverted; bench/PERF_NOTES.md).
//    With spreads (code_spreads.cu: the running sum over the groups, kept with the codes) no
//    range is read: the sum is the entry of the row's last valid group.
// 2. channel_scores_kernel<T, kHeadDim>, grid (batch * kv_heads, slices), 4 warps; a CTA takes a
//    contiguous range of its row's groups, its warps every 4th group each (the slices fill one
//    wave of resident CTAs, rounded down: a few CTAs of a second wave cost a whole wave). Layout
//    read: codes [B, Hkv, NG, D, run] with run = Pg * bs * bits / 8 bytes per channel and group
//    (token t of the group at bit t * bits), ranges [B, Hkv, NG, 2, D]. The CTA first compacts
//    channels[b, h, :] into a list of distinct valid channels ("entries", padded to 16 with weight
//    0), stages the G queries as float32 and q / levels at the entries. Without a list (the
//    library's path) every CTA makes code_channels' choice from the spreads first: the same double
//    keys, ranked by a thread per channel over all D keys (H200, 8 x 32k, ncu: 38.0 us against
//    35.9 given a list; 40.2 with a one-loop rank of ~8 SASS instructions per comparison, now
//    ~4.5), which removes code_channels' launch (10.2 us) and its pass over every range. Each warp streams its
//    groups through a ring of up to 4 stages (cp.async: the entries' runs, then the group's
//    ranges; only those bytes are read) and scores a group on the tensor cores, refine_scores'
//    scheme: m16n8k16 with A = codes (rows = 16 tokens of an m-tile, k = 16 entries; a code is
//    OR-ed into the mantissa of the bf16 128.0 and 128 subtracted, exact) and B = the weights
//      w_g,i = scale log2(e) (q_g,d_i / levels) (hi_d_i - lo_d_i)   (entry i, head g)
//    of 4 heads, head i as its bf16 rounding (column 2i) and the bf16 of the residual (column
//    2i + 1): ~16 mantissa bits, float32 sums to ~1e-6 relative. The logit of token t is then
//      scale log2(e) base_g + sum_i w_g,i code_t,i,  base_g = sum_d q_gd (chosen_d ? lo_d : (lo_d + hi_d) / 2)
//    (the base added after the log-sum-exp, which it shifts). Lane (r, t) builds its A registers
//    from the staged runs with one byte permute, shift, mask and packed subtract per pair of
//    codes (runs 16 bytes apart so the four entries a load touches sit in different banks); all
//    of a group's m-tiles run back to back per k-step. After the MMAs lane t holds both parts of
//    head t (columns 2t, 2t + 1: no exchange; the first version put the heads' high parts in
//    columns 0-3 and needed a shuffle and 3 selects per pair of tokens). The log-sum-exps take the
//    group's max per head (three shuffles) as the reference of every token's exp, so a
//    reduce-scatter of plain sums over the 8 row groups (7 pair exchanges) leaves m-tile r's sum
//    in lanes r and a butterfly joins the m-tiles of a block (bs / 16); a group where that would
//    flush a whole block to zero (> 100 log2 units below the max) or whose max is not finite
//    takes the same exchanges on per-lane (max, sum of 2^(y - max)) pairs instead. The block's
//    first lanes write its heads. MUFU ex2 / lg2 in log2 units; groups past the end of the row
//    are not read (-inf).
//    G > 4: one pass per 4 heads over the staged group.
//    History (H200, 8 x 32k, 32q/8kv, d128, 16-token blocks, 128-token groups, ncu): on CUDA cores
//    with 2-bit codes of 32 channels: a thread per (token, channel slice) writing logits to
//    shared memory, 229 us; a thread per token with the log-sum-exp in registers and a 6-stage
//    ring, 194 us, 80 M instructions; transposed codes, no I2F, no per-tile division, 177 us and
//    73 M instructions (issue-bound; CUDA graph 162 us). Tensor cores (4-bit codes of 16
//    channels): a warp per group with a per-m-tile log-sum-exp of 6 dependent shuffles, 44.6 us,
//    24.1 M instructions (the first launch rounded the slices up: 2 waves, 55 us in a graph); the
//    m-tiles unrolled per k-step and the reduce-scatter log-sum-exp, 35.2 us, 19.0 M (~1160 per
//    group; 96 registers, 5 CTAs per SM; 80 registers at 6 per SM: 36.8 us). With the choice in
//    every CTA 38.0 us, 21.9 M; a full-group copy of the scoring code, the first k-step peeled and
//    the (high, residual) column pairs 33.4 us, 18.1 M; the ring slot kept by the loop, the run
//    offsets staged and the warp-uniform rank 30.5 us, 16.5 M (~1000 per group); the group's max
//    as the log-sum-exps' reference 29.1-29.6 us, 15.5 M (the per-m-tile path forced in the same
//    build, AETHER_CHANNEL_LSE=tile: 33.0 us, 17.1 M). Bytes read per
//    group: num_channels * run + 4 D (1.5 KB at d128, 16 channels, 4 bits) against D * run for
//    every channel.
#pragma once

#include <cmath>
#include <type_traits>

#include "aether/cuda/common.cuh"
#include "aether/cuda/mma.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kCodeChannelsThreads = 512;
constexpr int kChannelScoresWarps = 4;
constexpr int kChannelScoresThreads = kChannelScoresWarps * kWarpSize;
constexpr int kChannelScoresMaxGroupTokens = 128;  // Pg * block_size <= 128 (params.h)
constexpr int kChannelMaxHeadDim = 256;
static_assert(kCodeChannelsThreads >= kChannelMaxHeadDim, "code_channels ranks a channel per thread");

// ---------------------------------------------------------------------------------------------
// code_channels.

template <typename T>
__global__ void __launch_bounds__(kCodeChannelsThreads, 1) code_channels_kernel(const CodeChannelsParams p) {
  pdl_begin();  // before any global read (common.cuh)
  // Partial spreads [slices][D]: slices * D = 8 * threads for every head_dim.
  __shared__ double s_part[8 * kCodeChannelsThreads];
  __shared__ double s_energy[kChannelMaxHeadDim];  // sum_g q_gd^2
  __shared__ unsigned long long s_key[kChannelMaxHeadDim];
  __shared__ bool s_eligible[kChannelMaxHeadDim];  // stored by the channel pool (or no pool)
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
  // registers, until the launch bound allowed 128 (now 1 CTA of 512 threads per SM).
  constexpr int kBatch = 4;
  // With spreads (code_spreads) the sum over the groups is already stored: no range is read.
  const int summed_groups = p.spreads == nullptr ? n_groups : 0;
  for (int m0 = slice; m0 < summed_groups; m0 += kBatch * slices) {
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
  pdl_trigger();  // every range is read: channel_scores may launch during the ranking (common.cuh)
#pragma unroll
  for (int e = 0; e < 8; ++e) s_part[slice * D + c * 8 + e] = acc[e];
  __syncthreads();
  for (int d = tid; d < D; d += kCodeChannelsThreads) {
    double spread = 0.0;
    if (p.spreads != nullptr) {
      if (n_groups > 0) spread = p.spreads[(static_cast<int64_t>(row) * NG + n_groups - 1) * D + d];
    } else {
      for (int s = 0; s < slices; ++s) spread += s_part[s * D + d];
    }
    s_key[d] = ordered_key(s_energy[d] * spread);
    const int slot = p.channel_slots == nullptr ? 0 : p.channel_slots[static_cast<int64_t>(row) * D + d];
    s_eligible[d] = p.channel_slots == nullptr || (slot >= 0 && slot < p.stored_channels);
  }
  __syncthreads();

  const int d = tid;  // D <= threads: one channel per thread
  bool chosen = false;
  if (d < D && s_eligible[d]) {  // the rank among the eligible channels
    const unsigned long long key = s_key[d];
    int rank = 0;
    for (int e = 0; e < D; ++e) {
      const unsigned long long other = s_key[e];
      rank += s_eligible[e] && (other > key || (other == key && e < d));
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
  // Fewer eligible channels than num_channels (a small pool): the list ends with -1 entries.
  int total = 0;
  for (int w = 0; w < kCodeChannelsThreads / kWarpSize; ++w) total += s_count[w];
  if (tid >= total && tid < p.num_channels) p.channels[static_cast<int64_t>(row) * p.num_channels + tid] = -1;
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

constexpr int kChannelScoresMaxStages = 4;  // groups in a warp's cp.async ring
constexpr int kChannelScoresMaxTiles = kChannelScoresMaxGroupTokens / 16;  // m-tiles per group
constexpr int kChannelScoresSmemBudget = 100 * 1024;  // keep >= 2 CTAs per SM where the ring allows
// 5 CTAs (20 warps) per SM: the full-group copy of the scoring code took ptxas to 128 registers
// (4 CTAs) without the bound; 96 registers and 5 CTAs measured best before it (PERF_NOTES).
constexpr int kChannelScoresMinBlocks = 5;

// Dynamic shared memory of channel_scores, byte offsets of its regions (each 16-byte aligned).
// Per warp: `stages` stages of one group each (the chosen channels' runs, entry i at i *
// run_stride, run_stride = run + 16 bytes so that the 4 entries a load instruction touches fall
// in different banks; then the group's ranges [2][D] bf16), and the B-fragment table [steps][32
// lanes] uint2. Per CTA: the queries [G][D] float32, q / levels at the chosen entries [Gq][m_pad]
// (Gq = G rounded up to 4, zero-padded), the entry list [m_pad], the chosen flags [D] and the
// entries' run offsets in a group's codes [m_pad].
struct ChannelScoresSmem {
  int run_bytes = 0;    // one channel's codes of one group
  int run_stride = 0;   // bytes between entries' runs in a stage
  int steps = 0;        // m16n8k16 k-steps: m_pad / 16
  int channels_padded = 0;  // m_pad: num_channels rounded up to 16
  int heads_padded = 0;     // Gq
  int stages = 0;
  int ranges_at = 0;    // in a stage
  int stage_bytes = 0;
  int warp_bytes = 0;   // stages, then the table
  size_t q = 0, qd = 0, list = 0, flags = 0, runs = 0, total = 0;
};

__host__ __device__ inline size_t round_up_16(size_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline ChannelScoresSmem channel_scores_smem(int group, int head_dim, int num_channels,
                                                                 int group_tokens, int bits) {
  ChannelScoresSmem s;
  s.run_bytes = group_tokens * bits / 8;
  s.run_stride = s.run_bytes + 16;
  s.channels_padded = (num_channels + 15) / 16 * 16;
  s.steps = s.channels_padded / 16;
  s.heads_padded = (group + 3) / 4 * 4;
  s.ranges_at = static_cast<int>(round_up_16(static_cast<size_t>(s.channels_padded) * s.run_stride));
  s.stage_bytes = s.ranges_at + 4 * head_dim;
  const size_t cta = round_up_16(sizeof(float) * static_cast<size_t>(group) * head_dim) +
                     round_up_16(sizeof(float) * static_cast<size_t>(s.heads_padded) * s.channels_padded) +
                     2 * round_up_16(sizeof(int) * static_cast<size_t>(s.channels_padded)) +
                     round_up_16(sizeof(int) * static_cast<size_t>(head_dim));
  // The deepest ring that fits the budget (at least 2 stages; the launcher checks the device limit).
  for (s.stages = kChannelScoresMaxStages; s.stages > 2; --s.stages) {
    const size_t warp = static_cast<size_t>(s.stages) * s.stage_bytes + 8 * kWarpSize * s.steps;
    if (kChannelScoresWarps * warp + cta <= kChannelScoresSmemBudget) break;
  }
  s.warp_bytes = s.stages * s.stage_bytes + 8 * kWarpSize * s.steps;
  s.q = static_cast<size_t>(kChannelScoresWarps) * s.warp_bytes;
  s.qd = s.q + round_up_16(sizeof(float) * static_cast<size_t>(group) * head_dim);
  s.list = s.qd + round_up_16(sizeof(float) * static_cast<size_t>(s.heads_padded) * s.channels_padded);
  s.flags = s.list + round_up_16(sizeof(int) * static_cast<size_t>(s.channels_padded));
  s.runs = s.flags + round_up_16(sizeof(int) * static_cast<size_t>(head_dim));
  s.total = s.runs + round_up_16(sizeof(int) * static_cast<size_t>(s.channels_padded));
  return s;
}

// A fragment registers from the staged runs (refine_scores' bf16 trick: a code OR-ed into the
// mantissa of 128.0, 128 subtracted). Lane (r, t) holds rows r and r + 8 (tokens) of entries x, y
// (columns 2t, 2t + 1, or 2t + 8, 2t + 9).
// 4-bit: a 16-token m-tile of a run is two words (tokens 0-7, 8-15), token r at bits 4 (r % 8):
// `sel` picks byte r / 2 of x's and y's word into bytes 0 and 2, `shift` (4 (r % 2)) aligns the
// nibble.
__device__ __forceinline__ uint32_t nibble_pair(uint32_t x, uint32_t y, uint32_t sel, int shift) {
  return minus_128(((__byte_perm(x, y, sel) >> shift) & 0x000F000Fu) | 0x43004300u);
}
// 2-bit: one word per m-tile, token r at bits 2r; x and y already shifted right by 2r, so token r
// sits in byte 0 and token r + 8 in byte 2.
__device__ __forceinline__ uint32_t crumb_pair(uint32_t x, uint32_t y, uint32_t sel) {
  return minus_128((__byte_perm(x, y, sel) & 0x00030003u) | 0x43004300u);
}

// Log-sum-exp pieces in log2 units, a part being (max, sum of 2^(y - max)); an empty part is
// (-inf, 0), and combining two empty parts gives an empty part (no -inf - -inf).
__device__ __forceinline__ void lse_pair(float y0, float y1, float& top, float& sum) {
  top = fmaxf(y0, y1);
  const float base = top == -INFINITY ? 0.0f : top;
  sum = fast_exp2(y0 - base) + fast_exp2(y1 - base);
}
__device__ __forceinline__ void lse_combine(float& top, float& sum, float top2, float sum2) {
  const float m = fmaxf(top, top2);
  const float base = m == -INFINITY ? 0.0f : m;
  sum = sum * fast_exp2(top - base) + sum2 * fast_exp2(top2 - base);
  top = m;
}
// Eight parts per lane, combined over the lanes that differ in bits 2-4 (the MMA row group r):
// each exchange halves the parts a lane carries (reduce-scatter), so lane r ends with part r of
// the 8 lanes combined, in 7 pair exchanges instead of 24.
__device__ __forceinline__ void lse_reduce_scatter8(float (&top)[8], float (&sum)[8], int lane) {
#pragma unroll
  for (int half = 4, off = 16; half >= 1; half >>= 1, off >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send_top = upper ? top[i] : top[i + half], send_sum = upper ? sum[i] : sum[i + half];
      float keep_top = upper ? top[i + half] : top[i], keep_sum = upper ? sum[i + half] : sum[i];
      const float got_top = __shfl_xor_sync(kFullMask, send_top, off);
      const float got_sum = __shfl_xor_sync(kFullMask, send_sum, off);
      lse_combine(keep_top, keep_sum, got_top, got_sum);
      top[i] = keep_top;
      sum[i] = keep_sum;
    }
  }
}

// The same reduce-scatter for plain sums (parts relative to one shared maximum).
__device__ __forceinline__ void sum_reduce_scatter8(float (&sum)[8], int lane) {
#pragma unroll
  for (int half = 4, off = 16; half >= 1; half >>= 1, off >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? sum[i] : sum[i + half];
      const float keep = upper ? sum[i + half] : sum[i];
      sum[i] = keep + __shfl_xor_sync(kFullMask, send, off);
    }
  }
}

__device__ __forceinline__ void channel_scores_wait(int stages) {
  // cp.async.wait_group takes an immediate: one instance per ring depth.
  if (stages >= 4) {
    cp_async_wait<3>();
  } else if (stages == 3) {
    cp_async_wait<2>();
  } else {
    cp_async_wait<1>();
  }
}

// One CTA: a contiguous range of one (b, kv head) row's groups, the warps taking every
// kChannelScoresWarps-th group (see the top of the file).
template <typename T, int kHeadDim, int kBits>
__device__ __forceinline__ void channel_scores_cta(const ChannelScoresParams& p, char* s_mem) {
  static_assert(kHeadDim % kWarpSize == 0 && kHeadDim <= kChannelMaxHeadDim, "head_dim: a multiple of 32, <= 256");
  constexpr int kLevels = (1 << kBits) - 1;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.69314718055994531f;
  __shared__ int s_n_chosen;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int r = lane / 4;  // MMA row group: tokens r, r + 8 of an m-tile; B column r
  const int t = lane % 4;
  const int row = blockIdx.x;
  const int b = row / p.kv_heads;
  const int h = row % p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  const int P = p.blocks_per_group;
  const int bs = p.block_size;
  const int gt = P * bs;
  const int NB = p.num_blocks;
  const int NG = NB / P;
  const int64_t len = max(p.seq_lens[b], 0);
  const int n_groups = static_cast<int>(std::min<int64_t>((len + gt - 1) / gt, NG));
  const int per = (NG + gridDim.y - 1) / gridDim.y;
  const int begin = min(NG, static_cast<int>(blockIdx.y) * per);
  const int end = min(NG, begin + per);
  float* out = p.head_scores + (static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G) * NB;  // + g NB + j

  // Groups past the end of the row: -inf for every block and head, nothing read.
  {
    const int first_block = max(begin, n_groups) * P;
    const int blocks = end * P - first_block;
    for (int x = tid; x < max(blocks, 0) * G; x += kChannelScoresThreads) {
      out[static_cast<int64_t>(x / blocks) * NB + first_block + x % blocks] = -INFINITY;
    }
  }
  const int live_end = min(end, n_groups);
  if (begin >= live_end) return;  // uniform over the CTA

  // Without a channel list: this thread's channels' running spreads (of the row's last valid
  // group, n_groups >= 1 here) and pool slots, loaded first so that their latency overlaps the
  // query's staging.
  constexpr int kChoicePerThread = (kHeadDim + kChannelScoresThreads - 1) / kChannelScoresThreads;
  double choice_spread[kChoicePerThread];
  int choice_slot[kChoicePerThread];
  if (p.channels == nullptr) {
    const double* spread = p.spreads + (static_cast<int64_t>(row) * NG + n_groups - 1) * kHeadDim;
#pragma unroll
    for (int i = 0; i < kChoicePerThread; ++i) {
      const int d = min(tid + i * kChannelScoresThreads, kHeadDim - 1);
      choice_spread[i] = spread[d];
      choice_slot[i] = p.channel_slots == nullptr ? d : p.channel_slots[static_cast<int64_t>(row) * kHeadDim + d];
    }
  }

  const int m_cap = p.num_channels;
  const ChannelScoresSmem layout = channel_scores_smem(G, kHeadDim, m_cap, gt, kBits);
  const int m_pad = layout.channels_padded;
  const int steps = layout.steps;
  const int stride = layout.run_stride;
  const int stages = layout.stages;
  float* s_q = reinterpret_cast<float*>(s_mem + layout.q);
  float* s_qd = reinterpret_cast<float*>(s_mem + layout.qd);
  int* s_list = reinterpret_cast<int*>(s_mem + layout.list);
  int* s_flag = reinterpret_cast<int*>(s_mem + layout.flags);
  int* s_run = reinterpret_cast<int*>(s_mem + layout.runs);  // entry i's run: its slot * run bytes

  // The chosen set: entries outside [0, D) ignored, duplicates once (params.h); listed ascending,
  // the padding entries point at channel 0 with weight 0. s_flag[d] = 1 + the slot of channel d's
  // run when it is chosen and stored (a channel pool may not store it: then it is ignored), else 0.
  const int32_t* listed = p.channels == nullptr ? nullptr : p.channels + static_cast<int64_t>(row) * m_cap;
  const int S = p.channel_slots == nullptr ? kHeadDim : p.stored_channels;  // runs per group
  for (int d = tid; d < kHeadDim; d += kChannelScoresThreads) s_flag[d] = 0;
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_batch + static_cast<int64_t>(h) * G * p.q_stride_head;
    for (int x = tid; x < G * kHeadDim; x += kChannelScoresThreads) {
      s_q[x] = to_float(q[static_cast<int64_t>(x / kHeadDim) * p.q_stride_head + x % kHeadDim]);
    }
  }
  __syncthreads();
  if (p.channels == nullptr) {
    // The choice of code_channels with spreads, made by every CTA of the row: the same double
    // keys (q staged as float, squared and summed over the heads in double, times the spread of
    // the row's last valid group, loaded above), the same rank rule. The ring's shared memory is
    // not in use yet: it holds the keys and the slots (3 KB at head_dim 256, far below one warp's
    // stages). A channel that is not stored gets key 0, below every real key: ordered_key gives
    // 0 only to the NaN with every bit set, which no arithmetic produces (a channel whose own key
    // is 0 takes the exact loop below anyway).
    unsigned long long* s_key = reinterpret_cast<unsigned long long*>(s_mem);
    int* s_slot = reinterpret_cast<int*>(s_mem + sizeof(unsigned long long) * kHeadDim);  // 1 + slot, 0: not stored
#pragma unroll
    for (int i = 0; i < kChoicePerThread; ++i) {
      const int d = tid + i * kChannelScoresThreads;
      if (d < kHeadDim) {
        double energy = 0.0;
        for (int g = 0; g < G; ++g) {
          const double x = s_q[g * kHeadDim + d];
          energy += x * x;  // exact in double, as in code_channels
        }
        const bool stored = choice_slot[i] >= 0 && choice_slot[i] < S;
        s_key[d] = stored ? ordered_key(energy * choice_spread[i]) : 0ull;
        s_slot[d] = stored ? 1 + choice_slot[i] : 0;
      }
    }
    __syncthreads();
    // rank_d = #{e : key_e > key_d} + #{e < d : key_e == key_d} among the stored channels. The
    // rank loop is the choice's cost (every CTA of the row runs it; ~11% of the kernel's
    // instructions at 8 x 32k, H200 SASS profile), so the comparisons skip the index test where
    // the warp knows its outcome: every e below the warp's 32 channels is below d (>=), every e
    // above them is above d (>), and only the warp's own 32 take the full test; all three loops
    // have the same trip count in every lane (~4 SASS instructions per comparison without the
    // test, ~7 with it).
#pragma unroll
    for (int i = 0; i < kChoicePerThread; ++i) {
      const int d = tid + i * kChannelScoresThreads;
      if (d >= kHeadDim || s_slot[d] == 0) continue;
      const unsigned long long key = s_key[d];
      int rank = 0;
      if (key != 0ull) {
        const int own = d & ~(kWarpSize - 1);  // the warp's first channel
#pragma unroll 8
        for (int e = 0; e < own; ++e) rank += s_key[e] >= key;
#pragma unroll 8
        for (int e = own; e < own + kWarpSize; ++e) {
          const unsigned long long other = s_key[e];
          rank += other > key || (other == key && e < d);
        }
#pragma unroll 8
        for (int e = own + kWarpSize; e < kHeadDim; ++e) rank += s_key[e] > key;
      } else {
        for (int e = 0; e < kHeadDim; ++e) {
          const unsigned long long other = s_key[e];
          rank += s_slot[e] != 0 && (other > key || (other == key && e < d));
        }
      }
      if (rank < m_cap) s_flag[d] = s_slot[d];
    }
  } else {
    for (int i = tid; i < m_cap; i += kChannelScoresThreads) {
      const int d = listed[i];
      if (d >= 0 && d < kHeadDim) {
        const int slot = p.channel_slots == nullptr ? d : p.channel_slots[static_cast<int64_t>(row) * kHeadDim + d];
        if (slot >= 0 && slot < S) s_flag[d] = 1 + slot;
      }
    }
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
    for (int i = count + lane; i < m_pad; i += kWarpSize) s_list[i] = 0;
    if (lane == 0) s_n_chosen = count;
  }
  __syncthreads();
  const int n_chosen = s_n_chosen;  // <= num_channels <= m_pad
  // Where each entry's run starts in a group's codes (read by every copy of every group).
  for (int i = tid; i < n_chosen; i += kChannelScoresThreads) s_run[i] = (s_flag[s_list[i]] - 1) * layout.run_bytes;
  // q / levels at the chosen entries (the weights w = q step, step = (hi - lo) / levels, are
  // (q / levels) (hi - lo)); zero for padding heads and entries.
  for (int x = tid; x < layout.heads_padded * m_pad; x += kChannelScoresThreads) {
    const int g = x / m_pad, i = x % m_pad;
    s_qd[x] = g < G && i < n_chosen ? s_q[g * kHeadDim + s_list[i]] / static_cast<float>(kLevels) : 0.0f;
  }
  // The padding entries' runs are never copied: zero them once in every stage, so that no
  // uninitialised shared memory is read (their codes, masked to 0..15, meet zero weights anyway).
  for (int x = tid; x < kChannelScoresWarps * stages * (m_pad - n_chosen) * stride; x += kChannelScoresThreads) {
    const int per_stage = (m_pad - n_chosen) * stride;
    const int slot = x / per_stage, rest = x % per_stage;
    s_mem[static_cast<size_t>(slot / stages) * layout.warp_bytes + static_cast<size_t>(slot % stages) * layout.stage_bytes +
          n_chosen * stride + rest] = 0;
  }
  __syncthreads();

  char* s_warp = s_mem + static_cast<size_t>(warp) * layout.warp_bytes;
  uint2* s_table = reinterpret_cast<uint2*>(s_warp + static_cast<size_t>(stages) * layout.stage_bytes);
  const int run_bytes = layout.run_bytes;
  const int chunk = run_bytes % 16 == 0 ? 16 : run_bytes % 8 == 0 ? 8 : 4;  // bytes per cp.async of a run
  const int chunk_log2 = __ffs(chunk) - 1;
  const int per_run_log2 = __ffs(run_bytes) - 1 - chunk_log2;
  const uint8_t* row_codes = p.codes + static_cast<int64_t>(row) * NG * S * run_bytes;
  const uint16_t* row_ranges = p.ranges + static_cast<int64_t>(row) * NG * 2 * kHeadDim;
  // This warp's groups: begin + warp, begin + warp + kWarps, ...; item k is the k-th of them.
  const int first = begin + warp;
  // Item k into ring slot `slot` (= k % stages, kept by the loop: a division per group cost ~3% of
  // the kernel's instructions).
  auto issue = [&](int k, int slot) {
    const int group = first + k * kChannelScoresWarps;
    if (group < live_end) {
      char* dst = s_warp + static_cast<size_t>(slot) * layout.stage_bytes;
      const uint8_t* src = row_codes + static_cast<int64_t>(group) * S * run_bytes;
      for (int x = lane; x < (n_chosen << per_run_log2); x += kWarpSize) {
        const int i = x >> per_run_log2, k0 = (x & ((1 << per_run_log2) - 1)) << chunk_log2;
        const uint8_t* from = src + s_run[i] + k0;
        const uint32_t to = shared_address(dst + i * stride + k0);
        if (chunk == 16) {
          cp_async_16(to, from, 16u);
        } else if (chunk == 8) {
          cp_async_8(to, from);
        } else {
          cp_async_4(to, from);
        }
      }
      const char* ranges = reinterpret_cast<const char*>(row_ranges + static_cast<int64_t>(group) * 2 * kHeadDim);
      for (int x = lane; x < kHeadDim / 4; x += kWarpSize) {  // 4 D bytes in 16-byte pieces
        cp_async_16(shared_address(dst + layout.ranges_at + 16 * x), ranges + 16 * x, 16u);
      }
    }
    cp_async_commit();
  };

  const float scale2 = p.scale * kLog2e;  // logits in log2 units until the write
  const bool lse_group_max = p.lse_group_max != 0;
  const int mt_group = gt / 16;           // m-tiles (16 tokens) per group
  const int mt_block_log2 = __ffs(bs / 16) - 1;
  const int mt_block = 1 << mt_block_log2;
  // B column 2i holds head i's high part and column 2i + 1 its residual, so lane t's accumulators
  // are both parts of head t: the sums need no exchange between lanes.
  const int my_head = t;
  const uint32_t sel4 = static_cast<uint32_t>(r >> 1) | (static_cast<uint32_t>(4 + (r >> 1)) << 8);
  const int shift4 = 4 * (r & 1);

  for (int k = 0; k < stages - 1; ++k) issue(k, k);
  for (int k = 0, slot = 0; first + k * kChannelScoresWarps < live_end; ++k, slot = slot + 1 == stages ? 0 : slot + 1) {
    const int group = first + k * kChannelScoresWarps;
    // Into the slot item k - 1 used; every lane is past it (__syncwarp below).
    issue(k + stages - 1, slot == 0 ? stages - 1 : slot - 1);
    channel_scores_wait(stages);
    __syncwarp();
    const char* stage = s_warp + static_cast<size_t>(slot) * layout.stage_bytes;
    const uint8_t* runs = reinterpret_cast<const uint8_t*>(stage);
    const uint16_t* rg = reinterpret_cast<const uint16_t*>(stage + layout.ranges_at);
    const int n_valid = static_cast<int>(std::min<int64_t>(gt, len - static_cast<int64_t>(group) * gt));  // > 0
    const int n_mt = (n_valid + 15) / 16;

    for (int quad = 0; quad * 4 < G; ++quad) {
      // B fragments: column r is head 4 quad + r / 2, its bf16 high part (r even) or the bf16 of
      // the rounding residual (r odd); rows 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) of each step.
      {
        const float* qd = s_qd + (quad * 4 + (r >> 1)) * m_pad;
        for (int s = 0; s < steps; ++s) {
          float w[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int e = 16 * s + 2 * t + (u & 1) + 8 * (u >> 1);
            const int d = s_list[e];
            const float lo = __uint_as_float(static_cast<uint32_t>(rg[d]) << 16);
            const float hi = __uint_as_float(static_cast<uint32_t>(rg[kHeadDim + d]) << 16);
            w[u] = qd[e] * (hi - lo) * scale2;  // logits in log2 units
          }
          uint32_t b01 = pack_pair<__nv_bfloat16>(w[0], w[1]);
          uint32_t b23 = pack_pair<__nv_bfloat16>(w[2], w[3]);
          if (r & 1) {
            const float2 h01 = unpack_pair<__nv_bfloat16>(b01), h23 = unpack_pair<__nv_bfloat16>(b23);
            b01 = pack_pair<__nv_bfloat16>(w[0] - h01.x, w[1] - h01.y);
            b23 = pack_pair<__nv_bfloat16>(w[2] - h23.x, w[3] - h23.y);
          }
          s_table[s * kWarpSize + lane] = make_uint2(b01, b23);
        }
      }
      // bias = scale2 sum_d q_gd v_d, v_d = lo_d (chosen) or (lo_d + hi_d) / 2, for the quad's 4
      // heads; a reduce-scatter leaves head i's sum in lanes 8i .. 8i + 7.
      float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < kHeadDim / kWarpSize; ++j) {
        const int d = lane + kWarpSize * j;
        const float lo = __uint_as_float(static_cast<uint32_t>(rg[d]) << 16);
        const float hi = __uint_as_float(static_cast<uint32_t>(rg[kHeadDim + d]) << 16);
        const float v = s_flag[d] ? lo : (lo + hi) / 2.0f;
#pragma unroll
        for (int hh = 0; hh < 4; ++hh) {
          if (quad * 4 + hh < G) bias[hh] = fmaf(s_q[(quad * 4 + hh) * kHeadDim + d], v, bias[hh]);
        }
      }
      warp_reduce_scatter<4>(bias, lane);
      const float my_bias = scale2 * __shfl_sync(kFullMask, bias[0], 8 * my_head);

      // The group's m-tiles, log-sum-exps and writes. A full group of 128 tokens (every group but
      // a row's last, at the usual 16 x 8 or 32 x 4 blocks) takes a copy of this code compiled
      // without the tests for missing m-tiles and tokens: ~100 of the ~940 instructions a group
      // cost (H200 SASS profile, bench/PERF_NOTES.md).
      auto score_group = [&](auto full_group) {
        constexpr bool kFull = decltype(full_group)::value;
        // All of a k-step's MMAs back to back (A from the staged runs, B from the table); m-tiles
        // past the valid tokens are skipped (uniform). The first k-step is peeled so that its
        // MMAs start from zero accumulators (no zeroing instructions).
        float c[kChannelScoresMaxTiles][4];
        auto k_step = [&](int s, bool first) {
          const uint8_t* ea = runs + (16 * s + 2 * t) * stride;  // entries 2t, 2t + 1, 2t + 8, 2t + 9
          const uint8_t* eb = ea + stride;
          const uint8_t* ec = ea + 8 * stride;
          const uint8_t* ed = ea + 9 * stride;
          const uint2 bf = s_table[s * kWarpSize + lane];
#pragma unroll
          for (int u = 0; u < kChannelScoresMaxTiles; ++u) {
            if (kFull || u < n_mt) {
              uint32_t a[4];
              if constexpr (kBits == 4) {
                const uint2 wa = *reinterpret_cast<const uint2*>(ea + 8 * u);
                const uint2 wb = *reinterpret_cast<const uint2*>(eb + 8 * u);
                const uint2 wc = *reinterpret_cast<const uint2*>(ec + 8 * u);
                const uint2 wd = *reinterpret_cast<const uint2*>(ed + 8 * u);
                a[0] = nibble_pair(wa.x, wb.x, sel4, shift4);
                a[1] = nibble_pair(wa.y, wb.y, sel4, shift4);
                a[2] = nibble_pair(wc.x, wd.x, sel4, shift4);
                a[3] = nibble_pair(wc.y, wd.y, sel4, shift4);
              } else {
                const uint32_t wa = *reinterpret_cast<const uint32_t*>(ea + 4 * u) >> (2 * r);
                const uint32_t wb = *reinterpret_cast<const uint32_t*>(eb + 4 * u) >> (2 * r);
                const uint32_t wc = *reinterpret_cast<const uint32_t*>(ec + 4 * u) >> (2 * r);
                const uint32_t wd = *reinterpret_cast<const uint32_t*>(ed + 4 * u) >> (2 * r);
                a[0] = crumb_pair(wa, wb, 0x0400u);
                a[1] = crumb_pair(wa, wb, 0x0602u);
                a[2] = crumb_pair(wc, wd, 0x0400u);
                a[3] = crumb_pair(wc, wd, 0x0602u);
              }
              if (first) c[u][0] = c[u][1] = c[u][2] = c[u][3] = 0.0f;
              mma_16816<__nv_bfloat16>(c[u], a, bf.x, bf.y);
            }
          }
        };
        k_step(0, true);
        for (int s = 1; s < steps; ++s) k_step(s, false);
        // Per m-tile: high + residual (columns 2t, 2t + 1: head t), tokens past the end at -inf.
        float y0[kChannelScoresMaxTiles], y1[kChannelScoresMaxTiles];
        float group_max = -INFINITY;  // of head t over the lane's tokens, then over the group
#pragma unroll
        for (int u = 0; u < kChannelScoresMaxTiles; ++u) {
          y0[u] = y1[u] = -INFINITY;
          if (kFull || u < n_mt) {
            y0[u] = c[u][0] + c[u][1];
            y1[u] = c[u][2] + c[u][3];
            if (!kFull) {
              if (16 * u + r >= n_valid) y0[u] = -INFINITY;
              if (16 * u + r + 8 >= n_valid) y1[u] = -INFINITY;
            }
            group_max = fmaxf(group_max, fmaxf(y0[u], y1[u]));
          }
        }
        float top = -INFINITY, sum = 0.0f;
        // The block's first m-tile (lane r's after the reduce-scatter) and whether it holds a token.
        const bool block_has_tokens = kFull || 16 * (r & ~(mt_block - 1)) < n_valid;
        bool exact = !lse_group_max;
        if (!exact) {
          // One reference per head for the whole group, its max: the sums need no rescaling as
          // they are combined (~70 fewer instructions per group than the per-m-tile maxima). A
          // block whose tokens all lie > 100 log2 units below the group's max would lose them to
          // the exp's flush to zero: then (or with a max that is not finite) the warp takes the
          // exact path below, which every CPU kernel and the reference agree with.
          group_max = fmaxf(group_max, __shfl_xor_sync(kFullMask, group_max, 4));
          group_max = fmaxf(group_max, __shfl_xor_sync(kFullMask, group_max, 8));
          group_max = fmaxf(group_max, __shfl_xor_sync(kFullMask, group_max, 16));
          exact = !__all_sync(kFullMask, fabsf(group_max) < INFINITY);  // NaN, +-inf: exact
          if (!exact) {
            float part[kChannelScoresMaxTiles];
#pragma unroll
            for (int u = 0; u < kChannelScoresMaxTiles; ++u) {
              part[u] = (kFull || u < n_mt) ? fast_exp2(y0[u] - group_max) + fast_exp2(y1[u] - group_max) : 0.0f;
            }
            sum_reduce_scatter8(part, lane);
            sum = part[0];
            for (int off = 4; off < 4 * mt_block; off <<= 1) sum += __shfl_xor_sync(kFullMask, sum, off);
            top = block_has_tokens ? group_max : -INFINITY;
            exact = __any_sync(kFullMask, block_has_tokens && !(sum >= 0x1p-100f));
          }
        }
        if (exact) {
          // The lane's (max, sum of 2^(y - max)) of its two tokens per m-tile; over the 8 lanes of
          // a head (r = 0..7) by a reduce-scatter: lane r ends with m-tile r's log-sum-exp; then
          // the m-tiles of a block (bs / 16 of them) are combined by a butterfly.
          float tile_max[kChannelScoresMaxTiles], tile_sum[kChannelScoresMaxTiles];
#pragma unroll
          for (int u = 0; u < kChannelScoresMaxTiles; ++u) {
            tile_max[u] = -INFINITY;
            tile_sum[u] = 0.0f;
            if (kFull || u < n_mt) lse_pair(y0[u], y1[u], tile_max[u], tile_sum[u]);
          }
          lse_reduce_scatter8(tile_max, tile_sum, lane);
          top = tile_max[0];
          sum = tile_sum[0];
          for (int off = 4; off < 4 * mt_block; off <<= 1) {
            const float m2 = __shfl_xor_sync(kFullMask, top, off), s2 = __shfl_xor_sync(kFullMask, sum, off);
            lse_combine(top, sum, m2, s2);
          }
        }
        // Lane (r, t), r the block's first m-tile, writes the block for head 4 quad + t:
        // -inf for a block with no valid token. The bias shifts every logit of the head alike.
        const int head = quad * 4 + my_head;
        if ((r & (mt_block - 1)) == 0 && r < mt_group && head < G) {
          out[static_cast<int64_t>(head) * NB + static_cast<int64_t>(group) * P + (r >> mt_block_log2)] =
              top == -INFINITY ? -INFINITY : (top + fast_log2(sum) + my_bias) * kLn2;  // sum >= 2^-100
        }
      };
      if (n_valid == kChannelScoresMaxGroupTokens) {
        score_group(std::true_type{});
      } else {
        score_group(std::false_type{});
      }
    }
    __syncwarp();  // the stage is refilled by the next iteration's issue
  }
  cp_async_wait<0>();
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kChannelScoresThreads, kChannelScoresMinBlocks) channel_scores_kernel(const ChannelScoresParams p) {
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
  const int bs = p.block_size;
  const int gt = p.blocks_per_group * bs;
  const int groups = p.num_blocks / p.blocks_per_group;
  const int G = p.q_heads / p.kv_heads;
  if (rows == 0 || groups == 0 || G == 0) return cudaSuccess;
  // channel_scores (channel_scores.cu) checked bs: a power of two in [16, 128].
  if (rows > 0x7fffffff || gt > kChannelScoresMaxGroupTokens) return cudaErrorInvalidValue;
  const size_t smem = channel_scores_smem(G, kHeadDim, p.num_channels, gt, p.bits).total;
  auto kernel = channel_scores_kernel<T, kHeadDim>;
  // (A layout of exactly 48 KiB failed to launch when only the dynamic size was compared with the
  // default limit: common.cuh.)
  AETHER_CUDA_TRY(allow_dynamic_smem(kernel, smem));  // invalid value: G too large
  // One wave of resident CTAs over all rows; each takes a contiguous range of its row's groups.
  int num_sms = 0, per_sm = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kChannelScoresThreads, smem));
  const int64_t wave = static_cast<int64_t>(num_sms) * std::max(per_sm, 1);
  // Rounded down: a few CTAs of a second wave would take as long as the whole first one.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>({wave / rows, ceil_div(groups, kChannelScoresWarps), 65535}));
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(slices));
  return launch_kernel(kernel, grid, dim3(kChannelScoresThreads), smem, stream, p);
}

}  // namespace cuda
}  // namespace aether
