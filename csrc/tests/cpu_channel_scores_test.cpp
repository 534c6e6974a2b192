// The qcodes score on the CPU (KeyCodesParams::channel_major, CodeChannelsParams,
// ChannelScoresParams in params.h) against oracles written here from the text of params.h:
// - the channel-major build holds exactly the token-major build's codes (checked bit for bit in
//   cpu_key_codes_test.cpp against its own oracle), each read one bit at a time at its documented
//   position, and the same ranges;
// - code_channels picks the largest w_d = (sum_g q_gd^2) * sum_groups (hi - lo)^2 (long double
//   here), ties to the lower channel, listed ascending; only the valid groups count;
// - channel_scores equals, within float32 rounding, the log-sum-exp (double here) over each
//   block's valid tokens of s q . k' with k' dequantised from the token-major codes for the
//   chosen channels and the group's mid-range for the others; -inf past the end; every element
//   written (outputs poisoned with NaN first).
// - code_spreads writes the running sums of (hi - lo)^2 group by group (the same rounding steps
//   here: equal bits), nothing past the end, and an update equals the build;
// - channel_scores without a list (choosing from the spreads) writes exactly the scores it gives
//   with code_channels' list.
// head_dim 40 (CPU only), 64, 128; bits 2 and 4; groups of 1..8 blocks; G = 1, 3, 4; mixed lengths.
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

using test::CodesBuffers;
using test::KVKind;
using test::TestKV;
using test::TestQuery;

// Bit i of a little-endian bit string starting at `base`.
int bit_at(const uint8_t* base, int64_t i) { return (base[i / 8] >> (i % 8)) & 1; }

int read_code(const uint8_t* base, int64_t first_bit, int bits) {
  int code = 0;
  for (int i = 0; i < bits; ++i) code |= bit_at(base, first_bit + i) << i;
  return code;
}

// Channel-major codes of the same shape: [B, H, NG, D, gt * bits / 8].
struct ChannelCodes {
  int batch, heads, groups, head_dim, run_bytes;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> ranges;
  ChannelCodes(const CodesBuffers& like)
      : batch(like.batch),
        heads(like.heads),
        groups(like.num_groups()),
        head_dim(like.head_dim),
        run_bytes(like.group_tokens() * like.bits / 8),
        codes(like.codes.size(), 0xAB),
        ranges(like.ranges.size(), 0xABAB) {}
  const uint8_t* run(int b, int h, int m, int d) const {
    return &codes[((static_cast<size_t>(b) * heads + h) * groups + m) * head_dim * run_bytes +
                  static_cast<size_t>(d) * run_bytes];
  }
};

KeyCodesParams build_params(const TestKV& kv, const std::vector<int32_t>& lens, int bits, int per, uint8_t* codes,
                            uint16_t* ranges, int channel_major) {
  KeyCodesParams p;
  p.k = kv.layout();
  p.dtype = kv.dtype;
  p.seq_lens = lens.data();
  p.batch = kv.batch;
  p.kv_heads = kv.heads;
  p.head_dim = kv.head_dim;
  p.block_size = kv.block_size;
  p.num_blocks = kv.num_blocks;
  p.blocks_per_group = per;
  p.bits = bits;
  p.channel_major = channel_major;
  p.codes = codes;
  p.ranges = ranges;
  return p;
}

struct Case {
  DType dtype;
  int group, head_dim, bits, block_size, per, channels;
};

std::vector<Case> cases() {
  return {{DType::kFloat32, 1, 40, 2, 16, 8, 10},  {DType::kBFloat16, 3, 64, 4, 32, 2, 16},
          {DType::kFloat16, 4, 128, 2, 64, 1, 32}, {DType::kFloat32, 4, 64, 2, 16, 1, 1},
          {DType::kBFloat16, 1, 64, 4, 128, 1, 64}, {DType::kFloat32, 3, 128, 2, 16, 4, 40}};
}

