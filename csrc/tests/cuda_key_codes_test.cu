// aether::cuda::key_codes (token- and channel-major) and aether::cuda::refine_scores against the CPU
// kernels as oracle (the
// CPU kernels are checked against params.h in cpu_key_codes_test.cpp), on fresh random inputs.
//
// Build: both backends take the min / max of the same float32 keys, round them to bf16 the same
// way and quantise with one float32 subtraction, one float32 division and rint: the codes and
// ranges must be bit-identical, for head_dim 64 / 128 / 256, bits 2 / 4, groups of 1..8 blocks of
// 16..128 tokens, float16 / bfloat16 / float32 keys, contiguous, token-major and paged caches; an
// append (first_block) is bit-identical to a full build and writes exactly its groups; a full
// build writes zeros past the end (outputs are poisoned with 0xAB first).
// Scores: the CUDA kernel folds the ranges into per-lane FMAs and sums over the warp, the CPU
// kernel sums channel by channel, so the scores agree to float32 rounding, not bit for bit. Both
// write exactly the same entries (the valid candidates) and leave every other one as it was, be
// it the caller's -inf or a sentinel.
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

using CodesBuffers = test::PoisonedCodes;
using test::cpu_codes;
using test::cuda_codes;
using test::DeviceKV;

using test::first_difference;

struct BuildCase {
  DType dtype;
  KVKind kind;
  int head_dim, bits, block_size, per;
  int32_t max_len;
};

std::string describe(const BuildCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) + " D=" +
         std::to_string(c.head_dim) + " bits=" + std::to_string(c.bits) + " bs=" + std::to_string(c.block_size) +
         " Pg=" + std::to_string(c.per) + " max_len=" + std::to_string(c.max_len);
}

// Every (block_size, Pg) with Pg * bs <= 128 meets every head_dim and width; dtype and layout
// rotate. max_len ends in the third group after a whole block of it (Pg > 1) and mid block, or on
// a group boundary every fourth case.
std::vector<BuildCase> build_cases() {
  const int groupings[][2] = {{16, 1}, {16, 2}, {16, 4}, {16, 8}, {32, 1}, {32, 2}, {32, 4}, {64, 1}, {64, 2}, {128, 1}};
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  std::vector<BuildCase> cases;
  int n = 0;
  for (const auto& g : groupings) {
    for (int D : {64, 128, 256}) {
      for (int bits : {2, 4}) {
        const int bs = g[0], per = g[1], gt = bs * per;
        const int32_t max_len = n % 4 == 3 ? 2 * gt : 2 * gt + (per > 1 ? bs : 0) + bs / 2 + 3;
        cases.push_back({dtypes[n % 3], static_cast<KVKind>((n / 3) % 3), D, bits, bs, per, max_len});
        ++n;
      }
    }
  }
  return cases;
}

// Capacity in blocks: the groups covering max_len plus `spare` (zero-filled by a full build).
int capacity_of(const BuildCase& c, int spare) {
  return (test::blocks_of(c.max_len, c.block_size * c.per) + spare) * c.per;
}

// Lengths with the edges (max_len, 0, 1, bs, bs + 1) and a group's (gt - 1, gt, gt + 1).
std::vector<int32_t> build_lengths(int batch, const BuildCase& c, std::mt19937_64& rng) {
  const int32_t gt = c.block_size * c.per;
  return test::mixed_lengths(batch, c.max_len, c.block_size, rng, {gt, gt + 1, gt - 1});
}

TEST(CudaKeyCodes, FullBuildIsBitIdenticalToCpu) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 8, heads = 2;
  for (const BuildCase& c : build_cases()) {
    for (const int channel_major : {0, 1}) {  // token-major (refine_scores) and channel-major (qcodes)
      SCOPED_TRACE(describe(c) + (channel_major ? " channel-major" : " token-major"));
      const int num_blocks = capacity_of(c, 1);
      TestKV kv(c.dtype, c.kind, batch, heads, c.head_dim, c.block_size, num_blocks, rng);
      const std::vector<int32_t> lens = build_lengths(batch, c, rng);
      kv.poison_after(lens);  // a kernel reading past the end would take a NaN into its min / max
      CodesBuffers cpu(batch, heads, num_blocks, c.block_size, c.head_dim, c.bits, c.per);
      cpu_codes(kv, lens, nullptr, cpu, channel_major);
      CodesBuffers gpu(batch, heads, num_blocks, c.block_size, c.head_dim, c.bits, c.per);
      const DeviceKV keys(kv);
      cuda_codes(kv, keys, lens, nullptr, gpu, channel_major);
      if (HasFatalFailure()) return;
      ASSERT_SAME_CODES(gpu, cpu);
    }
  }
}

