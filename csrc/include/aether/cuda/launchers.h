// CUDA launchers (torch-free). Each enqueues its kernels on `stream`, never synchronises the
// host, allocates nothing, and returns the first CUDA error it meets (cudaSuccess otherwise).
#pragma once

#include <cstddef>
#include <cuda_runtime.h>

#include "aether/params.h"

namespace aether {
namespace cuda {

cudaError_t block_stats(const BlockStatsParams& params, cudaStream_t stream);
cudaError_t key_sketch(const KeySketchParams& params, cudaStream_t stream);
cudaError_t key_codes(const KeyCodesParams& params, cudaStream_t stream);
// Writes only the candidates' entries of params.head_scores (the caller fills it with -inf).
cudaError_t refine_scores(const RefineScoresParams& params, cudaStream_t stream);
// The qcodes score: the running channel spreads (after the key codes are built or appended), the
// channels to read per (b, kv head), then every block's score from them (channel_scores can also
// choose the channels itself from the spreads).
cudaError_t code_spreads(const CodeSpreadsParams& params, cudaStream_t stream);
cudaError_t code_channels(const CodeChannelsParams& params, cudaStream_t stream);
cudaError_t channel_scores(const ChannelScoresParams& params, cudaStream_t stream);
// One CTA per (b, kv head): a bitmap of the row's blocks in shared memory, then a compaction.
cudaError_t union_blocks(const UnionBlocksParams& params, cudaStream_t stream);

// Device scratch radar_select needs for these params (0 when shared memory is enough).
size_t radar_select_workspace_bytes(const RadarSelectParams& params);
cudaError_t radar_select(const RadarSelectParams& params, void* workspace, cudaStream_t stream);

// Split-KV count that fills `num_sms` multiprocessors for this problem (1 means no split, no
// merge, no workspace). The caller sizes partial_out / partial_lse with it.
int sparse_decode_num_splits(int batch, int kv_heads, int max_selected_blocks, int num_sms);
cudaError_t sparse_decode(const SparseDecodeParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace aether
