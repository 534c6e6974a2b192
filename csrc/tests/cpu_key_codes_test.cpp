// aether::cpu::key_codes and aether::cpu::refine_scores (KeyCodesParams, RefineScoresParams in
// params.h) against an oracle written in this file straight from the text of params.h: ranges and
// codes bit for bit (bf16 rounding by test::round_to_bf16, bits set one at a time, not by the
// kernel's bit manipulation), refine scores in double within float32 rounding. Bits 2 and 4,
// head_dim 40 (a size only the CPU kernel takes), 64, 128, 256, groups of Pg = 1..8 blocks of 16..128
// tokens, float32 / float16 / bfloat16 keys in contiguous, token-major and paged caches, mixed
// lengths (0, 1, a partial last block and group), the zero fill past the end, append == full
// build, paged == contiguous, and candidate lists with padding, past-the-end entries, entries
// past the row and counts past the row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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
using test::TestKV;
using test::TestQuery;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using test::CodesBuffers;

// Channel d's code in a token's bytes, read one bit at a time from the little-endian bit string
// (bit i of the string is bit i % 8 of byte i / 8), so the oracle shares no shift arithmetic with
// the kernels.
int unpack_code(const uint8_t* token, int d, int bits) {
  int code = 0;
  for (int i = 0; i < bits; ++i) {
    const int bit = d * bits + i;
    code |= ((token[bit / 8] >> (bit % 8)) & 1) << i;
  }
  return code;
}

void pack_code(uint8_t* token, int d, int bits, int code) {
  for (int i = 0; i < bits; ++i) {
    const int bit = d * bits + i;
    if ((code >> i) & 1) token[bit / 8] = static_cast<uint8_t>(token[bit / 8] | (1 << (bit % 8)));
  }
}

// step_d = (hi_d - lo_d) / (2^bits - 1) in float32 from the bfloat16 bit patterns.
float step_of(uint16_t lo_bits, uint16_t hi_bits, int bits) {
  return (static_cast<float>(test::decode_bf16(hi_bits)) - static_cast<float>(test::decode_bf16(lo_bits))) /
         static_cast<float>((1 << bits) - 1);
}

// code = step > 0 ? clamp(rint((k - lo) / step), 0, 2^bits - 1) : 0; the subtraction and the
// division are float32 (params.h), the rounding ties to even.
int code_of(float k, float lo, float step, int bits) {
  if (!(step > 0.0f)) return 0;
  const float quotient = (k - lo) / step;
  return static_cast<int>(std::clamp(test::rint_ties_even(quotient), 0.0, static_cast<double>((1 << bits) - 1)));
}

// The full build of params.h: every group of Pg blocks with valid tokens gets lo / hi = bf16 of
// the channel's min / max over those tokens and its tokens' codes; invalid slots and everything
// past the last valid group stay zero.
CodesBuffers naive_key_codes(const TestKV& kv, const std::vector<int32_t>& lens, int bits, int per) {
  CodesBuffers out(kv.batch, kv.heads, kv.num_blocks, kv.block_size, kv.head_dim, bits, per);
  const int gt = out.group_tokens(), D = kv.head_dim;
  for (int b = 0; b < kv.batch; ++b) {
    for (int h = 0; h < kv.heads; ++h) {
      for (int m = 0; m < std::min(test::blocks_of(lens[b], gt), out.num_groups()); ++m) {
        const int t0 = m * gt, n = std::min(lens[b], t0 + gt) - t0;
        uint16_t* ranges = out.group_ranges(b, h, m);
        for (int d = 0; d < D; ++d) {
          double low = test::kInf, high = -test::kInf;
          for (int t = t0; t < t0 + n; ++t) {
            low = std::min(low, kv.at(b, h, t, d));
            high = std::max(high, kv.at(b, h, t, d));
          }
          ranges[d] = test::encode_bf16_exact(test::round_to_bf16(low));
          ranges[D + d] = test::encode_bf16_exact(test::round_to_bf16(high));
          const float lo = static_cast<float>(test::decode_bf16(ranges[d]));
          const float step = step_of(ranges[d], ranges[D + d], bits);
          for (int t = 0; t < n; ++t) {
            pack_code(out.token_codes(b, h, m, t), d, bits, code_of(static_cast<float>(kv.at(b, h, t0 + t, d)), lo, step, bits));
          }
        }
      }
    }
  }
  return out;
}

KeyCodesParams codes_params(const TestKV& kv, const std::vector<int32_t>& lens, CodesBuffers& out,
                            const int32_t* first_block = nullptr) {
  KeyCodesParams p;
  p.k = kv.layout();
  p.dtype = kv.dtype;
  p.seq_lens = lens.data();
  p.first_block = first_block;
  p.batch = kv.batch;
  p.kv_heads = kv.heads;
  p.head_dim = kv.head_dim;
  p.block_size = kv.block_size;
  p.num_blocks = kv.num_blocks;
  p.blocks_per_group = out.per;
  p.bits = out.bits;
  p.codes = out.codes.data();
  p.ranges = out.ranges.data();
  return p;
}

// A block size and group (Pg * bs <= 128).
struct Grouping {
  int block_size, per;
};
constexpr Grouping kGroupings[] = {{16, 1}, {16, 2}, {16, 4}, {16, 8}, {32, 1},
                                   {32, 2}, {32, 4}, {64, 1}, {64, 2}, {128, 1}};

