// aether::cpu::key_sketch: bit-for-bit against a brute-force build on inputs whose coefficients
// are exact, within the rounding of the float32 coefficients on random inputs, hand-worked
// blocks (ties, bfloat16 rounding, packing, sketch blocks of several blocks), the centroid
// against a naive float32 sum, append == full build and paged == contiguous, for
// P = blocks_per_sketch 1, 2, 4 and 8.
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "aether/cpu/common.h"
#include "aether/cpu/kernels.h"
#include "test_util.h"

namespace aether {
namespace {

using test::KVKind;
using test::SketchBuffers;
using test::TestKV;

struct SketchCase {
  DType dtype;
  KVKind kind;
  int batch, heads, head_dim, block_size, rank;
  int32_t max_len;
  int per;  // P = blocks_per_sketch
};

std::string describe(const SketchCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) + " B=" +
         std::to_string(c.batch) + " H=" + std::to_string(c.heads) + " D=" + std::to_string(c.head_dim) +
         " bs=" + std::to_string(c.block_size) + " R=" + std::to_string(c.rank) +
         " max_len=" + std::to_string(c.max_len) + " P=" + std::to_string(c.per);
}

std::vector<SketchCase> sketch_cases() {
  std::vector<SketchCase> cases;
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const KVKind kinds[] = {KVKind::kContiguous, KVKind::kTokenMajor, KVKind::kPaged};
  // (head_dim, block_size, max_len): lengths that are not multiples of the block size (or of
  // the sketch block size P * block_size) too.
  const int shapes[][3] = {{64, 16, 97}, {40, 64, 130}, {64, 64, 1}, {40, 16, 16}};
  const int ranks[] = {2, 8, 16};
  int n = 0;
  for (DType dtype : dtypes) {
    for (KVKind kind : kinds) {
      for (const auto& shape : shapes) {
        for (int per : {1, 2, 4, 8}) {
          if (shape[1] * per > 128) continue;  // P * block_size <= 128
          const int batch = 1 + (n % 4) * 2;
          const int heads = 1 + (n % 2);
          cases.push_back({dtype, kind, batch, heads, shape[0], shape[1], ranks[n % 3], shape[2], per});
          ++n;
        }
      }
    }
  }
  return cases;
}

// Capacity in blocks: a multiple of P with at least one whole spare sketch block, so the zero
// fill past the end is exercised for every length.
int capacity_of(const SketchCase& c, int spare_sketches = 1) {
  return (test::blocks_of(c.max_len, c.block_size * c.per) + spare_sketches) * c.per;
}

// Lengths with the sketch-block edges too: one full sketch block, one token into the next.
std::vector<int32_t> sketch_lengths(const SketchCase& c, std::mt19937_64& rng) {
  const int32_t sb = c.block_size * c.per;
  return test::mixed_lengths(c.batch, c.max_len, c.block_size, rng, {sb, sb + 1});
}

KeySketchParams make_params(const TestKV& kv, const std::vector<int32_t>& lens, const std::vector<float>& key_proj,
                            int rank, SketchBuffers& out) {
  return test::key_sketch_params(kv, lens, key_proj, rank, out);
}

// Small-integer keys and power-of-two projections: every coefficient is exact in float32.
void make_exact(TestKV& kv, std::vector<float>& key_proj, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> key(-8, 8), entry(0, 8);
  const float entries[] = {0.0f, 0.25f, -0.25f, 0.5f, -0.5f, 1.0f, -1.0f, 2.0f, -2.0f};
  for (auto& value : key_proj) value = entries[entry(rng)];
  const int64_t S = static_cast<int64_t>(kv.num_blocks) * kv.block_size;
  for (int b = 0; b < kv.batch; ++b) {
    for (int h = 0; h < kv.heads; ++h) {
      for (int64_t t = 0; t < S; ++t) {
        for (int i = 0; i < kv.head_dim; ++i) kv.data.set(kv.offset(b, h, t) + i, key(rng));
      }
    }
  }
}

TEST(CpuKeySketch, ExactCoefficientsMatchBruteForceBitForBit) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int64_t ties = 0;  // tokens whose (x - lo) / step is exactly k + 0.5: ties to even were tested
  for (const SketchCase& c : sketch_cases()) {
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c);
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    std::vector<float> key_proj(static_cast<size_t>(c.heads) * c.head_dim * c.rank);
    make_exact(kv, key_proj, rng);
    const std::vector<int32_t> lens = sketch_lengths(c, rng);
    kv.poison_after(lens);  // a kernel reading past the end sees NaN