std::string describe(const Case& c) {
  return "G " + std::to_string(c.group) + " D " + std::to_string(c.head_dim) + " bits " + std::to_string(c.bits) +
         " bs " + std::to_string(c.block_size) + " Pg " + std::to_string(c.per) + " m " + std::to_string(c.channels);
}

// A case's keys and lengths: `batch` rows of up to `max_len` tokens (one of gt + 1, the last empty:
// every w_d is 0 there, so channels 0..m-1), with one spare group of capacity past the longest.
struct CaseKeys {
  int gt, num_blocks;
  TestKV kv;
  std::vector<int32_t> lens;
  CaseKeys(const Case& c, int batch, int heads, int max_len, std::mt19937_64& rng)
      : gt(c.block_size * c.per),
        num_blocks((test::blocks_of(max_len, gt) + 1) * c.per),
        kv(c.dtype, KVKind::kContiguous, batch, heads, c.head_dim, c.block_size, num_blocks, rng),
        lens(test::mixed_lengths(batch, max_len, c.block_size, rng, {gt + 1})) {
    lens[batch - 1] = 0;
  }
};

TEST(CpuChannelScores, ChannelMajorBuildIsTheTokenMajorCodesMoved) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const int gt = c.block_size * c.per, batch = 3, heads = 2;
    const int num_blocks = (test::blocks_of(2 * gt + 5, gt) + 1) * c.per;  // one group past the end
    TestKV kv(c.dtype, KVKind::kContiguous, batch, heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, 2 * gt + 5, c.block_size, rng, {1});
    CodesBuffers token(batch, heads, num_blocks, c.block_size, c.head_dim, c.bits, c.per);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, token.codes.data(), token.ranges.data(), 0));
    ChannelCodes channel(token);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, channel.codes.data(), channel.ranges.data(), 1));
    ASSERT_EQ(channel.ranges, token.ranges);
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int m = 0; m < token.num_groups(); ++m) {
          for (int t = 0; t < gt; ++t) {
            for (int d = 0; d < c.head_dim; ++d) {
              const int want = read_code(token.token_codes(b, h, m, t), static_cast<int64_t>(d) * c.bits, c.bits);
              const int got = read_code(channel.run(b, h, m, d), static_cast<int64_t>(t) * c.bits, c.bits);
              ASSERT_EQ(got, want) << "b " << b << " h " << h << " group " << m << " token " << t << " d " << d;
            }
          }
        }
      }
    }
  }
}

// w_d in long double from the ranges; the m winners ascending.
std::vector<int32_t> naive_channels(const TestQuery& q, const std::vector<uint16_t>& ranges, int b, int h,
                                    int kv_heads, int groups, int valid_groups, int D, int m) {
  const int G = q.heads / kv_heads;
  std::vector<long double> w(static_cast<size_t>(D), 0.0L);
  for (int d = 0; d < D; ++d) {
    long double qq = 0.0L, energy = 0.0L;
    for (int g = 0; g < G; ++g) {
      const long double x = static_cast<float>(q.row(b, h * G + g)[d]);
      qq += x * x;
    }
    for (int g = 0; g < valid_groups; ++g) {
      const uint16_t* r = &ranges[((static_cast<size_t>(b) * kv_heads + h) * groups + g) * 2 * D];
      const long double width = test::decode_bf16(r[D + d]) - test::decode_bf16(r[d]);
      energy += width * width;
    }
    w[d] = qq * energy;
  }
  std::vector<int32_t> order(static_cast<size_t>(D));
  for (int d = 0; d < D; ++d) order[d] = d;
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return w[a] > w[c]; });
  order.resize(static_cast<size_t>(m));
  std::sort(order.begin(), order.end());
  return order;
}

CodeChannelsParams channels_params(const TestQuery& q, const CodesBuffers& codes, const std::vector<int32_t>& lens,
                                   int m, int32_t* out) {
  CodeChannelsParams p;
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = q.data.dtype;
  p.ranges = codes.ranges.data();
  p.seq_lens = lens.data();
  p.batch = codes.batch;
  p.q_heads = q.heads;
  p.kv_heads = codes.heads;
  p.head_dim = codes.head_dim;
  p.block_size = codes.block_size;
  p.num_blocks = codes.num_blocks;
  p.blocks_per_group = codes.per;
  p.num_channels = m;
  p.channels = out;
  return p;
}

