// Key codes and refine scores: the second stage of two-stage selection (KeyCodesParams and
// RefineScoresParams in params.h).
//
// 1. key_codes_kernel<T>, grid (batch * kv_heads, slices, head_dim / 32), 256 threads: one CTA
//    rebuilds 32 channels of one group (Pg * block_size <= 128 tokens) at a time. The slice of the
//    group's keys is staged in shared memory as float32 with independent 16-byte loads (the first
//    version read each channel's tokens from global memory in a loop: a chain of 128 L2
//    latencies, 28 us for an append at 8 x 32k on the H200); a lane per channel and the warps over
//    the tokens take its min / max, one thread per channel adds the warps' and rounds them to bf16
//    and publishes lo and step; then a thread per code byte quantises the byte's codes (division
//    and rint as the CPU kernel: bit-identical codes). A group is always rebuilt from all of its
//    tokens, so an append (first_block set) equals a full build; the append only launches enough
//    CTAs to fill the GPU once (block_build_slices, divided by the channel slices). Channels are
//    independent (a range and a code per channel), so the channel slices need no communication:
//    an append at 8 x 32k (one group per row, 64 rows) spread over 4 x as many CTAs went from
//    31 us (one CTA per group, 4-bit channel-major; H200, ncu) to 12.5 us.
//    Channel-major codes (p.channel_major, read by channel_scores): per group, channel d's run
//    holds its tokens' codes, token t at bit t * bits. The byte a thread packs then spans 8 / bits
//    tokens of one channel; threads of a warp taking consecutive bytes of one run would read
//    s_keys with a stride of (8 / bits) * 32 floats, every lane in the same bank (32-way
//    conflicts). So a thread per (channel, byte of the run) with consecutive lanes on consecutive
//    channels (conflict-free reads) packs into a shared copy of the slice's runs, each run padded
//    to an odd number of words (conflict-free byte stores), which is then written out in order
//    (the slice's runs are contiguous: coalesced). Same quantisation, same bytes as the CPU kernel.
// 2. refine_scores_kernel<T, kHeadDim>, grid (batch * kv_heads, slices), 256 threads, one wave of
//    resident CTAs. Each warp takes a contiguous slice of its row's candidate list (consecutive
//    candidates mostly share a 128-token group) and streams 16-token tiles of codes through a
//    4-stage cp.async ring in shared memory; a group's bf16 ranges travel with its first tile.
//    Scores come from the tensor cores: m16n8k16 with A = the tile's codes (small integers, exact
//    in bf16: a code is OR-ed into the mantissa of 128.0 and 128 subtracted, two codes per packed
//    op) and B = the weights w_c = q_c step_c of 4 query heads, each split into its bf16 rounding
//    (columns 0-3) and the bf16 of the residual (columns 4-7), so high + residual carry ~16
//    mantissa bits and the scores match float32 FMAs to ~1e-6 relative. Inside a k-step the MMA
//    rows 2t, 2t + 1, 2t + 8, 2t + 9 stand for channels t, t + 4, t + 8, t + 12: one shift and
//    mask line up a lane's four codes of a word (the queries are stored in that order). B and
//    base = sum_c q_c lo_c are rebuilt only when the group changes; the tile's log-sum-exp runs in
//    log2 units with warp-uniform maxima and sums. G > 4 heads: one pass per 4 heads.
//    History (30% candidates at 8 x 32k, 16-token blocks, H200, ncu): on CUDA cores, a CTA per 8
//    entries 171 us; one wave of striding warps 140 us; 4 heads x 8 tokens per reduce-scatter at
//    128 registers 224 us; 80 registers, 24 warps per SM 127 us (20 M warp instructions, bound by
//    the latency per entry). Tensor cores with a cp.async ring: 119 us, 49 M instructions
//    (instruction-bound: the per-lane unpacking, divisions by runtime sizes, the weights rebuilt
//    per entry); with the MMA channel order, pre-divided queries and the log2 epilogue 51 us,
//    27 M instructions (bench/results/ncu_refine_h200.md). Its bytes alone would take ~5 us.
//    At 50% candidates (1024 per row): 33.6 M instructions, 60.5 us; the per-tile epilogue's
//    exp2f / log2f (subnormal handling in ~4 and ~25 SASS instructions each) replaced by MUFU
//    ex2 / lg2: 28.2 M, 56.9 us (H200, ncu; bench/PERF_NOTES.md, ninth session).
//    (radar_select given equal scores selects identically; tests compare scores with a tolerance).
//    Bytes read per candidate token: D * bits / 8 (+ 4D range bytes per group and candidate).
#pragma once

#include <cmath>
#include <type_traits>

#include "aether/cuda/common.cuh"
#include "aether/cuda/mma.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kCodesThreads = 256;
constexpr int kRefineThreads = 256;
constexpr int kRefineWarps = kRefineThreads / kWarpSize;
constexpr int kRefineTile = 16;    // tokens per MMA tile (the m of m16n8k16)
constexpr int kRefineStages = 4;   // tiles in flight per warp (cp.async ring); a power of two
static_assert((kRefineStages & (kRefineStages - 1)) == 0, "the ring index is a mask");

