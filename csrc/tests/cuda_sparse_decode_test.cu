// aether::cuda::sparse_decode against a double-precision reference and the CPU kernel: the CUDA
// error must stay within twice the error of the CPU kernel (float32 compute, one rounding to the
// output dtype) plus a small absolute term; split counts, layouts (paged == contiguous bit for
// bit), stale selection indices, empty heads, and outputs poisoned before every call.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
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
using test::TestKV;
using test::TestQuery;

using test::DeviceBytes;
using test::has_cuda_device;

template <typename T>
DeviceBytes to_device(const std::vector<T>& host) {
  return DeviceBytes(host.data(), host.size() * sizeof(T));
}

// The same cache in paged layout (fresh shuffled pages), values copied exactly.
TestKV as_paged(const TestKV& src, std::mt19937_64& rng) {
  TestKV paged(src.dtype, KVKind::kPaged, src.batch, src.heads, src.head_dim, src.block_size, src.num_blocks, rng);
  const int64_t slots = static_cast<int64_t>(src.num_blocks) * src.block_size;
  for (int b = 0; b < src.batch; ++b) {
    for (int h = 0; h < src.heads; ++h) {
      for (int64_t t = 0; t < slots; ++t) {
        for (int i = 0; i < src.head_dim; ++i) {
          const int64_t from = src.offset(b, h, t) + i;
          std::memcpy(paged.data.bytes.data() + (paged.offset(b, h, t) + i) * test::dtype_size(src.dtype),
                      src.data.bytes.data() + from * test::dtype_size(src.dtype), test::dtype_size(src.dtype));
        }
      }
    }
  }
  return paged;
}

// Selection rows with stale entries (negative, >= n_blocks, >= NB) that must be skipped.
void random_selection(std::mt19937_64& rng, const std::vector<int32_t>& lens, int kv_heads, int block_size,
                      int num_blocks, double keep, std::vector<int32_t>& selected, std::vector<int32_t>& num_selected) {
  const int batch = static_cast<int>(lens.size());
  selected.assign(static_cast<size_t>(batch) * kv_heads * num_blocks, 0);
  num_selected.assign(static_cast<size_t>(batch) * kv_heads, 0);
  std::bernoulli_distribution coin(keep), half(0.5);
  for (int b = 0; b < batch; ++b) {
    const int32_t n_blocks = test::blocks_of(lens[b], block_size);
    for (int h = 0; h < kv_heads; ++h) {
      std::vector<int32_t> row;
      for (int32_t j = 0; j < n_blocks; ++j) {
        if (coin(rng)) row.push_back(j);
      }
      const int32_t stale[] = {-1, n_blocks, num_blocks + 5, -1000};
      for (int32_t index : stale) {
        if (static_cast<int>(row.size()) < num_blocks && half(rng)) {
          const size_t at = std::uniform_int_distribution<size_t>(0, row.size())(rng);
          row.insert(row.begin() + static_cast<std::ptrdiff_t>(at), index);
        }
      }
      const int64_t offset = (static_cast<int64_t>(b) * kv_heads + h) * num_blocks;
      std::copy(row.begin(), row.end(), selected.begin() + offset);
      // Past the count: valid-looking indices the kernel must not use.
      for (int64_t n = offset + static_cast<int64_t>(row.size()); n < offset + num_blocks; ++n) selected[n] = 0;
      num_selected[static_cast<size_t>(b) * kv_heads + h] = static_cast<int32_t>(row.size());
    }
  }
}

struct DecodeCase {
  DType dtype;
  KVKind kind;
  int group, head_dim, block_size;
  int32_t max_len;
};

std::string describe(const DecodeCase& c) {
  return std::string(test::dtype_name(c.dtype)) + " " + test::kv_kind_name(c.kind) + " G=" + std::to_string(c.group) +
         " D=" + std::to_string(c.head_dim) + " bs=" + std::to_string(c.block_size) +
         " max_len=" + std::to_string(c.max_len);
}

std::vector<DecodeCase> decode_cases() {
  const int shapes[][4] = {  // group, head_dim, block_size, max_len
      {1, 64, 16, 97},    {4, 128, 64, 1025}, {8, 128, 32, 2049}, {7, 256, 16, 300},
      {16, 64, 128, 1025}, {20, 128, 16, 257}, {2, 256, 128, 1025}, {4, 128, 16, 4100},
      {3, 64, 32, 63}};
  std::vector<DecodeCase> cases;
  int n = 0;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (const auto& shape : shapes) {
      const KVKind kind = static_cast<KVKind>(n++ % 3);
      cases.push_back({dtype, kind, shape[0], shape[1], shape[2], shape[3]});
    }
  }
  return cases;
}

struct DecodeRun {
  TestQuery out;
  std::vector<float> lse;
};

