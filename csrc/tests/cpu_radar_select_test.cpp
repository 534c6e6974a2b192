// aether::cpu::radar_select: scores against the naive reference and the true block maxima,
// selection identical to the naive rules given the same scores, the threshold certificate, and
// hand-worked cases that pin the rules down independently of the naive code.
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "aether/cpu/kernels.h"
#include "test_util.h"

namespace aether {
namespace {

using test::KVKind;
using test::StatsBuffers;
using test::TestKV;
using test::TestQuery;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Buffers of one radar_select call, poisoned so that every written element is checked.
struct SelectBuffers {
  std::vector<int32_t> selected, num_selected;
  std::vector<float> head_scores, head_mlo;
  SelectBuffers(int batch, int q_heads, int kv_heads, int num_blocks)
      : selected(static_cast<size_t>(batch) * kv_heads * num_blocks, -7),
        num_selected(static_cast<size_t>(batch) * kv_heads, -7),
        head_scores(static_cast<size_t>(batch) * q_heads * num_blocks, test::float_nan()),
        head_mlo(static_cast<size_t>(batch) * q_heads, test::float_nan()) {}
  void attach(RadarSelectParams& p) {
    p.selected = selected.data();
    p.num_selected = num_selected.data();
    p.out_head_scores = head_scores.data();
    p.out_head_mlo = head_mlo.data();
  }
};

RadarSelectParams base_params(int batch, int q_heads, int kv_heads, int head_dim, int block_size,
                              int num_blocks, const std::vector<int32_t>& lens) {
  RadarSelectParams p;
  p.seq_lens = lens.data();
  p.batch = batch;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  return p;
}

void attach_stats(RadarSelectParams& p, StatsBuffers& stats) {
  p.centroid = stats.centroid.data();
  p.lo = stats.lo.data();
  p.hi = stats.hi.data();
  p.radius = stats.radius.data();
  p.spread = stats.spread.data();
}

// The selection rows written by the kernel must equal the naive rules applied to the per-head
// scores the kernel reports (or was given).
void expect_selection_matches_naive(const RadarSelectParams& p, const std::vector<int32_t>& lens,
                                    const SelectBuffers& out, const float* scores, const float* mlo) {
  const int G = p.q_heads / p.kv_heads;
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.kv_heads; ++h) {
      std::vector<std::vector<float>> head_scores(G);
      std::vector<float> head_mlo(G);
      for (int g = 0; g < G; ++g) {
        const int64_t q_row = static_cast<int64_t>(b) * p.q_heads + h * G + g;
        head_scores[g].assign(scores + q_row * p.num_blocks, scores + (q_row + 1) * p.num_blocks);
        head_mlo[g] = mlo[q_row];
      }
      const std::vector<int32_t> expected = test::naive_select(p, lens[b], head_scores, head_mlo);
      const int64_t row = static_cast<int64_t>(b) * p.kv_heads + h;
      std::vector<int32_t> actual(out.selected.begin() + row * p.num_blocks,
                                  out.selected.begin() + (row + 1) * p.num_blocks);
      std::vector<int32_t> padded = expected;
      padded.resize(static_cast<size_t>(p.num_blocks), -1);
      ASSERT_EQ(out.num_selected[row], static_cast<int32_t>(expected.size()))
          << "b=" << b << " h=" << h << " len=" << lens[b];
      ASSERT_EQ(actual, padded) << "b=" << b << " h=" << h << " len=" << lens[b];
    }
  }
}

struct RadarCase {
  DType dtype;
  int group, head_dim, block_size;
  int32_t max_len;
};

std::vector<RadarCase> radar_cases() {
  std::vector<RadarCase> cases;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    cases.push_back({dtype, 1, 64, 16, 97});
    cases.push_back({dtype, 2, 128, 32, 1025});
    cases.push_back({dtype, 4, 256, 64, 63});
    cases.push_back({dtype, 8, 128, 16, 1025});
    cases.push_back({dtype, 4, 40, 128, 1});
  }
  return cases;
}

TEST(CpuRadarSelect, ScoresMatchNaiveAndBoundTheTrueBlockMaximum) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 3, kv_heads = 2;
  for (const RadarCase& c : radar_cases()) {
    const int q_heads = kv_heads * c.group;
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 1;
    TestKV kv(c.dtype, KVKind::kPaged, batch, kv_heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, c.max_len, c.block_size, rng);
    kv.poison_after(lens);
    StatsBuffers stats = test::cpu_block_stats(kv, lens);
    TestQuery q(c.dtype, batch, q_heads, c.head_dim);
    q.fill_normal(rng);

    std::vector<std::vector<float>> by_score(5);
    for (Score score : {Score::kBall, Score::kBox, Score::kTight, Score::kMean, Score::kVariance}) {
      SCOPED_TRACE(std::string(test::dtype_name(c.dtype)) + " G=" + std::to_string(c.group) +
                   " D=" + std::to_string(c.head_dim) + " bs=" + std::to_string(c.block_size) +
                   " max_len=" + std::to_string(c.max_len) + " score=" +
                   std::to_string(static_cast<int>(score)));
      RadarSelectParams p = base_params(batch, q_heads, kv_heads, c.head_dim, c.block_size, num_blocks, lens);
      attach_stats(p, stats);
      p.q = q.data.data();
      p.q_stride_batch = q.stride_batch;
      p.q_stride_head = q.stride_head;
      p.dtype = c.dtype;
      p.score = score;
      p.policy = Policy::kTopK;
      p.budget_fraction = 0.3;
      SelectBuffers out(batch, q_heads, kv_heads, num_blocks);
      out.attach(p);
      cpu::radar_select(p);
      by_score[static_cast<int>(score)] = out.head_scores;

      for (int b = 0; b < batch; ++b) {
        const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
        for (int hq = 0; hq < q_heads; ++hq) {
          const int h = hq / c.group;
          const std::vector<double> qg = q.row(b, hq);
          double q_abs = 0.0, q_norm = 0.0;
          for (double x : qg) {
            q_abs += std::fabs(x);
            q_norm += x * x;
          }
          q_norm = std::sqrt(q_norm);
          double expected_mlo = -test::kInf;
          for (int j = 0; j < num_blocks; ++j) {
            const float actual = out.head_scores[(static_cast<int64_t>(b) * q_heads + hq) * num_blocks + j];
            if (j >= n_blocks) {
              ASSERT_EQ(actual, kNegInf) << "b=" << b << " head=" << hq << " block=" << j;
              continue;
            }
            const int64_t index = stats.block_index(b, h, j);
            const float* centroid = &stats.centroid[index * c.head_dim];
            const double expected = test::naive_score(score, qg, centroid, &stats.lo[index * c.head_dim],
                                                      &stats.hi[index * c.head_dim], stats.radius[index],
                                                      stats.spread[index], p.scale);
            expected_mlo = std::max(expected_mlo, test::naive_score(Score::kMean, qg, centroid, nullptr, nullptr,
                                                                    0.0f, 0.0f, p.scale));
            // float32 dot products over D channels: error <= D u sum |q_i x_i|.
            double magnitude = q_norm * stats.radius[index] * (1.0 + std::sqrt(stats.spread[index]));
            for (int i = 0; i < c.head_dim; ++i) {
              magnitude += std::fabs(qg[i]) * (std::fabs(centroid[i]) + std::fabs(stats.lo[index * c.head_dim + i]) +
                                               std::fabs(stats.hi[index * c.head_dim + i]));
            }
            const double tolerance = (c.head_dim + 8) * 6e-8 * p.scale * magnitude + 1e-6;
            ASSERT_NEAR(actual, expected, tolerance) << "b=" << b << " head=" << hq << " block=" << j;

            // Bounds against the true largest logit of the block, from the keys themselves.
            double block_max = -test::kInf;
            for (int t = j * c.block_size; t < std::min(lens[b], (j + 1) * c.block_size); ++t) {
              double dot = 0.0;
              for (int i = 0; i < c.head_dim; ++i) dot += qg[i] * kv.at(b, h, t, i);
              block_max = std::max(block_max, p.scale * dot);
            }
            const double slack = 1e-4 * (1.0 + std::fabs(block_max)) + tolerance;
            if (score == Score::kMean) {
              ASSERT_LE(actual, block_max + slack) << "b=" << b << " head=" << hq << " block=" << j;
            } else if (score != Score::kVariance) {
              ASSERT_GE(actual, block_max - slack) << "b=" << b << " head=" << hq << " block=" << j;
            }
          }
          const float actual_mlo = out.head_mlo[static_cast<int64_t>(b) * q_heads + hq];
          if (n_blocks == 0) {
            ASSERT_EQ(actual_mlo, kNegInf);
          } else {
            ASSERT_NEAR(actual_mlo, expected_mlo, 1e-4 * (1.0 + std::fabs(expected_mlo)));
          }
          (void)q_abs;
        }
      }
      expect_selection_matches_naive(p, lens, out, out.head_scores.data(), out.head_mlo.data());
    }
    // tight is the elementwise min of ball and box computed the same way: exactly equal.
    for (size_t n = 0; n < by_score[0].size(); ++n) {
      ASSERT_EQ(by_score[2][n], std::min(by_score[0][n], by_score[1][n])) << n;
      if (std::isfinite(by_score[0][n])) {
        ASSERT_GE(by_score[4][n], by_score[0][n]) << n;  // variance >= ball (spread >= 0)
        ASSERT_LE(by_score[3][n], by_score[0][n]) << n;  // mean <= ball (radius >= 0)
      }
    }
  }
}