    SketchBuffers out(c.batch, c.heads, num_blocks, c.block_size, c.rank, c.head_dim, c.per);
    out.poison();
    cpu::key_sketch(make_params(kv, lens, key_proj, c.rank, out));
    const SketchBuffers expected = test::naive_key_sketch(kv, key_proj, c.rank, lens, c.per);
    ASSERT_EQ(out.ranges, expected.ranges);
    ASSERT_EQ(out.codes, expected.codes);
    ASSERT_EQ(out.centroid, expected.centroid);

    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int j = 0; j < test::blocks_of(lens[b], c.block_size); ++j) {
          const uint16_t* ranges = out.block_ranges(b, h, j);
          for (int t = j * c.block_size; t < std::min(lens[b], (j + 1) * c.block_size); ++t) {
            const std::vector<double> x = test::sketch_coefficients(kv, key_proj, c.rank, b, h, t);
            for (int r = 0; r < c.rank; ++r) {
              const double step = test::sketch_step_of(ranges[r], ranges[c.rank + r]);
              const double quotient = (x[r] - test::decode_bf16(ranges[r])) / step;
              if (step > 0 && quotient - std::floor(quotient) == 0.5) ++ties;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(ties, 0) << "no exact .5 quotient: round-half-to-even was never exercised";
}

TEST(CpuKeySketch, RandomInputsMatchBruteForceWithinRounding) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int64_t codes_checked = 0, codes_loose = 0, centroids_checked = 0;
  for (const SketchCase& c : sketch_cases()) {
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c);
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    std::vector<float> key_proj(static_cast<size_t>(c.heads) * c.head_dim * c.rank);
    std::normal_distribution<double> normal(0.0, 1.0 / std::sqrt(static_cast<double>(c.head_dim)));
    for (auto& value : key_proj) value = static_cast<float>(normal(rng));
    const std::vector<int32_t> lens = sketch_lengths(c, rng);
    kv.poison_after(lens);

    SketchBuffers out(c.batch, c.heads, num_blocks, c.block_size, c.rank, c.head_dim, c.per);
    out.poison();
    cpu::key_sketch(make_params(kv, lens, key_proj, c.rank, out));

    const int bs = c.block_size, sb = bs * c.per;
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int m = 0; m < out.num_sketches(); ++m) {
          const uint16_t* ranges = out.sketch_ranges(b, h, m);
          const uint16_t* centroid = out.sketch_centroid(b, h, m);
          const int t0 = m * sb;
          const int n = std::clamp(lens[b] - t0, 0, sb);  // valid tokens of the sketch block
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " m=" + std::to_string(m);
          // Token t of the sketch block: block m * P + t / bs, slot t % bs.
          const auto code_at = [&](int t, int r) { return out.code(b, h, m * c.per + t / bs, t % bs, r); };
          if (n == 0) {  // past the end: zero ranges and centroid
            for (int r = 0; r < 2 * c.rank; ++r) ASSERT_EQ(ranges[r], 0) << where;
            for (int d = 0; d < c.head_dim; ++d) ASSERT_EQ(centroid[d], 0) << where;
          }
          for (int t = n; t < sb; ++t) {  // invalid slots, whole blocks past the end too: code 0
            for (int r = 0; r < c.rank; ++r) ASSERT_EQ(code_at(t, r), 0) << where << " t=" << t;
          }
          if (n == 0) continue;

          // Centroid: bit for bit the naive float32 token-order mean, and within one bfloat16
          // rounding (plus the float32 sum's error) of the exact mean.
          const std::vector<uint16_t> naive = test::naive_sketch_centroid(kv, b, h, t0, t0 + n);
          for (int d = 0; d < c.head_dim; ++d) {
            ASSERT_EQ(centroid[d], naive[d]) << where << " d=" << d;
            double sum = 0.0, magnitude = 0.0;
            for (int t = t0; t < t0 + n; ++t) {
              sum += kv.at(b, h, t, d);
              magnitude += std::fabs(kv.at(b, h, t, d));
            }
            const double mean = sum / n, got = test::decode_bf16(centroid[d]);
            const double tolerance = std::ldexp(1.0, -8) * std::fabs(got) + (n + 2) * std::ldexp(1.0, -24) * magnitude / n;
            ASSERT_NEAR(got, mean, tolerance) << where << " d=" << d;
            ++centroids_checked;
          }

          std::vector<std::vector<double>> x;
          std::vector<double> error;
          for (int t = 0; t < n; ++t) {
            double e = 0.0;
            x.push_back(test::sketch_coefficients(kv, key_proj, c.rank, b, h, t0 + t, &e));
            error.push_back(e);
          }
          const double worst_error = *std::max_element(error.begin(), error.end());
          for (int r = 0; r < c.rank; ++r) {
            double low = test::kInf, high = -test::kInf;
            for (int t = 0; t < n; ++t) {
              low = std::min(low, x[t][r]);
              high = std::max(high, x[t][r]);
            }
            // The kernel's float32 min lies within worst_error of the exact one; its bfloat16
            // rounding may then differ only where that interval straddles a midpoint.
            const auto rounds_from = [&](double value, uint16_t bits) {
              const uint16_t a = test::encode_bf16_exact(test::round_to_bf16(value - worst_error));
              const uint16_t z = test::encode_bf16_exact(test::round_to_bf16(value + worst_error));
              const double got = test::decode_bf16(bits);
              return got >= test::decode_bf16(a) && got <= test::decode_bf16(z);
            };
            ASSERT_TRUE(rounds_from(low, ranges[r])) << where << " r=" << r << " lo " << test::decode_bf16(ranges[r])
                                                     << " vs min " << low;
            ASSERT_TRUE(rounds_from(high, ranges[c.rank + r]))
                << where << " r=" << r << " hi " << test::decode_bf16(ranges[c.rank + r]) << " vs max " << high;

            // Codes from the kernel's own range: rint of the quotient, or a neighbour only when the
            // quotient is within 1e-4 (plus the coefficient's float32 error) of a .5 boundary.
            const double lo = test::decode_bf16(ranges[r]);
            const double step = test::sketch_step_of(ranges[r], ranges[c.rank + r]);
            for (int t = 0; t < n; ++t) {
              const int actual = code_at(t, r);
              if (!(step > 0.0)) {  // one token, or a range below one bfloat16 ulp
                ASSERT_EQ(actual, 0) << where << " t=" << t << " r=" << r;
                continue;
              }
              const test::CodeBounds bounds = test::code_bounds(x[t][r], lo, step, error[t]);
              const double quotient = bounds.quotient, least = bounds.least, most = bounds.most;
              ASSERT_GE(actual, least) << where << " t=" << t << " r=" << r << " quotient " << quotient;
              ASSERT_LE(actual, most) << where << " t=" << t << " r=" << r << " quotient " << quotient;
              ++codes_checked;
              if (least != most) ++codes_loose;
            }
          }
        }
      }
    }
  }
  ASSERT_GT(codes_checked, 10000);
  ASSERT_GT(centroids_checked, 1000);
  EXPECT_LT(codes_loose * 100, codes_checked) << "the tolerance admits too many codes to test anything";
}

