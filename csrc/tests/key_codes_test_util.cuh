// Key-code helpers shared by the CUDA GoogleTests (cuda_key_codes_test.cu,
// cuda_channel_scores_test.cu): poisoned host buffers, KeyCodesParams for a test cache, the CPU
// build as oracle and the CUDA build over the same (uploaded) buffers, token- or channel-major.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <vector>

#include "aether/cpu/kernels.h"
#include "aether/cuda/launchers.h"
#include "cuda_test_util.cuh"
#include "test_util.h"

namespace aether {
namespace test {

// Host key codes that start poisoned (CodesBuffers::poison), so an unwritten element shows.
struct PoisonedCodes : CodesBuffers {
  PoisonedCodes(int batch_, int heads_, int num_blocks_, int block_size_, int head_dim_, int bits_, int per_)
      : CodesBuffers(batch_, heads_, num_blocks_, block_size_, head_dim_, bits_, per_) {
    poison();
  }
};

inline KeyCodesParams codes_params(const TestKV& kv, KVLayout layout, const int32_t* lens, const int32_t* first_block,
                                   const CodesBuffers& shape, uint8_t* codes, uint16_t* ranges, int channel_major) {
  KeyCodesParams p;
  p.k = layout;
  p.dtype = kv.dtype;
  p.seq_lens = lens;
  p.first_block = first_block;
  p.batch = kv.batch;
  p.kv_heads = kv.heads;
  p.head_dim = kv.head_dim;
  p.block_size = kv.block_size;
  p.num_blocks = kv.num_blocks;
  p.blocks_per_group = shape.per;
  p.bits = shape.bits;
  p.channel_major = channel_major;
  p.codes = codes;
  p.ranges = ranges;
  return p;
}

// cpu::key_codes into `out` (full build, or an append when first_block is set).
inline void cpu_codes(const TestKV& kv, const std::vector<int32_t>& lens, const std::vector<int32_t>* first_block,
                      CodesBuffers& out, int channel_major) {
  cpu::key_codes(codes_params(kv, kv.layout(), lens.data(), first_block ? first_block->data() : nullptr, out,
                              out.codes.data(), out.ranges.data(), channel_major));
}

// Device copy of a cache (data and block table), reused across the calls of one case.
struct DeviceKV {
  DeviceBytes data, table;
  explicit DeviceKV(const TestKV& kv)
      : data(kv.data.data(), kv.data.size_bytes()),
        table(kv.block_table.data(), kv.block_table.size() * sizeof(int32_t)) {}
  KVLayout layout(const TestKV& kv) const {
    return kv.layout(data.ptr, kv.kind == KVKind::kPaged ? table.as<int32_t>() : nullptr);
  }
};

// cuda::key_codes over `out`: its current bytes (the poison, or an earlier build) are uploaded
// first, so whatever the kernel does not write shows; the result is downloaded into it.
inline void cuda_codes(const TestKV& kv, const DeviceKV& keys, const std::vector<int32_t>& lens,
                       const std::vector<int32_t>* first_block, CodesBuffers& out, int channel_major,
                       int narrow = 0) {
  DeviceBytes d_lens(lens.data(), lens.size() * sizeof(int32_t));
  DeviceBytes d_first(first_block ? first_block->data() : nullptr, first_block ? first_block->size() * sizeof(int32_t) : 0);
  DeviceBytes d_codes(out.codes.data(), out.codes.size());
  DeviceBytes d_ranges(out.ranges.data(), out.ranges.size() * sizeof(uint16_t));
  ASSERT_TRUE(keys.data.ptr != nullptr && d_codes.ptr != nullptr && d_ranges.ptr != nullptr);
  KeyCodesParams p = codes_params(kv, keys.layout(kv), d_lens.as<int32_t>(),
                                  first_block ? d_first.as<int32_t>() : nullptr, out, d_codes.as<uint8_t>(),
                                  d_ranges.as<uint16_t>(), channel_major);
  p.narrow = narrow;  // the 64-thread launch (same bits)
  ASSERT_CUDA(cuda::key_codes(p, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  d_codes.download(out.codes.data());
  d_ranges.download(out.ranges.data());
}

}  // namespace test
}  // namespace aether