struct CodesCase {
  DType dtype;
  KVKind kind;
  int batch, heads, head_dim, block_size, per, bits;
  int32_t max_len;
};

std::string describe(const CodesCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) + " B=" + std::to_string(c.batch) +
         " H=" + std::to_string(c.heads) + " D=" + std::to_string(c.head_dim) + " bs=" + std::to_string(c.block_size) +
         " Pg=" + std::to_string(c.per) + " bits=" + std::to_string(c.bits) + " max_len=" + std::to_string(c.max_len);
}

// Every grouping meets every head_dim and both bit widths; dtype and layout rotate so that each
// also meets every grouping. max_len ends inside a block of the third group (after one whole
// block of it when Pg > 1), or on a group boundary every fourth case.
std::vector<CodesCase> codes_cases() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::vector<CodesCase> cases;
  int n = 0;
  for (const Grouping& g : kGroupings) {
    for (int D : {40, 64, 128, 256}) {
      for (int bits : {2, 4}) {
        const int gt = g.block_size * g.per;
        const int tail = (g.per > 1 ? g.block_size : 0) + g.block_size / 2 + 3;  // < gt
        const int32_t max_len = n % 4 == 3 ? 2 * gt : 2 * gt + tail;
        cases.push_back({dtypes[n % 3], static_cast<KVKind>((n / 3) % 3), 8, D >= 256 ? 1 : 2, D, g.block_size, g.per,
                         bits, max_len});
        ++n;
      }
    }
  }
  return cases;
}

// Capacity in blocks: the groups that cover max_len and `spare` more, times Pg (a multiple of Pg).
int capacity_of(const CodesCase& c, int spare = 1) {
  return (test::blocks_of(c.max_len, c.block_size * c.per) + spare) * c.per;
}

// Lengths with the usual edges (max_len, 0, 1, bs, bs + 1) and a group's (gt - 1, gt, gt + 1).
std::vector<int32_t> codes_lengths(const CodesCase& c, std::mt19937_64& rng) {
  const int32_t gt = c.block_size * c.per;
  return test::mixed_lengths(c.batch, c.max_len, c.block_size, rng, {gt, gt + 1, gt - 1});
}

using test::first_difference;

TEST(CpuKeyCodes, FullBuildMatchesOracleBitForBit) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const CodesCase& c : codes_cases()) {
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c);
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> lens = codes_lengths(c, rng);
    kv.poison_after(lens);  // a kernel reading past the end sees NaN (and would write a NaN range)

    CodesBuffers out(c.batch, c.heads, num_blocks, c.block_size, c.head_dim, c.bits, c.per);
    out.poison();  // the full build owns every byte: the oracle's zeros must replace all 0xAB
    cpu::key_codes(codes_params(kv, lens, out));
    const CodesBuffers expected = naive_key_codes(kv, lens, c.bits, c.per);
    ASSERT_SAME_CODES(out, expected);
  }
}