TEST(CpuChannelScores, CodeChannelsPicksTheHeaviestChannels) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const int batch = 4, heads = 2, D = c.head_dim;
    CaseKeys keys(c, batch, heads, 3 * c.block_size * c.per, rng);
    const int gt = keys.gt, num_blocks = keys.num_blocks;
    const TestKV& kv = keys.kv;
    std::vector<int32_t>& lens = keys.lens;
    CodesBuffers codes(batch, heads, num_blocks, c.block_size, D, c.bits, c.per);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, codes.codes.data(), codes.ranges.data(), 0));
    // Ties: two channels with equal, constant ranges in every group of row 0; garbage past the
    // valid groups of every row (must not count).
    for (int h = 0; h < heads; ++h) {
      for (int m = 0; m < codes.num_groups(); ++m) {
        uint16_t* r = codes.group_ranges(0, h, m);
        r[D - 1] = r[D - 2] = 0;
        r[2 * D - 1] = r[2 * D - 2] = 0x3F80;  // 1.0
        for (int b = 0; b < batch; ++b) {
          if (m >= test::blocks_of(lens[b], gt)) {
            uint16_t* past = codes.group_ranges(b, h, m);
            for (int d = 0; d < D; ++d) past[D + d] = 0x4600;  // hi = 8192
          }
        }
      }
    }
    TestQuery q(c.dtype, batch, c.group * heads, D);
    q.fill_normal(rng);
    std::vector<int32_t> got(static_cast<size_t>(batch) * heads * c.channels, -7);
    cpu::code_channels(channels_params(q, codes, lens, c.channels, got.data()));
    for (int b = 0; b < batch; ++b) {
      const int valid = std::min(test::blocks_of(lens[b], gt), codes.num_groups());
      for (int h = 0; h < heads; ++h) {
        const std::vector<int32_t> want =
            naive_channels(q, codes.ranges, b, h, heads, codes.num_groups(), valid, D, c.channels);
        const std::vector<int32_t> row(got.begin() + (static_cast<size_t>(b) * heads + h) * c.channels,
                                       got.begin() + (static_cast<size_t>(b) * heads + h + 1) * c.channels);
        ASSERT_EQ(row, want) << "b " << b << " h " << h;
      }
    }
  }
}

ChannelScoresParams scores_params(const TestQuery& q, const ChannelCodes& codes, const CodesBuffers& like,
                                  const std::vector<int32_t>& lens, const std::vector<int32_t>& channels, int m,
                                  float scale, float* out) {
  ChannelScoresParams p;
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = q.data.dtype;
  p.codes = codes.codes.data();
  p.ranges = codes.ranges.data();
  p.seq_lens = lens.data();
  p.channels = channels.data();
  p.batch = like.batch;
  p.q_heads = q.heads;
  p.kv_heads = like.heads;
  p.head_dim = like.head_dim;
  p.block_size = like.block_size;
  p.num_blocks = like.num_blocks;
  p.blocks_per_group = like.per;
  p.bits = like.bits;
  p.num_channels = m;
  p.scale = scale;
  p.head_scores = out;
  return p;
}

