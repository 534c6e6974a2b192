// radar_select kernels: block scores ("the radar") and the selection policies.
//
// Two kernels, both enqueued by aether::cuda::radar_select:
//
// 1. radar_score_kernel, grid (batch * kv_heads, slices). A slice streams chunks of 8-32
//    consecutive blocks of its (b, kv_head) through two shared-memory buffers with 16-byte
//    cp.async (the next chunk is in flight while the current one is scored; no registers held by
//    loads) and reads only the statistics the score needs. A warp scores one block at a time for
//    all G query heads of the group: the lanes split the head_dim channels, each block's
//    statistics are reused for the G queries, and the 2G partial sums (dot, box) are combined with
//    a reduce-scatter over the warp. It writes the group score S_j (max over the heads) and, when
//    needed, the per-head scores and per-slice maxima of the mean score (M_g).
//    Scoring is split from the selection so that batch 1 still spreads the statistics reads (the
//    bulk of the bytes: up to 3 x head_dim floats per block) over the whole GPU: one CTA per
//    (b, kv_head) would leave all but kv_heads SMs idle. The launcher skips it where the
//    selection never reads a score (topk keeping every block, nothing else asked).
//
// 2. radar_select_kernel, one CTA per (b, kv_head): priorities (policy dependent, as
//    docs/architecture.md defines them), the count K, the top-K candidates by an exact radix
//    select on order-preserving integer keys, and the output row. No sort:
//    - topk: a 4-pass radix select (8-bit digits, warp-aggregated shared-memory histograms) on
//      32-bit keys of the float priority finds the K-th largest key and how many of the ties at
//      that key to take; ties are then taken in ascending block index, exactly as the rules say.
//    - threshold / adaptive: K comes from a walk over the candidates in priority order that stops
//      where a running sum crosses a limit. It is found by a radix descent over 64-bit keys of the
//      double priority with 16 buckets per pass holding (count, sum of weights); the sums are
//      double, accumulated in registers and reduced in a fixed order (deterministic). Whole
//      buckets are added at once, so the running sum is rounded differently from a sequential
//      sum: K can differ from a sequential implementation only where the running sum is within
//      rounding (double, ~1e-16 relative) of eps or mass. Equal keys have equal weights, so the
//      count at a tie needs no ordering. Then the same radix select as topk picks the K blocks.
//    Keys and weights live in shared memory when they fit (opt-in limit), else in the workspace.
//    topk with the sum aggregation also stages the G head-score rows (read once, eight loads per
//    lane in flight) and their double exp terms (computed once) in shared memory when they fit.
//    The row is a chain of barrier-separated phases on one SM, so the phases are few: the forced
//    blocks are counted in closed form, a radix pass has one barrier (every warp scans the
//    histogram itself), and the write-out counts and places in two passes.
#pragma once

#include <cmath>
#include <type_traits>

#include "aether/cuda/common.cuh"
#include "aether/cuda/mma.cuh"
#include "aether/params.h"

namespace aether {
namespace cuda {

constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / kWarpSize;
// Blocks per score chunk (one to four per warp), chosen per problem (radar_chunk_blocks).
constexpr int kMinChunkBlocks = kScoreWarps;
constexpr int kMaxChunkBlocks = 4 * kScoreWarps;
// Shared-memory buffers of chunks per score CTA: kScoreStages - 1 chunks in flight while one is
// scored. Measured on an H200 at 8 x 32k (head_dim 128, tight): 2 buffers of 16 blocks 21.6 us,
// 4 buffers of 8 blocks 25.3 us (more barriers per byte); bench/PERF_NOTES.md.
constexpr int kScoreStages = 2;
constexpr int kMaxScoreTile = 16;  // query heads scored together: 2 x 16 partial sums = 32 lanes

constexpr int kSelectThreads = 512;
// The one-CTA select's staging loads in flight per lane (sum_group_keys); bench/select_phases.cu
// builds 8 to compare.
#ifndef AETHER_SELECT_STAGE_BATCH
#define AETHER_SELECT_STAGE_BATCH 16
#endif
constexpr int kSelectWarps = kSelectThreads / kWarpSize;

// Phase clocks of the one-CTA selection, for bench/select_phases.cu only (the library never
// defines the macro): thread 0 of each of the first kSelectClockRows CTAs stores clock64() at the
// phase boundaries below, right after the barrier that ends each phase. Phases: 0 start, 1 the
// scores staged and each head's max, 2 the exps and Z_g, 3 the keys, 4-7 the radix passes,
// 8 the radix select done, 9 the write-out's counts, 10 the end.
#ifdef AETHER_SELECT_PHASE_CLOCKS
constexpr int kSelectClockRows = 1024;
constexpr int kSelectClockPhases = 16;
__device__ long long g_select_clocks[kSelectClockRows][kSelectClockPhases];
#define AETHER_SELECT_CLOCK(phase)                                                                   \
  do {                                                                                               \
    const int aether_phase_ = (phase);                                                               \
    if (threadIdx.x == 0 && blockIdx.x < kSelectClockRows && aether_phase_ < kSelectClockPhases) {   \
      g_select_clocks[blockIdx.x][aether_phase_] = clock64();                                        \
    }                                                                                                \
  } while (0)
#else
#define AETHER_SELECT_CLOCK(phase) \
  do {                             \
  } while (0)
#endif

// Device pointers into the radar_select workspace (and the caller's optional outputs).
struct RadarWorkspace {
  float* group_scores = nullptr;          // [B, Hkv, NB] S_j = max over the group
  float* head_scores_out = nullptr;       // where the score kernel stores per-head scores, or null
  const float* head_scores_in = nullptr;  // where the select kernel reads them, or null
  float* partial_mlo = nullptr;           // [B, Hq, n_chunks] per-chunk max of s * q.centroid
  int32_t n_chunks = 0;                   // score CTAs (slices) per (b, kv_head): M_g partials
  int32_t chunk_blocks = kMinChunkBlocks; // blocks per chunk (a slice scores several chunks)
  bool mlo_from_q = false;                // M_g computed from q (else in_head_mlo or -inf)
  void* keys = nullptr;                   // [B, Hkv, NB] select keys when shared memory is short
  double* weights = nullptr;              // [B, Hkv, NB] select weights when shared memory is short
};

inline bool radar_needs_head_scores(const RadarSelectParams& p) {
  return p.policy != Policy::kTopK || p.group_agg == GroupAgg::kSum;
}
// qsketch has no lower bound of the largest logit: its M_g is -inf (never computed from q).
inline bool radar_needs_mlo(const RadarSelectParams& p) {
  return (p.policy == Policy::kThreshold || p.out_head_mlo != nullptr) && p.score != Score::kSketch;
}
__host__ __device__ inline size_t radar_key_bytes(const RadarSelectParams& p) {
  return p.policy == Policy::kTopK ? sizeof(uint32_t) : sizeof(uint64_t);
}
__host__ __device__ inline size_t radar_weight_bytes(const RadarSelectParams& p) {
  return p.policy == Policy::kTopK ? 0 : sizeof(double);
}

// Dynamic shared memory of radar_select_kernel, in bytes from its start: [G] per-head values
// (double normaliser, float M_g, float max), the keys and weights of the row, then the staged
// [G, NB] float scores and [G, NB] double exps (topk with the sum aggregation only). The launcher
// keeps the keys and weights when they fit the opt-in limit, and the staging when all of it fits.
struct SelectSmemLayout {
  size_t head_bytes = 0;         // per-head values
  size_t key_bytes = 0;          // keys, 16-byte aligned (the weights follow them)
  size_t data_bytes = 0;         // keys and weights
  size_t stage_offset = 0;       // head_bytes + data_bytes
  size_t stage_score_bytes = 0;  // [G, NB] floats, 16-byte aligned; 0 when nothing is staged
  size_t stage_bytes = 0;        // stage_score_bytes + [G, NB] doubles
};
__host__ __device__ inline SelectSmemLayout radar_select_smem_layout(const RadarSelectParams& p) {
  const size_t G = static_cast<size_t>(p.q_heads / p.kv_heads);
  const size_t nb = static_cast<size_t>(p.num_blocks);
  SelectSmemLayout l;
  l.head_bytes = (G * 16 + 15) / 16 * 16;
  l.key_bytes = (nb * radar_key_bytes(p) + 15) / 16 * 16;
  l.data_bytes = l.key_bytes + nb * radar_weight_bytes(p);
  l.stage_offset = l.head_bytes + l.data_bytes;
  if (p.policy == Policy::kTopK && p.group_agg == GroupAgg::kSum) {
    l.stage_score_bytes = (G * nb * sizeof(float) + 15) / 16 * 16;
    l.stage_bytes = l.stage_score_bytes + G * nb * sizeof(double);
  }
  return l;
}

// Lays the workspace out from `base` (nullptr: only sizes it) and returns its size in bytes.
inline size_t radar_workspace_layout(const RadarSelectParams& p, void* base, RadarWorkspace* ws) {
  const int64_t heads_kv = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t heads_q = static_cast<int64_t>(p.batch) * p.q_heads;
  const int64_t nb = p.num_blocks;
  // partial_mlo is sized for one slice per smallest chunk; the launcher uses at most that many.
  const int64_t n_chunks = ceil_div(nb, kMinChunkBlocks);
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    const size_t at = offset;
    offset += (bytes + 255) / 256 * 256;  // keep every region 256-byte aligned
    return base == nullptr ? nullptr : static_cast<char*>(base) + at;
  };
  RadarWorkspace w;
  w.n_chunks = static_cast<int32_t>(n_chunks);
  w.group_scores = reinterpret_cast<float*>(take(heads_kv * nb * sizeof(float)));
  if (p.in_head_scores != nullptr) {
    w.head_scores_out = p.out_head_scores;  // copies in -> out when asked
    w.head_scores_in = p.in_head_scores;
  } else if (p.out_head_scores != nullptr) {
    w.head_scores_out = p.out_head_scores;
    w.head_scores_in = p.out_head_scores;
  } else if (radar_needs_head_scores(p)) {
    w.head_scores_out = reinterpret_cast<float*>(take(heads_q * nb * sizeof(float)));
    w.head_scores_in = w.head_scores_out;
  }
  w.mlo_from_q = radar_needs_mlo(p) && p.in_head_mlo == nullptr && p.q != nullptr;
  if (w.mlo_from_q) w.partial_mlo = reinterpret_cast<float*>(take(heads_q * n_chunks * sizeof(float)));
  w.keys = take(heads_kv * nb * radar_key_bytes(p));
  if (radar_weight_bytes(p) > 0) w.weights = reinterpret_cast<double*>(take(heads_kv * nb * sizeof(double)));
  if (ws != nullptr) *ws = w;
  return offset;
}

// ---------------------------------------------------------------------------------------------
// Scores.

__device__ __forceinline__ float load_q_element(const void* q, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat16:
      return to_float(static_cast<const __half*>(q)[index]);
    case DType::kBFloat16:
      return to_float(static_cast<const __nv_bfloat16*>(q)[index]);
    default:
      return static_cast<const float*>(q)[index];
  }
}