// Given the same per-head scores (coarsely quantised so ties are frequent), every policy with
// random parameters must select exactly what the naive rules select.
TEST(CpuRadarSelect, SelectionIsIdenticalGivenTheSameScores) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, 1 << 30);
  const int block_sizes[] = {16, 32, 64, 128};
  const int groups[] = {1, 2, 4, 8};
  const double eps_values[] = {0.0, 1e-3, 0.1, 1.0, 30.0};
  const double mass_values[] = {0.0, 0.5, 0.9, 0.99, 1.0};
  const double fractions[] = {0.0, 0.125, 0.3, 0.5, 1.0, 2.0};
  for (int trial = 0; trial < 300; ++trial) {
    const int batch = 1 + pick(rng) % 4, kv_heads = 1 + pick(rng) % 3;
    const int G = groups[pick(rng) % 4], q_heads = kv_heads * G;
    const int block_size = block_sizes[pick(rng) % 4];
    const int32_t max_len = 1 + pick(rng) % (40 * block_size);
    const int num_blocks = test::blocks_of(max_len, block_size) + pick(rng) % 3;
    const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, block_size, rng);

    RadarSelectParams p = base_params(batch, q_heads, kv_heads, 8, block_size, num_blocks, lens);
    p.policy = static_cast<Policy>(trial % 3);
    p.sink_blocks = pick(rng) % 3;
    p.recent_blocks = pick(rng) % 4;
    p.budget_blocks = pick(rng) % 3 == 0 ? 1 + pick(rng) % 12 : 0;
    p.budget_fraction = fractions[pick(rng) % 6];
    p.eps = eps_values[pick(rng) % 5];
    p.mass = mass_values[pick(rng) % 5];
    p.min_blocks = pick(rng) % 4;
    p.max_blocks = pick(rng) % 2 == 0 ? 0 : pick(rng) % 10;
    SCOPED_TRACE("trial " + std::to_string(trial) + " policy " + std::to_string(trial % 3) +
                 " G=" + std::to_string(G) + " bs=" + std::to_string(block_size));

    // Scores on a grid of 0.5 (ties), spread so that masses land on both sides of eps / p.
    std::vector<float> scores(static_cast<size_t>(batch) * q_heads * num_blocks, kNegInf);
    std::vector<float> mlo(static_cast<size_t>(batch) * q_heads);
    std::uniform_int_distribution<int> grid(-40, 6);
    for (size_t n = 0; n < scores.size(); ++n) scores[n] = 0.5f * grid(rng);
    if (p.policy != Policy::kAdaptive) {  // zero-mass bounds: dropped even at eps = 0
      for (size_t n = 0; n < scores.size(); n += 1 + pick(rng) % 7) scores[n] = kNegInf;
    }
    for (size_t n = 0; n < mlo.size(); ++n) mlo[n] = 0.5f * std::uniform_int_distribution<int>(-4, 8)(rng);
    p.in_head_scores = scores.data();
    p.in_head_mlo = mlo.data();
    p.q = nullptr;  // not needed when scores and M_g are given

    SelectBuffers out(batch, q_heads, kv_heads, num_blocks);
    out.attach(p);
    cpu::radar_select(p);
    expect_selection_matches_naive(p, lens, out, scores.data(), mlo.data());
    if (testing::Test::HasFatalFailure()) return;
    // The given scores are echoed (valid blocks) with -inf past the end; M_g likewise.
    for (int b = 0; b < batch; ++b) {
      const int32_t n_blocks = test::blocks_of(lens[b], block_size);
      for (int hq = 0; hq < q_heads; ++hq) {
        const int64_t row = static_cast<int64_t>(b) * q_heads + hq;
        ASSERT_EQ(out.head_mlo[row], mlo[row]);
        for (int j = 0; j < num_blocks; ++j) {
          ASSERT_EQ(out.head_scores[row * num_blocks + j], j < n_blocks ? scores[row * num_blocks + j] : kNegInf);
        }
      }
    }
  }
}

// Hand-worked cases: they hold the naive reference to the text of the rules too.
struct HandCase {
  RadarSelectParams p;
  std::vector<int32_t> lens;
  std::vector<float> scores, mlo;
  SelectBuffers out;
  HandCase(int32_t len, std::vector<float> block_scores)
      : lens{len}, scores(std::move(block_scores)), mlo{0.0f}, out(1, 1, 1, static_cast<int>(scores.size())) {
    p = base_params(1, 1, 1, 8, 16, static_cast<int>(scores.size()), lens);
    p.in_head_scores = scores.data();
    p.in_head_mlo = mlo.data();
    out.attach(p);
  }
  std::vector<int32_t> run() {
    p.selected = out.selected.data();
    p.num_selected = out.num_selected.data();
    cpu::radar_select(p);
    std::vector<int32_t> result(out.selected.begin(), out.selected.begin() + out.num_selected[0]);
    for (size_t n = result.size(); n < out.selected.size(); ++n) EXPECT_EQ(out.selected[n], -1);
    return result;
  }
};