// Shared memory of refine_scores: the group's queries as float32, then per warp kRefineStages
// stages of one tile's codes and one group's bf16 ranges.
__host__ __device__ inline size_t refine_query_smem_bytes(int group, int head_dim) {
  return sizeof(float) * static_cast<size_t>((group + 3) / 4 * 4) * head_dim;  // heads padded to quads
}
__host__ __device__ constexpr size_t refine_stage_bytes(int head_dim, int bits) {
  return static_cast<size_t>(kRefineTile) * head_dim * bits / 8 + 4 * static_cast<size_t>(head_dim);
}
// The B-fragment table of a warp: a row of 2 words per k-step for each lane, padded by 4 words so
// that the lanes' 16-byte reads do not share banks.
__host__ __device__ constexpr int refine_table_stride(int head_dim) { return 2 * (head_dim / 16) + 4; }
__host__ __device__ inline size_t refine_warp_bytes(int head_dim, int bits) {
  return kRefineStages * refine_stage_bytes(head_dim, bits) + sizeof(uint32_t) * kWarpSize * refine_table_stride(head_dim);
}
constexpr int kMaxGroupTokens = 128;
constexpr int kCodesSliceChannels = 32;  // channels per CTA of the build (head_dim is a multiple)
constexpr int kCodesWarps = kCodesThreads / kWarpSize;  // the most warps of a build CTA (shared memory is sized for them)
// KeyCodesParams::narrow: CTAs that fit on an SM beside two sparse_decode CTAs (head_dim 128: 4
// warps x 214 registers and ~101 KiB of shared memory each, ptxas, sm_90a), which leave ~10 K of
// the 64 K registers and ~25 KiB of the 228 KiB. A 256-thread CTA (32 K registers) would wait for
// the decode's CTAs; a 64-thread one of <= 80 registers (5 K) that stages the keys as 16-bit
// values (~9 KB at 128-token groups) fits twice, so that an 8 x 32k append's 256 CTAs all run
// beside the decode's 256 at once. At 124 registers and float staging (~21 KB) one fitted per SM:
// two rounds, 54 us beside a 43 us decode (H200, torch.profiler), past its end.
constexpr int kCodesNarrowThreads = 64;
constexpr int kCodesNarrowMinCtas = 12;  // per SM, for the register bound: 65536 / (12 * 64) -> <= 80
template <int kThreads>
constexpr int key_codes_min_ctas() { return kThreads == kCodesNarrowThreads ? kCodesNarrowMinCtas : 2; }

// Channel-major packing: channel d's run of the group in shared memory starts at d * this (bytes),
// an odd number of words (the run's words, plus one when even) so that lanes on consecutive
// channels store to different banks. A run is 4..64 bytes (16..128 tokens of 2 or 4 bits).
__host__ __device__ constexpr int key_codes_run_stride(int group_tokens, int bits) {
  return 4 * ((group_tokens * bits / 32) | 1);
}

// Dynamic shared memory of the build kernel (one CTA: one group, kCodesSliceChannels channels):
// the slice's keys [tokens][32] (float32 in the wide launch, the key type in the narrow one:
// key_bytes), the warps' partial minima and maxima [2][warps][32], lo and step [32]; channel-major,
// then the packed runs [32][key_codes_run_stride].
constexpr size_t key_codes_smem_bytes(int group_tokens, int bits, bool channel_major, size_t key_bytes = sizeof(float),
                                      int warps = kCodesWarps) {
  return key_bytes * static_cast<size_t>(group_tokens) * kCodesSliceChannels +
         sizeof(float) * (2 * static_cast<size_t>(warps) * kCodesSliceChannels + 2 * kCodesSliceChannels) +
         (channel_major ? kCodesSliceChannels * static_cast<size_t>(key_codes_run_stride(group_tokens, bits)) : 0);
}
static_assert(key_codes_smem_bytes(kMaxGroupTokens, 4, true) <= 48 * 1024 &&
                  key_codes_smem_bytes(kMaxGroupTokens, 2, true) <= 48 * 1024,
              "the build kernel stays within the default dynamic shared memory (no opt-in)");