TEST(CpuChannelScores, ScoresEveryBlockFromTheChosenChannels) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int64_t finite = 0, past_end = 0;
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const int gt = c.block_size * c.per, batch = 3, heads = 2, D = c.head_dim, bs = c.block_size;
    const int num_blocks = (test::blocks_of(2 * gt + bs + 3, gt) + 1) * c.per;
    TestKV kv(c.dtype, KVKind::kContiguous, batch, heads, D, bs, num_blocks, rng);
    std::vector<int32_t> lens = test::mixed_lengths(batch, 2 * gt + bs + 3, bs, rng, {gt + 1});
    // one full-length row and one empty one in every case, so that the counts below always hold
    // (random lengths alone fell short of them for 1 seed in ~400)
    lens[0] = 2 * gt + bs + 3;
    lens[batch - 1] = 0;
    CodesBuffers token(batch, heads, num_blocks, bs, D, c.bits, c.per);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, token.codes.data(), token.ranges.data(), 0));
    ChannelCodes channel(token);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, channel.codes.data(), channel.ranges.data(), 1));
    TestQuery q(c.dtype, batch, c.group * heads, D);
    q.fill_normal(rng);
    // Random distinct channels per row, in random order (the kernel takes any order).
    std::vector<int32_t> channels;
    for (int row = 0; row < batch * heads; ++row) {
      std::vector<int32_t> all(static_cast<size_t>(D));
      for (int d = 0; d < D; ++d) all[d] = d;
      std::shuffle(all.begin(), all.end(), rng);
      channels.insert(channels.end(), all.begin(), all.begin() + c.channels);
    }
    const float scale = static_cast<float>(0.8 / std::sqrt(static_cast<double>(D)));
    std::vector<float> got(static_cast<size_t>(batch) * q.heads * num_blocks, std::nanf(""));
    cpu::channel_scores(scores_params(q, channel, token, lens, channels, c.channels, scale, got.data()));
    const int G = c.group, levels = (1 << c.bits) - 1;
    for (int b = 0; b < batch; ++b) {
      const int n_blocks = test::blocks_of(lens[b], bs);
      for (int h = 0; h < heads; ++h) {
        std::vector<char> chosen(static_cast<size_t>(D), 0);
        for (int i = 0; i < c.channels; ++i) chosen[channels[(static_cast<size_t>(b) * heads + h) * c.channels + i]] = 1;
        for (int j = 0; j < num_blocks; ++j) {
          for (int g = 0; g < G; ++g) {
            const float value = got[(static_cast<size_t>(b) * q.heads + h * G + g) * num_blocks + j];
            if (j >= n_blocks) {
              ASSERT_TRUE(std::isinf(value) && value < 0) << "block " << j << " past the end: " << value;
              ++past_end;
              continue;
            }
            const int m = j / c.per, n = std::min(lens[b], (j + 1) * bs) - j * bs;
            const uint16_t* r = token.group_ranges(b, h, m);
            const std::vector<double> qv = q.row(b, h * G + g);
            double top = -test::kInf, magnitude = 0.0;
            std::vector<double> logits(static_cast<size_t>(n));
            for (int t = 0; t < n; ++t) {
              const uint8_t* codes = token.token_codes(b, h, m, (j % c.per) * bs + t);
              double dot = 0.0, dot_abs = 0.0;
              for (int d = 0; d < D; ++d) {
                const double lo = test::decode_bf16(r[d]), hi = test::decode_bf16(r[D + d]);
                const double step = static_cast<float>((static_cast<float>(hi) - static_cast<float>(lo)) / levels);
                const double k = chosen[d] ? lo + read_code(codes, static_cast<int64_t>(d) * c.bits, c.bits) * step
                                           : (lo + hi) / 2;
                dot += static_cast<float>(qv[d]) * k;
                dot_abs += std::fabs(static_cast<float>(qv[d]) * k);
              }
              logits[t] = scale * dot;
              top = std::max(top, logits[t]);
              magnitude = std::max(magnitude, scale * dot_abs);
            }
            double total = 0.0;
            for (double logit : logits) total += std::exp(logit - top);
            const double want = top + std::log(total);
            ASSERT_TRUE(std::isfinite(value)) << "block " << j << ": " << value;
            ASSERT_NEAR(value, want, 1e-5 + 1e-4 * std::max(std::fabs(want), magnitude)) << "b " << b << " j " << j;
            ++finite;
          }
        }
      }
    }
  }
  EXPECT_GT(finite, 60) << past_end;
  EXPECT_GT(past_end, 60) << finite;
}