// Runs the CUDA kernel with `num_splits` on device copies of everything; outputs are poisoned
// (0xFF: NaN in every float format) before the call.
void run_cuda(const SparseDecodeParams& host_params, const TestKV& k, const TestKV& v, const TestQuery& q,
              int num_splits, DecodeRun& result) {
  const int rows = host_params.batch * host_params.q_heads;
  DeviceBytes d_q(q.data.data(), q.data.size_bytes());
  DeviceBytes d_k(k.data.data(), k.data.size_bytes());
  DeviceBytes d_v(v.data.data(), v.data.size_bytes());
  DeviceBytes d_kt = to_device(k.block_table);
  DeviceBytes d_vt = to_device(v.block_table);
  DeviceBytes d_lens(host_params.seq_lens, host_params.batch * sizeof(int32_t));
  const size_t sel_count = static_cast<size_t>(host_params.batch) * host_params.kv_heads * host_params.num_blocks;
  DeviceBytes d_sel(host_params.selected, host_params.selected ? sel_count * sizeof(int32_t) : 0);
  DeviceBytes d_nsel(host_params.num_selected,
                     host_params.num_selected ? static_cast<size_t>(host_params.batch) * host_params.kv_heads * 4 : 0);
  DeviceBytes d_out(result.out.data.size_bytes());
  DeviceBytes d_lse(rows * sizeof(float));
  DeviceBytes d_pout(static_cast<size_t>(rows) * num_splits * host_params.head_dim * sizeof(float));
  DeviceBytes d_plse(static_cast<size_t>(rows) * num_splits * sizeof(float));
  ASSERT_NE(d_pout.ptr, nullptr);
  ASSERT_CUDA(cudaMemcpy(d_out.ptr, result.out.data.data(), d_out.size, cudaMemcpyHostToDevice));  // poisoned
  ASSERT_CUDA(cudaMemset(d_lse.ptr, 0xFF, d_lse.size));
  ASSERT_CUDA(cudaMemset(d_pout.ptr, 0xFF, d_pout.size));
  ASSERT_CUDA(cudaMemset(d_plse.ptr, 0xFF, d_plse.size));

  SparseDecodeParams p = host_params;
  p.q = d_q.ptr;
  p.k = k.layout(d_k.ptr, k.kind == KVKind::kPaged ? d_kt.as<int32_t>() : nullptr);
  p.v = v.layout(d_v.ptr, v.kind == KVKind::kPaged ? d_vt.as<int32_t>() : nullptr);
  p.seq_lens = d_lens.as<int32_t>();
  p.selected = host_params.selected ? d_sel.as<int32_t>() : nullptr;
  p.num_selected = host_params.num_selected ? d_nsel.as<int32_t>() : nullptr;
  p.out = d_out.ptr;
  p.lse = d_lse.as<float>();
  p.num_splits = num_splits;
  p.partial_out = d_pout.as<float>();
  p.partial_lse = d_plse.as<float>();
  ASSERT_CUDA(cuda::sparse_decode(p, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  d_out.download(result.out.data.data());
  result.lse.resize(rows);
  d_lse.download(result.lse.data());
}

TEST(CudaSparseDecode, WithinTwiceTheCpuErrorOverTheCoverageGrid) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int num_sms = 0;
  ASSERT_CUDA(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  const int batch = 3, kv_heads = 2;
  for (const DecodeCase& c : decode_cases()) {
    const int q_heads = kv_heads * c.group;
    const int num_blocks = test::blocks_of(c.max_len, c.block_size) + 1;
    TestKV k(c.dtype, c.kind, batch, kv_heads, c.head_dim, c.block_size, num_blocks, rng);
    TestKV v(c.dtype, c.kind, batch, kv_heads, c.head_dim, c.block_size, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, c.max_len, c.block_size, rng);
    k.poison_after(lens);  // a read past the end turns the output into NaN
    v.poison_after(lens);
    TestQuery q(c.dtype, batch, q_heads, c.head_dim);
    q.fill_normal(rng);
    std::vector<int32_t> selected, num_selected;
    random_selection(rng, lens, kv_heads, c.block_size, num_blocks, 0.4, selected, num_selected);

    for (bool dense : {false, true}) {
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

      // CPU baseline: the same computation in float32 with one rounding of the output.
      DecodeRun cpu_run{TestQuery(c.dtype, batch, q_heads, c.head_dim), std::vector<float>(batch * q_heads)};
      p.out = cpu_run.out.data.data();
      p.out_stride_batch = cpu_run.out.stride_batch;
      p.out_stride_head = cpu_run.out.stride_head;
      p.lse = cpu_run.lse.data();
      cpu::sparse_decode(p);

      // Double reference.
      std::vector<std::vector<double>> ref(batch * q_heads);
      std::vector<double> ref_lse(batch * q_heads);
      double ref_scale = 0.0;
      for (int b = 0; b < batch; ++b) {
        for (int hq = 0; hq < q_heads; ++hq) {
          const int h = hq / c.group;
          std::vector<int32_t> blocks;
          if (dense) {
            for (int32_t j = 0; j < test::blocks_of(lens[b], c.block_size); ++j) blocks.push_back(j);
          } else {
            const int64_t row = static_cast<int64_t>(b) * kv_heads + h;
            blocks.assign(selected.begin() + row * num_blocks, selected.begin() + row * num_blocks + num_selected[row]);
          }
          const int r = b * q_heads + hq;
          ref_lse[r] = test::naive_attention(q.row(b, hq), p.scale, k, v, b, h, lens[b], blocks, ref[r]);
          for (double x : ref[r]) ref_scale = std::max(ref_scale, std::fabs(x));
        }
      }
      auto max_error = [&](const TestQuery& out) {
        double worst = 0.0;
        for (int b = 0; b < batch; ++b) {
          for (int hq = 0; hq < q_heads; ++hq) {
            const std::vector<double> row = out.row(b, hq);
            for (int i = 0; i < c.head_dim; ++i) worst = std::max(worst, std::fabs(row[i] - ref[b * q_heads + hq][i]));
          }
        }
        return worst;
      };
      const double cpu_error = max_error(cpu_run.out);
      const double u = test::unit_roundoff(c.dtype);

      const int auto_splits = cuda::sparse_decode_num_splits(batch, kv_heads, num_blocks, num_sms);
      for (int splits : {1, auto_splits, 5, 37}) {  // 37: merge batches of 8 with a remainder, empty splits
        SCOPED_TRACE(describe(c) + (dense ? " dense" : " sparse") + " splits=" + std::to_string(splits));
        DecodeRun run{TestQuery(c.dtype, batch, q_heads, c.head_dim), {}};
        run_cuda(p, k, v, q, splits, run);
        if (testing::Test::HasFatalFailure()) return;
        ASSERT_TRUE(run.out.padding_untouched()) << "wrote outside the output rows";
        for (int b = 0; b < batch; ++b) {
          for (int hq = 0; hq < q_heads; ++hq) {
            const int r = b * q_heads + hq;
            SCOPED_TRACE("b=" + std::to_string(b) + " head=" + std::to_string(hq) + " len=" + std::to_string(lens[b]));
            const std::vector<double> row = run.out.row(b, hq);
            if (std::isinf(ref_lse[r])) {  // no token: exact zeros and -inf
              ASSERT_EQ(run.lse[r], -std::numeric_limits<float>::infinity());
              for (double x : row) ASSERT_EQ(x, 0.0);
              continue;
            }
            ASSERT_NEAR(run.lse[r], ref_lse[r], 1e-5 * (4.0 + std::fabs(ref_lse[r])));
            for (int i = 0; i < c.head_dim; ++i) {
              ASSERT_LE(std::fabs(row[i] - ref[r][i]), 2.0 * u * std::fabs(ref[r][i]) + 2e-5)
                  << "channel " << i << ": " << row[i] << " vs " << ref[r][i];
            }
          }
        }
        const double cuda_error = max_error(run.out);
        EXPECT_LE(cuda_error, 2.0 * cpu_error + 1e-5 * (1.0 + ref_scale))
            << "cuda error " << cuda_error << ", cpu error " << cpu_error;
      }
    }
  }
}

// The paged and contiguous layouts of the same values give bit-identical results: the kernel
// visits the same tokens in the same order, only the addresses differ.
TEST(CudaSparseDecode, PagedEqualsContiguousBitForBit) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 3, kv_heads = 2, G = 4, D = 128, bs = 32, max_len = 1025;
  const int num_blocks = test::blocks_of(max_len, bs) + 1;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(test::dtype_name(dtype));
    TestKV k(dtype, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng);
    TestKV v(dtype, KVKind::kTokenMajor, batch, kv_heads, D, bs, num_blocks, rng);
    const std::vector<int32_t> lens = test::mixed_lengths(batch, max_len, bs, rng);
    const TestKV k_paged = as_paged(k, rng);
    const TestKV v_paged = as_paged(v, rng);
    TestQuery q(dtype, batch, kv_heads * G, D);
    q.fill_normal(rng);
    std::vector<int32_t> selected, num_selected;
    random_selection(rng, lens, kv_heads, bs, num_blocks, 0.5, selected, num_selected);
    SparseDecodeParams p;
    p.q_stride_batch = q.stride_batch;
    p.q_stride_head = q.stride_head;
    p.dtype = dtype;
    p.seq_lens = lens.data();
    p.selected = selected.data();
    p.num_selected = num_selected.data();
    p.batch = batch;
    p.q_heads = kv_heads * G;
    p.kv_heads = kv_heads;
    p.head_dim = D;
    p.block_size = bs;
    p.num_blocks = num_blocks;
    p.scale = 0.1f;
    for (int splits : {1, 3}) {
      DecodeRun contiguous{TestQuery(dtype, batch, kv_heads * G, D), {}};
      DecodeRun paged{TestQuery(dtype, batch, kv_heads * G, D), {}};
      p.out_stride_batch = contiguous.out.stride_batch;
      p.out_stride_head = contiguous.out.stride_head;
      run_cuda(p, k, v, q, splits, contiguous);
      run_cuda(p, k_paged, v_paged, q, splits, paged);
      if (testing::Test::HasFatalFailure()) return;
      ASSERT_EQ(contiguous.out.data.bytes, paged.out.data.bytes) << "splits=" << splits;
      ASSERT_EQ(0, std::memcmp(contiguous.lse.data(), paged.lse.data(), contiguous.lse.size() * sizeof(float)));
    }
  }
}