// Code of x in [lo, lo + levels * step] as the CPU's quantise_level: rint((x - lo) / step) with
// one float32 subtraction and division (round to nearest), clamped; 0 when step is not > 0 or the
// quotient is NaN (fmaxf returns 0 for a NaN level).
__device__ __forceinline__ unsigned quantise_code(float x, float lo, float step, int levels) {
  if (!(step > 0.0f)) return 0u;
  const float level = rintf(__fdiv_rn(__fsub_rn(x, lo), step));
  return static_cast<unsigned>(fminf(fmaxf(level, 0.0f), static_cast<float>(levels)));
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

// Channel-major packing when a run is whole 32-bit words (32 / kBits tokens each; every block
// size the torch op accepts): lane d of each warp quantises channel c0 + d (conflict-free reads of
// s_keys) for the words warp, warp + kWarps, ... of its run and stores each word. ~20
// instructions per code (the division's reciprocal is still recomputed per code: ptxas does not
// hoist it out of __fdiv_rn) against ~130 per element for the byte-per-thread path below (its run-length
// divisions, per-byte loops and the staging copy; 4.27 M warp instructions for an 8 x 32k append,
// H200 ncu, bench/PERF_NOTES.md thirteenth session). Same codes, same bytes: word w holds tokens
// w * (32 / kBits) + e at bit e * kBits, little-endian, which is byte-for-byte the run's order.
// With a channel pool a lane's run goes to its channel's slot (`slot`), and a lane whose channel is
// not stored (slot < 0) writes nothing.
template <int kBits, int kWarps, typename S>
__device__ __forceinline__ void pack_channel_run_words(const S* s_keys, const float* s_lo, const float* s_step,
                                                       int n, int words, uint8_t* group_codes, int slot, int run_bytes) {
  constexpr int kPerWord = 32 / kBits;
  constexpr int kLevels = (1 << kBits) - 1;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (slot < 0) return;  // warp-divergent only within the warp's lanes; no barrier below
  const float lo = s_lo[lane], step = s_step[lane];
  uint32_t* run = reinterpret_cast<uint32_t*>(group_codes + static_cast<int64_t>(slot) * run_bytes);
  // quantise_code's step test once per channel, so that the division's reciprocal is computed
  // once per word rather than per code (a constant channel: every code 0).
  const bool varies = step > 0.0f;
  for (int w = warp; w < words; w += kWarps) {
    uint32_t word = 0;
    if (varies) {
#pragma unroll
      for (int e = 0; e < kPerWord; ++e) {
        const int t = w * kPerWord + e;
        const float x = to_float(s_keys[min(t, n - 1) * kCodesSliceChannels + lane]);
        const float level = rintf(__fdiv_rn(__fsub_rn(x, lo), step));
        const unsigned code = static_cast<unsigned>(fminf(fmaxf(level, 0.0f), static_cast<float>(kLevels)));
        word |= (t < n ? code : 0u) << (e * kBits);
      }
    }
    run[w] = word;
  }
}

// kThreads: kCodesThreads, or kCodesNarrowThreads for KeyCodesParams::narrow (above).
// The wide launch: at most 128 registers (two CTAs per SM): without the bound the word packing
// took 174 (one CTA per SM, so an 8 x 32k append's 256 working CTAs would need two waves); at 128
// nothing spills. It converts the keys to float32 while staging them (registers in flight); the
// narrow one copies them as they are (cp.async, no registers) and converts on each read (exact:
// the same floats, the same codes).
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, key_codes_min_ctas<kThreads>()) key_codes_kernel(const KeyCodesParams p) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kCodesThreads && kThreads >= 2 * kCodesSliceChannels,
                "whole warps, at most 8, a thread per lo / hi entry");
  constexpr int kWarps = kThreads / kWarpSize;
  constexpr bool kRawKeys = kThreads == kCodesNarrowThreads;
  using Staged = std::conditional_t<kRawKeys, T, float>;
  pdl_begin();  // before any global read (common.cuh)
  extern __shared__ __align__(16) float s_codes_dyn[];
  constexpr int C = kCodesSliceChannels;
  constexpr int kLog2C = 5;
  static_assert(C == 1 << kLog2C && C == kWarpSize, "a lane per channel of the slice");
  const int D = p.head_dim;
  const int bits = p.bits;
  const int levels = (1 << bits) - 1;
  const int per_byte = 8 / bits;
  const int token_bytes = D * bits / 8;
  const int P = p.blocks_per_group;
  const int gt = P * p.block_size;   // tokens of a group
  Staged* s_keys = reinterpret_cast<Staged*>(s_codes_dyn);  // [gt][C] (a multiple of 16 bytes)
  float* s_min = reinterpret_cast<float*>(s_keys + gt * C);  // [warps][C]
  float* s_max = s_min + kWarps * C;
  float* s_lo = s_max + kWarps * C;       // [C]
  float* s_step = s_lo + C;               // [C]
  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int c0 = blockIdx.z * C;  // this CTA's channels c0 .. c0 + C - 1
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int len = max(p.seq_lens[b], 0);
  const int capacity = p.num_blocks / P;  // groups
  const int n_groups = min((len + gt - 1) / gt, capacity);
  const int begin = p.first_block != nullptr ? max(p.first_block[b], 0) / P : 0;
  const int end = p.first_block != nullptr ? n_groups : capacity;
  const int run_bytes = gt * bits / 8;       // channel-major: one channel's codes of the group
  // The codes of the group's P blocks are contiguous: S runs channel-major (S = D without a pool).
  const int S = p.channel_major && p.channel_slots != nullptr ? p.stored_channels : D;
  const int group_bytes = p.channel_major ? S * run_bytes : gt * token_bytes;
  const int slice_bytes = C * bits / 8;      // token-major: one token's codes of the slice (8 or 16)
  const int slice_log2 = __ffs(slice_bytes) - 1;
  // Channel-major: the slot of each of this CTA's channels' runs, -1 when a pool does not store it.
  __shared__ int s_slot[C];
  if (tid < C) {
    const int slot = p.channel_slots == nullptr ? c0 + tid : p.channel_slots[static_cast<int64_t>(bh) * D + c0 + tid];
    s_slot[tid] = slot >= 0 && slot < S ? slot : -1;
  }
  // An update with running spreads (params.h): this CTA walks the row's rebuilt groups in order
  // (the launcher gives it the whole row: gridDim.y == 1), and the lane that publishes channel
  // c0 + tid's range carries its running sum, from the entry of the group before the first one.
  const bool keeps_spreads = p.spreads != nullptr && p.first_block != nullptr;
  double* spreads = keeps_spreads ? p.spreads + static_cast<int64_t>(bh) * capacity * D + c0 + tid : nullptr;
  double spread_acc = 0.0;
  if (keeps_spreads && tid < C && begin > 0 && begin < end) spread_acc = spreads[static_cast<int64_t>(begin - 1) * D];
  __syncthreads();

  for (int m = begin + blockIdx.y; m < end; m += gridDim.y) {
    const int64_t row = static_cast<int64_t>(bh) * capacity + m;
    uint8_t* codes = p.codes + row * group_bytes;
    uint16_t* ranges = p.ranges + row * 2 * D;
    const int n = m < n_groups ? min(gt, len - m * gt) : 0;
    if (n == 0) {  // past the end (full build only): zeros; uniform over the CTA
      for (int i = tid; i < gt * slice_bytes; i += kThreads) {
        if (p.channel_major) {
          const int slot = s_slot[i / run_bytes];  // run_bytes need not be a power of two here
          if (slot >= 0) codes[slot * run_bytes + i % run_bytes] = 0;
        } else {
          codes[(i >> slice_log2) * token_bytes + c0 * bits / 8 + (i & (slice_bytes - 1))] = 0;
        }
      }
      if (tid < 2 * C) ranges[(tid / C) * D + c0 + tid % C] = 0;
      continue;
    }
    if constexpr (kRawKeys) {  // 16-byte copies straight into shared memory, all in flight at once
      constexpr int kPerCopy = 16 / sizeof(T);
      constexpr int kCopies = C / kPerCopy;  // per token
      const uint32_t s_base = static_cast<uint32_t>(__cvta_generic_to_shared(s_keys));
      for (int i = tid; i < n * kCopies; i += kThreads) {
        const int t = i / kCopies, e = (i % kCopies) * kPerCopy;
        cp_async_16(s_base + static_cast<uint32_t>((t * C + e) * sizeof(T)), codes_key_row<T>(p, b, h, m, t) + c0 + e, 16);
      }
      cp_async_commit();
      cp_async_wait<0>();
    } else {
      // Stage the slice of the group's keys: 16-byte vector loads, 8 per thread in flight together
      // (a loop of load-then-store waited one latency per vector).
      stage_rows_as_float<kThreads, 8>(s_keys, C, n, C / 8,
                                       [&](int t) { return codes_key_row<T>(p, b, h, m, t) + c0; });
    }
    __syncthreads();
    {  // lane = channel, warps over the tokens; then one lane per channel adds up the warps
      float mn = INFINITY, mx = -INFINITY;
      for (int t = warp; t < n; t += kWarps) {
        const float x = to_float(s_keys[t * C + lane]);
        mn = fminf(mn, x);
        mx = fmaxf(mx, x);
      }
      s_min[warp * C + lane] = mn;
      s_max[warp * C + lane] = mx;
    }
    __syncthreads();
    if (tid < C) {
      float mn = s_min[tid], mx = s_max[tid];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        mn = fminf(mn, s_min[w * C + tid]);
        mx = fmaxf(mx, s_max[w * C + tid]);
      }
      const __nv_bfloat16 lo = __float2bfloat16_rn(mn);
      const __nv_bfloat16 hi = __float2bfloat16_rn(mx);
      ranges[c0 + tid] = __bfloat16_as_ushort(lo);
      ranges[D + c0 + tid] = __bfloat16_as_ushort(hi);
      if (keeps_spreads) {  // as code_spreads: no fused multiply-add, the same bits
        const double width = __dsub_rn(static_cast<double>(__bfloat162float(hi)), static_cast<double>(__bfloat162float(lo)));
        spread_acc = __dadd_rn(spread_acc, __dmul_rn(width, width));
        spreads[static_cast<int64_t>(m) * D] = spread_acc;
      }
      s_lo[tid] = __bfloat162float(lo);
      s_step[tid] = __fdiv_rn(__fsub_rn(__bfloat162float(hi), __bfloat162float(lo)), static_cast<float>(levels));
    }
    __syncthreads();
    if (p.channel_major && run_bytes % 4 == 0) {
      if (bits == 4) {
        pack_channel_run_words<4, kWarps>(s_keys, s_lo, s_step, n, run_bytes / 4, codes, s_slot[lane], run_bytes);
      } else {
        pack_channel_run_words<2, kWarps>(s_keys, s_lo, s_step, n, run_bytes / 4, codes, s_slot[lane], run_bytes);
      }
    } else if (p.channel_major) {
      // Byte r of channel d's run holds tokens r * per_byte ..; lanes on consecutive channels.
      const int run_stride = key_codes_run_stride(gt, bits);
      uint8_t* s_runs = reinterpret_cast<uint8_t*>(s_step + C);  // [C][run_stride]
      for (int x = tid; x < C * run_bytes; x += kThreads) {
        const int d = x & (C - 1);
        const int r = x >> kLog2C;
        const int first = r * per_byte;  // first token of this byte
        const float lo = s_lo[d], step = s_step[d];
        unsigned byte = 0;
        for (int e = 0; e < per_byte && first + e < n; ++e) {
          byte |= quantise_code(to_float(s_keys[(first + e) * C + d]), lo, step, levels) << (e * bits);
        }
        s_runs[d * run_stride + r] = static_cast<uint8_t>(byte);
      }
      __syncthreads();
      // run_bytes need not be a power of two (a block size such as 24 is valid at this level)
      for (int i = tid; i < C * run_bytes; i += kThreads) {
        const int slot = s_slot[i / run_bytes];
        if (slot >= 0) codes[slot * run_bytes + i % run_bytes] = s_runs[(i / run_bytes) * run_stride + i % run_bytes];
      }
    } else {
      for (int i = tid; i < gt * slice_bytes; i += kThreads) {
        const int t = i >> slice_log2;
        const int first = (i & (slice_bytes - 1)) * per_byte;  // first channel of this byte (in the slice)
        unsigned byte = 0;
        if (t < n) {
          for (int e = 0; e < per_byte; ++e) {
            const int d = first + e;
            byte |= quantise_code(to_float(s_keys[t * C + d]), s_lo[d], s_step[d], levels) << (e * bits);
          }
        }
        codes[t * token_bytes + c0 * bits / 8 + (i & (slice_bytes - 1))] = static_cast<uint8_t>(byte);
      }
    }
    __syncthreads();  // s_keys, s_lo, s_step and s_runs are rewritten by the next group
  }
}