// Hand-worked: one head, D = 1, rank 2, key_proj = {1, -1}: x = (k, -k).
TEST(CpuKeySketch, HandWorkedBlocks) {
  std::mt19937_64 rng(1);
  const auto build = [&](const std::vector<double>& keys, int block_size, int num_blocks, int32_t len, int per = 1) {
    TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 1, block_size, num_blocks, rng);
    for (size_t t = 0; t < keys.size(); ++t) kv.data.set(kv.offset(0, 0, static_cast<int64_t>(t)), keys[t]);
    std::vector<int32_t> lens = {len};
    std::vector<float> key_proj = {1.0f, -1.0f};
    SketchBuffers out(1, 1, num_blocks, block_size, 2, 1, per);
    out.poison();
    cpu::key_sketch(make_params(kv, lens, key_proj, 2, out));
    return out;
  };
  // Keys 0..15: lo 0, hi 15, step 1, codes t and 15 - t; byte = code0 | code1 << 4.
  std::vector<double> ramp(16);
  for (int t = 0; t < 16; ++t) ramp[t] = t;
  SketchBuffers a = build(ramp, 16, 1, 16);
  for (int t = 0; t < 16; ++t) EXPECT_EQ(a.codes[t], t | ((15 - t) << 4)) << t;
  EXPECT_EQ(test::decode_bf16(a.ranges[0]), 0.0);
  EXPECT_EQ(test::decode_bf16(a.ranges[1]), -15.0);
  EXPECT_EQ(test::decode_bf16(a.ranges[2]), 15.0);
  EXPECT_EQ(test::decode_bf16(a.ranges[3]), -0.0);
  EXPECT_EQ(test::decode_bf16(a.centroid[0]), 7.5);  // mean of 0..15

  // Range 30, step 2: quotients 0.5 and 1.5 tie to 0 and 2; 2.5 to 2; 14.5 to 14.
  SketchBuffers b = build({0, 1, 3, 5, 29, 30}, 16, 1, 6);
  EXPECT_EQ(b.code(0, 0, 0, 1, 0), 0);
  EXPECT_EQ(b.code(0, 0, 0, 2, 0), 2);
  EXPECT_EQ(b.code(0, 0, 0, 3, 0), 2);
  EXPECT_EQ(b.code(0, 0, 0, 4, 0), 14);
  EXPECT_EQ(b.code(0, 0, 0, 5, 0), 15);
  // Coefficient 1 runs from -30 (lo) to 0: x = -29 is quotient 0.5 -> 0, x = -1 is 14.5 -> 14.
  EXPECT_EQ(b.code(0, 0, 0, 4, 1), 0);
  EXPECT_EQ(b.code(0, 0, 0, 1, 1), 14);
  for (int t = 6; t < 16; ++t) EXPECT_EQ(b.codes[t], 0) << "invalid slot " << t;

  // bfloat16 keeps 8 significant bits: 257 ties to 256 and 259 to 260 (even mantissas); the
  // rounded-up lo then lies above the smallest x, whose code clamps to 0.
  SketchBuffers c = build({257, 259, 300}, 16, 2, 3);
  EXPECT_EQ(test::decode_bf16(c.ranges[0]), 256.0);
  EXPECT_EQ(test::decode_bf16(c.ranges[2]), 300.0);
  EXPECT_EQ(test::decode_bf16(c.ranges[1]), -300.0);
  EXPECT_EQ(test::decode_bf16(c.ranges[3]), -256.0);
  SketchBuffers d = build({259, 300}, 16, 1, 2);
  EXPECT_EQ(test::decode_bf16(d.ranges[0]), 260.0);
  EXPECT_EQ(d.code(0, 0, 0, 0, 0), 0);  // (259 - 260) / (40 / 15) < 0: clamped
  EXPECT_EQ(d.code(0, 0, 0, 1, 0), 15);
  // The spare block of c (past the end) is all zeros in a full build.
  for (int t = 0; t < 16; ++t) EXPECT_EQ(c.codes[16 + t], 0);
  for (int r = 4; r < 8; ++r) EXPECT_EQ(c.ranges[r], 0);
  EXPECT_EQ(c.centroid[1], 0);
  // Centroid (257 + 259 + 300) / 3 = 272 exactly (a bfloat16); {259, 300}: 279.5 rounds to 280.
  EXPECT_EQ(test::decode_bf16(c.centroid[0]), 272.0);
  EXPECT_EQ(test::decode_bf16(d.centroid[0]), 280.0);

  // A constant coefficient: lo == hi, step 0, every code 0.
  SketchBuffers e = build({3, 3, 3}, 16, 1, 3);
  EXPECT_EQ(test::decode_bf16(e.ranges[0]), 3.0);
  EXPECT_EQ(test::decode_bf16(e.ranges[2]), 3.0);
  for (int t = 0; t < 16; ++t) EXPECT_EQ(e.codes[t], 0) << t;

  // P = 2: blocks 0 and 1 (keys 0..30, 31 tokens) share one range 0..30, step 2, so block 1's
  // codes are rint(k / 2) of that range (not 0..14 of its own 16..30), ties to even: 1 -> 0,
  // 3 -> 2, 17 -> 8, 19 -> 10. The centroid is the mean over both blocks, 15; slot 15 of block 1
  // is invalid (code 0); sketch block 1 (blocks 2, 3) lies past the end: zeros.
  std::vector<double> ramp31(31);
  for (int t = 0; t < 31; ++t) ramp31[t] = t;
  SketchBuffers f = build(ramp31, 16, 4, 31, 2);
  ASSERT_EQ(f.ranges.size(), 8u);
  EXPECT_EQ(test::decode_bf16(f.ranges[0]), 0.0);
  EXPECT_EQ(test::decode_bf16(f.ranges[2]), 30.0);
  EXPECT_EQ(test::decode_bf16(f.centroid[0]), 15.0);
  EXPECT_EQ(f.block_ranges(0, 0, 1), f.block_ranges(0, 0, 0));
  const int expected_codes[] = {0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 8};  // rint(t / 2), even ties
  for (int t = 0; t < 16; ++t) EXPECT_EQ(f.code(0, 0, 0, t, 0), expected_codes[t]) << t;
  // Key 16 + t: rint(8 + t / 2) = 8 + rint(t / 2), ties keep their parity.
  for (int t = 0; t < 15; ++t) EXPECT_EQ(f.code(0, 0, 1, t, 0), 8 + expected_codes[t]) << t;
  EXPECT_EQ(f.codes[31], 0) << "invalid slot 15 of block 1";
  for (int i = 32; i < 64; ++i) EXPECT_EQ(f.codes[i], 0) << "sketch block 1, byte " << i;
  for (int r = 4; r < 8; ++r) EXPECT_EQ(f.ranges[r], 0);
  EXPECT_EQ(f.centroid[1], 0);
}