// Small-integer keys: ranges are exact and many quotients (k - lo) / step are exactly k + 0.5, so
// round-half-to-even (not half-up, not truncation) is what decides the codes.
TEST(CpuKeyCodes, IntegerKeysExerciseTiesToEven) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int64_t ties = 0;
  std::uniform_int_distribution<int> key(-3, 3);
  for (const CodesCase& c : codes_cases()) {
    if (c.head_dim > 64) continue;  // the ties do not depend on the width
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c);
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> lens = codes_lengths(c, rng);
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int t = 0; t < lens[b]; ++t) {
          for (int d = 0; d < c.head_dim; ++d) kv.data.set(kv.offset(b, h, t) + d, key(rng));
        }
      }
    }
    kv.poison_after(lens);
    CodesBuffers out(c.batch, c.heads, num_blocks, c.block_size, c.head_dim, c.bits, c.per);
    out.poison();
    cpu::key_codes(codes_params(kv, lens, out));
    const CodesBuffers expected = naive_key_codes(kv, lens, c.bits, c.per);
    ASSERT_SAME_CODES(out, expected);

    const int gt = c.block_size * c.per, D = c.head_dim;
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int m = 0; m < test::blocks_of(lens[b], gt); ++m) {
          const uint16_t* ranges = out.group_ranges(b, h, m);
          for (int t = m * gt; t < std::min(lens[b], (m + 1) * gt); ++t) {
            for (int d = 0; d < D; ++d) {
              const float lo = static_cast<float>(test::decode_bf16(ranges[d]));
              const float step = step_of(ranges[d], ranges[D + d], c.bits);
              const float quotient = (static_cast<float>(kv.at(b, h, t, d)) - lo) / step;
              if (step > 0.0f && quotient - std::floor(quotient) == 0.5f) ++ties;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(ties, 100) << "too few exact .5 quotients: round-half-to-even was barely exercised";
}

// Worked by hand, D = 4, one head: the packing of both widths, ties, bfloat16 rounding of the
// range (up above the smallest key: clamp to 0; down below the largest: clamp to the top
// level), a constant channel, a group of two blocks sharing one range, the zero fill.
TEST(CpuKeyCodes, HandWorkedGroups) {
  std::mt19937_64 rng(1);
  const auto build = [&](const std::vector<std::vector<double>>& keys, int bits, int block_size, int num_blocks,
                         int per = 1) {
    TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 4, block_size, num_blocks, rng);
    for (size_t t = 0; t < keys.size(); ++t) {
      for (int d = 0; d < 4; ++d) kv.data.set(kv.offset(0, 0, static_cast<int64_t>(t)) + d, keys[t][d]);
    }
    const std::vector<int32_t> lens = {static_cast<int32_t>(keys.size())};
    kv.poison_after(lens);
    CodesBuffers out(1, 1, num_blocks, block_size, 4, bits, per);
    out.poison();
    cpu::key_codes(codes_params(kv, lens, out));
    return out;
  };
  const auto range = [](const CodesBuffers& out, int m, int row, int d) {
    return test::decode_bf16(out.group_ranges(0, 0, m)[row * 4 + d]);
  };

  // Bits 2: channels (t, 3 - t, t, 7) over t = 0..3: steps 1, 1, 1 and 0, codes (t, 3 - t, t, 0);
  // channel d sits at bits 2d of the token's one byte.
  std::vector<std::vector<double>> ramp4;
  for (int t = 0; t < 4; ++t) ramp4.push_back({double(t), double(3 - t), double(t), 7.0});
  const CodesBuffers a = build(ramp4, 2, 16, 1);
  ASSERT_EQ(a.codes.size(), 16u);
  for (int t = 0; t < 4; ++t) EXPECT_EQ(a.codes[t], t | ((3 - t) << 2) | (t << 4)) << t;
  for (int t = 4; t < 16; ++t) EXPECT_EQ(a.codes[t], 0) << "invalid slot " << t;
  EXPECT_EQ(range(a, 0, 0, 0), 0.0);
  EXPECT_EQ(range(a, 0, 1, 1), 3.0);
  EXPECT_EQ(range(a, 0, 0, 3), 7.0);
  EXPECT_EQ(range(a, 0, 1, 3), 7.0);

  // Bits 4: channels (t, 15 - t, t, -2) over t = 0..15: two bytes per token, channel 2d low nibble.
  std::vector<std::vector<double>> ramp16;
  for (int t = 0; t < 16; ++t) ramp16.push_back({double(t), double(15 - t), double(t), -2.0});
  const CodesBuffers b = build(ramp16, 4, 16, 2);
  for (int t = 0; t < 16; ++t) {
    EXPECT_EQ(b.codes[2 * t], t | ((15 - t) << 4)) << t;
    EXPECT_EQ(b.codes[2 * t + 1], t) << t;
  }
  for (size_t i = 32; i < b.codes.size(); ++i) EXPECT_EQ(b.codes[i], 0) << "block past the end, byte " << i;
  for (size_t i = 8; i < b.ranges.size(); ++i) EXPECT_EQ(b.ranges[i], 0) << "range past the end " << i;

  // Ties, bits 2: channel 0 keys {0, 1, 3, 5, 6}: step 2, quotients 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
  // Channel 1: bfloat16 keeps 8 significant bits, so the min 259 ties to lo = 260 (even mantissa)
  // and its own quotient is negative: clamped to 0; 300 is exact. Channel 2: the max 258.9 rounds
  // down to hi = 258, step 2 / 3, so 258.9 sits at quotient 4.35: clamped to 3; 257 is the tie 1.5
  // -> 2. Channel 3: the max 257 rounds to 256 = lo (a tie to even): step 0, every code 0.
  const CodesBuffers c = build({{0, 259, 256, 256},
                                {1, 300, 258, 257},
                                {3, 300, 258.9, 256.5},
                                {5, 300, 256, 256},
                                {6, 259, 257, 257}},
                               2, 16, 1);
  EXPECT_EQ(range(c, 0, 0, 1), 260.0);
  EXPECT_EQ(range(c, 0, 1, 1), 300.0);
  EXPECT_EQ(range(c, 0, 1, 2), 258.0);
  EXPECT_EQ(range(c, 0, 0, 3), 256.0);
  EXPECT_EQ(range(c, 0, 1, 3), 256.0);
  const int expected_c[5][4] = {{0, 0, 0, 0}, {0, 3, 3, 0}, {2, 3, 3, 0}, {2, 3, 0, 0}, {3, 0, 2, 0}};
  for (int t = 0; t < 5; ++t) {
    for (int d = 0; d < 4; ++d) EXPECT_EQ(unpack_code(&c.codes[t], d, 2), expected_c[t][d]) << "t=" << t << " d=" << d;
  }

  // Pg = 2 over 31 tokens of 16-token blocks: channel 0 = t shares one range 0..30 (step 10), so
  // block 1 (t = 16..30) is coded against it, not its own 16..30: rint(t / 10), 5 -> 0, 15 -> 2,
  // 25 -> 2 (ties to even). Slot 15 of block 1 is invalid; group 1 (blocks 2, 3) is past the end.
  std::vector<std::vector<double>> ramp31;
  for (int t = 0; t < 31; ++t) ramp31.push_back({double(t), 0.0, 0.0, 0.0});
  const CodesBuffers f = build(ramp31, 2, 16, 4, 2);
  ASSERT_EQ(f.ranges.size(), 16u);
  EXPECT_EQ(range(f, 0, 0, 0), 0.0);
  EXPECT_EQ(range(f, 0, 1, 0), 30.0);
  for (int t = 0; t < 31; ++t) {
    const int expected = static_cast<int>(test::rint_ties_even(t / 10.0));
    EXPECT_EQ(f.codes[t], expected) << t;  // channels 1..3 are constant: code 0
  }
  EXPECT_EQ(f.codes[31], 0) << "invalid slot 15 of block 1";
  for (int i = 32; i < 64; ++i) EXPECT_EQ(f.codes[i], 0) << "group 1, byte " << i;
  for (int i = 8; i < 16; ++i) EXPECT_EQ(f.ranges[i], 0) << "group 1 range " << i;
}

// Append after new tokens: first_block is the block holding the old end (mid group when Pg > 1),
// the first block past the new end, or one past the capacity. On top of a build of the old
// lengths it must give the full build of the new lengths bit for bit; alone on poisoned buffers it
// writes exactly the groups [first_block / Pg, ceil(len / (Pg bs))).
TEST(CpuKeyCodes, AppendIsBitIdenticalToFullBuildAndWritesOnlyItsGroups) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int64_t partial_groups_rebuilt = 0;
  int index = 0;
  for (const CodesCase& c : codes_cases()) {
    if (index++ % 2 == 1) continue;  // every other case keeps the suite fast; all groupings remain
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c, 2);
    const int bs = c.block_size, gt = bs * c.per;
    TestKV kv(c.dtype, c.kind, c.batch, c.heads, c.head_dim, bs, num_blocks, rng);
    const std::vector<int32_t> new_lens = codes_lengths(c, rng);
    std::vector<int32_t> old_lens(new_lens.size()), first(new_lens.size());
    for (size_t b = 0; b < new_lens.size(); ++b) {
      old_lens[b] = std::uniform_int_distribution<int32_t>(0, new_lens[b])(rng);
      first[b] = old_lens[b] / bs;
      partial_groups_rebuilt += old_lens[b] % gt != 0 && old_lens[b] < new_lens[b];
    }
    kv.poison_after(new_lens);

    CodesBuffers full(c.batch, c.heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    full.poison();
    cpu::key_codes(codes_params(kv, new_lens, full));

    CodesBuffers appended(c.batch, c.heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    appended.poison();
    cpu::key_codes(codes_params(kv, old_lens, appended));
    cpu::key_codes(codes_params(kv, new_lens, appended, first.data()));
    ASSERT_SAME_CODES(appended, full);

    // Alone: sequence 1 starts past its last valid block, sequence 2 past the capacity; neither
    // writes anything.
    std::vector<int32_t> only = first;
    only[1] = test::blocks_of(new_lens[1], bs);
    only[2] = num_blocks + 5;
    CodesBuffers alone(c.batch, c.heads, num_blocks, bs, c.head_dim, c.bits, c.per);
    alone.poison();
    cpu::key_codes(codes_params(kv, new_lens, alone, only.data()));
    const int group_bytes = gt * alone.token_bytes();
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int m = 0; m < alone.num_groups(); ++m) {
          const bool written = m >= only[b] / c.per && m < test::blocks_of(new_lens[b], gt);
          const std::string where = "b=" + std::to_string(b) + " h=" + std::to_string(h) + " group " +
                                    std::to_string(m) + " first=" + std::to_string(only[b]) +
                                    " len=" + std::to_string(new_lens[b]);
          const uint8_t* a_codes = alone.token_codes(b, h, m, 0);
          const uint8_t* f_codes = full.token_codes(b, h, m, 0);
          for (int i = 0; i < group_bytes; ++i) ASSERT_EQ(a_codes[i], written ? f_codes[i] : 0xAB) << where << " byte " << i;
          for (int i = 0; i < 2 * c.head_dim; ++i) {
            ASSERT_EQ(alone.group_ranges(b, h, m)[i], written ? full.group_ranges(b, h, m)[i] : 0xABAB) << where;
          }
        }
      }
    }
  }
  EXPECT_GT(partial_groups_rebuilt, 0);
}