TEST(CpuRadarSelect, TopKForcedBlocksAndTies) {
  // 6 blocks, the last partial (5*16+3 tokens): sink {0}, recent {3, 4}, tail {5} are forced.
  HandCase c(5 * 16 + 3, {0, 1, 1, 1, 1, 1, 0});
  c.p.sink_blocks = 1;
  c.p.recent_blocks = 2;
  c.p.budget_blocks = 5;  // one candidate among the tied 1 and 2: the lower index wins
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 1, 3, 4, 5}));
  c.p.budget_blocks = 2;  // fewer than the forced blocks: only those
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 3, 4, 5}));
  c.scores[2] = 2.0f;
  c.p.budget_blocks = 5;
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 2, 3, 4, 5}));
}

TEST(CpuRadarSelect, TopKFractionBudget) {
  HandCase c(10 * 16, std::vector<float>(10, 0.0f));
  c.p.sink_blocks = 0;
  c.p.recent_blocks = 0;
  c.p.budget_fraction = 0.3;
  EXPECT_EQ(c.run().size(), 3u);
  c.p.budget_fraction = 0.31;
  EXPECT_EQ(c.run().size(), 4u);
  c.p.budget_fraction = 0.0;  // at least one block
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0}));
  c.lens[0] = 0;  // empty sequence: nothing at all
  EXPECT_TRUE(c.run().empty());
  EXPECT_EQ(c.out.num_selected[0], 0);

  HandCase d(25 * 16, std::vector<float>(25, 0.0f));
  d.p.sink_blocks = 0;
  d.p.recent_blocks = 0;
  d.p.budget_fraction = 0.28;  // 0.28 * 25 = 7.000000000000001 in double: the 1e-9 makes it 7
  EXPECT_EQ(d.run().size(), 7u);
}

TEST(CpuRadarSelect, ThresholdDropsFromTheLowestBoundWhileTheSumStaysBelowEps) {
  // Blocks of 16 tokens, M = 0: exp(l_j) = 16 exp(s_j). Candidates 1..3 bound 0.5, 0.3, 0.4.
  const auto s = [](double m) { return static_cast<float>(std::log(m / 16.0)); };
  HandCase c(5 * 16, {5.0f, s(0.5), s(0.3), s(0.4), 5.0f});
  c.p.policy = Policy::kThreshold;
  c.p.sink_blocks = 1;
  c.p.recent_blocks = 1;
  c.p.eps = 1.0;  // 0.3 + 0.4 = 0.7 fits, + 0.5 = 1.2 does not
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 1, 4}));
  c.p.eps = 0.25;  // not even the smallest
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 1, 2, 3, 4}));
  c.p.eps = 1.5;
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 4}));
  // A bound of exactly zero mass is dropped even with eps = 0 (the sum must stay <= eps).
  c.scores[2] = kNegInf;
  c.p.eps = 0.0;
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 1, 3, 4}));
}

TEST(CpuRadarSelect, AdaptiveReachesMassThenClamps) {
  // Equal block sizes: the masses are the softmax of the scores, here 0.1, 0.4, 0.2, 0.3.
  HandCase c(4 * 16, {static_cast<float>(std::log(0.1)), static_cast<float>(std::log(0.4)),
                      static_cast<float>(std::log(0.2)), static_cast<float>(std::log(0.3))});
  c.p.policy = Policy::kAdaptive;
  c.p.sink_blocks = 0;
  c.p.recent_blocks = 0;
  c.p.min_blocks = 1;
  c.p.mass = 0.65;  // 0.4 + 0.3
  EXPECT_EQ(c.run(), (std::vector<int32_t>{1, 3}));
  c.p.min_blocks = 3;
  EXPECT_EQ(c.run(), (std::vector<int32_t>{1, 2, 3}));
  c.p.min_blocks = 1;
  c.p.max_blocks = 1;
  EXPECT_EQ(c.run(), (std::vector<int32_t>{1}));
  c.p.max_blocks = 0;
  c.p.sink_blocks = 1;  // block 0 (0.1) is forced and counts: 0.1 + 0.4 + 0.3 >= 0.75
  c.p.mass = 0.75;
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 1, 3}));
  c.p.min_blocks = 10;  // never above n_blocks
  EXPECT_EQ(c.run(), (std::vector<int32_t>{0, 1, 2, 3}));

  // Equal scores: masses exactly 0.25 each; reaching p = 0.5 exactly stops (>=), ties by index.
  HandCase d(4 * 16, {1.0f, 1.0f, 1.0f, 1.0f});
  d.p.policy = Policy::kAdaptive;
  d.p.sink_blocks = 0;
  d.p.recent_blocks = 0;
  d.p.mass = 0.5;
  EXPECT_EQ(d.run(), (std::vector<int32_t>{0, 1}));
  // Masses weigh by token count: 16 + 16 + 16 + 8 tokens, the partial tail (forced) has 8/56.
  HandCase e(3 * 16 + 8, {1.0f, 1.0f, 1.0f, 1.0f});
  e.p.policy = Policy::kAdaptive;
  e.p.sink_blocks = 0;
  e.p.recent_blocks = 0;
  e.p.mass = 40.0 / 56.0 - 1e-12;  // the tail and two full blocks are enough
  EXPECT_EQ(e.run(), (std::vector<int32_t>{0, 1, 3}));
  e.p.mass = 40.0 / 56.0 + 1e-12;  // ... and now they are not quite
  EXPECT_EQ(e.run(), (std::vector<int32_t>{0, 1, 2, 3}));
}