// kHeadDim / 32 channels per lane, read as float4 (or float2 for head_dim 64) vectors so that the
// shared-memory reads of a warp are conflict-free: vector v of lane l holds channels
// v * 32 * kVec + l * kVec + [0, kVec).
template <int kHeadDim>
struct LaneChannels {
  static constexpr int kPerLane = kHeadDim / kWarpSize;
  static constexpr int kVec = kPerLane < 4 ? kPerLane : 4;
  static constexpr int kVecs = kPerLane / kVec;
  static_assert(kHeadDim % (kWarpSize * 2) == 0, "head_dim must be a multiple of 64");
  static __device__ __forceinline__ int channel(int v, int lane) { return v * kWarpSize * kVec + lane * kVec; }
};

template <int kVec>
__device__ __forceinline__ void load_vec_shared(const float* ptr, float* out) {
  if constexpr (kVec == 4) {
    const float4 x = *reinterpret_cast<const float4*>(ptr);
    out[0] = x.x; out[1] = x.y; out[2] = x.z; out[3] = x.w;
  } else {
    const float2 x = *reinterpret_cast<const float2*>(ptr);
    out[0] = x.x; out[1] = x.y;
  }
}

// Which statistics a score reads: only those are loaded (box: lo and hi, 2/3 of the bytes; ball
// and mean: the centroid; tight: all three; variance: centroid, radius and spread).
struct ScoreInputs {
  bool q = false;       // q is read (scores computed, or M_g from q)
  bool mu = false;      // centroid
  bool box = false;     // lo and hi
  bool radius = false;
  bool spread = false;
};

__host__ __device__ inline ScoreInputs radar_score_inputs(const RadarSelectParams& p, bool mlo_from_q) {
  ScoreInputs in;
  const bool compute = p.in_head_scores == nullptr;
  in.q = compute || mlo_from_q;
  in.mu = (compute && p.score != Score::kBox) || mlo_from_q;
  in.box = compute && (p.score == Score::kBox || p.score == Score::kTight);
  in.radius = compute && (p.score == Score::kBall || p.score == Score::kTight || p.score == Score::kVariance);
  in.spread = compute && p.score == Score::kVariance;
  return in;
}

// Query heads scored together (a power of two covering G, at most kMaxScoreTile).
inline int radar_score_tile(int group) { return group >= 16 ? 16 : group > 4 ? 8 : group > 2 ? 4 : group; }

// Shared memory of the score kernel, in floats: q, |q| and the per-warp M_g maxima, then
// kScoreStages buffers of one chunk's statistics (centroid, lo, hi, radius, spread), every region
// 16-byte aligned.
struct ScoreSmemLayout {
  int64_t q = 0, qnorm = 0, mlo = 0, buffers = 0;                  // from the start
  int64_t mu = 0, lo = 0, hi = 0, radius = 0, spread = 0, buffer = 0;  // within a buffer
  int64_t total = 0;
  __host__ __device__ ScoreSmemLayout(int g_pad, int head_dim, int chunk_blocks, bool box) {
    const int64_t rows = static_cast<int64_t>(chunk_blocks) * head_dim;
    qnorm = q + static_cast<int64_t>(g_pad) * head_dim;
    mlo = qnorm + g_pad;
    buffers = (mlo + static_cast<int64_t>(kScoreWarps) * g_pad + 3) / 4 * 4;
    lo = mu + rows;
    hi = lo + (box ? rows : 0);
    radius = hi + (box ? rows : 0);
    spread = (radius + chunk_blocks + 3) / 4 * 4;
    buffer = (spread + chunk_blocks + 3) / 4 * 4;
    total = buffers + kScoreStages * buffer;
  }
};

// Blocks per chunk: the largest of 32, 16, 8 whose buffers stay under 56 KiB (so that about four
// CTAs share an SM) and that still gives two chunks per SM (small problems: more, smaller chunks
// spread over more SMs); 0 when not even 8 fit in shared memory.
inline int radar_chunk_blocks(const RadarSelectParams& p, bool box, int num_sms, int smem_optin) {
  constexpr size_t kTargetBytes = 56 * 1024;
  const int G = p.q_heads / p.kv_heads;
  const int tile = radar_score_tile(G);
  const int g_pad = (G + tile - 1) / tile * tile;
  const int64_t heads_kv = static_cast<int64_t>(p.batch) * p.kv_heads;
  for (int chunk = kMaxChunkBlocks; chunk >= kMinChunkBlocks; chunk /= 2) {
    const ScoreSmemLayout layout(g_pad, p.head_dim, chunk, box);
    const size_t bytes = static_cast<size_t>(layout.total) * sizeof(float);
    const size_t buffer_bytes = static_cast<size_t>(layout.buffer) * kScoreStages * sizeof(float);
    if (bytes + 1024 > static_cast<size_t>(smem_optin)) continue;  // margin for static shared memory
    if (chunk == kMinChunkBlocks) return chunk;
    const bool fills = heads_kv * ceil_div(p.num_blocks, chunk) >= 2 * static_cast<int64_t>(num_sms);
    if (buffer_bytes <= kTargetBytes && fills) return chunk;
  }
  return 0;
}