// The same keys in a paged cache (a shuffled page per block, so a group spans Pg unrelated pages)
// and a contiguous one give the same codes and ranges.
TEST(CpuKeyCodes, PagedIsBitIdenticalToContiguous) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int index = 0;
  for (const CodesCase& c : codes_cases()) {
    if (index++ % 2 == 0) continue;  // the other half of the cases than the append test
    SCOPED_TRACE(describe(c));
    const int num_blocks = capacity_of(c);
    TestKV contiguous(c.dtype, KVKind::kContiguous, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng);
    TestKV paged(c.dtype, KVKind::kPaged, c.batch, c.heads, c.head_dim, c.block_size, num_blocks, rng, 0.0, 0.0);
    for (int b = 0; b < c.batch; ++b) {
      for (int h = 0; h < c.heads; ++h) {
        for (int64_t t = 0; t < static_cast<int64_t>(num_blocks) * c.block_size; ++t) {
          const int64_t from = contiguous.offset(b, h, t), to = paged.offset(b, h, t);
          const size_t bytes = test::dtype_size(c.dtype) * c.head_dim;
          std::memcpy(paged.data.bytes.data() + to * test::dtype_size(c.dtype),
                      contiguous.data.bytes.data() + from * test::dtype_size(c.dtype), bytes);
        }
      }
    }
    const std::vector<int32_t> lens = codes_lengths(c, rng);
    contiguous.poison_after(lens);
    paged.poison_after(lens);
    CodesBuffers from_paged(c.batch, c.heads, num_blocks, c.block_size, c.head_dim, c.bits, c.per);
    CodesBuffers from_contiguous(c.batch, c.heads, num_blocks, c.block_size, c.head_dim, c.bits, c.per);
    from_paged.poison();
    from_contiguous.poison();
    cpu::key_codes(codes_params(paged, lens, from_paged));
    cpu::key_codes(codes_params(contiguous, lens, from_contiguous));
    ASSERT_SAME_CODES(from_paged, from_contiguous);
  }
}