// The certificate on real keys: for every query head, the exact softmax mass of the blocks the
// threshold policy dropped is <= eps.
TEST(CpuRadarSelect, ThresholdDroppedMassIsBelowEps) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 2, kv_heads = 2, block_size = 16, head_dim = 64;
  const int32_t max_len = 1025;
  const int num_blocks = test::blocks_of(max_len, block_size);
  int64_t total_dropped = 0;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (int G : {1, 4}) {
      const int q_heads = kv_heads * G;
      // Well separated, tight blocks: the bounds are then close enough to drop blocks.
      TestKV kv(dtype, KVKind::kContiguous, batch, kv_heads, head_dim, block_size, num_blocks, rng, 3.0, 0.1);
      const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, block_size, rng);
      kv.poison_after(lens);
      StatsBuffers stats = test::cpu_block_stats(kv, lens);
      TestQuery q(dtype, batch, q_heads, head_dim);
      q.fill_normal(rng, 2.0);
      for (Score score : {Score::kBall, Score::kBox, Score::kTight}) {
        for (double eps : {1e-3, 1e-2, 0.1}) {
          SCOPED_TRACE(std::string(test::dtype_name(dtype)) + " G=" + std::to_string(G) + " score=" +
                       std::to_string(static_cast<int>(score)) + " eps=" + std::to_string(eps));
          RadarSelectParams p = base_params(batch, q_heads, kv_heads, head_dim, block_size, num_blocks, lens);
          attach_stats(p, stats);
          p.q = q.data.data();
          p.q_stride_batch = q.stride_batch;
          p.q_stride_head = q.stride_head;
          p.dtype = dtype;
          p.score = score;
          p.policy = Policy::kThreshold;
          p.eps = eps;
          SelectBuffers out(batch, q_heads, kv_heads, num_blocks);
          out.attach(p);
          cpu::radar_select(p);
          for (int b = 0; b < batch; ++b) {
            const int32_t n_blocks = test::blocks_of(lens[b], block_size);
            for (int hq = 0; hq < q_heads; ++hq) {
              const int h = hq / G;
              const int32_t* row = &out.selected[(static_cast<int64_t>(b) * kv_heads + h) * num_blocks];
              const int32_t count = out.num_selected[static_cast<int64_t>(b) * kv_heads + h];
              std::vector<bool> kept(static_cast<size_t>(n_blocks), false);
              for (int n = 0; n < count; ++n) kept[row[n]] = true;
              const std::vector<double> qg = q.row(b, hq);
              std::vector<double> logits;
              std::vector<bool> logit_kept;
              double top = -test::kInf;
              for (int t = 0; t < lens[b]; ++t) {
                double dot = 0.0;
                for (int i = 0; i < head_dim; ++i) dot += qg[i] * kv.at(b, h, t, i);
                logits.push_back(p.scale * dot);
                logit_kept.push_back(kept[t / block_size]);
                top = std::max(top, logits.back());
              }
              double total = 0.0, dropped = 0.0;
              for (size_t t = 0; t < logits.size(); ++t) {
                const double weight = std::exp(logits[t] - top);
                total += weight;
                if (!logit_kept[t]) dropped += weight;
              }
              if (total > 0) {
                ASSERT_LE(dropped / total, eps * (1 + 1e-4)) << "b=" << b << " head=" << hq;
              }
              if (hq % G == 0) total_dropped += n_blocks - count;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(total_dropped, 0) << "no block was ever dropped: the test checks nothing";
}

// in_head_scores without in_head_mlo: M_g still comes from q and the centroids; in_head_mlo with
// computed scores: the given M_g is used (and echoed) instead of the computed one.
TEST(CpuRadarSelect, GivenScoresAndLowerBoundsAreHonoured) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 3, kv_heads = 2, G = 2, q_heads = kv_heads * G, D = 64, bs = 16, max_len = 600;
  const int num_blocks = test::blocks_of(max_len, bs);
  TestKV kv(DType::kFloat16, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng, 3.0, 0.1);
  const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng);
  StatsBuffers stats = test::cpu_block_stats(kv, lens);
  TestQuery q(DType::kFloat16, batch, q_heads, D);
  q.fill_normal(rng, 2.0);

  RadarSelectParams p = base_params(batch, q_heads, kv_heads, D, bs, num_blocks, lens);
  attach_stats(p, stats);
  p.q = q.data.data();
  p.q_stride_batch = q.stride_batch;
  p.q_stride_head = q.stride_head;
  p.dtype = DType::kFloat16;
  p.score = Score::kTight;
  p.policy = Policy::kThreshold;
  p.eps = 1e-2;
  SelectBuffers computed(batch, q_heads, kv_heads, num_blocks);
  computed.attach(p);
  cpu::radar_select(p);

  RadarSelectParams given_scores = p;
  given_scores.in_head_scores = computed.head_scores.data();
  SelectBuffers from_scores(batch, q_heads, kv_heads, num_blocks);
  from_scores.attach(given_scores);
  cpu::radar_select(given_scores);
  EXPECT_EQ(from_scores.selected, computed.selected);
  EXPECT_EQ(from_scores.num_selected, computed.num_selected);
  EXPECT_EQ(std::memcmp(from_scores.head_mlo.data(), computed.head_mlo.data(), sizeof(float) * q_heads * batch), 0);

  std::vector<float> shifted_mlo = computed.head_mlo;
  for (auto& value : shifted_mlo) value += 3.0f;  // a larger M_g drops more blocks
  RadarSelectParams given_mlo = p;
  given_mlo.in_head_mlo = shifted_mlo.data();
  SelectBuffers from_mlo(batch, q_heads, kv_heads, num_blocks);
  from_mlo.attach(given_mlo);
  cpu::radar_select(given_mlo);
  EXPECT_EQ(from_mlo.head_mlo, shifted_mlo);
  EXPECT_EQ(std::memcmp(from_mlo.head_scores.data(), computed.head_scores.data(),
                        sizeof(float) * computed.head_scores.size()), 0);
  expect_selection_matches_naive(given_mlo, lens, from_mlo, from_mlo.head_scores.data(), shifted_mlo.data());
  EXPECT_NE(from_mlo.num_selected, computed.num_selected) << "the given M_g made no difference";
}

TEST(CpuRadarSelect, RejectsValuesItCannotDispatch) {
  std::vector<int32_t> lens = {16};
  std::vector<float> scores = {0.0f}, mlo = {0.0f};
  std::vector<int32_t> selected(1), count(1);
  RadarSelectParams p = base_params(1, 1, 1, 8, 16, 1, lens);
  p.in_head_scores = scores.data();
  p.in_head_mlo = mlo.data();
  p.selected = selected.data();
  p.num_selected = count.data();
  const auto message_of = [&](const RadarSelectParams& params) {
    try {
      cpu::radar_select(params);
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string("no exception");
  };
  RadarSelectParams bad = p;
  bad.score = static_cast<Score>(9);
  EXPECT_NE(message_of(bad).find("score value 9"), std::string::npos) << message_of(bad);
  bad = p;
  bad.policy = static_cast<Policy>(6);
  EXPECT_NE(message_of(bad).find("policy value 6"), std::string::npos) << message_of(bad);
  bad = p;
  bad.dtype = static_cast<DType>(4);
  EXPECT_NE(message_of(bad).find("dtype value 4"), std::string::npos) << message_of(bad);
  bad = p;
  bad.in_head_scores = nullptr;
  bad.policy = Policy::kThreshold;
  bad.score = Score::kMean;  // a lower bound cannot certify anything
  EXPECT_NE(message_of(bad).find("upper-bound"), std::string::npos) << message_of(bad);
}

// ---------------------------------------------------------------------------------------------
// Score::kSketch ("qsketch") and GroupAgg::kSum.

// The selection rows must equal topk under the group-sum priority (naive_group_sum_priority) of
// the per-head scores the kernel reports or was given.
void expect_sum_selection_matches_naive(const RadarSelectParams& p, const std::vector<int32_t>& lens,
                                        const SelectBuffers& out, const float* scores) {
  const int G = p.q_heads / p.kv_heads;
  for (int b = 0; b < p.batch; ++b) {
    const int32_t n_blocks = test::blocks_of(lens[b], p.block_size);
    for (int h = 0; h < p.kv_heads; ++h) {
      std::vector<std::vector<float>> head_scores(G);
      for (int g = 0; g < G; ++g) {
        const int64_t q_row = static_cast<int64_t>(b) * p.q_heads + h * G + g;
        head_scores[g].assign(scores + q_row * p.num_blocks, scores + (q_row + 1) * p.num_blocks);
      }
      std::vector<int32_t> expected =
          test::naive_topk_select(p, lens[b], test::naive_group_sum_priority(head_scores, n_blocks));
      const int64_t row = static_cast<int64_t>(b) * p.kv_heads + h;
      ASSERT_EQ(out.num_selected[row], static_cast<int32_t>(expected.size())) << "b=" << b << " h=" << h;
      expected.resize(static_cast<size_t>(p.num_blocks), -1);
      const std::vector<int32_t> actual(out.selected.begin() + row * p.num_blocks,
                                        out.selected.begin() + (row + 1) * p.num_blocks);
      ASSERT_EQ(actual, expected) << "b=" << b << " h=" << h << " len=" << lens[b];
    }
  }
}

test::SketchBuffers build_sketch(const TestKV& kv, const std::vector<int32_t>& lens, const std::vector<float>& key_proj,
                                 int rank, int per = 1) {
  test::SketchBuffers sketch(kv.batch, kv.heads, kv.num_blocks, kv.block_size, rank, kv.head_dim, per);
  sketch.poison();
  cpu::key_sketch(test::key_sketch_params(kv, lens, key_proj, rank, sketch));
  return sketch;
}

void attach_sketch(RadarSelectParams& p, const test::SketchBuffers& sketch, const std::vector<float>& key_proj,
                   const std::vector<float>& query_proj) {
  p.score = Score::kSketch;
  p.sketch_codes = sketch.codes.data();
  p.sketch_ranges = sketch.ranges.data();
  p.sketch_centroid = sketch.centroid_data();
  p.sketch_key_proj = key_proj.data();
  p.sketch_query_proj = query_proj.data();
  p.sketch_rank = sketch.rank;
  p.blocks_per_sketch = sketch.blocks_per_sketch;
}

struct SketchScoreCase {
  KVKind kind;
  int group, head_dim, block_size, rank;
  int32_t max_len;
};

// qsketch scores against a brute force (double) over the kernel's own codes, ranges and
// centroid, so code rounding never matters here; no block statistics are passed, and the sketch
// centroid only when centroid_weight != 0, so reading them would crash or produce NaN.
TEST(CpuRadarSelect, SketchScoresMatchBruteForceOverTheKernelsSketch) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 3, kv_heads = 2;
  const SketchScoreCase cases[] = {{KVKind::kPaged, 1, 64, 16, 2, 97},       {KVKind::kContiguous, 3, 40, 64, 8, 130},
                                   {KVKind::kTokenMajor, 4, 64, 64, 16, 200}, {KVKind::kPaged, 4, 40, 16, 16, 1},
                                   {KVKind::kContiguous, 3, 64, 16, 8, 16},   {KVKind::kPaged, 1, 40, 64, 2, 63}};
  std::vector<std::pair<SketchScoreCase, int>> with_per;  // every case with P = 1, 2, 4
  for (const SketchScoreCase& c : cases) {
    for (int per : {1, 2, 4}) {
      if (c.block_size * per <= 128) with_per.emplace_back(c, per);
    }
  }
  int n = 0;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (const auto& combo : with_per) {
      const SketchScoreCase& c = combo.first;
      const int per = combo.second;
      for (float weight : {0.0f, 0.75f}) {
        ++n;
        const int q_heads = kv_heads * c.group;
        const int num_blocks = (test::blocks_of(c.max_len, c.block_size * per) + 1) * per;
        TestKV kv(dtype, c.kind, batch, kv_heads, c.head_dim, c.block_size, num_blocks, rng);
        const std::vector<int32_t> lens = test::mixed_lengths(batch, c.max_len, c.block_size, rng);
        kv.poison_after(lens);
        std::normal_distribution<double> normal(0.0, 1.0 / std::sqrt(static_cast<double>(c.head_dim)));
        std::vector<float> key_proj(static_cast<size_t>(kv_heads) * c.head_dim * c.rank);
        std::vector<float> query_proj(static_cast<size_t>(q_heads) * c.head_dim * c.rank);
        for (auto& value : key_proj) value = static_cast<float>(normal(rng));
        for (auto& value : query_proj) value = static_cast<float>(normal(rng));
        const test::SketchBuffers sketch = build_sketch(kv, lens, key_proj, c.rank, per);
        TestQuery q(dtype, batch, q_heads, c.head_dim);
        q.fill_normal(rng, 2.0);

        const Policy policy = n % 3 == 2 ? Policy::kAdaptive : Policy::kTopK;
        const GroupAgg agg = n % 2 == 0 ? GroupAgg::kSum : GroupAgg::kMax;
        SCOPED_TRACE(std::string(test::dtype_name(dtype)) + " " + test::kv_kind_name(c.kind) +
                     " G=" + std::to_string(c.group) + " D=" + std::to_string(c.head_dim) +
                     " bs=" + std::to_string(c.block_size) + " R=" + std::to_string(c.rank) +
                     " max_len=" + std::to_string(c.max_len) + " P=" + std::to_string(per) +
                     " weight=" + std::to_string(weight) +
                     " policy=" + std::to_string(static_cast<int>(policy)) +
                     " agg=" + std::to_string(static_cast<int>(agg)));
        RadarSelectParams p = base_params(batch, q_heads, kv_heads, c.head_dim, c.block_size, num_blocks, lens);
        attach_sketch(p, sketch, key_proj, query_proj);
        p.centroid_weight = weight;
        if (weight == 0.0f) p.sketch_centroid = nullptr;  // not read without the centroid term
        p.q = q.data.data();
        p.q_stride_batch = q.stride_batch;
        p.q_stride_head = q.stride_head;
        p.dtype = dtype;
        p.policy = policy;
        p.group_agg = agg;
        p.budget_fraction = 0.3;
        p.mass = 0.8;
        SelectBuffers out(batch, q_heads, kv_heads, num_blocks);
        out.attach(p);
        cpu::radar_select(p);

        for (int b = 0; b < batch; ++b) {
          const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
          for (int hq = 0; hq < q_heads; ++hq) {
            const int h = hq / c.group;
            const int64_t q_row = static_cast<int64_t>(b) * q_heads + hq;
            ASSERT_EQ(out.head_mlo[q_row], kNegInf) << "qsketch has no lower bound: M_g = -inf";
            const std::vector<double> qg = q.row(b, hq);
            for (int j = 0; j < num_blocks; ++j) {
              const float actual = out.head_scores[q_row * num_blocks + j];
              if (j >= n_blocks) {
                ASSERT_EQ(actual, kNegInf) << "b=" << b << " head=" << hq << " block=" << j;
                continue;
              }
              const int tokens = std::min(lens[b], (j + 1) * c.block_size) - j * c.block_size;
              double magnitude = 0.0;
              const double expected = test::naive_sketch_score(
                  qg, &query_proj[static_cast<size_t>(hq) * c.head_dim * c.rank],
                  &key_proj[static_cast<size_t>(h) * c.head_dim * c.rank], sketch, b, h, j, tokens,
                  sketch.block_centroid(b, h, j).data(), weight, p.scale, &magnitude);
              const double u = std::ldexp(1.0, -24);
              const double tolerance = 2.0 * (c.head_dim + c.rank + 8) * u * magnitude + (c.block_size + 8) * u + 1e-6;
              ASSERT_NEAR(actual, expected, tolerance) << "b=" << b << " head=" << hq << " block=" << j;
            }
          }
        }
        if (agg == GroupAgg::kSum && policy == Policy::kTopK) {
          expect_sum_selection_matches_naive(p, lens, out, out.head_scores.data());
        } else {
          expect_selection_matches_naive(p, lens, out, out.head_scores.data(), out.head_mlo.data());
        }
        if (testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

// An independent check of the meaning: with rank = head_dim, identity projections and keys that
// the 4-bit codes hold exactly (integers 0..15, every block, hence every sketch block of P
// blocks, spanning 0..15 in every channel so step = 1), the qsketch score is the true
// log-sum-exp of the block's logits; the centroid term is a * (q - I u) . centroid = 0.
TEST(CpuRadarSelect, SketchScoreIsTheTrueBlockLogMassWhenTheSketchIsExact) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 4, kv_heads = 2, D = 8, R = 8;
  const int shapes[][2] = {{16, 1}, {16, 2}, {16, 4}, {64, 1}, {64, 2}};  // (block_size, P)
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (int G : {1, 3}) {
      for (const auto& shape : shapes) {
        const int bs = shape[0], per = shape[1];
        SCOPED_TRACE(std::string(test::dtype_name(dtype)) + " G=" + std::to_string(G) + " bs=" + std::to_string(bs) +
                     " P=" + std::to_string(per));
        const int q_heads = kv_heads * G;
        const int32_t max_len = 5 * bs + 3;
        const int num_blocks = test::blocks_of(max_len, bs * per) * per;
        TestKV kv(dtype, KVKind::kPaged, batch, kv_heads, D, bs, num_blocks, rng);
        const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng);
        std::uniform_int_distribution<int> level(0, 15);
        for (int b = 0; b < batch; ++b) {
          for (int h = 0; h < kv_heads; ++h) {
            for (int t = 0; t < num_blocks * bs; ++t) {
              for (int i = 0; i < D; ++i) {
                const int in_block = t % bs;
                kv.data.set(kv.offset(b, h, t) + i, in_block == 0 ? 0 : in_block == 1 ? 15 : level(rng));
              }
            }
          }
        }
        kv.poison_after(lens);
        std::vector<float> key_proj(static_cast<size_t>(kv_heads) * D * R, 0.0f);
        std::vector<float> query_proj(static_cast<size_t>(q_heads) * D * R, 0.0f);
        for (int h = 0; h < kv_heads; ++h) {
          for (int d = 0; d < D; ++d) key_proj[(static_cast<size_t>(h) * D + d) * R + d] = 1.0f;
        }
        for (int g = 0; g < q_heads; ++g) {
          for (int d = 0; d < D; ++d) query_proj[(static_cast<size_t>(g) * D + d) * R + d] = 1.0f;
        }
        const test::SketchBuffers sketch = build_sketch(kv, lens, key_proj, R, per);
        TestQuery q(dtype, batch, q_heads, D);
        q.fill_normal(rng, 0.5);

        RadarSelectParams p = base_params(batch, q_heads, kv_heads, D, bs, num_blocks, lens);
        attach_sketch(p, sketch, key_proj, query_proj);
        p.centroid_weight = 0.5f;
        p.q = q.data.data();
        p.q_stride_batch = q.stride_batch;
        p.q_stride_head = q.stride_head;
        p.dtype = dtype;
        p.budget_blocks = 2;
        SelectBuffers out(batch, q_heads, kv_heads, num_blocks);
        out.attach(p);
        cpu::radar_select(p);
        for (int b = 0; b < batch; ++b) {
          for (int hq = 0; hq < q_heads; ++hq) {
            const std::vector<double> qg = q.row(b, hq);
            for (int j = 0; j < test::blocks_of(lens[b], bs); ++j) {
              double top = -test::kInf;
              std::vector<double> logits;
              for (int t = j * bs; t < std::min(lens[b], (j + 1) * bs); ++t) {
                double dot = 0.0;
                for (int i = 0; i < D; ++i) dot += qg[i] * kv.at(b, hq / G, t, i);
                logits.push_back(p.scale * dot);
                top = std::max(top, logits.back());
              }
              double total = 0.0;
              for (double logit : logits) total += std::exp(logit - top);
              const double expected = top + std::log(total);
              ASSERT_NEAR(out.head_scores[(static_cast<int64_t>(b) * q_heads + hq) * num_blocks + j], expected,
                          1e-5 * (1.0 + std::fabs(expected)))
                  << "b=" << b << " head=" << hq << " block=" << j;
            }
          }
        }
      }
    }
  }
}

// Blocks of one sketch block are scored with its ranges and centroid (row (b * Hkv + h) * NB / P
// + j / P). Hand-made sketch buffers whose ranges and centroid have NB rows per (b, h), not
// NB / P, every row distinct: a kernel indexing them by block, or with rows of NB, reads other
// values. Within a sketch block every full block gets the same codes, so their scores must be
// equal, and they must equal the brute force over the sketch block's metadata.
TEST(CpuRadarSelect, SketchBlocksShareTheirSketchBlocksRangesAndCentroid) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 2, kv_heads = 2, G = 2, q_heads = kv_heads * G, D = 4, R = 2, bs = 16;
  for (int per : {2, 4}) {
    SCOPED_TRACE("P=" + std::to_string(per));
    const int num_blocks = 3 * per, NS = num_blocks / per;
    const std::vector<int32_t> lens = {num_blocks * bs - 5, (per + 1) * bs + 3};  // partial last blocks
    test::SketchBuffers sketch(batch, kv_heads, num_blocks, bs, R, D, per);
    std::uniform_int_distribution<int> byte(0, 255);
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < kv_heads; ++h) {
        for (int m = 0; m < NS; ++m) {
          // Codes of block m * P, copied into the other blocks of the sketch block.
          std::vector<uint8_t> first(static_cast<size_t>(bs) * R / 2);
          for (auto& value : first) value = static_cast<uint8_t>(byte(rng));
          for (int i = 0; i < per; ++i) {
            const int64_t at = sketch.block_index(b, h, static_cast<int64_t>(m) * per + i) * bs * (R / 2);
            std::copy(first.begin(), first.end(), sketch.codes.begin() + at);
          }
        }
      }
    }
    // Metadata buffers with NB rows per (b, h): the first NS rows of the tensor are the sketch's,
    // and every row (the rest too) holds distinct values.
    const int64_t rows = static_cast<int64_t>(batch) * kv_heads * num_blocks;
    std::vector<uint16_t> ranges(static_cast<size_t>(rows) * 2 * R), centroid(static_cast<size_t>(rows) * D);
    for (int64_t row = 0; row < rows; ++row) {
      for (int r = 0; r < R; ++r) {
        const double lo = -0.5 * static_cast<double>(row + 1) + 0.25 * r;
        ranges[row * 2 * R + r] = test::encode_bf16_exact(test::round_to_bf16(lo));
        ranges[row * 2 * R + R + r] = test::encode_bf16_exact(test::round_to_bf16(lo + 3.75 * (1 + (row + r) % 3)));
      }
      for (int d = 0; d < D; ++d) {
        centroid[row * D + d] = test::encode_bf16_exact(test::round_to_bf16(0.75 * static_cast<double>(row) - 3.0 + d));
      }
    }
    std::copy(ranges.begin(), ranges.begin() + static_cast<int64_t>(sketch.ranges.size()), sketch.ranges.begin());
    std::copy(centroid.begin(), centroid.begin() + static_cast<int64_t>(sketch.centroid.size()), sketch.centroid.begin());

    // key_proj keeps d = 0 -> r = 0 only, so q - key_proj u is nonzero and the centroid counts.
    std::normal_distribution<double> normal(0.0, 0.5);
    std::vector<float> key_proj(static_cast<size_t>(kv_heads) * D * R, 0.0f);
    std::vector<float> query_proj(static_cast<size_t>(q_heads) * D * R);
    for (int h = 0; h < kv_heads; ++h) key_proj[static_cast<size_t>(h) * D * R] = 1.0f;
    for (auto& value : query_proj) value = static_cast<float>(normal(rng));
    TestQuery q(DType::kFloat32, batch, q_heads, D);
    q.fill_normal(rng, 1.0);

    RadarSelectParams p = base_params(batch, q_heads, kv_heads, D, bs, num_blocks, lens);
    attach_sketch(p, sketch, key_proj, query_proj);
    p.sketch_ranges = ranges.data();
    p.sketch_centroid = centroid.data();
    p.centroid_weight = 0.5f;
    p.q = q.data.data();
    p.q_stride_batch = q.stride_batch;
    p.q_stride_head = q.stride_head;
    p.dtype = DType::kFloat32;
    p.budget_blocks = 2;
    SelectBuffers out(batch, q_heads, kv_heads, num_blocks);
    out.attach(p);
    cpu::radar_select(p);

    for (int b = 0; b < batch; ++b) {
      for (int hq = 0; hq < q_heads; ++hq) {
        const int h = hq / G;
        const std::vector<double> qg = q.row(b, hq);
        const float* scores = &out.head_scores[(static_cast<size_t>(b) * q_heads + hq) * num_blocks];
        for (int j = 0; j < test::blocks_of(lens[b], bs); ++j) {
          const std::string where = "b=" + std::to_string(b) + " head=" + std::to_string(hq) + " block=" + std::to_string(j);
          const int tokens = std::min(lens[b], (j + 1) * bs) - j * bs;
          double magnitude = 0.0;
          const double expected = test::naive_sketch_score(
              qg, &query_proj[static_cast<size_t>(hq) * D * R], &key_proj[static_cast<size_t>(h) * D * R], sketch, b,
              h, j, tokens, sketch.block_centroid(b, h, j).data(), p.centroid_weight, p.scale, &magnitude);
          ASSERT_NEAR(scores[j], expected, 1e-5 * (1.0 + magnitude)) << where;
          // A full block scores exactly like the sketch block's first block (same codes).
          if (tokens == bs && j % per != 0) {
            ASSERT_EQ(scores[j], scores[j - j % per]) << where;
          }
        }
      }
    }
  }
}

