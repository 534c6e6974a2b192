// select_topk_cluster_kernel: the topk selection of one (b, kv_head) row spread over a thread-block
// cluster of up to 8 CTAs, under the same rules as radar_select_kernel<kTopK>, whose row is one
// CTA's chain of barrier-separated phases: 24 us at 1 x 32k and 69 us at 1 x 128k on an H200
// (16-token blocks), where the 8 rows left all but 8 SMs idle. Used for few, long rows
// (cluster_select_ctas).
//
// CTA r of a cluster of C takes the contiguous blocks [r * S, (r + 1) * S) of the row, S a
// multiple of 32 (ceil(n_blocks / 32 / C) warps' worth), so that the cluster's order of ranks is
// the row's block order. Every phase that needs the whole row exchanges a few values through
// distributed shared memory after a cluster barrier, and each CTA combines them in rank order (so
// all CTAs get the same values, deterministically):
//   1. keys (sum aggregation): the CTA's per-head maxima -> M_g; the CTA's sums of
//      exp(s_gj - M_g) (double) -> Z_g; then key_j = sum_g exp(s_gj - M_g) * (1 / Z_g) (double, rounded
//      to float) as sum_group_keys. The max aggregation's keys are the group scores.
//   2. radix select (radix_select_top): per 8-bit pass, each CTA counts its candidates' digits,
//      and after the cluster barrier thread d adds digit d's counts of all CTAs; every warp then
//      scans that histogram. One cluster barrier per pass.
//   3. write-out (write_selection): each CTA counts its sure picks and boundary ties, the counts
//      of the lower ranks give its output slots and its first tie's rank.
// A last cluster barrier keeps every CTA's shared memory alive until the others have read it.
// Z_g is summed in another order than radar_select_kernel's (per CTA, then the CTAs in order):
// keys can differ in the last double bits (~1e-16 relative), which changes the float key only
// where it sits on a float rounding boundary. So, as between the CPU's sequential sums and the
// GPU, a near-tie at the boundary can break differently for the same row at batch 1 (this
// kernel) and at a larger batch (radar_select_kernel). The max aggregation's keys are identical.
#pragma once

#include <cooperative_groups.h>

#include "aether/cuda/radar_select.cuh"

