// aether::cuda::key_sketch and the CUDA qsketch score (radar_select with Score::kSketch) against
// the CPU kernels as oracle, for sketch blocks of P = blocks_per_sketch = 1, 2, 4, 8 blocks.
//
// Build: the CUDA coefficients are fmaf chains, the CPU's separate multiply-adds, so the two
// sketches are not bit-identical. What is guaranteed (and checked) is that every CUDA range is
// the bfloat16 rounding of a value within float32 error of the exact min / max over its sketch
// block, and every CUDA code is rint((x - lo) / step) of its own range up to that error; against
// the CPU, ranges and codes agree almost everywhere and codes under equal ranges differ by at most
// one level. The bf16 centroid is summed in token order by both backends: bit-identical to the
// CPU's and to a host sum in the same order. An append (first_block names a block; its sketch
// block is rebuilt whole) is bit-identical to a full build and writes only its sketch blocks.
// Score: both backends score the same (CPU-built) sketch; per-head scores agree within float32
// rounding, -inf exactly past the end, and the CUDA selection is the CPU's selection given the
// CUDA scores. Large logits force the kernel's underflow fallback; constant sketch blocks have
// step 0. Outputs are poisoned before every call; the float32 block centroids are never passed,
// so a kernel that still read them would fault.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
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

using test::DeviceBytes;
using test::has_cuda_device;
using test::KVKind;
using test::SketchBuffers;
using test::TestKV;
using test::TestQuery;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kLog2e = 1.4426950408889634;

// [rows, D, R] float32 projections, N(0, stddev^2).
std::vector<float> random_proj(int rows, int head_dim, int rank, std::mt19937_64& rng, double stddev) {
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<float> proj(static_cast<size_t>(rows) * head_dim * rank);
  for (auto& value : proj) value = static_cast<float>(normal(rng));
  return proj;
}

// Lengths with the usual edges (max_len, 0, 1, bs, bs + 1) and those of a sketch block of sb =
// P * bs tokens (sb - 1, sb, sb + 1, sb + bs + 3: a partial last sketch block), then random ones.
std::vector<int32_t> sketch_lengths(int batch, int32_t max_len, int bs, int sb, std::mt19937_64& rng) {
  std::vector<int32_t> lens = test::mixed_lengths(std::min(batch, 5), max_len, bs, rng);
  for (int32_t edge : {sb - 1, sb, sb + 1, sb + bs + 3}) {
    if (static_cast<int>(lens.size()) < batch) lens.push_back(std::clamp<int32_t>(edge, 0, max_len));
  }
  std::uniform_int_distribution<int32_t> any_len(0, max_len);
  while (static_cast<int>(lens.size()) < batch) lens.push_back(any_len(rng));
  std::shuffle(lens.begin(), lens.end(), rng);
  return lens;
}

// Capacity in blocks: the sketch blocks covering max_len and `spare` more (zero-filled), times P.
int sketch_capacity(int32_t max_len, int bs, int per, int spare) {
  return (test::blocks_of(max_len, bs * per) + spare) * per;
}

// The sketch centroid of tokens [t0, t0 + n) of (b, h) from the text of params.h: float32 sum in
// token order from 0, float32 division by the count, bfloat16 round to nearest even.
std::vector<uint16_t> host_centroid(const TestKV& kv, int b, int h, int t0, int n) {
  std::vector<uint16_t> bits(static_cast<size_t>(kv.head_dim), 0);
  if (n <= 0) return bits;
  for (int d = 0; d < kv.head_dim; ++d) {
    float sum = 0.0f;
    for (int t = t0; t < t0 + n; ++t) sum += static_cast<float>(kv.at(b, h, t, d));
    bits[d] = test::encode_bf16_exact(test::round_to_bf16(sum / static_cast<float>(n)));
  }
  return bits;
}

SketchBuffers new_sketch(const TestKV& kv, int rank, int per) {
  SketchBuffers out(kv.batch, kv.heads, kv.num_blocks, kv.block_size, rank, kv.head_dim, per);
  out.poison();
  return out;
}

SketchBuffers cpu_sketch(const TestKV& kv, const std::vector<int32_t>& lens, const std::vector<float>& key_proj, int rank,
                         int per) {
  SketchBuffers out = new_sketch(kv, rank, per);
  cpu::key_sketch(test::key_sketch_params(kv, lens, key_proj, rank, out));
  return out;
}

// Device copies of the keys and projections one key_sketch case reuses across calls.
struct DeviceKeys {
  DeviceBytes k, table, proj;
  DeviceKeys(const TestKV& kv, const std::vector<float>& key_proj)
      : k(kv.data.data(), kv.data.size_bytes()),
        table(kv.block_table.data(), kv.block_table.size() * sizeof(int32_t)),
        proj(key_proj.data(), key_proj.size() * sizeof(float)) {}
};

