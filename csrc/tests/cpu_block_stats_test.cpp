// aether::cpu::block_stats against the naive double reference, and append == full build.
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "aether/cpu/kernels.h"
#include "test_util.h"

namespace aether {
namespace {

using test::KVKind;
using test::StatsBuffers;
using test::TestKV;

struct StatsCase {
  DType dtype;
  KVKind kind;
  int batch, heads, head_dim, block_size;
  int32_t max_len;
};

std::string describe(const StatsCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) +
         " B=" + std::to_string(c.batch) + " H=" + std::to_string(c.heads) +
         " D=" + std::to_string(c.head_dim) + " bs=" + std::to_string(c.block_size) +
         " max_len=" + std::to_string(c.max_len);
}

std::vector<StatsCase> stats_cases() {
  std::vector<StatsCase> cases;
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const KVKind kinds[] = {KVKind::kContiguous, KVKind::kTokenMajor, KVKind::kPaged};
  // (head_dim, block_size, max_len): odd lengths, every block size, head_dim 8..256.
  const int shapes[][3] = {{64, 16, 97},  {128, 32, 1025}, {256, 64, 63},
                           {8, 128, 1025}, {24, 16, 1},    {128, 128, 97}};
  int n = 0;
  for (DType dtype : dtypes) {
    for (KVKind kind : kinds) {
      for (const auto& shape : shapes) {
        // Rotate batch/heads so the product covers 1 and several items per thread.
        const int batch = 1 + (n % 3) * 2;
        const int heads = 1 + (n % 2);
        cases.push_back({dtype, kind, batch, heads, shape[0], shape[1], shape[2]});
        ++n;
      }
    }
  }
  return cases;
}

TEST(CpuBlockStats, FullBuildMatchesNaiveReference) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const StatsCase& c : stats_cases()) {
    SCOPED_TRACE(describe(c));
    // One block of spare capacity so the zero fill past the end is exercised for every length.
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 1;
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(c.batch, c.max_len, c.block_size, rng);
    kv.poison_after(lens);  // reading past a sequence's end would turn a statistic into NaN

    StatsBuffers out(c.batch, c.heads, num_blocks, c.head_dim);
    out.poison();
    cpu::block_stats(test::block_stats_params(kv, lens, out));
    const test::NaiveStats ref = test::naive_block_stats(kv, lens);

    const int D = c.head_dim;
    int failures = 0;
    for (int b = 0; b < c.batch && failures < 5; ++b) {
      const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
      for (int h = 0; h < c.heads && failures < 5; ++h) {
        for (int j = 0; j < num_blocks && failures < 5; ++j) {
          const int64_t index = out.block_index(b, h, j);
          SCOPED_TRACE("b=" + std::to_string(b) + " h=" + std::to_string(h) +
                       " block=" + std::to_string(j) + " len=" + std::to_string(lens[b]));
          if (j >= n_blocks) {  // invalid blocks: exact zeros
            for (int i = 0; i < D; ++i) {
              failures += out.centroid[index * D + i] != 0.0f || out.lo[index * D + i] != 0.0f ||
                          out.hi[index * D + i] != 0.0f;
            }
            failures += out.radius[index] != 0.0f || out.spread[index] != 0.0f;
            EXPECT_EQ(failures, 0) << "invalid block not zero-filled";
            continue;
          }
          const int n = std::min(lens[b], (j + 1) * c.block_size) - j * c.block_size;
          double max_abs = 0.0;
          for (int i = 0; i < D; ++i) {
            max_abs = std::max({max_abs, std::fabs(ref.lo[index * D + i]), std::fabs(ref.hi[index * D + i])});
          }
          // A float32 sum of n terms: error <= n u sum|x|; the division adds one rounding.
          const double centroid_tol = (n + 1) * 6e-8 * max_abs + 1e-30;
          for (int i = 0; i < D; ++i) {
            // min/max of exactly converted values are exact.
            if (out.lo[index * D + i] != ref.lo[index * D + i] ||
                out.hi[index * D + i] != ref.hi[index * D + i] ||
                !(std::fabs(out.centroid[index * D + i] - ref.centroid[index * D + i]) <= centroid_tol)) {
              ADD_FAILURE() << "channel " << i << ": centroid " << out.centroid[index * D + i]
                            << " vs " << ref.centroid[index * D + i] << ", lo " << out.lo[index * D + i]
                            << " vs " << ref.lo[index * D + i] << ", hi " << out.hi[index * D + i]
                            << " vs " << ref.hi[index * D + i];
              ++failures;
              break;
            }
          }
          // Distances use the float32 centroid (error ~centroid_tol per channel) and float32 sums
          // over D channels.
          const double radius_tol = 1e-5 * ref.radius[index] + std::sqrt(static_cast<double>(D)) * centroid_tol + 1e-6;
          const double spread_tol = 1e-5 * ref.spread[index] + 2 * ref.radius[index] * std::sqrt(static_cast<double>(D)) * centroid_tol + 1e-6;
          if (!(std::fabs(out.radius[index] - ref.radius[index]) <= radius_tol) ||
              !(std::fabs(out.spread[index] - ref.spread[index]) <= spread_tol)) {
            ADD_FAILURE() << "radius " << out.radius[index] << " vs " << ref.radius[index]
                          << ", spread " << out.spread[index] << " vs " << ref.spread[index];
            ++failures;
          }
          if (n == 1) {  // one token: the centroid is the key itself, no spread at all
            EXPECT_EQ(out.radius[index], 0.0f);
            EXPECT_EQ(out.spread[index], 0.0f);
          }
        }
      }
    }
  }
}

