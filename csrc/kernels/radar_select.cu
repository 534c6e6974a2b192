// radar_select launcher: validation, workspace layout, head_dim dispatch of the score kernel, and
// the selection kernel (dtype and head_dim independent, instantiated here once per policy).
#include <cstdlib>

#include <nvtx3/nvtx3.hpp>

#include "aether/cuda/launchers.h"
#include "aether/cuda/key_sketch.cuh"
#include "aether/cuda/radar_select.cuh"
#include "aether/cuda/select_cluster.cuh"

namespace aether {
namespace cuda {

extern template cudaError_t launch_radar_score<64>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);
extern template cudaError_t launch_radar_score<128>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);
extern template cudaError_t launch_radar_score<256>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);
extern template cudaError_t launch_sketch_score<64>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);
extern template cudaError_t launch_sketch_score<128>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);
extern template cudaError_t launch_sketch_score<256>(const RadarSelectParams&, RadarWorkspace*, cudaStream_t);

namespace {

cudaError_t validate(const RadarSelectParams& p) {
  if (p.batch < 0 || p.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  if (p.block_size <= 0 || p.num_blocks < 0) return cudaErrorInvalidValue;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  switch (p.score) {
    case Score::kBall: case Score::kBox: case Score::kTight: case Score::kMean: case Score::kVariance: break;
    case Score::kSketch:
      if (p.policy == Policy::kThreshold) return cudaErrorInvalidValue;  // not an upper bound
      if (p.in_head_scores != nullptr) break;  // nothing of the sketch is read
      if (p.sketch_rank != 2 && p.sketch_rank != 4 && p.sketch_rank != 8 && p.sketch_rank != 16) {
        return cudaErrorInvalidValue;
      }
      // P = blocks_per_sketch: a power of two in 1..kMaxBlocksPerSketch dividing num_blocks, and a
      // sketch block of P * block_size tokens fits the kernels' buffers.
      if (p.blocks_per_sketch < 1 || p.blocks_per_sketch > kMaxBlocksPerSketch ||
          (p.blocks_per_sketch & (p.blocks_per_sketch - 1)) != 0 || p.num_blocks % p.blocks_per_sketch != 0 ||
          p.block_size * p.blocks_per_sketch > kMaxSketchBlockSize) {
        return cudaErrorInvalidValue;
      }
      if (p.sketch_codes == nullptr || p.sketch_ranges == nullptr || p.sketch_key_proj == nullptr ||
          p.sketch_query_proj == nullptr) {
        return cudaErrorInvalidValue;
      }
      // The bf16 sketch centroids (not the float32 block statistics) are read when a != 0.
      if (p.centroid_weight != 0.0f && p.sketch_centroid == nullptr) return cudaErrorInvalidValue;
      // Codes and centroids are read as 16-byte vectors, ranges as 32-bit words.
      if (reinterpret_cast<uintptr_t>(p.sketch_codes) % 16 != 0) return cudaErrorInvalidValue;
      if (p.centroid_weight != 0.0f && reinterpret_cast<uintptr_t>(p.sketch_centroid) % 16 != 0) {
        return cudaErrorInvalidValue;
      }
      if (reinterpret_cast<uintptr_t>(p.sketch_ranges) % 4 != 0) return cudaErrorInvalidValue;
      break;
    default: return cudaErrorInvalidValue;
  }
  if (p.group_agg != GroupAgg::kMax && p.group_agg != GroupAgg::kSum) return cudaErrorInvalidValue;
  switch (p.policy) {
    case Policy::kTopK: case Policy::kThreshold: case Policy::kAdaptive: break;
    default: return cudaErrorInvalidValue;
  }
  if (p.in_head_scores == nullptr && p.q == nullptr) return cudaErrorInvalidValue;
  // The statistics are read as float4 / float2 vectors.
  for (const float* stats : {p.centroid, p.lo, p.hi}) {
    if (reinterpret_cast<uintptr_t>(stats) % 16 != 0) return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// AETHER_SELECT_CLUSTER: unset, the launcher's choice (cluster_select_ctas); 0, topk on the
// one-CTA-per-row kernel; 1, 2, 4 or 8, that many CTAs per row whatever the rows (comparisons:
// bench/select_sweep.py).
int select_cluster_setting() {
  static const int setting = [] {
    const char* env = std::getenv("AETHER_SELECT_CLUSTER");
    if (env == nullptr || env[0] == '\0') return -1;
    const int n = std::atoi(env);
    return (n == 0 || n == 1 || n == 2 || n == 4 || n == 8) ? n : -1;
  }();
  return setting;
}

// topk on select_topk_cluster_kernel (select_cluster.cuh). Sets *launched = false, launching
// nothing, where the one-CTA kernel does it: many or short rows (cluster_select_ctas), more than
// kClusterSelectMaxHeads query heads per KV head, or a row too long for the keys of a CTA's part.
template <GroupAgg kAgg>
cudaError_t launch_select_cluster(const RadarSelectParams& p, const RadarWorkspace& ws, cudaStream_t stream,
                                  bool* launched) {
  *launched = false;
  const int G = p.q_heads / p.kv_heads;
  const int setting = select_cluster_setting();
  if (setting == 0 || G > kClusterSelectMaxHeads) return cudaSuccess;
  int optin = 0, num_sms = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
  const size_t limit = static_cast<size_t>(optin) - sizeof(ClusterSelectShared) - 1024;  // + compiler-owned smem
  auto kernel = select_topk_cluster_kernel<kAgg>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.kv_heads;
  const int ctas = setting > 0 ? setting : cluster_select_ctas(rows, p.num_blocks, num_sms);
  if (ctas == 0) return cudaSuccess;
  // Dynamic bytes: the keys, then (sum aggregation, when it fits) the staged scores and exps.
  const ClusterSelectSmem layout = cluster_select_smem(cluster_select_span(p.num_blocks, ctas), G);
  const bool stage = kAgg == GroupAgg::kSum && layout.with_stage <= limit;
  const size_t smem = stage ? layout.with_stage : layout.keys_only;
  if (smem > limit || rows * ctas > 0x7fffffff) return cudaSuccess;  // the one-CTA kernel (keys in the workspace)
  AETHER_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(rows * ctas));
  // 8 CTAs of at most the opt-in shared memory each: a portable cluster size, resident on any
  // sm_90 GPC (no occupancy query: cudaOccupancyMaxActiveClusters has not run on a GPU here).
  *launched = true;
  return launch_kernel_clustered(kernel, grid, dim3(kClusterSelectThreads), smem, stream, ctas, p, ws, stage ? 1 : 0);
}

template <Policy kPolicy>
cudaError_t launch_select(const RadarSelectParams& p, const RadarWorkspace& ws, cudaStream_t stream) {
  if constexpr (kPolicy == Policy::kTopK) {
    bool launched = false;
    AETHER_CUDA_TRY(p.group_agg == GroupAgg::kSum ? launch_select_cluster<GroupAgg::kSum>(p, ws, stream, &launched)
                                                  : launch_select_cluster<GroupAgg::kMax>(p, ws, stream, &launched));
    if (launched) return cudaSuccess;
  }
  int optin = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  const SelectLaunchShape shape = radar_select_launch_shape(p, static_cast<size_t>(optin));
  if (!shape.fits) return cudaErrorInvalidValue;  // G too large
  auto kernel = radar_select_kernel<kPolicy>;
  // Always: the default dynamic limit is 48 KiB minus the static SelectShared, so a launch with a
  // little under 48 KiB of keys failed with "invalid argument" (seen for NB = 2789, adaptive).
  AETHER_CUDA_TRY(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shape.dynamic)));
  const unsigned grid = static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.kv_heads);
  return launch_kernel(kernel, dim3(grid), dim3(kSelectThreads), shape.dynamic, stream, p, ws,
                       shape.in_shared ? 1 : 0, shape.staged ? 1 : 0);
}

}  // namespace

