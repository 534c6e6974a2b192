// CPU key codes and refine scores: the second stage of two-stage selection (KeyCodesParams and
// RefineScoresParams in params.h, aether/reference.py key_codes / refine_head_scores).
//
// key_codes quantises every channel of every key to 2 or 4 bits over a group of Pg blocks; like
// key_sketch a group is always rebuilt from all of its valid tokens, so an append (first_block
// set) is bit-identical to a full build. refine_scores reads the codes of the candidate blocks
// only and writes each query head's block log-mass estimate. code_channels and channel_scores are
// the "qcodes" score: the query's heaviest channels per (b, kv head), then every block scored from
// the channel-major codes of those channels (the others at their group's mid-range).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
  const int64_t run_bytes = static_cast<int64_t>(gt) * bits / 8;  // channel-major: one channel's run
  // A channel pool stores S runs per group (params.h); the group's P blocks are contiguous.
  const int32_t S = p.channel_major && p.channel_slots != nullptr ? p.stored_channels : D;
  const int64_t group_codes = p.channel_major ? S * run_bytes : static_cast<int64_t>(gt) * token_bytes;

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
    std::vector<int32_t> slot(static_cast<size_t>(D));  // channel-major: where channel d's run goes, or -1
    for (int32_t d = 0; d < D; ++d) {
      const int32_t s = p.channel_slots == nullptr ? d : p.channel_slots[(b * p.kv_heads + h) * D + d];
      slot[d] = s >= 0 && s < S ? s : -1;
    }

    // Zero a group's codes: all of them, or with a pool only the runs a channel names (a slot no
    // channel names is never written, as on the GPU).
    auto clear_group = [&](uint8_t* codes) {
      if (!p.channel_major || p.channel_slots == nullptr) {
        std::fill_n(codes, group_codes, uint8_t{0});
        return;
      }
      for (int32_t d = 0; d < D; ++d) {
        if (slot[d] >= 0) std::fill_n(codes + slot[d] * run_bytes, run_bytes, uint8_t{0});
      }
    };

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
      clear_group(codes);  // also the tokens past a partial group's end
      for (int32_t t = 0; t < n; ++t) {
        const float* key = &keys[static_cast<size_t>(t) * D];
        for (int32_t d = 0; d < D; ++d) {
          if (p.channel_major && slot[d] < 0) continue;  // not in the pool: a range, no codes
          // token-major: channel d at bit d * bits of the token's bytes; channel-major: token t at
          // bit t * bits of channel d's run (at its slot)
          const int64_t bit = p.channel_major ? static_cast<int64_t>(t) * bits : static_cast<int64_t>(d) * bits;
          uint8_t* base = p.channel_major ? codes + slot[d] * run_bytes : codes + static_cast<int64_t>(t) * token_bytes;
          base[bit / 8] = static_cast<uint8_t>(base[bit / 8] | (quantise_level(key[d], lo[d], step[d], levels) << (bit % 8)));
        }
      }
    }
    // A full build owns the whole tensor: groups past the end get zero codes and ranges.
    if (p.first_block == nullptr) {
      const int64_t tail = NG - n_groups;
      for (int64_t m = n_groups; m < NG; ++m) clear_group(p.codes + (row + m) * group_codes);
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

void code_spreads_rows(const CodeSpreadsParams& p) {
  const int32_t D = p.head_dim;
  const int32_t P = p.blocks_per_group;
  const int32_t gt = P * p.block_size;
  const int32_t NG = p.num_blocks / P;
  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int32_t n_groups = valid_blocks(std::max(p.seq_lens[b], 0), gt, NG);
    const int32_t first = p.first_block == nullptr ? 0 : std::max(p.first_block[b], 0) / P;
    const uint16_t* ranges = p.ranges + item * NG * 2 * D;
    double* spreads = p.spreads + item * NG * D;
    for (int32_t d = 0; d < D; ++d) {
      double acc = first > 0 && first < n_groups ? spreads[static_cast<int64_t>(first - 1) * D + d] : 0.0;
      for (int32_t m = first; m < n_groups; ++m) {
        const double width = static_cast<double>(bfloat16_to_float(ranges[(static_cast<int64_t>(m) * 2 + 1) * D + d])) -
                             static_cast<double>(bfloat16_to_float(ranges[static_cast<int64_t>(m) * 2 * D + d]));
        // Rounded on its own (no fused multiply-add where the compiler would contract), as the CUDA
        // kernel's __dmul_rn / __dadd_rn: both give the same bits.
        const volatile double square = width * width;
        acc = acc + square;
        spreads[static_cast<int64_t>(m) * D + d] = acc;
      }
    }
  });
}

