// CPU key codes and refine scores: the second stage of two-stage selection (KeyCodesParams and
// RefineScoresParams in params.h, aether/reference.py key_codes / refine_head_scores).
//
// key_codes quantises every channel of every key to 2 or 4 bits over a group of Pg blocks; like
// key_sketch a group is always rebuilt from all of its valid tokens, so an append (first_block
// set) is bit-identical to a full build. refine_scores reads the codes of the candidate blocks
// only and writes each query head's block log-mass estimate.
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

void check_bits_and_groups(int32_t bits, int32_t per, int32_t block_size, int32_t num_blocks, int32_t head_dim,
                           const char* what) {
  if (bits != 2 && bits != 4) {
    throw std::invalid_argument(std::string(what) + ": unsupported bits " + std::to_string(bits) +
                                " (allowed: 2, 4)");
  }
  if ((head_dim * bits) % 8 != 0) {
    throw std::invalid_argument(std::string(what) + ": head_dim " + std::to_string(head_dim) +
                                " * bits is not a whole number of bytes");
  }
  const std::string error = blocks_per_sketch_error(per, block_size, num_blocks, "blocks_per_group");
  if (!error.empty()) throw std::invalid_argument(std::string(what) + ": " + error);
}

template <typename T>
void key_codes_typed(const KeyCodesParams& p) {
  const int32_t D = p.head_dim;
  const int32_t bits = p.bits;
  const int32_t levels = (1 << bits) - 1;
  const int32_t token_bytes = D * bits / 8;
  const int32_t bs = p.block_size;
  const int32_t P = p.blocks_per_group;
  const int32_t gt = P * bs;                   // tokens per group
  const int64_t NG = p.num_blocks / P;         // groups of the capacity
  const int64_t group_codes = static_cast<int64_t>(gt) * token_bytes;  // the group's P blocks are contiguous

  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t len = p.seq_lens[b];
    const int32_t n_groups = valid_blocks(len, gt, static_cast<int32_t>(NG));
    const int32_t first = p.first_block == nullptr ? 0 : std::max(0, p.first_block[b]) / P;
    const int64_t row = (b * p.kv_heads + h) * NG;
    std::vector<float> keys(static_cast<size_t>(gt) * D);
    std::vector<float> lo(static_cast<size_t>(D));
    std::vector<float> step(static_cast<size_t>(D));

    for (int32_t m = first; m < n_groups; ++m) {
      const int64_t token_begin = static_cast<int64_t>(m) * gt;
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(len, token_begin + gt) - token_begin);
      for (int32_t t = 0; t < n; ++t) {
        load_row(kv_token<T>(p.k, b, h, token_begin + t), D, &keys[static_cast<size_t>(t) * D]);
      }
      uint16_t* lo_bits = p.ranges + (row + m) * 2 * D;
      uint16_t* hi_bits = lo_bits + D;
      for (int32_t d = 0; d < D; ++d) {
        float low = keys[d];
        float high = keys[d];
        for (int32_t t = 1; t < n; ++t) {
          low = std::min(low, keys[static_cast<size_t>(t) * D + d]);
          high = std::max(high, keys[static_cast<size_t>(t) * D + d]);
        }
        lo_bits[d] = float_to_bfloat16(low);
        hi_bits[d] = float_to_bfloat16(high);
        lo[d] = bfloat16_to_float(lo_bits[d]);
        step[d] = sketch_step(lo_bits[d], hi_bits[d], levels);
      }
      uint8_t* codes = p.codes + (row + m) * group_codes;
      std::fill(codes, codes + group_codes, uint8_t{0});  // also the slots past a partial group's end
      for (int32_t t = 0; t < n; ++t) {
        uint8_t* token = codes + static_cast<int64_t>(t) * token_bytes;
        const float* key = &keys[static_cast<size_t>(t) * D];
        for (int32_t d = 0; d < D; ++d) {
          const int32_t bit = d * bits;
          token[bit / 8] = static_cast<uint8_t>(token[bit / 8] | (quantise_level(key[d], lo[d], step[d], levels) << (bit % 8)));
        }
      }
    }
    // A full build owns the whole tensor: groups past the end get zero codes and ranges.
    if (p.first_block == nullptr) {
      const int64_t tail = NG - n_groups;
      std::fill_n(p.codes + (row + n_groups) * group_codes, tail * group_codes, uint8_t{0});
      std::fill_n(p.ranges + (row + n_groups) * 2 * D, tail * 2 * D, uint16_t{0});
    }
  });
}