// Given the same per-head scores (a coarse grid, so ties are frequent, with -inf, +inf and NaN
// sprinkled in), topk with GroupAgg::kSum selects exactly what the naive rules select; the
// other policies ignore group_agg.
TEST(CpuRadarSelect, GroupSumSelectionIsIdenticalGivenTheSameScores) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, 1 << 30);
  const int block_sizes[] = {16, 64};
  const int groups[] = {1, 3, 4};
  const double fractions[] = {0.0, 0.125, 0.3, 0.5, 1.0};
  const float specials[] = {kNegInf, -kNegInf, test::float_nan()};
  for (int trial = 0; trial < 300; ++trial) {
    const int batch = 1 + pick(rng) % 4, kv_heads = 1 + pick(rng) % 3;
    const int G = groups[pick(rng) % 3], q_heads = kv_heads * G;
    const int block_size = block_sizes[pick(rng) % 2];
    const int32_t max_len = 1 + pick(rng) % (30 * block_size);
    const int num_blocks = test::blocks_of(max_len, block_size) + pick(rng) % 3;
    const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, block_size, rng);

    RadarSelectParams p = base_params(batch, q_heads, kv_heads, 8, block_size, num_blocks, lens);
    p.policy = trial % 4 == 3 ? static_cast<Policy>(1 + pick(rng) % 2) : Policy::kTopK;
    p.group_agg = GroupAgg::kSum;
    p.sink_blocks = pick(rng) % 3;
    p.recent_blocks = pick(rng) % 3;
    p.budget_blocks = pick(rng) % 3 == 0 ? 1 + pick(rng) % 12 : 0;
    p.budget_fraction = fractions[pick(rng) % 5];
    SCOPED_TRACE("trial " + std::to_string(trial) + " policy " + std::to_string(static_cast<int>(p.policy)) +
                 " G=" + std::to_string(G) + " bs=" + std::to_string(block_size));

    std::vector<float> scores(static_cast<size_t>(batch) * q_heads * num_blocks);
    std::vector<float> mlo(static_cast<size_t>(batch) * q_heads);
    std::uniform_int_distribution<int> grid(-12, 6);
    for (auto& value : scores) value = 0.5f * grid(rng);
    const int special_every = 3 + pick(rng) % 40;  // some trials have many, some few
    for (size_t n = 0; n < scores.size(); n += 1 + pick(rng) % special_every) {
      if (pick(rng) % 3 == 0) scores[n] = specials[pick(rng) % 3];
    }
    for (auto& value : mlo) value = 0.5f * std::uniform_int_distribution<int>(-4, 8)(rng);
    p.in_head_scores = scores.data();
    p.in_head_mlo = mlo.data();

    SelectBuffers out(batch, q_heads, kv_heads, num_blocks);
    out.attach(p);
    cpu::radar_select(p);
    if (p.policy == Policy::kTopK) {
      expect_sum_selection_matches_naive(p, lens, out, scores.data());
    } else {
      // NaN and +inf scores are outside what threshold/adaptive are compared on elsewhere.
      for (auto& value : scores) {
        if (!(value < -kNegInf)) value = 0.0f;
      }
      cpu::radar_select(p);
      expect_selection_matches_naive(p, lens, out, scores.data(), mlo.data());
    }
    if (testing::Test::HasFatalFailure()) return;
  }
}

