// aether::cpu::sparse_decode against naive double attention over the selected blocks.
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "aether/cpu/kernels.h"
#include "test_util.h"

namespace aether {
namespace {

using test::KVKind;
using test::TestKV;
using test::TestQuery;

struct DecodeCase {
  DType dtype;
  KVKind kind;
  int group, head_dim, block_size;
  int32_t max_len;
};

std::string describe(const DecodeCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) +
         " G=" + std::to_string(c.group) + " D=" + std::to_string(c.head_dim) +
         " bs=" + std::to_string(c.block_size) + " max_len=" + std::to_string(c.max_len);
}

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> cases;
  const int shapes[][4] = {  // group, head_dim, block_size, max_len
      {1, 64, 16, 97}, {2, 128, 32, 1025}, {4, 256, 64, 63}, {8, 128, 128, 1025},
      {4, 8, 16, 1},   {2, 72, 64, 97}};
  int n = 0;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (const auto& shape : shapes) {
      const KVKind kind = static_cast<KVKind>(n++ % 3);  // every layout meets every dtype
      cases.push_back({dtype, kind, shape[0], shape[1], shape[2], shape[3]});
    }
  }
  return cases;
}

// Random selection rows: each valid block with probability 1/2 (ascending), with stale indices
// (negative, >= n_blocks, >= NB) mixed in, which the kernel must skip. Past num_selected the row
// holds valid-looking indices that the kernel must not use either.
void random_selection(std::mt19937_64& rng, const std::vector<int32_t>& lens, int kv_heads,
                      int block_size, int num_blocks, std::vector<int32_t>& selected,
                      std::vector<int32_t>& num_selected) {
  const int batch = static_cast<int>(lens.size());
  selected.assign(static_cast<size_t>(batch) * kv_heads * num_blocks, 0);
  num_selected.assign(static_cast<size_t>(batch) * kv_heads, 0);
  std::bernoulli_distribution coin(0.5);
  for (int b = 0; b < batch; ++b) {
    const int32_t n_blocks = test::blocks_of(lens[b], block_size);
    for (int h = 0; h < kv_heads; ++h) {
      std::vector<int32_t> row;
      for (int32_t j = 0; j < n_blocks; ++j) {
        if (coin(rng)) row.push_back(j);
      }
      const int32_t stale[] = {-1, n_blocks, num_blocks + 5, -1000};
      for (int32_t index : stale) {
        if (static_cast<int>(row.size()) < num_blocks && coin(rng)) {
          const size_t at = std::uniform_int_distribution<size_t>(0, row.size())(rng);
          row.insert(row.begin() + static_cast<std::ptrdiff_t>(at), index);
        }
      }
      const int64_t offset = (static_cast<int64_t>(b) * kv_heads + h) * num_blocks;
      std::copy(row.begin(), row.end(), selected.begin() + offset);
      num_selected[static_cast<size_t>(b) * kv_heads + h] = static_cast<int32_t>(row.size());
    }
  }
}

