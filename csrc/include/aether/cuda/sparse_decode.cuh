// sparse_decode kernels: split-KV flash-decoding over the selected blocks, and the merge of the
// splits' partial states.
//
// Work decomposition. One CTA per (b, kv_head, head tile of up to 16 query heads, split). A split
// owns a contiguous range of the (b, kv_head) selected-block list; its tokens form a stream of
// positions (block list index * block_size + token in block). The 4 warps of the CTA take
// 16-position sub-tiles of the stream round-robin; every warp runs its own flash-decoding state
// (max, sum, output) for all query heads of the tile, so K/V bytes are read from HBM once for the
// whole GQA group, and the warps never wait on each other until the epilogue combines their
// states (in a fixed order, deterministic).
//
// Per warp and sub-tile (16 tokens):
//   * loads: each lane resolves one token row (block list -> block -> page -> address, or
//     invalid: past the split, past the sequence, a selected index outside [0, n_blocks)); the
//     warp copies the 16 K rows and 16 V rows with 16-byte cp.async into its private, swizzled
//     shared-memory stage (invalid rows are zero-filled and never read from global memory).
//     kStages stages per warp keep kStages - 1 sub-tiles of loads in flight while one computes.
//   * S = Q K^T with mma.m16n8k16 (Q rows = query heads, zero-padded to 16; fp32 accumulate),
//     operands through ldmatrix; online softmax in fp32 on log2e-prescaled logits (exp2f).
//   * O += P V with P split into a rounded 16-bit part and the rounding residual (two MMAs), so
//     P carries ~16 significant bits instead of 8 (bf16) or 11 (fp16): the output error stays at
//     the rounding of the output itself, even when one token takes all the weight.
// The lse written is natural log: (m + log2 l) * ln 2.
#pragma once

#include <cmath>

#include "aether/cuda/common.cuh"
#include "aether/cuda/mma.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

template <int kHeadDim>
struct DecodeConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRows = 16;       // tokens per warp sub-tile: two MMA n-tiles, one PV k-step
  static constexpr int kHeadTile = 16;   // query heads per CTA: the MMA m dimension
  // Stages per warp: 3 keeps two 16-token sub-tiles (8 KiB at head_dim 128) in flight per warp.
  // The shared memory (96 KiB of stages, ~100.5 KiB in all at head_dim 128) lets two CTAs
  // (8 warps) share an SM.
  static constexpr int kStages = kHeadDim == 64 ? 4 : 3;
  static constexpr int kChunks = kHeadDim / 8;          // 16-byte chunks per K/V row
  static constexpr int kRowsPerCopy = kWarpSize / kChunks;  // rows per warp-wide cp.async
  static constexpr int kTileElems = kRows * kHeadDim;
  static constexpr int kStageElems = 2 * kTileElems;   // K rows, then V rows
  static constexpr int kORowStride = kHeadDim + 8;     // floats; the pad makes float2 stores conflict-free
  static constexpr int kMinBlocksPerSM = kHeadDim == 256 ? 1 : 2;

  static constexpr size_t kQBytes = kTileElems * 2;
  static constexpr size_t kStagesBytes = static_cast<size_t>(kWarps) * kStages * kStageElems * 2;
  static constexpr size_t kMaskBytes = kWarps * kStages * sizeof(uint32_t);
  static constexpr size_t kStateBytes = 2 * kWarps * kRows * sizeof(float);
  static constexpr size_t kSmemBytes = kQBytes + kStagesBytes + kMaskBytes + kStateBytes;

  static_assert(kHeadDim % 16 == 0, "head_dim must be a multiple of the MMA k (16)");
  static_assert(kChunks >= 8, "the swizzle permutes 8 chunks: head_dim >= 64");
  static_assert(kWarpSize % kChunks == 0 && kRows % kRowsPerCopy == 0, "copies must cover whole rows");
  static_assert(kRows * kORowStride * sizeof(float) <= static_cast<size_t>(kStages) * kStageElems * 2,
                "a warp's epilogue output must fit in its own stages");
};

