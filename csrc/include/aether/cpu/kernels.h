// C++ CPU kernels (torch-free, multi-threaded over (batch, kv_head)).
//
// The callers (csrc/torch/, the GoogleTest binary) validate shapes; these functions trust the
// Params and throw std::invalid_argument only for a value they cannot dispatch (dtype, enum, a
// sketch rank outside 2..kMaxSketchRank, a blocks_per_sketch that is not a power of two up to 8 or
// whose sketch block exceeds 128 tokens or does not divide num_blocks) or a pointer the chosen
// mode needs that is null (e.g. the sketch centroid).
#pragma once

#include "aether/params.h"

namespace aether {
namespace cpu {

void block_stats(const BlockStatsParams& params);
void key_sketch(const KeySketchParams& params);
void key_codes(const KeyCodesParams& params);
void refine_scores(const RefineScoresParams& params);
void code_spreads(const CodeSpreadsParams& params);
void code_channels(const CodeChannelsParams& params);
void channel_scores(const ChannelScoresParams& params);
void union_blocks(const UnionBlocksParams& params);
void radar_select(const RadarSelectParams& params);
void sparse_decode(const SparseDecodeParams& params);

}  // namespace cpu
}  // namespace aether
