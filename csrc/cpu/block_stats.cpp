// CPU block statistics: centroid, channel box, radius and spread of every KV block.
//
// Two passes over each block (mean first, then distances to the float32 mean) so the numbers
// match a straightforward reference; a block is always recomputed from all of its tokens, which
// makes an append (first_block set) bit-identical to a full build.
#include <algorithm>
#include <cmath>
#include <vector>

#include "aether/cpu/common.h"
#include "aether/cpu/kernels.h"

namespace aether {
namespace cpu {
namespace {

template <typename T>
void block_stats_typed(const BlockStatsParams& p) {
  const int32_t D = p.head_dim;
  const int32_t bs = p.block_size;
  const int64_t NB = p.num_blocks;

  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t len = p.seq_lens[b];
    const int32_t n_blocks = valid_blocks(len, bs, p.num_blocks);
    const int32_t first = p.first_block == nullptr ? 0 : std::max(0, p.first_block[b]);

    const int64_t row = (b * p.kv_heads + h) * NB;  // index of block 0 of this (b, h)
    std::vector<float> keys(static_cast<size_t>(bs) * D);

    for (int32_t j = first; j < n_blocks; ++j) {
      const int64_t token_begin = static_cast<int64_t>(j) * bs;
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(len, token_begin + bs) - token_begin);
      for (int32_t t = 0; t < n; ++t) {
        load_row(kv_token<T>(p.k, b, h, token_begin + t), D, &keys[static_cast<size_t>(t) * D]);
      }

      float* centroid = p.stats.centroid + (row + j) * D;
      float* lo = p.stats.lo + (row + j) * D;
      float* hi = p.stats.hi + (row + j) * D;
      for (int32_t i = 0; i < D; ++i) {
        centroid[i] = 0.0f;
        lo[i] = keys[i];
        hi[i] = keys[i];
      }
      for (int32_t t = 0; t < n; ++t) {
        const float* key = &keys[static_cast<size_t>(t) * D];
        for (int32_t i = 0; i < D; ++i) {
          centroid[i] += key[i];
          lo[i] = std::min(lo[i], key[i]);
          hi[i] = std::max(hi[i], key[i]);
        }
      }
      const float count = static_cast<float>(n);
      for (int32_t i = 0; i < D; ++i) centroid[i] /= count;

      float max_distance_sq = 0.0f;
      float sum_distance_sq = 0.0f;
      for (int32_t t = 0; t < n; ++t) {
        const float* key = &keys[static_cast<size_t>(t) * D];
        float distance_sq = 0.0f;
        for (int32_t i = 0; i < D; ++i) {
          const float diff = key[i] - centroid[i];
          distance_sq += diff * diff;
        }
        max_distance_sq = std::max(max_distance_sq, distance_sq);
        sum_distance_sq += distance_sq;
      }
      // sqrt is monotone, so the sqrt of the largest squared distance is the largest distance.
      p.stats.radius[row + j] = std::sqrt(max_distance_sq);
      p.stats.spread[row + j] = sum_distance_sq / count;
    }

    // A full build owns the whole tensor: blocks past the end get zeros so nothing is left
    // uninitialised (their scores are -inf regardless of these values).
    if (p.first_block == nullptr) {
      const int64_t tail = NB - n_blocks;
      std::fill_n(p.stats.centroid + (row + n_blocks) * D, tail * D, 0.0f);
      std::fill_n(p.stats.lo + (row + n_blocks) * D, tail * D, 0.0f);
      std::fill_n(p.stats.hi + (row + n_blocks) * D, tail * D, 0.0f);
      std::fill_n(p.stats.radius + row + n_blocks, tail, 0.0f);
      std::fill_n(p.stats.spread + row + n_blocks, tail, 0.0f);
    }
  });
}

}  // namespace

void block_stats(const BlockStatsParams& params) {
  dispatch_dtype(params.dtype, "aether::cpu::block_stats", [&](auto tag) {
    using T = typename decltype(tag)::type;
    block_stats_typed<T>(params);
  });
}

}  // namespace cpu
}  // namespace aether
