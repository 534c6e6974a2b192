// CPU sparse decode: exact softmax attention of each query head over the tokens of the selected
// blocks of its KV head, online softmax in float32.
//
// Work is split over (batch, kv head): the G query heads of a group share every K/V block load
// (converted to float32 once), the same reuse the CUDA kernel gets from reading a block once
// for the whole group.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "aether/cpu/common.h"
#include "aether/cpu/kernels.h"

namespace aether {
namespace cpu {
namespace {

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

template <typename T>
void sparse_decode_typed(const SparseDecodeParams& p) {
  const int32_t G = p.q_heads / p.kv_heads;
  const int32_t D = p.head_dim;
  const int32_t bs = p.block_size;
  const int64_t NB = p.num_blocks;

  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t item) {
    const int64_t b = item / p.kv_heads;
    const int64_t h = item % p.kv_heads;
    const int32_t len = p.seq_lens[b];
    const int32_t n_blocks = valid_blocks(len, bs, p.num_blocks);

    std::vector<float> q(static_cast<size_t>(G) * D);
    for (int32_t g = 0; g < G; ++g) {
      const T* row = static_cast<const T*>(p.q) + b * p.q_stride_batch + (h * G + g) * p.q_stride_head;
      load_row(row, D, &q[static_cast<size_t>(g) * D]);
    }
    // Online softmax state per head: running max, sum of exp(logit - max), weighted V sum.
    std::vector<float> running_max(static_cast<size_t>(G), kNegInfF);
    std::vector<float> running_sum(static_cast<size_t>(G), 0.0f);
    std::vector<float> acc(static_cast<size_t>(G) * D, 0.0f);
    std::vector<float> keys(static_cast<size_t>(bs) * D), values(static_cast<size_t>(bs) * D);
    std::vector<float> logits(static_cast<size_t>(bs));

    const int32_t* selected_row = p.selected == nullptr ? nullptr : p.selected + item * NB;
    int64_t count = n_blocks;
    if (selected_row != nullptr) {
      count = p.num_selected == nullptr ? NB : std::clamp<int64_t>(p.num_selected[item], 0, NB);
    }

    for (int64_t n = 0; n < count; ++n) {
      const int64_t j = selected_row == nullptr ? n : selected_row[n];
      if (j < 0 || j >= n_blocks) continue;  // padding or stale index: never read
      const int64_t token_begin = j * bs;
      const int32_t tokens = static_cast<int32_t>(std::min<int64_t>(len, token_begin + bs) - token_begin);
      for (int32_t t = 0; t < tokens; ++t) {
        load_row(kv_token<T>(p.k, b, h, token_begin + t), D, &keys[static_cast<size_t>(t) * D]);
        load_row(kv_token<T>(p.v, b, h, token_begin + t), D, &values[static_cast<size_t>(t) * D]);
      }

      for (int32_t g = 0; g < G; ++g) {
        const float* qg = &q[static_cast<size_t>(g) * D];
        float block_max = kNegInfF;
        for (int32_t t = 0; t < tokens; ++t) {
          const float* key = &keys[static_cast<size_t>(t) * D];
          float dot = 0.0f;
          for (int32_t i = 0; i < D; ++i) dot += qg[i] * key[i];
          logits[t] = p.scale * dot;
          block_max = std::max(block_max, logits[t]);
        }
        // Rescale the state once per block rather than once per token.
        const float new_max = std::max(running_max[g], block_max);
        const float correction = running_max[g] == kNegInfF ? 0.0f : std::exp(running_max[g] - new_max);
        float* acc_g = &acc[static_cast<size_t>(g) * D];
        running_sum[g] *= correction;
        for (int32_t i = 0; i < D; ++i) acc_g[i] *= correction;
        for (int32_t t = 0; t < tokens; ++t) {
          const float weight = std::exp(logits[t] - new_max);
          running_sum[g] += weight;
          const float* value = &values[static_cast<size_t>(t) * D];
          for (int32_t i = 0; i < D; ++i) acc_g[i] += weight * value[i];
        }
        running_max[g] = new_max;
      }
    }

    for (int32_t g = 0; g < G; ++g) {
      const int64_t q_head = h * G + g;
      T* out = static_cast<T*>(p.out) + b * p.out_stride_batch + q_head * p.out_stride_head;
      const bool empty = running_sum[g] == 0.0f;  // no token at all: zero output, lse -inf
      const float inverse = empty ? 0.0f : 1.0f / running_sum[g];
      for (int32_t i = 0; i < D; ++i) out[i] = from_float<T>(acc[static_cast<size_t>(g) * D + i] * inverse);
      if (p.lse != nullptr) {
        p.lse[b * p.q_heads + q_head] = empty ? kNegInfF : running_max[g] + std::log(running_sum[g]);
      }
    }
  });
}

}  // namespace

void sparse_decode(const SparseDecodeParams& params) {
  dispatch_dtype(params.dtype, "aether::cpu::sparse_decode", [&](auto tag) {
    using T = typename decltype(tag)::type;
    sparse_decode_typed<T>(params);
  });
}

}  // namespace cpu
}  // namespace aether