// grid (batch * kv_heads, slices), kScoreThreads threads. Slice c of a (b, kv_head) scores chunks
// c, c + slices, ... of chunk_blocks consecutive blocks through kScoreStages buffers: the
// statistics of the next chunks are in flight (16-byte cp.async, no registers held) while the
// warps score the current one from shared memory, and q is staged once per CTA. Warp w scores
// blocks w, w + 8, ... of a chunk for all G query heads: the lanes split the channels, the 2G
// partial sums (dot, box) are combined with a reduce-scatter over the warp. It writes the group score S_j (max over the heads) and, when needed, the per-head
// scores and per-slice maxima of the mean score (M_g partials).
template <int kHeadDim, int kGroupTile, bool kBox>
__global__ void __launch_bounds__(kScoreThreads)
radar_score_kernel(const RadarSelectParams p, const RadarWorkspace ws) {
  pdl_begin();  // before any global read (common.cuh)
  using C = LaneChannels<kHeadDim>;
  constexpr int kValues = kBox ? 2 * kGroupTile : kGroupTile;  // partial sums per lane per block
  constexpr int kLanesPerValue = kWarpSize / kValues;
  constexpr int kRowVecs = kHeadDim / 4;  // 16-byte vectors per statistics row
  static_assert(kValues <= kWarpSize, "at most 32 partial sums per warp reduction");

  extern __shared__ __align__(16) float s_dyn[];
  const int G = p.q_heads / p.kv_heads;
  const int n_tiles = (G + kGroupTile - 1) / kGroupTile;
  const int g_pad = n_tiles * kGroupTile;
  const int chunk_blocks = ws.chunk_blocks;
  const ScoreSmemLayout layout(g_pad, kHeadDim, chunk_blocks, kBox);
  float* s_q = s_dyn + layout.q;          // [g_pad][kHeadDim], zero rows past G
  float* s_qnorm = s_dyn + layout.qnorm;  // [g_pad]
  float* s_mlo = s_dyn + layout.mlo;      // [kScoreWarps][g_pad] running max of s * q.mu

  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int slice = blockIdx.y;
  const int n_slices = gridDim.y;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int len = p.seq_lens[b];
  const int n_blocks = len <= 0 ? 0 : min((len + p.block_size - 1) / p.block_size, p.num_blocks);
  const int64_t q_head0 = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G;
  const int64_t stats_row0 = static_cast<int64_t>(bh) * p.num_blocks;
  const int n_chunks = (p.num_blocks + chunk_blocks - 1) / chunk_blocks;

  const bool compute_scores = p.in_head_scores == nullptr;
  const ScoreInputs inputs = radar_score_inputs(p, ws.mlo_from_q);  // inputs.box == kBox
  const bool need_q = inputs.q;
  const bool need_mu = inputs.mu;
  const bool need_radius = inputs.radius;
  const bool need_spread = inputs.spread;

  // Requests the statistics of the valid blocks of `chunk` into buffer `buf` (contiguous rows).
  auto issue = [&](int chunk, int buf) {
    float* base = s_dyn + layout.buffers + buf * layout.buffer;
    const int j0 = chunk * chunk_blocks;
    const int n_load = max(0, min(j0 + chunk_blocks, n_blocks) - j0);
    const int64_t row0 = stats_row0 + j0;
    const int n_vec = n_load * kRowVecs;
    if (need_mu) {
      const float* src = p.centroid + row0 * kHeadDim;
      for (int i = tid; i < n_vec; i += kScoreThreads) {
        cp_async_16(shared_address(base + layout.mu + 4 * i), src + 4 * i, 16);
      }
    }
    if (kBox) {
      const float* src_lo = p.lo + row0 * kHeadDim;
      const float* src_hi = p.hi + row0 * kHeadDim;
      for (int i = tid; i < n_vec; i += kScoreThreads) {
        cp_async_16(shared_address(base + layout.lo + 4 * i), src_lo + 4 * i, 16);
        cp_async_16(shared_address(base + layout.hi + 4 * i), src_hi + 4 * i, 16);
      }
    }
    for (int i = tid; i < n_load; i += kScoreThreads) {
      if (need_radius) cp_async_4(shared_address(base + layout.radius + i), p.radius + row0 + i);
      if (need_spread) cp_async_4(shared_address(base + layout.spread + i), p.spread + row0 + i);
    }
  };

#pragma unroll
  for (int st = 0; st < kScoreStages - 1; ++st) {
    const int chunk = slice + st * n_slices;
    if (chunk < n_chunks) issue(chunk, st);
    cp_async_commit();  // always: the waits count groups
  }
  // While the first chunks fly: q and |q|.
  if (need_q) {
    for (int i = tid; i < g_pad * kHeadDim; i += kScoreThreads) {
      const int g = i / kHeadDim;
      const int d = i % kHeadDim;
      s_q[i] = g < G ? load_q_element(p.q, p.dtype,
                                      b * p.q_stride_batch + (static_cast<int64_t>(h) * G + g) * p.q_stride_head + d)
                     : 0.0f;
    }
  }
  for (int i = tid; i < kScoreWarps * g_pad; i += kScoreThreads) s_mlo[i] = -INFINITY;
  __syncthreads();
  if (need_q) {
    for (int g = warp; g < g_pad; g += kScoreWarps) {
      float sq = 0.0f;
      for (int d = lane; d < kHeadDim; d += kWarpSize) sq = fmaf(s_q[g * kHeadDim + d], s_q[g * kHeadDim + d], sq);
      sq = warp_sum(sq);
      if (lane == 0) s_qnorm[g] = sqrtf(sq);
    }
  }

  int k = 0;
  for (int chunk = slice; chunk < n_chunks; chunk += n_slices, ++k) {
    const int ahead = chunk + (kScoreStages - 1) * n_slices;
    if (ahead < n_chunks) issue(ahead, (k + kScoreStages - 1) % kScoreStages);
    cp_async_commit();
    cp_async_wait<kScoreStages - 1>();  // this chunk's group has landed (this thread's copies) ...
    __syncthreads();                    // ... and every thread's; also publishes |q| on the first pass
    const float* base = s_dyn + layout.buffers + (k % kScoreStages) * layout.buffer;
    const int j0 = chunk * chunk_blocks;
    const int j_end = min(j0 + chunk_blocks, p.num_blocks);

    for (int jj = warp; jj < j_end - j0; jj += kScoreWarps) {
      const int j = j0 + jj;
      if (j >= n_blocks) {  // uniform over the warp
        for (int g = lane; g < G; g += kWarpSize) {
          if (ws.head_scores_out != nullptr) ws.head_scores_out[(q_head0 + g) * p.num_blocks + j] = -INFINITY;
        }
        if (lane == 0) ws.group_scores[stats_row0 + j] = -INFINITY;
        continue;
      }
      // This lane's channels of the block's statistics (zeros where the score does not read them).
      float mu[C::kPerLane], lo[C::kPerLane], hi[C::kPerLane];
#pragma unroll
      for (int v = 0; v < C::kVecs; ++v) {
        const int c = jj * kHeadDim + C::channel(v, lane);
        if (need_mu) {
          load_vec_shared<C::kVec>(base + layout.mu + c, &mu[v * C::kVec]);
        } else {
#pragma unroll
          for (int e = 0; e < C::kVec; ++e) mu[v * C::kVec + e] = 0.0f;
        }
        if (kBox) {
          load_vec_shared<C::kVec>(base + layout.lo + c, &lo[v * C::kVec]);
          load_vec_shared<C::kVec>(base + layout.hi + c, &hi[v * C::kVec]);
        }
      }
      const float radius = need_radius ? base[layout.radius + jj] : 0.0f;
      const float spread = need_spread ? base[layout.spread + jj] : 0.0f;

      float group = -INFINITY;
      for (int t = 0; t < n_tiles; ++t) {
        float v[kValues];
#pragma unroll
        for (int i = 0; i < kValues; ++i) v[i] = 0.0f;
        if (need_q) {
#pragma unroll
          for (int g = 0; g < kGroupTile; ++g) {
            const float* qg = s_q + (t * kGroupTile + g) * kHeadDim;
            float dot = 0.0f, box = 0.0f;
#pragma unroll
            for (int vv = 0; vv < C::kVecs; ++vv) {
              float qv[C::kVec];
              load_vec_shared<C::kVec>(qg + C::channel(vv, lane), qv);
#pragma unroll
              for (int c = 0; c < C::kVec; ++c) {
                const int e = vv * C::kVec + c;
                dot = fmaf(qv[c], mu[e], dot);
                if (kBox) box += fmaxf(qv[c] * lo[e], qv[c] * hi[e]);
              }
            }
            v[g] = dot;
            if (kBox) v[kGroupTile + g] = box;
          }
          warp_reduce_scatter<kValues>(v, lane);
        }
        // Lane l now holds value l / kLanesPerValue: the dots of the tile's heads, then the boxes
        // (16 lanes further on when kBox, since kGroupTile * kLanesPerValue == 16).
        const float box_sum = kBox ? __shfl_xor_sync(kFullMask, v[0], 16) : 0.0f;
        const int value = lane / kLanesPerValue;
        const int g = t * kGroupTile + value;
        const bool writer = (lane % kLanesPerValue) == 0 && value < kGroupTile && g < G;
        if (writer) {
          const float dot = v[0];
          float score;
          if (compute_scores) {
            const float qn = s_qnorm[g];
            switch (p.score) {
              case Score::kBall:
                score = p.scale * (dot + qn * radius);
                break;
              case Score::kBox:
                score = box_sum * p.scale;
                break;
              case Score::kTight:
                score = fminf(p.scale * (dot + qn * radius), box_sum * p.scale);
                break;
              case Score::kMean:
                score = p.scale * dot;
                break;
              default:  // kVariance
                score = p.scale * (dot + qn * radius * (1.0f + sqrtf(spread)));
                break;
            }
          } else {
            score = __ldg(p.in_head_scores + (q_head0 + g) * p.num_blocks + j);
          }
          if (ws.head_scores_out != nullptr) ws.head_scores_out[(q_head0 + g) * p.num_blocks + j] = score;
          if (ws.mlo_from_q) {
            float* slot = s_mlo + warp * g_pad + g;
            *slot = fmaxf(*slot, p.scale * dot);
          }
          group = fmaxf(group, score);  // fmaxf drops NaN, like the CPU max
        }
      }
      group = warp_max(group);
      if (lane == 0) ws.group_scores[stats_row0 + j] = group;
    }
    __syncthreads();  // a later iteration refills this buffer
  }
  cp_async_wait<0>();

  if (ws.mlo_from_q) {
    __syncthreads();
    for (int g = tid; g < G; g += kScoreThreads) {
      float m = -INFINITY;
      for (int w = 0; w < kScoreWarps; ++w) m = fmaxf(m, s_mlo[w * g_pad + g]);
      ws.partial_mlo[(q_head0 + g) * ws.n_chunks + slice] = m;
    }
  }
}