// Offset (elements) of (row, 8-element chunk) in a [rows][kHeadDim] tile. The chunk index is
// XORed with row % 8 so the 8 row addresses of an ldmatrix hit 8 different 16-byte bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(DecodeConfig<kHeadDim>::kThreads, DecodeConfig<kHeadDim>::kMinBlocksPerSM)
sparse_decode_kernel(const SparseDecodeParams p, const int head_tiles) {
  pdl_begin();  // before any global read (common.cuh)
  using Cfg = DecodeConfig<kHeadDim>;
  constexpr int kWarps = Cfg::kWarps;
  constexpr int kStages = Cfg::kStages;
  constexpr int kRows = Cfg::kRows;
  constexpr int kNTiles = kHeadDim / 8;  // MMA n-tiles of the output
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_stages = reinterpret_cast<T*>(smem + Cfg::kQBytes);
  uint32_t* s_mask = reinterpret_cast<uint32_t*>(smem + Cfg::kQBytes + Cfg::kStagesBytes);
  float* s_m = reinterpret_cast<float*>(smem + Cfg::kQBytes + Cfg::kStagesBytes + Cfg::kMaskBytes);
  float* s_l = s_m + kWarps * kRows;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int G = p.q_heads / p.kv_heads;
  int index = blockIdx.x;
  const int tile = index % head_tiles;
  index /= head_tiles;
  const int h = index % p.kv_heads;
  const int b = index / p.kv_heads;
  const int split = blockIdx.y;
  const int num_splits = gridDim.y;
  const int heads = min(Cfg::kHeadTile, G - tile * Cfg::kHeadTile);  // query heads in this tile
  const int hq0 = h * G + tile * Cfg::kHeadTile;                      // first query head

  const int bs = p.block_size;
  const int len = max(p.seq_lens[b], 0);
  const int n_blocks = len == 0 ? 0 : min((len + bs - 1) / bs, p.num_blocks);
  const int32_t* sel_row = p.selected == nullptr ? nullptr
                                                 : p.selected + (static_cast<int64_t>(b) * p.kv_heads + h) * p.num_blocks;
  const int count = sel_row == nullptr ? n_blocks : min(max(p.num_selected[b * p.kv_heads + h], 0), p.num_blocks);
  const int list_begin = static_cast<int>(static_cast<int64_t>(count) * split / num_splits);
  const int list_end = static_cast<int>(static_cast<int64_t>(count) * (split + 1) / num_splits);
  // Positions fit in int: the list holds at most num_blocks blocks of a sequence of int32 length.
  const int n_pos = (list_end - list_begin) * bs;
  const int n_sub = (n_pos + kRows - 1) / kRows;
  const int my_n = warp < n_sub ? (n_sub - warp + kWarps - 1) / kWarps : 0;

  T* my_stages = s_stages + warp * kStages * Cfg::kStageElems;
  const uint32_t my_stages_addr = shared_address(my_stages);
  // Lanes 0-15 resolve K row (lane), lanes 16-31 V row (lane - 16) of each sub-tile.
  const bool resolves_k = lane < 16;
  const T* layout_base = static_cast<const T*>(resolves_k ? p.k.data : p.v.data);
  const int64_t stride_seq = resolves_k ? p.k.stride_seq : p.v.stride_seq;
  const int64_t stride_head = resolves_k ? p.k.stride_head : p.v.stride_head;
  const int64_t stride_token = resolves_k ? p.k.stride_token : p.v.stride_token;
  const int32_t* block_table = resolves_k ? p.k.block_table : p.v.block_table;
  const int64_t block_table_stride = resolves_k ? p.k.block_table_stride : p.v.block_table_stride;

  auto issue = [&](int i, int stage) {
    const int r = lane & 15;
    const int pos = (warp + i * kWarps) * kRows + r;
    bool valid = pos < n_pos;
    const T* row_ptr = layout_base;  // any readable address: invalid rows copy 0 bytes from it
    if (valid) {
      const int list_index = list_begin + pos / bs;
      const int in_block = pos % bs;
      const int block = sel_row == nullptr ? list_index : __ldg(sel_row + list_index);
      valid = block >= 0 && block < n_blocks && block * bs + in_block < len;
      if (valid) {
        if (block_table == nullptr) {
          row_ptr = layout_base + b * stride_seq + h * stride_head +
                    (static_cast<int64_t>(block) * bs + in_block) * stride_token;
        } else {
          const int64_t page = __ldg(block_table + b * block_table_stride + block);
          row_ptr = layout_base + page * stride_seq + h * stride_head + in_block * stride_token;
        }
      }
    }
    const uint32_t mask = __ballot_sync(kFullMask, valid) & 0xffffu;
    if (lane == 0) s_mask[warp * kStages + stage] = mask;
    const uint32_t k_stage = my_stages_addr + stage * Cfg::kStageElems * 2;
    const uint32_t v_stage = k_stage + Cfg::kTileElems * 2;
    const int chunk = lane % Cfg::kChunks;
#pragma unroll
    for (int c = 0; c < kRows / Cfg::kRowsPerCopy; ++c) {
      const int row = c * Cfg::kRowsPerCopy + lane / Cfg::kChunks;
      const T* k_src = reinterpret_cast<const T*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(row_ptr), row));
      const T* v_src = reinterpret_cast<const T*>(
          __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(row_ptr), 16 + row));
      const uint32_t bytes = ((mask >> row) & 1u) ? 16u : 0u;
      const uint32_t offset = swizzle<kHeadDim>(row, chunk) * 2;
      cp_async_16(k_stage + offset, k_src + chunk * 8, bytes);
      cp_async_16(v_stage + offset, v_src + chunk * 8, bytes);
    }
  };

  // Start the loads before staging q: they do not depend on it.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < my_n) issue(s, s);
    cp_async_commit();  // always commit: the wait below counts groups
  }

  // q of the tile's heads into shared memory (zero rows past `heads`); element loads accept any
  // stride and alignment and cost nothing next to the K/V stream.
  for (int i = tid; i < Cfg::kTileElems; i += Cfg::kThreads) {
    const int r = i / kHeadDim;
    const int d = i % kHeadDim;
    T value = from_float<T>(0.0f);
    if (r < heads) value = static_cast<const T*>(p.q)[b * p.q_stride_batch + static_cast<int64_t>(hq0 + r) * p.q_stride_head + d];
    s_q[swizzle<kHeadDim>(r, d / 8) + d % 8] = value;
  }
  __syncthreads();

  const float scale_log2 = p.scale * kLog2e;
  const int group = lane >> 2;  // MMA row (query head) group of this lane: rows group, group + 8
  const int quad = lane & 3;    // MMA column pair of this lane
  const int ld_row = lane & 7;  // ldmatrix: row within the 8x8 matrix this lane addresses
  const int ld_mat = lane >> 3; // ldmatrix: which of the four matrices
  const uint32_t q_addr = shared_address(s_q);

  float o[kNTiles][4];
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows group, group + 8
  float l_run[2] = {0.0f, 0.0f};            // this lane's part of the running sums

  for (int i = 0; i < my_n; ++i) {
    const int ahead = i + kStages - 1;
    if (ahead < my_n) issue(ahead, ahead % kStages);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // sub-tile i has landed (this lane's copies) ...
    __syncwarp();                  // ... and every lane's
    const int stage = i % kStages;
    const uint32_t mask = s_mask[warp * kStages + stage];
    const uint32_t k_addr = my_stages_addr + stage * Cfg::kStageElems * 2;
    const uint32_t v_addr = k_addr + Cfg::kTileElems * 2;

    // S = Q K^T: s[nt] covers tokens nt*8 .. nt*8+7.
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a[4], kb[4];
      ldmatrix_x4(a, q_addr + swizzle<kHeadDim>((ld_mat & 1) * 8 + ld_row, 2 * ks + (ld_mat >> 1)) * 2);
      ldmatrix_x4(kb, k_addr + swizzle<kHeadDim>((ld_mat >> 1) * 8 + ld_row, 2 * ks + (ld_mat & 1)) * 2);
      mma_16816<T>(s[0], a, kb[0], kb[1]);
      mma_16816<T>(s[1], a, kb[2], kb[3]);
    }

    // Online softmax. Element e of s[nt]: row group + 8 * (e / 2), token nt*8 + 2*quad + e % 2.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int token = nt * 8 + 2 * quad + (e & 1);
        s[nt][e] = ((mask >> token) & 1u) ? s[nt][e] * scale_log2 : -INFINITY;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
      }
    }
    float corr[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullMask, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullMask, tile_max[r], 2));
      const float m_new = fmaxf(m_run[r], tile_max[r]);
      base[r] = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: avoid -inf - -inf
      corr[r] = exp2f(m_run[r] - base[r]);
      m_run[r] = m_new;
    }
    float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
        row_sum[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * corr[r] + row_sum[r];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }

    // P as the A operand (rows = heads, k = the 16 tokens), rounded part and residual.
    uint32_t p_hi[4], p_lo[4];
