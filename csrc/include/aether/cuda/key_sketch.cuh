// Key sketch kernels: the 4-bit token sketch (key_sketch) and the "qsketch" block score.
//
// Sketch blocks: P = blocks_per_sketch consecutive blocks (a power of two, P * block_size <= 128)
// share one set of bf16 ranges and one bf16 centroid; codes stay per token, [B, Hkv, NB, bs, R/2],
// so the codes of sketch block m are the contiguous bytes of blocks mP .. mP + P - 1.
//
// 1. key_sketch_kernel<T, kHeadDim>, grid (batch * kv_heads, slices), 256 threads: one
//    CTA builds one sketch block (SB = P * block_size tokens) at a time. Its keys are staged in
//    shared memory as float32 (rows padded by one float against bank conflicts), block by block
//    (paged: P pages), then each thread computes whole coefficients x_tr = key_proj_h^T k_t (a
//    D-long dot product from shared memory, no shuffles: the first version reduced every
//    coefficient over a warp and was latency-bound, ~40 us for one block per head), while one
//    thread per channel sums the staged keys in token order for the centroid (<= 128 adds; the
//    order makes it bit-identical to the CPU kernel and the reference); a warp per coefficient
//    takes its min / max (bf16, round to nearest even), and all threads quantise and pack two
//    codes per byte. A sketch block is always rebuilt from all of its tokens, so an append
//    (first_block set: the sketch blocks from first_block / P on) equals a full build.
// 2. sketch_score_kernel<kHeadDim, kRank>, grid (batch * kv_heads, slices), 256 threads. The
//    CTA stages u_g = query_proj_g^T q_g and, for a centroid weight a != 0, q'_g = q_g - key_proj_h
//    u_g for the G heads of its group, both pre-scaled to 2^-units (scale * log2 e). A warp scores
//    spans of 8 consecutive blocks, four lanes per block, reading codes, ranges and centroids
//    from a per-warp shared-memory stage that cp.async fills one span ahead (double buffered;
//    the first span is in flight during the prologue). A span starts at a multiple of 8 and P
//    divides 8, so it stages the codes of its 8 blocks and the ranges and bf16 centroids of the
//    8 / P sketch blocks that hold them; block blk reads entry blk / P. Approximate logit of token
//    t for head g: x_t = base_g + sum_r w_gr code_tr, base_g = u_g . lo + a q'_g . centroid,
//    w_gr = u_gr step_r (lo, step and the centroid of the block's sketch block; the centroid dot
//    converts 8 bf16 channels per 16-byte vector with shifts, once per sketch block: the 4P lanes
//    of its P blocks split it).
//    Instead of a running maximum, each head is shifted by an upper bound of its block's x_t
//    (base_g + 15 sum_r max(w_gr, 0)) and 2^(x_t - bound) is summed with MUFU.EX2, branch free;
//    when every term underflows (sum < 2^-100) the four lanes redo that head against the true
//    maximum. Codes are unpacked exactly (PRMT into 2^23's mantissa, one FADD); four heads
//    share each unpacked token. History (8 x 32k, H200, Nsight Compute, P = 1 and float32 block
//    centroids): a warp per block with warp reductions 121 us; a lane per block, loads in the
//    token loop 45 us; 8 lanes per block with an online log-sum-exp, codes in registers 62 us
//    (compute-bound: 26 M warp instructions); this design 28 us (9.5 M instructions, 0.97 waves;
//    what is left is the per-block setup of w, bound and the centroid dot, and the per-CTA
//    prologue). At 16-token blocks and P = 8 (8 x 32k, ncu, H200) the setup dominated: each
//    block's lanes repeated the sketch block's centroid dot (all 32 lanes the same one) and a
//    span's staging ran unrolled loops for one copy per lane; splitting the dot over the sketch
//    block's lanes: 18.1 M warp instructions, ~4 us off the step (bench/PERF_NOTES.md). The score bytes per block are bs * R / 2 codes + 4R / P range bytes (+ 2D / P
//    centroid bytes when a != 0): 288 B for a 64-token block at R = 8, P = 1. It writes the same
//    outputs as radar_score_kernel (group score = max over the heads, per-head scores when asked),
//    so radar_select_kernel selects unchanged.
#pragma once

#include <cmath>

#include "aether/cuda/common.cuh"
#include "aether/cuda/mma.cuh"
#include "aether/cuda/radar_select.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

// 256 threads: an append rebuilds one sketch block per head (64 CTAs at 8 x 8 heads), a latency
// chain; more threads shorten each thread's share of the projection (12.9 us at 128 threads).
constexpr int kSketchThreads = 256;
constexpr int kSketchWarps = kSketchThreads / kWarpSize;
// The API's largest sketch block (blocks_per_sketch * block_size tokens); sizes the shared buffers.
constexpr int kMaxSketchBlockSize = 128;

