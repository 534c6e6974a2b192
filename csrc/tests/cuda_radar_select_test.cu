// aether::cuda::radar_select against the double reference (scores, M_g) and the CPU kernel
// (selection). Given the same scores, topk must select exactly what the CPU selects; threshold
// and adaptive may differ only where the rules are decided at rounding level (a running sum
// within 1e-9 of eps / mass, or two priorities within 1e-12 of each other), which is checked
// explicitly. Outputs are poisoned before every call; large block counts exercise the
// workspace path (keys that do not fit in shared memory).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
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
using test::TestQuery;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using test::DeviceBytes;
using test::has_cuda_device;

template <typename T>
DeviceBytes to_device(const std::vector<T>& host) {
  return DeviceBytes(host.data(), host.size() * sizeof(T));
}

// Outputs of one radar_select call.
struct SelectOutputs {
  std::vector<int32_t> selected, num_selected;
  std::vector<float> head_scores, head_mlo;
  SelectOutputs(int batch, int q_heads, int kv_heads, int num_blocks)
      : selected(static_cast<size_t>(batch) * kv_heads * num_blocks),
        num_selected(static_cast<size_t>(batch) * kv_heads),
        head_scores(static_cast<size_t>(batch) * q_heads * num_blocks),
        head_mlo(static_cast<size_t>(batch) * q_heads) {}
  std::vector<int32_t> row(int64_t bh, int num_blocks) const {
    return std::vector<int32_t>(selected.begin() + bh * num_blocks, selected.begin() + (bh + 1) * num_blocks);
  }
};