namespace aether {
namespace cuda {

constexpr int kClusterSelectThreads = 256;
constexpr int kClusterSelectWarps = kClusterSelectThreads / kWarpSize;
constexpr int kClusterSelectMaxCtas = 8;    // the portable cluster size
constexpr int kClusterSelectMaxHeads = 16;  // G of the per-head exchange arrays (larger G: one CTA)

struct ClusterSelectShared {
  int hist[3][256];  // this CTA's radix counts, three in rotation (radix_select_top)
  int total[256];    // the row's counts of the current pass (all CTAs)
  float warp_max[kClusterSelectWarps][kClusterSelectMaxHeads];
  double warp_sum[kClusterSelectWarps][kClusterSelectMaxHeads];
  float cta_max[kClusterSelectMaxHeads];   // read by the other CTAs
  double cta_sum[kClusterSelectMaxHeads];  // read by the other CTAs
  float head_max[kClusterSelectMaxHeads];  // M_g of the row
  double head_z[kClusterSelectMaxHeads];   // 1 / Z_g of the row, or -1 (share_factor)
  int warp_ties[kClusterSelectWarps];
  int warp_sel[kClusterSelectWarps];
  int cta_ties, cta_sure;                  // read by the other CTAs
};

// Blocks per CTA: whole 32-block groups (write_selection's warps), the row over `ctas` CTAs.
__host__ __device__ inline int cluster_select_span(int n_blocks, int ctas) {
  const int groups = (n_blocks + kWarpSize - 1) / kWarpSize;
  return (groups + ctas - 1) / ctas * kWarpSize;
}

// Dynamic shared memory of select_topk_cluster_kernel, in bytes from its start: [span] keys, then
// (sum aggregation, when the launcher finds room) the staged [G, span] scores and [G, span] exps.
struct ClusterSelectSmem {
  size_t score_offset = 0;
  size_t exp_offset = 0;
  size_t keys_only = 0;    // bytes without the staging
  size_t with_stage = 0;   // bytes with it
};
__host__ __device__ inline ClusterSelectSmem cluster_select_smem(int span, int G) {
  ClusterSelectSmem l;
  l.score_offset = (static_cast<size_t>(span) * sizeof(uint32_t) + 15) / 16 * 16;
  l.keys_only = l.score_offset;
  l.exp_offset = l.score_offset + (static_cast<size_t>(G) * span * sizeof(float) + 15) / 16 * 16;
  l.with_stage = l.exp_offset + static_cast<size_t>(G) * span * sizeof(double);
  return l;
}

// Sum-aggregation keys of blocks [j_begin, j_end) of the row (scores: the row's [G, NB] head
// scores; staged: a [G, span] copy of this CTA's part in shared memory and staged_exp its
// [G, span] exps, computed once, or both null to read global memory and compute the exps twice).
template <typename ClusterT>
__device__ void cluster_sum_keys(ClusterT& cluster, const float* scores, int NB, int G, int j_begin, int j_end,
                                 float* staged, double* staged_exp, int span, uint32_t* keys,
                                 ClusterSelectShared& sh) {
  constexpr int kBatch = 8;  // loads per thread issued before the first is used
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int n = j_end - j_begin;
  const int ctas = static_cast<int>(cluster.num_blocks());
  if (staged != nullptr) {
    for (int i0 = tid; i0 < G * n; i0 += kBatch * kClusterSelectThreads) {
      float v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + u * kClusterSelectThreads;
        v[u] = i < G * n ? scores[static_cast<int64_t>(i / n) * NB + j_begin + i % n] : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + u * kClusterSelectThreads;
        if (i < G * n) staged[(i / n) * span + i % n] = v[u];
      }
    }
    __syncthreads();
  }
  auto score = [&](int g, int j) {
    return staged != nullptr ? staged[g * span + j - j_begin] : scores[static_cast<int64_t>(g) * NB + j];
  };
  for (int g = 0; g < G; ++g) {
    float top = -INFINITY;
    for (int j = j_begin + tid; j < j_end; j += kClusterSelectThreads) {
      const float v = score(g, j);
      top = (top < v) ? v : top;  // skips NaN
    }
    top = warp_max(top);
    if (lane == 0) sh.warp_max[warp][g] = top;
  }
  __syncthreads();
  if (tid < G) {
    float top = -INFINITY;
    for (int w = 0; w < kClusterSelectWarps; ++w) top = fmaxf(top, sh.warp_max[w][tid]);
    sh.cta_max[tid] = top;
  }
  cluster.sync();
  if (tid < G) {
    float top = -INFINITY;
    for (int r = 0; r < ctas; ++r) top = fmaxf(top, cluster.map_shared_rank(sh.cta_max, r)[tid]);
    sh.head_max[tid] = top;
  }
  __syncthreads();
  for (int g = 0; g < G; ++g) {
    const double top = static_cast<double>(sh.head_max[g]);
    double total = 0.0;
    for (int j = j_begin + tid; j < j_end; j += kClusterSelectThreads) {
      const double e = exp_shifted(score(g, j), top);
      if (staged_exp != nullptr) staged_exp[g * span + j - j_begin] = e;
      total += e;
    }
    total = warp_sum(total);
    if (lane == 0) sh.warp_sum[warp][g] = total;
  }
  __syncthreads();
  if (tid < G) {
    double total = 0.0;
    for (int w = 0; w < kClusterSelectWarps; ++w) total += sh.warp_sum[w][tid];
    sh.cta_sum[tid] = total;
  }
  cluster.sync();
  if (tid < G) {
    double z = 0.0;
    for (int r = 0; r < ctas; ++r) z += cluster.map_shared_rank(sh.cta_sum, r)[tid];
    sh.head_z[tid] = share_factor(z);  // 1 / Z_g or -1 (radar_select.cuh)
  }
  __syncthreads();
  for (int j = j_begin + tid; j < j_end; j += kClusterSelectThreads) {
    double share = 0.0;
    for (int g = 0; g < G; ++g) {
      const double inv = sh.head_z[g];
      if (inv < 0.0) continue;  // the head adds nothing
      const double e = staged_exp != nullptr ? staged_exp[g * span + j - j_begin]
                                             : exp_shifted(score(g, j), static_cast<double>(sh.head_max[g]));
      share += e * inv;
    }
    const float s = static_cast<float>(share);
    keys[j - j_begin] = ordered_key(isnan(s) ? -INFINITY : s);
  }
}

// grid.x = rows * C with cluster dims (C, 1, 1). Dynamic shared memory: cluster_select_smem(span, G)
// with span = cluster_select_span(num_blocks, C), the staging only when stage_scores.
template <GroupAgg kAgg>
__global__ void __launch_bounds__(kClusterSelectThreads)
select_topk_cluster_kernel(const RadarSelectParams p, const RadarWorkspace ws, const int stage_scores) {
  pdl_begin();  // before any global read (common.cuh)
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ ClusterSelectShared sh;
  extern __shared__ __align__(16) unsigned char s_dyn_bytes[];
  const int ctas = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int bh = blockIdx.x / ctas;
  const int b = bh / p.kv_heads;
  const int h = bh % p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  const int NB = p.num_blocks;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const SelectRow row_info = select_row(p, b);
  const int n_blocks = row_info.n_blocks;
  const int n_cand = row_info.n_cand;
  const int span_cap = cluster_select_span(NB, ctas);        // the launch's shared-memory span
  const int span = cluster_select_span(n_blocks, ctas);      // this row's
  const int j_begin = min(rank * span, n_blocks);
  const int j_end = min(j_begin + span, n_blocks);
  uint32_t* keys = reinterpret_cast<uint32_t*>(s_dyn_bytes);
  const ClusterSelectSmem smem = cluster_select_smem(span_cap, G);
  float* staged = stage_scores ? reinterpret_cast<float*>(s_dyn_bytes + smem.score_offset) : nullptr;
  double* staged_exp = stage_scores ? reinterpret_cast<double*>(s_dyn_bytes + smem.exp_offset) : nullptr;

  auto is_forced = [&](int j) { return row_info.forced(p, j); };
  auto is_cand = [&](int j) { return !is_forced(j); };  // callers only pass j < n_blocks
  for (int i = tid; i < 256; i += kClusterSelectThreads) sh.hist[0][i] = 0;  // radix_select_top's first pass

  if (p.out_head_mlo != nullptr && rank == 0) {  // M_g, as radar_select_kernel writes it
    const int64_t q_head0 = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G;
    for (int g = tid; g < G; g += kClusterSelectThreads) p.out_head_mlo[q_head0 + g] = row_head_mlo(p, ws, q_head0 + g);
  }
  const int k = topk_candidates(p, row_info);  // the same in every CTA of the row
  uint32_t prefix = 0, mask = 0;
  int take = 0;
  bool partial = false;
  if (k > 0 && k < n_cand) {
    if constexpr (kAgg == GroupAgg::kSum) {
      const int64_t q_head0 = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G;
      cluster_sum_keys(cluster, ws.head_scores_in + q_head0 * NB, NB, G, j_begin, j_end, staged, staged_exp, span_cap,
                       keys, sh);
    } else {
      const float* group = ws.group_scores + static_cast<int64_t>(bh) * NB;
      for (int j = j_begin + tid; j < j_end; j += kClusterSelectThreads) {
        const float s = group[j];
        keys[j - j_begin] = ordered_key(isnan(s) ? -INFINITY : s);  // CPU: NaN ranks last
      }
    }
    __syncthreads();
    auto gather = [&](int* hist) -> const int* {
      cluster.sync();  // every CTA has counted this pass
      for (int d = tid; d < 256; d += kClusterSelectThreads) {
        int count[kClusterSelectMaxCtas];  // all loads in flight together
#pragma unroll
        for (int r = 0; r < kClusterSelectMaxCtas; ++r) count[r] = r < ctas ? cluster.map_shared_rank(hist, r)[d] : 0;
        int total = 0;
#pragma unroll
        for (int r = 0; r < kClusterSelectMaxCtas; ++r) total += count[r];
        sh.total[d] = total;
      }
      __syncthreads();
      return sh.total;
    };
    radix_select_top<uint32_t>(keys, j_begin, j_end, is_cand, k, sh.hist, gather, prefix, mask, take, partial);
  }
  const bool split_ties = partial && k > 0 && k < n_cand;
  auto exchange = [&](int cta_ties, int cta_sure) {
    if (tid == 0) {
      sh.cta_ties = cta_ties;
      sh.cta_sure = cta_sure;
    }
    cluster.sync();
    // Lane r reads rank r's counts; every warp walks the ranks in order.
    int r_ties = 0, r_sure = 0;
    if (lane < ctas) {
      r_ties = *cluster.map_shared_rank(&sh.cta_ties, lane);
      r_sure = *cluster.map_shared_rank(&sh.cta_sure, lane);
    }
    SelectionBase base;
    int ties_before = 0;
    for (int r = 0; r < ctas; ++r) {
      const int t = __shfl_sync(kFullMask, r_ties, r);
      const int taken = split_ties ? min(max(take - ties_before, 0), t) : 0;
      const int out = __shfl_sync(kFullMask, r_sure, r) + taken;
      if (r < rank) {
        base.ties_before += t;
        base.out_base += out;
      }
      base.total += out;
      ties_before += t;
    }
    return base;
  };
  write_selection<uint32_t>(p, bh, j_begin, j_end, is_forced, is_cand, keys, k, n_cand, prefix, mask, take, partial,
                            sh.warp_ties, sh.warp_sel, exchange, rank * kClusterSelectThreads,
                            ctas * kClusterSelectThreads);
  cluster.sync();  // no CTA leaves while another may still read its shared memory
}

// The cluster size for `rows` rows of `num_blocks` blocks on `num_sms` SMs: 8 where the rows' CTAs
// fit one per SM and a row has at least 1024 blocks (128 per CTA), else 0 (radar_select_kernel,
// one CTA per row). Measured on an H200 (select_blocks alone, sum aggregation, 16-token blocks,
// 32 query / 8 KV heads, bench/select_sweep.py; bench/results/select_sweep_h200_v14.json):
//   | rows (shape)      | one CTA per row | 4 CTAs per row | 8 CTAs per row |
//   | 8 (1 x 32k)       | 17.5 us         | 15.8           | 13.7           |
//   | 8 (1 x 128k)      | 65.0            | 34.9           | 22.7           |
//   | 16 (2 x 32k)      | 17.5            |                | 15.0           |
//   | 32 (4 x 32k)      | 17.6            | 17.8           |                |
//   | 64 (8 x 32k)      | 17.4            | 21.0           | 28.9           |
//   | 256 (32 x 16k)    | 17.4            | 41.8           | 72.3           |
// Each CTA repeats the row's fixed chain of phases (~3100 instructions per warp at 8 x 32k with 8
// CTAs per row, 12.7 M in all), so the cluster wins only where SMs would idle. Shorter rows were
// not measured; their one-CTA chain is short.
inline int cluster_select_ctas(int64_t rows, int num_blocks, int num_sms) {
  constexpr int kMinBlocks = 1024;
  return rows * kClusterSelectMaxCtas <= num_sms && num_blocks >= kMinBlocks ? kClusterSelectMaxCtas : 0;
}

}  // namespace cuda
}  // namespace aether