// After tokens [L0, L1) are appended, recomputing blocks [first_block, n_blocks(L1)) of a full
// build at L0 must give exactly a full build at L1, and nothing else may be written.
TEST(CpuBlockStats, AppendIsBitIdenticalToFullBuild) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const float sentinel = 12345.0f;
  for (const StatsCase& c : stats_cases()) {
    SCOPED_TRACE(describe(c));
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 1;
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> new_lens = test::mixed_lengths(c.batch, c.max_len, c.block_size, rng);
    std::vector<int32_t> old_lens(new_lens.size()), first_block(new_lens.size());
    for (size_t b = 0; b < new_lens.size(); ++b) {
      // One token appended (decode), several (prefill chunk) or none.
      const int32_t appended = std::uniform_int_distribution<int32_t>(0, 2)(rng) == 0
                                   ? std::min(new_lens[b], 1)
                                   : std::uniform_int_distribution<int32_t>(0, new_lens[b])(rng);
      old_lens[b] = new_lens[b] - appended;
      first_block[b] = old_lens[b] / c.block_size;
    }
    // One sequence asks for blocks past its end: nothing to do there.
    first_block[0] = test::blocks_of(new_lens[0], c.block_size) + 1;
    kv.poison_after(new_lens);

    StatsBuffers full(c.batch, c.heads, num_blocks, c.head_dim);
    full.poison();
    cpu::block_stats(test::block_stats_params(kv, new_lens, full));

    StatsBuffers appended(c.batch, c.heads, num_blocks, c.head_dim);
    cpu::block_stats(test::block_stats_params(kv, old_lens, appended));
    // Blocks outside the append range get a sentinel: they must come back unchanged.
    for (int b = 0; b < c.batch; ++b) {
      const int32_t end = test::blocks_of(new_lens[b], c.block_size);
      for (int h = 0; h < c.heads; ++h) {
        for (int j = 0; j < num_blocks; ++j) {
          const int64_t index = appended.block_index(b, h, j);
          const bool rewritten = j >= first_block[b] && j < end;
          const float fill = rewritten ? test::float_nan() : sentinel;
          std::fill_n(&appended.centroid[index * c.head_dim], c.head_dim, fill);
          std::fill_n(&appended.lo[index * c.head_dim], c.head_dim, fill);
          std::fill_n(&appended.hi[index * c.head_dim], c.head_dim, fill);
          appended.radius[index] = fill;
          appended.spread[index] = fill;
        }
      }
    }
    BlockStatsParams p = test::block_stats_params(kv, new_lens, appended);
    p.first_block = first_block.data();
    cpu::block_stats(p);

    for (int b = 0; b < c.batch; ++b) {
      const int32_t end = test::blocks_of(new_lens[b], c.block_size);
      for (int h = 0; h < c.heads; ++h) {
        for (int j = 0; j < num_blocks; ++j) {
          SCOPED_TRACE("b=" + std::to_string(b) + " h=" + std::to_string(h) + " block=" + std::to_string(j));
          const int64_t index = appended.block_index(b, h, j);
          const size_t row_bytes = sizeof(float) * c.head_dim;
          if (j >= first_block[b] && j < end) {
            ASSERT_EQ(std::memcmp(&appended.centroid[index * c.head_dim], &full.centroid[index * c.head_dim], row_bytes), 0);
            ASSERT_EQ(std::memcmp(&appended.lo[index * c.head_dim], &full.lo[index * c.head_dim], row_bytes), 0);
            ASSERT_EQ(std::memcmp(&appended.hi[index * c.head_dim], &full.hi[index * c.head_dim], row_bytes), 0);
            ASSERT_EQ(std::memcmp(&appended.radius[index], &full.radius[index], sizeof(float)), 0);
            ASSERT_EQ(std::memcmp(&appended.spread[index], &full.spread[index], sizeof(float)), 0);
          } else {
            for (int i = 0; i < c.head_dim; ++i) {
              ASSERT_EQ(appended.centroid[index * c.head_dim + i], sentinel);
              ASSERT_EQ(appended.lo[index * c.head_dim + i], sentinel);
              ASSERT_EQ(appended.hi[index * c.head_dim + i], sentinel);
            }
            ASSERT_EQ(appended.radius[index], sentinel);
            ASSERT_EQ(appended.spread[index], sentinel);
          }
        }
      }
    }
  }
}

TEST(CpuBlockStats, UnknownDTypeThrows) {
  std::vector<int32_t> lens = {0};
  StatsBuffers out(1, 1, 1, 8);
  BlockStatsParams p;
  p.dtype = static_cast<DType>(5);
  p.seq_lens = lens.data();
  p.batch = p.kv_heads = p.num_blocks = 1;
  p.head_dim = 8;
  p.block_size = 16;
  p.stats = out.tensors();
  try {
    cpu::block_stats(p);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("5"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace aether
