// aether::cpu::key_sketch: bit-for-bit against a brute-force build on inputs whose coefficients
// are exact, within the rounding of the float32 coefficients on random inputs, hand-worked
// blocks (ties, bfloat16 rounding, packing), and append == full build.
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
};

std::string describe(const SketchCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) + " B=" +
         std::to_string(c.batch) + " H=" + std::to_string(c.heads) + " D=" + std::to_string(c.head_dim) +
         " bs=" + std::to_string(c.block_size) + " R=" + std::to_string(c.rank) +
         " max_len=" + std::to_string(c.max_len);
}

std::vector<SketchCase> sketch_cases() {
  std::vector<SketchCase> cases;
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const KVKind kinds[] = {KVKind::kContiguous, KVKind::kTokenMajor, KVKind::kPaged};
  // (head_dim, block_size, max_len): lengths that are not multiples of the block size too.
  const int shapes[][3] = {{64, 16, 97}, {40, 64, 130}, {64, 64, 1}, {40, 16, 16}};
  const int ranks[] = {2, 8, 16};
  int n = 0;
  for (DType dtype : dtypes) {
    for (KVKind kind : kinds) {
      for (const auto& shape : shapes) {
        const int batch = 1 + (n % 3) * 2;
        const int heads = 1 + (n % 2);
        cases.push_back({dtype, kind, batch, heads, shape[0], shape[1], ranks[n % 3], shape[2]});
        ++n;
      }
    }
  }
  return cases;
}