// cuda::key_sketch over `sketch`: its current bytes are uploaded first, so the poison (or an
// earlier build) shows wherever the kernel does not write; the result is downloaded into it.
void run_cuda_sketch(const TestKV& kv, const DeviceKeys& keys, const std::vector<int32_t>& lens,
                     const std::vector<int32_t>* first_block, SketchBuffers& sketch) {
  DeviceBytes d_lens(lens.data(), lens.size() * sizeof(int32_t));
  DeviceBytes d_first(first_block ? first_block->data() : nullptr, first_block ? first_block->size() * sizeof(int32_t) : 0);
  DeviceBytes d_codes(sketch.codes.data(), sketch.codes.size());
  DeviceBytes d_ranges(sketch.ranges.data(), sketch.ranges.size() * sizeof(uint16_t));
  DeviceBytes d_centroid(sketch.centroid.data(), sketch.centroid.size() * sizeof(uint16_t));
  ASSERT_TRUE(d_codes.ptr != nullptr && d_ranges.ptr != nullptr && d_centroid.ptr != nullptr);
  const KVLayout layout = kv.layout(keys.k.ptr, kv.kind == KVKind::kPaged ? keys.table.as<int32_t>() : nullptr);
  KeySketchParams p = test::key_sketch_params(kv, layout, d_lens.as<int32_t>(), keys.proj.as<float>(), sketch.rank,
                                              sketch.blocks_per_sketch, d_codes.as<uint8_t>(), d_ranges.as<uint16_t>(),
                                              d_centroid.as<uint16_t>());
  p.first_block = first_block ? d_first.as<int32_t>() : nullptr;
  ASSERT_CUDA(cuda::key_sketch(p, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  d_codes.download(sketch.codes.data());
  d_ranges.download(sketch.ranges.data());
  d_centroid.download(sketch.centroid.data());
}

struct BuildCase {
  DType dtype;
  KVKind kind;
  int block_size, rank, head_dim;
  int32_t max_len;
  int per;  // blocks_per_sketch
};

std::string describe(const BuildCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) + " bs=" + std::to_string(c.block_size) +
         " R=" + std::to_string(c.rank) + " D=" + std::to_string(c.head_dim) + " max_len=" + std::to_string(c.max_len) +
         " P=" + std::to_string(c.per);
}

std::vector<BuildCase> build_cases() {
  // (block_size, rank, head_dim, max_len, P): partial last blocks, a single token, one exact
  // block; with P > 1 a partial last sketch block (some whole blocks, then a partial one), odd
  // lengths and sketch blocks of 128 tokens.
  const int shapes[][5] = {{16, 2, 64, 97, 1},       {64, 8, 128, 301, 1},    {128, 16, 64, 389, 1},
                           {32, 4, 256, 161, 1},     {16, 16, 128, 1, 1},     {128, 4, 64, 128, 1},
                           {16, 8, 64, 64 * 3 + 21, 4}, {32, 4, 128, 64 * 4 + 37, 2}, {64, 16, 256, 128 * 2 + 65, 2},
                           {16, 2, 128, 128 + 17, 8},   {32, 16, 64, 128 + 63, 4},    {16, 4, 256, 32 * 5 + 3, 2}};
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::vector<BuildCase> cases;
  for (int d = 0; d < 3; ++d) {
    int n = 0;
    for (const auto& s : shapes) {
      // Every shape meets every layout across the three dtypes.
      cases.push_back({dtypes[d], static_cast<KVKind>((n++ + d) % 3), s[0], s[1], s[2], s[3], s[4]});
    }
  }
  return cases;
}

TEST(CudaKeySketch, FullBuildMatchesCpuWithinCoefficientRounding) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 9, heads = 2;  // sketch_lengths forces max_len, 0, 1, bs, bs + 1, sb +- 1, sb, sb + bs + 3
  int64_t ranges_checked = 0, ranges_equal = 0, codes_checked = 0, codes_equal = 0, centroids_checked = 0;
  for (const BuildCase& c : build_cases()) {
    SCOPED_TRACE(describe(c));
    const int R = c.rank, bs = c.block_size, bytes = R / 2, P = c.per, sb = bs * P, D = c.head_dim;
    const int num_blocks = sketch_capacity(c.max_len, bs, P, 2);  // spare sketch blocks: zero-filled
    const int num_sketches = num_blocks / P;
    TestKV kv(c.dtype, c.kind, batch, heads, D, bs, num_blocks, rng);
    const std::vector<float> key_proj = random_proj(heads, D, R, rng, 1.0 / std::sqrt(D));
    const std::vector<int32_t> lens = sketch_lengths(batch, c.max_len, bs, sb, rng);
    kv.poison_after(lens);  // a kernel reading past the end sees NaN
    const SketchBuffers cpu = cpu_sketch(kv, lens, key_proj, R, P);
    SketchBuffers gpu = new_sketch(kv, R, P);
    const DeviceKeys keys(kv, key_proj);
    run_cuda_sketch(kv, keys, lens, nullptr, gpu);
    if (testing::Test::HasFatalFailure()) return;

    for (int b = 0; b < batch; ++b) {
      const int32_t n_sketches = test::blocks_of(lens[b], sb);
      for (int h = 0; h < heads; ++h) {
        for (int m = 0; m < num_sketches; ++m) {
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " sketch block " +
                                    std::to_string(m) + " len=" + std::to_string(lens[b]);
          const uint16_t* g_ranges = gpu.sketch_ranges(b, h, m);
          const uint16_t* c_ranges = cpu.sketch_ranges(b, h, m);
          const uint16_t* g_centroid = gpu.sketch_centroid(b, h, m);
          const uint8_t* g_codes = gpu.block_codes(b, h, static_cast<int64_t>(m) * P);  // sb tokens, contiguous
          const int t0 = m * sb;
          const int n = m < n_sketches ? std::min(lens[b], t0 + sb) - t0 : 0;
          if (n == 0) {
            for (int r = 0; r < 2 * R; ++r) ASSERT_EQ(g_ranges[r], 0) << where;
          }
          for (int i = n * bytes; i < sb * bytes; ++i) ASSERT_EQ(g_codes[i], 0) << where << " invalid slot byte " << i;
          // Centroid: bit-identical to the CPU's and to the host sum in token order (zeros when empty).
          const std::vector<uint16_t> expected_centroid = host_centroid(kv, b, h, t0, n);
          const uint16_t* c_centroid = cpu.sketch_centroid(b, h, m);
          for (int d = 0; d < D; ++d) {
            ASSERT_EQ(g_centroid[d], c_centroid[d]) << where << " d=" << d << " cuda " << test::decode_bf16(g_centroid[d])
                                                    << " cpu " << test::decode_bf16(c_centroid[d]);
            ASSERT_EQ(g_centroid[d], expected_centroid[d]) << where << " d=" << d;
          }
          ++centroids_checked;
          if (n == 0) continue;

          std::vector<std::vector<double>> x;  // exact coefficients and the float32 error bound
          std::vector<double> error;
          for (int t = 0; t < n; ++t) {
            double e = 0.0;
            x.push_back(test::sketch_coefficients(kv, key_proj, R, b, h, t0 + t, &e));
            error.push_back(e);
          }
          const double worst = *std::max_element(error.begin(), error.end());
          // A float32 min / max lies within `worst` of the exact one; its bfloat16 rounding is then
          // between the roundings of the two ends of that interval.
          const auto rounds_from = [&](double value, uint16_t bits) {
            const double got = test::decode_bf16(bits);
            return got >= test::round_to_bf16(value - worst) && got <= test::round_to_bf16(value + worst);
          };
          for (int r = 0; r < R; ++r) {
            double low = test::kInf, high = -test::kInf;
            for (int t = 0; t < n; ++t) {
              low = std::min(low, x[t][r]);
              high = std::max(high, x[t][r]);
            }
            ASSERT_TRUE(rounds_from(low, g_ranges[r])) << where << " r=" << r << " lo " << test::decode_bf16(g_ranges[r])
                                                       << " vs exact min " << low;
            ASSERT_TRUE(rounds_from(high, g_ranges[R + r]))
                << where << " r=" << r << " hi " << test::decode_bf16(g_ranges[R + r]) << " vs exact max " << high;
            ranges_checked += 2;
            ranges_equal += (g_ranges[r] == c_ranges[r]) + (g_ranges[R + r] == c_ranges[R + r]);
            const bool same_range = g_ranges[r] == c_ranges[r] && g_ranges[R + r] == c_ranges[R + r];

            const double lo = test::decode_bf16(g_ranges[r]);
            const double step = test::sketch_step_of(g_ranges[r], g_ranges[R + r]);
            for (int t = 0; t < n; ++t) {
              const int j = m * P + t / bs, slot = t % bs;  // token t of the sketch block
              const int actual = gpu.code(b, h, j, slot, r);
              const int expected = cpu.code(b, h, j, slot, r);
              ++codes_checked;
              codes_equal += actual == expected;
              if (!(step > 0.0)) {  // one token, a constant coefficient, or a range below one ulp
                ASSERT_EQ(actual, 0) << where << " t=" << t << " r=" << r;
                continue;
              }
              // rint of the quotient from the kernel's own range; a neighbour only within the
              // coefficient's float32 error (plus the quotient's own rounding) of a .5 boundary.
              const test::CodeBounds bounds = test::code_bounds(x[t][r], lo, step, error[t]);
              const double quotient = bounds.quotient, least = bounds.least, most = bounds.most;
              ASSERT_GE(actual, least) << where << " t=" << t << " r=" << r << " quotient " << quotient;
              ASSERT_LE(actual, most) << where << " t=" << t << " r=" << r << " quotient " << quotient;
              if (same_range) {
                ASSERT_LE(std::abs(actual - expected), std::max(1.0, most - least))
                    << where << " t=" << t << " r=" << r << " cpu code " << expected << " quotient " << quotient;
              }
            }
          }
        }
      }
    }
  }
  ASSERT_GT(codes_checked, 20000);
  ASSERT_GT(centroids_checked, 1000);
  // FMA vs separate roundings moves a coefficient by ~1e-7 relative: a bfloat16 range flips in
  // well under 1% of the cases, a code (a quotient within ~1e-6 of .5, or a flipped range) too.
  EXPECT_GE(ranges_equal * 100, ranges_checked * 99) << ranges_equal << " of " << ranges_checked << " ranges equal";
  EXPECT_GE(codes_equal * 100, codes_checked * 99) << codes_equal << " of " << codes_checked << " codes equal";
}