// Channel order inside a 16-channel k-step: MMA rows k = 2t, 2t + 1, 2t + 8, 2t + 9 (what lane
// t % 4 holds of A and B) stand for channels t, t + 4, t + 8, t + 12 of the step, so that one shift
// by the lane's offset lines up all four of its codes in a word for byte / half-word extraction.
// A code c becomes the bf16 128 + c by OR-ing it into the mantissa of 128.0 (exact for c < 128);
// one packed subtraction leaves c (minus_128, mma.cuh): no integer-to-float conversions.
// 2-bit: a word holds channels i = 0..15 of a step at bits 2i; lane t needs bits 2t + {0, 8, 16, 24}.
__device__ __forceinline__ void code_pairs_2bit(uint32_t word, int t, uint32_t& low, uint32_t& high) {
  const uint32_t y = (word >> (2 * t)) & 0x03030303u;   // bytes: codes of channels t, t+4, t+8, t+12
  low = minus_128(__byte_perm(y, 0x43434343u, 0x4140));  // halves 0x4300 | byte 0, 0x4300 | byte 1
  high = minus_128(__byte_perm(y, 0x43434343u, 0x4342));
}
// 4-bit: two words hold channels 0..7 and 8..15 at bits 4 (i % 8); lane t needs bits 4t and 4t + 16.
__device__ __forceinline__ uint32_t code_pair_4bit(uint32_t word, int t) {
  return minus_128(((word >> (4 * t)) & 0x000F000Fu) | 0x43004300u);
}