// The message of the std::invalid_argument `call` throws, or "no exception".
template <typename Fn>
std::string message_of(Fn&& call) {
  try {
    call();
  } catch (const std::invalid_argument& error) {
    return error.what();
  }
  return "no exception";
}

#define EXPECT_MESSAGE_HAS(message, part) \
  EXPECT_NE((message).find(part), std::string::npos) << "expected \"" << (part) << "\" in: " << (message)

TEST(CpuKeyCodes, RejectsInvalidParams) {
  std::mt19937_64 rng(2);
  TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 64, 16, 8, rng);
  const std::vector<int32_t> lens = {77};
  CodesBuffers out(1, 1, 8, 16, 64, 4, 1);  // the largest layout the variants below need
  const KeyCodesParams p = codes_params(kv, lens, out);
  const auto run = [](const KeyCodesParams& params) { return message_of([&] { cpu::key_codes(params); }); };
  EXPECT_EQ(run(p), "no exception");

  for (int bits : {0, 1, 3, 5, 8, -2}) {
    KeyCodesParams bad = p;
    bad.bits = bits;
    EXPECT_MESSAGE_HAS(run(bad), "unsupported bits " + std::to_string(bits));
  }
  for (int per : {0, -1, 3, 5, 6, 16}) {
    KeyCodesParams bad = p;
    bad.blocks_per_group = per;
    EXPECT_MESSAGE_HAS(run(bad), "blocks_per_group " + std::to_string(per) + " (allowed: a power of two, 1..8)");
  }
  KeyCodesParams bad = p;
  bad.block_size = 64;
  bad.blocks_per_group = 4;  // 256 tokens per group
  EXPECT_MESSAGE_HAS(run(bad), "block_size 64 * blocks_per_group 4 exceeds 128");
  bad = p;
  bad.block_size = 32;
  bad.blocks_per_group = 8;
  EXPECT_MESSAGE_HAS(run(bad), "block_size 32 * blocks_per_group 8 exceeds 128");
  bad = p;
  bad.blocks_per_group = 8;
  bad.num_blocks = 12;  // 8 * 16 = 128 tokens is fine, 12 blocks are no whole number of groups
  EXPECT_MESSAGE_HAS(run(bad), "num_blocks 12 is not a multiple of blocks_per_group 8");
  bad = p;
  bad.head_dim = 6;  // 12 bits at bits 2
  bad.bits = 2;
  EXPECT_MESSAGE_HAS(run(bad), "head_dim 6 * bits is not a whole number of bytes");
  bad.head_dim = 5;  // 20 bits at bits 4
  bad.bits = 4;
  EXPECT_MESSAGE_HAS(run(bad), "head_dim 5 * bits is not a whole number of bytes");
  bad.head_dim = 6;  // 24 bits: three bytes, allowed (the CPU kernel takes any whole byte count)
  bad.batch = 0;     // nothing to write: the checks alone are under test
  EXPECT_EQ(run(bad), "no exception");
  bad = p;
  bad.codes = nullptr;
  EXPECT_MESSAGE_HAS(run(bad), "must not be null");
  bad = p;
  bad.ranges = nullptr;
  EXPECT_MESSAGE_HAS(run(bad), "must not be null");
  bad = p;
  bad.dtype = static_cast<DType>(7);
  EXPECT_MESSAGE_HAS(run(bad), "dtype value 7");
  // The valid groupings of this shape all pass (num_blocks 8 is a multiple of each).
  for (int per : {1, 2, 4, 8}) {
    bad = p;
    bad.blocks_per_group = per;
    EXPECT_EQ(run(bad), "no exception") << "Pg=" << per;
  }
}

// ---------------------------------------------------------------------------------------------
// refine_scores.

using test::Candidates;
using test::make_candidates;

RefineScoresParams refine_params(const TestQuery& q, const CodesBuffers& codes, const std::vector<int32_t>& lens,
                                 const Candidates& cand, float scale, float* head_scores) {
  RefineScoresParams p;
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = q.data.dtype;
  p.codes = codes.codes.data();
  p.ranges = codes.ranges.data();
  p.seq_lens = lens.data();
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
  p.head_scores = head_scores;
  return p;
}