#pragma unroll
    for (int f = 0; f < 4; ++f) {
      const int nt = f >> 1;          // a0, a1: tokens 0-7; a2, a3: tokens 8-15
      const int e = (f & 1) * 2;      // a0, a2: row group; a1, a3: row group + 8
      p_hi[f] = pack_pair<T>(s[nt][e], s[nt][e + 1]);
      const float2 rounded = unpack_pair<T>(p_hi[f]);
      p_lo[f] = pack_pair<T>(s[nt][e] - rounded.x, s[nt][e + 1] - rounded.y);
    }

    // O += P V: ldmatrix.trans turns the token-major V rows into the column-major B operand.
#pragma unroll
    for (int j = 0; j < kHeadDim / 16; ++j) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_addr + swizzle<kHeadDim>((ld_mat & 1) * 8 + ld_row, 2 * j + (ld_mat >> 1)) * 2);
      mma_16816<T>(o[2 * j], p_hi, vb[0], vb[1]);
      mma_16816<T>(o[2 * j + 1], p_hi, vb[2], vb[3]);
      mma_16816<T>(o[2 * j], p_lo, vb[0], vb[1]);
      mma_16816<T>(o[2 * j + 1], p_lo, vb[2], vb[3]);
    }
    __syncwarp();  // the stage is refilled by the next iteration's issue
  }
  cp_async_wait<0>();
  pdl_trigger();  // the merge (or the next kernel) may launch during the epilogue (common.cuh)

  // Epilogue: combine the warps' states. Row sums are spread over the 4 lanes of a quad.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(kFullMask, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(kFullMask, l_run[r], 2);
  }
  if (quad == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      s_m[warp * kRows + group + 8 * r] = m_run[r];
      s_l[warp * kRows + group + 8 * r] = l_run[r];
    }
  }
  __syncthreads();

  // Each warp scales its output by exp2(m_w - M) / L and parks it in its own stage memory.
  float* my_out = reinterpret_cast<float*>(my_stages);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = group + 8 * r;
    float m_all = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w * kRows + row]);
    const float base = m_all == -INFINITY ? 0.0f : m_all;
    float l_all = 0.0f;
    for (int w = 0; w < kWarps; ++w) l_all += s_l[w * kRows + row] * exp2f(s_m[w * kRows + row] - base);
    const float factor = l_all > 0.0f ? exp2f(m_run[r] - base) / l_all : 0.0f;
    if (row < heads) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        const float2 value = make_float2(o[n][2 * r] * factor, o[n][2 * r + 1] * factor);
        *reinterpret_cast<float2*>(my_out + row * Cfg::kORowStride + n * 8 + 2 * quad) = value;
      }
    }
  }
  __syncthreads();

  const int64_t q_row0 = static_cast<int64_t>(b) * p.q_heads + hq0;  // [B, Hq] row of head 0
  for (int i = tid; i < heads * kHeadDim; i += Cfg::kThreads) {
    const int row = i / kHeadDim;
    const int d = i % kHeadDim;
    float value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      value += reinterpret_cast<const float*>(s_stages + w * kStages * Cfg::kStageElems)[row * Cfg::kORowStride + d];
    }
    if (num_splits == 1) {
      static_cast<T*>(p.out)[b * p.out_stride_batch + static_cast<int64_t>(hq0 + row) * p.out_stride_head + d] =
          from_float<T>(value);
    } else {
      p.partial_out[((q_row0 + row) * num_splits + split) * kHeadDim + d] = value;
    }
  }
  for (int row = tid; row < heads; row += Cfg::kThreads) {
    float m_all = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w * kRows + row]);
    const float base = m_all == -INFINITY ? 0.0f : m_all;
    float l_all = 0.0f;
    for (int w = 0; w < kWarps; ++w) l_all += s_l[w * kRows + row] * exp2f(s_m[w * kRows + row] - base);
    const float lse = l_all > 0.0f ? (m_all + log2f(l_all)) * kLn2 : -INFINITY;
    if (num_splits == 1) {
      p.lse[q_row0 + row] = lse;
    } else {
      p.partial_lse[(q_row0 + row) * num_splits + split] = lse;
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t launch_sparse_decode(const SparseDecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeConfig<kHeadDim>;
  auto kernel = sparse_decode_kernel<T, kHeadDim>;
  AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(Cfg::kSmemBytes)));
  const int G = p.q_heads / p.kv_heads;
  const int head_tiles = (G + Cfg::kHeadTile - 1) / Cfg::kHeadTile;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.kv_heads * head_tiles;
  if (ctas == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(p.num_splits));
  return launch_kernel(kernel, dim3(grid), dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p, head_tiles);
}