// Chooses the chunk size and the slices per (b, kv_head) (one wave of resident CTAs), stores them
// in ws (the select kernel reads ws->n_chunks M_g partials per head), and launches.
template <int kHeadDim, int kGroupTile, bool kBox>
cudaError_t launch_radar_score_tile(const RadarSelectParams& p, RadarWorkspace* ws, cudaStream_t stream) {
  int num_sms = 0, optin = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  RadarSelectParams sized = p;
  sized.head_dim = kHeadDim;
  const int chunk_blocks = radar_chunk_blocks(sized, kBox, num_sms, optin);
  if (chunk_blocks == 0) return cudaErrorInvalidValue;  // G too large for shared memory
  const int G = p.q_heads / p.kv_heads;
  const int g_pad = (G + kGroupTile - 1) / kGroupTile * kGroupTile;
  const ScoreSmemLayout layout(g_pad, kHeadDim, chunk_blocks, kBox);
  const size_t smem = sizeof(float) * static_cast<size_t>(layout.total);
  auto kernel = radar_score_kernel<kHeadDim, kGroupTile, kBox>;
  AETHER_CUDA_TRY(allow_dynamic_smem(kernel, smem));
  // All of the unified L1/shared memory as shared memory: the statistics bypass L1 (cp.async),
  // and more resident CTAs keep more bytes in flight.
  AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       static_cast<int>(cudaSharedmemCarveoutMaxShared)));
  int per_sm = 0;
  AETHER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kScoreThreads, smem));
  const int64_t heads_kv = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int64_t n_chunks = ceil_div(p.num_blocks, chunk_blocks);
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * num_sms;
  const int64_t slices = std::min<int64_t>(n_chunks, std::max<int64_t>(1, resident / heads_kv));
  if (slices > 65535) return cudaErrorInvalidValue;  // grid.y limit
  ws->chunk_blocks = chunk_blocks;
  ws->n_chunks = static_cast<int32_t>(slices);
  const dim3 grid(static_cast<unsigned>(heads_kv), static_cast<unsigned>(slices));
  return launch_kernel(kernel, dim3(grid), dim3(kScoreThreads), smem, stream, p, *ws);
}

