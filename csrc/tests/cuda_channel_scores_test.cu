// The "qcodes" score on CUDA against the CPU kernels as oracle (cpu::key_codes, cpu::code_channels,
// cpu::channel_scores), on fresh random inputs.
//
// Channel-major key codes are checked with the token-major ones in cuda_key_codes_test.cu.
// code_channels: both backends sum in double and rank with the same rule, so the channel lists must
// be identical, also with exact ties (zero-width ranges, a zero query channel, two channels with
// the same ranges and the same q^2) and rows of length 0 (all weights 0: channels 0 .. m - 1).
// channel_scores: float32 sums in different orders, so the scores agree to a tolerance; -inf
// exactly where the CPU writes -inf (blocks past the end), and every element written (the outputs
// are poisoned with NaN first).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "aether/cpu/kernels.h"
#include "aether/cuda/launchers.h"
#include "cuda_test_util.cuh"
#include "key_codes_test_util.cuh"
#include "test_util.h"

namespace aether {
namespace {

using test::DeviceBytes;
using test::has_cuda_device;
using test::KVKind;
using test::TestKV;
using test::TestQuery;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool bits_equal(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

using CodesBuffers = test::PoisonedCodes;
using test::cpu_codes;
using test::cuda_codes;
using test::DeviceKV;

// ---------------------------------------------------------------------------------------------
// key_codes with channel_major = 1 is checked in cuda_key_codes_test.cu (both layouts, full build
// and append); cpu_channel_scores_test.cpp checks the CPU's channel-major codes against the
// token-major ones.

constexpr int kGroupings[][2] = {{16, 1}, {16, 2}, {16, 4}, {16, 8}, {32, 1},
                                 {32, 2}, {32, 4}, {64, 1}, {64, 2}, {128, 1}};
constexpr DType kDtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};

std::vector<uint16_t> random_ranges(int batch, int heads, int groups, int head_dim, int group_tokens,
                                    const std::vector<int32_t>& lens, const std::vector<int>& constant,
                                    const std::vector<int>& tie_to, std::mt19937_64& rng) {
  std::vector<uint16_t> ranges(static_cast<size_t>(batch) * heads * groups * 2 * head_dim, 0x7FC0);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (int b = 0; b < batch; ++b) {
    const int valid = std::min(test::blocks_of(lens[b], group_tokens), groups);
    for (int h = 0; h < heads; ++h) {
      for (int m = 0; m < valid; ++m) {
        uint16_t* lo = &ranges[((static_cast<size_t>(b) * heads + h) * groups + m) * 2 * head_dim];
        uint16_t* hi = lo + head_dim;
        for (int d = 0; d < head_dim; ++d) {
          const double low = test::round_to_bf16(normal(rng));
          lo[d] = test::encode_bf16_exact(low);
          hi[d] = test::encode_bf16_exact(test::round_to_bf16(low + std::fabs(normal(rng))));
        }
        for (int d : constant) hi[d] = lo[d];
        for (int d = 0; d < head_dim; ++d) {
          if (tie_to[d] >= 0) {
            lo[d] = lo[tie_to[d]];
            hi[d] = hi[tie_to[d]];
          }
        }
      }
    }
  }
  return ranges;
}

CodeChannelsParams channel_params(const TestQuery& q, const std::vector<uint16_t>& ranges, const int32_t* lens,
                                  int kv_heads, int block_size, int num_blocks, int per, int m, int32_t* out) {
  CodeChannelsParams p;
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = q.data.dtype;
  p.ranges = ranges.data();
  p.seq_lens = lens;
  p.batch = q.batch;
  p.q_heads = q.heads;
  p.kv_heads = kv_heads;
  p.head_dim = q.head_dim;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.blocks_per_group = per;
  p.num_channels = m;
  p.channels = out;
  return p;
}

// cuda::code_channels of host params (inputs copied to the device) into `out` (poisoned first).
void cuda_channels(const CodeChannelsParams& host, size_t q_bytes, size_t ranges_count, std::vector<int32_t>& out) {
  DeviceBytes q(host.q, q_bytes);
  DeviceBytes ranges(host.ranges, ranges_count * sizeof(uint16_t));
  DeviceBytes lens(host.seq_lens, static_cast<size_t>(host.batch) * sizeof(int32_t));
  std::fill(out.begin(), out.end(), -7);
  DeviceBytes channels(out.data(), out.size() * sizeof(int32_t));
  CodeChannelsParams p = host;
  p.q = q.ptr;
  p.ranges = ranges.as<uint16_t>();
  p.seq_lens = lens.as<int32_t>();
  p.channels = channels.as<int32_t>();
  ASSERT_CUDA(cuda::code_channels(p, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  channels.download(out.data());
}

// Every head_dim meets group sizes 1, 3, 4, 8 and num_channels 1, a quarter (odd), D - 1 and D;
// rows of length 0 and full rows of 40 groups (more than one batch of loads for D = 256) are in
// every case; dtype and grouping rotate.
TEST(CudaCodeChannels, MatchesCpuExactly) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 5, kv_heads = 2;
  int n = 0;
  for (int D : {64, 128, 256}) {
    for (int G : {1, 3, 4, 8}) {
      const auto& grouping = kGroupings[(n * 3) % 10];
      const int bs = grouping[0], per = grouping[1], gt = bs * per;
      const int groups = 40;
      const int num_blocks = groups * per;
      const int m = std::vector<int>{1, D / 4 + 1, D - 1, D}[n % 4];
      const DType dtype = kDtypes[n % 3];
      ++n;
      SCOPED_TRACE(std::string(test::dtype_name(dtype)) + " D=" + std::to_string(D) + " G=" + std::to_string(G) +
                   " bs=" + std::to_string(bs) + " Pg=" + std::to_string(per) + " m=" + std::to_string(m));
      // 0, a full row, one past a group, mid row, the capacity exceeded (clamped to NG groups)
      const std::vector<int32_t> lens = {0, num_blocks * bs, gt + 1, 17 * gt - 5, num_blocks * bs + 3 * gt};
      // Ties: 3 constant channels (zero weight), a zero query channel, channel D - 1 a copy of 5
      // with the same q^2 (q negated), channel 9 a copy of 2 with the same q.
      const std::vector<int> constant = {1, 7, D / 2};
      std::vector<int> tie_to(static_cast<size_t>(D), -1);
      tie_to[D - 1] = 5;
      tie_to[9] = 2;
      const std::vector<uint16_t> ranges = random_ranges(batch, kv_heads, groups, D, gt, lens, constant, tie_to, rng);
      TestQuery q(dtype, batch, G * kv_heads, D);
      q.fill_normal(rng);
      for (int b = 0; b < batch; ++b) {
        for (int hq = 0; hq < q.heads; ++hq) {
          q.data.set(q.offset(b, hq) + 11, 0.0);
          q.data.set(q.offset(b, hq) + D - 1, -q.data.get(q.offset(b, hq) + 5));
          q.data.set(q.offset(b, hq) + 9, q.data.get(q.offset(b, hq) + 2));
        }
      }
      std::vector<int32_t> cpu_out(static_cast<size_t>(batch) * kv_heads * m, -7);
      const CodeChannelsParams host =
          channel_params(q, ranges, lens.data(), kv_heads, bs, num_blocks, per, m, cpu_out.data());
      cpu::code_channels(host);
      std::vector<int32_t> gpu_out(cpu_out.size());
      cuda_channels(host, q.data.size_bytes(), ranges.size(), gpu_out);
      if (HasFatalFailure()) return;
      ASSERT_EQ(test::first_difference(gpu_out, cpu_out), "");
      for (int row = 0; row < batch * kv_heads; ++row) {
        const int32_t* list = &gpu_out[static_cast<size_t>(row) * m];
        for (int i = 0; i < m; ++i) {
          ASSERT_TRUE(list[i] >= 0 && list[i] < D && (i == 0 || list[i] > list[i - 1])) << "row " << row << " entry " << i;
        }
        if (row / kv_heads == 0) {  // length 0: every weight is 0, the lowest channels win
          for (int i = 0; i < m; ++i) ASSERT_EQ(list[i], i) << "empty row " << row;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// channel_scores.

ChannelScoresParams score_params(const TestQuery& q, const CodesBuffers& codes, const int32_t* lens,
                                 const int32_t* channels, int m, float scale, float* out) {
  ChannelScoresParams p;
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = q.data.dtype;
  p.codes = codes.codes.data();
  p.ranges = codes.ranges.data();
  p.seq_lens = lens;
  p.channels = channels;
  p.batch = codes.batch;
  p.q_heads = q.heads;
  p.kv_heads = codes.heads;
  p.head_dim = codes.head_dim;
  p.block_size = codes.block_size;
  p.num_blocks = codes.num_blocks;
  p.blocks_per_group = codes.per;
  p.bits = codes.bits;
  p.num_channels = m;
  p.scale = scale;
  p.head_scores = out;
  return p;
}

// Device copies of the inputs of host params and a head_scores buffer holding `fill`.
struct DeviceScores {
  DeviceBytes q, codes, ranges, lens, channels, scores;
  ChannelScoresParams params;
  DeviceScores(const ChannelScoresParams& host, size_t q_bytes, const CodesBuffers& shape, const std::vector<float>& fill)
      : q(host.q, q_bytes),
        codes(host.codes, shape.codes.size()),
        ranges(host.ranges, shape.ranges.size() * sizeof(uint16_t)),
        lens(host.seq_lens, static_cast<size_t>(host.batch) * sizeof(int32_t)),
        channels(host.channels, static_cast<size_t>(host.batch) * host.kv_heads * host.num_channels * sizeof(int32_t)),
        scores(fill.data(), fill.size() * sizeof(float)),
        params(host) {
    params.q = q.ptr;
    params.codes = codes.as<uint8_t>();
    params.ranges = ranges.as<uint16_t>();
    params.seq_lens = lens.as<int32_t>();
    params.channels = channels.as<int32_t>();
    params.head_scores = scores.as<float>();
  }
};

struct ScoreCase {
  DType dtype;
  int group, head_dim, bits, block_size, per, m;
  bool random_channels;  // else code_channels' choice
  double q_scale;
};

std::string describe(const ScoreCase& c, int num_blocks) {
  return std::string(test::dtype_name(c.dtype)) + " G=" + std::to_string(c.group) + " D=" + std::to_string(c.head_dim) +
         " bits=" + std::to_string(c.bits) + " bs=" + std::to_string(c.block_size) + " Pg=" + std::to_string(c.per) +
         " m=" + std::to_string(c.m) + (c.random_channels ? " random channels" : " code_channels") +
         " NB=" + std::to_string(num_blocks) + " q x" + std::to_string(c.q_scale);
}

// Group sizes 1, 3, 4, 8 meet every head_dim and width, with m = 1, an odd "some", D / 2 and D and
// both channel sources; grouping, dtype and query scale (30: logits far past float32's exp range)
// rotate. Then G = 2, 5 (a padded pass of 8) and 16 (two passes).
std::vector<ScoreCase> score_cases() {
  std::vector<ScoreCase> cases;
  int n = 0;
  for (int G : {1, 3, 4, 8}) {
    for (int D : {64, 128, 256}) {
      for (int bits : {2, 4}) {
        const auto& g = kGroupings[(n * 3) % 10];
        const int m = std::vector<int>{1, D / 8 + 3, D, D / 2}[n % 4];
        cases.push_back({kDtypes[n % 3], G, D, bits, g[0], g[1], m, (n / 4) % 2 == 1, n % 5 == 2 ? 30.0 : 1.0});
        ++n;
      }
    }
  }
  cases.push_back({DType::kBFloat16, 2, 128, 2, 32, 4, 20, false, 1.0});
  cases.push_back({DType::kFloat16, 5, 64, 4, 16, 8, 64, true, 1.0});
  cases.push_back({DType::kFloat32, 16, 256, 2, 64, 2, 40, false, 1.0});
  cases.push_back({DType::kBFloat16, 16, 128, 4, 128, 1, 128, true, 30.0});
  return cases;
}

// Channel lists for the scorer: code_channels' (CPU) choice, or random entries in [-2, D + 2)
// (duplicates and entries outside [0, D), which count once and not at all), row 0 all invalid.
std::vector<int32_t> make_channels(const ScoreCase& c, const TestQuery& q, const CodesBuffers& codes,
                                   const std::vector<int32_t>& lens, std::mt19937_64& rng) {
  const int rows = codes.batch * codes.heads;
  std::vector<int32_t> channels(static_cast<size_t>(rows) * c.m);
  if (!c.random_channels) {
    CodeChannelsParams p = channel_params(q, codes.ranges, lens.data(), codes.heads, codes.block_size,
                                          codes.num_blocks, codes.per, c.m, channels.data());
    cpu::code_channels(p);
    return channels;
  }
  std::uniform_int_distribution<int32_t> any(-2, c.head_dim + 1);
  for (auto& d : channels) d = any(rng);
  for (int i = 0; i < c.m; ++i) channels[i] = i % 2 == 0 ? -1 : c.head_dim;
  return channels;
}

// The tolerance of a score: float32 sums of D products in two orders; a logit that cancels to ~0
// still carries the rounding of its terms, scale * sum_d |q_d| (|lo_d| + |hi_d|).
double score_tolerance(double expected, const std::vector<double>& q, const uint16_t* ranges, int D, float scale) {
  double magnitude = 0.0;
  for (int d = 0; d < D; ++d) {
    magnitude += std::fabs(q[d]) * (std::fabs(test::decode_bf16(ranges[d])) + std::fabs(test::decode_bf16(ranges[D + d])));
  }
  magnitude *= scale;
  return 1e-4 + 3e-5 * std::max(std::fabs(expected), magnitude);
}

// Scores of both backends on the same inputs (the CUDA scorer reads the CUDA build of the codes,
// bit-identical to the CPU's); counts the finite and -inf entries compared.
void compare_scores(const ScoreCase& c, int batch, int kv_heads, int num_blocks, const std::vector<int32_t>& lens,
                    std::mt19937_64& rng, int64_t* finite, int64_t* empty) {
  const int bs = c.block_size, D = c.head_dim;
  const KVKind kind = static_cast<KVKind>(rng() % 3);
  TestKV kv(c.dtype, kind, batch, kv_heads, D, bs, num_blocks, rng);
  kv.poison_after(lens);
  CodesBuffers codes(batch, kv_heads, num_blocks, bs, D, c.bits, c.per);
  cpu_codes(kv, lens, nullptr, codes, 1);
  CodesBuffers gpu_codes(batch, kv_heads, num_blocks, bs, D, c.bits, c.per);
  {
    const DeviceKV keys(kv);
    cuda_codes(kv, keys, lens, nullptr, gpu_codes, 1);
    if (::testing::Test::HasFatalFailure()) return;
  }
  ASSERT_SAME_CODES(gpu_codes, codes);

  TestQuery q(c.dtype, batch, c.group * kv_heads, D);
  q.fill_normal(rng, c.q_scale);
  const std::vector<int32_t> channels = make_channels(c, q, codes, lens, rng);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  std::vector<float> cpu_scores(static_cast<size_t>(batch) * q.heads * num_blocks, test::float_nan());
  cpu::channel_scores(score_params(q, codes, lens.data(), channels.data(), c.m, scale, cpu_scores.data()));

  std::vector<float> gpu_scores(cpu_scores.size(), test::float_nan());
  DeviceScores d(score_params(q, gpu_codes, lens.data(), channels.data(), c.m, scale, nullptr), q.data.size_bytes(),
                 gpu_codes, gpu_scores);
  ASSERT_CUDA(cuda::channel_scores(d.params, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  d.scores.download(gpu_scores.data());

  const int G = c.group;
  for (int b = 0; b < batch; ++b) {
    const int n_blocks = std::min(test::blocks_of(lens[b], bs), num_blocks);
    for (int hq = 0; hq < q.heads; ++hq) {
      const std::vector<double> qv = q.row(b, hq);
      for (int j = 0; j < num_blocks; ++j) {
        const size_t at = (static_cast<size_t>(b) * q.heads + hq) * num_blocks + j;
        const float expected = cpu_scores[at], actual = gpu_scores[at];
        const std::string where = "b=" + std::to_string(b) + " head=" + std::to_string(hq) + " j=" + std::to_string(j) +
                                  " len=" + std::to_string(lens[b]);
        if (j >= n_blocks) {
          ASSERT_TRUE(bits_equal(expected, kNegInf)) << where << " cpu " << expected;
          ASSERT_TRUE(bits_equal(actual, kNegInf)) << where << " cuda " << actual;
          ++*empty;
          continue;
        }
        ASSERT_TRUE(std::isfinite(expected)) << where << " cpu " << expected;
        ASSERT_TRUE(std::isfinite(actual)) << where << " cuda " << actual << " cpu " << expected;
        const double tolerance = score_tolerance(expected, qv, codes.group_ranges(b, hq / G, j / c.per), D, scale);
        ASSERT_NEAR(actual, expected, tolerance) << where;
        ++*finite;
      }
    }
  }
  ASSERT_TRUE(q.padding_untouched());
}

// Rows of length 0, 1, bs, bs + 1, a group + 1, mid block, and one full row (every block of the
// capacity); a spare group past the longest partial row.
TEST(CudaChannelScores, MatchesCpu) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 7, kv_heads = 2;
  int64_t finite = 0, empty = 0;
  for (const ScoreCase& c : score_cases()) {
    const int bs = c.block_size, gt = bs * c.per;
    const int32_t max_len = 2 * gt + bs + 3;
    const int num_blocks = (test::blocks_of(max_len, gt) + 1) * c.per;
    SCOPED_TRACE(describe(c, num_blocks));
    std::vector<int32_t> lens = test::mixed_lengths(batch - 1, max_len, bs, rng, {gt + 1});
    lens.push_back(num_blocks * bs);
    std::shuffle(lens.begin(), lens.end(), rng);
    compare_scores(c, batch, kv_heads, num_blocks, lens, rng, &finite, &empty);
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(finite, 1000);
  EXPECT_GT(empty, 1000);
}

// Long rows: more groups per row than the grid has CTAs per row, so each CTA scores several groups
// through its double buffer (16 rows fill one wave of a large GPU with tens of CTAs per row).
TEST(CudaChannelScores, LongRowsMatchCpu) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 4, kv_heads = 4;
  int64_t finite = 0, empty = 0;
  const std::vector<ScoreCase> cases = {{DType::kBFloat16, 4, 64, 2, 16, 1, 16, false, 1.0},
                                        {DType::kFloat16, 2, 64, 4, 16, 8, 12, false, 1.0},
                                        {DType::kFloat32, 1, 128, 2, 32, 4, 33, true, 1.0}};
  for (const ScoreCase& c : cases) {
    const int num_blocks = c.per == 1 ? 600 : c.per == 8 ? 800 : 256;  // 600, 100 and 64 groups
    SCOPED_TRACE(describe(c, num_blocks));
    const int32_t capacity = num_blocks * c.block_size;
    std::vector<int32_t> lens = {capacity, capacity - 1 - static_cast<int32_t>(rng() % (capacity / 4)), 0,
                                 capacity / 2 + 7};
    compare_scores(c, batch, kv_heads, num_blocks, lens, rng, &finite, &empty);
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(finite, 10000);
}

// Argument checks (cudaErrorInvalidValue, nothing launched): the control computes; then bits,
// Pg, a group over 128 tokens, runs that are not whole words, blocks under 16 tokens or not a
// power of two, num_blocks % Pg, head_dim,
// num_channels outside [1, D], q_heads % kv_heads, kv_heads 0, batch < 0, every pointer, a
// misaligned codes or ranges pointer, the dtype.
TEST(CudaChannelScores, RejectsInvalidArguments) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(13);
  const int batch = 2, kv_heads = 2, bs = 16, D = 64, num_blocks = 8, m = 8;
  TestKV kv(DType::kFloat16, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng);
  const std::vector<int32_t> lens = {77, 128};
  CodesBuffers codes(batch, kv_heads, num_blocks, bs, D, 4, 1);
  cpu_codes(kv, lens, nullptr, codes, 1);
  TestQuery q(DType::kFloat16, batch, 2 * kv_heads, D);
  q.fill_normal(rng);
  std::vector<int32_t> channels(static_cast<size_t>(batch) * kv_heads * m);
  for (size_t i = 0; i < channels.size(); ++i) channels[i] = static_cast<int32_t>(i % D);
  const std::vector<float> fill(static_cast<size_t>(batch) * q.heads * num_blocks, test::float_nan());
  DeviceScores d(score_params(q, codes, lens.data(), channels.data(), m, 0.125f, nullptr), q.data.size_bytes(), codes,
                 fill);
  ASSERT_CUDA(cuda::channel_scores(d.params, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());

  const auto rejected = [](const ChannelScoresParams& p) {
    return cuda::channel_scores(p, nullptr) == cudaErrorInvalidValue;
  };
  for (int bits : {0, 1, 3, 8}) {
    ChannelScoresParams p = d.params;
    p.bits = bits;
    EXPECT_TRUE(rejected(p)) << "bits " << bits;
  }
  for (int per : {0, -1, 3, 6, 16}) {
    ChannelScoresParams p = d.params;
    p.blocks_per_group = per;
    EXPECT_TRUE(rejected(p)) << "Pg " << per;
  }
  ChannelScoresParams p = d.params;
  p.blocks_per_group = 8;
  p.block_size = 32;  // a group of 256 tokens
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.block_size = 24;  // 2-bit runs of 6 bytes
  p.bits = 2;
  EXPECT_TRUE(rejected(p));
  for (int block_size : {8, 4, 48}) {  // the kernel scores 16-token m-tiles: power-of-two blocks of >= 16
    p = d.params;
    p.block_size = block_size;
    EXPECT_TRUE(rejected(p)) << "block_size " << block_size;
  }
  p = d.params;
  p.blocks_per_group = 8;
  p.num_blocks = 12;
  EXPECT_TRUE(rejected(p));
  for (int head_dim : {96, 40, 32, 512}) {
    p = d.params;
    p.head_dim = head_dim;
    EXPECT_TRUE(rejected(p)) << "head_dim " << head_dim;
  }
  for (int channels_count : {0, -1, D + 1}) {
    p = d.params;
    p.num_channels = channels_count;
    EXPECT_TRUE(rejected(p)) << "num_channels " << channels_count;
  }
  p = d.params;
  p.q_heads = 3;
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.kv_heads = 0;
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.batch = -1;
  EXPECT_TRUE(rejected(p));
  for (int which = 0; which < 6; ++which) {
    p = d.params;
    if (which == 0) p.q = nullptr;
    if (which == 1) p.codes = nullptr;
    if (which == 2) p.ranges = nullptr;
    if (which == 3) p.seq_lens = nullptr;
    if (which == 4) p.channels = nullptr;
    if (which == 5) p.head_scores = nullptr;
    EXPECT_TRUE(rejected(p)) << "null pointer " << which;
  }
  p = d.params;
  p.codes = d.params.codes + 4;
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.ranges = d.params.ranges + 2;
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.dtype = static_cast<DType>(9);
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.batch = 0;  // nothing to do
  EXPECT_EQ(cuda::channel_scores(p, nullptr), cudaSuccess);

  // code_channels takes the same grouping and channel arguments (no bits, no codes).
  std::vector<int32_t> out(channels.size());
  DeviceBytes d_out(out.size() * sizeof(int32_t));
  CodeChannelsParams base = channel_params(q, codes.ranges, lens.data(), kv_heads, bs, num_blocks, 1, m, nullptr);
  base.q = d.params.q;
  base.ranges = d.params.ranges;
  base.seq_lens = d.params.seq_lens;
  base.channels = d_out.as<int32_t>();
  ASSERT_CUDA(cuda::code_channels(base, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto channels_rejected = [](const CodeChannelsParams& c) {
    return cuda::code_channels(c, nullptr) == cudaErrorInvalidValue;
  };
  CodeChannelsParams c = base;
  c.blocks_per_group = 3;
  EXPECT_TRUE(channels_rejected(c));
  c = base;
  c.head_dim = 96;
  EXPECT_TRUE(channels_rejected(c));
  c = base;
  c.num_channels = 0;
  EXPECT_TRUE(channels_rejected(c));
  c = base;
  c.num_channels = D + 1;
  EXPECT_TRUE(channels_rejected(c));
  c = base;
  c.q_heads = 3;
  EXPECT_TRUE(channels_rejected(c));
  c = base;
  c.kv_heads = 0;
  EXPECT_TRUE(channels_rejected(c));
  for (int which = 0; which < 4; ++which) {
    c = base;
    if (which == 0) c.q = nullptr;
    if (which == 1) c.ranges = nullptr;
    if (which == 2) c.seq_lens = nullptr;
    if (which == 3) c.channels = nullptr;
    EXPECT_TRUE(channels_rejected(c)) << "null pointer " << which;
  }
  c = base;
  c.dtype = static_cast<DType>(9);
  EXPECT_TRUE(channels_rejected(c));
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace aether