// ---------------------------------------------------------------------------------------------
// Merge of split partial states: one warp per (b, query head). out = sum_s w_s o_s with
// w_s = exp(lse_s - lse), lse = log sum_s exp(lse_s); empty splits (lse -inf) are not read.

constexpr int kMergeWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kMergeWarps * kWarpSize)
merge_splits_kernel(const SparseDecodeParams p) {
  pdl_begin();  // before any global read (common.cuh)
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / kWarpSize;
  if (row >= static_cast<int64_t>(p.batch) * p.q_heads) return;  // whole warp
  const int b = static_cast<int>(row / p.q_heads);
  const int hq = static_cast<int>(row % p.q_heads);
  const int S = p.num_splits;
  const int D = p.head_dim;
  const float* lse_row = p.partial_lse + row * S;

  float m = -INFINITY;
  for (int s = lane; s < S; s += kWarpSize) m = fmaxf(m, lse_row[s]);
  m = warp_max(m);
  T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + hq * p.out_stride_head;
  if (m == -INFINITY) {
    for (int d = lane; d < D; d += kWarpSize) out[d] = from_float<T>(0.0f);
    if (lane == 0) p.lse[row] = -INFINITY;
    return;
  }
  float total = 0.0f;
  for (int s = lane; s < S; s += kWarpSize) total += expf(lse_row[s] - m);
  total = warp_sum(total);
  const float lse = m + logf(total);

  // Lanes own 4 consecutive channels per 128-channel slice. The splits go in batches of
  // kMergeBatch: every load of a batch is issued before any is used. (One split at a time, each
  // partial load sat behind the test of its lse and was used at once: a chain of S L2 latencies,
  // ~0.3 us each, at S = 16-33 splits for batch 1; the SASS showed one LDG.128 per branch.) The
  // sum still runs over the splits in ascending order: the same result, bit for bit.
  constexpr int kMergeBatch = 8;
  for (int d0 = lane * 4; d0 < D; d0 += kWarpSize * 4) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s0 = 0; s0 < S; s0 += kMergeBatch) {
      float ls[kMergeBatch];
      float4 o[kMergeBatch];
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        ls[u] = s0 + u < S ? lse_row[s0 + u] : -INFINITY;  // uniform over the warp
        o[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (ls[u] != -INFINITY) {  // an empty split's partial state is never written: not read
          o[u] = __ldg(reinterpret_cast<const float4*>(p.partial_out + (row * S + s0 + u) * D + d0));
        }
      }
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        if (ls[u] == -INFINITY) continue;
        const float w = expf(ls[u] - lse);
        acc[0] = fmaf(w, o[u].x, acc[0]);
        acc[1] = fmaf(w, o[u].y, acc[1]);
        acc[2] = fmaf(w, o[u].z, acc[2]);
        acc[3] = fmaf(w, o[u].w, acc[3]);
      }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) out[d0 + c] = from_float<T>(acc[c]);
  }
  if (lane == 0) p.lse[row] = lse;
}

template <typename T>
cudaError_t launch_merge_splits(const SparseDecodeParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads;
  if (rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(ceil_div(rows, kMergeWarps));
  return launch_kernel(merge_splits_kernel<T>, dim3(grid), dim3(kMergeWarps * kWarpSize), 0, stream, p);
}

}  // namespace cuda
}  // namespace aether