// What refine_scores must write, from params.h: for the first min(max(count, 0), L) entries j of
// each row with 0 <= j < ceil(len / bs), j < NB and j < L, and every query head g of the group,
// the log-sum-exp over block j's valid tokens of scale * sum_d q_gd (lo_d + code_td step_d) (the
// group's lo and float32 step), in double; `magnitude` is scale * max_t sum_d |q_gd (lo_d + code
// step_d)|, the size of the terms a float32 dot product rounds.
struct ExpectedScores {
  std::vector<char> written;  // [B, Hq, L]
  std::vector<double> value, magnitude;
};

ExpectedScores naive_refine(const TestQuery& q, const CodesBuffers& codes, const std::vector<int32_t>& lens,
                            const Candidates& cand, double scale) {
  const int L = cand.list_length, D = codes.head_dim, bs = codes.block_size, Hkv = codes.heads;
  const int G = q.heads / Hkv;
  ExpectedScores out;
  const size_t entries = static_cast<size_t>(codes.batch) * q.heads * L;
  out.written.assign(entries, 0);
  out.value.assign(entries, 0.0);
  out.magnitude.assign(entries, 0.0);
  for (int b = 0; b < codes.batch; ++b) {
    const int n_blocks = std::min(test::blocks_of(lens[b], bs), codes.num_blocks);
    for (int h = 0; h < Hkv; ++h) {
      const int32_t* row = &cand.rows[(static_cast<size_t>(b) * Hkv + h) * L];
      const int count = std::clamp(cand.count[static_cast<size_t>(b) * Hkv + h], 0, L);
      for (int i = 0; i < count; ++i) {
        const int j = row[i];
        if (j < 0 || j >= n_blocks || j >= L) continue;
        const int m = j / codes.per, n = std::min(lens[b], (j + 1) * bs) - j * bs;
        const uint16_t* ranges = codes.group_ranges(b, h, m);
        std::vector<double> value(static_cast<size_t>(n) * D);  // dequantised keys of the block
        for (int t = 0; t < n; ++t) {
          const uint8_t* token = codes.token_codes(b, h, m, (j % codes.per) * bs + t);
          for (int d = 0; d < D; ++d) {
            value[static_cast<size_t>(t) * D + d] =
                test::decode_bf16(ranges[d]) + unpack_code(token, d, codes.bits) * static_cast<double>(step_of(ranges[d], ranges[D + d], codes.bits));
          }
        }
        for (int g = 0; g < G; ++g) {
          const int hq = h * G + g;
          const std::vector<double> qv = q.row(b, hq);
          std::vector<double> logits(static_cast<size_t>(n));
          double top = -test::kInf, magnitude = 0.0;
          for (int t = 0; t < n; ++t) {
            double dot = 0.0, dot_abs = 0.0;
            for (int d = 0; d < D; ++d) {
              dot += qv[d] * value[static_cast<size_t>(t) * D + d];
              dot_abs += std::fabs(qv[d] * value[static_cast<size_t>(t) * D + d]);
            }
            logits[t] = scale * dot;
            top = std::max(top, logits[t]);
            magnitude = std::max(magnitude, std::fabs(scale) * dot_abs);
          }
          double total = 0.0;
          for (double logit : logits) total += std::exp(logit - top);
          const size_t at = (static_cast<size_t>(b) * q.heads + hq) * L + j;
          out.written[at] = 1;
          out.value[at] = top + std::log(total);
          out.magnitude[at] = magnitude;
        }
      }
    }
  }
  return out;
}

// Compares a kernel's head_scores with the oracle: written entries within 1e-4 relative (of the
// score or, where the logits cancel, of their terms' magnitude), the rest still `fill` bit for
// bit. Counts the entries of each kind.
void expect_scores_match(const std::vector<float>& actual, const ExpectedScores& expected, float fill,
                         int64_t* written, int64_t* untouched) {
  ASSERT_EQ(actual.size(), expected.written.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    if (!expected.written[i]) {
      ASSERT_EQ(std::memcmp(&actual[i], &fill, sizeof(float)), 0) << "entry " << i << " written: " << actual[i];
      ++*untouched;
      continue;
    }
    const double want = expected.value[i];
    ASSERT_TRUE(std::isfinite(actual[i])) << "entry " << i << ": " << actual[i] << " vs " << want;
    const double tolerance = 1e-5 + 1e-4 * std::max(std::fabs(want), expected.magnitude[i]);
    ASSERT_NEAR(actual[i], want, tolerance) << "entry " << i << " magnitude " << expected.magnitude[i];
    ++*written;
  }
}

using test::RefineCase;
using test::describe;

// Every group size meets every head_dim and width; grouping, dtype, row length (L = NB; half the
// blocks of the longest sequence, so valid blocks fall past the row; NB + 3) and query scale (30:
// logits with a standard deviation of ~40, past 88 where exp overflows float32 unless the
// log-sum-exp subtracts its maximum) rotate independently.
std::vector<RefineCase> refine_cases() {
  const DType dtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};
  std::vector<RefineCase> cases;
  int n = 0;
  for (int G : {1, 3, 4, 8}) {
    for (int D : {40, 64, 128, 256}) {
      for (int bits : {2, 4}) {
        const Grouping& g = kGroupings[(n * 3) % 10];
        cases.push_back({dtypes[n % 3], G, D, bits, g.block_size, g.per, (n / 3) % 3, n % 4 == 1 ? 30.0 : 1.0});
        ++n;
      }
    }
  }
  return cases;
}

