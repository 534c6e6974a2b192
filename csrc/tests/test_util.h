// Test helpers shared by the CPU and CUDA GoogleTest files: seeds, dtype rounding done in double
// (independent of the kernels' bit manipulation), typed host tensors, a KV cache in contiguous
// or paged layout, and a naive double-precision reference of every stage written straight from
// docs/architecture.md ("Semantics").
//
// Plain C++17 and no gtest dependency, so .cu test files can include it in host code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "aether/params.h"

namespace aether {
namespace test {

constexpr double kInf = std::numeric_limits<double>::infinity();

// A fresh seed per run (AETHER_TEST_SEED=<n> reproduces one); tests print it with SCOPED_TRACE.
inline uint64_t fresh_seed() {
  if (const char* env = std::getenv("AETHER_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

inline size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Unit roundoff of one rounding to the dtype (half an ulp, relative).
inline double unit_roundoff(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return std::ldexp(1.0, -24);
    case DType::kFloat16:
      return std::ldexp(1.0, -11);
    case DType::kBFloat16:
      return std::ldexp(1.0, -8);
  }
  return 0.0;
}

// Rounds x to a binary format with `mantissa_bits` explicit mantissa bits, smallest normal
// exponent `min_exponent`, and values >= `overflow_at` becoming inf; nearest, ties to even.
inline double round_to_format(double x, int mantissa_bits, int min_exponent, double overflow_at) {
  if (std::isnan(x) || x == 0.0) return x;
  const double magnitude = std::fabs(x);
  if (magnitude >= overflow_at) return std::copysign(kInf, x);
  int exponent = 0;
  std::frexp(magnitude, &exponent);  // magnitude = m * 2^exponent, m in [0.5, 1)
  const int unbiased = std::max(exponent - 1, min_exponent);  // subnormals share the min step
  const double step = std::ldexp(1.0, unbiased - mantissa_bits);
  // Division by a power of two is exact; nearbyint uses the default mode: nearest, ties to even.
  return std::copysign(std::nearbyint(magnitude / step) * step, x);
}

inline double round_to_half(double x) { return round_to_format(x, 10, -14, 65520.0); }
inline double round_to_bf16(double x) {
  // Halfway between the largest bfloat16 (2 - 2^-7) 2^127 and 2^128.
  return round_to_format(x, 7, -126, std::ldexp(2.0 - std::ldexp(1.0, -8), 127));
}

inline double round_to_dtype(double x, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<double>(static_cast<float>(x));
    case DType::kFloat16:
      return round_to_half(x);
    case DType::kBFloat16:
      return round_to_bf16(x);
  }
  return x;
}

// Bit pattern of a value that is exactly representable in half precision.
inline uint16_t encode_half_exact(double value) {
  const uint16_t sign = std::signbit(value) ? 0x8000 : 0;
  const double magnitude = std::fabs(value);
  if (std::isnan(value)) return 0x7e00;
  if (std::isinf(value)) return static_cast<uint16_t>(sign | 0x7c00);
  if (magnitude == 0.0) return sign;
  if (magnitude < std::ldexp(1.0, -14)) {
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(magnitude / std::ldexp(1.0, -24)));
  }
  int exponent = 0;
  std::frexp(magnitude, &exponent);
  const int unbiased = exponent - 1;
  const auto mantissa = static_cast<uint16_t>(std::ldexp(magnitude, -unbiased) * 1024.0 - 1024.0);
  return static_cast<uint16_t>(sign | ((unbiased + 15) << 10) | mantissa);
}

inline double decode_half(uint16_t bits) {
  const double sign = (bits & 0x8000) ? -1.0 : 1.0;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  if (exponent == 0x1f) return mantissa ? std::numeric_limits<double>::quiet_NaN() : sign * kInf;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

inline uint16_t encode_bf16_exact(double value) {
  const float f = static_cast<float>(value);  // exact: value is a bfloat16
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}

inline double decode_bf16(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

// A host tensor stored exactly as the kernels see it (float32, or 16-bit patterns).
struct TypedTensor {
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
  std::vector<uint8_t> bytes;

  TypedTensor() = default;
  TypedTensor(DType dtype_, int64_t numel_)
      : dtype(dtype_), numel(numel_), bytes(static_cast<size_t>(numel_) * dtype_size(dtype_), 0) {}

  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  size_t size_bytes() const { return bytes.size(); }

  double get(int64_t i) const {
    if (dtype == DType::kFloat32) {
      float f;
      std::memcpy(&f, bytes.data() + i * 4, 4);
      return f;
    }
    uint16_t bits;
    std::memcpy(&bits, bytes.data() + i * 2, 2);
    return dtype == DType::kFloat16 ? decode_half(bits) : decode_bf16(bits);
  }

  // Stores value rounded to the dtype (nearest, ties to even).
  void set(int64_t i, double value) {
    const double rounded = round_to_dtype(value, dtype);
    if (dtype == DType::kFloat32) {
      const float f = static_cast<float>(rounded);
      std::memcpy(bytes.data() + i * 4, &f, 4);
      return;
    }
    const uint16_t bits =
        dtype == DType::kFloat16 ? encode_half_exact(rounded) : encode_bf16_exact(rounded);
    std::memcpy(bytes.data() + i * 2, &bits, 2);
  }

  // All-ones bytes are a NaN in float32, float16 and bfloat16 alike.
  void poison() { std::fill(bytes.begin(), bytes.end(), static_cast<uint8_t>(0xff)); }
};

inline void fill_normal(TypedTensor& tensor, std::mt19937_64& rng, double stddev = 1.0) {
  std::normal_distribution<double> normal(0.0, stddev);
  for (int64_t i = 0; i < tensor.numel; ++i) tensor.set(i, normal(rng));
}

inline float float_nan() { return std::numeric_limits<float>::quiet_NaN(); }

enum class KVKind { kContiguous, kTokenMajor, kPaged };

inline const char* kv_kind_name(KVKind kind) {
  switch (kind) {
    case KVKind::kContiguous:
      return "contiguous";
    case KVKind::kTokenMajor:
      return "token-major";
    case KVKind::kPaged:
      return "paged";
  }
  return "unknown";
}

// A K or V cache of `num_blocks * block_size` token slots per sequence.
//   kContiguous  [B, H, S, D]
//   kTokenMajor  [B, S, H, D] (the Hugging Face layout before transpose: other strides)
//   kPaged       pages [P, H, block_size, D], P > B * num_blocks, shuffled page ids, and a block
//                table row stride larger than num_blocks (its spare column holds -1)
// Every slot gets N(shift_block, token_noise^2) values, shift_block ~ N(0, block_shift^2) per
// block and channel, so blocks differ and selection has something to find.
struct TestKV {
  DType dtype;
  KVKind kind;
  int batch, heads, head_dim, block_size, num_blocks;
  int64_t stride_seq = 0, stride_head = 0, stride_token = 0, block_table_stride = 0;
  std::vector<int32_t> block_table;
  TypedTensor data;

  TestKV(DType dtype_, KVKind kind_, int batch_, int heads_, int head_dim_, int block_size_,
         int num_blocks_, std::mt19937_64& rng, double block_shift = 1.0, double token_noise = 1.0)
      : dtype(dtype_),
        kind(kind_),
        batch(batch_),
        heads(heads_),
        head_dim(head_dim_),
        block_size(block_size_),
        num_blocks(num_blocks_) {
    const int64_t D = head_dim, H = heads, S = static_cast<int64_t>(num_blocks) * block_size;
    int64_t elements = 0;
    if (kind == KVKind::kContiguous) {
      stride_token = D;
      stride_head = S * D;
      stride_seq = H * S * D;
      elements = batch * stride_seq;
    } else if (kind == KVKind::kTokenMajor) {
      stride_head = D;
      stride_token = H * D;
      stride_seq = S * H * D;
      elements = batch * stride_seq;
    } else {
      const int64_t pages = static_cast<int64_t>(batch) * num_blocks + 3;
      stride_token = D;
      stride_head = block_size * D;
      stride_seq = H * block_size * D;
      elements = pages * stride_seq;
      block_table_stride = num_blocks + 1;
      std::vector<int32_t> page_ids(static_cast<size_t>(pages));
      std::iota(page_ids.begin(), page_ids.end(), 0);
      std::shuffle(page_ids.begin(), page_ids.end(), rng);
      block_table.assign(static_cast<size_t>(batch * block_table_stride), -1);
      for (int b = 0; b < batch; ++b) {
        for (int j = 0; j < num_blocks; ++j) {
          block_table[b * block_table_stride + j] = page_ids[b * num_blocks + j];
        }
      }
    }
    data = TypedTensor(dtype, elements);
    data.poison();  // slots no sequence owns (spare pages) stay NaN
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<double> shift(static_cast<size_t>(D));
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int64_t t = 0; t < S; ++t) {
          if (t % block_size == 0) {
            for (auto& value : shift) value = block_shift * normal(rng);
          }
          const int64_t base = offset(b, h, t);
          for (int64_t i = 0; i < D; ++i) data.set(base + i, shift[i] + token_noise * normal(rng));
        }
      }
    }
  }

