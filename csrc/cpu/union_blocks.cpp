// CPU union of two block lists per (b, kv head) (UnionBlocksParams in params.h,
// aether/reference.py union_blocks): a membership mask per row, then its set blocks in order.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "aether/cpu/common.h"
#include "aether/cpu/kernels.h"

namespace aether {
namespace cpu {

void union_blocks(const UnionBlocksParams& p) {
  if (p.batch < 0 || p.kv_heads < 0 || p.indices_length < 0 || p.extra_length < 0 || p.num_blocks < 0) {
    throw std::invalid_argument("aether::cpu::union_blocks: sizes must be >= 0");
  }
  const bool lists = p.indices != nullptr && p.counts != nullptr && p.extra != nullptr && p.extra_counts != nullptr;
  if (!lists || p.out == nullptr || p.out_counts == nullptr) {
    throw std::invalid_argument("aether::cpu::union_blocks: no pointer may be null");
  }
  parallel_for(static_cast<int64_t>(p.batch) * p.kv_heads, [&](int64_t row) {
    std::vector<char> member(static_cast<size_t>(p.num_blocks), 0);
    auto mark = [&](const int32_t* list, int32_t length, int32_t count) {
      const int32_t n = std::min(std::max(count, 0), length);
      for (int32_t i = 0; i < n; ++i) {
        const int32_t j = list[row * length + i];
        if (j >= 0 && j < p.num_blocks) member[static_cast<size_t>(j)] = 1;
      }
    };
    mark(p.indices, p.indices_length, p.counts[row]);
    mark(p.extra, p.extra_length, p.extra_counts[row]);
    int32_t* out = p.out + row * p.num_blocks;
    int32_t n = 0;
    for (int32_t j = 0; j < p.num_blocks; ++j) {
      if (member[static_cast<size_t>(j)]) out[n++] = j;
    }
    std::fill(out + n, out + p.num_blocks, -1);
    p.out_counts[row] = n;
  });
}

}  // namespace cpu
}  // namespace aether