TEST(CpuRadarSelect, GroupSumHandWorked) {
  // One KV head, G = 2, four full blocks, no forced blocks, budget 1.
  std::vector<int32_t> lens = {4 * 16};
  std::vector<float> scores(8), mlo(2, 0.0f);
  std::vector<int32_t> selected(4), count(1);
  RadarSelectParams p = base_params(1, 2, 1, 8, 16, 4, lens);
  p.in_head_scores = scores.data();
  p.in_head_mlo = mlo.data();
  p.selected = selected.data();
  p.num_selected = count.data();
  p.sink_blocks = 0;
  p.recent_blocks = 0;
  p.budget_blocks = 1;
  const auto run = [&](GroupAgg agg, std::vector<float> head0, std::vector<float> head1) {
    std::copy(head0.begin(), head0.end(), scores.begin());
    std::copy(head1.begin(), head1.end(), scores.begin() + 4);
    p.group_agg = agg;
    std::fill(selected.begin(), selected.end(), -7);
    cpu::radar_select(p);
    std::vector<int32_t> result(selected.begin(), selected.begin() + count[0]);
    for (int n = count[0]; n < 4; ++n) EXPECT_EQ(selected[n], -1);
    return result;
  };
  const float nan = test::float_nan(), inf = -kNegInf;
  const std::vector<int32_t> b0 = {0}, b1 = {1}, b2 = {2};

  // Max picks head 0's best block 0 (5 > 4.9); sum weighs shares: block 0 gets 0.52, block 1
  // 0.48 + ~1 from head 1.
  EXPECT_EQ(run(GroupAgg::kMax, {5.0f, 4.9f, -100.0f, -100.0f}, {-100.0f, 0.0f, -100.0f, -100.0f}), b0);
  EXPECT_EQ(run(GroupAgg::kSum, {5.0f, 4.9f, -100.0f, -100.0f}, {-100.0f, 0.0f, -100.0f, -100.0f}), b1);

  // A NaN score makes head 0's Z NaN: it adds nothing, head 1 alone ranks block 1 first. (Were
  // the NaN skipped in Z, block 2 would win: 0.73 + 0.22 > 0.27 + 0.61.)
  EXPECT_EQ(run(GroupAgg::kSum, {nan, 0.0f, 1.0f, kNegInf}, {0.0f, 2.0f, 1.0f, 0.0f}), b1);
  // +inf: m_g is not finite, the head adds nothing; max ranks the +inf block first.
  EXPECT_EQ(run(GroupAgg::kSum, {inf, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 1.0f, 0.0f}), b2);
  EXPECT_EQ(run(GroupAgg::kMax, {inf, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 1.0f, 0.0f}), b0);
  // A head of all -inf adds nothing; -inf blocks get no share from a head.
  EXPECT_EQ(run(GroupAgg::kSum, {kNegInf, kNegInf, kNegInf, kNegInf}, {kNegInf, 0.0f, 3.0f, kNegInf}), b2);
  // No head contributes: every S_j = 0, ties to the lower index.
  EXPECT_EQ(run(GroupAgg::kSum, {kNegInf, kNegInf, kNegInf, kNegInf}, {nan, 0.0f, 3.0f, kNegInf}), b0);
  // Equal shares tie: the lower index wins.
  p.budget_blocks = 2;
  EXPECT_EQ(run(GroupAgg::kSum, {1.0f, 1.0f, 1.0f, 1.0f}, {2.0f, 2.0f, 2.0f, 2.0f}), (std::vector<int32_t>{0, 1}));
  p.budget_blocks = 1;

  // S_j is rounded to float32 before ranking: shares 0.5 -/+ 2^-32 (distinct in double) both
  // round to 0.5 and tie, so block 0 wins; 0.5 -/+ 2^-22 stay distinct and block 1 wins.
  const float tiny = std::ldexp(1.0f, -30), small = std::ldexp(1.0f, -20);
  EXPECT_EQ(run(GroupAgg::kSum, {0.0f, tiny, kNegInf, kNegInf}, {kNegInf, kNegInf, kNegInf, kNegInf}), b0);
  EXPECT_EQ(run(GroupAgg::kSum, {0.0f, small, kNegInf, kNegInf}, {kNegInf, kNegInf, kNegInf, kNegInf}), b1);
}