// The key of a double in an order-preserving unsigned integer order (CUDA's ordered_key in
// common.cuh): -0 folded into +0, negative values bit-flipped, positive ones with the sign set.
// A NaN gets the top key, whatever its sign: x86 makes a negative NaN for inf * 0, and a NaN's
// rank should not depend on that (the GPU kernels rank the NaN their arithmetic returns by its
// sign bit; not checked on a GPU).
uint64_t ordered_key(double x) {
  if (std::isnan(x)) return ~0ull;
  const double y = x + 0.0;  // -0 + 0 = +0 under round-to-nearest
  uint64_t bits = 0;
  std::memcpy(&bits, &y, sizeof(bits));
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}

// The qcodes channel choice (params.h, code_channels): per channel, w_d = (sum_g q_gd^2) * spread_d
// in double; the m largest eligible w_d, a tie to the lower channel, written ascending to out, then
// -1 entries if fewer than m are eligible (a pool).
template <typename T>
void choose_code_channels(const void* q_data, int64_t q_stride_batch, int64_t q_stride_head, int64_t b, int64_t h,
                          int32_t G, int32_t D, const double* spread, const int32_t* slots, int32_t stored,
                          int32_t m, int32_t* out) {
  std::vector<float> q(static_cast<size_t>(D));
  std::vector<double> weight(static_cast<size_t>(D), 0.0);
  for (int32_t g = 0; g < G; ++g) {
    load_row(static_cast<const T*>(q_data) + b * q_stride_batch + (h * G + g) * q_stride_head, D, q.data());
    for (int32_t d = 0; d < D; ++d) weight[d] += static_cast<double>(q[d]) * static_cast<double>(q[d]);
  }
  // Ranked by order-preserving integer keys, as the CUDA kernels do: a total order even with NaN
  // (a NaN weight, from a NaN or infinite query or range, compared as a double would be ranked
  // first by itself and counted by nobody, letting more than m channels through).
  std::vector<uint64_t> key(static_cast<size_t>(D));
  for (int32_t d = 0; d < D; ++d) key[d] = ordered_key(weight[d] * spread[d]);
  std::vector<char> eligible(static_cast<size_t>(D), 1);
  if (slots != nullptr) {
    for (int32_t d = 0; d < D; ++d) eligible[d] = slots[d] >= 0 && slots[d] < stored;
  }
  int32_t written = 0;
  for (int32_t d = 0; d < D && written < m; ++d) {
    if (!eligible[d]) continue;
    int32_t rank = 0;
    for (int32_t e = 0; e < D; ++e) {
      rank += eligible[e] && (key[e] > key[d] || (key[e] == key[d] && e < d));
    }
    if (rank < m) out[written++] = d;
  }
  std::fill(out + written, out + m, -1);
}

template <typename T>
void code_channels_typed(const CodeChannelsParams& p) {
  const int32_t D = p.head_dim;
  const int32_t G = p.q_heads / p.kv_heads;
  const int32_t P = p.blocks_per_group;
  const int32_t gt = P * p.block_size;
  const int32_t NG = p.num_blocks / P;
  const int32_t m = p.num_channels;
  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t n_groups = valid_blocks(std::max(p.seq_lens[b], 0), gt, NG);
    std::vector<double> energy(static_cast<size_t>(D), 0.0);
    if (p.spreads != nullptr) {  // the running spreads of the last valid group (code_spreads)
      if (n_groups > 0) std::copy_n(p.spreads + (item * NG + n_groups - 1) * D, D, energy.begin());
    } else {
      const uint16_t* ranges = p.ranges + item * NG * 2 * D;
      for (int32_t g = 0; g < n_groups; ++g) {
        for (int32_t d = 0; d < D; ++d) {
          const double width = static_cast<double>(bfloat16_to_float(ranges[(g * 2 + 1) * D + d])) -
                               static_cast<double>(bfloat16_to_float(ranges[g * 2 * D + d]));
          energy[d] += width * width;
        }
      }
    }
    choose_code_channels<T>(p.q, p.q_stride_batch, p.q_stride_head, b, h, G, D, energy.data(),
                            p.channel_slots == nullptr ? nullptr : p.channel_slots + item * D, p.stored_channels, m,
                            p.channels + item * m);
  });
}

