// CPU key sketch: the 4-bit token-level codes, bfloat16 ranges and bfloat16 centroid read by
// Score::kSketch (KeySketchParams in params.h, aether/reference.py key_sketch).
//
// The metadata belongs to a sketch block of P = blocks_per_sketch consecutive blocks. Like
// block_stats, a sketch block is always rebuilt from all of its valid tokens, so an append
// (first_block set) is bit-identical to a full build.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "aether/cpu/common.h"
#include "aether/cpu/kernels.h"

namespace aether {
namespace cpu {
namespace {

void check_params(const KeySketchParams& p) {
  if (p.rank < 2 || p.rank > kMaxSketchRank || p.rank % 2 != 0) {
    throw std::invalid_argument("aether::cpu::key_sketch: unsupported rank " + std::to_string(p.rank) +
                                " (allowed: even, 2.." + std::to_string(kMaxSketchRank) + ")");
  }
  const std::string per_error = blocks_per_sketch_error(p.blocks_per_sketch, p.block_size, p.num_blocks);
  if (!per_error.empty()) throw std::invalid_argument("aether::cpu::key_sketch: " + per_error);
  if (p.key_proj == nullptr || p.sketch.codes == nullptr || p.sketch.ranges == nullptr ||
      p.sketch.centroid == nullptr) {
    throw std::invalid_argument("aether::cpu::key_sketch: key_proj, sketch.codes, sketch.ranges and "
                                "sketch.centroid must not be null");
  }
}

// Code of coefficient value x in the range starting at lo with the given step.
inline uint8_t sketch_code(float x, float lo, float step) {
  return static_cast<uint8_t>(quantise_level(x, lo, step, kSketchLevels));
}

template <typename T>
void key_sketch_typed(const KeySketchParams& p) {
  const int32_t D = p.head_dim;
  const int32_t R = p.rank;
  const int32_t bytes = R / 2;
  const int32_t bs = p.block_size;
  const int32_t P = p.blocks_per_sketch;
  const int32_t sb = P * bs;              // tokens per sketch block
  const int64_t NS = p.num_blocks / P;    // sketch blocks of the capacity
  // The codes stay per token in [.., NB, bs, R/2], so the P blocks of sketch block m are the
  // contiguous bytes of blocks m*P .. m*P+P-1: one run of sb token slots.
  const int64_t sketch_codes = static_cast<int64_t>(sb) * bytes;

  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t len = p.seq_lens[b];
    const int32_t n_sketches = valid_blocks(len, sb, static_cast<int32_t>(NS));
    // first_block names a block; its sketch block is rebuilt whole.
    const int32_t first = p.first_block == nullptr ? 0 : std::max(0, p.first_block[b]) / P;
    const float* proj = p.key_proj + h * static_cast<int64_t>(D) * R;  // [D, R]

    const int64_t row = (b * p.kv_heads + h) * NS;  // index of sketch block 0 of this (b, h)
    std::vector<float> key(static_cast<size_t>(D));
    std::vector<float> sum(static_cast<size_t>(D));
    std::vector<float> x(static_cast<size_t>(sb) * R);  // coefficients of the sketch block's tokens

    for (int32_t m = first; m < n_sketches; ++m) {
      const int64_t token_begin = static_cast<int64_t>(m) * sb;
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(len, token_begin + sb) - token_begin);
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int32_t t = 0; t < n; ++t) {
        // Token t lies in block m*P + t/bs: a different page per block when paged (kv_token).
        load_row(kv_token<T>(p.k, b, h, token_begin + t), D, key.data());
        float* xt = &x[static_cast<size_t>(t) * R];
        std::fill_n(xt, R, 0.0f);
        for (int32_t d = 0; d < D; ++d) {
          const float kd = key[d];
          sum[d] += kd;  // float32, in token order from 0.0f, as the reference sums
          const float* proj_row = proj + static_cast<int64_t>(d) * R;
          for (int32_t r = 0; r < R; ++r) xt[r] += proj_row[r] * kd;
        }
      }

      uint16_t* centroid = p.sketch.centroid + (row + m) * D;
      const float count = static_cast<float>(n);
      for (int32_t d = 0; d < D; ++d) centroid[d] = float_to_bfloat16(sum[d] / count);

      uint16_t* lo_bits = p.sketch.ranges + (row + m) * 2 * R;
      uint16_t* hi_bits = lo_bits + R;
      float lo[kMaxSketchRank];
      float step[kMaxSketchRank];
      for (int32_t r = 0; r < R; ++r) {
        float low = x[r];
        float high = x[r];
        for (int32_t t = 1; t < n; ++t) {
          low = std::min(low, x[static_cast<size_t>(t) * R + r]);
          high = std::max(high, x[static_cast<size_t>(t) * R + r]);
        }
        lo_bits[r] = float_to_bfloat16(low);
        hi_bits[r] = float_to_bfloat16(high);
        lo[r] = bfloat16_to_float(lo_bits[r]);
        step[r] = sketch_step(lo_bits[r], hi_bits[r]);
      }

      uint8_t* codes = p.sketch.codes + (row + m) * sketch_codes;
      for (int32_t t = 0; t < n; ++t) {
        const float* xt = &x[static_cast<size_t>(t) * R];
        uint8_t* token_codes = codes + static_cast<int64_t>(t) * bytes;
        for (int32_t i = 0; i < bytes; ++i) {
          const uint8_t even = sketch_code(xt[2 * i], lo[2 * i], step[2 * i]);
          const uint8_t odd = sketch_code(xt[2 * i + 1], lo[2 * i + 1], step[2 * i + 1]);
          token_codes[i] = static_cast<uint8_t>(even | (odd << kSketchBits));
        }
      }
      // Slots past the end of a partial sketch block (the rest of the last block and any whole
      // blocks after it): code 0, so the tensor holds no stale bytes.
      std::fill(codes + static_cast<int64_t>(n) * bytes, codes + sketch_codes, uint8_t{0});
    }

    // A full build owns the whole tensor: sketch blocks past the end get zeros (empty sketch
    // blocks have zero ranges and centroid; their blocks' scores are -inf regardless).
    if (p.first_block == nullptr) {
      const int64_t tail = NS - n_sketches;
      std::fill_n(p.sketch.codes + (row + n_sketches) * sketch_codes, tail * sketch_codes, uint8_t{0});
      std::fill_n(p.sketch.ranges + (row + n_sketches) * 2 * R, tail * 2 * R, uint16_t{0});
      std::fill_n(p.sketch.centroid + (row + n_sketches) * D, tail * D, uint16_t{0});
    }
  });
}

}  // namespace

void key_sketch(const KeySketchParams& params) {
  check_params(params);
  dispatch_dtype(params.dtype, "aether::cpu::key_sketch", [&](auto tag) {
    using T = typename decltype(tag)::type;
    key_sketch_typed<T>(params);
  });
}

}  // namespace cpu
}  // namespace aether