CodeSpreadsParams spreads_params(const CodesBuffers& codes, const std::vector<int32_t>& lens,
                                 const int32_t* first_block, double* spreads) {
  CodeSpreadsParams p;
  p.ranges = codes.ranges.data();
  p.seq_lens = lens.data();
  p.first_block = first_block;
  p.batch = codes.batch;
  p.kv_heads = codes.heads;
  p.head_dim = codes.head_dim;
  p.block_size = codes.block_size;
  p.num_blocks = codes.num_blocks;
  p.blocks_per_group = codes.per;
  p.spreads = spreads;
  return p;
}

// The running spreads of params.h, group by group: (hi - lo) in double, its square and the sum
// each rounded on their own (volatile: no contraction into a fused multiply-add), so equal bits.
double naive_spread_step(double acc, uint16_t lo, uint16_t hi) {
  const double width = static_cast<double>(test::decode_bf16(hi)) - static_cast<double>(test::decode_bf16(lo));
  const volatile double square = width * width;
  return acc + square;
}

TEST(CpuChannelScores, CodeSpreadsAreRunningSumsAndAnUpdateEqualsABuild) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const int batch = 4, heads = 2, D = c.head_dim;
    CaseKeys keys(c, batch, heads, 3 * c.block_size * c.per + 7, rng);  // one group past the end
    const int gt = keys.gt, num_blocks = keys.num_blocks;
    const TestKV& kv = keys.kv;
    std::vector<int32_t>& lens = keys.lens;
    CodesBuffers codes(batch, heads, num_blocks, c.block_size, D, c.bits, c.per);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, codes.codes.data(), codes.ranges.data(), 0));
    const int groups = codes.num_groups();
    const size_t row = static_cast<size_t>(groups) * D;
    std::vector<double> built(static_cast<size_t>(batch) * heads * row, std::nan(""));
    cpu::code_spreads(spreads_params(codes, lens, nullptr, built.data()));
    for (int b = 0; b < batch; ++b) {
      const int valid = std::min(test::blocks_of(lens[b], gt), groups);
      for (int h = 0; h < heads; ++h) {
        const double* got = &built[(static_cast<size_t>(b) * heads + h) * row];
        for (int d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int m = 0; m < groups; ++m) {
            if (m >= valid) {  // past the end: not written
              ASSERT_TRUE(std::isnan(got[static_cast<size_t>(m) * D + d])) << "b " << b << " group " << m;
              continue;
            }
            const uint16_t* r = codes.group_ranges(b, h, m);
            acc = naive_spread_step(acc, r[d], r[D + d]);
            ASSERT_EQ(got[static_cast<size_t>(m) * D + d], acc) << "b " << b << " h " << h << " group " << m << " d " << d;
          }
        }
      }
    }
    // An update from a block of each row rewrites that block's group and the later valid ones
    // (poisoned first), reading the group before: it equals the build.
    std::vector<int32_t> first(static_cast<size_t>(batch));
    std::vector<double> updated = built;
    for (int b = 0; b < batch; ++b) {
      const int n_blocks = test::blocks_of(lens[b], c.block_size);
      first[b] = n_blocks == 0 ? 0 : std::uniform_int_distribution<int>(0, n_blocks - 1)(rng);
      for (int h = 0; h < heads; ++h) {
        double* r = &updated[(static_cast<size_t>(b) * heads + h) * row];
        for (size_t x = static_cast<size_t>(first[b] / c.per) * D; x < row; ++x) r[x] = std::nan("");
      }
    }
    cpu::code_spreads(spreads_params(codes, lens, first.data(), updated.data()));
    for (size_t x = 0; x < built.size(); ++x) {
      ASSERT_TRUE(updated[x] == built[x] || (std::isnan(updated[x]) && std::isnan(built[x]))) << "element " << x;
    }
  }
}