// Append after new tokens: first_block is the block holding the old end (mid group when Pg > 1).
// On top of a CUDA build of the old lengths it must reproduce the full build of the new lengths;
// alone on poisoned buffers it writes exactly the groups [first_block / Pg, ceil(len / (Pg bs))),
// nothing for a first_block past the last valid block or past the capacity. Every other case
// appends with the narrow launch (KeyCodesParams::narrow: 64-thread CTAs, keys staged in their
// own type), which must write the same bits.
TEST(CudaKeyCodes, AppendIsBitIdenticalToFullBuildAndWritesOnlyItsGroups) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 8, heads = 2;
  int index = 0;
  for (const BuildCase& c : build_cases()) {
    // half the cases per layout: every grouping, head_dim and width remains in each
    const int channel_major = index % 2;
    const int narrow = (index / 2) % 2;  // both launches meet both layouts
    ++index;
    SCOPED_TRACE(describe(c) + (channel_major ? " channel-major" : " token-major") + (narrow ? " narrow" : ""));
    const int bs = c.block_size, gt = bs * c.per;
    const int num_blocks = capacity_of(c, 2);
    TestKV kv(c.dtype, c.kind, batch, heads, c.head_dim, bs, num_blocks, rng);
    const std::vector<int32_t> new_lens = build_lengths(batch, c, rng);
    std::vector<int32_t> old_lens(batch), first(batch);
    for (int b = 0; b < batch; ++b) {
      old_lens[b] = std::uniform_int_distribution<int32_t>(0, new_lens[b])(rng);
      first[b] = old_lens[b] / bs;
    }
    kv.poison_after(new_lens);
    const DeviceKV keys(kv);

    CodesBuffers full(batch, heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    cpu_codes(kv, new_lens, nullptr, full, channel_major);
    CodesBuffers appended(batch, heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    cuda_codes(kv, keys, old_lens, nullptr, appended, channel_major);
    cuda_codes(kv, keys, new_lens, &first, appended, channel_major, narrow);
    if (HasFatalFailure()) return;
    ASSERT_SAME_CODES(appended, full);

    std::vector<int32_t> only = first;
    only[1] = test::blocks_of(new_lens[1], bs);
    only[2] = num_blocks + 5;
    CodesBuffers alone(batch, heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    cuda_codes(kv, keys, new_lens, &only, alone, channel_major, narrow);
    if (HasFatalFailure()) return;
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int m = 0; m < alone.num_groups(); ++m) {
          const bool written = m >= only[b] / c.per && m < test::blocks_of(new_lens[b], gt);
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " group " +
                                    std::to_string(m) + " first=" + std::to_string(only[b]) +
                                    " len=" + std::to_string(new_lens[b]);
          for (int i = 0; i < alone.group_bytes(); ++i) {
            ASSERT_EQ(alone.group_codes(b, h, m)[i], written ? full.group_codes(b, h, m)[i] : 0xAB) << where << " byte " << i;
          }
          for (int i = 0; i < 2 * c.head_dim; ++i) {
            ASSERT_EQ(alone.group_ranges(b, h, m)[i], written ? full.group_ranges(b, h, m)[i] : 0xABAB) << where;
          }
        }
      }
    }
  }
}