// Dynamic shared memory of the build kernel, in floats, for sketch blocks of `sketch_tokens`
// (P * block_size) tokens: keys [SB][D + 1], key_proj [D][R], coefficients [SB][R], lo and step [R].
inline size_t key_sketch_smem_bytes(int sketch_tokens, int head_dim, int rank) {
  return sizeof(float) * (static_cast<size_t>(sketch_tokens) * (head_dim + 1) + static_cast<size_t>(head_dim) * rank +
                          static_cast<size_t>(sketch_tokens) * rank + 2 * kMaxSketchRank);
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSketchThreads)
key_sketch_kernel(const KeySketchParams p) {
  pdl_begin();  // before any global read (common.cuh)
  constexpr int kRow = kHeadDim + 1;  // padded key row
  constexpr int kChunks = kHeadDim / 8;
  // Vectors a thread loads before storing: a 128-token sketch block in one round up to head_dim 128.
  constexpr int kStageBatch = kMaxSketchBlockSize * kChunks / kSketchThreads < 8 ? kMaxSketchBlockSize * kChunks / kSketchThreads : 8;
  extern __shared__ __align__(16) float s_dyn[];
  const int R = p.rank;
  const int P = p.blocks_per_sketch;
  const int bs = p.block_size;
  const int sb = P * bs;                            // tokens of a sketch block
  float* s_keys = s_dyn;                            // [sb][kRow]
  float* s_proj = s_keys + sb * kRow;               // [D][R]
  float* s_x = s_proj + kHeadDim * R;               // [sb][R]
  float* s_lo = s_x + sb * R;                       // [kMaxSketchRank]
  float* s_step = s_lo + kMaxSketchRank;            // [kMaxSketchRank]

  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int len = max(p.seq_lens[b], 0);
  const int capacity = p.num_blocks / P;  // sketch blocks (num_blocks is a multiple of P)
  const int n_sketch = min((len + sb - 1) / sb, capacity);
  const int begin = p.first_block != nullptr ? max(p.first_block[b], 0) / P : 0;  // first_block names a block
  const int end = p.first_block != nullptr ? n_sketch : capacity;
  if (begin + static_cast<int>(blockIdx.y) >= end) return;  // uniform over the CTA

  for (int i = tid; i < kHeadDim * R; i += kSketchThreads) {
    s_proj[i] = p.key_proj[static_cast<int64_t>(h) * kHeadDim * R + i];
  }
  const T* data = static_cast<const T*>(p.k.data);
  const int code_bytes = sb * R / 2;  // the codes of the P blocks of a sketch block are contiguous

  for (int m = begin + blockIdx.y; m < end; m += gridDim.y) {
    const int64_t row = static_cast<int64_t>(bh) * capacity + m;
    uint8_t* codes = p.sketch.codes + row * code_bytes;
    uint16_t* ranges = p.sketch.ranges + row * 2 * R;
    uint16_t* centroid = p.sketch.centroid + row * kHeadDim;
    const int n_tokens = m < n_sketch ? min(sb, len - m * sb) : 0;
    if (n_tokens == 0) {  // past the end (full build only): zeros; uniform over the CTA
      for (int i = tid; i < code_bytes; i += kSketchThreads) codes[i] = 0;
      for (int i = tid; i < 2 * R; i += kSketchThreads) ranges[i] = 0;
      for (int i = tid; i < kHeadDim; i += kSketchThreads) centroid[i] = 0;
      continue;
    }
    // Keys of the sketch block, block by block: paged, its P blocks are P pages. At most 128
    // tokens: 8 vectors per thread at head_dim 128, all loads in flight together.
    stage_rows_as_float<kSketchThreads, kStageBatch>(s_keys, kRow, n_tokens, kChunks, [&](int t) -> const T* {
      if (p.k.block_table == nullptr) {
        return data + b * p.k.stride_seq + h * p.k.stride_head + (static_cast<int64_t>(m) * sb + t) * p.k.stride_token;
      }
      const int blk = t / bs;
      const int64_t page = p.k.block_table[b * p.k.block_table_stride + static_cast<int64_t>(m) * P + blk];
      return data + page * p.k.stride_seq + h * p.k.stride_head + static_cast<int64_t>(t - blk * bs) * p.k.stride_token;
    });
    __syncthreads();  // also publishes s_proj on the first sketch block
    // Centroid: one thread per channel sums the staged keys in token order (as the CPU kernel and
    // the reference do, so the bfloat16 result is bit-identical), then divides by the count.
    for (int d = tid; d < kHeadDim; d += kSketchThreads) {
      float sum = 0.0f;
#pragma unroll 8
      for (int t = 0; t < n_tokens; ++t) sum = __fadd_rn(sum, s_keys[t * kRow + d]);  // loads run ahead
      centroid[d] = __bfloat16_as_ushort(__float2bfloat16_rn(__fdiv_rn(sum, static_cast<float>(n_tokens))));
    }
    for (int pair = tid; pair < n_tokens * R; pair += kSketchThreads) {
      const int t = pair / R, r = pair % R;
      const float* key = s_keys + t * kRow;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains: the FMA latency, not the issue, bound one
#pragma unroll 8
      for (int d = 0; d < kHeadDim; d += 4) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[e] = fmaf(key[d + e], s_proj[(d + e) * R + r], acc[e]);
      }
      s_x[pair] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
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
    __syncthreads();  // s_keys, s_x, s_lo, s_step are rewritten by the next sketch block
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_key_sketch(const KeySketchParams& p, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int sketch_blocks = p.num_blocks / p.blocks_per_sketch;
  if (heads == 0 || sketch_blocks == 0) return cudaSuccess;
  int64_t slices = 0;  // as block_stats, over sketch blocks
  AETHER_CUDA_TRY(block_build_slices(sketch_blocks, heads, p.first_block != nullptr, &slices));
  const size_t smem = key_sketch_smem_bytes(p.block_size * p.blocks_per_sketch, kHeadDim, p.rank);
  auto kernel = key_sketch_kernel<T, kHeadDim>;
  AETHER_CUDA_TRY(allow_dynamic_smem(kernel, smem));
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(slices));
  return launch_kernel(kernel, dim3(grid), dim3(kSketchThreads), smem, stream, p);
}

// ---------------------------------------------------------------------------------------------
// qsketch scores.

constexpr int kSketchLanesPerBlock = 4;  // lanes that share one block's codes
constexpr int kSketchBlocksPerWarp = kWarpSize / kSketchLanesPerBlock;  // blocks of one span
constexpr int kSketchScoreThreads = 256;  // at most; 8 warps share one prologue (u, q') per CTA
constexpr int kSketchScoreWarps = kSketchScoreThreads / kWarpSize;  // fewer when the stages do not fit
constexpr int kSketchScoreMinCtas = 2;    // 16 warps per SM: at most 128 registers
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The per-warp staging buffer of one span (8 consecutive blocks), in bytes: the codes of the 8
// blocks, then the ranges (4R bytes) and the bf16 centroids (2D bytes, only when a != 0) of the
// 8 / P sketch blocks that hold them (P divides 8 and a span starts at a multiple of 8, so a span
// never splits a sketch block); block blk reads entry blk / P. Two per warp: the next span is
// copied (cp.async) while the current one is scored. Bank conflicts: a quarter warp reads 16-byte
// vectors v = sub + 4i of two neighbouring blocks (codes) or entries (centroids; with P >= 2 both
// blocks read the same entry: a broadcast); an odd block / entry stores vector v at v ^ 4 (when
// it has 8 or more), so the two hit different halves of the banks without padding (padding cost
// a CTA per SM).
struct SketchStageLayout {
  int code_stride, centroid_stride, ranges_offset, centroid_offset, bytes;
  __host__ __device__ SketchStageLayout(int block_size, int rank, int head_dim, bool centroid, int blocks_per_sketch) {
    const int entries = kSketchBlocksPerWarp / blocks_per_sketch;  // sketch blocks of a span
    code_stride = block_size * rank / 2;
    centroid_stride = centroid ? head_dim * 2 : 0;  // bf16; a multiple of 16
    ranges_offset = kSketchBlocksPerWarp * code_stride;
    centroid_offset = ranges_offset + entries * 4 * rank;  // 4R: a multiple of 8
    centroid_offset = (centroid_offset + 15) / 16 * 16;
    bytes = centroid_offset + entries * centroid_stride;
  }
};

// Prologue floats: q [G][D], q' [G][D] (a != 0), u [G][R]; then 2 stages per warp.
__host__ __device__ inline size_t sketch_score_prologue_bytes(int group, int head_dim, int rank, bool centroid) {
  const size_t floats = static_cast<size_t>(group) * head_dim * (centroid ? 2 : 1) + static_cast<size_t>(group) * rank;
  return (sizeof(float) * floats + 15) / 16 * 16;
}
inline size_t sketch_score_smem_bytes(int group, int head_dim, int rank, int block_size, bool centroid, int warps,
                                      int blocks_per_sketch) {
  const SketchStageLayout layout(block_size, rank, head_dim, centroid, blocks_per_sketch);
  return sketch_score_prologue_bytes(group, head_dim, rank, centroid) + static_cast<size_t>(warps) * 2 * layout.bytes;
}

// Slot of 16-byte vector v of staged block / centroid entry `index` (n_vecs vectors each): see
// SketchStageLayout.
__device__ __forceinline__ int sketch_slot(int v, int index, int n_vecs) {
  return n_vecs >= 8 ? v ^ ((index & 1) << 2) : v;
}

// Eight bf16 (a 16-byte vector, element 2i in the low half of word i) as floats: 16-bit shifts.
__device__ __forceinline__ void bf16x8_as_float(const uint4& v, float (&out)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
  }
}

