// CPU radar + selection: score every valid block of (b, kv head) for the G query heads of its
// group, then select blocks by the policy, exactly as docs/architecture.md ("Selection") says.
// Score::kSketch reads the key sketch (key_sketch.cpp) instead of the block statistics; topk's
// group priority is the max over the heads or (GroupAgg::kSum) the sum of their softmax shares.
//
// Scores are float32 (like the CUDA kernels); every quantity the selection derives from them
// (group priority, threshold running sum, adaptive masses) is double, so the selection is a
// deterministic function of the float32 per-head scores and matches any implementation that
// follows the same rules.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "aether/cpu/common.h"
#include "aether/cpu/kernels.h"

namespace aether {
namespace cpu {
namespace {

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
constexpr double kInfD = std::numeric_limits<double>::infinity();

bool is_upper_bound(Score score) {
  return score == Score::kBall || score == Score::kBox || score == Score::kTight;
}

void check_params(const RadarSelectParams& p) {
  switch (p.score) {
    case Score::kBall:
    case Score::kBox:
    case Score::kTight:
    case Score::kMean:
    case Score::kVariance:
    case Score::kSketch:
      break;
    default:
      throw std::invalid_argument("aether::cpu::radar_select: unsupported score value " +
                                  std::to_string(static_cast<int32_t>(p.score)) +
                                  " (allowed: 0 ball, 1 box, 2 tight, 3 mean, 4 variance, 5 qsketch)");
  }
  switch (p.policy) {
    case Policy::kTopK:
    case Policy::kThreshold:
    case Policy::kAdaptive:
      break;
    default:
      throw std::invalid_argument("aether::cpu::radar_select: unsupported policy value " +
                                  std::to_string(static_cast<int32_t>(p.policy)) +
                                  " (allowed: 0 topk, 1 threshold, 2 adaptive)");
  }
  switch (p.group_agg) {
    case GroupAgg::kMax:
    case GroupAgg::kSum:
      break;
    default:
      throw std::invalid_argument("aether::cpu::radar_select: unsupported group_agg value " +
                                  std::to_string(static_cast<int32_t>(p.group_agg)) +
                                  " (allowed: 0 max, 1 sum)");
  }
  // The threshold certificate needs an upper bound; with given scores the caller vouches for them.
  if (p.policy == Policy::kThreshold && p.in_head_scores == nullptr && !is_upper_bound(p.score)) {
    throw std::invalid_argument("aether::cpu::radar_select: the threshold policy needs an upper-bound "
                                "score (ball, box or tight), got score value " +
                                std::to_string(static_cast<int32_t>(p.score)));
  }
  if (p.score == Score::kSketch && p.in_head_scores == nullptr) {
    if (p.sketch_rank < 2 || p.sketch_rank > kMaxSketchRank || p.sketch_rank % 2 != 0) {
      throw std::invalid_argument("aether::cpu::radar_select: unsupported sketch_rank " +
                                  std::to_string(p.sketch_rank) + " (allowed: even, 2.." +
                                  std::to_string(kMaxSketchRank) + ")");
    }
    if (p.sketch_codes == nullptr || p.sketch_ranges == nullptr || p.sketch_key_proj == nullptr ||
        p.sketch_query_proj == nullptr) {
      throw std::invalid_argument("aether::cpu::radar_select: score qsketch needs sketch_codes, "
                                  "sketch_ranges, sketch_key_proj and sketch_query_proj (got a null one)");
    }
    const std::string per_error = blocks_per_sketch_error(p.blocks_per_sketch, p.block_size, p.num_blocks);
    if (!per_error.empty()) throw std::invalid_argument("aether::cpu::radar_select: " + per_error);
    // The centroid term reads the sketch's own centroid; the block statistics are not read.
    if (p.centroid_weight != 0.0f && p.sketch_centroid == nullptr) {
      throw std::invalid_argument("aether::cpu::radar_select: score qsketch with centroid_weight " +
                                  std::to_string(p.centroid_weight) + " != 0 needs sketch_centroid (got null)");
    }
  }
}

// Score::kSketch: float32 per-head scores [G][n_blocks] of one (b, kv head), the natural
// log-sum-exp of each valid block's approximate token logits (RadarSelectParams in params.h).
void sketch_head_scores(const RadarSelectParams& p, int64_t b, int64_t h, int32_t n_blocks,
                        const std::vector<float>& q, std::vector<float>& scores) {
  const int32_t G = p.q_heads / p.kv_heads;
  const int32_t D = p.head_dim;
  const int32_t R = p.sketch_rank;
  const int32_t bytes = R / 2;
  const int32_t bs = p.block_size;
  const int32_t len = p.seq_lens[b];
  const int64_t NB = p.num_blocks;
  const bool use_centroid = p.centroid_weight != 0.0f;

  // u_g = query_proj_g^T q_g; with the centroid term also q_g - key_proj_h u_g, the part of q_g
  // the sketch does not see.
  std::vector<float> u(static_cast<size_t>(G) * R, 0.0f);
  std::vector<float> rest;
  const float* key_proj = p.sketch_key_proj + h * static_cast<int64_t>(D) * R;  // [D, R]
  for (int32_t g = 0; g < G; ++g) {
    const float* qg = &q[static_cast<size_t>(g) * D];
    const float* query_proj = p.sketch_query_proj + (h * G + g) * static_cast<int64_t>(D) * R;
    float* ug = &u[static_cast<size_t>(g) * R];
    for (int32_t d = 0; d < D; ++d) {
      for (int32_t r = 0; r < R; ++r) ug[r] += query_proj[static_cast<int64_t>(d) * R + r] * qg[d];
    }
  }
  if (use_centroid) {
    rest.resize(static_cast<size_t>(G) * D);
    for (int32_t g = 0; g < G; ++g) {
      const float* ug = &u[static_cast<size_t>(g) * R];
      for (int32_t d = 0; d < D; ++d) {
        float projected = 0.0f;
        for (int32_t r = 0; r < R; ++r) projected += key_proj[static_cast<int64_t>(d) * R + r] * ug[r];
        rest[static_cast<size_t>(g) * D + d] = q[static_cast<size_t>(g) * D + d] - projected;
      }
    }
  }

  // Block j reads the ranges and centroid of its sketch block m = j / P (rows of NB / P) and
  // its own codes (rows of NB).
  const int32_t P = p.blocks_per_sketch;
  const int64_t block_row = (b * p.kv_heads + h) * NB;         // index of block 0 of this (b, h)
  const int64_t sketch_row = (b * p.kv_heads + h) * (NB / P);  // index of sketch block 0
  std::vector<float> deq(static_cast<size_t>(bs) * R);
  std::vector<float> logits(static_cast<size_t>(bs));
  std::vector<float> centroid(use_centroid ? static_cast<size_t>(D) : 0);
  float lo[kMaxSketchRank];
  float step[kMaxSketchRank];
  for (int32_t j = 0; j < n_blocks; ++j) {
    const int64_t token_begin = static_cast<int64_t>(j) * bs;
    const int32_t n = static_cast<int32_t>(std::min<int64_t>(len, token_begin + bs) - token_begin);
    if (j % P == 0) {  // first block of a sketch block: load its shared metadata
      const int64_t m = j / P;
      const uint16_t* lo_bits = p.sketch_ranges + (sketch_row + m) * 2 * R;
      const uint16_t* hi_bits = lo_bits + R;
      for (int32_t r = 0; r < R; ++r) {
        lo[r] = bfloat16_to_float(lo_bits[r]);
        step[r] = sketch_step(lo_bits[r], hi_bits[r]);
      }
      if (use_centroid) {
        const uint16_t* centroid_bits = p.sketch_centroid + (sketch_row + m) * D;
        for (int32_t d = 0; d < D; ++d) centroid[d] = bfloat16_to_float(centroid_bits[d]);
      }
    }
    const uint8_t* codes = p.sketch_codes + (block_row + j) * static_cast<int64_t>(bs) * bytes;
    for (int32_t t = 0; t < n; ++t) {
      for (int32_t i = 0; i < bytes; ++i) {
        const uint8_t byte = codes[static_cast<int64_t>(t) * bytes + i];
        deq[static_cast<size_t>(t) * R + 2 * i] = lo[2 * i] + static_cast<float>(byte & 0xF) * step[2 * i];
        deq[static_cast<size_t>(t) * R + 2 * i + 1] =
            lo[2 * i + 1] + static_cast<float>(byte >> kSketchBits) * step[2 * i + 1];
      }
    }

    for (int32_t g = 0; g < G; ++g) {
      const float* ug = &u[static_cast<size_t>(g) * R];
      float base = 0.0f;
      if (use_centroid) {
        const float* rg = &rest[static_cast<size_t>(g) * D];
        for (int32_t d = 0; d < D; ++d) base += rg[d] * centroid[d];
        base *= p.centroid_weight;
      }
      float top = kNegInfF;
      for (int32_t t = 0; t < n; ++t) {
        float dot = 0.0f;
        for (int32_t r = 0; r < R; ++r) dot += ug[r] * deq[static_cast<size_t>(t) * R + r];
        logits[t] = p.scale * (dot + base);
        top = top < logits[t] ? logits[t] : top;  // skips NaN; a NaN logit still poisons the sum
      }
      float score = top;  // all -inf: -inf; +inf: +inf
      if (std::isfinite(top)) {
        float total = 0.0f;
        for (int32_t t = 0; t < n; ++t) total += std::exp(logits[t] - top);
        score = top + std::log(total);
      }
      scores[static_cast<size_t>(g) * n_blocks + j] = score;
    }
  }
}

// Per-head scores (float32, [G][n_blocks]) and lower bounds M_g of one (b, kv head).
template <typename T>
void compute_head_scores(const RadarSelectParams& p, int64_t b, int64_t h, int32_t n_blocks,
                         bool compute_scores, bool compute_mlo, std::vector<float>& scores,
                         std::vector<float>& mlo) {
  const int32_t G = p.q_heads / p.kv_heads;
  const int32_t D = p.head_dim;
  const int64_t NB = p.num_blocks;
  const bool need_box = p.score == Score::kBox || p.score == Score::kTight;

  std::vector<float> q(static_cast<size_t>(G) * D);
  std::vector<float> q_norm(static_cast<size_t>(G));
  for (int32_t g = 0; g < G; ++g) {
    const T* row = static_cast<const T*>(p.q) + b * p.q_stride_batch + (h * G + g) * p.q_stride_head;
    load_row(row, D, &q[static_cast<size_t>(g) * D]);
    float norm_sq = 0.0f;
    for (int32_t i = 0; i < D; ++i) norm_sq += q[g * D + i] * q[g * D + i];
    q_norm[g] = std::sqrt(norm_sq);
  }

  if (p.score == Score::kSketch) {
    // No centroid bound for qsketch: M_g stays -inf (compute_mlo is never set for it).
    if (compute_scores) sketch_head_scores(p, b, h, n_blocks, q, scores);
    return;
  }

  const int64_t stats_row = (b * p.kv_heads + h) * NB;
  for (int32_t j = 0; j < n_blocks; ++j) {
    const float* centroid = p.centroid + (stats_row + j) * D;
    for (int32_t g = 0; g < G; ++g) {
      const float* qg = &q[static_cast<size_t>(g) * D];
      float dot = 0.0f;
      for (int32_t i = 0; i < D; ++i) dot += qg[i] * centroid[i];
      const float mean = p.scale * dot;
      if (compute_mlo) mlo[g] = std::max(mlo[g], mean);
      if (!compute_scores) continue;

      float box = 0.0f;
      if (need_box) {
        const float* lo = p.lo + (stats_row + j) * D;
        const float* hi = p.hi + (stats_row + j) * D;
        for (int32_t i = 0; i < D; ++i) box += std::max(qg[i] * lo[i], qg[i] * hi[i]);
        box *= p.scale;
      }
      const float radius = p.radius[stats_row + j];
      float score = 0.0f;
      switch (p.score) {
        case Score::kBall:
          score = p.scale * (dot + q_norm[g] * radius);
          break;
        case Score::kBox:
          score = box;
          break;
        case Score::kTight:
          score = std::min(p.scale * (dot + q_norm[g] * radius), box);
          break;
        case Score::kMean:
          score = mean;
          break;
        case Score::kVariance:
          score = p.scale * (dot + q_norm[g] * radius * (1.0f + std::sqrt(p.spread[stats_row + j])));
          break;
        case Score::kSketch:
          break;  // scored by sketch_head_scores above
      }
      scores[static_cast<size_t>(g) * n_blocks + j] = score;
    }
  }
}

// Selection of one (b, kv head) from its per-head scores; fills `keep` (size n_blocks).
void select_blocks(const RadarSelectParams& p, int32_t len, int32_t n_blocks, int32_t G,
                   const std::vector<float>& scores, const std::vector<float>& mlo,
                   std::vector<char>& keep) {
  const int32_t bs = p.block_size;
  const int32_t n_full = len / bs;
  const auto tokens_in = [&](int32_t j) {
    return static_cast<double>(std::min<int64_t>(len, static_cast<int64_t>(j + 1) * bs) -
                               static_cast<int64_t>(j) * bs);
  };
  const auto score_of = [&](int32_t g, int32_t j) {
    return static_cast<double>(scores[static_cast<size_t>(g) * n_blocks + j]);
  };

  keep.assign(static_cast<size_t>(n_blocks), 0);
  int32_t n_forced = 0;
  std::vector<int32_t> candidates;
  candidates.reserve(static_cast<size_t>(n_blocks));
  for (int32_t j = 0; j < n_blocks; ++j) {
    const bool forced = j < p.sink_blocks || (j >= n_full - p.recent_blocks && j < n_full) ||
                        (j == n_full && len % bs != 0);
    if (forced) {
      keep[j] = 1;
      ++n_forced;
    } else {
      candidates.push_back(j);
    }
  }

  // Priority of every valid block (forced ones too: adaptive counts their mass). NaN would break
  // the sort's strict weak ordering, so it is mapped to the safe end of each policy.
  std::vector<double> priority(static_cast<size_t>(n_blocks), 0.0);
  if (p.policy == Policy::kTopK && p.group_agg == GroupAgg::kSum) {
    // S_j = sum_g softmax_j(s_g.)_j in double, rounded to float32 like the per-head scores so
    // that any implementation summing in the same order ranks identically.
    std::vector<double> share(static_cast<size_t>(n_blocks), 0.0);
    std::vector<double> weight(static_cast<size_t>(n_blocks));
    for (int32_t g = 0; g < G; ++g) {
      double top = -kInfD;
      for (int32_t j = 0; j < n_blocks; ++j) top = std::max(top, score_of(g, j));  // skips NaN
      const double nan = std::numeric_limits<double>::quiet_NaN();
      double total = 0.0;
      for (int32_t j = 0; j < n_blocks; ++j) {
        weight[j] = std::isfinite(top) ? std::exp(score_of(g, j) - top) : nan;
        total += weight[j];
      }
      if (!(total > 0.0) || !std::isfinite(total)) continue;  // no usable scores for this head
      const double inv = 1.0 / total;  // params.h: a reciprocal, then multiplies (as the GPU kernels)
      for (int32_t j = 0; j < n_blocks; ++j) share[j] += weight[j] * inv;
    }
    for (int32_t j = 0; j < n_blocks; ++j) {
      const double value = static_cast<double>(static_cast<float>(share[j]));
      priority[j] = std::isnan(value) ? -kInfD : value;
    }
  } else if (p.policy == Policy::kTopK) {
    for (int32_t j = 0; j < n_blocks; ++j) {
      double best = -kInfD;
      for (int32_t g = 0; g < G; ++g) best = std::max(best, score_of(g, j));
      priority[j] = std::isnan(best) ? -kInfD : best;
    }
  } else if (p.policy == Policy::kThreshold) {
    for (int32_t j = 0; j < n_blocks; ++j) {
      double best = -kInfD;
      for (int32_t g = 0; g < G; ++g) best = std::max(best, score_of(g, j) - static_cast<double>(mlo[g]));
      const double value = std::log(tokens_in(j)) + best;
      priority[j] = std::isnan(value) ? kInfD : value;  // unknown mass: never dropped
    }
  } else {
    std::vector<double> head_mass(static_cast<size_t>(n_blocks));
    for (int32_t g = 0; g < G; ++g) {
      double top = -kInfD;
      for (int32_t j = 0; j < n_blocks; ++j) top = std::max(top, score_of(g, j));
      double total = 0.0;
      for (int32_t j = 0; j < n_blocks; ++j) {
        head_mass[j] = tokens_in(j) * std::exp(score_of(g, j) - top);
        total += head_mass[j];
      }
      if (!(total > 0.0) || !std::isfinite(total)) continue;  // no usable scores for this head
      for (int32_t j = 0; j < n_blocks; ++j) priority[j] += head_mass[j] / total;
    }
    for (int32_t j = 0; j < n_blocks; ++j) {
      priority[j] /= G;
      if (std::isnan(priority[j])) priority[j] = 0.0;
    }
  }

  // Descending priority, ties to the lower block index.
  std::sort(candidates.begin(), candidates.end(), [&](int32_t a, int32_t b) {
    return priority[a] > priority[b] || (priority[a] == priority[b] && a < b);
  });
  const int64_t n_candidates = static_cast<int64_t>(candidates.size());

  int64_t count = 0;  // K: candidates kept, from the front of the sorted order
  if (p.policy == Policy::kTopK) {
    int64_t total = p.budget_blocks;
    if (total <= 0) {
      // The 1e-9 keeps e.g. 0.3 * 10 (= 3.0000000000000004) from becoming 4 blocks.
      const double wanted = std::ceil(p.budget_fraction * n_blocks - 1e-9);
      total = std::max<int64_t>(1, static_cast<int64_t>(std::min(wanted, 1e18)));
    }
    count = std::clamp<int64_t>(total - n_forced, 0, n_candidates);
  } else if (p.policy == Policy::kThreshold) {
    double dropped_mass = 0.0;
    int64_t dropped = 0;
    for (int64_t i = n_candidates - 1; i >= 0; --i) {
      dropped_mass += std::exp(priority[candidates[i]]);
      if (dropped_mass > p.eps) break;
      ++dropped;
    }
    count = n_candidates - dropped;
  } else {
    double mass = 0.0;
    for (int32_t j = 0; j < n_blocks; ++j) {
      if (keep[j]) mass += priority[j];
    }
    while (count < n_candidates && mass < p.mass) mass += priority[candidates[count++]];
    int64_t total = std::max<int64_t>(n_forced + count, p.min_blocks);
    if (p.max_blocks > 0) total = std::min<int64_t>(total, p.max_blocks);
    total = std::min<int64_t>(std::max<int64_t>(total, n_forced), n_blocks);
    count = total - n_forced;
  }
  for (int64_t i = 0; i < count; ++i) keep[candidates[i]] = 1;
}

template <typename T>
void radar_select_typed(const RadarSelectParams& p) {
  const int32_t G = p.q_heads / p.kv_heads;
  const int64_t NB = p.num_blocks;
  const bool compute_scores = p.in_head_scores == nullptr;
  const bool need_mlo = p.policy == Policy::kThreshold || p.out_head_mlo != nullptr;
  // Without q (a caller that only passes scores) M_g cannot be computed and stays -inf.
  // qsketch has no lower bound either: M_g = -inf.
  const bool compute_mlo =
      need_mlo && p.in_head_mlo == nullptr && p.q != nullptr && p.score != Score::kSketch;

  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t len = p.seq_lens[b];
    const int32_t n_blocks = valid_blocks(len, p.block_size, p.num_blocks);
    const int64_t first_q_head = b * p.q_heads + h * G;  // row of head g: first_q_head + g

    std::vector<float> scores(static_cast<size_t>(G) * n_blocks);
    std::vector<float> mlo(static_cast<size_t>(G), kNegInfF);
    if (!compute_scores) {
      for (int32_t g = 0; g < G; ++g) {
        std::copy_n(p.in_head_scores + (first_q_head + g) * NB, n_blocks,
                    scores.data() + static_cast<size_t>(g) * n_blocks);
      }
    }
    if (p.in_head_mlo != nullptr) {
      for (int32_t g = 0; g < G; ++g) mlo[g] = p.in_head_mlo[first_q_head + g];
    }
    if (compute_scores || compute_mlo) {
      compute_head_scores<T>(p, b, h, n_blocks, compute_scores, compute_mlo, scores, mlo);
    }

    if (p.out_head_scores != nullptr) {
      for (int32_t g = 0; g < G; ++g) {
        float* row = p.out_head_scores + (first_q_head + g) * NB;
        std::copy_n(scores.data() + static_cast<size_t>(g) * n_blocks, n_blocks, row);
        std::fill(row + n_blocks, row + NB, kNegInfF);
      }
    }
    if (p.out_head_mlo != nullptr) {
      for (int32_t g = 0; g < G; ++g) p.out_head_mlo[first_q_head + g] = mlo[g];
    }

    std::vector<char> keep;
    select_blocks(p, len, n_blocks, G, scores, mlo, keep);
    int32_t* selected = p.selected + (b * p.kv_heads + h) * NB;
    int32_t count = 0;
    for (int32_t j = 0; j < n_blocks; ++j) {
      if (keep[j]) selected[count++] = j;
    }
    std::fill(selected + count, selected + NB, -1);
    p.num_selected[b * p.kv_heads + h] = count;
  });
}

}  // namespace

void radar_select(const RadarSelectParams& params) {
  check_params(params);
  dispatch_dtype(params.dtype, "aether::cpu::radar_select", [&](auto tag) {
    using T = typename decltype(tag)::type;
    radar_select_typed<T>(params);
  });
}

}  // namespace cpu
}  // namespace aether