// Two tokens take (almost) all the weight, with generic (not representable) probabilities: the
// output error must stay at the output's own rounding, so P's 16-bit rounding must not show (the
// kernel adds the rounding residual back with a second MMA).
TEST(CudaSparseDecode, PeakedAttentionKeepsTheOutputAtItsOwnRounding) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int batch = 1, kv_heads = 1, G = 2, D = 64, bs = 16, len = 200;
  const int num_blocks = test::blocks_of(len, bs);
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(test::dtype_name(dtype));
    TestKV k(dtype, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng, 0.0, 0.05);
    TestKV v(dtype, KVKind::kContiguous, batch, kv_heads, D, bs, num_blocks, rng);
    const std::vector<int32_t> lens = {len};
    TestQuery q(dtype, batch, kv_heads * G, D);
    for (int i = 0; i < D; ++i) {  // q along keys 77 + 78, made large: the rest gets ~e^-20
      const double direction = (k.at(0, 0, 77, i) + k.at(0, 0, 78, i)) / 0.05;
      q.data.set(q.offset(0, 0) + i, 4.0 * direction);
      q.data.set(q.offset(0, 1) + i, 0.5 * direction);
    }
    SparseDecodeParams p;
    p.q_stride_batch = q.stride_batch;
    p.q_stride_head = q.stride_head;
    p.dtype = dtype;
    p.seq_lens = lens.data();
    p.batch = batch;
    p.q_heads = G;
    p.kv_heads = kv_heads;
    p.head_dim = D;
    p.block_size = bs;
    p.num_blocks = num_blocks;
    p.scale = 2.0f;
    DecodeRun run{TestQuery(dtype, batch, G, D), {}};
    p.out_stride_batch = run.out.stride_batch;
    p.out_stride_head = run.out.stride_head;
    run_cuda(p, k, v, q, 1, run);
    if (testing::Test::HasFatalFailure()) return;
    const double u = test::unit_roundoff(dtype);
    for (int hq = 0; hq < G; ++hq) {
      std::vector<int32_t> blocks;
      for (int j = 0; j < num_blocks; ++j) blocks.push_back(j);
      std::vector<double> ref;
      test::naive_attention(q.row(0, hq), p.scale, k, v, 0, 0, len, blocks, ref);
      const std::vector<double> row = run.out.row(0, hq);
      for (int i = 0; i < D; ++i) {
        // One rounding of the output plus float32 arithmetic.
        ASSERT_LE(std::fabs(row[i] - ref[i]), u * std::fabs(ref[i]) + 1e-5) << "head " << hq << " channel " << i;
      }
    }
  }
}

TEST(CudaSparseDecode, RejectsWhatItCannotRun) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  SparseDecodeParams p;
  p.batch = 1;
  p.q_heads = 2;
  p.kv_heads = 1;
  p.head_dim = 128;
  p.block_size = 16;
  p.num_blocks = 1;
  p.dtype = DType::kFloat32;  // float32 decode is CPU only
  EXPECT_EQ(cuda::sparse_decode(p, nullptr), cudaErrorInvalidValue);
  EXPECT_GE(cuda::sparse_decode_num_splits(1, 8, 256, 132), 2);
  EXPECT_EQ(cuda::sparse_decode_num_splits(64, 8, 256, 132), 1);
  EXPECT_EQ(cuda::sparse_decode_num_splits(1, 8, 1, 132), 1);
  EXPECT_LE(cuda::sparse_decode_num_splits(1, 1, 10, 132), 5);  // >= 2 blocks per split
}

}  // namespace
}  // namespace aether