// Append after new tokens (params.h: first_block names a block; the sketch blocks from the one
// holding it to the last valid one are written, each rebuilt from all its tokens): on top of a
// build of the old lengths it must reproduce the full build of the new lengths bit for bit; on a
// poisoned sketch every other byte keeps the poison.
TEST(CudaKeySketch, AppendIsBitIdenticalToFullBuildAndWritesOnlyItsSketchBlocks) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 6, heads = 2;
  for (const BuildCase& c : build_cases()) {
    SCOPED_TRACE(describe(c));
    const int R = c.rank, bs = c.block_size, P = c.per, sb = bs * P, D = c.head_dim;
    const int num_blocks = sketch_capacity(c.max_len, bs, P, 2);
    const int num_sketches = num_blocks / P;
    TestKV kv(c.dtype, c.kind, batch, heads, D, bs, num_blocks, rng);
    const std::vector<float> key_proj = random_proj(heads, D, R, rng, 0.3);
    const std::vector<int32_t> new_lens = sketch_lengths(batch, c.max_len, bs, sb, rng);
    std::vector<int32_t> old_lens(batch), first(batch);
    for (int b = 0; b < batch; ++b) {
      old_lens[b] = std::uniform_int_distribution<int32_t>(0, new_lens[b])(rng);
      first[b] = old_lens[b] / bs;  // the block holding the old end: mid sketch block when P > 1
    }
    // Past the last sketch block: nothing to write. The first block after the last valid one: its
    // sketch block is the last valid one when the valid blocks do not fill it (P > 1).
    first[1] = test::blocks_of(new_lens[1], sb) * P + (c.rank % 4 == 0);
    first[2] = test::blocks_of(new_lens[2], bs);
    kv.poison_after(new_lens);
    const DeviceKeys keys(kv, key_proj);

    SketchBuffers full = new_sketch(kv, R, P);
    run_cuda_sketch(kv, keys, new_lens, nullptr, full);
    SketchBuffers appended = new_sketch(kv, R, P);
    run_cuda_sketch(kv, keys, old_lens, nullptr, appended);
    std::vector<int32_t> catch_up = first;
    catch_up[1] = old_lens[1] / bs;  // every sequence must reach its new length here
    catch_up[2] = old_lens[2] / bs;
    run_cuda_sketch(kv, keys, new_lens, &catch_up, appended);
    if (testing::Test::HasFatalFailure()) return;
    ASSERT_EQ(appended.codes, full.codes);
    ASSERT_EQ(appended.ranges, full.ranges);
    ASSERT_EQ(appended.centroid, full.centroid);

    SketchBuffers alone = new_sketch(kv, R, P);
    run_cuda_sketch(kv, keys, new_lens, &first, alone);
    if (testing::Test::HasFatalFailure()) return;
    const int code_bytes = sb * R / 2;  // of a sketch block
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int m = 0; m < num_sketches; ++m) {
          const bool written = m >= first[b] / P && m < test::blocks_of(new_lens[b], sb);
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " sketch block " +
                                    std::to_string(m) + " first=" + std::to_string(first[b]) + " len=" +
                                    std::to_string(new_lens[b]);
          const uint8_t* a_codes = alone.block_codes(b, h, static_cast<int64_t>(m) * P);
          const uint8_t* f_codes = full.block_codes(b, h, static_cast<int64_t>(m) * P);
          for (int i = 0; i < code_bytes; ++i) ASSERT_EQ(a_codes[i], written ? f_codes[i] : 0xAB) << where;
          for (int i = 0; i < 2 * R; ++i) {
            ASSERT_EQ(alone.sketch_ranges(b, h, m)[i], written ? full.sketch_ranges(b, h, m)[i] : 0xABAB) << where;
          }
          for (int i = 0; i < D; ++i) {
            ASSERT_EQ(alone.sketch_centroid(b, h, m)[i], written ? full.sketch_centroid(b, h, m)[i] : 0xABAB) << where;
          }
        }
      }
    }
  }
}