// Append after new tokens (first_block = the block holding the old end, not necessarily the
// first of its sketch block) must reproduce the full build bit for bit, and write nothing
// outside the sketch blocks [first_block / P, ceil(len / (P * block_size))).
TEST(CpuKeySketch, AppendIsBitIdenticalToFullBuildAndWritesOnlyItsBlocks) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const SketchCase& c : sketch_cases()) {
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c, 2);
    const int sb = c.block_size * c.per;
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    std::vector<float> key_proj(static_cast<size_t>(c.heads) * c.head_dim * c.rank);
    std::normal_distribution<double> normal(0.0, 0.3);
    for (auto& value : key_proj) value = static_cast<float>(normal(rng));
    const std::vector<int32_t> new_lens = sketch_lengths(c, rng);
    std::vector<int32_t> old_lens(new_lens.size()), first_block(new_lens.size());
    for (size_t b = 0; b < new_lens.size(); ++b) {
      old_lens[b] = std::uniform_int_distribution<int32_t>(0, new_lens[b])(rng);
      first_block[b] = old_lens[b] / c.block_size;
    }
    kv.poison_after(new_lens);

    SketchBuffers full(c.batch, c.heads, num_blocks, c.block_size, c.rank, c.head_dim, c.per);
    full.poison();
    cpu::key_sketch(make_params(kv, new_lens, key_proj, c.rank, full));

    SketchBuffers appended(c.batch, c.heads, num_blocks, c.block_size, c.rank, c.head_dim, c.per);
    appended.poison();
    cpu::key_sketch(make_params(kv, old_lens, key_proj, c.rank, appended));
    KeySketchParams append = make_params(kv, new_lens, key_proj, c.rank, appended);
    append.first_block = first_block.data();
    cpu::key_sketch(append);
    ASSERT_EQ(appended.codes, full.codes);
    ASSERT_EQ(appended.ranges, full.ranges);
    ASSERT_EQ(appended.centroid, full.centroid);

    // Alone on a poisoned sketch: the listed sketch blocks (all P blocks of codes of each) equal
    // the full build, the others keep 0xAB.
    SketchBuffers alone(c.batch, c.heads, num_blocks, c.block_size, c.rank, c.head_dim, c.per);
    alone.poison();
    KeySketchParams only = make_params(kv, new_lens, key_proj, c.rank, alone);
    only.first_block = first_block.data();
    cpu::key_sketch(only);
    const int64_t code_bytes = static_cast<int64_t>(c.block_size) * (c.rank / 2);
    for (int b = 0; b < c.batch; ++b) {
      const auto written = [&](int m) { return m >= first_block[b] / c.per && m < test::blocks_of(new_lens[b], sb); };
      for (int h = 0; h < c.heads; ++h) {
        for (int j = 0; j < num_blocks; ++j) {
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " j=" + std::to_string(j);
          for (int64_t i = 0; i < code_bytes; ++i) {
            ASSERT_EQ(alone.block_codes(b, h, j)[i], written(j / c.per) ? full.block_codes(b, h, j)[i] : 0xAB) << where;
          }
        }
        for (int m = 0; m < alone.num_sketches(); ++m) {
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " m=" + std::to_string(m);
          for (int i = 0; i < 2 * c.rank; ++i) {
            ASSERT_EQ(alone.sketch_ranges(b, h, m)[i], written(m) ? full.sketch_ranges(b, h, m)[i] : 0xABAB) << where;
          }
          for (int d = 0; d < c.head_dim; ++d) {
            ASSERT_EQ(alone.sketch_centroid(b, h, m)[d], written(m) ? full.sketch_centroid(b, h, m)[d] : 0xABAB)
                << where;
          }
        }
      }
    }
  }
}