template <typename T>
void channel_scores_typed(const ChannelScoresParams& p) {
  const int32_t D = p.head_dim;
  const int32_t bits = p.bits;
  const int32_t levels = (1 << bits) - 1;
  const uint32_t mask = static_cast<uint32_t>(levels);
  const int32_t bs = p.block_size;
  const int32_t P = p.blocks_per_group;
  const int32_t gt = P * bs;
  const int64_t run_bytes = static_cast<int64_t>(gt) * bits / 8;
  const int32_t G = p.q_heads / p.kv_heads;
  const int32_t NB = p.num_blocks;
  const int32_t NG = NB / P;
  const int32_t m = p.num_channels;
  const int32_t S = p.channel_slots == nullptr ? D : p.stored_channels;  // runs per group

  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t len = std::max(p.seq_lens[b], 0);
    const int32_t n_blocks = valid_blocks(len, bs, NB);
    // No list: the choice of code_channels with spreads (params.h), made here.
    std::vector<int32_t> own;
    const int32_t* chosen = p.channels == nullptr ? nullptr : p.channels + item * m;
    if (chosen == nullptr) {
      own.assign(static_cast<size_t>(m), -1);
      if (n_blocks > 0) {
        const int32_t n_groups = (n_blocks + P - 1) / P;
        choose_code_channels<T>(p.q, p.q_stride_batch, p.q_stride_head, b, h, G, D,
                                p.spreads + (item * NG + n_groups - 1) * D,
                                p.channel_slots == nullptr ? nullptr : p.channel_slots + item * D, S, m, own.data());
      }
      chosen = own.data();
    }
    auto slot_of = [&](int32_t d) {  // channel d's run, or -1 (not stored: scored at its mid-range)
      const int32_t slot = p.channel_slots == nullptr ? d : p.channel_slots[item * D + d];
      return slot >= 0 && slot < S ? slot : -1;
    };
    std::vector<float> q(static_cast<size_t>(G) * D);
    for (int32_t g = 0; g < G; ++g) {
      load_row(static_cast<const T*>(p.q) + b * p.q_stride_batch + (h * G + g) * p.q_stride_head, D,
               &q[static_cast<size_t>(g) * D]);
    }
    // Entries outside [0, D) are ignored and a channel listed twice counts once (params.h).
    std::vector<char> is_chosen(static_cast<size_t>(D), 0);
    for (int32_t i = 0; i < m; ++i) {
      if (chosen[i] >= 0 && chosen[i] < D && slot_of(chosen[i]) >= 0) is_chosen[chosen[i]] = 1;
    }
    std::vector<int32_t> list;
    for (int32_t d = 0; d < D; ++d) {
      if (is_chosen[d]) list.push_back(d);
    }
    std::vector<float> value(static_cast<size_t>(D));  // k'_td of the token being scored
    std::vector<float> lo(static_cast<size_t>(D));
    std::vector<float> step(static_cast<size_t>(D));
    std::vector<float> logits(static_cast<size_t>(bs));
    for (int32_t j = 0; j < NB; ++j) {
      if (j >= n_blocks) {
        for (int32_t g = 0; g < G; ++g) {
          p.head_scores[(b * p.q_heads + h * G + g) * static_cast<int64_t>(NB) + j] =
              -std::numeric_limits<float>::infinity();
        }
        continue;
      }
      const int32_t group = j / P;
      const int32_t first = (j % P) * bs;  // the block's first token within its group
      const int32_t n = std::min(bs, len - j * bs);
      const uint16_t* lo_bits = p.ranges + (item * NG + group) * 2 * D;
      const uint16_t* hi_bits = lo_bits + D;
      for (int32_t d = 0; d < D; ++d) {
        lo[d] = bfloat16_to_float(lo_bits[d]);
        step[d] = sketch_step(lo_bits[d], hi_bits[d], levels);
        if (!is_chosen[d]) value[d] = (lo[d] + bfloat16_to_float(hi_bits[d])) / 2.0f;
      }
      const uint8_t* runs = p.codes + (item * NG + group) * S * run_bytes;
      for (int32_t g = 0; g < G; ++g) {
        const float* qg = &q[static_cast<size_t>(g) * D];
        float top = -std::numeric_limits<float>::infinity();
        for (int32_t t = 0; t < n; ++t) {
          const int64_t bit = static_cast<int64_t>(first + t) * bits;
          for (const int32_t d : list) {
            const uint32_t code = (runs[slot_of(d) * run_bytes + bit / 8] >> (bit % 8)) & mask;
            value[d] = lo[d] + static_cast<float>(code) * step[d];
          }
          float dot = 0.0f;
          for (int32_t d = 0; d < D; ++d) dot += qg[d] * value[d];
          logits[t] = p.scale * dot;
          top = std::max(top, logits[t]);
        }
        float lse = top;
        if (std::isfinite(top)) {
          double sum = 0.0;
          for (int32_t t = 0; t < n; ++t) sum += std::exp(static_cast<double>(logits[t] - top));
          lse = top + static_cast<float>(std::log(sum));
        }
        p.head_scores[(b * p.q_heads + h * G + g) * static_cast<int64_t>(NB) + j] = lse;
      }
    }
  });
}

void check_channel_args(int32_t batch, int32_t q_heads, int32_t kv_heads, int32_t head_dim, int32_t num_channels,
                        const char* what) {
  if (batch < 0 || kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0) {
    throw std::invalid_argument(std::string(what) + ": q_heads must be a positive multiple of kv_heads");
  }
  if (num_channels < 1 || num_channels > head_dim) {
    throw std::invalid_argument(std::string(what) + ": num_channels " + std::to_string(num_channels) +
                                " outside [1, head_dim = " + std::to_string(head_dim) + "]");
  }
}

