// aether::cuda::block_stats against the double reference and the CPU kernel: channel minima and
// maxima exact, centroid / radius / spread within float32 rounding, zeros past the end of a full
// build, and an append (first_block) that rewrites exactly its blocks, bit-identical to a full
// build. Outputs are poisoned (0xFF = NaN) before every call.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "aether/cpu/kernels.h"
#include "aether/cuda/launchers.h"
#include "cuda_test_util.cuh"
#include "test_util.h"

namespace aether {
namespace {

using test::KVKind;
using test::StatsBuffers;
using test::TestKV;

using test::DeviceBytes;
using test::has_cuda_device;

// Device statistics buffers mirroring a host StatsBuffers.
struct DeviceStats {
  DeviceBytes centroid, lo, hi, radius, spread;
  explicit DeviceStats(const StatsBuffers& host)
      : centroid(host.centroid.size() * 4), lo(host.lo.size() * 4), hi(host.hi.size() * 4),
        radius(host.radius.size() * 4), spread(host.spread.size() * 4) {}
  void upload(const StatsBuffers& host) {
    centroid.upload(host.centroid.data());
    lo.upload(host.lo.data());
    hi.upload(host.hi.data());
    radius.upload(host.radius.data());
    spread.upload(host.spread.data());
  }
  void download(StatsBuffers& host) const {
    centroid.download(host.centroid.data());
    lo.download(host.lo.data());
    hi.download(host.hi.data());
    radius.download(host.radius.data());
    spread.download(host.spread.data());
  }
  BlockStatsTensors tensors() const {
    BlockStatsTensors t;
    t.centroid = centroid.as<float>();
    t.lo = lo.as<float>();
    t.hi = hi.as<float>();
    t.radius = radius.as<float>();
    t.spread = spread.as<float>();
    return t;
  }
};

struct StatsCase {
  DType dtype;
  KVKind kind;
  int head_dim, block_size;
  int32_t max_len;
};

bool bits_equal(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

TEST(CudaBlockStats, FullBuildMatchesReferenceAndAppendRewritesOnlyItsBlocks) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 4, kv_heads = 3;
  std::vector<StatsCase> cases;
  const int shapes[][3] = {{64, 16, 97}, {128, 32, 1025}, {256, 64, 63}, {128, 128, 1025}, {64, 64, 2000}, {256, 16, 300}};
  int n = 0;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (const auto& s : shapes) cases.push_back({dtype, static_cast<KVKind>(n++ % 3), s[0], s[1], s[2]});
  }
  for (const StatsCase& c : cases) {
    SCOPED_TRACE(std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) + " D=" +
                 std::to_string(c.head_dim) + " bs=" + std::to_string(c.block_size) + " max_len=" + std::to_string(c.max_len));
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 2;
    TestKV kv(c.dtype, c.kind, batch, kv_heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, c.max_len, c.block_size, rng);
    kv.poison_after(lens);  // reading past the end would turn a statistic into NaN
    const test::NaiveStats ref = test::naive_block_stats(kv, lens);

    DeviceBytes d_k(kv.data.data(), kv.data.size_bytes());
    DeviceBytes d_table(kv.block_table.data(), kv.block_table.size() * 4);
    DeviceBytes d_lens(lens.data(), lens.size() * 4);
    StatsBuffers full(batch, kv_heads, num_blocks, c.head_dim);
    full.poison();
    DeviceStats d_stats(full);
    d_stats.upload(full);