// The same keys in a paged cache (P different, shuffled pages per sketch block) and in a
// contiguous one give the same sketch, bit for bit.
TEST(CpuKeySketch, PagedIsBitIdenticalToContiguous) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const SketchCase& c : sketch_cases()) {
    if (c.kind != KVKind::kPaged) continue;
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c);
    TestKV paged(c.dtype, KVKind::kPaged, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    TestKV contiguous(c.dtype, KVKind::kContiguous, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int64_t t = 0; t < static_cast<int64_t>(num_blocks) * c.block_size; ++t) {
          for (int d = 0; d < c.head_dim; ++d) paged.data.set(paged.offset(b, h, t) + d, contiguous.at(b, h, t, d));
        }
      }
    }
    std::vector<float> key_proj(static_cast<size_t>(c.heads) * c.head_dim * c.rank);
    std::normal_distribution<double> normal(0.0, 0.3);
    for (auto& value : key_proj) value = static_cast<float>(normal(rng));
    const std::vector<int32_t> lens = sketch_lengths(c, rng);
    paged.poison_after(lens);
    contiguous.poison_after(lens);

    SketchBuffers from_paged(c.batch, c.heads, num_blocks, c.block_size, c.rank, c.head_dim, c.per);
    SketchBuffers from_contiguous(c.batch, c.heads, num_blocks, c.block_size, c.rank, c.head_dim, c.per);
    from_paged.poison();
    from_contiguous.poison();
    cpu::key_sketch(make_params(paged, lens, key_proj, c.rank, from_paged));
    cpu::key_sketch(make_params(contiguous, lens, key_proj, c.rank, from_contiguous));
    ASSERT_EQ(from_paged.codes, from_contiguous.codes);
    ASSERT_EQ(from_paged.ranges, from_contiguous.ranges);
    ASSERT_EQ(from_paged.centroid, from_contiguous.centroid);
  }
}