// One warp's slice of one (b, kv head) list. s_q: the group's queries, float32, divided by the
// code levels, heads padded with zeros to a multiple of 4 and each k-step's channels in the MMA
// order: float4 (s, t) of a head holds channels 16s + t + {0, 4, 8, 12}.
template <int kHeadDim, int kBits>
__device__ __forceinline__ void refine_scores_warp(const RefineScoresParams& p, const float* s_q, char* s_warp,
                                                   int* s_j, int* s_new_group, int item, int warp_id, int num_warps) {
  constexpr int kSteps = kHeadDim / 16;                  // m16n8k16 k-steps over the channels
  constexpr int kTokenBytes = kHeadDim * kBits / 8;      // one token's codes
  constexpr int kTokenWords = kTokenBytes / 4;
  constexpr int kTileBytes = kRefineTile * kTokenBytes;  // 16 tokens
  constexpr int kRangeBytes = 2 * kHeadDim * 2;          // bf16 lo[D], hi[D] of one group
  constexpr int kStageBytes = static_cast<int>(refine_stage_bytes(kHeadDim, kBits));  // the launcher's layout
  static_assert(kStageBytes == kTileBytes + kRangeBytes, "a stage is one tile of codes and one group's ranges");
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kTableStride = refine_table_stride(kHeadDim);
  uint32_t* s_table = reinterpret_cast<uint32_t*>(s_warp + kRefineStages * kStageBytes);
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
  // tiles and blocks_per_group are powers of two: shifts, not integer divisions, per tile
  const int tiles_log2 = __ffs(tiles) - 1;
  const int group_log2 = __ffs(p.blocks_per_group) - 1;
  const int len = max(p.seq_lens[b], 0);
  const int NB = p.num_blocks;
  const int n_blocks = min((len + bs - 1) / bs, min(NB, L));
  const float levels = static_cast<float>((1u << kBits) - 1u);
  const float scale2 = p.scale * kLog2e;  // scores in log2 units until the write
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
    // kRefineStages - 1 units ahead of its use, a group's ranges with its first tile.
    int window = begin;
    int my_j = begin + lane < end ? list[begin + lane] : -1;
    int issued_group = -1;
    auto issue = [&](int unit, int stage) {
      if (unit < units_end) {
        const int e = unit >> tiles_log2, tile = unit & (tiles - 1);
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
          const int group = j >> group_log2;
          const bool fresh = group != issued_group;
          if (fresh) {
            const char* ranges = reinterpret_cast<const char*>(item_ranges + static_cast<int64_t>(group) * 2 * kHeadDim);
            for (int c = lane; c < kRangeBytes / 16; c += kWarpSize) {
              cp_async_16(shared_address(dst + kTileBytes + c * 16), ranges + c * 16, 16u);
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
    // B fragments of the current group: w_c = q_c step_c for head 4 quad + (g & 3), as bf16 (columns
    // 0-3) and the bf16 of its rounding residual (columns 4-7): high + residual carry ~16 bits.
    uint32_t bfrag[kSteps][2];
    float bias_a = 0.0f, bias_b = 0.0f;  // scale2 * sum_c q_c lo_c of output heads 2 (t & 1) (+1)
    // Running log-sum-exp of the lane's two heads, log2 units, equal in all lanes of a head pair.
    float top_a = -INFINITY, sum_a = 0.0f, top_b = -INFINITY, sum_b = 0.0f;
    for (int unit = units_begin; unit < units_end; ++unit) {
      const int rel = unit - units_begin;
      issue(unit + kRefineStages - 1, (rel + kRefineStages - 1) & (kRefineStages - 1));
      cp_async_wait<kRefineStages - 1>();
      __syncwarp();
      const int stage = rel & (kRefineStages - 1);  // rel >= 0; a signed % cost ~5 instructions
      const char* src = s_warp + stage * kStageBytes;
      const int j = s_j[stage];
      const int tile = unit & (tiles - 1);
      if (j >= 0) {
        if (s_new_group[stage]) {
          // Each weight once: lane (s, t') of a step computes channels 16s + t' + {0, 4, 8, 12}
          // of the 4 heads and writes their high and residual pairs into the rows of the lanes
          // that hold them as B fragments (row g * 4 + t' for head g & 3, part g >> 2); every
          // lane then reads its row with 16-byte loads. (Computed in the fragment layout itself,
          // each weight would be built twice, by the lanes of its high and its residual part.)
          const uint16_t* lo_bits = reinterpret_cast<const uint16_t*>(src + kTileBytes);
          float base[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          for (int set = lane; set < kSteps * 4; set += kWarpSize) {
            const int s = set >> 2, tp = set & 3;
            float lo[4], d[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int c = 16 * s + tp + 4 * u;
              lo[u] = __uint_as_float(static_cast<uint32_t>(lo_bits[c]) << 16);
              d[u] = __uint_as_float(static_cast<uint32_t>(lo_bits[kHeadDim + c]) << 16) - lo[u];
            }
#pragma unroll
            for (int hh = 0; hh < 4; ++hh) {
              const float4 qv = reinterpret_cast<const float4*>(s_q + (quad * 4 + hh) * kHeadDim)[set];
              const float qc[4] = {qv.x, qv.y, qv.z, qv.w};
              float w[4];
#pragma unroll
              for (int u = 0; u < 4; ++u) {
                base[hh] = fmaf(qc[u], lo[u], base[hh]);  // q / levels: scaled back below
                w[u] = qc[u] * d[u];
              }
              const __nv_bfloat162 high0 = __floats2bfloat162_rn(w[0], w[1]);
              const __nv_bfloat162 high1 = __floats2bfloat162_rn(w[2], w[3]);
              const float2 h0 = __bfloat1622float2(high0), h1 = __bfloat1622float2(high1);
              const __nv_bfloat162 res0 = __floats2bfloat162_rn(w[0] - h0.x, w[1] - h0.y);
              const __nv_bfloat162 res1 = __floats2bfloat162_rn(w[2] - h1.x, w[3] - h1.y);
              *reinterpret_cast<uint2*>(s_table + (hh * 4 + tp) * kTableStride + 2 * s) =
                  make_uint2(*reinterpret_cast<const uint32_t*>(&high0), *reinterpret_cast<const uint32_t*>(&high1));
              *reinterpret_cast<uint2*>(s_table + ((hh + 4) * 4 + tp) * kTableStride + 2 * s) =
                  make_uint2(*reinterpret_cast<const uint32_t*>(&res0), *reinterpret_cast<const uint32_t*>(&res1));
            }
          }
#pragma unroll
          for (int hh = 0; hh < 4; ++hh) {
#pragma unroll
            for (int off = 1; off < kWarpSize; off <<= 1) base[hh] += __shfl_xor_sync(kFullMask, base[hh], off);
          }
          __syncwarp();
          const uint4* row = reinterpret_cast<const uint4*>(s_table + lane * kTableStride);
#pragma unroll
          for (int i = 0; i < kSteps / 2; ++i) {
            const uint4 v = row[i];
            bfrag[2 * i][0] = v.x;
            bfrag[2 * i][1] = v.y;
            bfrag[2 * i + 1][0] = v.z;
            bfrag[2 * i + 1][1] = v.w;
          }
          bias_a = (t & 1 ? base[2] : base[0]) * (levels * scale2);
          bias_b = (t & 1 ? base[3] : base[1]) * (levels * scale2);
        }
        const int n = min(bs, len - j * bs) - tile * kRefineTile;  // warp-uniform
        if (n > 0) {
          // A fragments from the staged codes, rows g and g + 8 of the tile. Two accumulators
          // halve the chain of dependent MMAs.
          const uint32_t* row0 = reinterpret_cast<const uint32_t*>(src) + g * kTokenWords;
          const uint32_t* row1 = row0 + 8 * kTokenWords;
          float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
          for (int s = 0; s < kSteps; ++s) {
            uint32_t a[4];
            if constexpr (kBits == 2) {
              code_pairs_2bit(row0[s], t, a[0], a[2]);
              code_pairs_2bit(row1[s], t, a[1], a[3]);
            } else {
              a[0] = code_pair_4bit(row0[2 * s], t);
              a[1] = code_pair_4bit(row1[2 * s], t);
              a[2] = code_pair_4bit(row0[2 * s + 1], t);
              a[3] = code_pair_4bit(row1[2 * s + 1], t);
            }
            mma_16816<__nv_bfloat16>(acc[s & 1], a, bfrag[s][0], bfrag[s][1]);
          }
          float c[4];
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            c[v] = acc[0][v] + acc[1][v];
            c[v] += __shfl_xor_sync(kFullMask, c[v], 2);  // columns 2t (+1) and 2t + 4 (+1): high + residual
          }
          // Tokens g and g + 8 of heads a = 2 (t & 1), b = a + 1; then the tile's maxima and sums
          // over the 8 row groups, merged into the running (warp-uniform) log-sum-exp.
          const float xa0 = g < n ? fmaf(scale2, c[0], bias_a) : -INFINITY;
          const float xb0 = g < n ? fmaf(scale2, c[1], bias_b) : -INFINITY;
          const float xa1 = g + 8 < n ? fmaf(scale2, c[2], bias_a) : -INFINITY;
          const float xb1 = g + 8 < n ? fmaf(scale2, c[3], bias_b) : -INFINITY;
          float ma = fmaxf(xa0, xa1), mb = fmaxf(xb0, xb1);
#pragma unroll
          for (int off = 4; off < kWarpSize; off <<= 1) {
            ma = fmaxf(ma, __shfl_xor_sync(kFullMask, ma, off));
            mb = fmaxf(mb, __shfl_xor_sync(kFullMask, mb, off));
          }
          ma = fmaxf(ma, top_a);  // finite: token 0 of the tile is valid
          mb = fmaxf(mb, top_b);
          float ea = fast_exp2(xa0 - ma) + fast_exp2(xa1 - ma), eb = fast_exp2(xb0 - mb) + fast_exp2(xb1 - mb);
#pragma unroll
          for (int off = 4; off < kWarpSize; off <<= 1) {
            ea += __shfl_xor_sync(kFullMask, ea, off);
            eb += __shfl_xor_sync(kFullMask, eb, off);
          }
          sum_a = sum_a * fast_exp2(top_a - ma) + ea;  // exp2(-inf) = 0 at the first tile
          sum_b = sum_b * fast_exp2(top_b - mb) + eb;
          top_a = ma;
          top_b = mb;
        }
        if (tile == tiles - 1) {  // the block's last tile: write its heads' log-masses
          if (g == 0 && t < 2) {
            const int head = quad * 4 + 2 * t;
            float* out = p.head_scores + (static_cast<int64_t>(b) * p.q_heads + h * G + head) * L + j;
            constexpr float kLn2 = 0.6931471805599453f;
            // sum >= 1 (the maximum's own term): MUFU.LG2 (log2f was ~50 of a tile's ~480 instructions)
            if (head < G) out[0] = (top_a + fast_log2(sum_a)) * kLn2;
            if (head + 1 < G) out[L] = (top_b + fast_log2(sum_b)) * kLn2;
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

// 3 CTAs (24 warps) per SM at 80 registers, a few bytes spilled, beats 2 CTAs at 122 registers
// without spills: 42.4 vs 47.4 us (30% candidates at 8 x 32k, H200).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kRefineThreads, 3) refine_scores_kernel(const RefineScoresParams p) {
  pdl_begin();  // before any global read (common.cuh)
  extern __shared__ __align__(16) char s_mem[];  // queries [G padded to 4][D] float32, then each warp's stages
  __shared__ int s_j[kRefineWarps][kRefineStages];
  __shared__ int s_new_group[kRefineWarps][kRefineStages];
  float* s_q = reinterpret_cast<float*>(s_mem);
  const int item = blockIdx.x;  // (b, kv head)
  const int b = item / p.kv_heads;
  const int h = item % p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  const int G4 = (G + 3) / 4 * 4;
  {
    const float inv_levels = 1.0f / static_cast<float>((1u << p.bits) - 1u);
    const T* q_group = static_cast<const T*>(p.q) + b * p.q_stride_batch + static_cast<int64_t>(h) * G * p.q_stride_head;
    for (int x = threadIdx.x; x < G4 * kHeadDim; x += kRefineThreads) {
      // x = head * D + 16 s + 4 t + u holds channel 16 s + t + 4 u (the MMA order)
      const int head = x / kHeadDim, r = x % kHeadDim;
      const int channel = (r & ~15) + ((r >> 2) & 3) + 4 * (r & 3);
      s_q[x] = head < G ? to_float(q_group[static_cast<int64_t>(head) * p.q_stride_head + channel]) * inv_levels : 0.0f;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  char* s_warp = s_mem + refine_query_smem_bytes(G, kHeadDim) + static_cast<size_t>(warp) * refine_warp_bytes(kHeadDim, p.bits);
  const int warp_id = blockIdx.y * kRefineWarps + warp;
  const int num_warps = gridDim.y * kRefineWarps;
  if (p.bits == 2) {
    refine_scores_warp<kHeadDim, 2>(p, s_q, s_warp, s_j[warp], s_new_group[warp], item, warp_id, num_warps);
  } else {
    refine_scores_warp<kHeadDim, 4>(p, s_q, s_warp, s_j[warp], s_new_group[warp], item, warp_id, num_warps);
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_refine_scores(const RefineScoresParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  if (heads == 0 || p.num_blocks == 0 || p.list_length == 0) return cudaSuccess;
  if (heads > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.block_size % kRefineTile != 0 || (p.bits != 2 && p.bits != 4)) return cudaErrorInvalidValue;
  const int G = p.q_heads / p.kv_heads;
  const size_t smem = refine_query_smem_bytes(G, kHeadDim) + static_cast<size_t>(kRefineWarps) * refine_warp_bytes(kHeadDim, p.bits);
  auto kernel = refine_scores_kernel<T, kHeadDim>;
  AETHER_CUDA_TRY(allow_dynamic_smem(kernel, smem));  // invalid value: G too large
  // One wave of resident CTAs; each warp takes a contiguous slice of its row's list.
  int num_sms = 0, per_sm = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kRefineThreads, smem));
  const int64_t wave = static_cast<int64_t>(num_sms) * std::max(per_sm, 1);
  const int64_t slices = std::min<int64_t>({ceil_div(wave, heads), ceil_div(p.list_length, kRefineWarps), 65535});
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(std::max<int64_t>(slices, 1)));
  return launch_kernel(kernel, dim3(grid), dim3(kRefineThreads), smem, stream, p);
}

template <typename T>
cudaError_t launch_key_codes(const KeyCodesParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int groups = p.num_blocks / p.blocks_per_group;
  // Channel-major runs are whole bytes: Pg * block_size * bits / 8 (params.h).
  if (p.channel_major && (p.blocks_per_group * p.block_size * p.bits) % 8 != 0) return cudaErrorInvalidValue;
  if (heads == 0 || groups == 0) return cudaSuccess;
  if (p.head_dim % kCodesSliceChannels != 0) return cudaErrorInvalidValue;
  const int channel_slices = p.head_dim / kCodesSliceChannels;
  int64_t slices = 0;  // an append fills the GPU once counting the channel slices as heads
  AETHER_CUDA_TRY(block_build_slices(groups, heads * channel_slices, p.first_block != nullptr, &slices));
  // An update that keeps running spreads walks each row's groups in order in one CTA per channel
  // slice (a decode append rebuilds one group per row: the other slices had nothing to do).
  if (p.spreads != nullptr && p.first_block != nullptr) slices = 1;
  // At most ~20 KB (32 channels of a 128-token group): never above the default 48 KB limit.
  const int gt = p.block_size * p.blocks_per_group;
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(slices), static_cast<unsigned>(channel_slices));
  if (p.narrow) {
    // the packed runs' staging only where the byte path uses it (runs not whole words): two
    // narrow CTAs must fit in the ~25 KiB that two decode CTAs leave
    const bool byte_runs = p.channel_major != 0 && (gt * p.bits / 8) % 4 != 0;
    const size_t smem = key_codes_smem_bytes(gt, p.bits, byte_runs, sizeof(T), kCodesNarrowThreads / kWarpSize);
    return launch_kernel(key_codes_kernel<T, kCodesNarrowThreads>, grid, dim3(kCodesNarrowThreads), smem, stream, p);
  }
  const size_t smem = key_codes_smem_bytes(gt, p.bits, p.channel_major != 0);
  return launch_kernel(key_codes_kernel<T, kCodesThreads>, grid, dim3(kCodesThreads), smem, stream, p);
}

}  // namespace cuda
}  // namespace aether