  int64_t offset(int64_t b, int64_t h, int64_t t) const {
    if (kind != KVKind::kPaged) return b * stride_seq + h * stride_head + t * stride_token;
    const int64_t page = block_table[b * block_table_stride + t / block_size];
    return page * stride_seq + h * stride_head + (t % block_size) * stride_token;
  }

  double at(int64_t b, int64_t h, int64_t t, int64_t i) const { return data.get(offset(b, h, t) + i); }

  // Sets every slot at or past seq_lens[b] to NaN: a kernel that reads past the end of a
  // sequence then produces NaN and the comparison fails.
  void poison_after(const std::vector<int32_t>& seq_lens) {
    const int64_t S = static_cast<int64_t>(num_blocks) * block_size;
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int64_t t = seq_lens[b]; t < S; ++t) {
          for (int64_t i = 0; i < head_dim; ++i) data.set(offset(b, h, t) + i, float_nan());
        }
      }
    }
  }

  KVLayout layout(const void* base, const int32_t* table) const {
    KVLayout result;
    result.data = base;
    result.stride_seq = stride_seq;
    result.stride_head = stride_head;
    result.stride_token = stride_token;
    if (kind == KVKind::kPaged) {
      result.block_table = table;
      result.block_table_stride = block_table_stride;
      result.page_size = block_size;
    }
    return result;
  }
  KVLayout layout() const {
    return layout(data.data(), kind == KVKind::kPaged ? block_table.data() : nullptr);
  }
};