size_t radar_select_workspace_bytes(const RadarSelectParams& params) {
  return radar_workspace_layout(params, nullptr, nullptr);
}

cudaError_t radar_select(const RadarSelectParams& params, void* workspace, cudaStream_t stream) {
  nvtx3::scoped_range range{"aether::radar_select"};
  AETHER_CUDA_TRY(validate(params));
  if (static_cast<int64_t>(params.batch) * params.kv_heads == 0) return cudaSuccess;
  const size_t bytes = radar_workspace_layout(params, nullptr, nullptr);
  if (bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  RadarWorkspace ws;
  radar_workspace_layout(params, workspace, &ws);

  // topk keeping every block never reads a score: unless scores or M_g are asked for, skip them.
  const bool keeps_all = params.policy == Policy::kTopK &&
                         (params.budget_blocks > 0 ? params.budget_blocks >= params.num_blocks
                                                   : params.budget_fraction >= 1.0);
  // Given per-head scores that the select reads directly (sum aggregation, threshold, adaptive)
  // need no score pass: it would only write the group maxima, which only topk with the max
  // aggregation reads (28 us at 8 x 32k with 16-token blocks on an H200, the two-stage step's
  // second select).
  const bool reads_group_max = params.policy == Policy::kTopK && params.group_agg != GroupAgg::kSum;
  const bool given_direct = params.in_head_scores != nullptr && !reads_group_max;
  const bool scores_unused =
      (keeps_all || given_direct) && params.out_head_scores == nullptr && !ws.mlo_from_q;
  if (params.num_blocks > 0 && !scores_unused) {
    // Given scores and no M_g to compute: q and the statistics are not read, head_dim is moot.
    const bool reads_stats = params.in_head_scores == nullptr || ws.mlo_from_q;
    const int head_dim = reads_stats ? params.head_dim : 64;
    const bool sketch = params.score == Score::kSketch && params.in_head_scores == nullptr;
    switch (head_dim) {
      case 64: AETHER_CUDA_TRY(sketch ? launch_sketch_score<64>(params, &ws, stream) : launch_radar_score<64>(params, &ws, stream)); break;
      case 128: AETHER_CUDA_TRY(sketch ? launch_sketch_score<128>(params, &ws, stream) : launch_radar_score<128>(params, &ws, stream)); break;
      case 256: AETHER_CUDA_TRY(sketch ? launch_sketch_score<256>(params, &ws, stream) : launch_radar_score<256>(params, &ws, stream)); break;
      default: return cudaErrorInvalidValue;  // unsupported head_dim
    }
  }
  switch (params.policy) {
    case Policy::kTopK: return launch_select<Policy::kTopK>(params, ws, stream);
    case Policy::kThreshold: return launch_select<Policy::kThreshold>(params, ws, stream);
    case Policy::kAdaptive: return launch_select<Policy::kAdaptive>(params, ws, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace aether