// Picks the head tile and whether the box term is needed; instantiated once per head_dim
// (radar_score_hd*.cu). Sets ws->chunk_blocks and ws->n_chunks.
template <int kHeadDim>
cudaError_t launch_radar_score(const RadarSelectParams& p, RadarWorkspace* ws, cudaStream_t stream) {
  const int G = p.q_heads / p.kv_heads;
  const bool box = radar_score_inputs(p, ws->mlo_from_q).box;
  switch (radar_score_tile(G)) {
    case 1: return box ? launch_radar_score_tile<kHeadDim, 1, true>(p, ws, stream) : launch_radar_score_tile<kHeadDim, 1, false>(p, ws, stream);
    case 2: return box ? launch_radar_score_tile<kHeadDim, 2, true>(p, ws, stream) : launch_radar_score_tile<kHeadDim, 2, false>(p, ws, stream);
    case 4: return box ? launch_radar_score_tile<kHeadDim, 4, true>(p, ws, stream) : launch_radar_score_tile<kHeadDim, 4, false>(p, ws, stream);
    case 8: return box ? launch_radar_score_tile<kHeadDim, 8, true>(p, ws, stream) : launch_radar_score_tile<kHeadDim, 8, false>(p, ws, stream);
    default: return box ? launch_radar_score_tile<kHeadDim, 16, true>(p, ws, stream) : launch_radar_score_tile<kHeadDim, 16, false>(p, ws, stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Selection.

struct SelectShared {
  // Radix histograms, three in rotation: a pass fills one and clears the next pass's, so one
  // barrier per pass separates them (radix_select_top). hist[0] is zeroed at kernel start.
  int hist[3][256];
  int warp_cnt[kSelectWarps][16];
  double warp_sum[kSelectWarps][16];
  int warp_ties[kSelectWarps];
  int warp_sel[kSelectWarps];
  double reduce_d[kSelectWarps];
  float reduce_f[kSelectWarps];
  int reduce_i[kSelectWarps];
  // Values broadcast from one thread to the block.
  int digit, above, bucket, count, done;
  unsigned long long prefix, mask;
  double running, tie_weight;
};

// Where radar_select_kernel keeps its row for the opt-in shared-memory limit `optin`
// (radar_select_smem_layout): the keys (and weights) in shared memory when they fit beside the
// static SelectShared, else in the workspace; the staged scores and exps only with the keys in
// shared memory; `dynamic` the bytes to launch with. launch_select and bench/select_phases.cu.
struct SelectLaunchShape {
  bool in_shared = false;
  bool staged = false;
  size_t dynamic = 0;
  bool fits = false;  // dynamic + the static bytes within optin (false: G too large)
};
inline SelectLaunchShape radar_select_launch_shape(const RadarSelectParams& p, size_t optin) {
  const SelectSmemLayout layout = radar_select_smem_layout(p);
  const size_t static_bytes = sizeof(SelectShared) + 1024;  // + a margin for compiler-owned smem
  SelectLaunchShape shape;
  shape.in_shared = layout.head_bytes + layout.data_bytes + static_bytes <= optin;
  // Staging the scores (one read of the rows, one exp per score) needs the keys in shared memory.
  shape.staged = shape.in_shared && layout.stage_bytes > 0 &&
                 layout.stage_offset + layout.stage_bytes + static_bytes <= optin;
  shape.dynamic = shape.staged ? layout.stage_offset + layout.stage_bytes
                  : shape.in_shared ? layout.stage_offset : layout.head_bytes;
  shape.fits = shape.dynamic + static_bytes <= optin;
  return shape;
}

// One (b, kv_head) row of a selection: its valid blocks and the forced ones (sinks, the recent
// window and a partial last block), which are kept whatever the policy.
struct SelectRow {
  int len = 0;
  int n_blocks = 0;  // ceil(len / block_size), at most num_blocks
  int n_full = 0;    // blocks with block_size valid tokens
  bool partial_tail = false;
  int n_forced = 0;
  int n_cand = 0;    // n_blocks - n_forced
  __device__ bool forced(const RadarSelectParams& p, int j) const {
    return j < p.sink_blocks || (j >= n_full - p.recent_blocks && j < n_full) || (partial_tail && j == n_full);
  }
};

__device__ inline SelectRow select_row(const RadarSelectParams& p, int b) {
  SelectRow r;
  const int bs = p.block_size;
  r.len = max(p.seq_lens[b], 0);
  r.n_blocks = r.len == 0 ? 0 : min((r.len + bs - 1) / bs, p.num_blocks);
  r.n_full = r.len / bs;
  r.partial_tail = r.len % bs != 0;
  // The forced blocks are [0, sink) and [n_full - recent, n_full + partial tail) within the row:
  // counted in closed form (a counting pass and its two barriers cost ~1 us of the row's chain).
  const int sink_hi = min(max(p.sink_blocks, 0), r.n_blocks);
  const int tail_lo = max(r.n_full - max(p.recent_blocks, 0), 0);
  const int tail_hi = min(r.n_full + (r.partial_tail ? 1 : 0), r.n_blocks);
  r.n_forced = sink_hi + max(tail_hi - tail_lo, 0) - max(min(sink_hi, tail_hi) - tail_lo, 0);
  r.n_cand = r.n_blocks - r.n_forced;
  return r;
}

// topk: how many candidates the row keeps besides its forced blocks (0 .. n_cand).
__device__ inline int topk_candidates(const RadarSelectParams& p, const SelectRow& r) {
  int64_t total = p.budget_blocks;
  if (total <= 0) {
    const double wanted = ceil(p.budget_fraction * r.n_blocks - 1e-9);
    total = max(static_cast<int64_t>(1), static_cast<int64_t>(fmin(wanted, 1e18)));
  }
  return static_cast<int>(min(max(total - r.n_forced, static_cast<int64_t>(0)), static_cast<int64_t>(r.n_cand)));
}

// M_g of query head `head` (b * q_heads + g): given, the maximum of the score kernel's per-chunk
// partials, or -inf (no lower bound).
__device__ inline float row_head_mlo(const RadarSelectParams& p, const RadarWorkspace& ws, int64_t head) {
  float m = -INFINITY;
  if (p.in_head_mlo != nullptr) {
    m = p.in_head_mlo[head];
  } else if (ws.mlo_from_q) {
    for (int c = 0; c < ws.n_chunks; ++c) m = fmaxf(m, ws.partial_mlo[head * ws.n_chunks + c]);
  }
  return m;
}

// Called by a whole warp: the digit at which the descending running count of the 256-bucket
// histogram `hist` first reaches `need` (>= 1 and <= the total), that bucket's count and the count
// above it. Lane l scans digits 255 - 8l ... 248 - 8l (descending keys come first); the one lane
// whose range holds the crossing broadcasts it.
__device__ __forceinline__ void radix_find_digit(const int* hist, int need, int lane, int& digit, int& bucket,
                                                 int& above) {
  int c[8];
  int lane_total = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    c[i] = hist[255 - 8 * lane - i];
    lane_total += c[i];
  }
  int inclusive = lane_total;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  int running = inclusive - lane_total;
  int my_digit = 0, my_above = 0, my_bucket = 0;
  bool found = false;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (running < need && running + c[i] >= need) {
      my_digit = 255 - 8 * lane - i;
      my_above = running;
      my_bucket = c[i];
      found = true;
    }
    running += c[i];
  }
  const int src = __ffs(__ballot_sync(kFullMask, found)) - 1;  // one lane: need <= the counts
  digit = __shfl_sync(kFullMask, my_digit, src);
  bucket = __shfl_sync(kFullMask, my_bucket, src);
  above = __shfl_sync(kFullMask, my_above, src);
}

// Exact top-k by radix select over the keys of the candidates (keys of other blocks are never
// read): on return the chosen candidates are those with (key & mask) > prefix, plus, among those
// with (key & mask) == prefix, the first `take` in ascending block index (all of them if
// !partial). Requires 0 < k < number of candidates of the row, hist[0] zeroed with a barrier
// since, and no thread still reading hist. Every thread of the block must call.
// This CTA counts blocks [j_begin, j_end) of the row, whose keys are keys[j - j_begin];
// gather(hist) is called by every thread after a pass's counting and returns the row's histogram
// once every CTA of the row has counted (one CTA: a barrier and hist itself; a cluster: a cluster
// barrier and the sum of the CTAs' histograms, select_cluster.cuh).
// One barrier per 8-bit pass: the pass fills hist[pass % 3] and clears hist[(pass + 1) % 3] (last
// read by the scans of pass - 2, which every warp finished before the previous barrier); after the
// barrier every warp scans the 256 counts itself, so no second barrier broadcasts the digit. The
// row's chain of barriers is what this kernel's time is made of (bench/PERF_NOTES.md).
template <typename KeyT, typename CandFn, typename GatherFn>
__device__ void radix_select_top(const KeyT* keys, int j_begin, int j_end, CandFn is_cand, int k, int (*hists)[256],
                                 GatherFn gather, KeyT& prefix, KeyT& mask, int& take, bool& partial) {
  constexpr int kBits = 8 * static_cast<int>(sizeof(KeyT));
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  prefix = 0;
  mask = 0;
  int need = k;
  int pass = 0;
  for (int shift = kBits - 8; shift >= 0; shift -= 8, ++pass) {
    int* hist = hists[pass % 3];
    for (int i = tid; i < 256; i += blockDim.x) hists[(pass + 1) % 3][i] = 0;
    for (int base = j_begin; base < j_end; base += blockDim.x) {  // uniform trip count: match_any
      const int j = base + tid;
      int digit = -1;
      if (j < j_end && is_cand(j)) {
        const KeyT key = keys[j - j_begin];
        if ((key & mask) == prefix) digit = static_cast<int>((key >> shift) & 0xff);
      }
      // Float keys share their top bits: aggregate equal digits of a warp into one atomic.
      const unsigned peers = __match_any_sync(kFullMask, digit);
      if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
    }
    const int* row_hist = gather(hist);
    int digit, bucket, above;
    radix_find_digit(row_hist, need, lane, digit, bucket, above);
    need -= above;
    prefix |= static_cast<KeyT>(digit) << shift;
    mask |= static_cast<KeyT>(0xff) << shift;
    if (bucket == need) {  // the whole bucket is taken: no tie to break
      take = need;
      partial = false;
      return;
    }
  }
  take = need;  // ties at the full key: the first `need` by block index
  partial = true;
}

// Walks the candidates in descending key order (ascending with kFlip) adding their weights to
// `start`, and returns how many are added while cond(running sum) holds. cond must be monotone
// (true, then false, as the sum grows) and weights >= 0. Equal keys must have equal weights.
template <typename KeyT, bool kFlip, typename CandFn, typename CondFn>
__device__ int cumulative_count(const KeyT* keys, const double* weights, int n_blocks, CandFn is_cand,
                                double start, CondFn cond, SelectShared& sh) {
  constexpr int kBits = 8 * static_cast<int>(sizeof(KeyT));
  constexpr int kBuckets = 16;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  KeyT prefix = 0, mask = 0;
  int count = 0;
  bool done = false;
  for (int shift = kBits - 4; shift >= 0; shift -= 4) {
    int cnt[kBuckets];
    double sum[kBuckets];
#pragma unroll
    for (int d = 0; d < kBuckets; ++d) {
      cnt[d] = 0;
      sum[d] = 0.0;
    }
    for (int j = tid; j < n_blocks; j += blockDim.x) {
      if (!is_cand(j)) continue;
      KeyT key = keys[j];
      if (kFlip) key = ~key;
      if ((key & mask) != prefix) continue;
      const int digit = static_cast<int>((key >> shift) & (kBuckets - 1));
      const double w = weights[j];
      // Registers cannot be indexed dynamically: predicated adds into all buckets.
#pragma unroll
      for (int d = 0; d < kBuckets; ++d) {
        const bool hit = digit == d;
        cnt[d] += hit ? 1 : 0;
        sum[d] += hit ? w : 0.0;
      }
    }
    warp_reduce_scatter<kBuckets>(cnt, lane);
    warp_reduce_scatter<kBuckets>(sum, lane);
    if ((lane & 1) == 0) {  // lanes 2d and 2d+1 hold bucket d
      sh.warp_cnt[warp][lane / 2] = cnt[0];
      sh.warp_sum[warp][lane / 2] = sum[0];
    }
    __syncthreads();
    if (tid == 0) {
      double running = (shift == kBits - 4) ? start : sh.running;
      int total_count = (shift == kBits - 4) ? 0 : sh.count;
      bool found = false;
      for (int d = kBuckets - 1; d >= 0; --d) {
        int c = 0;
        double s = 0.0;
        for (int w = 0; w < num_warps; ++w) {
          c += sh.warp_cnt[w][d];
          s += sh.warp_sum[w][d];
        }
        if (c == 0) continue;
        if (cond(running + s)) {
          running += s;
          total_count += c;
          continue;
        }
        found = true;
        sh.prefix = static_cast<unsigned long long>(prefix | (static_cast<KeyT>(d) << shift));
        sh.mask = static_cast<unsigned long long>(mask | (static_cast<KeyT>(kBuckets - 1) << shift));
        sh.bucket = c;
        break;
      }
      // No failing bucket: everything left passes. A single failing element: it is the boundary.
      sh.done = (!found || sh.bucket == 1) ? 1 : 0;
      sh.running = running;
      sh.count = total_count;
    }
    __syncthreads();
    prefix = static_cast<KeyT>(sh.prefix);
    mask = static_cast<KeyT>(sh.mask);
    count = sh.count;
    done = sh.done != 0;
    if (done) break;
  }
  if (!done) {
    // The boundary bucket is one key value: equal weights, so the count does not depend on the
    // order among the ties. Largest t with cond(running + t * w), by bisection.
    for (int j = tid; j < n_blocks; j += blockDim.x) {
      if (!is_cand(j)) continue;
      KeyT key = keys[j];
      if (kFlip) key = ~key;
      if (key == prefix) sh.tie_weight = weights[j];  // all writers store the same value
    }
    __syncthreads();
    if (tid == 0) {
      const double w = sh.tie_weight;
      int lo = 0, hi = sh.bucket;  // cond holds at lo; fails at hi (the whole bucket failed)
      while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        if (cond(sh.running + static_cast<double>(mid) * w)) lo = mid; else hi = mid;
      }
      sh.count += lo;
    }
    __syncthreads();
    count = sh.count;
  }
  __syncthreads();
  return count;
}