TEST(CpuSparseDecode, MatchesNaiveAttentionOverSelectedBlocks) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 4, kv_heads = 2;
  double worst_error_fp32 = 0.0;
  for (const DecodeCase& c : decode_cases()) {
    for (bool dense : {false, true}) {
      SCOPED_TRACE(describe(c) + (dense ? " dense" : " sparse"));
      const int q_heads = kv_heads * c.group;
      const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 1;
      TestKV k(c.dtype, c.kind, batch, kv_heads, c.head_dim, c.block_size, num_blocks, rng);
      TestKV v(c.dtype, c.kind, batch, kv_heads, c.head_dim, c.block_size, num_blocks, rng);
      const std::vector<int32_t> lens = test::mixed_lengths(batch, c.max_len, c.block_size, rng);
      k.poison_after(lens);  // a read past the end turns the output into NaN
      v.poison_after(lens);
      TestQuery q(c.dtype, batch, q_heads, c.head_dim);
      q.fill_normal(rng);
      TestQuery out(c.dtype, batch, q_heads, c.head_dim);  // poisoned, padding included
      std::vector<float> lse(static_cast<size_t>(batch) * q_heads, test::float_nan());
      std::vector<int32_t> selected, num_selected;
      random_selection(rng, lens, kv_heads, c.block_size, num_blocks, selected, num_selected);

      SparseDecodeParams p;
      p.q = q.data.data();
      p.q_stride_batch = q.stride_batch;
      p.q_stride_head = q.stride_head;
      p.k = k.layout();
      p.v = v.layout();
      p.dtype = c.dtype;
      p.seq_lens = lens.data();
      p.selected = dense ? nullptr : selected.data();
      p.num_selected = dense ? nullptr : num_selected.data();
      p.batch = batch;
      p.q_heads = q_heads;
      p.kv_heads = kv_heads;
      p.head_dim = c.head_dim;
      p.block_size = c.block_size;
      p.num_blocks = num_blocks;
      p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
      p.out = out.data.data();
      p.out_stride_batch = out.stride_batch;
      p.out_stride_head = out.stride_head;
      p.lse = lse.data();
      cpu::sparse_decode(p);

      ASSERT_TRUE(out.padding_untouched()) << "wrote outside the output rows";
      const double u = test::unit_roundoff(c.dtype);
      for (int b = 0; b < batch; ++b) {
        for (int hq = 0; hq < q_heads; ++hq) {
          const int h = hq / c.group;
          std::vector<int32_t> blocks;
          if (dense) {
            for (int32_t j = 0; j < test::blocks_of(lens[b], c.block_size); ++j) blocks.push_back(j);
          } else {
            const int64_t row = static_cast<int64_t>(b) * kv_heads + h;
            blocks.assign(selected.begin() + row * num_blocks,
                          selected.begin() + row * num_blocks + num_selected[row]);
          }
          std::vector<double> expected;
          const double expected_lse = test::naive_attention(q.row(b, hq), p.scale, k, v, b, h, lens[b], blocks, expected);
          const std::vector<double> actual = out.row(b, hq);
          const float actual_lse = lse[static_cast<size_t>(b) * q_heads + hq];
          SCOPED_TRACE("b=" + std::to_string(b) + " head=" + std::to_string(hq) + " len=" + std::to_string(lens[b]));
          if (std::isinf(expected_lse)) {  // no token: exact zeros and -inf
            ASSERT_EQ(actual_lse, -std::numeric_limits<float>::infinity());
            for (double x : actual) ASSERT_EQ(x, 0.0);
            continue;
          }
          ASSERT_NEAR(actual_lse, expected_lse, 2e-6 * (4.0 + std::fabs(expected_lse)));
          for (int i = 0; i < c.head_dim; ++i) {
            // float32 accumulation (relative ~1e-6 of the value scale, |v| < ~8) plus one
            // rounding of the result to the output dtype.
            const double error = std::fabs(actual[i] - expected[i]);
            ASSERT_LE(error, u * std::fabs(expected[i]) + 1e-5) << "channel " << i << ": " << actual[i] << " vs " << expected[i];
            if (c.dtype == DType::kFloat32) worst_error_fp32 = std::max(worst_error_fp32, error);
          }
        }
      }
    }
  }
  RecordProperty("worst_fp32_error", std::to_string(worst_error_fp32));
}

// With selected == all valid blocks, the sparse path must reproduce the dense path exactly (the
// blocks are visited in the same order with the same arithmetic).
TEST(CpuSparseDecode, SelectingEveryBlockEqualsDenseBitForBit) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 3, kv_heads = 2, G = 4, D = 128, bs = 32, max_len = 1025;
  const int num_blocks = test::blocks_of(max_len, bs);
  TestKV k(DType::kBFloat16, KVKind::kPaged, batch, kv_heads, D, bs, num_blocks, rng);
  TestKV v(DType::kBFloat16, KVKind::kPaged, batch, kv_heads, D, bs, num_blocks, rng);
  const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng);
  TestQuery q(DType::kBFloat16, batch, kv_heads * G, D);
  q.fill_normal(rng);
  std::vector<int32_t> selected(static_cast<size_t>(batch) * kv_heads * num_blocks, -1);
  std::vector<int32_t> num_selected(static_cast<size_t>(batch) * kv_heads);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < kv_heads; ++h) {
      const int32_t n_blocks = test::blocks_of(lens[b], bs);
      for (int32_t j = 0; j < n_blocks; ++j) selected[(b * kv_heads + h) * num_blocks + j] = j;
      num_selected[b * kv_heads + h] = n_blocks;
    }
  }
  std::vector<TestQuery> outs(2, TestQuery(DType::kBFloat16, batch, kv_heads * G, D));
  std::vector<std::vector<float>> lses(2, std::vector<float>(static_cast<size_t>(batch) * kv_heads * G));
  for (int run = 0; run < 2; ++run) {
    SparseDecodeParams p;
    p.q = q.data.data();
    p.q_stride_batch = q.stride_batch;
    p.q_stride_head = q.stride_head;
    p.k = k.layout();
    p.v = v.layout();
    p.dtype = DType::kBFloat16;
    p.seq_lens = lens.data();
    p.selected = run == 0 ? nullptr : selected.data();
    p.num_selected = run == 0 ? nullptr : num_selected.data();
    p.batch = batch;
    p.q_heads = kv_heads * G;
    p.kv_heads = kv_heads;
    p.head_dim = D;
    p.block_size = bs;
    p.num_blocks = num_blocks;
    p.scale = 0.1f;
    p.out = outs[run].data.data();
    p.out_stride_batch = outs[run].stride_batch;
    p.out_stride_head = outs[run].stride_head;
    p.lse = lses[run].data();
    cpu::sparse_decode(p);
  }
  EXPECT_EQ(outs[0].data.bytes, outs[1].data.bytes);
  EXPECT_EQ(std::memcmp(lses[0].data(), lses[1].data(), lses[0].size() * sizeof(float)), 0);
}

TEST(CpuSparseDecode, UnknownDTypeThrows) {
  SparseDecodeParams p;
  p.dtype = static_cast<DType>(3);
  try {
    cpu::sparse_decode(p);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("dtype value 3"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace aether