KeySketchParams make_params(const TestKV& kv, const std::vector<int32_t>& lens, const std::vector<float>& key_proj,
                            int rank, SketchBuffers& out) {
  KeySketchParams p;
  p.k = kv.layout();
  p.dtype = kv.dtype;
  p.seq_lens = lens.data();
  p.key_proj = key_proj.data();
  p.batch = kv.batch;
  p.kv_heads = kv.heads;
  p.head_dim = kv.head_dim;
  p.block_size = kv.block_size;
  p.num_blocks = kv.num_blocks;
  p.rank = rank;
  p.sketch.codes = out.codes.data();
  p.sketch.ranges = out.ranges.data();
  return p;
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
    // One block of spare capacity so the zero fill past the end is exercised for every length.
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 1;
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    std::vector<float> key_proj(static_cast<size_t>(c.heads) * c.head_dim * c.rank);
    make_exact(kv, key_proj, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(c.batch, c.max_len, c.block_size, rng);
    kv.poison_after(lens);  // a kernel reading past the end sees NaN

    SketchBuffers out(c.batch, c.heads, num_blocks, c.block_size, c.rank);
    out.poison();
    cpu::key_sketch(make_params(kv, lens, key_proj, c.rank, out));
    const SketchBuffers expected = test::naive_key_sketch(kv, key_proj, c.rank, lens);
    ASSERT_EQ(out.ranges, expected.ranges);
    ASSERT_EQ(out.codes, expected.codes);

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
  int64_t codes_checked = 0, codes_loose = 0;
  for (const SketchCase& c : sketch_cases()) {
    SCOPED_TRACE(describe(c));
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 1;
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    std::vector<float> key_proj(static_cast<size_t>(c.heads) * c.head_dim * c.rank);
    std::normal_distribution<double> normal(0.0, 1.0 / std::sqrt(static_cast<double>(c.head_dim)));
    for (auto& value : key_proj) value = static_cast<float>(normal(rng));
    const std::vector<int32_t> lens = test::mixed_lengths(c.batch, c.max_len, c.block_size, rng);
    kv.poison_after(lens);

    SketchBuffers out(c.batch, c.heads, num_blocks, c.block_size, c.rank);
    out.poison();
    cpu::key_sketch(make_params(kv, lens, key_proj, c.rank, out));

    const int bytes = c.rank / 2;
    for (int b = 0; b < c.batch; ++b) {
      const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
      for (int h = 0; h < c.heads; ++h) {
        for (int j = 0; j < num_blocks; ++j) {
          const uint16_t* ranges = out.block_ranges(b, h, j);
          const uint8_t* codes = out.block_codes(b, h, j);
          const int t0 = j * c.block_size;
          const int n = j < n_blocks ? std::min(lens[b], t0 + c.block_size) - t0 : 0;
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " j=" + std::to_string(j);
          if (n == 0) {  // past the end: zero ranges and codes
            for (int r = 0; r < 2 * c.rank; ++r) ASSERT_EQ(ranges[r], 0) << where;
          }
          for (int t = n; t < c.block_size; ++t) {  // invalid slots: code 0
            for (int i = 0; i < bytes; ++i) ASSERT_EQ(codes[t * bytes + i], 0) << where << " t=" << t;
          }
          if (n == 0) continue;

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
              const int actual = out.code(b, h, j, t, r);
              if (!(step > 0.0)) {  // one token, or a range below one bfloat16 ulp
                ASSERT_EQ(actual, 0) << where << " t=" << t << " r=" << r;
                continue;
              }
              const double quotient = (x[t][r] - lo) / step;
              const double slack = 1e-4 + 2.0 * error[t] / step;
              const double least = std::clamp(test::rint_ties_even(quotient - slack), 0.0, 15.0);
              const double most = std::clamp(test::rint_ties_even(quotient + slack), 0.0, 15.0);
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
  EXPECT_LT(codes_loose * 100, codes_checked) << "the tolerance admits too many codes to test anything";
}

// Hand-worked: one head, D = 1, rank 2, key_proj = {1, -1}: x = (k, -k).
TEST(CpuKeySketch, HandWorkedBlocks) {
  std::mt19937_64 rng(1);
  const auto build = [&](const std::vector<double>& keys, int block_size, int num_blocks, int32_t len) {
    TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 1, block_size, num_blocks, rng);
    for (size_t t = 0; t < keys.size(); ++t) kv.data.set(kv.offset(0, 0, static_cast<int64_t>(t)), keys[t]);
    std::vector<int32_t> lens = {len};
    std::vector<float> key_proj = {1.0f, -1.0f};
    SketchBuffers out(1, 1, num_blocks, block_size, 2);
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

  // A constant coefficient: lo == hi, step 0, every code 0.
  SketchBuffers e = build({3, 3, 3}, 16, 1, 3);
  EXPECT_EQ(test::decode_bf16(e.ranges[0]), 3.0);
  EXPECT_EQ(test::decode_bf16(e.ranges[2]), 3.0);
  for (int t = 0; t < 16; ++t) EXPECT_EQ(e.codes[t], 0) << t;
}

// Append after new tokens (first_block = the block holding the old end) must reproduce the full
// build bit for bit, and write nothing outside [first_block, ceil(len / block_size)).
TEST(CpuKeySketch, AppendIsBitIdenticalToFullBuildAndWritesOnlyItsBlocks) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const SketchCase& c : sketch_cases()) {
    SCOPED_TRACE(describe(c));
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 2;
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    std::vector<float> key_proj(static_cast<size_t>(c.heads) * c.head_dim * c.rank);
    std::normal_distribution<double> normal(0.0, 0.3);
    for (auto& value : key_proj) value = static_cast<float>(normal(rng));
    const std::vector<int32_t> new_lens = test::mixed_lengths(c.batch, c.max_len, c.block_size, rng);
    std::vector<int32_t> old_lens(new_lens.size()), first_block(new_lens.size());
    for (size_t b = 0; b < new_lens.size(); ++b) {
      old_lens[b] = std::uniform_int_distribution<int32_t>(0, new_lens[b])(rng);
      first_block[b] = old_lens[b] / c.block_size;
    }
    kv.poison_after(new_lens);

    SketchBuffers full(c.batch, c.heads, num_blocks, c.block_size, c.rank);
    full.poison();
    cpu::key_sketch(make_params(kv, new_lens, key_proj, c.rank, full));

    SketchBuffers appended(c.batch, c.heads, num_blocks, c.block_size, c.rank);
    appended.poison();
    cpu::key_sketch(make_params(kv, old_lens, key_proj, c.rank, appended));
    KeySketchParams append = make_params(kv, new_lens, key_proj, c.rank, appended);
    append.first_block = first_block.data();
    cpu::key_sketch(append);
    ASSERT_EQ(appended.codes, full.codes);
    ASSERT_EQ(appended.ranges, full.ranges);

    // Alone on a poisoned sketch: the listed blocks equal the full build, the others keep 0xAB.
    SketchBuffers alone(c.batch, c.heads, num_blocks, c.block_size, c.rank);
    alone.poison();
    KeySketchParams only = make_params(kv, new_lens, key_proj, c.rank, alone);
    only.first_block = first_block.data();
    cpu::key_sketch(only);
    const int64_t code_bytes = static_cast<int64_t>(c.block_size) * (c.rank / 2);
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int j = 0; j < num_blocks; ++j) {
          const bool written = j >= first_block[b] && j < test::blocks_of(new_lens[b], c.block_size);
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " j=" + std::to_string(j);
          for (int64_t i = 0; i < code_bytes; ++i) {
            ASSERT_EQ(alone.block_codes(b, h, j)[i], written ? full.block_codes(b, h, j)[i] : 0xAB) << where;
          }
          for (int i = 0; i < 2 * c.rank; ++i) {
            ASSERT_EQ(alone.block_ranges(b, h, j)[i], written ? full.block_ranges(b, h, j)[i] : 0xABAB) << where;
          }
        }
      }
    }
  }
}

TEST(CpuKeySketch, RejectsValuesItCannotDispatch) {
  std::mt19937_64 rng(2);
  TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 8, 16, 1, rng);
  std::vector<int32_t> lens = {16};
  std::vector<float> key_proj(8 * 16, 0.5f);
  SketchBuffers out(1, 1, 1, 16, 16);
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
}

}  // namespace
}  // namespace aether
