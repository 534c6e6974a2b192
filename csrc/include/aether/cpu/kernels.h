// C++ CPU kernels (torch-free, multi-threaded over (batch, kv_head)).
//
// The callers (csrc/torch/, the GoogleTest binary) validate shapes; these functions trust the
// Params and throw std::invalid_argument only for a value they cannot dispatch (dtype, enum, a
// sketch rank outside 2..kMaxSketchRank) or a pointer the chosen mode needs that is null.
#pragma once

#include "aether/params.h"

namespace aether {
namespace cpu {

void block_stats(const BlockStatsParams& params);
void key_sketch(const KeySketchParams& params);
void radar_select(const RadarSelectParams& params);
void sparse_decode(const SparseDecodeParams& params);

}  // namespace cpu
}  // namespace aether