    BlockStatsParams p;
    p.k = kv.layout(d_k.ptr, kv.kind == KVKind::kPaged ? d_table.as<int32_t>() : nullptr);
    p.dtype = c.dtype;
    p.seq_lens = d_lens.as<int32_t>();
    p.batch = batch;
    p.kv_heads = kv_heads;
    p.head_dim = c.head_dim;
    p.block_size = c.block_size;
    p.num_blocks = num_blocks;
    p.stats = d_stats.tensors();
    ASSERT_CUDA(cuda::block_stats(p, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    d_stats.download(full);

    const double u32 = std::ldexp(1.0, -24);
    for (int b = 0; b < batch; ++b) {
      const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
      for (int h = 0; h < kv_heads; ++h) {
        for (int j = 0; j < num_blocks; ++j) {
          const int64_t blk = full.block_index(b, h, j);
          SCOPED_TRACE("b=" + std::to_string(b) + " h=" + std::to_string(h) + " block " + std::to_string(j) +
                       " len=" + std::to_string(lens[b]));
          if (j >= n_blocks) {  // zero-filled
            ASSERT_EQ(full.radius[blk], 0.0f);
            ASSERT_EQ(full.spread[blk], 0.0f);
            for (int i = 0; i < c.head_dim; ++i) {
              ASSERT_EQ(full.centroid[blk * c.head_dim + i], 0.0f);
              ASSERT_EQ(full.lo[blk * c.head_dim + i], 0.0f);
              ASSERT_EQ(full.hi[blk * c.head_dim + i], 0.0f);
            }
            continue;
          }
          const int tokens = std::min(lens[b], (j + 1) * c.block_size) - j * c.block_size;
          double key_magnitude = 0.0;
          for (int i = 0; i < c.head_dim; ++i) {
            const int64_t e = blk * c.head_dim + i;
            ASSERT_EQ(full.lo[e], ref.lo[e]) << "channel " << i;  // min / max are exact
            ASSERT_EQ(full.hi[e], ref.hi[e]) << "channel " << i;
            const double magnitude = std::max(std::fabs(ref.lo[e]), std::fabs(ref.hi[e]));
            key_magnitude = std::max(key_magnitude, magnitude);
            // A float32 sum of `tokens` values, then one division.
            ASSERT_NEAR(full.centroid[e], ref.centroid[e], (tokens + 2) * u32 * magnitude) << "channel " << i;
          }
          // Squared distances: D terms of (key - float32 mean)^2, the mean off by the bound above.
          const double d2 = ref.spread[blk];
          const double distance_bound = 4.0 * (tokens + c.head_dim + 4) * u32 * key_magnitude * key_magnitude * c.head_dim;
          ASSERT_NEAR(full.spread[blk], ref.spread[blk], distance_bound + 1e-6 * d2);
          ASSERT_NEAR(full.radius[blk], ref.radius[blk], distance_bound / std::max(ref.radius[blk], 1e-3) + 1e-6);
        }
      }
    }

    // Append: only blocks [first_block[b], n_blocks) are written, bit-identical to the full build.
    std::vector<int32_t> first(batch);
    for (int b = 0; b < batch; ++b) {
      const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
      first[b] = std::uniform_int_distribution<int32_t>(std::max(0, n_blocks - 2), n_blocks + 1)(rng);
    }
    StatsBuffers appended(batch, kv_heads, num_blocks, c.head_dim);
    appended.poison();
    d_stats.upload(appended);
    DeviceBytes d_first(first.data(), first.size() * 4);
    p.first_block = d_first.as<int32_t>();
    ASSERT_CUDA(cuda::block_stats(p, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    d_stats.download(appended);
    for (int b = 0; b < batch; ++b) {
      const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
      for (int h = 0; h < kv_heads; ++h) {
        for (int j = 0; j < num_blocks; ++j) {
          const int64_t blk = full.block_index(b, h, j);
          const bool written = j >= first[b] && j < n_blocks;
          SCOPED_TRACE("append b=" + std::to_string(b) + " h=" + std::to_string(h) + " block " + std::to_string(j) +
                       " first=" + std::to_string(first[b]) + " n_blocks=" + std::to_string(n_blocks));
          if (written) {
            ASSERT_TRUE(bits_equal(appended.radius[blk], full.radius[blk]));
            ASSERT_TRUE(bits_equal(appended.spread[blk], full.spread[blk]));
          } else {
            ASSERT_TRUE(std::isnan(appended.radius[blk]));
            ASSERT_TRUE(std::isnan(appended.spread[blk]));
          }
          for (int i = 0; i < c.head_dim; ++i) {
            const int64_t e = blk * c.head_dim + i;
            if (written) {
              ASSERT_TRUE(bits_equal(appended.centroid[e], full.centroid[e]));
              ASSERT_TRUE(bits_equal(appended.lo[e], full.lo[e]));
              ASSERT_TRUE(bits_equal(appended.hi[e], full.hi[e]));
            } else {
              ASSERT_TRUE(std::isnan(appended.centroid[e]) && std::isnan(appended.lo[e]) && std::isnan(appended.hi[e]));
            }
          }
        }
      }
    }
  }
}

// The CUDA statistics agree with the CPU kernel's (both float32) to a few roundings.
TEST(CudaBlockStats, AgreesWithTheCpuKernel) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 2, kv_heads = 2, D = 128, bs = 64, max_len = 3000;
  const int num_blocks = test::blocks_of(max_len, bs);
  TestKV kv(DType::kBFloat16, KVKind::kTokenMajor, batch, kv_heads, D, bs, num_blocks, rng);
  const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng);
  StatsBuffers cpu(batch, kv_heads, num_blocks, D), gpu(batch, kv_heads, num_blocks, D);
  BlockStatsParams p;
  p.k = kv.layout();
  p.dtype = DType::kBFloat16;
  p.seq_lens = lens.data();
  p.batch = batch;
  p.kv_heads = kv_heads;
  p.head_dim = D;
  p.block_size = bs;
  p.num_blocks = num_blocks;
  p.stats = cpu.tensors();
  cpu::block_stats(p);

  DeviceBytes d_k(kv.data.data(), kv.data.size_bytes());
  DeviceBytes d_lens(lens.data(), lens.size() * 4);
  gpu.poison();
  DeviceStats d_stats(gpu);
  d_stats.upload(gpu);
  p.k = kv.layout(d_k.ptr, nullptr);
  p.seq_lens = d_lens.as<int32_t>();
  p.stats = d_stats.tensors();
  ASSERT_CUDA(cuda::block_stats(p, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  d_stats.download(gpu);
  for (size_t e = 0; e < cpu.centroid.size(); ++e) {
    ASSERT_EQ(gpu.lo[e], cpu.lo[e]);
    ASSERT_EQ(gpu.hi[e], cpu.hi[e]);
    ASSERT_NEAR(gpu.centroid[e], cpu.centroid[e], 1e-5 * (1.0 + std::fabs(cpu.centroid[e])));
  }
  for (size_t e = 0; e < cpu.radius.size(); ++e) {
    ASSERT_NEAR(gpu.radius[e], cpu.radius[e], 1e-5 * (1.0 + cpu.radius[e]));
    ASSERT_NEAR(gpu.spread[e], cpu.spread[e], 1e-5 * (1.0 + cpu.spread[e]));
  }
}

TEST(CudaBlockStats, RejectsUnsupportedHeadDim) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  BlockStatsParams p;
  p.batch = 1;
  p.kv_heads = 1;
  p.head_dim = 72;
  p.block_size = 16;
  p.num_blocks = 1;
  p.dtype = DType::kBFloat16;
  EXPECT_EQ(cuda::block_stats(p, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace aether