// Host inputs referenced by `host` (q, statistics, given scores) are copied to the device. The
// integer outputs are poisoned with 0xA5 bytes (0xFF would read as the -1 padding), the float
// outputs with 0xFF (NaN), so every element the kernel must write is checked.
void run_cuda(const RadarSelectParams& host, size_t q_bytes, size_t stats_blocks, SelectOutputs& out) {
  const int64_t heads_q = static_cast<int64_t>(host.batch) * host.q_heads;
  const int64_t heads_kv = static_cast<int64_t>(host.batch) * host.kv_heads;
  const size_t D = host.head_dim;
  DeviceBytes d_q(host.q, host.q ? q_bytes : 0);
  DeviceBytes d_centroid(host.centroid, host.centroid ? stats_blocks * D * 4 : 0);
  DeviceBytes d_lo(host.lo, host.lo ? stats_blocks * D * 4 : 0);
  DeviceBytes d_hi(host.hi, host.hi ? stats_blocks * D * 4 : 0);
  DeviceBytes d_radius(host.radius, host.radius ? stats_blocks * 4 : 0);
  DeviceBytes d_spread(host.spread, host.spread ? stats_blocks * 4 : 0);
  DeviceBytes d_lens(host.seq_lens, host.batch * sizeof(int32_t));
  DeviceBytes d_in_scores(host.in_head_scores, host.in_head_scores ? heads_q * host.num_blocks * 4 : 0);
  DeviceBytes d_in_mlo(host.in_head_mlo, host.in_head_mlo ? heads_q * 4 : 0);
  DeviceBytes d_selected(out.selected.size() * 4);
  DeviceBytes d_num_selected(out.num_selected.size() * 4);
  DeviceBytes d_scores(out.head_scores.size() * 4);
  DeviceBytes d_mlo(out.head_mlo.size() * 4);
  ASSERT_CUDA(cudaMemset(d_selected.ptr, 0xA5, d_selected.size));
  ASSERT_CUDA(cudaMemset(d_num_selected.ptr, 0xA5, d_num_selected.size));
  ASSERT_CUDA(cudaMemset(d_scores.ptr, 0xFF, d_scores.size));
  ASSERT_CUDA(cudaMemset(d_mlo.ptr, 0xFF, d_mlo.size));

  RadarSelectParams p = host;
  p.q = host.q ? d_q.ptr : nullptr;
  p.centroid = host.centroid ? d_centroid.as<float>() : nullptr;
  p.lo = host.lo ? d_lo.as<float>() : nullptr;
  p.hi = host.hi ? d_hi.as<float>() : nullptr;
  p.radius = host.radius ? d_radius.as<float>() : nullptr;
  p.spread = host.spread ? d_spread.as<float>() : nullptr;
  p.seq_lens = d_lens.as<int32_t>();
  p.in_head_scores = host.in_head_scores ? d_in_scores.as<float>() : nullptr;
  p.in_head_mlo = host.in_head_mlo ? d_in_mlo.as<float>() : nullptr;
  p.selected = d_selected.as<int32_t>();
  p.num_selected = d_num_selected.as<int32_t>();
  p.out_head_scores = d_scores.as<float>();
  p.out_head_mlo = d_mlo.as<float>();
  DeviceBytes workspace(cuda::radar_select_workspace_bytes(p));
  ASSERT_NE(workspace.ptr, nullptr);
  ASSERT_CUDA(cudaMemset(workspace.ptr, 0xFF, workspace.size));  // the kernels must not rely on it
  ASSERT_CUDA(cuda::radar_select(p, workspace.ptr, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  (void)heads_kv;
  d_selected.download(out.selected.data());
  d_num_selected.download(out.num_selected.data());
  d_scores.download(out.head_scores.data());
  d_mlo.download(out.head_mlo.data());
}

void run_cpu(const RadarSelectParams& host, SelectOutputs& out) {
  RadarSelectParams p = host;
  p.selected = out.selected.data();
  p.num_selected = out.num_selected.data();
  p.out_head_scores = out.head_scores.data();
  p.out_head_mlo = out.head_mlo.data();
  cpu::radar_select(p);
}

// Priorities of one (b, kv head) in double, as docs/architecture.md defines them, with the
// candidate order (descending priority, ties to the lower index).
struct Priorities {
  std::vector<double> value;
  std::vector<bool> forced;
  std::vector<int32_t> order;
  int32_t n_forced = 0;
};

Priorities priorities_of(const RadarSelectParams& p, int32_t len, const float* scores, const float* mlo) {
  // scores: [G][num_blocks] rows of this group, mlo: [G].
  const int G = p.q_heads / p.kv_heads;
  const int32_t bs = p.block_size;
  const int32_t n_blocks = std::min(test::blocks_of(len, bs), p.num_blocks);
  const int32_t n_full = len / bs;
  auto tokens = [&](int32_t j) { return static_cast<double>(std::min(len, (j + 1) * bs) - j * bs); };
  auto score = [&](int g, int32_t j) { return static_cast<double>(scores[static_cast<size_t>(g) * p.num_blocks + j]); };
  Priorities r;
  r.value.assign(n_blocks, 0.0);
  r.forced.assign(n_blocks, false);
  for (int32_t j = 0; j < n_blocks; ++j) {
    r.forced[j] = j < p.sink_blocks || (j >= n_full - p.recent_blocks && j < n_full) || (j == n_full && len % bs != 0);
    r.n_forced += r.forced[j] ? 1 : 0;
  }
  if (p.policy == Policy::kTopK) {
    for (int32_t j = 0; j < n_blocks; ++j) {
      double best = -test::kInf;
      for (int g = 0; g < G; ++g) best = std::max(best, score(g, j));
      r.value[j] = best;
    }
  } else if (p.policy == Policy::kThreshold) {
    for (int32_t j = 0; j < n_blocks; ++j) {
      double best = -test::kInf;
      for (int g = 0; g < G; ++g) best = std::max(best, score(g, j) - static_cast<double>(mlo[g]));
      const double value = std::log(tokens(j)) + best;
      r.value[j] = std::isnan(value) ? test::kInf : value;
    }
  } else {
    for (int g = 0; g < G; ++g) {
      double top = -test::kInf;
      for (int32_t j = 0; j < n_blocks; ++j) top = std::max(top, score(g, j));
      double total = 0.0;
      for (int32_t j = 0; j < n_blocks; ++j) total += tokens(j) * std::exp(score(g, j) - top);
      if (!(total > 0.0) || !std::isfinite(total)) continue;
      for (int32_t j = 0; j < n_blocks; ++j) r.value[j] += tokens(j) * std::exp(score(g, j) - top) / total;
    }
    for (auto& v : r.value) v = std::isnan(v / G) ? 0.0 : v / G;
  }
  for (int32_t j = 0; j < n_blocks; ++j) {
    if (!r.forced[j]) r.order.push_back(j);
  }
  std::stable_sort(r.order.begin(), r.order.end(), [&](int32_t a, int32_t b) { return r.value[a] > r.value[b]; });
  return r;
}

bool close(double a, double b, double relative) {
  if (a == b) return true;
  return std::fabs(a - b) <= relative * std::max(std::fabs(a), std::fabs(b));
}

// Success when the CUDA row equals the CPU row, or (threshold / adaptive) when every difference
// is decided at rounding level.
testing::AssertionResult same_up_to_rounding(const RadarSelectParams& p, int32_t len, const float* scores,
                                             const float* mlo, const std::vector<int32_t>& cuda_set,
                                             const std::vector<int32_t>& cpu_set) {
  if (cuda_set == cpu_set) return testing::AssertionSuccess();
  if (p.policy == Policy::kTopK) return testing::AssertionFailure() << "topk selection differs";
  const Priorities pr = priorities_of(p, len, scores, mlo);
  const int32_t n_cand = static_cast<int32_t>(pr.order.size());
  const std::set<int32_t> a(cuda_set.begin(), cuda_set.end());
  for (size_t j = 0; j < pr.forced.size(); ++j) {
    if (pr.forced[j] && !a.count(static_cast<int32_t>(j))) return testing::AssertionFailure() << "forced block " << j << " missing";
  }
  const int32_t k_cuda = static_cast<int32_t>(cuda_set.size()) - pr.n_forced;
  const int32_t k_cpu = static_cast<int32_t>(cpu_set.size()) - pr.n_forced;
  if (k_cuda < 0 || k_cuda > n_cand) return testing::AssertionFailure() << "count " << k_cuda << " out of range";
  const int32_t k_lo = std::min(k_cuda, k_cpu), k_hi = std::max(k_cuda, k_cpu);
  if (p.policy == Policy::kThreshold) {
    // Dropped d = n_cand - k from the bottom; the sums where the two disagree must be ~eps.
    double sum = 0.0;
    for (int32_t d = 1; d <= n_cand; ++d) {
      sum += std::exp(pr.value[pr.order[n_cand - d]]);
      const int32_t k = n_cand - d;  // kept when d are dropped
      if (k >= k_lo && k < k_hi && !close(sum, p.eps, 1e-9)) {
        return testing::AssertionFailure() << "threshold count " << k_cuda << " vs " << k_cpu << ": dropped sum " << sum
                                           << " is not at eps " << p.eps;
      }
    }
  } else {
    double mass = 0.0;
    for (size_t j = 0; j < pr.forced.size(); ++j) mass += pr.forced[j] ? pr.value[j] : 0.0;
    for (int32_t k = 0; k < k_hi; ++k) {
      if (k >= k_lo && !close(mass, p.mass, 1e-9)) {
        return testing::AssertionFailure() << "adaptive count " << k_cuda << " vs " << k_cpu << ": mass " << mass
                                           << " is not at " << p.mass;
      }
      mass += pr.value[pr.order[k]];
    }
  }
  // Membership for the CUDA count: the top k_cuda, up to swaps of near-equal priorities.
  if (k_cuda > 0) {
    const double boundary = pr.value[pr.order[k_cuda - 1]];
    std::set<int32_t> expected(pr.order.begin(), pr.order.begin() + k_cuda);
    for (size_t j = 0; j < pr.forced.size(); ++j) {
      if (pr.forced[j]) expected.insert(static_cast<int32_t>(j));
    }
    for (int32_t j : a) {
      if (!expected.count(j) && !close(pr.value[j], boundary, 1e-12)) {
        return testing::AssertionFailure() << "block " << j << " (priority " << pr.value[j] << ") selected past the boundary "
                                           << boundary;
      }
    }
    for (int32_t j : expected) {
      if (!a.count(j) && !close(pr.value[j], boundary, 1e-12)) {
        return testing::AssertionFailure() << "block " << j << " (priority " << pr.value[j] << ") missing before the boundary "
                                           << boundary;
      }
    }
  }
  return testing::AssertionSuccess();
}

// Compares the whole selection output (rows with padding, counts) of CUDA against the CPU.
void expect_same_selection(const RadarSelectParams& p, const std::vector<int32_t>& lens, const SelectOutputs& cuda_out,
                           const SelectOutputs& cpu_out, const float* scores, const float* mlo) {
  const int G = p.q_heads / p.kv_heads;
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.kv_heads; ++h) {
      const int64_t bh = static_cast<int64_t>(b) * p.kv_heads + h;
      SCOPED_TRACE("b=" + std::to_string(b) + " h=" + std::to_string(h) + " len=" + std::to_string(lens[b]));
      const int32_t count = cuda_out.num_selected[bh];
      ASSERT_GE(count, 0);
      ASSERT_LE(count, p.num_blocks);
      const std::vector<int32_t> row = cuda_out.row(bh, p.num_blocks);
      for (int32_t n = count; n < p.num_blocks; ++n) ASSERT_EQ(row[n], -1) << "padding at " << n;
      const std::vector<int32_t> cuda_set(row.begin(), row.begin() + count);
      ASSERT_TRUE(std::is_sorted(cuda_set.begin(), cuda_set.end()));
      const std::vector<int32_t> cpu_row = cpu_out.row(bh, p.num_blocks);
      const std::vector<int32_t> cpu_set(cpu_row.begin(), cpu_row.begin() + cpu_out.num_selected[bh]);
      const int64_t q_row = static_cast<int64_t>(b) * p.q_heads + static_cast<int64_t>(h) * G;
      ASSERT_TRUE(same_up_to_rounding(p, lens[b], scores + q_row * p.num_blocks, mlo + q_row, cuda_set, cpu_set));
    }
  }
}

