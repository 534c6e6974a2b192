// The torch glue: operator schemas, argument checks, Params construction and dispatch to the
// CPU kernels or the CUDA launchers. This is the only translation unit (besides module.cpp) that
// sees torch; the kernels only see the Params structs of aether/params.h.
//
// The checks here guard the kernels against anything that could read or write out of bounds.
// User-facing validation with friendlier messages (and ValueError) lives in aether/api.py. Value
// problems raise RuntimeError here, type problems TypeError.
//
// Messages are assembled by `message()` below from strings only: on the GPU machine (torch 2.11)
// an error whose message streamed a number through std::ostream (TORCH_CHECK's own formatting)
// crashed the process instead of raising, while messages made of strings raised normally; the
// likely cause is a libstdc++ mismatch in the locale's number formatting. std::to_string and
// snprintf do not go through the locale facets.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "aether/cpu/kernels.h"
#include "aether/params.h"

#ifdef AETHER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "aether/cuda/launchers.h"
#endif

namespace aether_torch {
namespace {

std::string piece(const char* s) { return s; }
std::string piece(const std::string& s) { return s; }
std::string piece(char c) { return std::string(1, c); }
std::string piece(int v) { return std::to_string(v); }
std::string piece(long v) { return std::to_string(v); }
std::string piece(long long v) { return std::to_string(v); }
std::string piece(unsigned long v) { return std::to_string(v); }
std::string piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
std::string piece(at::ScalarType t) { return c10::toString(t); }
std::string piece(const c10::Device& d) { return d.str(); }
std::string piece(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (s += ... += piece(args));
  return s;
}

// TORCH_CHECK / TORCH_CHECK_TYPE evaluate the message only on failure.
#define AETHER_CHECK(cond, ...) TORCH_CHECK(cond, ::aether_torch::message(__VA_ARGS__))
#define AETHER_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::aether_torch::message(__VA_ARGS__))

using at::Tensor;
using OptTensor = std::optional<Tensor>;

aether::DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return aether::DType::kFloat32;
    case at::kHalf: return aether::DType::kFloat16;
    case at::kBFloat16: return aether::DType::kBFloat16;
    default: AETHER_CHECK_TYPE(false, "aether: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return aether::DType::kFloat32;
}

aether::Score parse_score(const std::string& s) {
  if (s == "ball") return aether::Score::kBall;
  if (s == "box") return aether::Score::kBox;
  if (s == "tight") return aether::Score::kTight;
  if (s == "mean") return aether::Score::kMean;
  if (s == "variance") return aether::Score::kVariance;
  if (s == "qsketch") return aether::Score::kSketch;
  AETHER_CHECK(false, "aether: score must be one of ball, box, tight, mean, variance, qsketch; got '", s, "'");
  return aether::Score::kTight;
}

aether::Policy parse_policy(const std::string& s) {
  if (s == "topk") return aether::Policy::kTopK;
  if (s == "threshold") return aether::Policy::kThreshold;
  if (s == "adaptive") return aether::Policy::kAdaptive;
  AETHER_CHECK(false, "aether: policy must be one of topk, threshold, adaptive; got '", s, "'");
  return aether::Policy::kTopK;
}

aether::GroupAgg parse_group_agg(const std::string& s) {
  if (s == "max") return aether::GroupAgg::kMax;
  if (s == "sum") return aether::GroupAgg::kSum;
  AETHER_CHECK(false, "aether: group_agg must be one of max, sum; got '", s, "'");
  return aether::GroupAgg::kMax;
}

int32_t to_i32(int64_t v, const char* name) {
  AETHER_CHECK(v >= 0 && v <= std::numeric_limits<int32_t>::max(), "aether: ", name, " = ", v,
                    " is out of the int32 range the kernels index with");
  return static_cast<int32_t>(v);
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* name) {
  AETHER_CHECK(t.device() == ref.device(), "aether: ", name, " is on ", t.device(), " but q is on ",
                    ref.device());
}

void check_int32_vector(const Tensor& t, int64_t len, const Tensor& ref, const char* name) {
  AETHER_CHECK_TYPE(t.scalar_type() == at::kInt, "aether: ", name, " must be int32, got ", t.scalar_type());
  AETHER_CHECK(t.dim() == 1 && t.size(0) == len, "aether: ", name, " must have shape [", len, "], got ",
                    t.sizes());
  AETHER_CHECK(t.is_contiguous(), "aether: ", name, " must be contiguous");
  check_same_device(t, ref, name);
}

// Shape of a KV cache: [B, H, S, D] contiguous-style (any strides, head_dim stride 1), or pages
// [P, page_size, H, D] addressed through block_table [B, max_pages] (int32, page_size == block_size).
struct CacheShape {
  int64_t batch, kv_heads, capacity, head_dim;
};

CacheShape cache_shape(const Tensor& kv, const OptTensor& block_table, int64_t block_size, const char* name) {
  AETHER_CHECK(kv.dim() == 4, "aether: ", name, " must be 4-D, got ", kv.dim(), "-D");
  AETHER_CHECK(kv.stride(3) == 1, "aether: ", name, " must have a contiguous last (head_dim) dimension");
  if (kv.is_cuda()) {
    // The CUDA kernels load rows with 16-byte vector loads.
    const int64_t vec = 16 / kv.element_size();
    AETHER_CHECK(reinterpret_cast<uintptr_t>(kv.data_ptr()) % 16 == 0 && kv.stride(0) % vec == 0 &&
                          kv.stride(1) % vec == 0 && kv.stride(2) % vec == 0,
                      "aether: on CUDA ", name, " must start on a 16-byte boundary with strides that are multiples of ",
                      vec, " elements, got strides ", kv.strides());
  }
  if (!block_table.has_value()) return {kv.size(0), kv.size(1), kv.size(2), kv.size(3)};
  const Tensor& bt = *block_table;
  AETHER_CHECK_TYPE(bt.scalar_type() == at::kInt, "aether: block_table must be int32, got ", bt.scalar_type());
  AETHER_CHECK(bt.dim() == 2 && bt.stride(1) == 1, "aether: block_table must be 2-D [batch, max_pages] with "
                    "contiguous rows");
  AETHER_CHECK(kv.size(1) == block_size, "aether: paged ", name, " has page_size ", kv.size(1),
                    " but block_size is ", block_size, "; they must be equal");
  check_same_device(bt, kv, "block_table");
  return {bt.size(0), kv.size(2), bt.size(1) * kv.size(1), kv.size(3)};
}

aether::KVLayout kv_layout(const Tensor& kv, const OptTensor& block_table) {
  aether::KVLayout layout;
  layout.data = kv.data_ptr();
  if (!block_table.has_value()) {
    layout.stride_seq = kv.stride(0);
    layout.stride_head = kv.stride(1);
    layout.stride_token = kv.stride(2);
  } else {
    layout.stride_seq = kv.stride(0);
    layout.stride_token = kv.stride(1);
    layout.stride_head = kv.stride(2);
    layout.block_table = block_table->data_ptr<int32_t>();
    layout.block_table_stride = block_table->stride(0);
    layout.page_size = static_cast<int32_t>(kv.size(1));
  }
  return layout;
}

void check_block_size(int64_t block_size) {
  AETHER_CHECK(block_size >= 16 && block_size <= 128 && (block_size & (block_size - 1)) == 0,
                    "aether: block_size must be a power of two in [16, 128], got ", block_size);
}

void check_head_dim(int64_t head_dim, bool cuda) {
  if (cuda) {
    AETHER_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
                      "aether: head_dim must be 64, 128 or 256 on CUDA, got ", head_dim);
  } else {
    AETHER_CHECK(head_dim > 0 && head_dim <= 256 && head_dim % 8 == 0,
                      "aether: head_dim must be a multiple of 8 in [8, 256] on CPU, got ", head_dim);
  }
}

void check_stats_tensor(const Tensor& t, const CacheShape& c, int64_t num_blocks, bool vector, const Tensor& ref,
                        const char* name) {
  AETHER_CHECK_TYPE(t.scalar_type() == at::kFloat, "aether: ", name, " must be float32, got ", t.scalar_type());
  std::vector<int64_t> expected = {c.batch, c.kv_heads, num_blocks};
  if (vector) expected.push_back(c.head_dim);
  AETHER_CHECK(t.sizes() == at::IntArrayRef(expected), "aether: ", name, " must have shape ",
                    at::IntArrayRef(expected), ", got ", t.sizes());
  AETHER_CHECK(t.is_contiguous(), "aether: ", name, " must be contiguous");
  check_same_device(t, ref, name);
}

#ifdef AETHER_WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  AETHER_CHECK(err == cudaSuccess, "aether: ", what, " failed: ", cudaGetErrorString(err));
}
#endif

// ---------------------------------------------------------------------------------- block_stats

// Runs a kernel on the CPU, or with its CUDA launcher on `ref`'s device and current stream.
#ifdef AETHER_WITH_CUDA
#define AETHER_CUDA_LAUNCHER(name) (&aether::cuda::name)
#else
#define AETHER_CUDA_LAUNCHER(name) nullptr  // never called: no tensor is on CUDA in this build
#endif
template <typename Params, typename CpuFn, typename CudaFn>
void run_kernel(const Params& p, const Tensor& ref, CpuFn cpu, CudaFn cuda, const char* what) {
  if (ref.is_cuda()) {
#ifdef AETHER_WITH_CUDA
    c10::cuda::CUDAGuard guard(ref.device());
    check_cuda(cuda(p, c10::cuda::getCurrentCUDAStream().stream()), what);
    return;
#else
    (void)cuda;
    AETHER_CHECK(false, "aether: this build has no CUDA kernels");
#endif
  }
  cpu(p);
}

