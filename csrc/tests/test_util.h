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

#include "aether/cpu/kernels.h"
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

// Random lengths in [0, max_len] with the edge cases forced in when the batch allows; extra_edges
// (clamped to [0, max_len]) are forced in after the five standard ones.
inline std::vector<int32_t> mixed_lengths(int batch, int32_t max_len, int block_size,
                                          std::mt19937_64& rng, const std::vector<int32_t>& extra_edges = {}) {
  std::uniform_int_distribution<int32_t> any_len(0, max_len);
  std::vector<int32_t> lens(static_cast<size_t>(batch));
  for (auto& len : lens) len = any_len(rng);
  std::vector<int32_t> edges = {max_len, 0, 1, std::min(max_len, block_size),
                                std::min(max_len, block_size + 1)};
  for (int32_t edge : extra_edges) edges.push_back(std::clamp(edge, 0, max_len));
  for (int b = 0; b < batch && b < static_cast<int>(edges.size()); ++b) lens[b] = edges[b];
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

// BlockStatsParams of a full build (no first_block) of kv's host data into `out`.
inline BlockStatsParams block_stats_params(const TestKV& kv, const std::vector<int32_t>& lens, StatsBuffers& out) {
  BlockStatsParams p;
  p.k = kv.layout();
  p.dtype = kv.dtype;
  p.seq_lens = lens.data();
  p.batch = kv.batch;
  p.kv_heads = kv.heads;
  p.head_dim = kv.head_dim;
  p.block_size = kv.block_size;
  p.num_blocks = kv.num_blocks;
  p.stats = out.tensors();
  return p;
}

// The CPU kernel's statistics of kv (outputs poisoned first): the oracle input of score tests.
inline StatsBuffers cpu_block_stats(const TestKV& kv, const std::vector<int32_t>& lens) {
  StatsBuffers stats(kv.batch, kv.heads, kv.num_blocks, kv.head_dim);
  stats.poison();
  cpu::block_stats(block_stats_params(kv, lens, stats));
  return stats;
}

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
    case Score::kSketch:  // not a statistics score: naive_sketch_score
      return std::numeric_limits<double>::quiet_NaN();
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

// ---------------------------------------------------------------------------------------------
// Key sketch (KeySketchParams) and qsketch scores, written from the text of params.h.

// Packed codes [B, H, NB, bs, R/2], bfloat16 ranges [B, H, NB/P, 2, R] and bfloat16 centroid
// [B, H, NB/P, D] as the kernels write them (P = blocks_per_sketch blocks share one sketch
// block's ranges and centroid). head_dim = 0 leaves the centroid empty (centroid_data() is then
// null), for callers that do not pass one.
struct SketchBuffers {
  int batch = 0, heads = 0, num_blocks = 0, block_size = 0, rank = 0, head_dim = 0, blocks_per_sketch = 1;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> ranges;
  std::vector<uint16_t> centroid;

  SketchBuffers(int batch_, int heads_, int num_blocks_, int block_size_, int rank_, int head_dim_ = 0,
                int blocks_per_sketch_ = 1)
      : batch(batch_),
        heads(heads_),
        num_blocks(num_blocks_),
        block_size(block_size_),
        rank(rank_),
        head_dim(head_dim_),
        blocks_per_sketch(blocks_per_sketch_) {
    const size_t blocks = static_cast<size_t>(batch) * heads * num_blocks;
    const size_t sketches = static_cast<size_t>(batch) * heads * num_sketches();
    codes.assign(blocks * block_size * (rank / 2), 0);
    ranges.assign(sketches * 2 * rank, 0);
    centroid.assign(sketches * head_dim, 0);
  }

  // 0xAB bytes: code 11/10 and range/centroid 0xABAB (a finite bfloat16), so an unwritten
  // element is not mistaken for the zeros a full build writes.
  void poison() {
    std::fill(codes.begin(), codes.end(), static_cast<uint8_t>(0xAB));
    std::fill(ranges.begin(), ranges.end(), static_cast<uint16_t>(0xABAB));
    std::fill(centroid.begin(), centroid.end(), static_cast<uint16_t>(0xABAB));
  }

  uint16_t* centroid_data() { return centroid.empty() ? nullptr : centroid.data(); }
  const uint16_t* centroid_data() const { return centroid.empty() ? nullptr : centroid.data(); }

  int num_sketches() const { return num_blocks / blocks_per_sketch; }
  int64_t block_index(int64_t b, int64_t h, int64_t j) const { return (b * heads + h) * num_blocks + j; }
  int64_t sketch_index(int64_t b, int64_t h, int64_t m) const { return (b * heads + h) * num_sketches() + m; }
  const uint8_t* block_codes(int64_t b, int64_t h, int64_t j) const {
    return &codes[static_cast<size_t>(block_index(b, h, j)) * block_size * (rank / 2)];
  }
  // Ranges (lo row, then hi row) and centroid of sketch block m.
  const uint16_t* sketch_ranges(int64_t b, int64_t h, int64_t m) const {
    return &ranges[static_cast<size_t>(sketch_index(b, h, m)) * 2 * rank];
  }
  const uint16_t* sketch_centroid(int64_t b, int64_t h, int64_t m) const {
    return &centroid[static_cast<size_t>(sketch_index(b, h, m)) * head_dim];
  }
  // The ranges block j is scored with: those of its sketch block j / P.
  const uint16_t* block_ranges(int64_t b, int64_t h, int64_t j) const {
    return sketch_ranges(b, h, j / blocks_per_sketch);
  }
  // The centroid of block j's sketch block, widened to float32 (exact).
  std::vector<float> block_centroid(int64_t b, int64_t h, int64_t j) const {
    const uint16_t* bits = sketch_centroid(b, h, j / blocks_per_sketch);
    std::vector<float> values(static_cast<size_t>(head_dim));
    for (int d = 0; d < head_dim; ++d) values[d] = static_cast<float>(decode_bf16(bits[d]));
    return values;
  }
  // Code of coefficient r of token t of the block (unpacked: 2i low nibble, 2i + 1 high nibble).
  int code(int64_t b, int64_t h, int64_t j, int t, int r) const {
    const uint8_t byte = block_codes(b, h, j)[t * (rank / 2) + r / 2];
    return r % 2 == 0 ? (byte & 0xF) : (byte >> 4);
  }
};

// KeySketchParams of a full build (no first_block) of kv into the given sketch tensors; host
// pointers for the CPU kernel, device pointers for the CUDA one.
inline KeySketchParams key_sketch_params(const TestKV& kv, KVLayout layout, const int32_t* lens, const float* key_proj,
                                         int rank, int per, uint8_t* codes, uint16_t* ranges, uint16_t* centroid) {
  KeySketchParams p;
  p.k = layout;
  p.dtype = kv.dtype;
  p.seq_lens = lens;
  p.key_proj = key_proj;
  p.batch = kv.batch;
  p.kv_heads = kv.heads;
  p.head_dim = kv.head_dim;
  p.block_size = kv.block_size;
  p.num_blocks = kv.num_blocks;
  p.blocks_per_sketch = per;
  p.rank = rank;
  p.sketch.codes = codes;
  p.sketch.ranges = ranges;
  p.sketch.centroid = centroid;
  return p;
}

// The same, of kv's host data into `out` (its P and centroid).
inline KeySketchParams key_sketch_params(const TestKV& kv, const std::vector<int32_t>& lens,
                                         const std::vector<float>& key_proj, int rank, SketchBuffers& out) {
  return key_sketch_params(kv, kv.layout(), lens.data(), key_proj.data(), rank, out.blocks_per_sketch,
                           out.codes.data(), out.ranges.data(), out.centroid_data());
}


// Round to nearest, ties to even, without the floating-point environment.
inline double rint_ties_even(double x) {
  const double down = std::floor(x);
  const double fraction = x - down;
  if (fraction > 0.5) return down + 1.0;
  if (fraction < 0.5) return down;
  return std::fmod(down, 2.0) == 0.0 ? down : down + 1.0;
}

// The codes [least, most] a kernel may write for a coefficient x quantised against (lo, step):
// rint of the quotient, or a neighbour where x's float32 error (plus the quotient's own rounding)
// reaches a .5 boundary. Only for step > 0.
struct CodeBounds {
  double quotient, least, most;
};
inline CodeBounds code_bounds(double x, double lo, double step, double error) {
  const double quotient = (x - lo) / step;
  const double slack = 1e-4 + 2.0 * error / step;
  return {quotient, std::clamp(rint_ties_even(quotient - slack), 0.0, 15.0),
          std::clamp(rint_ties_even(quotient + slack), 0.0, 15.0)};
}

// step_r = (hi_r - lo_r) / 15 in float32 from the bfloat16 bit patterns.
inline float sketch_step_of(uint16_t lo_bits, uint16_t hi_bits) {
  return static_cast<float>(decode_bf16(hi_bits) - decode_bf16(lo_bits)) / 15.0f;
}

// code = step > 0 ? clamp(rint((x - lo) / step), 0, 15) : 0, with float32 x - lo and division.
inline int sketch_code_of(float x, float lo, float step) {
  if (!(step > 0.0f)) return 0;
  const float quotient = (x - lo) / step;
  return static_cast<int>(std::clamp(rint_ties_even(quotient), 0.0, 15.0));
}

// Coefficients x_r = sum_d key_proj[h, d, r] k_td in double (exact when every product and sum
// is), and a bound on the error of the kernels' float32 ascending-d sum of the same products.
inline std::vector<double> sketch_coefficients(const TestKV& k, const std::vector<float>& key_proj, int rank,
                                               int b, int h, int t, double* float32_error = nullptr) {
  const int D = k.head_dim;
  std::vector<double> x(static_cast<size_t>(rank), 0.0);
  double worst = 0.0;
  for (int r = 0; r < rank; ++r) {
    double magnitude = 0.0;
    for (int d = 0; d < D; ++d) {
      const double term = static_cast<double>(key_proj[(static_cast<size_t>(h) * D + d) * rank + r]) * k.at(b, h, t, d);
      x[r] += term;
      magnitude += std::fabs(term);
    }
    worst = std::max(worst, (D + 2) * std::ldexp(1.0, -24) * magnitude);
  }
  if (float32_error != nullptr) *float32_error = worst;
  return x;
}

// The sketch centroid of tokens [t0, t1) of (b, h) as params.h defines it: the float32 sum of
// the keys in token order from 0, divided by the count in float32, rounded to bfloat16 (ties to
// even, by round_to_bf16, not by the kernels' bit manipulation).
inline std::vector<uint16_t> naive_sketch_centroid(const TestKV& k, int b, int h, int t0, int t1) {
  std::vector<uint16_t> bits(static_cast<size_t>(k.head_dim), 0);
  if (t1 <= t0) return bits;
  for (int d = 0; d < k.head_dim; ++d) {
    float sum = 0.0f;
    for (int t = t0; t < t1; ++t) sum += static_cast<float>(k.at(b, h, t, d));
    bits[d] = encode_bf16_exact(round_to_bf16(sum / static_cast<float>(t1 - t0)));
  }
  return bits;
}

// The full-build sketch of the keys in double-precision coefficients: exact when the
// coefficients are (small-integer keys, power-of-two projections), the expected bytes then.
// Ranges and codes are taken over each sketch block of blocks_per_sketch blocks.
inline SketchBuffers naive_key_sketch(const TestKV& k, const std::vector<float>& key_proj, int rank,
                                      const std::vector<int32_t>& seq_lens, int blocks_per_sketch = 1) {
  const int bs = k.block_size, bytes = rank / 2, sb = bs * blocks_per_sketch;
  SketchBuffers out(k.batch, k.heads, k.num_blocks, bs, rank, k.head_dim, blocks_per_sketch);
  for (int b = 0; b < k.batch; ++b) {
    const int32_t len = seq_lens[b];
    for (int h = 0; h < k.heads; ++h) {
      for (int m = 0; m < blocks_of(len, sb); ++m) {
        const int t0 = m * sb, n = std::min(len, (m + 1) * sb) - t0;
        std::vector<std::vector<double>> x;
        for (int t = 0; t < n; ++t) x.push_back(sketch_coefficients(k, key_proj, rank, b, h, t0 + t));
        uint16_t* ranges = &out.ranges[static_cast<size_t>(out.sketch_index(b, h, m)) * 2 * rank];
        // Token t of the sketch block is slot t % bs of block m * P + t / bs: contiguous bytes.
        uint8_t* codes = &out.codes[static_cast<size_t>(out.block_index(b, h, static_cast<int64_t>(m) * blocks_per_sketch)) * bs * bytes];
        for (int r = 0; r < rank; ++r) {
          double low = kInf, high = -kInf;
          for (int t = 0; t < n; ++t) {
            low = std::min(low, x[t][r]);
            high = std::max(high, x[t][r]);
          }
          ranges[r] = encode_bf16_exact(round_to_bf16(low));
          ranges[rank + r] = encode_bf16_exact(round_to_bf16(high));
        }
        for (int t = 0; t < n; ++t) {
          for (int r = 0; r < rank; ++r) {
            const float lo = static_cast<float>(decode_bf16(ranges[r]));
            const int code = sketch_code_of(static_cast<float>(x[t][r]), lo, sketch_step_of(ranges[r], ranges[rank + r]));
            codes[t * bytes + r / 2] = static_cast<uint8_t>(codes[t * bytes + r / 2] | (code << (4 * (r % 2))));
          }
        }
        const std::vector<uint16_t> mean = naive_sketch_centroid(k, b, h, t0, t0 + n);
        std::copy(mean.begin(), mean.end(), out.centroid.begin() + out.sketch_index(b, h, m) * k.head_dim);
      }
    }
  }
  return out;
}

// qsketch score of one block for query head q (double) of KV head h, from a sketch as the
// kernels wrote it: the log-sum-exp over the block's n valid tokens of
//   scale * (u . (lo + code step) + a (q - key_proj_h u) . centroid),  u = query_proj_g^T q,
// all in double, with lo and step of block j's sketch block (sketch.block_ranges) and `centroid`
// the caller's (normally sketch.block_centroid(b, h, j); read only when weight != 0).
// `magnitude` receives a sum of |terms| bounding the float32 rounding error.
inline double naive_sketch_score(const std::vector<double>& q, const float* query_proj_g, const float* key_proj_h,
                                 const SketchBuffers& sketch, int b, int h, int j, int n,
                                 const float* centroid, double weight, double scale, double* magnitude) {
  const int D = static_cast<int>(q.size()), R = sketch.rank;
  std::vector<double> u(static_cast<size_t>(R), 0.0), u_abs(static_cast<size_t>(R), 0.0);
  for (int r = 0; r < R; ++r) {
    for (int d = 0; d < D; ++d) {
      u[r] += static_cast<double>(query_proj_g[d * R + r]) * q[d];
      u_abs[r] += std::fabs(query_proj_g[d * R + r] * q[d]);
    }
  }
  double base = 0.0, base_abs = 0.0;
  if (weight != 0.0) {
    for (int d = 0; d < D; ++d) {
      double projected = 0.0, projected_abs = 0.0;
      for (int r = 0; r < R; ++r) {
        projected += static_cast<double>(key_proj_h[d * R + r]) * u[r];
        projected_abs += std::fabs(key_proj_h[d * R + r]) * u_abs[r];
      }
      base += (q[d] - projected) * centroid[d];
      base_abs += (std::fabs(q[d]) + projected_abs) * std::fabs(centroid[d]);
    }
  }
  const uint16_t* ranges = sketch.block_ranges(b, h, j);
  std::vector<double> logits;
  double top = -kInf, worst = 0.0;
  for (int t = 0; t < n; ++t) {
    double dot = 0.0, dot_abs = 0.0;
    for (int r = 0; r < R; ++r) {
      const double lo = decode_bf16(ranges[r]);
      const double value = lo + sketch.code(b, h, j, t, r) * static_cast<double>(sketch_step_of(ranges[r], ranges[R + r]));
      dot += u[r] * value;
      dot_abs += u_abs[r] * std::fabs(value);
    }
    logits.push_back(scale * (dot + weight * base));
    worst = std::max(worst, std::fabs(scale) * (dot_abs + std::fabs(weight) * base_abs));
    top = std::max(top, logits.back());
  }
  if (magnitude != nullptr) *magnitude = worst;
  if (n == 0) return -kInf;
  double total = 0.0;
  for (double logit : logits) total += std::exp(logit - top);
  return top + std::log(total);
}

// GroupAgg::kSum priority of one group: per head g, m_g = max over the valid blocks (NaN
// skipped), Z_g = sum_j exp(s_gj - m_g) in double, ascending j; a head without a finite Z_g > 0
// adds nothing; S_j = float(sum_g exp(s_gj - m_g) / Z_g), NaN mapped to -inf (ranks last).
inline std::vector<double> naive_group_sum_priority(const std::vector<std::vector<float>>& head_scores,
                                                    int32_t n_blocks) {
  std::vector<double> share(static_cast<size_t>(n_blocks), 0.0);
  for (const auto& row : head_scores) {
    double top = -kInf;
    for (int32_t j = 0; j < n_blocks; ++j) {
      if (!std::isnan(row[j]) && row[j] > top) top = row[j];
    }
    if (!std::isfinite(top)) continue;  // every weight would be NaN
    double total = 0.0;
    for (int32_t j = 0; j < n_blocks; ++j) total += std::exp(static_cast<double>(row[j]) - top);
    if (std::isnan(total) || std::isinf(total) || total <= 0.0) continue;
    const double inv = 1.0 / total;  // params.h: the reciprocal once, then multiplies
    for (int32_t j = 0; j < n_blocks; ++j) share[j] += std::exp(static_cast<double>(row[j]) - top) * inv;
  }
  std::vector<double> priority(static_cast<size_t>(n_blocks));
  for (int32_t j = 0; j < n_blocks; ++j) {
    const float rounded = static_cast<float>(share[j]);
    priority[j] = std::isnan(rounded) ? -kInf : static_cast<double>(rounded);
  }
  return priority;
}

// The topk policy of one (b, kv head) given its group priority S_j (j < n_blocks): forced
// blocks, then the best candidates by descending S_j, ties to the lower index; ascending.
inline std::vector<int32_t> naive_topk_select(const RadarSelectParams& p, int32_t len,
                                              const std::vector<double>& priority) {
  const int32_t bs = p.block_size, n_blocks = blocks_of(len, bs), n_full = len / bs;
  std::vector<int32_t> selected, candidates;
  for (int32_t j = 0; j < n_blocks; ++j) {
    const bool forced = j < p.sink_blocks || (j >= n_full - p.recent_blocks && j < n_full) ||
                        (j == n_full && len % bs != 0);
    (forced ? selected : candidates).push_back(j);
  }
  std::stable_sort(candidates.begin(), candidates.end(),
                   [&](int32_t a, int32_t b) { return priority[a] > priority[b]; });
  const int32_t total =
      p.budget_blocks > 0 ? p.budget_blocks
                          : std::max(1, static_cast<int32_t>(std::ceil(p.budget_fraction * n_blocks - 1e-9)));
  const int32_t keep = std::clamp(total - static_cast<int32_t>(selected.size()), 0,
                                  static_cast<int32_t>(candidates.size()));
  selected.insert(selected.end(), candidates.begin(), candidates.begin() + keep);
  std::sort(selected.begin(), selected.end());
  return selected;
}

// Index of the first differing element, so a failure names one element instead of dumping both.
template <typename T>
inline std::string first_difference(const std::vector<T>& actual, const std::vector<T>& expected) {
  if (actual.size() != expected.size()) return "sizes differ";
  for (size_t i = 0; i < actual.size(); ++i) {
    if (actual[i] != expected[i]) {
      return "element " + std::to_string(i) + ": " + std::to_string(actual[i]) + " vs " + std::to_string(expected[i]);
    }
  }
  return "";
}

// Key codes (CodesBuffers) equal bit for bit, or the first difference is named (expands to
// gtest assertions: use it in test files only).
#define ASSERT_SAME_CODES(actual, expected)                                          \
  do {                                                                               \
    ASSERT_EQ(::aether::test::first_difference((actual).codes, (expected).codes), "") << "codes";    \
    ASSERT_EQ(::aether::test::first_difference((actual).ranges, (expected).ranges), "") << "ranges"; \
  } while (0)

// Key codes on the host (KeyCodesParams): packed codes [B, H, NB, bs, D * bits / 8] and bfloat16
// ranges [B, H, NB / Pg, 2, D] (lo row, hi row) as the kernels write them; zeros until poisoned.
struct CodesBuffers {
  int batch = 0, heads = 0, num_blocks = 0, block_size = 0, head_dim = 0, bits = 2, per = 1;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> ranges;

  CodesBuffers(int batch_, int heads_, int num_blocks_, int block_size_, int head_dim_, int bits_, int per_)
      : batch(batch_),
        heads(heads_),
        num_blocks(num_blocks_),
        block_size(block_size_),
        head_dim(head_dim_),
        bits(bits_),
        per(per_) {
    codes.assign(static_cast<size_t>(batch) * heads * num_blocks * block_size * token_bytes(), 0);
    ranges.assign(static_cast<size_t>(batch) * heads * num_groups() * 2 * head_dim, 0);
  }

  // 0xAB bytes: not the zeros a full build writes, and a finite bfloat16 range (0xABAB), so an
  // element no kernel wrote stands out.
  void poison() {
    std::fill(codes.begin(), codes.end(), static_cast<uint8_t>(0xAB));
    std::fill(ranges.begin(), ranges.end(), static_cast<uint16_t>(0xABAB));
  }

  int token_bytes() const { return head_dim * bits / 8; }
  int num_groups() const { return num_blocks / per; }
  int group_tokens() const { return per * block_size; }
  int group_bytes() const { return group_tokens() * token_bytes(); }
  // Token t of group m is slot t % bs of block m * Pg + t / bs: the group's codes are contiguous.
  uint8_t* token_codes(int64_t b, int64_t h, int64_t m, int64_t t) {
    return &codes[static_cast<size_t>(((b * heads + h) * num_blocks * block_size + m * group_tokens() + t) *
                                      token_bytes())];
  }
  const uint8_t* token_codes(int64_t b, int64_t h, int64_t m, int64_t t) const {
    return const_cast<CodesBuffers*>(this)->token_codes(b, h, m, t);
  }
  uint16_t* group_ranges(int64_t b, int64_t h, int64_t m) {
    return &ranges[static_cast<size_t>(((b * heads + h) * num_groups() + m) * 2 * head_dim)];
  }
  const uint16_t* group_ranges(int64_t b, int64_t h, int64_t m) const {
    return const_cast<CodesBuffers*>(this)->group_ranges(b, h, m);
  }
  // The codes of group m (its Pg blocks are contiguous).
  const uint8_t* group_codes(int64_t b, int64_t h, int64_t m) const { return token_codes(b, h, m, 0); }
};

// One refine_scores test case (CPU against an oracle, CUDA against the CPU) and its name.
struct RefineCase {
  DType dtype;
  int group, head_dim, bits, block_size, per;
  int row;  // list_length: 0: NB, 1: half the blocks of max_len (a short row), 2: NB + 3
  double q_scale;
};

inline std::string describe(const RefineCase& c, int L, int num_blocks) {
  return std::string(dtype_name(c.dtype)) + " G=" + std::to_string(c.group) + " D=" + std::to_string(c.head_dim) +
         " bits=" + std::to_string(c.bits) + " bs=" + std::to_string(c.block_size) + " Pg=" + std::to_string(c.per) +
         " L=" + std::to_string(L) + " NB=" + std::to_string(num_blocks) + " q x" + std::to_string(c.q_scale);
}

// Candidate lists for refine_scores tests (CPU against an oracle, CUDA against the CPU).
struct Candidates {
  int list_length = 0;
  std::vector<int32_t> rows;   // [B, Hkv, L]
  std::vector<int32_t> count;  // [B, Hkv]
};

// Candidate rows as a first selection might leave them, and the cases it never does: a random
// subset of the valid blocks (sorted, or shuffled), a few entries past the sequence end, past the
// capacity, past the row (j >= L, a valid block when L < NB) or negative, then -1 padding; counts
// that stop short of the entries, cover exactly them, reach into the padding, exceed L, are 0 or
// negative.
inline Candidates make_candidates(int batch, int kv_heads, int list_length, int num_blocks, int block_size,
                           const std::vector<int32_t>& lens, std::mt19937_64& rng) {
  Candidates out;
  out.list_length = list_length;
  out.rows.assign(static_cast<size_t>(batch) * kv_heads * list_length, -1);
  out.count.assign(static_cast<size_t>(batch) * kv_heads, 0);
  std::uniform_int_distribution<int> coin(0, 1), kind(0, 7), extras(0, 3);
  for (int b = 0; b < batch; ++b) {
    const int n_blocks = blocks_of(lens[b], block_size);
    for (int h = 0; h < kv_heads; ++h) {
      std::vector<int32_t> pool(static_cast<size_t>(n_blocks));
      for (int j = 0; j < n_blocks; ++j) pool[j] = j;
      std::shuffle(pool.begin(), pool.end(), rng);
      pool.resize(std::uniform_int_distribution<size_t>(0, pool.size())(rng));
      const int32_t odd[] = {n_blocks, n_blocks + 1, num_blocks, list_length, list_length + 2, -1, -7, 1 << 20};
      for (int e = extras(rng); e > 0; --e) pool.push_back(odd[kind(rng)]);
      if (coin(rng)) {
        std::sort(pool.begin(), pool.end());
      } else {
        std::shuffle(pool.begin(), pool.end(), rng);
      }
      // A short row (L < NB) often lists a valid block j >= L, which has no slot in the row: put one
      // first, where the truncation to L entries below cannot drop it.
      if (list_length < n_blocks && coin(rng)) {
        pool.insert(pool.begin(), std::uniform_int_distribution<int32_t>(list_length, n_blocks - 1)(rng));
      }
      pool.resize(std::min<size_t>(pool.size(), list_length));
      int32_t* row = &out.rows[(static_cast<size_t>(b) * kv_heads + h) * list_length];
      std::copy(pool.begin(), pool.end(), row);
      const int entries = static_cast<int>(pool.size());
      int32_t count = entries;
      switch (std::uniform_int_distribution<int>(0, 6)(rng)) {
        case 0: count = entries / 2; break;                                // stops short
        case 1: count = std::min(list_length, entries + 2); break;         // into the padding
        case 2: count = list_length + 1 + coin(rng) * 100; break;          // past the row: clamped
        case 3: count = 0; break;
        case 4: count = -3; break;                                         // no entries
        default: break;                                                    // exactly the entries
      }
      out.count[static_cast<size_t>(b) * kv_heads + h] = count;
    }
  }
  return out;
}

}  // namespace test
}  // namespace aether