// Code c (0..15) of nibble `kNibble` of a 32-bit word of codes, exactly, as a float: the nibble
// goes into the low byte of 2^23's bit pattern (0x4B000000 | c is 2^23 + c), then 2^23 is
// subtracted. `lo` holds the even nibbles of the word in its bytes, `hi` the odd ones.
template <int kNibble>
__device__ __forceinline__ float nibble_as_float(uint32_t lo, uint32_t hi) {
  constexpr uint32_t kSelect = (kNibble / 2) | (4u << 4) | (5u << 8) | (7u << 12);
  return __uint_as_float(__byte_perm(kNibble % 2 == 0 ? lo : hi, 0x4B000000u, kSelect)) - 8388608.0f;
}

// The kRank codes of token `tt` of a 16-byte vector (32 / kRank tokens per vector).
template <int kRank>
__device__ __forceinline__ void token_codes(const uint32_t (&lo)[4], const uint32_t (&hi)[4], int tt, float (&code)[kRank]) {
#pragma unroll
  for (int r = 0; r < kRank; ++r) {
    const int nibble = tt * kRank + r;  // compile-time after unrolling
    const int word = nibble / 8;
    switch (nibble % 8) {
      case 0: code[r] = nibble_as_float<0>(lo[word], hi[word]); break;
      case 1: code[r] = nibble_as_float<1>(lo[word], hi[word]); break;
      case 2: code[r] = nibble_as_float<2>(lo[word], hi[word]); break;
      case 3: code[r] = nibble_as_float<3>(lo[word], hi[word]); break;
      case 4: code[r] = nibble_as_float<4>(lo[word], hi[word]); break;
      case 5: code[r] = nibble_as_float<5>(lo[word], hi[word]); break;
      case 6: code[r] = nibble_as_float<6>(lo[word], hi[word]); break;
      default: code[r] = nibble_as_float<7>(lo[word], hi[word]); break;
    }
  }
}