aether::BlockStatsParams stats_params(const Tensor& k, const Tensor& seq_lens, int64_t block_size,
                                      const OptTensor& block_table, const Tensor& centroid, const Tensor& lo,
                                      const Tensor& hi, const Tensor& radius, const Tensor& spread) {
  check_block_size(block_size);
  CacheShape c = cache_shape(k, block_table, block_size, "k");
  check_head_dim(c.head_dim, k.is_cuda());
  check_int32_vector(seq_lens, c.batch, k, "seq_lens");
  const int64_t num_blocks = centroid.size(2);
  AETHER_CHECK(num_blocks * block_size >= c.capacity, "aether: the statistics hold ", num_blocks,
                    " blocks of ", block_size, " tokens but the cache has ", c.capacity, " slots");
  check_stats_tensor(centroid, c, num_blocks, true, k, "centroid");
  check_stats_tensor(lo, c, num_blocks, true, k, "lo");
  check_stats_tensor(hi, c, num_blocks, true, k, "hi");
  check_stats_tensor(radius, c, num_blocks, false, k, "radius");
  check_stats_tensor(spread, c, num_blocks, false, k, "spread");

  aether::BlockStatsParams p;
  p.k = kv_layout(k, block_table);
  p.dtype = to_dtype(k, "k");
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = to_i32(c.batch, "batch");
  p.kv_heads = to_i32(c.kv_heads, "kv_heads");
  p.head_dim = to_i32(c.head_dim, "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.stats = {centroid.data_ptr<float>(), lo.data_ptr<float>(), hi.data_ptr<float>(), radius.data_ptr<float>(),
             spread.data_ptr<float>()};
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_stats(const Tensor& k, const Tensor& seq_lens,
                                                                int64_t block_size, int64_t num_blocks,
                                                                const OptTensor& block_table) {
  check_block_size(block_size);
  CacheShape c = cache_shape(k, block_table, block_size, "k");
  AETHER_CHECK(num_blocks >= 0, "aether: num_blocks must be >= 0, got ", num_blocks);
  auto opts = k.options().dtype(at::kFloat);
  Tensor centroid = at::empty({c.batch, c.kv_heads, num_blocks, c.head_dim}, opts);
  Tensor lo = at::empty_like(centroid);
  Tensor hi = at::empty_like(centroid);
  Tensor radius = at::empty({c.batch, c.kv_heads, num_blocks}, opts);
  Tensor spread = at::empty_like(radius);
  if (centroid.numel() == 0) return {centroid, lo, hi, radius, spread};
  aether::BlockStatsParams p =
      stats_params(k, seq_lens, block_size, block_table, centroid, lo, hi, radius, spread);
  run_kernel(p, k, aether::cpu::block_stats, AETHER_CUDA_LAUNCHER(block_stats), "block_stats");
  return {centroid, lo, hi, radius, spread};
}

void block_stats_update(const Tensor& k, const Tensor& seq_lens, const Tensor& first_block, int64_t block_size,
                        const OptTensor& block_table, Tensor& centroid, Tensor& lo, Tensor& hi, Tensor& radius,
                        Tensor& spread) {
  if (centroid.numel() == 0) return;
  aether::BlockStatsParams p =
      stats_params(k, seq_lens, block_size, block_table, centroid, lo, hi, radius, spread);
  check_int32_vector(first_block, p.batch, k, "first_block");
  p.first_block = first_block.data_ptr<int32_t>();
  run_kernel(p, k, aether::cpu::block_stats, AETHER_CUDA_LAUNCHER(block_stats), "block_stats");
}

// ----------------------------------------------------------------------------------- key_sketch

void check_sketch_rank(int64_t rank) {
  // Powers of two: the CUDA score kernel is instantiated per rank and unpacks whole 16-byte vectors.
  AETHER_CHECK(rank == 2 || rank == 4 || rank == 8 || rank == 16,
               "aether: the sketch rank (key_proj.size(2)) must be 2, 4, 8 or 16, got ", rank);
}

void check_key_proj(const Tensor& key_proj, int64_t kv_heads, int64_t head_dim, const Tensor& ref) {
  AETHER_CHECK_TYPE(key_proj.scalar_type() == at::kFloat, "aether: key_proj must be float32, got ",
                    key_proj.scalar_type());
  AETHER_CHECK(key_proj.dim() == 3 && key_proj.size(0) == kv_heads && key_proj.size(1) == head_dim &&
                   key_proj.is_contiguous(),
               "aether: key_proj must be contiguous [kv_heads=", kv_heads, ", head_dim=", head_dim, ", rank], got ",
               key_proj.sizes());
  check_sketch_rank(key_proj.size(2));
  check_same_device(key_proj, ref, "key_proj");
}

// Blocks sharing one set of ranges (`name`: blocks_per_sketch, whose `unit` is a sketch block, or
// blocks_per_group, a key-code group): a power of two up to 8, at most 128 tokens together.
void check_grouping(int64_t per, int64_t block_size, const char* name, const char* unit) {
  AETHER_CHECK(per >= 1 && per <= aether::kMaxBlocksPerSketch && (per & (per - 1)) == 0,
               "aether: ", name, " must be 1, 2, 4 or 8, got ", per);
  AETHER_CHECK(per * block_size <= 128, "aether: ", unit, " (", name, " * block_size = ", per, " * ", block_size,
               ") must hold at most 128 tokens");
}

// P = blocks_per_sketch: blocks sharing one set of ranges and one centroid.
void check_blocks_per_sketch(int64_t per, int64_t block_size) {
  check_grouping(per, block_size, "blocks_per_sketch", "a sketch block");
}

// ... and existing sketch codes of num_blocks blocks: whole sketch blocks.
void check_blocks_per_sketch(int64_t per, int64_t block_size, int64_t num_blocks) {
  check_blocks_per_sketch(per, block_size);
  AETHER_CHECK(num_blocks % per == 0, "aether: the sketch codes hold ", num_blocks,
               " blocks, not a multiple of blocks_per_sketch (", per, ")");
}

// codes uint8 [B, Hkv, NB, bs, R/2], ranges bfloat16 [B, Hkv, NB/P, 2, R], centroid bfloat16
// [B, Hkv, NB/P, D].
void check_sketch_tensors(const Tensor& codes, const Tensor& ranges, const Tensor& centroid, int64_t batch,
                          int64_t kv_heads, int64_t num_blocks, int64_t block_size, int64_t per, int64_t rank,
                          int64_t head_dim, const Tensor& ref) {
  const std::vector<int64_t> code_shape = {batch, kv_heads, num_blocks, block_size, rank / 2};
  const std::vector<int64_t> range_shape = {batch, kv_heads, num_blocks / per, 2, rank};
  const std::vector<int64_t> centroid_shape = {batch, kv_heads, num_blocks / per, head_dim};
  AETHER_CHECK_TYPE(codes.scalar_type() == at::kByte, "aether: sketch codes must be uint8, got ", codes.scalar_type());
  AETHER_CHECK_TYPE(ranges.scalar_type() == at::kBFloat16, "aether: sketch ranges must be bfloat16, got ",
                    ranges.scalar_type());
  AETHER_CHECK_TYPE(centroid.scalar_type() == at::kBFloat16, "aether: sketch centroid must be bfloat16, got ",
                    centroid.scalar_type());
  AETHER_CHECK(codes.sizes() == at::IntArrayRef(code_shape) && codes.is_contiguous(),
               "aether: sketch codes must be contiguous ", at::IntArrayRef(code_shape), ", got ", codes.sizes());
  AETHER_CHECK(ranges.sizes() == at::IntArrayRef(range_shape) && ranges.is_contiguous(),
               "aether: sketch ranges must be contiguous ", at::IntArrayRef(range_shape), ", got ", ranges.sizes());
  AETHER_CHECK(centroid.sizes() == at::IntArrayRef(centroid_shape) && centroid.is_contiguous(),
               "aether: sketch centroid must be contiguous ", at::IntArrayRef(centroid_shape), ", got ",
               centroid.sizes());
  check_same_device(codes, ref, "sketch codes");
  check_same_device(ranges, ref, "sketch ranges");
  check_same_device(centroid, ref, "sketch centroid");
}

aether::KeySketchParams sketch_params(const Tensor& k, const Tensor& seq_lens, const Tensor& key_proj,
                                      int64_t block_size, const OptTensor& block_table, const Tensor& codes,
                                      const Tensor& ranges, const Tensor& centroid, int64_t per) {
  check_block_size(block_size);
  CacheShape c = cache_shape(k, block_table, block_size, "k");
  check_head_dim(c.head_dim, k.is_cuda());
  to_dtype(k, "k");
  check_int32_vector(seq_lens, c.batch, k, "seq_lens");
  check_key_proj(key_proj, c.kv_heads, c.head_dim, k);
  const int64_t rank = key_proj.size(2);
  AETHER_CHECK(codes.dim() == 5, "aether: sketch codes must be 5-D [batch, kv_heads, num_blocks, block_size, rank/2]");
  const int64_t num_blocks = codes.size(2);
  AETHER_CHECK(num_blocks * block_size >= c.capacity, "aether: the sketch holds ", num_blocks, " blocks of ",
               block_size, " tokens but the cache has ", c.capacity, " slots");
  check_blocks_per_sketch(per, block_size, num_blocks);
  check_sketch_tensors(codes, ranges, centroid, c.batch, c.kv_heads, num_blocks, block_size, per, rank, c.head_dim, k);

  aether::KeySketchParams p;
  p.k = kv_layout(k, block_table);
  p.dtype = to_dtype(k, "k");
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.key_proj = key_proj.data_ptr<float>();
  p.batch = to_i32(c.batch, "batch");
  p.kv_heads = to_i32(c.kv_heads, "kv_heads");
  p.head_dim = to_i32(c.head_dim, "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.blocks_per_sketch = to_i32(per, "blocks_per_sketch");
  p.rank = to_i32(rank, "rank");
  p.sketch.codes = codes.data_ptr<uint8_t>();
  p.sketch.ranges = reinterpret_cast<uint16_t*>(ranges.data_ptr<at::BFloat16>());
  p.sketch.centroid = reinterpret_cast<uint16_t*>(centroid.data_ptr<at::BFloat16>());
  return p;
}

std::tuple<Tensor, Tensor, Tensor> key_sketch(const Tensor& k, const Tensor& seq_lens, const Tensor& key_proj,
                                              int64_t block_size, int64_t num_blocks, const OptTensor& block_table,
                                              int64_t blocks_per_sketch) {
  check_block_size(block_size);
  check_blocks_per_sketch(blocks_per_sketch, block_size);
  CacheShape c = cache_shape(k, block_table, block_size, "k");
  AETHER_CHECK(num_blocks >= 0 && num_blocks % blocks_per_sketch == 0,
               "aether: num_blocks must be >= 0 and a multiple of blocks_per_sketch (", blocks_per_sketch, "), got ",
               num_blocks);
  check_key_proj(key_proj, c.kv_heads, c.head_dim, k);
  const int64_t rank = key_proj.size(2);
  const int64_t sketch_blocks = num_blocks / blocks_per_sketch;
  Tensor codes = at::empty({c.batch, c.kv_heads, num_blocks, block_size, rank / 2}, k.options().dtype(at::kByte));
  Tensor ranges = at::empty({c.batch, c.kv_heads, sketch_blocks, 2, rank}, k.options().dtype(at::kBFloat16));
  Tensor centroid = at::empty({c.batch, c.kv_heads, sketch_blocks, c.head_dim}, k.options().dtype(at::kBFloat16));
  if (codes.numel() == 0) return {codes, ranges, centroid};
  run_kernel(sketch_params(k, seq_lens, key_proj, block_size, block_table, codes, ranges, centroid, blocks_per_sketch),
             k, aether::cpu::key_sketch, AETHER_CUDA_LAUNCHER(key_sketch), "key_sketch");
  return {codes, ranges, centroid};
}

void key_sketch_update(const Tensor& k, const Tensor& seq_lens, const Tensor& first_block, const Tensor& key_proj,
                       int64_t block_size, const OptTensor& block_table, Tensor& codes, Tensor& ranges,
                       Tensor& centroid, int64_t blocks_per_sketch) {
  if (codes.numel() == 0) return;
  aether::KeySketchParams p =
      sketch_params(k, seq_lens, key_proj, block_size, block_table, codes, ranges, centroid, blocks_per_sketch);
  check_int32_vector(first_block, p.batch, k, "first_block");
  p.first_block = first_block.data_ptr<int32_t>();
  run_kernel(p, k, aether::cpu::key_sketch, AETHER_CUDA_LAUNCHER(key_sketch), "key_sketch");
}

void check_query(const Tensor& q, int64_t batch, int64_t kv_heads, int64_t head_dim) {
  AETHER_CHECK(q.dim() == 3, "aether: q must be 3-D [batch, q_heads, head_dim], got ", q.dim(), "-D");
  AETHER_CHECK(q.stride(2) == 1, "aether: q must have a contiguous last (head_dim) dimension");
  AETHER_CHECK(q.size(0) == batch, "aether: q has batch ", q.size(0), " but the cache has ", batch);
  AETHER_CHECK(q.size(2) == head_dim, "aether: q has head_dim ", q.size(2), " but the cache has ", head_dim);
  AETHER_CHECK(kv_heads > 0 && q.size(1) % kv_heads == 0, "aether: q_heads (", q.size(1),
                    ") must be a multiple of kv_heads (", kv_heads, ")");
}

// ------------------------------------------------------------------- key_codes, refine_scores

void check_code_bits(int64_t bits) {
  AETHER_CHECK(bits == 2 || bits == 4, "aether: key code bits must be 2 or 4, got ", bits);
}

void check_blocks_per_group(int64_t per, int64_t block_size) {
  check_grouping(per, block_size, "blocks_per_group", "a key-code group");
}

// codes uint8 [B, Hkv, NB, bs, D * bits / 8] (token-major) or [B, Hkv, NB / Pg, D, Pg * bs * bits / 8]
// (channel-major), ranges bfloat16 [B, Hkv, NB / Pg, 2, D].
// A channel pool stores `stored` (1..head_dim) runs per group; 0: one run per channel.
std::vector<int64_t> code_shape_of(int64_t batch, int64_t kv_heads, int64_t num_blocks, int64_t block_size,
                                   int64_t per, int64_t bits, int64_t head_dim, bool channel_major, int64_t stored = 0) {
  const int64_t runs = stored > 0 ? stored : head_dim;
  if (channel_major) return {batch, kv_heads, num_blocks / per, runs, per * block_size * bits / 8};
  return {batch, kv_heads, num_blocks, block_size, head_dim * bits / 8};
}

// The blocks a codes tensor holds (its dim 2 counts groups in the channel-major layout).
int64_t code_num_blocks(const Tensor& codes, int64_t per, bool channel_major) {
  AETHER_CHECK(codes.dim() == 5, "aether: key codes must be 5-D ",
               channel_major ? "[batch, kv_heads, num_blocks / blocks_per_group, head_dim, group_tokens * bits / 8]"
                             : "[batch, kv_heads, num_blocks, block_size, head_dim * bits / 8]",
               ", got ", codes.dim(), "-D");
  return channel_major ? codes.size(2) * per : codes.size(2);
}

void check_code_tensors(const Tensor& codes, const Tensor& ranges, int64_t batch, int64_t kv_heads, int64_t num_blocks,
                        int64_t block_size, int64_t per, int64_t bits, int64_t head_dim, const Tensor& ref,
                        bool channel_major = false, int64_t stored = 0) {
  const std::vector<int64_t> code_shape =
      code_shape_of(batch, kv_heads, num_blocks, block_size, per, bits, head_dim, channel_major, stored);
  const std::vector<int64_t> range_shape = {batch, kv_heads, num_blocks / per, 2, head_dim};
  AETHER_CHECK_TYPE(codes.scalar_type() == at::kByte, "aether: key codes must be uint8, got ", codes.scalar_type());
  AETHER_CHECK_TYPE(ranges.scalar_type() == at::kBFloat16, "aether: key code ranges must be bfloat16, got ",
                    ranges.scalar_type());
  AETHER_CHECK(codes.sizes() == at::IntArrayRef(code_shape) && codes.is_contiguous(),
               "aether: key codes must be contiguous ", at::IntArrayRef(code_shape), ", got ", codes.sizes());
  AETHER_CHECK(ranges.sizes() == at::IntArrayRef(range_shape) && ranges.is_contiguous(),
               "aether: key code ranges must be contiguous ", at::IntArrayRef(range_shape), ", got ", ranges.sizes());
  check_same_device(codes, ref, "key codes");
  check_same_device(ranges, ref, "key code ranges");
  // The CUDA kernels write channel-major runs a word at a time and read them 16 bytes at a time.
  AETHER_CHECK(!channel_major || reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0,
               "aether: channel-major key codes must start 16-byte aligned (a fresh tensor, not an offset view)");
}

// A channel pool's slot map: int32 [B, Hkv, D] contiguous, channel d's run at slot channel_slots[b,
// h, d] of the `stored` runs of a group (a slot outside [0, stored) means "not stored"), and
// 1 <= stored <= D. Returns its data pointer (nullptr without a pool).
const int32_t* check_channel_slots(const OptTensor& channel_slots, int64_t stored, int64_t batch, int64_t kv_heads,
                                   int64_t head_dim, const Tensor& ref) {
  if (!channel_slots.has_value()) return nullptr;
  const Tensor& slots = *channel_slots;
  AETHER_CHECK_TYPE(slots.scalar_type() == at::kInt, "aether: channel_slots must be int32, got ", slots.scalar_type());
  const std::vector<int64_t> shape = {batch, kv_heads, head_dim};
  AETHER_CHECK(slots.sizes() == at::IntArrayRef(shape) && slots.is_contiguous(),
               "aether: channel_slots must be contiguous [batch, kv_heads, head_dim] = ", at::IntArrayRef(shape),
               ", got ", slots.sizes());
  check_same_device(slots, ref, "channel_slots");
  AETHER_CHECK(stored >= 1 && stored <= head_dim, "aether: a channel pool stores 1 to head_dim = ", head_dim,
               " channels, got ", stored);
  return slots.data_ptr<int32_t>();
}

aether::KeyCodesParams codes_params(const Tensor& k, const Tensor& seq_lens, int64_t block_size,
                                    const OptTensor& block_table, const Tensor& codes, const Tensor& ranges,
                                    int64_t per, int64_t bits, bool channel_major,
                                    const OptTensor& channel_slots = std::nullopt) {
  AETHER_CHECK(!channel_slots.has_value() || channel_major,
               "aether: a channel pool (channel_slots) needs the channel-major layout (channel_major=True)");
  check_block_size(block_size);
  check_code_bits(bits);
  check_blocks_per_group(per, block_size);
  CacheShape c = cache_shape(k, block_table, block_size, "k");
  check_head_dim(c.head_dim, k.is_cuda());
  check_int32_vector(seq_lens, c.batch, k, "seq_lens");
  const int64_t num_blocks = code_num_blocks(codes, per, channel_major);
  AETHER_CHECK(num_blocks * block_size >= c.capacity, "aether: the key codes hold ", num_blocks, " blocks of ",
               block_size, " tokens but the cache has ", c.capacity, " slots");
  AETHER_CHECK(num_blocks % per == 0, "aether: the key codes hold ", num_blocks,
               " blocks, not a multiple of blocks_per_group (", per, ")");
  const int64_t stored = channel_slots.has_value() ? codes.size(3) : 0;
  const int32_t* slots = check_channel_slots(channel_slots, stored, c.batch, c.kv_heads, c.head_dim, k);
  check_code_tensors(codes, ranges, c.batch, c.kv_heads, num_blocks, block_size, per, bits, c.head_dim, k,
                     channel_major, stored);

  aether::KeyCodesParams p;
  p.k = kv_layout(k, block_table);
  p.dtype = to_dtype(k, "k");
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = to_i32(c.batch, "batch");
  p.kv_heads = to_i32(c.kv_heads, "kv_heads");
  p.head_dim = to_i32(c.head_dim, "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.blocks_per_group = to_i32(per, "blocks_per_group");
  p.bits = to_i32(bits, "bits");
  p.channel_major = channel_major ? 1 : 0;
  p.channel_slots = slots;
  p.stored_channels = to_i32(stored, "stored_channels");
  p.codes = codes.data_ptr<uint8_t>();
  p.ranges = reinterpret_cast<uint16_t*>(ranges.data_ptr<at::BFloat16>());
  return p;
}

std::tuple<Tensor, Tensor> key_codes(const Tensor& k, const Tensor& seq_lens, int64_t block_size, int64_t num_blocks,
                                     const OptTensor& block_table, int64_t blocks_per_group, int64_t bits,
                                     bool channel_major, const OptTensor& channel_slots, int64_t stored_channels) {
  check_block_size(block_size);
  check_code_bits(bits);
  check_blocks_per_group(blocks_per_group, block_size);
  CacheShape c = cache_shape(k, block_table, block_size, "k");
  check_head_dim(c.head_dim, k.is_cuda());
  AETHER_CHECK(num_blocks >= 0 && num_blocks % blocks_per_group == 0,
               "aether: num_blocks must be >= 0 and a multiple of blocks_per_group (", blocks_per_group, "), got ",
               num_blocks);
  // Checked before the allocation, which reads it (codes_params checks the rest, the layout included).
  AETHER_CHECK(!channel_slots.has_value() || (stored_channels >= 1 && stored_channels <= c.head_dim),
               "aether: stored_channels must be in [1, head_dim = ", c.head_dim, "] with channel_slots, got ",
               stored_channels);
  const std::vector<int64_t> code_shape = code_shape_of(c.batch, c.kv_heads, num_blocks, block_size, blocks_per_group,
                                                        bits, c.head_dim, channel_major,
                                                        channel_slots.has_value() ? stored_channels : 0);
  // With a pool the kernels write only the slots a channel names: zeros elsewhere, not garbage.
  Tensor codes = channel_slots.has_value() ? at::zeros(code_shape, k.options().dtype(at::kByte))
                                           : at::empty(code_shape, k.options().dtype(at::kByte));
  Tensor ranges = at::empty({c.batch, c.kv_heads, num_blocks / blocks_per_group, 2, c.head_dim},
                            k.options().dtype(at::kBFloat16));
  if (codes.numel() == 0) return {codes, ranges};
  run_kernel(codes_params(k, seq_lens, block_size, block_table, codes, ranges, blocks_per_group, bits, channel_major,
                          channel_slots),
             k, aether::cpu::key_codes, AETHER_CUDA_LAUNCHER(key_codes), "key_codes");
  return {codes, ranges};
}

const double* check_spreads(const Tensor& spreads, const Tensor& ranges, const Tensor& ref);

void key_codes_update(const Tensor& k, const Tensor& seq_lens, const Tensor& first_block, int64_t block_size,
                      const OptTensor& block_table, Tensor& codes, Tensor& ranges, int64_t blocks_per_group,
                      int64_t bits, bool channel_major, const OptTensor& channel_slots, const OptTensor& spreads,
                      bool narrow) {
  if (codes.numel() == 0) return;
  aether::KeyCodesParams p = codes_params(k, seq_lens, block_size, block_table, codes, ranges, blocks_per_group, bits,
                                          channel_major, channel_slots);
  check_int32_vector(first_block, p.batch, k, "first_block");
  p.first_block = first_block.data_ptr<int32_t>();
  // The running spreads of the rebuilt groups, kept by the same launch (code_spreads_update's result).
  if (spreads.has_value()) p.spreads = const_cast<double*>(check_spreads(*spreads, ranges, k));
  p.narrow = narrow ? 1 : 0;  // CUDA launch shape only (params.h); the CPU kernel ignores it
  run_kernel(p, k, aether::cpu::key_codes, AETHER_CUDA_LAUNCHER(key_codes), "key_codes");
}

// The fields the key-code readers (refine_scores, code_channels, channel_scores) share: the
// query, the ranges, the lengths and the sizes.
template <typename Params>
void set_code_reader(Params& p, const Tensor& q, const Tensor& ranges, const Tensor& seq_lens, int64_t batch,
                     int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks, int64_t per) {
  p.q = q.data_ptr();
  p.q_stride_batch = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.dtype = to_dtype(q, "q");
  p.ranges = reinterpret_cast<const uint16_t*>(ranges.data_ptr<at::BFloat16>());
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = to_i32(batch, "batch");
  p.q_heads = to_i32(q.size(1), "q_heads");
  p.kv_heads = to_i32(kv_heads, "kv_heads");
  p.head_dim = to_i32(head_dim, "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.blocks_per_group = to_i32(per, "blocks_per_group");
}

// head_scores float32 [B, Hq, L] (L = candidates.size(2), the first selection's row length), filled
// with -inf, then the candidates' log-masses.
Tensor refine_scores(const Tensor& q, const Tensor& codes, const Tensor& ranges, const Tensor& seq_lens,
                     const Tensor& candidates, const Tensor& num_candidates, int64_t block_size, double scale,
                     int64_t blocks_per_group, int64_t bits) {
  check_block_size(block_size);
  check_code_bits(bits);
  check_blocks_per_group(blocks_per_group, block_size);
  AETHER_CHECK(q.dim() == 3, "aether: q must be 3-D [batch, q_heads, head_dim], got ", q.dim(), "-D");
  AETHER_CHECK(codes.dim() == 5, "aether: key codes must be 5-D [batch, kv_heads, num_blocks, block_size, "
               "head_dim * bits / 8]");
  const int64_t batch = codes.size(0), kv_heads = codes.size(1), num_blocks = codes.size(2);
  const int64_t head_dim = q.size(2);
  check_query(q, batch, kv_heads, head_dim);
  check_head_dim(head_dim, q.is_cuda());
  AETHER_CHECK(num_blocks % blocks_per_group == 0, "aether: the key codes hold ", num_blocks,
               " blocks, not a multiple of blocks_per_group (", blocks_per_group, ")");
  check_code_tensors(codes, ranges, batch, kv_heads, num_blocks, block_size, blocks_per_group, bits, head_dim, q);
  check_int32_vector(seq_lens, batch, q, "seq_lens");
  AETHER_CHECK_TYPE(candidates.scalar_type() == at::kInt, "aether: candidates must be int32, got ",
                    candidates.scalar_type());
  AETHER_CHECK_TYPE(num_candidates.scalar_type() == at::kInt, "aether: num_candidates must be int32, got ",
                    num_candidates.scalar_type());
  AETHER_CHECK(candidates.dim() == 3, "aether: candidates must be 3-D [batch, kv_heads, list_length]");
  const int64_t list_length = candidates.size(2);
  const std::vector<int64_t> list_shape = {batch, kv_heads, list_length};
  const std::vector<int64_t> count_shape = {batch, kv_heads};
  AETHER_CHECK(candidates.sizes() == at::IntArrayRef(list_shape) && candidates.is_contiguous(),
               "aether: candidates must be contiguous ", at::IntArrayRef(list_shape), ", got ", candidates.sizes());
  AETHER_CHECK(num_candidates.sizes() == at::IntArrayRef(count_shape) && num_candidates.is_contiguous(),
               "aether: num_candidates must be contiguous ", at::IntArrayRef(count_shape), ", got ",
               num_candidates.sizes());
  check_same_device(candidates, q, "candidates");
  check_same_device(num_candidates, q, "num_candidates");
  AETHER_CHECK(scale > 0 && std::isfinite(scale), "aether: scale must be finite and > 0, got ", scale);
  Tensor head_scores = at::full({batch, q.size(1), list_length}, -std::numeric_limits<float>::infinity(),
                                q.options().dtype(at::kFloat));
  if (head_scores.numel() == 0) return head_scores;

  aether::RefineScoresParams p;
  set_code_reader(p, q, ranges, seq_lens, batch, kv_heads, head_dim, block_size, num_blocks, blocks_per_group);
  p.codes = codes.data_ptr<uint8_t>();
  p.candidates = candidates.data_ptr<int32_t>();
  p.num_candidates = num_candidates.data_ptr<int32_t>();
  p.list_length = to_i32(list_length, "list_length");
  p.bits = to_i32(bits, "bits");
  p.scale = static_cast<float>(scale);
  p.head_scores = head_scores.data_ptr<float>();
  run_kernel(p, q, aether::cpu::refine_scores, AETHER_CUDA_LAUNCHER(refine_scores), "refine_scores");
  return head_scores;
}

// ------------------------------------------------------------------ code_channels, channel_scores

// Key-code ranges as the qcodes ops read them: bfloat16, contiguous [B, Hkv, NB / Pg, 2, D].
void check_code_ranges(const Tensor& ranges) {
  AETHER_CHECK_TYPE(ranges.scalar_type() == at::kBFloat16, "aether: key code ranges must be bfloat16, got ",
                    ranges.scalar_type());
  AETHER_CHECK(ranges.dim() == 5 && ranges.size(3) == 2 && ranges.is_contiguous(),
               "aether: key code ranges must be contiguous 5-D [batch, kv_heads, groups, 2, head_dim], got ",
               ranges.sizes());
}

// The query and ranges of a qcodes op: q [B, Hq, D] with Hq a multiple of the ranges' Hkv, ranges
// as check_code_ranges, seq_lens int32 [B].
void check_qcodes_inputs(const Tensor& q, const Tensor& ranges, const Tensor& seq_lens, int64_t block_size,
                         int64_t per) {
  check_block_size(block_size);
  check_blocks_per_group(per, block_size);
  AETHER_CHECK(q.dim() == 3, "aether: q must be 3-D [batch, q_heads, head_dim], got ", q.dim(), "-D");
  check_code_ranges(ranges);
  const int64_t batch = ranges.size(0), kv_heads = ranges.size(1), head_dim = ranges.size(4);
  AETHER_CHECK(q.size(2) == head_dim, "aether: q has head_dim ", q.size(2), " but the key code ranges have ", head_dim);
  check_query(q, batch, kv_heads, head_dim);
  check_head_dim(head_dim, q.is_cuda());
  check_same_device(ranges, q, "key code ranges");
  check_int32_vector(seq_lens, batch, q, "seq_lens");
}

// The running spreads of the qcodes channel choice (CodeSpreadsParams): float64 [B, Hkv, NG, D]
// contiguous, NG and D those of the ranges [B, Hkv, NG, 2, D]. Returns the data pointer.
const double* check_spreads(const Tensor& spreads, const Tensor& ranges, const Tensor& ref) {
  const std::vector<int64_t> shape = {ranges.size(0), ranges.size(1), ranges.size(2), ranges.size(4)};
  AETHER_CHECK_TYPE(spreads.scalar_type() == at::kDouble, "aether: spreads must be float64, got ",
                    spreads.scalar_type());
  AETHER_CHECK(spreads.sizes() == at::IntArrayRef(shape) && spreads.is_contiguous(),
               "aether: spreads must be contiguous [batch, kv_heads, groups, head_dim] = ", at::IntArrayRef(shape),
               " (those of the key code ranges), got ", spreads.sizes());
  check_same_device(spreads, ref, "spreads");
  return spreads.data_ptr<double>();
}

aether::CodeSpreadsParams spreads_params(const Tensor& ranges, const Tensor& seq_lens, int64_t block_size,
                                         int64_t per, Tensor& spreads) {
  check_block_size(block_size);
  check_blocks_per_group(per, block_size);
  check_code_ranges(ranges);
  check_int32_vector(seq_lens, ranges.size(0), ranges, "seq_lens");
  aether::CodeSpreadsParams p;
  p.ranges = reinterpret_cast<const uint16_t*>(ranges.data_ptr<at::BFloat16>());
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = to_i32(ranges.size(0), "batch");
  p.kv_heads = to_i32(ranges.size(1), "kv_heads");
  p.head_dim = to_i32(ranges.size(4), "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(ranges.size(2) * per, "num_blocks");
  p.blocks_per_group = to_i32(per, "blocks_per_group");
  p.spreads = const_cast<double*>(check_spreads(spreads, ranges, ranges));
  return p;
}

// spreads float64 [B, Hkv, NG, D]: the running spreads of every valid group (zero past the end).
Tensor code_spreads(const Tensor& ranges, const Tensor& seq_lens, int64_t block_size, int64_t blocks_per_group) {
  check_code_ranges(ranges);  // before the allocation reads its sizes (spreads_params checks the rest)
  Tensor spreads = at::zeros({ranges.size(0), ranges.size(1), ranges.size(2), ranges.size(4)},
                             ranges.options().dtype(at::kDouble));
  aether::CodeSpreadsParams p = spreads_params(ranges, seq_lens, block_size, blocks_per_group, spreads);
  if (spreads.numel() == 0) return spreads;
  run_kernel(p, ranges, aether::cpu::code_spreads, AETHER_CUDA_LAUNCHER(code_spreads), "code_spreads");
  return spreads;
}

// In place after key_codes_update with the same first_block: the groups from first_block / Pg on.
void code_spreads_update(const Tensor& ranges, const Tensor& seq_lens, const Tensor& first_block, int64_t block_size,
                         int64_t blocks_per_group, Tensor& spreads) {
  aether::CodeSpreadsParams p = spreads_params(ranges, seq_lens, block_size, blocks_per_group, spreads);
  check_int32_vector(first_block, p.batch, ranges, "first_block");
  p.first_block = first_block.data_ptr<int32_t>();
  if (spreads.numel() == 0) return;
  run_kernel(p, ranges, aether::cpu::code_spreads, AETHER_CUDA_LAUNCHER(code_spreads), "code_spreads");
}

// channels int32 [B, Hkv, num_channels]: the channels the qcodes score reads, ascending.
Tensor code_channels(const Tensor& q, const Tensor& ranges, const Tensor& seq_lens, int64_t block_size,
                     int64_t blocks_per_group, int64_t num_channels, const OptTensor& channel_slots,
                     int64_t stored_channels, const OptTensor& spreads) {
  check_qcodes_inputs(q, ranges, seq_lens, block_size, blocks_per_group);
  const int64_t batch = ranges.size(0), kv_heads = ranges.size(1), head_dim = ranges.size(4);
  AETHER_CHECK(num_channels >= 1 && num_channels <= head_dim, "aether: num_channels must be in [1, head_dim = ",
               head_dim, "], got ", num_channels);
  const int32_t* slots = check_channel_slots(channel_slots, stored_channels, batch, kv_heads, head_dim, q);
  const double* spread_data = spreads.has_value() ? check_spreads(*spreads, ranges, q) : nullptr;
  Tensor channels = at::empty({batch, kv_heads, num_channels}, q.options().dtype(at::kInt));
  if (channels.numel() == 0) return channels;
  aether::CodeChannelsParams p;
  set_code_reader(p, q, ranges, seq_lens, batch, kv_heads, head_dim, block_size, ranges.size(2) * blocks_per_group,
                  blocks_per_group);
  p.num_channels = to_i32(num_channels, "num_channels");
  p.channel_slots = slots;
  p.stored_channels = slots == nullptr ? 0 : to_i32(stored_channels, "stored_channels");
  p.spreads = spread_data;
  p.channels = channels.data_ptr<int32_t>();
  run_kernel(p, q, aether::cpu::code_channels, AETHER_CUDA_LAUNCHER(code_channels), "code_channels");
  return channels;
}

// head_scores float32 [B, Hq, NB]: every block's qcodes score (-inf past each sequence's end), from
// the given channels, or (channels None) from the num_channels the kernel chooses with spreads.
Tensor channel_scores(const Tensor& q, const Tensor& codes, const Tensor& ranges, const Tensor& seq_lens,
                      const OptTensor& channels, int64_t block_size, double scale, int64_t blocks_per_group,
                      int64_t bits, const OptTensor& channel_slots, const OptTensor& spreads,
                      int64_t num_channels) {
  check_qcodes_inputs(q, ranges, seq_lens, block_size, blocks_per_group);
  check_code_bits(bits);
  const int64_t batch = ranges.size(0), kv_heads = ranges.size(1), head_dim = ranges.size(4);
  const int64_t num_blocks = code_num_blocks(codes, blocks_per_group, true);
  const int64_t stored = channel_slots.has_value() ? codes.size(3) : 0;  // a pool: the codes' runs per group
  const int32_t* slots = check_channel_slots(channel_slots, stored, batch, kv_heads, head_dim, q);
  check_code_tensors(codes, ranges, batch, kv_heads, num_blocks, block_size, blocks_per_group, bits, head_dim, q,
                     true, stored);
  const double* spread_data = nullptr;
  if (channels.has_value()) {
    AETHER_CHECK(!spreads.has_value() && num_channels == 0,
                 "aether: channel_scores takes either channels or spreads with num_channels, not both");
    AETHER_CHECK_TYPE(channels->scalar_type() == at::kInt, "aether: channels must be int32, got ",
                      channels->scalar_type());
    AETHER_CHECK(channels->dim() == 3 && channels->size(0) == batch && channels->size(1) == kv_heads &&
                     channels->is_contiguous(),
                 "aether: channels must be contiguous [", batch, ", ", kv_heads, ", num_channels], got ",
                 channels->sizes());
    num_channels = channels->size(2);
    AETHER_CHECK(num_channels >= 1 && num_channels <= head_dim, "aether: channels must list 1 to head_dim = ",
                 head_dim, " channels per row, got ", num_channels);
    check_same_device(*channels, q, "channels");
  } else {
    AETHER_CHECK(spreads.has_value(), "aether: channel_scores needs channels, or spreads (code_spreads) and "
                 "num_channels to choose them");
    AETHER_CHECK(num_channels >= 1 && num_channels <= head_dim, "aether: num_channels must be in [1, head_dim = ",
                 head_dim, "] when channel_scores chooses the channels, got ", num_channels);
    spread_data = check_spreads(*spreads, ranges, q);
  }
  AETHER_CHECK(scale > 0 && std::isfinite(scale), "aether: scale must be finite and > 0, got ", scale);
  Tensor head_scores = at::empty({batch, q.size(1), num_blocks}, q.options().dtype(at::kFloat));
  if (head_scores.numel() == 0) return head_scores;

  aether::ChannelScoresParams p;
  set_code_reader(p, q, ranges, seq_lens, batch, kv_heads, head_dim, block_size, num_blocks, blocks_per_group);
  p.codes = codes.data_ptr<uint8_t>();
  p.channels = channels.has_value() ? channels->data_ptr<int32_t>() : nullptr;
  p.spreads = spread_data;
  p.channel_slots = slots;
  p.stored_channels = to_i32(stored, "stored_channels");
  p.bits = to_i32(bits, "bits");
  p.num_channels = to_i32(num_channels, "num_channels");
  p.scale = static_cast<float>(scale);
  p.head_scores = head_scores.data_ptr<float>();
  run_kernel(p, q, aether::cpu::channel_scores, AETHER_CUDA_LAUNCHER(channel_scores), "channel_scores");
  return head_scores;
}

// ---------------------------------------------------------------------------------- union_blocks

void check_block_list(const Tensor& list, const Tensor& counts, const Tensor& ref, const char* name,
                      const char* counts_name) {
  AETHER_CHECK_TYPE(list.scalar_type() == at::kInt, "aether: ", name, " must be int32, got ", list.scalar_type());
  AETHER_CHECK_TYPE(counts.scalar_type() == at::kInt, "aether: ", counts_name, " must be int32, got ",
                    counts.scalar_type());
  AETHER_CHECK(list.dim() == 3 && list.is_contiguous(), "aether: ", name,
               " must be a contiguous 3-D [batch, kv_heads, length] tensor, got ", list.sizes());
  const std::vector<int64_t> count_shape = {ref.size(0), ref.size(1)};
  AETHER_CHECK(list.size(0) == ref.size(0) && list.size(1) == ref.size(1), "aether: ", name, " must be [",
               ref.size(0), ", ", ref.size(1), ", length], got ", list.sizes());
  AETHER_CHECK(counts.sizes() == at::IntArrayRef(count_shape) && counts.is_contiguous(), "aether: ", counts_name,
               " must be contiguous ", at::IntArrayRef(count_shape), ", got ", counts.sizes());
  AETHER_CHECK(list.device() == ref.device() && counts.device() == ref.device(), "aether: ", name, " and ",
               counts_name, " must be on ", ref.device(), " (the device of indices)");
}

// (indices int32 [B, Hkv, NB] ascending, padded with -1; counts int32 [B, Hkv]).
std::tuple<Tensor, Tensor> union_blocks(const Tensor& indices, const Tensor& counts, const Tensor& extra,
                                        const Tensor& extra_counts, int64_t num_blocks) {
  AETHER_CHECK(indices.dim() == 3, "aether: indices must be 3-D [batch, kv_heads, length], got ", indices.dim(),
               "-D");
  check_block_list(indices, counts, indices, "indices", "counts");
  check_block_list(extra, extra_counts, indices, "extra", "extra_counts");
  AETHER_CHECK(num_blocks >= 0, "aether: num_blocks must be >= 0, got ", num_blocks);
  Tensor out = at::empty({indices.size(0), indices.size(1), num_blocks}, indices.options());
  Tensor out_counts = at::empty({indices.size(0), indices.size(1)}, indices.options());
  if (out_counts.numel() == 0) return {out, out_counts};
  aether::UnionBlocksParams p;
  p.indices = indices.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.extra = extra.data_ptr<int32_t>();
  p.extra_counts = extra_counts.data_ptr<int32_t>();
  p.batch = to_i32(indices.size(0), "batch");
  p.kv_heads = to_i32(indices.size(1), "kv_heads");
  p.indices_length = to_i32(indices.size(2), "indices length");
  p.extra_length = to_i32(extra.size(2), "extra length");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.out = out.data_ptr<int32_t>();
  p.out_counts = out_counts.data_ptr<int32_t>();
  run_kernel(p, indices, aether::cpu::union_blocks, AETHER_CUDA_LAUNCHER(union_blocks), "union_blocks");
  return {out, out_counts};
}

// --------------------------------------------------------------------------------- radar_select


// The selection arguments radar_select and select_blocks share: checked, then set on the params.
void set_selection(aether::RadarSelectParams& p, int64_t budget_blocks, double budget_fraction, double mass,
                   int64_t min_blocks, int64_t max_blocks, int64_t sink_blocks, int64_t recent_blocks) {
  AETHER_CHECK(budget_blocks >= 0 && min_blocks >= 0 && max_blocks >= 0 && sink_blocks >= 0 && recent_blocks >= 0,
               "aether: block counts must be >= 0");
  AETHER_CHECK(budget_blocks > 0 || (budget_fraction > 0 && budget_fraction <= 1),
               "aether: budget_fraction must be in (0, 1] when budget_blocks is 0, got ", budget_fraction);
  AETHER_CHECK(mass > 0 && mass <= 1, "aether: mass must be in (0, 1], got ", mass);
  p.budget_blocks = to_i32(budget_blocks, "budget_blocks");
  p.budget_fraction = budget_fraction;
  p.mass = mass;
  p.min_blocks = to_i32(min_blocks, "min_blocks");
  p.max_blocks = to_i32(max_blocks, "max_blocks");
  p.sink_blocks = to_i32(sink_blocks, "sink_blocks");
  p.recent_blocks = to_i32(recent_blocks, "recent_blocks");
}

// radar_select on q's device (CUDA: with its workspace, on the current stream).
void run_radar_select(const aether::RadarSelectParams& p, const Tensor& q) {
  if (q.is_cuda()) {
#ifdef AETHER_WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    const size_t ws_bytes = aether::cuda::radar_select_workspace_bytes(p);
    Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
    check_cuda(aether::cuda::radar_select(p, ws_bytes ? workspace.data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "radar_select");
#else
    AETHER_CHECK(false, "aether: this build has no CUDA kernels");
#endif
  } else {
    aether::cpu::radar_select(p);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> radar_select(
    const Tensor& q, const Tensor& centroid, const Tensor& lo, const Tensor& hi, const Tensor& radius,
    const Tensor& spread, const Tensor& seq_lens, int64_t block_size, double scale, const std::string& score,
    const std::string& policy, int64_t budget_blocks, double budget_fraction, double eps, double mass,
    int64_t min_blocks, int64_t max_blocks, int64_t sink_blocks, int64_t recent_blocks, bool return_scores,
    const OptTensor& head_scores, const OptTensor& head_mlo, const std::string& group_agg,
    const OptTensor& sketch_codes, const OptTensor& sketch_ranges, const OptTensor& sketch_key_proj,
    const OptTensor& sketch_query_proj, double centroid_weight, const OptTensor& sketch_centroid,
    int64_t blocks_per_sketch) {
  check_block_size(block_size);
  const aether::Score parsed_score = parse_score(score);
  const bool sketch = parsed_score == aether::Score::kSketch;
  CacheShape c;
  if (sketch) {
    // The sketch gives the shape; the statistics are not read (they may be empty placeholders).
    AETHER_CHECK(sketch_codes.has_value() && sketch_ranges.has_value() && sketch_centroid.has_value() &&
                     sketch_key_proj.has_value() && sketch_query_proj.has_value(),
                 "aether: score 'qsketch' needs sketch_codes, sketch_ranges, sketch_centroid, sketch_key_proj and "
                 "sketch_query_proj");
    AETHER_CHECK(sketch_codes->dim() == 5, "aether: sketch codes must be 5-D [batch, kv_heads, num_blocks, "
                 "block_size, rank/2]");
    AETHER_CHECK(q.dim() == 3, "aether: q must be 3-D [batch, q_heads, head_dim], got ", q.dim(), "-D");
    c = {sketch_codes->size(0), sketch_codes->size(1), sketch_codes->size(2) * block_size, q.size(2)};
    AETHER_CHECK(std::isfinite(centroid_weight), "aether: centroid_weight must be finite");
  } else {
    AETHER_CHECK(centroid.dim() == 4, "aether: centroid must be 4-D [batch, kv_heads, num_blocks, head_dim]");
    c = {centroid.size(0), centroid.size(1), centroid.size(2) * block_size, centroid.size(3)};
  }
  const int64_t num_blocks = c.capacity / block_size;
  check_query(q, c.batch, c.kv_heads, c.head_dim);
  check_head_dim(c.head_dim, q.is_cuda());
  to_dtype(q, "q");
  if (!sketch) {
    check_stats_tensor(centroid, c, num_blocks, true, q, "centroid");
    check_stats_tensor(lo, c, num_blocks, true, q, "lo");
    check_stats_tensor(hi, c, num_blocks, true, q, "hi");
    check_stats_tensor(radius, c, num_blocks, false, q, "radius");
    check_stats_tensor(spread, c, num_blocks, false, q, "spread");
  }
  check_int32_vector(seq_lens, c.batch, q, "seq_lens");
  AETHER_CHECK(scale > 0, "aether: scale must be > 0, got ", scale);
  AETHER_CHECK(eps > 0 && eps < 1, "aether: eps must be in (0, 1), got ", eps);

  const int64_t q_heads = q.size(1);
  aether::RadarSelectParams p;
  set_selection(p, budget_blocks, budget_fraction, mass, min_blocks, max_blocks, sink_blocks, recent_blocks);
  p.q = q.data_ptr();
  p.q_stride_batch = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.dtype = to_dtype(q, "q");
  if (!sketch) {
    p.centroid = centroid.data_ptr<float>();
    p.lo = lo.data_ptr<float>();
    p.hi = hi.data_ptr<float>();
    p.radius = radius.data_ptr<float>();
    p.spread = spread.data_ptr<float>();
  } else {
    check_key_proj(*sketch_key_proj, c.kv_heads, c.head_dim, q);
    const int64_t rank = sketch_key_proj->size(2);
    const int64_t per = blocks_per_sketch;
    check_blocks_per_sketch(per, block_size, num_blocks);
    check_sketch_tensors(*sketch_codes, *sketch_ranges, *sketch_centroid, c.batch, c.kv_heads, num_blocks, block_size,
                         per, rank, c.head_dim, q);
    const Tensor& qp = *sketch_query_proj;
    AETHER_CHECK_TYPE(qp.scalar_type() == at::kFloat, "aether: query_proj must be float32, got ", qp.scalar_type());
    AETHER_CHECK(qp.dim() == 3 && qp.size(0) == q.size(1) && qp.size(1) == c.head_dim && qp.size(2) == rank &&
                     qp.is_contiguous(),
                 "aether: query_proj must be contiguous [q_heads=", q.size(1), ", head_dim=", c.head_dim,
                 ", rank=", rank, "], got ", qp.sizes());
    check_same_device(qp, q, "query_proj");
    p.sketch_codes = sketch_codes->data_ptr<uint8_t>();
    p.sketch_ranges = reinterpret_cast<const uint16_t*>(sketch_ranges->data_ptr<at::BFloat16>());
    p.sketch_centroid = reinterpret_cast<const uint16_t*>(sketch_centroid->data_ptr<at::BFloat16>());
    p.blocks_per_sketch = to_i32(per, "blocks_per_sketch");
    p.sketch_key_proj = sketch_key_proj->data_ptr<float>();
    p.sketch_query_proj = qp.data_ptr<float>();
    p.sketch_rank = to_i32(rank, "rank");
    p.centroid_weight = static_cast<float>(centroid_weight);
  }
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = to_i32(c.batch, "batch");
  p.q_heads = to_i32(q_heads, "q_heads");
  p.kv_heads = to_i32(c.kv_heads, "kv_heads");
  p.head_dim = to_i32(c.head_dim, "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.scale = static_cast<float>(scale);
  p.score = parsed_score;
  p.policy = parse_policy(policy);
  AETHER_CHECK(p.policy != aether::Policy::kThreshold || p.score == aether::Score::kBall ||
                        p.score == aether::Score::kBox || p.score == aether::Score::kTight ||
                        (head_scores.has_value() && !sketch),
                    "aether: the threshold policy needs an upper-bound score (ball, box or tight), got '", score,
                    "'");
  p.group_agg = parse_group_agg(group_agg);
  p.eps = eps;

  // head_mlo goes with head_scores. Only the threshold policy and return_scores read M_g, so
  // elsewhere head_scores may come alone (M_g is then -inf, what two-stage selection passes; it
  // saves a fill kernel per step).
  AETHER_CHECK(!head_mlo.has_value() || head_scores.has_value(), "aether: head_mlo needs head_scores");
  AETHER_CHECK(!head_scores.has_value() || head_mlo.has_value() ||
                   (p.policy != aether::Policy::kThreshold && !return_scores),
               "aether: head_scores without head_mlo is only allowed for policy topk or adaptive without "
               "return_scores (threshold and return_scores read M_g)");
  if (head_scores.has_value()) {
    AETHER_CHECK_TYPE(head_scores->scalar_type() == at::kFloat, "aether: head_scores must be float32");
    AETHER_CHECK(head_scores->sizes() == at::IntArrayRef({c.batch, q_heads, num_blocks}) &&
                          head_scores->is_contiguous(),
                      "aether: head_scores must be contiguous [batch, q_heads, num_blocks]");
    check_same_device(*head_scores, q, "head_scores");
    p.in_head_scores = head_scores->data_ptr<float>();
  }
  if (head_mlo.has_value()) {
    AETHER_CHECK_TYPE(head_mlo->scalar_type() == at::kFloat, "aether: head_mlo must be float32");
    AETHER_CHECK(head_mlo->sizes() == at::IntArrayRef({c.batch, q_heads}) && head_mlo->is_contiguous(),
                      "aether: head_mlo must be contiguous [batch, q_heads]");
    check_same_device(*head_mlo, q, "head_mlo");
    p.in_head_mlo = head_mlo->data_ptr<float>();
  }

  Tensor selected = at::empty({c.batch, c.kv_heads, num_blocks}, q.options().dtype(at::kInt));
  Tensor num_selected = at::empty({c.batch, c.kv_heads}, q.options().dtype(at::kInt));
  auto fopts = q.options().dtype(at::kFloat);
  Tensor out_scores = return_scores ? at::empty({c.batch, q_heads, num_blocks}, fopts) : at::empty({0}, fopts);
  Tensor out_mlo = return_scores ? at::empty({c.batch, q_heads}, fopts) : at::empty({0}, fopts);
  if (num_selected.numel() == 0) return {selected, num_selected, out_scores, out_mlo};
  p.selected = selected.data_ptr<int32_t>();
  p.num_selected = num_selected.data_ptr<int32_t>();
  if (return_scores) {
    p.out_head_scores = out_scores.data_ptr<float>();
    p.out_head_mlo = out_mlo.data_ptr<float>();
  }

  run_radar_select(p, q);
  return {selected, num_selected, out_scores, out_mlo};
}

// Selection from given per-query-head scores [B, Hq, NB] (the qcodes score's channel_scores):
// topk or adaptive, no M_g, so neither q nor any statistics are read (q gives the device).
std::tuple<Tensor, Tensor> select_blocks(const Tensor& q, const Tensor& head_scores, const Tensor& seq_lens,
                                         int64_t kv_heads, int64_t block_size, const std::string& policy,
                                         int64_t budget_blocks, double budget_fraction, double mass,
                                         int64_t min_blocks, int64_t max_blocks, int64_t sink_blocks,
                                         int64_t recent_blocks, const std::string& group_agg) {
  check_block_size(block_size);
  AETHER_CHECK(q.dim() == 3, "aether: q must be 3-D [batch, q_heads, head_dim], got ", q.dim(), "-D");
  AETHER_CHECK_TYPE(head_scores.scalar_type() == at::kFloat, "aether: head_scores must be float32, got ",
                    head_scores.scalar_type());
  AETHER_CHECK(head_scores.dim() == 3 && head_scores.size(0) == q.size(0) && head_scores.size(1) == q.size(1) &&
                   head_scores.is_contiguous(),
               "aether: head_scores must be contiguous [batch=", q.size(0), ", q_heads=", q.size(1),
               ", num_blocks], got ", head_scores.sizes());
  check_same_device(head_scores, q, "head_scores");
  AETHER_CHECK(kv_heads > 0 && q.size(1) % kv_heads == 0, "aether: q_heads (", q.size(1),
               ") must be a positive multiple of kv_heads (", kv_heads, ")");
  const int64_t batch = q.size(0), num_blocks = head_scores.size(2);
  check_int32_vector(seq_lens, batch, q, "seq_lens");
  aether::RadarSelectParams p;
  set_selection(p, budget_blocks, budget_fraction, mass, min_blocks, max_blocks, sink_blocks, recent_blocks);
  p.q = q.data_ptr();  // not read: the scores are given and no M_g is asked for
  p.q_stride_batch = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.dtype = to_dtype(q, "q");
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = to_i32(batch, "batch");
  p.q_heads = to_i32(q.size(1), "q_heads");
  p.kv_heads = to_i32(kv_heads, "kv_heads");
  p.head_dim = to_i32(q.size(2), "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.score = aether::Score::kSketch;  // with in_head_scores nothing of the sketch is read
  p.policy = parse_policy(policy);
  AETHER_CHECK(p.policy != aether::Policy::kThreshold,
               "aether: select_blocks supports policy topk or adaptive (threshold needs M_g), got '", policy, "'");
  p.group_agg = parse_group_agg(group_agg);
  p.in_head_scores = head_scores.data_ptr<float>();
  Tensor selected = at::empty({batch, kv_heads, num_blocks}, q.options().dtype(at::kInt));
  Tensor num_selected = at::empty({batch, kv_heads}, q.options().dtype(at::kInt));
  if (num_selected.numel() == 0) return {selected, num_selected};
  p.selected = selected.data_ptr<int32_t>();
  p.num_selected = num_selected.data_ptr<int32_t>();
  run_radar_select(p, q);
  return {selected, num_selected};
}

// -------------------------------------------------------------------------------- sparse_decode

struct DecodeSetup {
  aether::SparseDecodeParams params;
  int64_t max_selected;
};

DecodeSetup decode_setup(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_lens,
                         int64_t block_size, double scale, const OptTensor& selected, const OptTensor& num_selected,
                         const OptTensor& block_table, int64_t max_selected) {
  check_block_size(block_size);
  CacheShape c = cache_shape(k, block_table, block_size, "k");
  CacheShape cv = cache_shape(v, block_table, block_size, "v");
  AETHER_CHECK(k.sizes() == v.sizes(), "aether: k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  AETHER_CHECK(cv.head_dim == c.head_dim, "aether: k and v head_dim differ");
  check_query(q, c.batch, c.kv_heads, c.head_dim);
  check_head_dim(c.head_dim, q.is_cuda());
  AETHER_CHECK_TYPE(!q.is_cuda() || q.scalar_type() != at::kFloat,
                   "aether: sparse_decode on CUDA supports float16 and bfloat16, got float32 (float32 runs on CPU)");
  AETHER_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "aether: q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  check_same_device(k, q, "k");
  check_same_device(v, q, "v");
  check_int32_vector(seq_lens, c.batch, q, "seq_lens");
  AETHER_CHECK(scale > 0, "aether: scale must be > 0, got ", scale);
  const int64_t num_blocks = (c.capacity + block_size - 1) / block_size;

  aether::SparseDecodeParams p;
  p.q = q.data_ptr();
  p.q_stride_batch = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.k = kv_layout(k, block_table);
  p.v = kv_layout(v, block_table);
  p.dtype = to_dtype(q, "q");
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.batch = to_i32(c.batch, "batch");
  p.q_heads = to_i32(q.size(1), "q_heads");
  p.kv_heads = to_i32(c.kv_heads, "kv_heads");
  p.head_dim = to_i32(c.head_dim, "head_dim");
  p.block_size = to_i32(block_size, "block_size");
  p.num_blocks = to_i32(num_blocks, "num_blocks");
  p.scale = static_cast<float>(scale);

  AETHER_CHECK(selected.has_value() == num_selected.has_value(),
                    "aether: selected and num_selected must be given together");
  if (selected.has_value()) {
    AETHER_CHECK_TYPE(selected->scalar_type() == at::kInt && num_selected->scalar_type() == at::kInt,
                     "aether: selected and num_selected must be int32");
    AETHER_CHECK(selected->dim() == 3 && selected->size(0) == c.batch && selected->size(1) == c.kv_heads &&
                          selected->is_contiguous(),
                      "aether: selected must be contiguous [batch, kv_heads, n], got ", selected->sizes());
    AETHER_CHECK(num_selected->sizes() == at::IntArrayRef({c.batch, c.kv_heads}) &&
                          num_selected->is_contiguous(),
                      "aether: num_selected must be contiguous [batch, kv_heads], got ", num_selected->sizes());
    AETHER_CHECK(selected->size(2) >= num_blocks, "aether: selected rows hold ", selected->size(2),
                      " entries but the cache has ", num_blocks, " blocks; rows must cover every block");
    check_same_device(*selected, q, "selected");
    check_same_device(*num_selected, q, "num_selected");
    p.selected = selected->data_ptr<int32_t>();
    p.num_selected = num_selected->data_ptr<int32_t>();
    // The kernels read at most min(num_selected, row length) entries of a row.
    p.num_blocks = to_i32(selected->size(2), "selected.size(2)");
  }
  AETHER_CHECK(max_selected >= 0, "aether: max_selected must be >= 0, got ", max_selected);
  const int64_t row = selected.has_value() ? selected->size(2) : num_blocks;
  return {p, max_selected > 0 ? std::min(max_selected, row) : row};
}

int64_t decode_num_splits(const DecodeSetup& s, const Tensor& q) {
#ifdef AETHER_WITH_CUDA
  if (q.is_cuda()) {
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.device().index()),
               "cudaDeviceGetAttribute");
    return aether::cuda::sparse_decode_num_splits(s.params.batch, s.params.kv_heads,
                                                  static_cast<int>(s.max_selected), sms);
  }
#endif
  return 1;
}

// Floats of CUDA workspace for a split count: partial outputs then partial lse.
int64_t decode_workspace_numel(const aether::SparseDecodeParams& p, int64_t splits) {
  return splits > 1 ? static_cast<int64_t>(p.batch) * p.q_heads * splits * (p.head_dim + 1) : 0;
}

void run_decode(aether::SparseDecodeParams& p, const Tensor& q, const Tensor& out, const Tensor& lse,
                float* workspace, int64_t splits) {
  p.out = out.data_ptr();
  p.out_stride_batch = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.lse = lse.data_ptr<float>();
  if (q.is_cuda()) {
#ifdef AETHER_WITH_CUDA
    p.num_splits = static_cast<int32_t>(splits);
    p.partial_out = workspace;
    p.partial_lse = splits > 1 ? workspace + static_cast<int64_t>(p.batch) * p.q_heads * splits * p.head_dim : nullptr;
    c10::cuda::CUDAGuard guard(q.device());
    check_cuda(aether::cuda::sparse_decode(p, c10::cuda::getCurrentCUDAStream().stream()), "sparse_decode");
    return;
#else
    AETHER_CHECK(false, "aether: this build has no CUDA kernels");
#endif
  }
  aether::cpu::sparse_decode(p);
}

std::tuple<Tensor, Tensor> sparse_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_lens,
                                         int64_t block_size, double scale, const OptTensor& selected,
                                         const OptTensor& num_selected, const OptTensor& block_table,
                                         int64_t max_selected) {
  DecodeSetup s = decode_setup(q, k, v, seq_lens, block_size, scale, selected, num_selected, block_table, max_selected);
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const int64_t splits = decode_num_splits(s, q);
  Tensor workspace = at::empty({decode_workspace_numel(s.params, splits)}, q.options().dtype(at::kFloat));
  run_decode(s.params, q, out, lse, workspace.numel() ? workspace.data_ptr<float>() : nullptr, splits);
  return {out, lse};
}

// Allocation-free variant for CUDA graphs: the caller owns out, lse and workspace (size it with
// sparse_decode_workspace_numel).
void sparse_decode_out(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_lens, int64_t block_size,
                       double scale, const OptTensor& selected, const OptTensor& num_selected,
                       const OptTensor& block_table, int64_t max_selected, Tensor& out, Tensor& lse,
                       Tensor& workspace) {
  DecodeSetup s = decode_setup(q, k, v, seq_lens, block_size, scale, selected, num_selected, block_table, max_selected);
  AETHER_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.stride(2) == 1,
                    "aether: out must match q's shape and dtype with a contiguous last dimension");
  AETHER_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1)}) && lse.scalar_type() == at::kFloat &&
                        lse.is_contiguous(),
                    "aether: lse must be contiguous float32 [batch, q_heads]");
  check_same_device(out, q, "out");
  check_same_device(lse, q, "lse");
  check_same_device(workspace, q, "workspace");
  if (out.numel() == 0) return;
  const int64_t splits = decode_num_splits(s, q);
  const int64_t need = decode_workspace_numel(s.params, splits);
  AETHER_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() && workspace.numel() >= need,
                    "aether: workspace must be contiguous float32 with at least ", need, " elements, got ",
                    workspace.numel());
  run_decode(s.params, q, out, lse, need ? workspace.data_ptr<float>() : nullptr, splits);
}

int64_t sparse_decode_workspace_numel(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seq_lens,
                                      int64_t block_size, double scale, const OptTensor& selected,
                                      const OptTensor& num_selected, const OptTensor& block_table,
                                      int64_t max_selected) {
  DecodeSetup s = decode_setup(q, k, v, seq_lens, block_size, scale, selected, num_selected, block_table, max_selected);
  return decode_workspace_numel(s.params, decode_num_splits(s, q));
}

bool built_with_cuda() {
#ifdef AETHER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace aether_torch

TORCH_LIBRARY(aether, m) {
  m.def(
      "block_stats(Tensor k, Tensor seq_lens, int block_size, int num_blocks, Tensor? block_table=None) -> "
      "(Tensor centroid, Tensor lo, Tensor hi, Tensor radius, Tensor spread)");
  m.def(
      "block_stats_update(Tensor k, Tensor seq_lens, Tensor first_block, int block_size, Tensor? block_table, "
      "Tensor(a!) centroid, Tensor(b!) lo, Tensor(c!) hi, Tensor(d!) radius, Tensor(e!) spread) -> ()");
  m.def(
      "radar_select(Tensor q, Tensor centroid, Tensor lo, Tensor hi, Tensor radius, Tensor spread, "
      "Tensor seq_lens, int block_size, float scale, str score, str policy, int budget_blocks, "
      "float budget_fraction, float eps, float mass, int min_blocks, int max_blocks, int sink_blocks, "
      "int recent_blocks, bool return_scores=False, Tensor? head_scores=None, Tensor? head_mlo=None, "
      "str group_agg='max', Tensor? sketch_codes=None, Tensor? sketch_ranges=None, Tensor? sketch_key_proj=None, "
      "Tensor? sketch_query_proj=None, float centroid_weight=0.0, Tensor? sketch_centroid=None, "
      "int blocks_per_sketch=1) -> "
      "(Tensor selected, Tensor num_selected, Tensor head_scores_out, Tensor head_mlo_out)");
  m.def(
      "key_sketch(Tensor k, Tensor seq_lens, Tensor key_proj, int block_size, int num_blocks, "
      "Tensor? block_table=None, int blocks_per_sketch=1) -> (Tensor codes, Tensor ranges, Tensor centroid)");
  m.def(
      "key_sketch_update(Tensor k, Tensor seq_lens, Tensor first_block, Tensor key_proj, int block_size, "
      "Tensor? block_table, Tensor(a!) codes, Tensor(b!) ranges, Tensor(c!) centroid, int blocks_per_sketch=1) -> ()");
  m.def(
      "key_codes(Tensor k, Tensor seq_lens, int block_size, int num_blocks, Tensor? block_table=None, "
      "int blocks_per_group=1, int bits=2, bool channel_major=False, Tensor? channel_slots=None, "
      "int stored_channels=0) -> (Tensor codes, Tensor ranges)");
  m.def(
      "key_codes_update(Tensor k, Tensor seq_lens, Tensor first_block, int block_size, Tensor? block_table, "
      "Tensor(a!) codes, Tensor(b!) ranges, int blocks_per_group=1, int bits=2, bool channel_major=False, "
      "Tensor? channel_slots=None, Tensor(c!)? spreads=None, bool narrow=False) -> ()");
  m.def(
      "select_blocks(Tensor q, Tensor head_scores, Tensor seq_lens, int kv_heads, int block_size, str policy, "
      "int budget_blocks, float budget_fraction, float mass, int min_blocks, int max_blocks, int sink_blocks, "
      "int recent_blocks, str group_agg) -> (Tensor selected, Tensor num_selected)");
  m.def(
      "code_spreads(Tensor ranges, Tensor seq_lens, int block_size, int blocks_per_group=1) -> Tensor");
  m.def(
      "code_spreads_update(Tensor ranges, Tensor seq_lens, Tensor first_block, int block_size, "
      "int blocks_per_group, Tensor(a!) spreads) -> ()");
  m.def(
      "code_channels(Tensor q, Tensor ranges, Tensor seq_lens, int block_size, int blocks_per_group, "
      "int num_channels, Tensor? channel_slots=None, int stored_channels=0, Tensor? spreads=None) -> Tensor");
  m.def(
      "channel_scores(Tensor q, Tensor codes, Tensor ranges, Tensor seq_lens, Tensor? channels, int block_size, "
      "float scale, int blocks_per_group=1, int bits=2, Tensor? channel_slots=None, Tensor? spreads=None, "
      "int num_channels=0) -> Tensor");
  m.def(
      "refine_scores(Tensor q, Tensor codes, Tensor ranges, Tensor seq_lens, Tensor candidates, "
      "Tensor num_candidates, int block_size, float scale, int blocks_per_group=1, int bits=2) -> Tensor");
  m.def(
      "union_blocks(Tensor indices, Tensor counts, Tensor extra, Tensor extra_counts, int num_blocks) -> "
      "(Tensor selected, Tensor num_selected)");
  m.def(
      "sparse_decode(Tensor q, Tensor k, Tensor v, Tensor seq_lens, int block_size, float scale, "
      "Tensor? selected=None, Tensor? num_selected=None, Tensor? block_table=None, int max_selected=0) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "sparse_decode_out(Tensor q, Tensor k, Tensor v, Tensor seq_lens, int block_size, float scale, "
      "Tensor? selected, Tensor? num_selected, Tensor? block_table, int max_selected, Tensor(a!) out, "
      "Tensor(b!) lse, Tensor(c!) workspace) -> ()");
  m.def(
      "sparse_decode_workspace_numel(Tensor q, Tensor k, Tensor v, Tensor seq_lens, int block_size, float scale, "
      "Tensor? selected=None, Tensor? num_selected=None, Tensor? block_table=None, int max_selected=0) -> int");
  m.def("built_with_cuda() -> bool", &aether_torch::built_with_cuda);
}

TORCH_LIBRARY_IMPL(aether, CPU, m) {
  m.impl("block_stats", &aether_torch::block_stats);
  m.impl("key_codes", &aether_torch::key_codes);
  m.impl("key_codes_update", &aether_torch::key_codes_update);
  m.impl("refine_scores", &aether_torch::refine_scores);
  m.impl("code_spreads", &aether_torch::code_spreads);
  m.impl("code_spreads_update", &aether_torch::code_spreads_update);
  m.impl("code_channels", &aether_torch::code_channels);
  m.impl("select_blocks", &aether_torch::select_blocks);
  m.impl("channel_scores", &aether_torch::channel_scores);
  m.impl("union_blocks", &aether_torch::union_blocks);
  m.impl("block_stats_update", &aether_torch::block_stats_update);
  m.impl("radar_select", &aether_torch::radar_select);
  m.impl("key_sketch", &aether_torch::key_sketch);
  m.impl("key_sketch_update", &aether_torch::key_sketch_update);
  m.impl("sparse_decode", &aether_torch::sparse_decode);
  m.impl("sparse_decode_out", &aether_torch::sparse_decode_out);
  m.impl("sparse_decode_workspace_numel", &aether_torch::sparse_decode_workspace_numel);
}

#ifdef AETHER_WITH_CUDA
TORCH_LIBRARY_IMPL(aether, CUDA, m) {
  m.impl("block_stats", &aether_torch::block_stats);
  m.impl("key_codes", &aether_torch::key_codes);
  m.impl("key_codes_update", &aether_torch::key_codes_update);
  m.impl("refine_scores", &aether_torch::refine_scores);
  m.impl("code_spreads", &aether_torch::code_spreads);
  m.impl("code_spreads_update", &aether_torch::code_spreads_update);
  m.impl("code_channels", &aether_torch::code_channels);
  m.impl("select_blocks", &aether_torch::select_blocks);
  m.impl("channel_scores", &aether_torch::channel_scores);
  m.impl("union_blocks", &aether_torch::union_blocks);
  m.impl("block_stats_update", &aether_torch::block_stats_update);
  m.impl("radar_select", &aether_torch::radar_select);
  m.impl("key_sketch", &aether_torch::key_sketch);
  m.impl("key_sketch_update", &aether_torch::key_sketch_update);
  m.impl("sparse_decode", &aether_torch::sparse_decode);
  m.impl("sparse_decode_out", &aether_torch::sparse_decode_out);
  m.impl("sparse_decode_workspace_numel", &aether_torch::sparse_decode_workspace_numel);
}
#endif