// Queries (or outputs) [B, Hq, D] with padded strides, so a kernel that assumes a dense layout
// reads or writes the wrong elements. The padding is poisoned and must stay that way.
struct TestQuery {
  int batch, heads, head_dim;
  int64_t stride_batch, stride_head;
  TypedTensor data;

  TestQuery(DType dtype, int batch_, int heads_, int head_dim_)
      : batch(batch_),
        heads(heads_),
        head_dim(head_dim_),
        stride_batch(static_cast<int64_t>(heads_) * (head_dim_ + 8) + 16),
        stride_head(head_dim_ + 8),
        data(dtype, static_cast<int64_t>(batch_) * (static_cast<int64_t>(heads_) * (head_dim_ + 8) + 16)) {
    data.poison();
  }

  void fill_normal(std::mt19937_64& rng, double stddev = 1.0) {
    std::normal_distribution<double> normal(0.0, stddev);
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < heads; ++h) {
        for (int i = 0; i < head_dim; ++i) data.set(offset(b, h) + i, normal(rng));
      }
    }
  }

  int64_t offset(int64_t b, int64_t h) const { return b * stride_batch + h * stride_head; }

  std::vector<double> row(int64_t b, int64_t h) const {
    std::vector<double> values(static_cast<size_t>(head_dim));
    for (int i = 0; i < head_dim; ++i) values[i] = data.get(offset(b, h) + i);
    return values;
  }

  // True when every padding element still holds the poison (all-ones bytes).
  bool padding_untouched() const {
    const size_t element = dtype_size(data.dtype);
    for (int64_t n = 0; n < data.numel; ++n) {
      const int64_t within_batch = n % stride_batch;
      const bool payload = within_batch < static_cast<int64_t>(heads) * stride_head &&
                           within_batch % stride_head < head_dim;
      if (payload) continue;
      for (size_t byte = 0; byte < element; ++byte) {
        if (data.bytes[n * element + byte] != 0xff) return false;
      }
    }
    return true;
  }
};