// Over this lane's tokens of one block (its vectors v = sub, sub + 4, ... of the staged codes):
// kMax false: acc[g] += 2^(bias_g + sum_r w_gr code_tr); kMax true: acc[g] = max(acc[g], x_t).
// kFull: the block is full (no per-token test). One vector per iteration, not unrolled: a fully
// unrolled block (~1000 instructions per chunk) stalled 45% of the time on instruction fetch.
template <int kRank, int kTile, bool kFull, bool kMax>
__device__ __forceinline__ void sketch_lane_pass(const uint4* codes, int n_vecs, int sub, int blk, int n_tokens,
                                                 const float (&bias)[kTile], const float (&w)[kTile][kRank],
                                                 float (&acc)[kTile]) {
  constexpr int kTokensPerVec = 32 / kRank;
#pragma unroll 1
  for (int v = sub; v < n_vecs; v += kSketchLanesPerBlock) {
    const uint4 vec = codes[sketch_slot(v, blk, n_vecs)];
    const uint32_t words[4] = {vec.x, vec.y, vec.z, vec.w};
    uint32_t lo[4], hi[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      lo[q] = words[q] & 0x0F0F0F0Fu;
      hi[q] = (words[q] >> 4) & 0x0F0F0F0Fu;
    }
    const int first = v * kTokensPerVec;
#pragma unroll
    for (int tt = 0; tt < kTokensPerVec; ++tt) {
      const bool valid = kFull || first + tt < n_tokens;
      float code[kRank];
      token_codes<kRank>(lo, hi, tt, code);
#pragma unroll
      for (int gg = 0; gg < kTile; ++gg) {
        float x = bias[gg];
#pragma unroll
        for (int r = 0; r < kRank; ++r) x = fmaf(w[gg][r], code[r], x);
        if (kMax) {
          if (valid) acc[gg] = fmaxf(acc[gg], x);
        } else {
          const float e = fast_exp2(x);
          acc[gg] += valid ? e : 0.0f;
        }
      }
    }
  }
}

// a q'_g . c (2^-units; s_qrest is pre-scaled by a * scale * log2 e) for heads g0 .. g0 + kTile - 1
// and the staged centroid c of this lane's sketch block (`entry` of the span, at `centroids` with
// `stride` bytes per entry), in every lane of the warp (call it from all 32 lanes). The 4P lanes of
// the entry's P blocks (P <= 8: 4P <= 32 consecutive lanes) split its D / 8 vectors and sum over
// those lanes. Each block's four lanes used to dot the whole centroid themselves: at P = 8 all
// 32 lanes repeated one dot, the largest part of a 16-token block's setup. P = 1 keeps the former
// order of additions. An entry that was not staged (past the sequence: `staged` false) gives 0.
template <int kHeadDim, int kTile>
__device__ __forceinline__ void sketch_centroid_dots(const float* s_qrest, int G, int g0, const char* centroids, int stride,
                                                     int entry, int entry_lanes_log2, bool staged, int lane,
                                                     float (&dot)[kTile]) {
  constexpr int kVecs = kHeadDim / 8;  // 8 bf16 channels per 16-byte vector
  const int lanes = 1 << entry_lanes_log2;
#pragma unroll
  for (int gg = 0; gg < kTile; ++gg) dot[gg] = 0.0f;
  if (staged) {
    const uint4* centroid = reinterpret_cast<const uint4*>(centroids + entry * stride);
    for (int v = lane & (lanes - 1); v < kVecs; v += lanes) {  // channels 8v .. 8v + 7
      float c[8];
      bf16x8_as_float(centroid[sketch_slot(v, entry, kVecs)], c);
#pragma unroll
      for (int gg = 0; gg < kTile; ++gg) {
        const float* qr = s_qrest + min(g0 + gg, G - 1) * kHeadDim + 8 * v;
        const float4 qa = *reinterpret_cast<const float4*>(qr);
        const float4 qb = *reinterpret_cast<const float4*>(qr + 4);
        dot[gg] = fmaf(qa.x, c[0], fmaf(qa.y, c[1], fmaf(qa.z, c[2], fmaf(qa.w, c[3], dot[gg]))));
        dot[gg] = fmaf(qb.x, c[4], fmaf(qb.y, c[5], fmaf(qb.z, c[6], fmaf(qb.w, c[7], dot[gg]))));
      }
    }
  }
  // lanes is warp-uniform (every lane shuffles); unrolled over the possible offsets (a runtime loop
  // cost ~14 instructions per level).
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    if (offset < lanes) {
#pragma unroll
      for (int gg = 0; gg < kTile; ++gg) dot[gg] += __shfl_xor_sync(kFullMask, dot[gg], offset);
    }
  }
}