// Where this CTA's part of the row goes (write_selection): its first tie's rank among the row's
// ties at the boundary key, its first output slot, and the row's count.
struct SelectionBase {
  int ties_before = 0;
  int out_base = 0;
  int total = 0;
};

// Writes the ascending row of selected blocks, -1 padding and the count, for blocks [j_begin, j_end)
// of the row (keys[j - j_begin]). Each warp owns a contiguous range of 32-block groups so that
// ballots give the ranks in block order. One counting pass (each warp's sure picks and its ties at
// the boundary key), one barrier, one writing pass: a warp's share of the `take` ties follows from
// the ties before it. exchange(cta_ties, cta_sure) returns the SelectionBase of this CTA (one CTA:
// nothing before it; a cluster: the CTAs of lower rank hold the lower blocks). The padding is
// written by this CTA at slots total + pad_first + tid, stepping by pad_step; the count by the
// thread with pad_first + tid == 0.
template <typename KeyT, typename ForcedFn, typename CandFn, typename ExchangeFn>
__device__ void write_selection(const RadarSelectParams& p, int bh, int j_begin, int j_end, ForcedFn is_forced,
                                CandFn is_cand, const KeyT* keys, int k, int n_cand, KeyT prefix, KeyT mask,
                                int take, bool partial, int* s_warp_ties, int* s_warp_sel, ExchangeFn exchange,
                                int pad_first, int pad_step) {
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const int groups = (j_end - j_begin + kWarpSize - 1) / kWarpSize;
  const int groups_per_warp = (groups + num_warps - 1) / num_warps;
  const int g_begin = min(groups, warp * groups_per_warp);
  const int g_end = min(groups, g_begin + groups_per_warp);
  const unsigned lanes_below = (1u << lane) - 1u;
  const bool all_cand = k >= n_cand;
  const bool no_cand = k <= 0;
  const bool split_ties = partial && !all_cand && !no_cand;

  // A tie: a candidate at the boundary key when only `take` of those are kept (by block index).
  auto is_tie = [&](int j) {
    return split_ties && j < j_end && is_cand(j) && (keys[j - j_begin] & mask) == prefix;
  };
  // Chosen whatever the tie ranks (forced, or a candidate above the boundary or at an unsplit one).
  auto is_sure = [&](int j) {
    if (j >= j_end) return false;
    if (is_forced(j)) return true;
    if (!is_cand(j) || no_cand) return false;
    if (all_cand) return true;
    const KeyT masked = keys[j - j_begin] & mask;
    return masked > prefix || (masked == prefix && !partial);
  };

  int ties = 0, sure = 0;
  for (int grp = g_begin; grp < g_end; ++grp) {
    const int j = j_begin + grp * kWarpSize + lane;
    ties += __popc(__ballot_sync(kFullMask, is_tie(j)));
    sure += __popc(__ballot_sync(kFullMask, is_sure(j)));
  }
  if (lane == 0) {
    s_warp_ties[warp] = ties;
    s_warp_sel[warp] = sure;
  }
  __syncthreads();
  AETHER_SELECT_CLOCK(9);
  int cta_ties = 0, cta_sure = 0;
  for (int w = 0; w < num_warps; ++w) {
    cta_ties += s_warp_ties[w];
    cta_sure += s_warp_sel[w];
  }
  const SelectionBase base = exchange(cta_ties, cta_sure);
  int ties_before = base.ties_before, tie_base = 0, out_base = base.out_base;
  for (int w = 0; w < warp; ++w) {
    const int w_ties = s_warp_ties[w];
    out_base += s_warp_sel[w] + (split_ties ? min(max(take - ties_before, 0), w_ties) : 0);
    ties_before += w_ties;
  }
  tie_base = ties_before;
  int32_t* row = p.selected + static_cast<int64_t>(bh) * p.num_blocks;
  {
    int tie_rank = tie_base;
    int out = out_base;
    for (int grp = g_begin; grp < g_end; ++grp) {
      const int j = j_begin + grp * kWarpSize + lane;
      const unsigned tie_mask = __ballot_sync(kFullMask, is_tie(j));
      const bool tie = (tie_mask >> lane) & 1u;
      const bool sel = tie ? tie_rank + __popc(tie_mask & lanes_below) < take : is_sure(j);
      tie_rank += __popc(tie_mask);
      const unsigned sel_mask = __ballot_sync(kFullMask, sel);
      if (sel) row[out + __popc(sel_mask & lanes_below)] = j;
      out += __popc(sel_mask);
    }
  }
  for (int i = base.total + pad_first + tid; i < p.num_blocks; i += pad_step) row[i] = -1;
  if (pad_first + tid == 0) p.num_selected[bh] = base.total;
}