TEST(CpuRadarSelect, SketchAndGroupAggValidation) {
  std::vector<int32_t> lens = {16};
  std::vector<float> scores = {0.0f}, mlo = {0.0f}, q(8, 1.0f), proj(8 * 4, 0.5f), centroid(8, 0.0f);
  // Sized for up to 8 blocks of 16 tokens, so the accepted P and num_blocks below can run.
  std::vector<uint8_t> codes(8 * 16 * 2, 0);
  std::vector<uint16_t> ranges(8 * 2 * 4, 0), sketch_centroid(8 * 8, 0);
  std::vector<int32_t> selected(1), selected2(2), selected8(8), count(1);
  RadarSelectParams p = base_params(1, 1, 1, 8, 16, 1, lens);
  p.q = q.data();
  p.q_stride_batch = 8;
  p.q_stride_head = 8;
  p.score = Score::kSketch;
  p.sketch_codes = codes.data();
  p.sketch_ranges = ranges.data();
  p.sketch_key_proj = proj.data();
  p.sketch_query_proj = proj.data();
  p.sketch_rank = 4;
  p.selected = selected.data();
  p.num_selected = count.data();
  const auto message_of = [&](const RadarSelectParams& params) {
    try {
      cpu::radar_select(params);
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string("no exception");
  };
  EXPECT_EQ(message_of(p), "no exception");
  EXPECT_EQ(count[0], 1);

  RadarSelectParams bad = p;
  bad.policy = Policy::kThreshold;  // an estimate cannot certify anything
  EXPECT_NE(message_of(bad).find("upper-bound"), std::string::npos) << message_of(bad);
  for (int rank : {0, 1, 3, 18, -2}) {
    bad = p;
    bad.sketch_rank = rank;
    EXPECT_NE(message_of(bad).find("sketch_rank " + std::to_string(rank)), std::string::npos) << message_of(bad);
  }
  bad = p;
  bad.sketch_codes = nullptr;
  EXPECT_NE(message_of(bad).find("sketch_codes"), std::string::npos) << message_of(bad);
  bad = p;
  bad.sketch_query_proj = nullptr;
  EXPECT_NE(message_of(bad).find("sketch_query_proj"), std::string::npos) << message_of(bad);
  bad = p;
  bad.centroid_weight = 0.5f;  // the centroid term needs the sketch's centroids ...
  EXPECT_NE(message_of(bad).find("needs sketch_centroid"), std::string::npos) << message_of(bad);
  bad.centroid = centroid.data();  // ... the block statistics' do not do
  EXPECT_NE(message_of(bad).find("needs sketch_centroid"), std::string::npos) << message_of(bad);
  bad.centroid = nullptr;
  bad.sketch_centroid = sketch_centroid.data();
  EXPECT_EQ(message_of(bad), "no exception");

  // blocks_per_sketch: a power of two in 1..8, num_blocks a multiple of it, P * block_size <= 128.
  for (int per : {0, -1, 3, 5, 16}) {
    bad = p;
    bad.blocks_per_sketch = per;
    EXPECT_NE(message_of(bad).find("blocks_per_sketch " + std::to_string(per) + " (allowed: a power of two, 1..8)"),
              std::string::npos)
        << message_of(bad);
  }
  bad = p;
  bad.blocks_per_sketch = 2;  // num_blocks is 1
  EXPECT_NE(message_of(bad).find("num_blocks 1 is not a multiple of blocks_per_sketch 2"), std::string::npos)
      << message_of(bad);
  bad.num_blocks = 2;
  bad.selected = selected2.data();
  EXPECT_EQ(message_of(bad), "no exception");
  bad = p;
  bad.blocks_per_sketch = 8;  // 8 * 16 = 128: allowed; num_blocks 8 then
  bad.num_blocks = 8;
  bad.selected = selected8.data();
  EXPECT_EQ(message_of(bad), "no exception");
  bad.block_size = 32;  // 256 tokens per sketch block
  EXPECT_NE(message_of(bad).find("block_size 32 * blocks_per_sketch 8 exceeds 128"), std::string::npos)
      << message_of(bad);
  bad = p;
  bad.group_agg = static_cast<GroupAgg>(7);
  EXPECT_NE(message_of(bad).find("group_agg value 7"), std::string::npos) << message_of(bad);
  bad = p;
  bad.score = static_cast<Score>(9);
  EXPECT_NE(message_of(bad).find("5 qsketch"), std::string::npos) << message_of(bad);

  // Given scores: the sketch is not read, so it need not be there (threshold too: the caller
  // vouches for given scores).
  RadarSelectParams given = p;
  given.sketch_codes = nullptr;
  given.sketch_ranges = nullptr;
  given.sketch_key_proj = nullptr;
  given.sketch_query_proj = nullptr;
  given.sketch_rank = 0;
  given.in_head_scores = scores.data();
  given.in_head_mlo = mlo.data();
  EXPECT_EQ(message_of(given), "no exception");
  given.policy = Policy::kThreshold;
  EXPECT_EQ(message_of(given), "no exception");
}

}  // namespace
}  // namespace aether