// Scores (natural log units) of one staged block with n_tokens > 0 for heads g0 .. g0 + kTile - 1
// (a tile past G repeats head G - 1; its result is dropped). The block's four lanes return the
// same scores. `dot` holds a q'_g . c of the block's sketch block (sketch_centroid_dots; 0 when
// a == 0).
template <int kHeadDim, int kRank, int kTile>
__device__ __forceinline__ void sketch_block_tile(const float* s_uc, int G, int g0, const uint4* codes, int n_vecs, int sub,
                                                  int blk, int n_tokens, bool full, const float (&dot)[kTile],
                                                  const float (&lo)[kRank], const float (&step)[kRank],
                                                  float (&score)[kTile]) {
  const unsigned group_mask = 0xFu << ((threadIdx.x % kWarpSize) & ~(kSketchLanesPerBlock - 1));
  // In 2^-units (logit * log2 e): x_t = base + sum_r w_r code_tr, base = u . lo + a q' . c;
  // bound >= every x_t, and the sums run over 2^(x_t - bound) <= 1 (no running max).
  float bias[kTile], w[kTile][kRank], bound[kTile];
#pragma unroll
  for (int gg = 0; gg < kTile; ++gg) {
    const int g = min(g0 + gg, G - 1);
    float base = dot[gg];
    float top = 0.0f;
#pragma unroll
    for (int r = 0; r < kRank; ++r) {
      const float u = s_uc[g * kRank + r];  // pre-scaled by scale * log2 e
      base = fmaf(u, lo[r], base);
      w[gg][r] = u * step[r];
      top = fmaf(fmaxf(w[gg][r], 0.0f), static_cast<float>(kSketchLevels), top);
    }
    bound[gg] = base + top;
    bias[gg] = base - bound[gg];  // -top up to rounding: the largest x_t - bound is about 0
  }
  float sum[kTile];
#pragma unroll
  for (int gg = 0; gg < kTile; ++gg) sum[gg] = 0.0f;
  if (full) {
    sketch_lane_pass<kRank, kTile, true, false>(codes, n_vecs, sub, blk, n_tokens, bias, w, sum);
  } else {
    sketch_lane_pass<kRank, kTile, false, false>(codes, n_vecs, sub, blk, n_tokens, bias, w, sum);
  }
#pragma unroll
  for (int gg = 0; gg < kTile; ++gg) {
#pragma unroll
    for (int offset = kSketchLanesPerBlock / 2; offset > 0; offset >>= 1) sum[gg] += __shfl_xor_sync(group_mask, sum[gg], offset);
  }
  // The bound can sit far above the block's largest x_t (by up to 15 sum_r |w_r|); when every term
  // underflows (sum < 2^-100: the largest term is not resolved to float precision) the block's
  // four lanes redo that head against the true maximum. Rare; the four lanes agree on it.
  constexpr float kTiny = 7.8886090522e-31f;  // 2^-100
#pragma unroll
  for (int gg = 0; gg < kTile; ++gg) {
    float shift = 0.0f;
    if (sum[gg] < kTiny) {
      float one_bias[1] = {bias[gg]}, one_w[1][kRank], top[1] = {-INFINITY}, one_sum[1] = {0.0f};
#pragma unroll
      for (int r = 0; r < kRank; ++r) one_w[0][r] = w[gg][r];
      sketch_lane_pass<kRank, 1, false, true>(codes, n_vecs, sub, blk, n_tokens, one_bias, one_w, top);
#pragma unroll
      for (int offset = kSketchLanesPerBlock / 2; offset > 0; offset >>= 1) {
        top[0] = fmaxf(top[0], __shfl_xor_sync(group_mask, top[0], offset));
      }
      one_bias[0] = bias[gg] - top[0];
      sketch_lane_pass<kRank, 1, false, false>(codes, n_vecs, sub, blk, n_tokens, one_bias, one_w, one_sum);
#pragma unroll
      for (int offset = kSketchLanesPerBlock / 2; offset > 0; offset >>= 1) {
        one_sum[0] += __shfl_xor_sync(group_mask, one_sum[0], offset);
      }
      sum[gg] = one_sum[0];
      shift = top[0];
    }
    score[gg] = (bound[gg] + shift + __log2f(sum[gg])) * kLn2;
  }
}