// The factor of a head's softmax shares: 1 / Z_g (params.h: the reciprocal once, then a multiply per
// block, instead of a double division per block and head: ~16% of the select's instructions at 8 x
// 32k), or -1 when Z_g is not finite and > 0 (the head adds nothing). A usable Z_g is >= 1 (the
// row's maximum contributes exp(0)), so the reciprocal is in (0, 1].
__device__ __forceinline__ double share_factor(double z) { return z > 0.0 && !isinf(z) ? 1.0 / z : -1.0; }

// exp(s - top) in double; exactly 0 for s = -inf without the call (the blocks a refinement left
// out: half the row in the two-stage step's final select). CUDA's exp(): a table-driven exp with
// fewer FP64 operations was slower in this phase (bench/PERF_NOTES.md, nineteenth session).
__device__ __forceinline__ double exp_shifted(float s, double top) {
  return s == -INFINITY ? 0.0 : exp(static_cast<double>(s) - top);
}

// Sum-aggregation keys of one (b, kv_head) row: S_j = sum_g exp(s_gj - m_g) * (1 / Z_g) (double,
// rounded to float); heads without a finite, positive Z_g add nothing. `scores` is the row's
// [G, NB] head scores. Every warp works on m_g and Z_g: a head's row is split over
// kSelectWarps / G warps (one warp per head read 64 blocks per lane with a double exp each, ~10 us
// of a 26-30 us select at 2048 blocks per row on an H200). The sums are in a fixed order
// (lane-strided, the warp tree, then the warps in order): deterministic, and the same values with
// or without staging.
// Staged (s_scores and s_exp non-null, the launcher found room): the G rows are read from global
// memory once, eight loads per lane in flight, into shared memory, and each exp is computed once
// and kept (double) for the combine pass. Unstaged (long rows): the rows are read three times and
// every exp is computed twice. s_head_max / s_head_total are [G] shared scratch.
template <typename KeyT>
__device__ void sum_group_keys(const float* scores, int NB, int G, int n_blocks, KeyT* keys, float* s_head_max,
                               double* s_head_total, float* s_scores, double* s_exp, SelectShared& sh) {
  // Loads per lane issued before the first is used: 16 put a 2048-block row of 4 heads (512
  // threads) in flight at once; 8 took two round trips (stage + max 3.5 against 2.5 us at 8 x 32k,
  // bench/select_phases.cu, v25).
  constexpr int kBatch = AETHER_SELECT_STAGE_BATCH;
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const bool staged = s_scores != nullptr;
  const int per_head = G >= kSelectWarps ? 1 : kSelectWarps / G;  // warps per head
  const int slots = G * per_head;  // (head, part) pairs: one per warp unless G > kSelectWarps
  const int stride = per_head * kWarpSize;
  auto head_max = [&](int g) {  // after the first barrier: the maxima of the head's parts, in order
    if (per_head == 1) return s_head_max[g];
    float top = -INFINITY;
    for (int part = 0; part < per_head; ++part) {
      const float s = sh.reduce_f[g * per_head + part];
      top = (top < s) ? s : top;
    }
    return top;
  };
  for (int slot = warp; slot < slots; slot += kSelectWarps) {
    const int g = slot / per_head, part = slot % per_head;
    const float* row = scores + static_cast<int64_t>(g) * NB;
    float local_max = -INFINITY;
    for (int j0 = part * kWarpSize + lane; j0 < n_blocks; j0 += kBatch * stride) {
      float v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int j = j0 + u * stride;
        v[u] = j < n_blocks ? row[j] : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int j = j0 + u * stride;
        if (staged && j < n_blocks) s_scores[g * NB + j] = v[u];
        local_max = (local_max < v[u]) ? v[u] : local_max;  // skips NaN
      }
    }
    const float top = warp_max(local_max);
    if (lane == 0) {
      if (per_head == 1) s_head_max[g] = top; else sh.reduce_f[slot] = top;
    }
  }
  __syncthreads();
  AETHER_SELECT_CLOCK(1);
  for (int slot = warp; slot < slots; slot += kSelectWarps) {
    const int g = slot / per_head, part = slot % per_head;
    const float* row = scores + static_cast<int64_t>(g) * NB;
    const double top = static_cast<double>(head_max(g));  // each warp combines its head's parts
    double local_total = 0.0;
    // Not unrolled: by 2 or 4 the phase took longer (v25, bench/select_phases.cu), though the
    // largest share of its stalls is fixed-latency waits (bench/ncu_select_phases.sh).
    for (int j = part * kWarpSize + lane; j < n_blocks; j += stride) {
      // An all -inf row gives z = 0 (not NaN): either way the head adds nothing.
      const double e = exp_shifted(staged ? s_scores[g * NB + j] : row[j], top);
      if (staged) s_exp[g * NB + j] = e;
      local_total += e;
    }
    const double z = warp_sum(local_total);
    if (lane == 0) {
      if (per_head == 1) s_head_total[g] = share_factor(z); else sh.reduce_d[slot] = z;
    }
  }
  __syncthreads();
  AETHER_SELECT_CLOCK(2);
  if (per_head > 1) {
    for (int g = tid; g < G; g += blockDim.x) {
      double z = 0.0;
      for (int part = 0; part < per_head; ++part) z += sh.reduce_d[g * per_head + part];
      s_head_total[g] = share_factor(z);
      s_head_max[g] = head_max(g);
    }
    __syncthreads();
  }
  for (int j = tid; j < n_blocks; j += blockDim.x) {
    double share = 0.0;
    for (int g = 0; g < G; ++g) {
      const double inv = s_head_total[g];  // 1 / Z_g, or -1: the head adds nothing
      if (inv < 0.0) continue;
      const double e = staged ? s_exp[g * NB + j]
                              : exp_shifted(scores[static_cast<int64_t>(g) * NB + j], s_head_max[g]);
      share += e * inv;
    }
    const float s = static_cast<float>(share);
    keys[j] = ordered_key(isnan(s) ? -INFINITY : s);
  }
}