RadarSelectParams base_params(int batch, int q_heads, int kv_heads, int head_dim, int block_size, int num_blocks,
                              const std::vector<int32_t>& lens) {
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

struct RadarCase {
  DType dtype;
  int group, head_dim, block_size;
  int32_t max_len;
};

TEST(CudaRadarSelect, ScoresWithinFloatRoundingAndSelectionMatchesCpu) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const RadarCase cases[] = {
      {DType::kFloat32, 1, 64, 16, 97},     {DType::kFloat16, 2, 128, 32, 1025}, {DType::kBFloat16, 4, 256, 64, 63},
      {DType::kBFloat16, 8, 128, 16, 1025}, {DType::kFloat16, 7, 64, 128, 3000}, {DType::kBFloat16, 16, 128, 16, 700},
      {DType::kFloat32, 20, 64, 32, 500},   {DType::kBFloat16, 3, 256, 16, 4100}};
  const Score scores[] = {Score::kBall, Score::kBox, Score::kTight, Score::kMean, Score::kVariance};
  const int batch = 3, kv_heads = 2;
  int n = 0;
  for (const RadarCase& c : cases) {
    const int q_heads = kv_heads * c.group;
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 2;
    TestKV kv(c.dtype, n % 2 ? KVKind::kPaged : KVKind::kContiguous, batch, kv_heads, c.head_dim, c.block_size,
              num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, c.max_len, c.block_size, rng);
    StatsBuffers stats = test::cpu_block_stats(kv, lens);
    TestQuery q(c.dtype, batch, q_heads, c.head_dim);
    q.fill_normal(rng);
    for (Score score : scores) {
      for (Policy policy : {Policy::kTopK, Policy::kThreshold, Policy::kAdaptive}) {
        if (policy == Policy::kThreshold && (score == Score::kMean || score == Score::kVariance)) continue;
        const Policy this_policy = policy;
        SCOPED_TRACE(std::string(test::dtype_name(c.dtype)) + " G=" + std::to_string(c.group) + " D=" +
                     std::to_string(c.head_dim) + " bs=" + std::to_string(c.block_size) + " score=" +
                     std::to_string(static_cast<int>(score)) + " policy=" + std::to_string(static_cast<int>(this_policy)));
        RadarSelectParams p = base_params(batch, q_heads, kv_heads, c.head_dim, c.block_size, num_blocks, lens);
        p.q = q.data.data();
        p.q_stride_batch = q.stride_batch;
        p.q_stride_head = q.stride_head;
        p.dtype = c.dtype;
        p.centroid = stats.centroid.data();
        p.lo = stats.lo.data();
        p.hi = stats.hi.data();
        p.radius = stats.radius.data();
        p.spread = stats.spread.data();
        p.score = score;
        p.policy = this_policy;
        p.budget_fraction = 0.3;
        p.eps = 1e-2;
        p.mass = 0.9;
        p.sink_blocks = n % 3;
        p.recent_blocks = (n + 1) % 3;
        ++n;
        SelectOutputs cuda_out(batch, q_heads, kv_heads, num_blocks);
        run_cuda(p, q.data.size_bytes(), static_cast<size_t>(batch) * kv_heads * num_blocks, cuda_out);
        if (testing::Test::HasFatalFailure()) return;

        // Scores and M_g against the double reference, within float32 dot-product rounding.
        const double u32 = std::ldexp(1.0, -24);
        for (int b = 0; b < batch; ++b) {
          const int32_t n_blocks = test::blocks_of(lens[b], c.block_size);
          for (int hq = 0; hq < q_heads; ++hq) {
            const int h = hq / c.group;
            const std::vector<double> qv = q.row(b, hq);
            double q_norm = 0.0;
            for (double x : qv) q_norm += x * x;
            q_norm = std::sqrt(q_norm);
            const int64_t row = static_cast<int64_t>(b) * q_heads + hq;
            double mlo = -test::kInf, mlo_magnitude = 0.0;
            for (int j = 0; j < num_blocks; ++j) {
              const float actual = cuda_out.head_scores[row * num_blocks + j];
              if (j >= n_blocks) {
                ASSERT_EQ(actual, kNegInf) << "b=" << b << " head=" << hq << " block " << j;
                continue;
              }
              const int64_t blk = stats.block_index(b, h, j);
              const float* mu = &stats.centroid[blk * c.head_dim];
              const float* lo = &stats.lo[blk * c.head_dim];
              const float* hi = &stats.hi[blk * c.head_dim];
              const double expected = test::naive_score(score, qv, mu, lo, hi, stats.radius[blk], stats.spread[blk], p.scale);
              double magnitude = 0.0, dot = 0.0, dot_magnitude = 0.0;
              for (int i = 0; i < c.head_dim; ++i) {
                magnitude += std::fabs(qv[i]) * (std::fabs(mu[i]) + std::max(std::fabs(lo[i]), std::fabs(hi[i])));
                dot += qv[i] * mu[i];
                dot_magnitude += std::fabs(qv[i] * mu[i]);
              }
              magnitude = p.scale * (magnitude + q_norm * stats.radius[blk] * (1.0 + std::sqrt(stats.spread[blk])));
              ASSERT_NEAR(actual, expected, 2.0 * c.head_dim * u32 * magnitude + 1e-6)
                  << "b=" << b << " head=" << hq << " block " << j;
              if (p.scale * dot > mlo) {
                mlo = p.scale * dot;
                mlo_magnitude = p.scale * dot_magnitude;
              }
            }
            const float actual_mlo = cuda_out.head_mlo[row];
            if (n_blocks == 0) {
              ASSERT_EQ(actual_mlo, kNegInf);
            } else {
              ASSERT_NEAR(actual_mlo, mlo, 2.0 * c.head_dim * u32 * (mlo_magnitude + std::fabs(mlo)) + 1e-6);
            }
          }
        }

        // Selection: the CPU rules applied to the scores the CUDA kernel reports.
        RadarSelectParams given = p;
        given.in_head_scores = cuda_out.head_scores.data();
        given.in_head_mlo = cuda_out.head_mlo.data();
        SelectOutputs cpu_out(batch, q_heads, kv_heads, num_blocks);
        run_cpu(given, cpu_out);
        expect_same_selection(p, lens, cuda_out, cpu_out, cuda_out.head_scores.data(), cuda_out.head_mlo.data());
        if (testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

// Given the same per-head scores (on a coarse grid: many ties), random policies and parameters:
// identical to the CPU for topk, up to rounding for the others; deterministic run to run.
TEST(CudaRadarSelect, SelectionGivenTheSameScoresMatchesCpu) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, 1 << 30);
  const int block_sizes[] = {16, 32, 64, 128};
  const int groups[] = {1, 2, 3, 4, 8, 16, 20};
  const double eps_values[] = {0.0, 1e-3, 0.1, 1.0, 30.0};
  const double mass_values[] = {0.0, 0.5, 0.9, 0.99, 1.0};
  const double fractions[] = {0.0, 0.125, 0.3, 0.5, 1.0, 2.0};
  for (int trial = 0; trial < 240; ++trial) {
    const int batch = 1 + pick(rng) % 4, kv_heads = 1 + pick(rng) % 3;
    const int G = groups[pick(rng) % 7], q_heads = kv_heads * G;
    const int block_size = block_sizes[pick(rng) % 4];
    const int32_t max_len = 1 + pick(rng) % (trial % 10 == 0 ? 3000 * block_size : 40 * block_size);
    const int num_blocks = test::blocks_of(max_len, block_size) + pick(rng) % 3;
    const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, block_size, rng);
    RadarSelectParams p = base_params(batch, q_heads, kv_heads, 64, block_size, num_blocks, lens);
    p.policy = static_cast<Policy>(trial % 3);
    p.sink_blocks = pick(rng) % 3;
    p.recent_blocks = pick(rng) % 4;
    p.budget_blocks = pick(rng) % 3 == 0 ? 1 + pick(rng) % 12 : 0;
    p.budget_fraction = fractions[pick(rng) % 6];
    p.eps = eps_values[pick(rng) % 5];
    p.mass = mass_values[pick(rng) % 5];
    p.min_blocks = pick(rng) % 4;
    p.max_blocks = pick(rng) % 2 == 0 ? 0 : pick(rng) % 10;
    p.group_agg = pick(rng) % 2 == 0 ? GroupAgg::kMax : GroupAgg::kSum;  // read by topk only
    SCOPED_TRACE("trial " + std::to_string(trial) + " policy " + std::to_string(trial % 3) + " agg " +
                 std::to_string(static_cast<int>(p.group_agg)) + " G=" + std::to_string(G) +
                 " bs=" + std::to_string(block_size) + " NB=" + std::to_string(num_blocks));

    std::vector<float> scores(static_cast<size_t>(batch) * q_heads * num_blocks, kNegInf);
    std::vector<float> mlo(static_cast<size_t>(batch) * q_heads);
    std::uniform_int_distribution<int> grid(-40, 6);
    for (auto& s : scores) s = 0.5f * grid(rng);
    if (p.policy != Policy::kAdaptive) {
      for (size_t n = 0; n < scores.size(); n += 1 + pick(rng) % 7) scores[n] = kNegInf;
    }
    for (auto& m : mlo) m = 0.5f * std::uniform_int_distribution<int>(-4, 8)(rng);
    p.in_head_scores = scores.data();
    p.in_head_mlo = mlo.data();

    SelectOutputs cpu_out(batch, q_heads, kv_heads, num_blocks);
    run_cpu(p, cpu_out);
    SelectOutputs cuda_out(batch, q_heads, kv_heads, num_blocks), again(batch, q_heads, kv_heads, num_blocks);
    run_cuda(p, 0, 0, cuda_out);
    run_cuda(p, 0, 0, again);
    if (testing::Test::HasFatalFailure()) return;
    ASSERT_EQ(cuda_out.selected, again.selected) << "not deterministic";
    ASSERT_EQ(cuda_out.num_selected, again.num_selected) << "not deterministic";
    expect_same_selection(p, lens, cuda_out, cpu_out, scores.data(), mlo.data());
    if (testing::Test::HasFatalFailure()) return;
    // The given scores and M_g are echoed, -inf past the end.
    for (int b = 0; b < batch; ++b) {
      const int32_t n_blocks = test::blocks_of(lens[b], block_size);
      for (int hq = 0; hq < q_heads; ++hq) {
        const int64_t row = static_cast<int64_t>(b) * q_heads + hq;
        ASSERT_EQ(cuda_out.head_mlo[row], mlo[row]);
        for (int j = 0; j < num_blocks; ++j) {
          ASSERT_EQ(cuda_out.head_scores[row * num_blocks + j], j < n_blocks ? scores[row * num_blocks + j] : kNegInf);
        }
      }
    }
  }
}

// Block counts whose keys exceed shared memory (workspace path) and long runs of equal scores.
// topk with the sum aggregation also covers the unstaged head scores (G = 4): NB = 8192 and 20000
// keep the keys in shared memory but read the scores from global memory, 70000 keeps nothing there.
// The random grid above stages them (rows of up to a few thousand blocks).
TEST(CudaRadarSelect, LargeBlockCountsUseTheWorkspace) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 2, kv_heads = 2, G = 4, q_heads = kv_heads * G, bs = 16;
  for (int num_blocks : {8192, 20000, 70000}) {
    for (int variant = 0; variant < 4; ++variant) {
      const Policy policy = variant == 3 ? Policy::kTopK : static_cast<Policy>(variant);
      const GroupAgg agg = variant == 3 ? GroupAgg::kSum : GroupAgg::kMax;
      SCOPED_TRACE("NB=" + std::to_string(num_blocks) + " policy " + std::to_string(static_cast<int>(policy)) +
                   " agg " + std::to_string(static_cast<int>(agg)));
      const std::vector<int32_t> lens = {num_blocks * bs, num_blocks * bs - 37};
      RadarSelectParams p = base_params(batch, q_heads, kv_heads, 128, bs, num_blocks, lens);
      p.policy = policy;
      p.group_agg = agg;
      p.budget_fraction = 0.125;
      p.eps = 0.05;
      p.mass = 0.9;
      std::vector<float> scores(static_cast<size_t>(batch) * q_heads * num_blocks);
      std::normal_distribution<float> normal(0.0f, 2.0f);
      for (size_t n = 0; n < scores.size(); ++n) {
        // A quarter of the blocks share one of a few values: long tie runs across the boundary.
        scores[n] = (n % 4 == 0) ? 0.25f * static_cast<float>(n % 3) : normal(rng);
      }
      std::vector<float> mlo(static_cast<size_t>(batch) * q_heads, 6.0f);
      p.in_head_scores = scores.data();
      p.in_head_mlo = mlo.data();
      SelectOutputs cpu_out(batch, q_heads, kv_heads, num_blocks), cuda_out(batch, q_heads, kv_heads, num_blocks);
      run_cpu(p, cpu_out);
      run_cuda(p, 0, 0, cuda_out);
      if (testing::Test::HasFatalFailure()) return;
      expect_same_selection(p, lens, cuda_out, cpu_out, scores.data(), mlo.data());
      if (testing::Test::HasFatalFailure()) return;
    }
  }
}

}  // namespace
}  // namespace aether