TEST(CpuRefineScores, MatchesOracleOnCandidateLists) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 6, kv_heads = 2;
  int64_t written = 0, untouched = 0, past_row = 0, past_end = 0, past_count = 0;
  for (const RefineCase& c : refine_cases()) {
    const int bs = c.block_size, gt = bs * c.per;
    const int32_t max_len = 2 * gt + bs + 3;  // 3 groups (the last partial) of at least 4 blocks
    const int num_blocks = (test::blocks_of(max_len, gt) + 1) * c.per;
    const int L = c.row == 0 ? num_blocks : c.row == 1 ? test::blocks_of(max_len, bs) / 2 : num_blocks + 3;
    SCOPED_TRACE(describe(c, L, num_blocks));
    TestKV kv(c.dtype, KVKind::kContiguous, batch, kv_heads, c.head_dim, bs, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng, {gt + 1});
    // The oracle's codes (equal to the kernel's, FullBuildMatchesOracleBitForBit): the scores are
    // checked independently of key_codes.
    const CodesBuffers codes = naive_key_codes(kv, lens, c.bits, c.per);
    TestQuery q(c.dtype, batch, c.group * kv_heads, c.head_dim);
    q.fill_normal(rng, c.q_scale);
    const Candidates cand = make_candidates(batch, kv_heads, L, num_blocks, bs, lens, rng);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));

    // The caller's -inf prefill: every entry outside the candidates keeps it. A -inf written
    // where nothing may be (a block past the end has no token) would pass unseen, so the call is
    // repeated over a finite sentinel.
    const ExpectedScores expected = naive_refine(q, codes, lens, cand, scale);
    for (const float fill : {kNegInf, 1234.5f}) {
      std::vector<float> scores(static_cast<size_t>(batch) * q.heads * L, fill);
      cpu::refine_scores(refine_params(q, codes, lens, cand, scale, scores.data()));
      expect_scores_match(scores, expected, fill, &written, &untouched);
      if (HasFatalFailure()) return;
    }
    ASSERT_TRUE(q.padding_untouched());

    for (int b = 0; b < batch; ++b) {
      const int n_blocks = test::blocks_of(lens[b], bs);
      for (int h = 0; h < kv_heads; ++h) {
        const int32_t* row = &cand.rows[(static_cast<size_t>(b) * kv_heads + h) * L];
        const int count = std::clamp(cand.count[static_cast<size_t>(b) * kv_heads + h], 0, L);
        for (int i = 0; i < L; ++i) {
          const int j = row[i];
          past_count += i >= count && j >= 0 && j < n_blocks && j < L;
          if (i >= count) continue;
          past_row += j >= L && j < n_blocks;
          past_end += j >= n_blocks && j < std::min(L, num_blocks);
        }
      }
    }
  }
  // Each skip rule was met by entries it alone excludes.
  EXPECT_GT(written, 300);
  EXPECT_GT(untouched, 1000);
  EXPECT_GT(past_row, 0) << "no valid block past a short row (j >= L) was listed";
  EXPECT_GT(past_end, 0) << "no entry past the sequence end was listed";
  EXPECT_GT(past_count, 0) << "no valid candidate past num_candidates";
}

// The kernel's own build as its input, as in use (paged bf16 keys, groups of two blocks): the
// candidates get the oracle's scores over a finite sentinel, every other entry keeps it.
TEST(CpuRefineScores, ScoresCodesBuiltByTheKernel) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 5, kv_heads = 2, bs = 32, per = 2, D = 64;
  const int32_t max_len = 5 * bs + 7;
  const int num_blocks = 8;
  for (int G : {1, 4}) {
    for (int bits : {2, 4}) {
      SCOPED_TRACE("G=" + std::to_string(G) + " bits=" + std::to_string(bits));
      TestKV kv(DType::kBFloat16, KVKind::kPaged, batch, kv_heads, D, bs, num_blocks, rng);
      const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng);
      CodesBuffers codes(batch, kv_heads, num_blocks, bs, D, bits, per);
      codes.poison();
      cpu::key_codes(codes_params(kv, lens, codes));
      TestQuery q(DType::kBFloat16, batch, G * kv_heads, D);
      q.fill_normal(rng);
      const Candidates cand = make_candidates(batch, kv_heads, num_blocks - 2, num_blocks, bs, lens, rng);
      const float sentinel = 1234.5f;
      std::vector<float> scores(static_cast<size_t>(batch) * q.heads * cand.list_length, sentinel);
      cpu::refine_scores(refine_params(q, codes, lens, cand, 0.125f, scores.data()));
      int64_t written = 0, untouched = 0;
      expect_scores_match(scores, naive_refine(q, codes, lens, cand, 0.125), sentinel, &written, &untouched);
      EXPECT_GT(untouched, 0);
    }
  }
}