// Random lengths in [0, max_len] with the edge cases forced in when the batch allows.
inline std::vector<int32_t> mixed_lengths(int batch, int32_t max_len, int block_size,
                                          std::mt19937_64& rng) {
  std::uniform_int_distribution<int32_t> any_len(0, max_len);
  std::vector<int32_t> lens(static_cast<size_t>(batch));
  for (auto& len : lens) len = any_len(rng);
  const int32_t edges[] = {max_len, 0, 1, std::min(max_len, block_size),
                           std::min(max_len, block_size + 1)};
  for (int b = 0; b < batch && b < 5; ++b) lens[b] = edges[b];
  std::shuffle(lens.begin(), lens.end(), rng);
  return lens;
}

inline int32_t blocks_of(int32_t len, int32_t block_size) {
  return len <= 0 ? 0 : (len + block_size - 1) / block_size;
}

// Float32 statistics buffers [B, H, NB(, D)] as the kernels write them.
struct StatsBuffers {
  int batch = 0, heads = 0, num_blocks = 0, head_dim = 0;
  std::vector<float> centroid, lo, hi, radius, spread;

  StatsBuffers(int batch_, int heads_, int num_blocks_, int head_dim_)
      : batch(batch_), heads(heads_), num_blocks(num_blocks_), head_dim(head_dim_) {
    const size_t blocks = static_cast<size_t>(batch) * heads * num_blocks;
    centroid.assign(blocks * head_dim, 0.0f);
    lo.assign(blocks * head_dim, 0.0f);
    hi.assign(blocks * head_dim, 0.0f);
    radius.assign(blocks, 0.0f);
    spread.assign(blocks, 0.0f);
  }

  void poison() {
    for (auto* buffer : {&centroid, &lo, &hi, &radius, &spread}) {
      std::fill(buffer->begin(), buffer->end(), float_nan());
    }
  }

  BlockStatsTensors tensors() {
    BlockStatsTensors result;
    result.centroid = centroid.data();
    result.lo = lo.data();
    result.hi = hi.data();
    result.radius = radius.data();
    result.spread = spread.data();
    return result;
  }

  int64_t block_index(int64_t b, int64_t h, int64_t j) const {
    return (b * heads + h) * num_blocks + j;
  }
};

// ---------------------------------------------------------------------------------------------
// Naive reference, double precision, straight from the semantics.

struct NaiveStats {
  int batch, heads, num_blocks, head_dim;
  std::vector<double> centroid, lo, hi, radius, spread;
  int64_t block_index(int64_t b, int64_t h, int64_t j) const {
    return (b * heads + h) * num_blocks + j;
  }
};