template <Policy kPolicy>
__global__ void __launch_bounds__(kSelectThreads)
radar_select_kernel(const RadarSelectParams p, const RadarWorkspace ws, const int keys_in_shared,
                    const int scores_in_shared) {
  pdl_begin();  // before any global read (common.cuh)
  AETHER_SELECT_CLOCK(0);
  using KeyT = typename std::conditional<kPolicy == Policy::kTopK, uint32_t, uint64_t>::type;
  __shared__ SelectShared sh;
  extern __shared__ __align__(16) unsigned char s_dyn_bytes[];

  const int G = p.q_heads / p.kv_heads;
  const int bh = blockIdx.x;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int tid = threadIdx.x;
  const int NB = p.num_blocks;
  const int bs = p.block_size;
  const SelectRow row_info = select_row(p, b);
  const int len = row_info.len;
  const int n_blocks = row_info.n_blocks;
  const int64_t q_head0 = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G;

  // Dynamic shared memory (radar_select_smem_layout): per-head values, then (when they fit) keys
  // and weights, then (topk with the sum aggregation, when they fit) the staged scores and exps.
  double* s_head_total = reinterpret_cast<double*>(s_dyn_bytes);  // [G] adaptive normaliser
  float* s_mlo = reinterpret_cast<float*>(s_head_total + G);      // [G] M_g
  float* s_head_max = s_mlo + G;                                  // [G] adaptive max score
  const SelectSmemLayout layout = radar_select_smem_layout(p);
  KeyT* keys;
  double* weights;
  if (keys_in_shared) {
    keys = reinterpret_cast<KeyT*>(s_dyn_bytes + layout.head_bytes);
    weights = reinterpret_cast<double*>(s_dyn_bytes + layout.head_bytes + layout.key_bytes);
  } else {
    keys = static_cast<KeyT*>(ws.keys) + static_cast<int64_t>(bh) * NB;
    weights = ws.weights + static_cast<int64_t>(bh) * NB;
  }
  float* s_stage_scores = nullptr;  // [G, NB]
  double* s_stage_exp = nullptr;    // [G, NB]
  if (scores_in_shared) {
    s_stage_scores = reinterpret_cast<float*>(s_dyn_bytes + layout.stage_offset);
    s_stage_exp = reinterpret_cast<double*>(s_dyn_bytes + layout.stage_offset + layout.stage_score_bytes);
  }

  auto is_forced = [&](int j) { return row_info.forced(p, j); };
  auto is_cand = [&](int j) { return !is_forced(j); };  // callers only pass j < n_blocks
  auto tokens_in = [&](int j) { return static_cast<double>(min(len, (j + 1) * bs) - j * bs); };
  const int n_forced = row_info.n_forced;
  const int n_cand = row_info.n_cand;
  for (int i = tid; i < 256; i += blockDim.x) sh.hist[0][i] = 0;  // radix_select_top's first pass

  // M_g: the threshold policy's lower bound of each head's largest logit.
  if (kPolicy == Policy::kThreshold || p.out_head_mlo != nullptr) {
    for (int g = tid; g < G; g += blockDim.x) {
      const float m = row_head_mlo(p, ws, q_head0 + g);
      s_mlo[g] = m;
      if (p.out_head_mlo != nullptr) p.out_head_mlo[q_head0 + g] = m;
    }
    __syncthreads();
  }

  int k = 0;
  if constexpr (kPolicy == Policy::kTopK) {
    k = topk_candidates(p, row_info);
    if (k > 0 && k < n_cand) {
      if (p.group_agg == GroupAgg::kSum) {
        // s_head_max / s_head_total are free under topk.
        sum_group_keys<KeyT>(ws.head_scores_in + q_head0 * NB, NB, G, n_blocks, keys, s_head_max, s_head_total,
                             s_stage_scores, s_stage_exp, sh);
      } else {
        const float* group = ws.group_scores + static_cast<int64_t>(bh) * NB;
        for (int j = tid; j < n_blocks; j += blockDim.x) {
          const float s = group[j];
          keys[j] = ordered_key(isnan(s) ? -INFINITY : s);  // CPU: NaN ranks last
        }
      }
      __syncthreads();
      AETHER_SELECT_CLOCK(3);
    }
  } else if constexpr (kPolicy == Policy::kThreshold) {
    // l_j = log(n_j) + max_g (s_gj - M_g) in double; NaN never dropped (CPU: +inf).
    for (int j = tid; j < n_blocks; j += blockDim.x) {
      double best = -INFINITY;
      for (int g = 0; g < G; ++g) {
        const double s = static_cast<double>(ws.head_scores_in[(q_head0 + g) * NB + j]) - static_cast<double>(s_mlo[g]);
        best = (best < s) ? s : best;  // std::max(best, s): NaN s is skipped
      }
      double l = log(tokens_in(j)) + best;
      if (isnan(l)) l = INFINITY;
      keys[j] = ordered_key(l);
      weights[j] = exp(l);
    }
    __syncthreads();
    const double eps = p.eps;
    const int dropped = n_cand == 0 ? 0
        : cumulative_count<KeyT, true>(keys, weights, n_blocks, is_cand, 0.0,
                                       [eps](double x) { return x <= eps; }, sh);
    k = n_cand - dropped;
  } else {  // kAdaptive
    // Per head: max score and normaliser sum_j n_j exp(s_gj - max), double; a head without a
    // usable normaliser contributes nothing (as on the CPU).
    for (int g = 0; g < G; ++g) {
      const float* row = ws.head_scores_in + (q_head0 + g) * NB;
      float local_max = -INFINITY;
      for (int j = tid; j < n_blocks; j += blockDim.x) {
        const float s = row[j];
        local_max = (local_max < s) ? s : local_max;
      }
      const float top = block_reduce(local_max, sh.reduce_f, MaxOp());
      double local_total = 0.0;
      for (int j = tid; j < n_blocks; j += blockDim.x) {
        local_total += tokens_in(j) * exp(static_cast<double>(row[j]) - static_cast<double>(top));
      }
      const double total = block_reduce(local_total, sh.reduce_d, SumOp());
      if (tid == 0) {
        s_head_max[g] = top;
        s_head_total[g] = total;
      }
    }
    __syncthreads();
    double forced_mass_local = 0.0;
    for (int j = tid; j < n_blocks; j += blockDim.x) {
      double m = 0.0;
      for (int g = 0; g < G; ++g) {
        const double total = s_head_total[g];
        if (!(total > 0.0) || isinf(total)) continue;
        const double s = ws.head_scores_in[(q_head0 + g) * NB + j];
        m += tokens_in(j) * exp(s - static_cast<double>(s_head_max[g])) / total;
      }
      m /= G;
      if (isnan(m)) m = 0.0;
      keys[j] = ordered_key(m);
      weights[j] = m;
      if (is_forced(j)) forced_mass_local += m;
    }
    const double forced_mass = block_reduce(forced_mass_local, sh.reduce_d, SumOp());
    const double mass = p.mass;
    int added = 0;
    if (forced_mass < mass && n_cand > 0) {
      const int below = cumulative_count<KeyT, false>(keys, weights, n_blocks, is_cand, forced_mass,
                                                      [mass](double x) { return x < mass; }, sh);
      added = min(below + 1, n_cand);
    }
    int64_t total = max(static_cast<int64_t>(n_forced) + added, static_cast<int64_t>(p.min_blocks));
    if (p.max_blocks > 0) total = min(total, static_cast<int64_t>(p.max_blocks));
    total = min(max(total, static_cast<int64_t>(n_forced)), static_cast<int64_t>(n_blocks));
    k = static_cast<int>(total - n_forced);
  }

  KeyT prefix = 0, mask = 0;
  int take = 0;
  bool partial = false;
  if (k > 0 && k < n_cand) {
    int pass = 0;  // (phase clocks only)
    auto gather = [&pass](int* hist) -> const int* {
      __syncthreads();
      AETHER_SELECT_CLOCK(4 + pass++);
      return hist;
    };
    (void)pass;
    radix_select_top<KeyT>(keys, 0, n_blocks, is_cand, k, sh.hist, gather, prefix, mask, take, partial);
    AETHER_SELECT_CLOCK(8);
  }
  const bool split_ties = partial && k > 0 && k < n_cand;
  auto exchange = [&](int cta_ties, int cta_sure) {
    SelectionBase base;
    base.total = cta_sure + (split_ties ? min(take, cta_ties) : 0);
    return base;
  };
  pdl_trigger();  // the decode may launch during the write-out (common.cuh)
  write_selection<KeyT>(p, bh, 0, n_blocks, is_forced, is_cand, keys, k, n_cand, prefix, mask, take, partial,
                        sh.warp_ties, sh.warp_sel, exchange, 0, blockDim.x);
  AETHER_SELECT_CLOCK(10);
}

}  // namespace cuda
}  // namespace aether