TEST(CpuKeySketch, RejectsValuesItCannotDispatch) {
  std::mt19937_64 rng(2);
  TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 8, 16, 4, rng);
  std::vector<int32_t> lens = {16};
  std::vector<float> key_proj(8 * 16, 0.5f);
  SketchBuffers out(1, 1, 4, 16, 16, 8);
  const KeySketchParams p = make_params(kv, lens, key_proj, 4, out);
  const auto message_of = [&](const KeySketchParams& params) {
    try {
      cpu::key_sketch(params);
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string("no exception");
  };
  EXPECT_EQ(message_of(p), "no exception");
  for (int rank : {0, 1, 3, 17, 18, -2}) {
    KeySketchParams bad = p;
    bad.rank = rank;
    EXPECT_NE(message_of(bad).find("rank " + std::to_string(rank)), std::string::npos) << message_of(bad);
  }
  KeySketchParams bad = p;
  bad.dtype = static_cast<DType>(5);
  EXPECT_NE(message_of(bad).find("dtype value 5"), std::string::npos) << message_of(bad);
  bad = p;
  bad.key_proj = nullptr;
  EXPECT_NE(message_of(bad).find("key_proj"), std::string::npos) << message_of(bad);
  bad = p;
  bad.sketch.ranges = nullptr;
  EXPECT_NE(message_of(bad).find("sketch.ranges"), std::string::npos) << message_of(bad);
  bad = p;
  bad.sketch.centroid = nullptr;
  EXPECT_NE(message_of(bad).find("sketch.centroid"), std::string::npos) << message_of(bad);

  // blocks_per_sketch: a power of two in 1..8 (num_blocks 4 and block_size 16 allow P = 1, 2, 4;
  // the buffers are large enough for any P here).
  for (int per : {1, 2, 4}) {
    bad = p;
    bad.blocks_per_sketch = per;
    EXPECT_EQ(message_of(bad), "no exception") << "P=" << per;
  }
  for (int per : {0, -1, -2, 3, 5, 6, 16}) {
    bad = p;
    bad.blocks_per_sketch = per;
    const std::string message = message_of(bad);
    EXPECT_NE(message.find("blocks_per_sketch " + std::to_string(per) + " (allowed: a power of two, 1..8)"),
              std::string::npos)
        << message;
  }
  bad = p;
  bad.blocks_per_sketch = 8;  // P * block_size = 128 is allowed, but num_blocks 4 is not a multiple
  EXPECT_NE(message_of(bad).find("num_blocks 4 is not a multiple of blocks_per_sketch 8"), std::string::npos)
      << message_of(bad);
  bad.num_blocks = 8;
  bad.seq_lens = lens.data();
  bad.batch = 0;  // nothing to write: the checks alone are under test
  EXPECT_EQ(message_of(bad), "no exception");
  bad = p;
  bad.num_blocks = 3;
  bad.blocks_per_sketch = 2;
  EXPECT_NE(message_of(bad).find("num_blocks 3 is not a multiple of blocks_per_sketch 2"), std::string::npos)
      << message_of(bad);
  bad = p;
  bad.block_size = 64;
  bad.blocks_per_sketch = 4;  // 256 tokens per sketch block
  EXPECT_NE(message_of(bad).find("block_size 64 * blocks_per_sketch 4 exceeds 128"), std::string::npos)
      << message_of(bad);
  bad.blocks_per_sketch = 2;  // 128: allowed
  bad.batch = 0;
  EXPECT_EQ(message_of(bad), "no exception");
}

}  // namespace
}  // namespace aether