// Worked by hand, D = 4, bits 2, one query head: keys t0 = (0, 3, -3, 5), t1 = (3, 0, 3, 5) give
// ranges [0, 3], [0, 3], [-3, 3], [5, 5] (steps 1, 1, 2, 0) and codes (0, 3, 0, 0), (3, 0, 3, 0):
// dequantised exactly. q = (2, 1, 0.5, -1), scale 0.5: logits -1.75 and 1.25.
TEST(CpuRefineScores, HandWorkedBlock) {
  std::mt19937_64 rng(3);
  TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 4, 16, 2, rng);
  const double keys[2][4] = {{0, 3, -3, 5}, {3, 0, 3, 5}};
  for (int t = 0; t < 2; ++t) {
    for (int d = 0; d < 4; ++d) kv.data.set(kv.offset(0, 0, t) + d, keys[t][d]);
  }
  const std::vector<int32_t> lens = {2};
  CodesBuffers codes(1, 1, 2, 16, 4, 2, 1);
  codes.poison();
  cpu::key_codes(codes_params(kv, lens, codes));
  EXPECT_EQ(codes.codes[0], 3 << 2);
  EXPECT_EQ(codes.codes[1], 3 | (3 << 4));
  TestQuery q(DType::kFloat32, 1, 1, 4);
  const double query[4] = {2, 1, 0.5, -1};
  for (int d = 0; d < 4; ++d) q.data.set(q.offset(0, 0) + d, query[d]);
  Candidates cand;
  cand.list_length = 2;
  cand.rows = {1, 0};  // block 1 is past the end (len 2): skipped
  cand.count = {2};
  std::vector<float> scores(2, kNegInf);
  cpu::refine_scores(refine_params(q, codes, lens, cand, 0.5f, scores.data()));
  EXPECT_NEAR(scores[0], std::log(std::exp(-1.75) + std::exp(1.25)), 1e-6);
  EXPECT_EQ(scores[1], kNegInf);
}

TEST(CpuRefineScores, RejectsInvalidParams) {
  std::mt19937_64 rng(4);
  const int bs = 16, D = 64, num_blocks = 8;
  TestKV kv(DType::kFloat16, KVKind::kContiguous, 1, 2, D, bs, num_blocks, rng);
  const std::vector<int32_t> lens = {77};
  CodesBuffers codes(1, 2, num_blocks, bs, D, 4, 1);
  cpu::key_codes(codes_params(kv, lens, codes));
  TestQuery q(DType::kFloat16, 1, 4, D);
  q.fill_normal(rng);
  Candidates cand = make_candidates(1, 2, num_blocks, num_blocks, bs, lens, rng);
  std::vector<float> scores(4 * num_blocks, kNegInf);
  const RefineScoresParams p = refine_params(q, codes, lens, cand, 0.125f, scores.data());
  const auto run = [](const RefineScoresParams& params) { return message_of([&] { cpu::refine_scores(params); }); };
  EXPECT_EQ(run(p), "no exception");
  std::fill(scores.begin(), scores.end(), kNegInf);  // the control wrote its candidates

  for (int bits : {0, 1, 3, 8}) {
    RefineScoresParams bad = p;
    bad.bits = bits;
    EXPECT_MESSAGE_HAS(run(bad), "unsupported bits " + std::to_string(bits));
  }
  for (int per : {0, 3, 6, 16}) {
    RefineScoresParams bad = p;
    bad.blocks_per_group = per;
    EXPECT_MESSAGE_HAS(run(bad), "blocks_per_group " + std::to_string(per) + " (allowed: a power of two, 1..8)");
  }
  RefineScoresParams bad = p;
  bad.block_size = 128;
  bad.blocks_per_group = 2;
  EXPECT_MESSAGE_HAS(run(bad), "block_size 128 * blocks_per_group 2 exceeds 128");
  bad = p;
  bad.blocks_per_group = 8;
  bad.num_blocks = 12;
  EXPECT_MESSAGE_HAS(run(bad), "num_blocks 12 is not a multiple of blocks_per_group 8");
  bad = p;
  bad.head_dim = 6;
  bad.bits = 2;
  EXPECT_MESSAGE_HAS(run(bad), "head_dim 6 * bits is not a whole number of bytes");
  for (int which = 0; which < 5; ++which) {
    bad = p;
    if (which == 0) bad.codes = nullptr;
    if (which == 1) bad.ranges = nullptr;
    if (which == 2) bad.candidates = nullptr;
    if (which == 3) bad.num_candidates = nullptr;
    if (which == 4) bad.head_scores = nullptr;
    EXPECT_MESSAGE_HAS(run(bad), "must not be null") << "null pointer " << which;
  }
  bad = p;
  bad.list_length = -1;
  EXPECT_MESSAGE_HAS(run(bad), "list_length must be >= 0");
  bad = p;
  bad.q_heads = 3;  // not a multiple of kv_heads 2
  EXPECT_MESSAGE_HAS(run(bad), "q_heads must be a positive multiple of kv_heads");
  bad = p;
  bad.kv_heads = 0;
  EXPECT_MESSAGE_HAS(run(bad), "q_heads must be a positive multiple of kv_heads");
  bad = p;
  bad.dtype = static_cast<DType>(9);
  EXPECT_MESSAGE_HAS(run(bad), "dtype value 9");
  // The rejected calls wrote nothing; an empty row (L = 0) is valid and writes nothing either.
  for (float value : scores) EXPECT_EQ(value, kNegInf);
  bad = p;
  bad.list_length = 0;
  EXPECT_EQ(run(bad), "no exception");
}

}  // namespace
}  // namespace aether