inline NaiveStats naive_block_stats(const TestKV& k, const std::vector<int32_t>& seq_lens) {
  const int D = k.head_dim, bs = k.block_size;
  NaiveStats s{k.batch, k.heads, k.num_blocks, D, {}, {}, {}, {}, {}};
  const size_t blocks = static_cast<size_t>(k.batch) * k.heads * k.num_blocks;
  s.centroid.assign(blocks * D, 0.0);
  s.lo.assign(blocks * D, 0.0);
  s.hi.assign(blocks * D, 0.0);
  s.radius.assign(blocks, 0.0);
  s.spread.assign(blocks, 0.0);
  for (int b = 0; b < k.batch; ++b) {
    const int32_t len = seq_lens[b];
    for (int h = 0; h < k.heads; ++h) {
      for (int j = 0; j < blocks_of(len, bs); ++j) {
        const int64_t index = s.block_index(b, h, j);
        const int t0 = j * bs, t1 = std::min(len, (j + 1) * bs);
        double* mu = &s.centroid[index * D];
        for (int i = 0; i < D; ++i) {
          double sum = 0.0, low = kInf, high = -kInf;
          for (int t = t0; t < t1; ++t) {
            const double x = k.at(b, h, t, i);
            sum += x;
            low = std::min(low, x);
            high = std::max(high, x);
          }
          mu[i] = sum / (t1 - t0);
          s.lo[index * D + i] = low;
          s.hi[index * D + i] = high;
        }
        double radius = 0.0, total = 0.0;
        for (int t = t0; t < t1; ++t) {
          double distance_sq = 0.0;
          for (int i = 0; i < D; ++i) distance_sq += std::pow(k.at(b, h, t, i) - mu[i], 2);
          radius = std::max(radius, std::sqrt(distance_sq));
          total += distance_sq;
        }
        s.radius[index] = radius;
        s.spread[index] = total / (t1 - t0);
      }
    }
  }
  return s;
}

// Score of one block for one query head, from float32 statistics, in double. lo and hi are only
// read for box and tight (they may be null otherwise).
inline double naive_score(Score score, const std::vector<double>& q, const float* centroid,
                          const float* lo, const float* hi, float radius, float spread,
                          double scale) {
  const bool need_box = score == Score::kBox || score == Score::kTight;
  double dot = 0.0, norm_sq = 0.0, box = 0.0;
  for (size_t i = 0; i < q.size(); ++i) {
    dot += q[i] * centroid[i];
    norm_sq += q[i] * q[i];
    if (need_box) box += std::max(q[i] * lo[i], q[i] * hi[i]);
  }
  const double norm = std::sqrt(norm_sq);
  const double ball = scale * (dot + norm * radius);
  switch (score) {
    case Score::kBall:
      return ball;
    case Score::kBox:
      return scale * box;
    case Score::kTight:
      return std::min(ball, scale * box);
    case Score::kMean:
      return scale * dot;
    case Score::kVariance:
      return scale * (dot + norm * radius * (1.0 + std::sqrt(static_cast<double>(spread))));
  }
  return 0.0;
}