// Argument checks (cudaErrorInvalidValue, nothing launched): bits 2 or 4, Pg a power of two in
// 1..8 dividing num_blocks with Pg * bs <= 128, head_dim 64 / 128 / 256, the output and length
// pointers, a page size equal to the block size. The same arguments otherwise build (the control).
TEST(CudaKeyCodes, RejectsInvalidArguments) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(7);
  const int bs = 16, D = 64, num_blocks = 8;
  TestKV kv(DType::kBFloat16, KVKind::kPaged, 1, 1, D, bs, num_blocks, rng);
  const std::vector<int32_t> lens = {77};
  CodesBuffers shape(1, 1, num_blocks, bs, D, 4, 1);  // the largest layout the variants need
  const DeviceKV keys(kv);
  DeviceBytes d_lens(lens.data(), sizeof(int32_t));
  DeviceBytes d_codes(shape.codes.size()), d_ranges(shape.ranges.size() * sizeof(uint16_t));
  const KeyCodesParams base = test::codes_params(kv, keys.layout(kv), d_lens.as<int32_t>(), nullptr, shape,
                                           d_codes.as<uint8_t>(), d_ranges.as<uint16_t>(), 0);
  ASSERT_CUDA(cuda::key_codes(base, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto rejected = [](const KeyCodesParams& p) { return cuda::key_codes(p, nullptr) == cudaErrorInvalidValue; };
  for (int bits : {0, 1, 3, 5, 8}) {
    KeyCodesParams p = base;
    p.bits = bits;
    EXPECT_TRUE(rejected(p)) << "bits " << bits;
  }
  for (int per : {0, -2, 3, 6, 16}) {
    KeyCodesParams p = base;
    p.blocks_per_group = per;
    EXPECT_TRUE(rejected(p)) << "Pg " << per;
  }
  KeyCodesParams p = base;
  p.blocks_per_group = 8;
  p.num_blocks = 12;  // not a multiple of Pg
  EXPECT_TRUE(rejected(p));
  p = base;
  p.block_size = 32;
  p.k.page_size = 32;
  p.blocks_per_group = 8;  // a group of 256 tokens
  EXPECT_TRUE(rejected(p));
  for (int head_dim : {96, 40, 32, 512}) {  // whole bytes, but no kernel is built for them
    p = base;
    p.head_dim = head_dim;
    EXPECT_TRUE(rejected(p)) << "head_dim " << head_dim;
  }
  p = base;
  p.codes = nullptr;
  EXPECT_TRUE(rejected(p));
  p = base;
  p.ranges = nullptr;
  EXPECT_TRUE(rejected(p));
  p = base;
  p.seq_lens = nullptr;
  EXPECT_TRUE(rejected(p));
  p = base;
  p.k.page_size = 2 * bs;  // paged: a page holds one block
  EXPECT_TRUE(rejected(p));
  p = base;
  p.dtype = static_cast<DType>(7);
  EXPECT_TRUE(rejected(p));
  for (int per : {1, 2, 4, 8}) {  // every valid grouping of this shape builds
    p = base;
    p.blocks_per_group = per;
    EXPECT_EQ(cuda::key_codes(p, nullptr), cudaSuccess) << "Pg " << per;
  }
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// ---------------------------------------------------------------------------------------------
// refine_scores.

using test::Candidates;
using test::make_candidates;

RefineScoresParams refine_params(const TestQuery& q, const CodesBuffers& codes, const int32_t* lens,
                                 const Candidates& cand, float scale) {
  RefineScoresParams p;
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = q.data.dtype;
  p.codes = codes.codes.data();
  p.ranges = codes.ranges.data();
  p.seq_lens = lens;
  p.candidates = cand.rows.data();
  p.num_candidates = cand.count.data();
  p.batch = codes.batch;
  p.q_heads = q.heads;
  p.kv_heads = codes.heads;
  p.head_dim = codes.head_dim;
  p.block_size = codes.block_size;
  p.num_blocks = codes.num_blocks;
  p.list_length = cand.list_length;
  p.blocks_per_group = codes.per;
  p.bits = codes.bits;
  p.scale = scale;
  return p;
}

// Device copies of the inputs of host refine params, and a head_scores buffer holding `scores`.
struct DeviceRefine {
  DeviceBytes q, codes, ranges, lens, candidates, count, scores;
  RefineScoresParams params;
  DeviceRefine(const RefineScoresParams& host, size_t q_bytes, const CodesBuffers& shape, const std::vector<float>& fill)
      : q(host.q, q_bytes),
        codes(host.codes, shape.codes.size()),
        ranges(host.ranges, shape.ranges.size() * sizeof(uint16_t)),
        lens(host.seq_lens, static_cast<size_t>(host.batch) * sizeof(int32_t)),
        candidates(host.candidates, static_cast<size_t>(host.batch) * host.kv_heads * host.list_length * sizeof(int32_t)),
        count(host.num_candidates, static_cast<size_t>(host.batch) * host.kv_heads * sizeof(int32_t)),
        scores(fill.data(), fill.size() * sizeof(float)),
        params(host) {
    params.q = q.ptr;
    params.codes = codes.as<uint8_t>();
    params.ranges = ranges.as<uint16_t>();
    params.seq_lens = lens.as<int32_t>();
    params.candidates = candidates.as<int32_t>();
    params.num_candidates = count.as<int32_t>();
    params.head_scores = scores.as<float>();
  }
};

bool bits_equal(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

using test::RefineCase;
using test::describe;

// Every group size (1, 3, 4, 8) meets every head_dim and width; grouping, dtype, row length and
// query scale (30: logits far past float32's exp range, the online log-sum-exp must rescale)
// rotate independently.
std::vector<RefineCase> refine_cases() {
  const int groupings[][2] = {{16, 1}, {16, 2}, {16, 4}, {16, 8}, {32, 1}, {32, 2}, {32, 4}, {64, 1}, {64, 2}, {128, 1}};
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  std::vector<RefineCase> cases;
  int n = 0;
  for (int G : {1, 3, 4, 8}) {
    for (int D : {64, 128, 256}) {
      for (int bits : {2, 4}) {
        const auto& g = groupings[(n * 3) % 10];
        cases.push_back({dtypes[n % 3], G, D, bits, g[0], g[1], (n / 3) % 3, n % 4 == 1 ? 30.0 : 1.0});
        ++n;
      }
    }
  }
  return cases;
}

// Both backends over the same inputs and the same prefill (-inf as the caller writes it, then a
// finite sentinel, which also shows a -inf written where nothing may be): they write the same
// entries, every other entry keeps the prefill bit for bit, and the written scores agree within
// 1e-4 + 3e-5 x the larger of |score| and the logits' term magnitude scale * sum_d |q_d| (|lo_d| +
// |hi_d|) (float32 sums of D products in two orders; a logit that cancels to ~0 still carries the
// rounding of its terms).
TEST(CudaRefineScores, MatchesCpuOnCandidateLists) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 6, kv_heads = 2;
  int64_t written = 0, untouched = 0;
  int index = 0;
  for (const RefineCase& c : refine_cases()) {
    const int bs = c.block_size, gt = bs * c.per;
    const int32_t max_len = 2 * gt + bs + 3;
    const int num_blocks = (test::blocks_of(max_len, gt) + 1) * c.per;
    const int L = c.row == 0 ? num_blocks : c.row == 1 ? test::blocks_of(max_len, bs) / 2 : num_blocks + 3;
    SCOPED_TRACE(describe(c, L, num_blocks));
    const KVKind kind = static_cast<KVKind>(index++ % 3);  // only the builds read keys
    TestKV kv(c.dtype, kind, batch, kv_heads, c.head_dim, bs, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng, {gt + 1});
    kv.poison_after(lens);
    CodesBuffers codes(batch, kv_heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    cpu_codes(kv, lens, nullptr, codes, 0);
    // The CUDA build of the same keys is the CUDA scorer's input: the two-stage path end to end
    // (bit-identical to the CPU's build, FullBuildIsBitIdenticalToCpu).
    CodesBuffers gpu_codes(batch, kv_heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    {
      const DeviceKV keys(kv);
      cuda_codes(kv, keys, lens, nullptr, gpu_codes, 0);
      if (HasFatalFailure()) return;
    }
    ASSERT_SAME_CODES(gpu_codes, codes);

    TestQuery q(c.dtype, batch, c.group * kv_heads, c.head_dim);
    q.fill_normal(rng, c.q_scale);
    const Candidates cand = make_candidates(batch, kv_heads, L, num_blocks, bs, lens, rng);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
    const RefineScoresParams host = refine_params(q, codes, lens.data(), cand, scale);
    const RefineScoresParams host_gpu_codes = refine_params(q, gpu_codes, lens.data(), cand, scale);

    for (const float fill : {kNegInf, 1234.5f}) {
      std::vector<float> cpu_scores(static_cast<size_t>(batch) * q.heads * L, fill);
      RefineScoresParams cpu_params = host;
      cpu_params.head_scores = cpu_scores.data();
      cpu::refine_scores(cpu_params);

      std::vector<float> gpu_scores(cpu_scores.size(), fill);
      DeviceRefine d(host_gpu_codes, q.data.size_bytes(), gpu_codes, gpu_scores);
      ASSERT_CUDA(cuda::refine_scores(d.params, nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      d.scores.download(gpu_scores.data());

      const int G = c.group, D = c.head_dim;
      for (int b = 0; b < batch; ++b) {
        for (int hq = 0; hq < q.heads; ++hq) {
          const std::vector<double> qv = q.row(b, hq);
          for (int j = 0; j < L; ++j) {
            const size_t at = (static_cast<size_t>(b) * q.heads + hq) * L + j;
            const float expected = cpu_scores[at], actual = gpu_scores[at];
            const std::string where = "b=" + std::to_string(b) + " head=" + std::to_string(hq) + " j=" +
                                      std::to_string(j) + " len=" + std::to_string(lens[b]) + " fill " + std::to_string(fill);
            if (bits_equal(expected, fill)) {  // not a candidate the CPU scored: the CUDA kernel left it too
              ASSERT_TRUE(bits_equal(actual, fill)) << where << " cuda wrote " << actual;
              ++untouched;
              continue;
            }
            ASSERT_TRUE(std::isfinite(expected)) << where << " cpu " << expected;
            ASSERT_TRUE(std::isfinite(actual)) << where << " cuda " << actual << " cpu " << expected;
            const uint16_t* ranges = codes.group_ranges(b, hq / G, j / c.per);
            double magnitude = 0.0;
            for (int d = 0; d < D; ++d) {
              magnitude += std::fabs(qv[d]) * (std::fabs(test::decode_bf16(ranges[d])) + std::fabs(test::decode_bf16(ranges[D + d])));
            }
            magnitude *= scale;
            const double tolerance = 1e-4 + 3e-5 * std::max<double>(std::fabs(expected), magnitude);
            ASSERT_NEAR(actual, expected, tolerance) << where << " magnitude " << magnitude;
            ++written;
          }
        }
      }
    }
    ASSERT_TRUE(q.padding_untouched());
  }
  EXPECT_GT(written, 300);
  EXPECT_GT(untouched, 1000);
}

// Argument checks (cudaErrorInvalidValue, nothing launched or written): bits, Pg, a group over
// 128 tokens, head_dim 96 (and 40, which the CPU kernel takes), every pointer, q_heads a multiple
// of kv_heads, list_length >= 0. The control scores; an empty row (L = 0) is a no-op.
TEST(CudaRefineScores, RejectsInvalidArguments) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(11);
  const int batch = 2, kv_heads = 2, bs = 16, D = 64, num_blocks = 8;
  TestKV kv(DType::kFloat16, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng);
  const std::vector<int32_t> lens = {77, 128};
  CodesBuffers codes(batch, kv_heads, num_blocks, bs, D, 4, 1);
  cpu_codes(kv, lens, nullptr, codes, 0);
  TestQuery q(DType::kFloat16, batch, 2 * kv_heads, D);
  q.fill_normal(rng);
  const Candidates cand = make_candidates(batch, kv_heads, num_blocks, num_blocks, bs, lens, rng);
  const RefineScoresParams host = refine_params(q, codes, lens.data(), cand, 0.125f);
  const std::vector<float> fill(static_cast<size_t>(batch) * q.heads * num_blocks, kNegInf);
  DeviceRefine d(host, q.data.size_bytes(), codes, fill);
  ASSERT_CUDA(cuda::refine_scores(d.params, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  d.scores.upload(fill.data());  // the control wrote its candidates

  const auto rejected = [](const RefineScoresParams& p) { return cuda::refine_scores(p, nullptr) == cudaErrorInvalidValue; };
  for (int bits : {0, 1, 3, 8}) {
    RefineScoresParams p = d.params;
    p.bits = bits;
    EXPECT_TRUE(rejected(p)) << "bits " << bits;
  }
  for (int per : {0, 3, 6, 16}) {
    RefineScoresParams p = d.params;
    p.blocks_per_group = per;
    EXPECT_TRUE(rejected(p)) << "Pg " << per;
  }
  RefineScoresParams p = d.params;
  p.blocks_per_group = 8;
  p.block_size = 32;  // a group of 256 tokens
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.blocks_per_group = 8;
  p.num_blocks = 12;
  EXPECT_TRUE(rejected(p));
  for (int head_dim : {96, 40, 32}) {
    p = d.params;
    p.head_dim = head_dim;
    EXPECT_TRUE(rejected(p)) << "head_dim " << head_dim;
  }
  for (int which = 0; which < 6; ++which) {
    p = d.params;
    if (which == 0) p.codes = nullptr;
    if (which == 1) p.ranges = nullptr;
    if (which == 2) p.seq_lens = nullptr;
    if (which == 3) p.candidates = nullptr;
    if (which == 4) p.num_candidates = nullptr;
    if (which == 5) p.head_scores = nullptr;
    EXPECT_TRUE(rejected(p)) << "null pointer " << which;
  }
  p = d.params;
  p.q_heads = 3;  // not a multiple of kv_heads 2
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.kv_heads = 0;
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.list_length = -1;
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.dtype = static_cast<DType>(9);
  EXPECT_TRUE(rejected(p));
  p = d.params;
  p.list_length = 0;
  EXPECT_EQ(cuda::refine_scores(p, nullptr), cudaSuccess);
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  std::vector<float> after(fill.size());
  d.scores.download(after.data());
  for (size_t i = 0; i < after.size(); ++i) ASSERT_TRUE(bits_equal(after[i], kNegInf)) << "entry " << i << ": " << after[i];
}

}  // namespace
}  // namespace aether