// A channel pool: stored_channels in [1, head_dim] (params.h).
void check_pool(const int32_t* channel_slots, int32_t stored_channels, int32_t head_dim, const char* what) {
  if (channel_slots != nullptr && (stored_channels < 1 || stored_channels > head_dim)) {
    throw std::invalid_argument(std::string(what) + ": stored_channels " + std::to_string(stored_channels) +
                                " outside [1, head_dim = " + std::to_string(head_dim) + "]");
  }
}

}  // namespace

void key_codes(const KeyCodesParams& params) {
  check_bits_and_groups(params.bits, params.blocks_per_group, params.block_size, params.num_blocks, params.head_dim,
                        "aether::cpu::key_codes");
  if (params.codes == nullptr || params.ranges == nullptr) {
    throw std::invalid_argument("aether::cpu::key_codes: codes and ranges must not be null");
  }
  if (params.channel_slots != nullptr && !params.channel_major) {
    throw std::invalid_argument("aether::cpu::key_codes: a channel pool (channel_slots) needs the channel-major layout");
  }
  check_pool(params.channel_slots, params.stored_channels, params.head_dim, "aether::cpu::key_codes");
  dispatch_dtype(params.dtype, "aether::cpu::key_codes", [&](auto tag) {
    using T = typename decltype(tag)::type;
    key_codes_typed<T>(params);
  });
  if (params.spreads != nullptr && params.first_block != nullptr) {  // an update keeps its running spreads
    CodeSpreadsParams s;
    s.ranges = params.ranges;
    s.seq_lens = params.seq_lens;
    s.first_block = params.first_block;
    s.batch = params.batch;
    s.kv_heads = params.kv_heads;
    s.head_dim = params.head_dim;
    s.block_size = params.block_size;
    s.num_blocks = params.num_blocks;
    s.blocks_per_group = params.blocks_per_group;
    s.spreads = params.spreads;
    code_spreads_rows(s);
  }
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

void code_spreads(const CodeSpreadsParams& params) {
  if (params.kv_heads <= 0 || params.head_dim <= 0 || params.block_size <= 0 || params.blocks_per_group < 1 ||
      params.num_blocks < 0 || params.num_blocks % params.blocks_per_group != 0) {
    throw std::invalid_argument("aether::cpu::code_spreads: invalid sizes");
  }
  if (params.ranges == nullptr || params.seq_lens == nullptr || params.spreads == nullptr) {
    throw std::invalid_argument("aether::cpu::code_spreads: ranges, seq_lens and spreads must not be null");
  }
  code_spreads_rows(params);
}

void code_channels(const CodeChannelsParams& params) {
  check_bits_and_groups(2, params.blocks_per_group, params.block_size, params.num_blocks, params.head_dim,
                        "aether::cpu::code_channels");
  check_channel_args(params.batch, params.q_heads, params.kv_heads, params.head_dim, params.num_channels,
                     "aether::cpu::code_channels");
  check_pool(params.channel_slots, params.stored_channels, params.head_dim, "aether::cpu::code_channels");
  if (params.q == nullptr || params.ranges == nullptr || params.seq_lens == nullptr || params.channels == nullptr) {
    throw std::invalid_argument("aether::cpu::code_channels: q, ranges, seq_lens and channels must not be null");
  }
  dispatch_dtype(params.dtype, "aether::cpu::code_channels", [&](auto tag) {
    using T = typename decltype(tag)::type;
    code_channels_typed<T>(params);
  });
}

void channel_scores(const ChannelScoresParams& params) {
  check_bits_and_groups(params.bits, params.blocks_per_group, params.block_size, params.num_blocks, params.head_dim,
                        "aether::cpu::channel_scores");
  check_channel_args(params.batch, params.q_heads, params.kv_heads, params.head_dim, params.num_channels,
                     "aether::cpu::channel_scores");
  check_pool(params.channel_slots, params.stored_channels, params.head_dim, "aether::cpu::channel_scores");
  if (params.q == nullptr || params.codes == nullptr || params.ranges == nullptr || params.seq_lens == nullptr ||
      (params.channels == nullptr && params.spreads == nullptr) || params.head_scores == nullptr) {
    throw std::invalid_argument("aether::cpu::channel_scores: q, codes, ranges, seq_lens, channels (or spreads) and "
                                "head_scores must not be null");
  }
  dispatch_dtype(params.dtype, "aether::cpu::channel_scores", [&](auto tag) {
    using T = typename decltype(tag)::type;
    channel_scores_typed<T>(params);
  });
}

}  // namespace cpu
}  // namespace aether