// Selection of one (b, kv head) from the scores of its G query heads (head_scores[g][j], j over
// at least the valid blocks) and, for the threshold policy, head_mlo[g]. Only the scalar
// fields of `p` are used. Returns the selected block indices in ascending order.
inline std::vector<int32_t> naive_select(const RadarSelectParams& p, int32_t len,
                                         const std::vector<std::vector<float>>& head_scores,
                                         const std::vector<float>& head_mlo) {
  const int32_t bs = p.block_size;
  const int32_t n_blocks = blocks_of(len, bs);
  const int32_t n_full = len / bs;
  const int G = static_cast<int>(head_scores.size());

  std::vector<bool> forced(static_cast<size_t>(n_blocks), false);
  for (int32_t j = 0; j < n_blocks; ++j) {
    forced[j] = j < p.sink_blocks || (j >= n_full - p.recent_blocks && j < n_full) ||
                (j == n_full && len % bs != 0);
  }
  const auto count = [&](int32_t j) { return static_cast<double>(std::min(len, (j + 1) * bs) - j * bs); };

  std::vector<double> priority(static_cast<size_t>(n_blocks), 0.0);
  if (p.policy == Policy::kTopK) {
    for (int32_t j = 0; j < n_blocks; ++j) {
      double best = -kInf;
      for (int g = 0; g < G; ++g) best = std::max(best, static_cast<double>(head_scores[g][j]));
      priority[j] = best;
    }
  } else if (p.policy == Policy::kThreshold) {
    for (int32_t j = 0; j < n_blocks; ++j) {
      double best = -kInf;
      for (int g = 0; g < G; ++g) {
        best = std::max(best, static_cast<double>(head_scores[g][j]) - static_cast<double>(head_mlo[g]));
      }
      priority[j] = std::log(count(j)) + best;
    }
  } else {
    std::vector<double> head_mass(static_cast<size_t>(n_blocks));
    for (int g = 0; g < G; ++g) {
      double top = -kInf;
      for (int32_t j = 0; j < n_blocks; ++j) top = std::max(top, static_cast<double>(head_scores[g][j]));
      double total = 0.0;
      for (int32_t j = 0; j < n_blocks; ++j) {
        head_mass[j] = count(j) * std::exp(static_cast<double>(head_scores[g][j]) - top);
        total += head_mass[j];
      }
      for (int32_t j = 0; j < n_blocks; ++j) priority[j] += head_mass[j] / total;
    }
    for (auto& value : priority) value /= G;
  }

  std::vector<int32_t> order;
  for (int32_t j = 0; j < n_blocks; ++j) {
    if (!forced[j]) order.push_back(j);
  }
  // order is ascending, so a stable sort by descending priority breaks ties by lower index.
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return priority[a] > priority[b]; });
  const int32_t n_forced = static_cast<int32_t>(std::count(forced.begin(), forced.end(), true));
  const int32_t n_candidates = static_cast<int32_t>(order.size());

  int32_t keep = 0;
  if (p.policy == Policy::kTopK) {
    const int32_t total =
        p.budget_blocks > 0
            ? p.budget_blocks
            : std::max(1, static_cast<int32_t>(std::ceil(p.budget_fraction * n_blocks - 1e-9)));
    keep = std::clamp(total - n_forced, 0, n_candidates);
  } else if (p.policy == Policy::kThreshold) {
    double dropped_mass = 0.0;
    int32_t dropped = 0;
    for (int32_t i = n_candidates - 1; i >= 0; --i) {
      dropped_mass += std::exp(priority[order[i]]);
      if (dropped_mass > p.eps) break;
      ++dropped;
    }
    keep = n_candidates - dropped;
  } else {
    double mass = 0.0;
    for (int32_t j = 0; j < n_blocks; ++j) {
      if (forced[j]) mass += priority[j];
    }
    while (keep < n_candidates && mass < p.mass) mass += priority[order[keep++]];
    int32_t total = std::max(n_forced + keep, p.min_blocks);
    if (p.max_blocks > 0) total = std::min(total, p.max_blocks);
    total = std::min(std::max(total, n_forced), n_blocks);
    keep = total - n_forced;
  }

  std::vector<int32_t> selected;
  for (int32_t j = 0; j < n_blocks; ++j) {
    if (forced[j]) selected.push_back(j);
  }
  selected.insert(selected.end(), order.begin(), order.begin() + keep);
  std::sort(selected.begin(), selected.end());
  return selected;
}

// Attention of one query over the listed blocks of (b, h); blocks outside [0, n_blocks) are
// ignored. Writes the output into `out` and returns the natural-log lse (-inf when empty).
inline double naive_attention(const std::vector<double>& q, double scale, const TestKV& k,
                              const TestKV& v, int b, int h, int32_t len,
                              const std::vector<int32_t>& blocks, std::vector<double>& out) {
  const int D = k.head_dim, bs = k.block_size;
  std::vector<int32_t> tokens;
  for (int32_t j : blocks) {
    if (j < 0 || j >= blocks_of(len, bs)) continue;
    for (int32_t t = j * bs; t < std::min(len, (j + 1) * bs); ++t) tokens.push_back(t);
  }
  out.assign(static_cast<size_t>(D), 0.0);
  if (tokens.empty()) return -kInf;
  std::vector<double> logits;
  double top = -kInf;
  for (int32_t t : tokens) {
    double dot = 0.0;
    for (int i = 0; i < D; ++i) dot += q[i] * k.at(b, h, t, i);
    logits.push_back(scale * dot);
    top = std::max(top, logits.back());
  }
  double total = 0.0;
  for (size_t n = 0; n < tokens.size(); ++n) {
    const double weight = std::exp(logits[n] - top);
    total += weight;
    for (int i = 0; i < D; ++i) out[i] += weight * v.at(b, h, tokens[n], i);
  }
  for (auto& value : out) value /= total;
  return top + std::log(total);
}

}  // namespace test
}  // namespace aether