// Argument checks of the build: P a power of two in 1..8 dividing num_blocks with P * bs <= 128,
// and a centroid buffer. The same arguments with a valid P build (the control).
TEST(CudaKeySketch, RejectsInvalidBlocksPerSketch) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(7);
  const int bs = 16, R = 4, D = 64, num_blocks = 8;
  TestKV kv(DType::kBFloat16, KVKind::kContiguous, 1, 1, D, bs, num_blocks, rng);
  const std::vector<float> key_proj = random_proj(1, D, R, rng, 0.1);
  const std::vector<int32_t> lens = {77};
  SketchBuffers sketch = new_sketch(kv, R, 1);  // sized for P = 1: large enough for every P
  const DeviceKeys keys(kv, key_proj);
  DeviceBytes d_lens(lens.data(), sizeof(int32_t));
  DeviceBytes d_codes(sketch.codes.size()), d_ranges(sketch.ranges.size() * 2), d_centroid(sketch.centroid.size() * 2);
  const KeySketchParams base =
      test::key_sketch_params(kv, kv.layout(keys.k.ptr, nullptr), d_lens.as<int32_t>(), keys.proj.as<float>(), R, 4,
                              d_codes.as<uint8_t>(), d_ranges.as<uint16_t>(), d_centroid.as<uint16_t>());
  ASSERT_CUDA(cuda::key_sketch(base, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  for (int per : {0, -2, 3, 6, 16}) {
    KeySketchParams p = base;
    p.blocks_per_sketch = per;
    EXPECT_EQ(cuda::key_sketch(p, nullptr), cudaErrorInvalidValue) << "P=" << per;
  }
  KeySketchParams p = base;
  p.num_blocks = 6;  // not a multiple of P = 4
  EXPECT_EQ(cuda::key_sketch(p, nullptr), cudaErrorInvalidValue);
  p = base;
  p.blocks_per_sketch = 8;
  p.block_size = 32;  // a sketch block of 256 tokens
  p.num_blocks = 8;
  EXPECT_EQ(cuda::key_sketch(p, nullptr), cudaErrorInvalidValue);
  p = base;
  p.sketch.centroid = nullptr;
  EXPECT_EQ(cuda::key_sketch(p, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// ---------------------------------------------------------------------------------------------
// qsketch scores.

struct SelectOutputs {
  std::vector<int32_t> selected, num_selected;
  std::vector<float> head_scores, head_mlo;
  explicit SelectOutputs(const RadarSelectParams& p)
      : selected(static_cast<size_t>(p.batch) * p.kv_heads * p.num_blocks, -7),
        num_selected(static_cast<size_t>(p.batch) * p.kv_heads, -7),
        head_scores(static_cast<size_t>(p.batch) * p.q_heads * p.num_blocks, test::float_nan()),
        head_mlo(static_cast<size_t>(p.batch) * p.q_heads, test::float_nan()) {}
};

// Host params of a qsketch topk selection; the sketch centroid is passed only when a != 0, so a
// kernel that reads it regardless faults, and the float32 block statistics never are.
RadarSelectParams sketch_select_params(const TestQuery& q, const TestKV& kv, const std::vector<int32_t>& lens,
                                       const SketchBuffers& sketch, const std::vector<float>& key_proj,
                                       const std::vector<float>& query_proj, float weight, GroupAgg agg) {
  RadarSelectParams p;
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = q.data.dtype;
  p.centroid = nullptr;
  p.sketch_codes = sketch.codes.data();
  p.sketch_ranges = sketch.ranges.data();
  p.sketch_centroid = weight != 0.0f ? sketch.centroid_data() : nullptr;
  p.sketch_key_proj = key_proj.data();
  p.sketch_query_proj = query_proj.data();
  p.sketch_rank = sketch.rank;
  p.blocks_per_sketch = sketch.blocks_per_sketch;
  p.centroid_weight = weight;
  p.seq_lens = lens.data();
  p.batch = kv.batch;
  p.q_heads = q.heads;
  p.kv_heads = kv.heads;
  p.head_dim = kv.head_dim;
  p.block_size = kv.block_size;
  p.num_blocks = kv.num_blocks;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(kv.head_dim)));
  p.score = Score::kSketch;
  p.policy = Policy::kTopK;
  p.group_agg = agg;
  p.budget_fraction = 0.3;
  return p;
}

// Device copies of every host input of `host` (sized exactly: ranges and centroid hold NB / P
// sketch blocks), poisoned outputs (0xA5 integers, 0xFF = NaN floats) and workspace; `params`
// points at them.
struct DeviceSelect {
  DeviceBytes q, codes, ranges, centroid, key_proj, query_proj, lens, selected, num_selected, scores, mlo;
  RadarSelectParams params;  // after the buffers it points at
  DeviceBytes workspace;     // sized from params
  static size_t sketches(const RadarSelectParams& p) {
    return static_cast<size_t>(p.batch) * p.kv_heads * (p.num_blocks / p.blocks_per_sketch);
  }
  DeviceSelect(const RadarSelectParams& host, size_t q_bytes, const SelectOutputs& out)
      : q(host.q, q_bytes),
        codes(host.sketch_codes, static_cast<size_t>(host.batch) * host.kv_heads * host.num_blocks * host.block_size *
                                     host.sketch_rank / 2),
        ranges(host.sketch_ranges, sketches(host) * 2 * host.sketch_rank * sizeof(uint16_t)),
        centroid(host.sketch_centroid, host.sketch_centroid ? sketches(host) * host.head_dim * sizeof(uint16_t) : 0),
        key_proj(host.sketch_key_proj, static_cast<size_t>(host.kv_heads) * host.head_dim * host.sketch_rank * sizeof(float)),
        query_proj(host.sketch_query_proj, static_cast<size_t>(host.q_heads) * host.head_dim * host.sketch_rank * sizeof(float)),
        lens(host.seq_lens, host.batch * sizeof(int32_t)),
        selected(out.selected.size() * 4),
        num_selected(out.num_selected.size() * 4),
        scores(out.head_scores.size() * 4),
        mlo(out.head_mlo.size() * 4),
        params(bind(host)),
        workspace(cuda::radar_select_workspace_bytes(params)) {
    cudaMemset(selected.ptr, 0xA5, selected.size);
    cudaMemset(num_selected.ptr, 0xA5, num_selected.size);
    cudaMemset(scores.ptr, 0xFF, scores.size);
    cudaMemset(mlo.ptr, 0xFF, mlo.size);
    cudaMemset(workspace.ptr, 0xFF, workspace.size);
  }
  RadarSelectParams bind(const RadarSelectParams& host) const {
    RadarSelectParams p = host;
    p.q = q.ptr;
    p.sketch_codes = codes.as<uint8_t>();
    p.sketch_ranges = ranges.as<uint16_t>();
    p.sketch_centroid = host.sketch_centroid ? centroid.as<uint16_t>() : nullptr;
    p.sketch_key_proj = key_proj.as<float>();
    p.sketch_query_proj = query_proj.as<float>();
    p.centroid = nullptr;
    p.seq_lens = lens.as<int32_t>();
    p.selected = selected.as<int32_t>();
    p.num_selected = num_selected.as<int32_t>();
    p.out_head_scores = scores.as<float>();
    p.out_head_mlo = mlo.as<float>();
    return p;
  }
};

void run_cuda_select(const RadarSelectParams& host, size_t q_bytes, SelectOutputs& out) {
  DeviceSelect d(host, q_bytes, out);
  ASSERT_NE(d.workspace.ptr, nullptr);
  ASSERT_CUDA(cudaGetLastError());
  ASSERT_CUDA(cuda::radar_select(d.params, d.workspace.ptr, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  d.selected.download(out.selected.data());
  d.num_selected.download(out.num_selected.data());
  d.scores.download(out.head_scores.data());
  d.mlo.download(out.head_mlo.data());
}

void run_cpu_select(const RadarSelectParams& host, SelectOutputs& out) {
  RadarSelectParams p = host;
  p.selected = out.selected.data();
  p.num_selected = out.num_selected.data();
  p.out_head_scores = out.head_scores.data();
  p.out_head_mlo = out.head_mlo.data();
  cpu::radar_select(p);
}

// Runs both backends on `p` (host pointers) and compares. The score tolerance is 2e-4 + 2e-5 x
// the larger of |score| and the block's logit magnitude scale * (sum_r |u|_r max(|lo_r|, |hi_r|)
// + |a| sum_d (|q_d| + sum_r |kp_dr| |u|_r) |c_d|), |u|_r = sum_d |qp_dr q_d|: float32 dot
// products over D + R terms err by ~1e-5 of that magnitude at worst, which a logit that cancels
// to near 0 (large u, mixed signs) would not see in |score|.
void expect_cuda_matches_cpu(const RadarSelectParams& p, const TestQuery& q, const SketchBuffers& sketch,
                             const std::vector<int32_t>& lens) {
  SelectOutputs cpu_out(p), cuda_out(p);
  run_cpu_select(p, cpu_out);
  run_cuda_select(p, q.data.size_bytes(), cuda_out);
  if (testing::Test::HasFatalFailure()) return;
  const int G = p.q_heads / p.kv_heads, D = p.head_dim, R = p.sketch_rank, NB = p.num_blocks;
  const double a = p.centroid_weight;
  for (int b = 0; b < p.batch; ++b) {
    const int32_t n_blocks = std::min(test::blocks_of(lens[b], p.block_size), NB);
    for (int hq = 0; hq < p.q_heads; ++hq) {
      const int h = hq / G;
      const std::vector<double> qv = q.row(b, hq);
      const float* query_proj = p.sketch_query_proj + static_cast<size_t>(hq) * D * R;
      const float* key_proj = p.sketch_key_proj + static_cast<size_t>(h) * D * R;
      std::vector<double> u_abs(R, 0.0), rest_abs(D, 0.0);
      for (int d = 0; d < D; ++d) {
        for (int r = 0; r < R; ++r) u_abs[r] += std::fabs(query_proj[d * R + r] * qv[d]);
      }
      for (int d = 0; d < D; ++d) {
        rest_abs[d] = std::fabs(qv[d]);
        for (int r = 0; r < R; ++r) rest_abs[d] += std::fabs(key_proj[d * R + r]) * u_abs[r];
      }
      const int64_t row = static_cast<int64_t>(b) * p.q_heads + hq;
      ASSERT_EQ(cuda_out.head_mlo[row], kNegInf) << "qsketch has no M_g: b=" << b << " head=" << hq;
      for (int j = 0; j < NB; ++j) {
        const float expected = cpu_out.head_scores[row * NB + j];
        const float actual = cuda_out.head_scores[row * NB + j];
        const std::string where = "b=" + std::to_string(b) + " head=" + std::to_string(hq) + " block " +
                                  std::to_string(j) + " len=" + std::to_string(lens[b]);
        if (j >= n_blocks) {
          ASSERT_EQ(expected, kNegInf) << where;
          ASSERT_EQ(actual, kNegInf) << where;
          continue;
        }
        ASSERT_TRUE(std::isfinite(expected)) << where << " cpu " << expected;
        ASSERT_TRUE(std::isfinite(actual)) << where << " cuda " << actual << " cpu " << expected;
        const uint16_t* ranges = sketch.block_ranges(b, h, j);  // of its sketch block j / P
        double magnitude = 0.0;
        for (int r = 0; r < R; ++r) {
          magnitude += u_abs[r] * std::max(std::fabs(test::decode_bf16(ranges[r])), std::fabs(test::decode_bf16(ranges[R + r])));
        }
        if (a != 0.0) {
          const std::vector<float> centroid = sketch.block_centroid(b, h, j);
          for (int d = 0; d < D; ++d) magnitude += std::fabs(a) * rest_abs[d] * std::fabs(centroid[d]);
        }
        magnitude *= p.scale;
        const double tolerance = 2e-4 + 2e-5 * std::max<double>(std::fabs(expected), magnitude);
        ASSERT_NEAR(actual, expected, tolerance) << where << " logit magnitude " << magnitude;
      }
    }
  }
  // Selection: the CPU rules applied to the CUDA scores must pick exactly the CUDA rows (topk is
  // a deterministic function of the float32 per-head scores, for both group aggregations).
  RadarSelectParams given = p;
  given.in_head_scores = cuda_out.head_scores.data();
  SelectOutputs from_cuda_scores(p);
  run_cpu_select(given, from_cuda_scores);
  ASSERT_EQ(cuda_out.num_selected, from_cuda_scores.num_selected);
  ASSERT_EQ(cuda_out.selected, from_cuda_scores.selected);
}

// Groups of 1, 3, 4, 8 query heads (one-head, two-head and wide tiles), centroid weight 0 and
// 0.5, max and sum aggregation over one sketch: the CUDA scores and selection match the CPU's.
void expect_every_group_matches_cpu(const TestKV& kv, const std::vector<int32_t>& lens, const SketchBuffers& sketch,
                                    const std::vector<float>& key_proj, const std::string& where,
                                    std::mt19937_64& rng) {
  const int D = kv.head_dim, R = sketch.rank;
  for (int G : {1, 3, 4, 8}) {
    TestQuery q(kv.dtype, kv.batch, G * kv.heads, D);
    q.fill_normal(rng);
    const std::vector<float> query_proj = random_proj(G * kv.heads, D, R, rng, 2.0 / std::sqrt(D));
    for (float weight : {0.0f, 0.5f}) {
      for (GroupAgg agg : {GroupAgg::kMax, GroupAgg::kSum}) {
        SCOPED_TRACE(where + " G=" + std::to_string(G) + " a=" + std::to_string(weight) + " agg=" +
                     (agg == GroupAgg::kSum ? "sum" : "max"));
        const RadarSelectParams p = sketch_select_params(q, kv, lens, sketch, key_proj, query_proj, weight, agg);
        expect_cuda_matches_cpu(p, q, sketch, lens);
        if (testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

TEST(CudaSketchScore, ScoresMatchCpuAndSelectionFollowsThem) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 5, kv_heads = 2;  // lengths max_len (partial last block), 0, 1, bs, bs + 1
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  int shape = 0;
  for (int bs : {16, 128}) {
    for (int D : {64, 128}) {
      for (int R : {2, 4, 8, 16}) {
        const DType dtype = dtypes[shape % 3];
        const KVKind kind = shape % 2 ? KVKind::kPaged : KVKind::kContiguous;  // only the CPU build reads keys
        ++shape;
        const int32_t max_len = bs == 16 ? 16 * 23 + 5 : 128 * 5 + 37;
        const int num_blocks = test::blocks_of(max_len, bs) + 1;
        TestKV kv(dtype, kind, batch, kv_heads, D, bs, num_blocks, rng);
        const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng);
        const std::vector<float> key_proj = random_proj(kv_heads, D, R, rng, 1.0 / std::sqrt(D));
        const SketchBuffers sketch = cpu_sketch(kv, lens, key_proj, R, 1);
        expect_every_group_matches_cpu(kv, lens, sketch, key_proj,
                                       std::string(test::dtype_name(dtype)) + " " + test::kv_kind_name(kind) +
                                           " bs=" + std::to_string(bs) + " D=" + std::to_string(D) + " R=" +
                                           std::to_string(R),
                                       rng);
        if (testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

// Sketch blocks of P = 2, 4, 8 blocks: a warp's span of 8 blocks stages the ranges and centroids
// of 8 / P sketch blocks, and block j must read those of j / P. Lengths end inside a sketch block
// (some of its blocks valid, the last one partial) and inside a span; every head_dim, groups of
// 1, 3, 4, 8 (one-head, two-head and wide tiles), centroid weight 0 and 0.5.
TEST(CudaSketchScore, SketchBlocksMatchCpuForEveryHeadDim) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 7, kv_heads = 2;
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  const int ranks[] = {2, 4, 8, 16};
  const int shapes[][2] = {{16, 2}, {16, 4}, {32, 4}, {64, 2}, {16, 8}};  // (block_size, P)
  int shape = 0;
  for (const auto& s : shapes) {
    for (int D : {64, 128, 256}) {
      const int bs = s[0], P = s[1], sb = bs * P, R = ranks[shape % 4];
      const DType dtype = dtypes[shape % 3];
      const KVKind kind = static_cast<KVKind>(shape % 3);  // only the CPU build reads keys
      ++shape;
      // 11 whole sketch blocks, then one whole block and a partial one: the last sketch block is
      // partial whenever P > 2, and the block count is no multiple of the span of 8.
      const int32_t max_len = sb * 11 + bs + 5;
      const int num_blocks = sketch_capacity(max_len, bs, P, 1);
      TestKV kv(dtype, kind, batch, kv_heads, D, bs, num_blocks, rng);
      const std::vector<int32_t> lens = sketch_lengths(batch, max_len, bs, sb, rng);
      const std::vector<float> key_proj = random_proj(kv_heads, D, R, rng, 1.0 / std::sqrt(D));
      const SketchBuffers sketch = cpu_sketch(kv, lens, key_proj, R, P);
      expect_every_group_matches_cpu(kv, lens, sketch, key_proj,
                                     std::string(test::dtype_name(dtype)) + " " + test::kv_kind_name(kind) + " bs=" +
                                         std::to_string(bs) + " P=" + std::to_string(P) + " D=" + std::to_string(D) +
                                         " R=" + std::to_string(R),
                                     rng);
      if (testing::Test::HasFatalFailure()) return;
    }
  }
}

// Argument checks of the score: P a power of two in 1..8 dividing num_blocks with P * bs <= 128,
// the bf16 sketch centroid (not the float32 block centroid) when a != 0, 16-byte aligned. The
// same arguments with a valid P select (the control).
TEST(CudaSketchScore, RejectsInvalidBlocksPerSketch) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937_64 rng(11);
  const int batch = 2, kv_heads = 2, G = 2, bs = 16, D = 64, R = 8, P = 4;
  const int num_blocks = sketch_capacity(200, bs, P, 1);
  TestKV kv(DType::kBFloat16, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng);
  const std::vector<int32_t> lens = {200, 77};
  const std::vector<float> key_proj = random_proj(kv_heads, D, R, rng, 1.0 / std::sqrt(D));
  const SketchBuffers sketch = cpu_sketch(kv, lens, key_proj, R, P);
  TestQuery q(DType::kBFloat16, batch, G * kv_heads, D);
  q.fill_normal(rng);
  const std::vector<float> query_proj = random_proj(G * kv_heads, D, R, rng, 1.0 / std::sqrt(D));
  const RadarSelectParams host = sketch_select_params(q, kv, lens, sketch, key_proj, query_proj, 0.5f, GroupAgg::kMax);
  SelectOutputs out(host);
  DeviceSelect d(host, q.data.size_bytes(), out);
  ASSERT_CUDA(cuda::radar_select(d.params, d.workspace.ptr, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto status = [&](const RadarSelectParams& p) { return cuda::radar_select(p, d.workspace.ptr, nullptr); };
  for (int per : {0, -4, 3, 6, 16}) {
    RadarSelectParams p = d.params;
    p.blocks_per_sketch = per;
    EXPECT_EQ(status(p), cudaErrorInvalidValue) << "P=" << per;
  }
  RadarSelectParams p = d.params;
  p.num_blocks = num_blocks - 2;  // not a multiple of P
  EXPECT_EQ(status(p), cudaErrorInvalidValue);
  p = d.params;
  p.blocks_per_sketch = 8;
  p.block_size = 32;  // a sketch block of 256 tokens
  p.num_blocks = 16;  // a multiple of 8
  EXPECT_EQ(status(p), cudaErrorInvalidValue);
  p = d.params;
  p.sketch_centroid = nullptr;  // a != 0 needs the sketch centroid ...
  p.centroid = reinterpret_cast<const float*>(d.scores.ptr);  // ... the float32 block centroid does not do
  EXPECT_EQ(status(p), cudaErrorInvalidValue);
  p = d.params;
  p.sketch_centroid = d.params.sketch_centroid + 1;  // read as 16-byte vectors
  EXPECT_EQ(status(p), cudaErrorInvalidValue);
  p = d.params;
  p.centroid_weight = 0.0f;  // the centroid is not read at a = 0
  p.sketch_centroid = nullptr;
  EXPECT_EQ(status(p), cudaSuccess);
  ASSERT_CUDA(cudaDeviceSynchronize());
}

// Large logits: queries scaled by up to 200 put the kernel's bound (every coefficient at its most
// favourable code) hundreds of log2 units above the block's largest logit, so every 2^(x - bound)
// underflows and the kernel rescans against the true maximum. Every third sketch block (of 64
// tokens: one block at P = 1, two at P = 2) holds one key repeated (lo == hi, step 0, codes 0:
// all its logits are equal and the bound is exact).
TEST(CudaSketchScore, LargeLogitsAndConstantBlocksMatchCpu) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 4, kv_heads = 2, sb = 64;
  const int32_t max_len = sb * 9 + 17;
  int64_t fallback_blocks = 0, direct_blocks = 0, constant_blocks = 0;
  for (int P : {1, 2}) {
    const int bs = sb / P;
    const int num_blocks = sketch_capacity(max_len, bs, P, 1);
    for (int D : {64, 128}) {
      for (int R : {8, 16}) {
        TestKV kv(DType::kBFloat16, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng);
        for (int b = 0; b < batch; ++b) {
          for (int h = 0; h < kv_heads; ++h) {
            for (int m = 1; m < num_blocks / P; m += 3) {
              for (int t = m * sb + 1; t < (m + 1) * sb; ++t) {
                for (int i = 0; i < D; ++i) kv.data.set(kv.offset(b, h, t) + i, kv.at(b, h, m * sb, i));
              }
            }
          }
        }
        const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, sb, rng);
        const std::vector<float> key_proj = random_proj(kv_heads, D, R, rng, 1.0 / std::sqrt(D));
        const SketchBuffers sketch = cpu_sketch(kv, lens, key_proj, R, P);
        for (int b = 0; b < batch; ++b) {  // the repeated key gives exactly equal coefficients
          for (int h = 0; h < kv_heads; ++h) {
            for (int m = 1; m < test::blocks_of(lens[b], sb); m += 3) {
              const uint16_t* ranges = sketch.sketch_ranges(b, h, m);
              for (int r = 0; r < R; ++r) ASSERT_EQ(ranges[r], ranges[R + r]) << "b=" << b << " h=" << h << " m=" << m;
              ++constant_blocks;
            }
          }
        }
        for (int G : {3, 4}) {  // an odd group takes the one-head tile, 4 the wide tile
          for (double q_scale : {1.0, 30.0, 200.0}) {
            TestQuery q(DType::kBFloat16, batch, G * kv_heads, D);
            q.fill_normal(rng, q_scale);
            const std::vector<float> query_proj = random_proj(G * kv_heads, D, R, rng, 1.0 / std::sqrt(D));
            for (float weight : {0.0f, 0.5f}) {
              const GroupAgg agg = weight == 0.0f ? GroupAgg::kMax : GroupAgg::kSum;
              SCOPED_TRACE("P=" + std::to_string(P) + " D=" + std::to_string(D) + " R=" + std::to_string(R) + " G=" +
                           std::to_string(G) + " q x" + std::to_string(q_scale) + " a=" + std::to_string(weight));
              const RadarSelectParams p = sketch_select_params(q, kv, lens, sketch, key_proj, query_proj, weight, agg);
              expect_cuda_matches_cpu(p, q, sketch, lens);
              if (testing::Test::HasFatalFailure()) return;
              if (weight != 0.0f) continue;  // the centroid term shifts bound and logits alike
              // Which path the kernel took, from exact u: the gap (log2 units) between the bound and
              // the largest x_t is min_t sum_r |w_r| (w_r > 0 ? 15 - code : code), w_r = s log2(e) u_r
              // step_r. Above 100 + log2(bs) every term is below 2^-100: the fallback runs.
              for (int b = 0; b < batch; ++b) {
                const int32_t n_blocks = test::blocks_of(lens[b], bs);
                for (int hq = 0; hq < p.q_heads; ++hq) {
                  const int h = hq / G;
                  const std::vector<double> qv = q.row(b, hq);
                  std::vector<double> u(R, 0.0);
                  for (int d = 0; d < D; ++d) {
                    for (int r = 0; r < R; ++r) u[r] += query_proj[(static_cast<size_t>(hq) * D + d) * R + r] * qv[d];
                  }
                  for (int j = 0; j < n_blocks; ++j) {
                    const int n = std::min(lens[b], (j + 1) * bs) - j * bs;
                    const uint16_t* ranges = sketch.block_ranges(b, h, j);  // of sketch block j / P
                    double gap = test::kInf;
                    for (int t = 0; t < n; ++t) {
                      double deficit = 0.0;
                      for (int r = 0; r < R; ++r) {
                        const double w = p.scale * kLog2e * u[r] * test::sketch_step_of(ranges[r], ranges[R + r]);
                        const int code = sketch.code(b, h, j, t, r);
                        deficit += std::fabs(w) * (w > 0.0 ? 15 - code : code);
                      }
                      gap = std::min(gap, deficit);
                    }
                    fallback_blocks += gap > 110.0;
                    direct_blocks += gap < 90.0;
                  }
                }
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(fallback_blocks, 100) << "the underflow fallback was barely exercised";
  EXPECT_GT(direct_blocks, 100);
  EXPECT_GT(constant_blocks, 0);
}

}  // namespace
}  // namespace aether