TEST(CpuChannelScores, ChannelScoresWithoutAListChooseLikeCodeChannels) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const int batch = 3, heads = 2, D = c.head_dim;
    CaseKeys keys(c, batch, heads, 2 * c.block_size * c.per + 9, rng);
    const int gt = keys.gt, num_blocks = keys.num_blocks;
    const TestKV& kv = keys.kv;
    std::vector<int32_t>& lens = keys.lens;
    CodesBuffers token(batch, heads, num_blocks, c.block_size, D, c.bits, c.per);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, token.codes.data(), token.ranges.data(), 0));
    ChannelCodes channel(token);
    cpu::key_codes(build_params(kv, lens, c.bits, c.per, channel.codes.data(), channel.ranges.data(), 1));
    std::vector<double> spreads(static_cast<size_t>(batch) * heads * token.num_groups() * D, 0.0);
    cpu::code_spreads(spreads_params(token, lens, nullptr, spreads.data()));
    TestQuery q(c.dtype, batch, c.group * heads, D);
    q.fill_normal(rng);
    // The choice read from the spreads equals the one summed from the ranges (and the oracle's,
    // checked above) ...
    std::vector<int32_t> summed(static_cast<size_t>(batch) * heads * c.channels, -7);
    std::vector<int32_t> read(summed.size(), -9);
    cpu::code_channels(channels_params(q, token, lens, c.channels, summed.data()));
    CodeChannelsParams from_spreads = channels_params(q, token, lens, c.channels, read.data());
    from_spreads.spreads = spreads.data();
    cpu::code_channels(from_spreads);
    ASSERT_EQ(read, summed);
    // ... and channel_scores without a list scores exactly as given that list.
    const float scale = static_cast<float>(0.8 / std::sqrt(static_cast<double>(D)));
    std::vector<float> listed(static_cast<size_t>(batch) * q.heads * num_blocks, std::nanf(""));
    std::vector<float> chosen(listed.size(), std::nanf(""));
    cpu::channel_scores(scores_params(q, channel, token, lens, summed, c.channels, scale, listed.data()));
    ChannelScoresParams own = scores_params(q, channel, token, lens, summed, c.channels, scale, chosen.data());
    own.channels = nullptr;
    own.spreads = spreads.data();
    cpu::channel_scores(own);
    for (size_t x = 0; x < listed.size(); ++x) {
      ASSERT_FALSE(std::isnan(chosen[x])) << "element " << x << " not written";
      ASSERT_EQ(std::memcmp(&chosen[x], &listed[x], sizeof(float)), 0) << "element " << x;
    }
  }
}

TEST(CpuChannelScores, RejectsInvalidParams) {
  std::mt19937_64 rng(1);
  TestKV kv(DType::kFloat32, KVKind::kContiguous, 1, 1, 64, 16, 8, rng);
  const std::vector<int32_t> lens = {100};
  CodesBuffers token(1, 1, 8, 16, 64, 2, 8);
  TestQuery q(DType::kFloat32, 1, 2, 64);
  q.fill_normal(rng);
  std::vector<int32_t> channels(64, 0);
  std::vector<float> out(16, 0.0f);
  for (const int m : {0, 65}) {
    EXPECT_THROW(cpu::code_channels(channels_params(q, token, lens, m, channels.data())), std::invalid_argument);
  }
  ChannelCodes channel(token);
  ChannelScoresParams p = scores_params(q, channel, token, lens, channels, 8, 0.1f, out.data());
  p.bits = 3;
  EXPECT_THROW(cpu::channel_scores(p), std::invalid_argument);
  p = scores_params(q, channel, token, lens, channels, 8, 0.1f, out.data());
  p.channels = nullptr;  // and no spreads to choose them from
  EXPECT_THROW(cpu::channel_scores(p), std::invalid_argument);
  std::vector<double> spreads(static_cast<size_t>(token.num_groups()) * 64, 0.0);
  EXPECT_THROW(cpu::code_spreads(spreads_params(token, lens, nullptr, nullptr)), std::invalid_argument);
  CodeSpreadsParams sp = spreads_params(token, lens, nullptr, spreads.data());
  sp.blocks_per_group = 3;
  EXPECT_THROW(cpu::code_spreads(sp), std::invalid_argument);
  p = scores_params(q, channel, token, lens, channels, 8, 0.1f, out.data());
  p.q_heads = 3;
  p.kv_heads = 2;
  EXPECT_THROW(cpu::channel_scores(p), std::invalid_argument);
}

}  // namespace
}  // namespace aether