// cp.async of span `span`'s valid blocks (j < n_blocks) into a stage buffer, by the 32 lanes of
// the warp, with the ranges and centroids of their sketch blocks j0 / P .. (j0 + n_copy - 1) / P;
// blocks past n_blocks are not read (their scores are -inf). Each loop runs about once per lane:
// not unrolled (the unrolled loops' remainder logic cost ~100 instructions per span). row0 = (b Hkv + h) NB, sketch_row0 =
// (b Hkv + h) NB / P; per_shift = log2 P.
template <int kHeadDim, int kRank>
__device__ __forceinline__ void sketch_stage_span(const RadarSelectParams& p, const SketchStageLayout& layout, char* stage,
                                                  int64_t row0, int64_t sketch_row0, int per_shift, int span, int n_blocks,
                                                  bool use_centroid, int lane) {
  const int j0 = span * kSketchBlocksPerWarp;
  const int n_copy = min(kSketchBlocksPerWarp, n_blocks - j0);
  if (n_copy <= 0) return;
  const int64_t m0 = sketch_row0 + (j0 >> per_shift);
  const int n_entries = ((n_copy - 1) >> per_shift) + 1;
  const int code_bytes = p.block_size * kRank / 2;
  const int code_vecs = code_bytes / 16;  // a power of two (block size and rank are)
  const int vec_shift = __ffs(code_vecs) - 1;
  const uint8_t* codes = p.sketch_codes + (row0 + j0) * code_bytes;
#pragma unroll 1
  for (int c = lane; c < n_copy * code_vecs; c += kWarpSize) {
    const int blk = c >> vec_shift, v = c & (code_vecs - 1);
    cp_async_16(shared_address(stage + blk * layout.code_stride + sketch_slot(v, blk, code_vecs) * 16),
                codes + static_cast<int64_t>(c) * 16, 16);
  }
  const uint8_t* ranges = reinterpret_cast<const uint8_t*>(p.sketch_ranges + m0 * 2 * kRank);
#pragma unroll 1
  for (int c = lane; c < n_entries * kRank; c += kWarpSize) {  // 4R bytes per sketch block: R words
    cp_async_4(shared_address(stage + layout.ranges_offset + c * 4), ranges + static_cast<int64_t>(c) * 4);
  }
  if (use_centroid) {
    constexpr int kVecs = kHeadDim / 8;  // 8 bf16 per vector
    const uint16_t* centroid = p.sketch_centroid + m0 * kHeadDim;
#pragma unroll 1
    for (int c = lane; c < n_entries * kVecs; c += kWarpSize) {
      const int e = c / kVecs, v = c % kVecs;
      cp_async_16(shared_address(stage + layout.centroid_offset + e * layout.centroid_stride + sketch_slot(v, e, kVecs) * 16),
                  centroid + static_cast<int64_t>(c) * 8, 16);
    }
  }
}