template <typename T>
void refine_scores_typed(const RefineScoresParams& p) {
  const int32_t D = p.head_dim;
  const int32_t bits = p.bits;
  const int32_t levels = (1 << bits) - 1;
  const uint32_t mask = static_cast<uint32_t>(levels);
  const int32_t token_bytes = D * bits / 8;
  const int32_t bs = p.block_size;
  const int32_t P = p.blocks_per_group;
  const int32_t G = p.q_heads / p.kv_heads;
  const int64_t NB = p.num_blocks;
  const int64_t NG = NB / P;

  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t len = std::max(p.seq_lens[b], 0);
    const int32_t n_blocks = valid_blocks(len, bs, static_cast<int32_t>(NB));
    const int64_t L = p.list_length;
    const int32_t count = std::min<int32_t>(std::max(p.num_candidates[item], 0), p.list_length);
    const int32_t* row = p.candidates + item * L;
    std::vector<float> q(static_cast<size_t>(G) * D);
    for (int32_t g = 0; g < G; ++g) {
      const T* qg = static_cast<const T*>(p.q) + b * p.q_stride_batch + (h * G + g) * p.q_stride_head;
      load_row(qg, D, &q[static_cast<size_t>(g) * D]);
    }
    std::vector<float> lo(static_cast<size_t>(D));
    std::vector<float> step(static_cast<size_t>(D));
    std::vector<float> logits(static_cast<size_t>(bs));
    for (int32_t i = 0; i < count; ++i) {
      const int32_t j = row[i];
      if (j < 0 || j >= n_blocks || j >= L) continue;  // padding or past the end: nothing to score
      const int32_t n = std::min(bs, len - j * bs);
      const uint16_t* lo_bits = p.ranges + ((b * p.kv_heads + h) * NG + j / P) * 2 * D;
      const uint16_t* hi_bits = lo_bits + D;
      for (int32_t d = 0; d < D; ++d) {  // the group's ranges, widened once per candidate
        lo[d] = bfloat16_to_float(lo_bits[d]);
        step[d] = sketch_step(lo_bits[d], hi_bits[d], levels);
      }
      const uint8_t* codes = p.codes + ((b * p.kv_heads + h) * NB + j) * static_cast<int64_t>(bs) * token_bytes;
      for (int32_t g = 0; g < G; ++g) {
        const float* qg = &q[static_cast<size_t>(g) * D];
        float top = -std::numeric_limits<float>::infinity();
        for (int32_t t = 0; t < n; ++t) {
          const uint8_t* token = codes + static_cast<int64_t>(t) * token_bytes;
          float dot = 0.0f;
          for (int32_t d = 0; d < D; ++d) {
            const int32_t bit = d * bits;
            const uint32_t code = (token[bit / 8] >> (bit % 8)) & mask;
            dot += qg[d] * (lo[d] + static_cast<float>(code) * step[d]);
          }
          logits[t] = p.scale * dot;
          top = std::max(top, logits[t]);
        }
        float lse = top;
        if (std::isfinite(top)) {
          double sum = 0.0;
          for (int32_t t = 0; t < n; ++t) sum += std::exp(static_cast<double>(logits[t] - top));
          lse = top + static_cast<float>(std::log(sum));
        }
        p.head_scores[(b * p.q_heads + h * G + g) * L + j] = lse;
      }
    }
  });
}

}  // namespace

void key_codes(const KeyCodesParams& params) {
  check_bits_and_groups(params.bits, params.blocks_per_group, params.block_size, params.num_blocks, params.head_dim,
                        "aether::cpu::key_codes");
  if (params.codes == nullptr || params.ranges == nullptr) {
    throw std::invalid_argument("aether::cpu::key_codes: codes and ranges must not be null");
  }
  dispatch_dtype(params.dtype, "aether::cpu::key_codes", [&](auto tag) {
    using T = typename decltype(tag)::type;
    key_codes_typed<T>(params);
  });
}

void refine_scores(const RefineScoresParams& params) {
  check_bits_and_groups(params.bits, params.blocks_per_group, params.block_size, params.num_blocks, params.head_dim,
                        "aether::cpu::refine_scores");
  if (params.codes == nullptr || params.ranges == nullptr || params.candidates == nullptr ||
      params.num_candidates == nullptr || params.head_scores == nullptr) {
    throw std::invalid_argument("aether::cpu::refine_scores: codes, ranges, candidates, num_candidates and "
                                "head_scores must not be null");
  }
  if (params.list_length < 0) throw std::invalid_argument("aether::cpu::refine_scores: list_length must be >= 0");
  if (params.kv_heads <= 0 || params.q_heads % params.kv_heads != 0) {
    throw std::invalid_argument("aether::cpu::refine_scores: q_heads must be a positive multiple of kv_heads");
  }
  dispatch_dtype(params.dtype, "aether::cpu::refine_scores", [&](auto tag) {
    using T = typename decltype(tag)::type;
    refine_scores_typed<T>(params);
  });
}

}  // namespace cpu
}  // namespace aether