// grid (batch * kv_heads, slices), kSketchScoreThreads threads. A warp scores spans of 8 consecutive
// blocks, four lanes per block; kTile heads of the group at a time share the unpacked codes.
template <int kHeadDim, int kRank, int kTile>
__device__ __forceinline__ void sketch_score_body(const RadarSelectParams& p, const RadarWorkspace& ws,
                                                  const float* s_uc, const float* s_qrest, char* s_stages,
                                                  bool use_centroid) {
  const int G = p.q_heads / p.kv_heads;
  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int sub = lane % kSketchLanesPerBlock;
  const int blk = lane / kSketchLanesPerBlock;
  const int len = p.seq_lens[b];
  const int n_blocks = len <= 0 ? 0 : min((len + p.block_size - 1) / p.block_size, p.num_blocks);
  const int64_t q_head0 = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G;
  const int64_t row0 = static_cast<int64_t>(bh) * p.num_blocks;
  const int per_shift = __ffs(p.blocks_per_sketch) - 1;  // P is a power of two
  const int64_t sketch_row0 = row0 >> per_shift;           // num_blocks is a multiple of P
  const int entry = blk >> per_shift;                      // this block's staged sketch block
  const int n_vecs = p.block_size * kRank / 2 / 16;
  const SketchStageLayout layout(p.block_size, kRank, kHeadDim, use_centroid, p.blocks_per_sketch);
  char* stages = s_stages + static_cast<size_t>(warp) * 2 * layout.bytes;
  const int n_spans = (p.num_blocks + kSketchBlocksPerWarp - 1) / kSketchBlocksPerWarp;
  const int n_warps = blockDim.x / kWarpSize;
  const int stride = gridDim.y * n_warps;
  int span = blockIdx.y * n_warps + warp;  // its stage was issued before the prologue
  for (int k = 0; span < n_spans; span += stride, ++k) {  // uniform over the warp
    // Stage the next span, then wait for this one (one group may stay in flight).
    if (span + stride < n_spans) {
      sketch_stage_span<kHeadDim, kRank>(p, layout, stages + ((k + 1) & 1) * layout.bytes, row0, sketch_row0, per_shift,
                                         span + stride, n_blocks, use_centroid, lane);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    const char* stage = stages + (k & 1) * layout.bytes;
    const int j = span * kSketchBlocksPerWarp + blk;
    const int n_tokens = j < n_blocks ? min(p.block_size, len - j * p.block_size) : 0;  // the block's lanes agree
    // bf16 -> float is a 16-bit shift; lo and hi are R bf16 each (R / 2 words).
    float lo[kRank], step[kRank];
    if (n_tokens > 0) {
      const uint32_t* ranges = reinterpret_cast<const uint32_t*>(stage + layout.ranges_offset + entry * 4 * kRank);
#pragma unroll
      for (int r = 0; r < kRank; r += 2) {
        const uint32_t lo_pair = ranges[r / 2], hi_pair = ranges[kRank / 2 + r / 2];
        lo[r] = __uint_as_float(lo_pair << 16);
        lo[r + 1] = __uint_as_float(lo_pair & 0xFFFF0000u);
        step[r] = (__uint_as_float(hi_pair << 16) - lo[r]) * (1.0f / kSketchLevels);
        step[r + 1] = (__uint_as_float(hi_pair & 0xFFFF0000u) - lo[r + 1]) * (1.0f / kSketchLevels);
      }
    }
    const uint4* codes = reinterpret_cast<const uint4*>(stage + blk * layout.code_stride);
    const bool full = n_tokens == p.block_size;
    // The entry's first block: staged (sketch_stage_span) iff it is below n_blocks.
    const bool entry_staged = span * kSketchBlocksPerWarp + (entry << per_shift) < n_blocks;
    float group = -INFINITY;
    for (int g0 = 0; g0 < G; g0 += kTile) {  // uniform over the warp: the centroid dots shuffle
      float dot[kTile];
      if (use_centroid) {
        sketch_centroid_dots<kHeadDim, kTile>(s_qrest, G, g0, stage + layout.centroid_offset, layout.centroid_stride,
                                              entry, per_shift + 2, entry_staged, lane, dot);
      } else {
#pragma unroll
        for (int gg = 0; gg < kTile; ++gg) dot[gg] = 0.0f;
      }
      if (n_tokens > 0) {
        float score[kTile];
        sketch_block_tile<kHeadDim, kRank, kTile>(s_uc, G, g0, codes, n_vecs, sub, blk, n_tokens, full, dot, lo, step,
                                                  score);
#pragma unroll
        for (int gg = 0; gg < kTile; ++gg) {
          if (g0 + gg >= G) break;
          if (sub == 0 && ws.head_scores_out != nullptr) {
            ws.head_scores_out[(q_head0 + g0 + gg) * p.num_blocks + j] = score[gg];
          }
          group = fmaxf(group, score[gg]);
        }
      }
    }
    if (j < p.num_blocks && sub == 0) {
      if (n_tokens == 0 && ws.head_scores_out != nullptr) {
        for (int g = 0; g < G; ++g) ws.head_scores_out[(q_head0 + g) * p.num_blocks + j] = -INFINITY;
      }
      ws.group_scores[row0 + j] = group;
    }
    __syncwarp();  // every lane is done with this stage before the next iteration refills it
  }
  cp_async_wait<0>();
}

template <int kHeadDim, int kRank>
__global__ void __launch_bounds__(kSketchScoreThreads, kSketchScoreMinCtas)
sketch_score_kernel(const RadarSelectParams p, const RadarWorkspace ws) {
  pdl_begin();  // before any global read (common.cuh)
  static_assert(kRank >= 2 && kRank <= kMaxSketchRank && (kRank & (kRank - 1)) == 0, "rank: 2, 4, 8 or 16");
  extern __shared__ __align__(16) float s_dyn[];
  const int G = p.q_heads / p.kv_heads;
  const bool use_centroid = p.centroid_weight != 0.0f;
  float* s_q = s_dyn;                                         // [G][D]
  float* s_qrest = s_q + G * kHeadDim;                        // [G][D] when use_centroid
  float* s_uc = s_qrest + (use_centroid ? G * kHeadDim : 0);  // [G][kRank]
  char* s_stages = reinterpret_cast<char*>(s_dyn) + sketch_score_prologue_bytes(G, kHeadDim, kRank, use_centroid);
  const int b = blockIdx.x / p.kv_heads;
  const int h = blockIdx.x % p.kv_heads;
  const int tid = threadIdx.x;
  const float to_log2 = p.scale * kLog2e;
  {  // Each warp's first span is in flight while the prologue runs (sketch_score_body waits for it).
    const int lane = tid % kWarpSize, warp = tid / kWarpSize;
    const int len = p.seq_lens[b];
    const int n_blocks = len <= 0 ? 0 : min((len + p.block_size - 1) / p.block_size, p.num_blocks);
    const SketchStageLayout layout(p.block_size, kRank, kHeadDim, use_centroid, p.blocks_per_sketch);
    const int per_shift = __ffs(p.blocks_per_sketch) - 1;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * p.num_blocks;
    sketch_stage_span<kHeadDim, kRank>(p, layout, s_stages + static_cast<size_t>(warp) * 2 * layout.bytes, row0,
                                       row0 >> per_shift, per_shift, blockIdx.y * (blockDim.x / kWarpSize) + warp,
                                       n_blocks, use_centroid, lane);
    cp_async_commit();
  }

  const int threads = blockDim.x;  // a multiple of 32: 32 .. kSketchScoreThreads
  for (int i = tid; i < G * kHeadDim; i += threads) {
    const int g = i / kHeadDim, d = i % kHeadDim;
    s_q[i] = load_q_element(p.q, p.dtype, b * p.q_stride_batch + (static_cast<int64_t>(h) * G + g) * p.q_stride_head + d);
  }
  __syncthreads();
  // u: each output is a D-long dot product split over 8 lanes (uniform trip count: shuffles).
  // s_uc holds u unscaled until q' is formed, then in 2^-units.
  constexpr int kLanesPerOutput = 8;
  for (int base = 0; base < G * kRank; base += threads / kLanesPerOutput) {
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
    if (o < G * kRank && sub == 0) s_uc[o] = partial;
  }
  __syncthreads();
  if (use_centroid) {  // q' = a * scale * log2 e * (q - key_proj_h u)
    const float a = p.centroid_weight * to_log2;
    for (int i = tid; i < G * kHeadDim; i += threads) {
      const int g = i / kHeadDim, d = i % kHeadDim;
      const float* proj = p.sketch_key_proj + (static_cast<int64_t>(h) * kHeadDim + d) * kRank;
      float projected = 0.0f;
#pragma unroll
      for (int r = 0; r < kRank; ++r) projected = fmaf(__ldg(proj + r), s_uc[g * kRank + r], projected);
      s_qrest[i] = a * (s_q[i] - projected);
    }
    __syncthreads();
  }
  for (int i = tid; i < G * kRank; i += threads) s_uc[i] *= to_log2;
  __syncthreads();

  // Heads per pass over the codes: the largest tile that divides G (a short tile would repeat a
  // head); rank 16 keeps two (w alone is 16 registers per head).
  constexpr int kWideTile = kRank <= 8 ? 4 : 2;
  if (G % kWideTile == 0) {
    sketch_score_body<kHeadDim, kRank, kWideTile>(p, ws, s_uc, s_qrest, s_stages, use_centroid);
  } else if (G % 2 == 0) {
    sketch_score_body<kHeadDim, kRank, 2>(p, ws, s_uc, s_qrest, s_stages, use_centroid);
  } else {
    sketch_score_body<kHeadDim, kRank, 1>(p, ws, s_uc, s_qrest, s_stages, use_centroid);
  }
}

// grid (batch * kv_heads, slices): every CTA recomputes u and q' for its group (G * D * R loads),
// so the slices fill exactly one wave of resident CTAs (a partial second wave doubled the time:
// measured 38.7 us at 8 x 32k with 1.09 waves). No M_g partials: qsketch has no bound
// (radar_needs_mlo is false).
template <int kHeadDim, int kRank>
cudaError_t launch_sketch_score_rank(const RadarSelectParams& p, RadarWorkspace* ws, cudaStream_t stream) {
  int optin = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  const int G = p.q_heads / p.kv_heads;
  const bool centroid = p.centroid_weight != 0.0f;
  // 8 warps per CTA, fewer where their stages do not fit (e.g. head_dim 256, 128-token blocks,
  // rank 16 with a centroid: 12.5 KB per stage at P = 1, with a large group).
  int warps = kSketchScoreWarps;
  size_t smem = sketch_score_smem_bytes(G, kHeadDim, kRank, p.block_size, centroid, warps, p.blocks_per_sketch);
  while (warps > 1 && smem + 1024 > static_cast<size_t>(optin)) {
    warps /= 2;
    smem = sketch_score_smem_bytes(G, kHeadDim, kRank, p.block_size, centroid, warps, p.blocks_per_sketch);
  }
  if (smem + 1024 > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // G too large
  const int threads = warps * kWarpSize;
  auto kernel = sketch_score_kernel<kHeadDim, kRank>;
  AETHER_CUDA_TRY(allow_dynamic_smem(kernel, smem));
  int num_sms = 0, per_sm = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t heads_kv = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t spans = ceil_div(p.num_blocks, kSketchBlocksPerWarp);
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * num_sms;
  const int64_t slices = std::min<int64_t>(
      std::max<int64_t>(1, std::min(ceil_div(spans, warps), resident / heads_kv)), 65535);
  const dim3 grid(static_cast<unsigned>(heads_kv), static_cast<unsigned>(slices));
  return launch_kernel(kernel, dim3(grid), dim3(threads), smem, stream, p, *ws);
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
