// Helpers shared by the CPU kernels: fp16/bf16 <-> float conversion, dtype dispatch, KV
// addressing and a small thread pool-free parallel_for.
//
// Conversions are done with integer bit manipulation so they do not depend on compiler support
// for _Float16/__bf16 and behave identically everywhere (round-to-nearest-even, like the CUDA
// intrinsics __float2half_rn / __float2bfloat16_rn).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "aether/params.h"

namespace aether {
namespace cpu {

// Storage types of the 16-bit formats: the kernels only load and store them, all arithmetic is
// float32, so a bit container is all that is needed.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);  // signed zero
    // Subnormal half: shift the mantissa up until its leading one becomes the implicit bit.
    int32_t unbiased = -14;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --unbiased;
    }
    mantissa &= 0x3ffu;
    return bits_float(sign | (static_cast<uint32_t>(unbiased + 127) << 23) | (mantissa << 13));
  }
  // Rebias the exponent from 15 to 127.
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half(float value) {
  const uint32_t x = float_bits(value);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs_bits = x & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {
    if (abs_bits > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // quiet NaN
    return static_cast<uint16_t>(sign | 0x7c00u);                              // inf
  }
  // 65520 is halfway between the largest half (65504, odd mantissa) and 65536: ties go to inf.
  if (abs_bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (abs_bits < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
    // 2^-25 and below round to zero (exactly 2^-25 is a tie between 0 and 2^-24, even is 0).
    if (abs_bits <= 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
    const uint32_t exponent = abs_bits >> 23;  // 102..112
    // The value in units of 2^-24 (the half subnormal step) is mantissa >> shift, shift 14..24.
    const uint32_t shift = 126u - exponent;
    uint32_t quotient = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (quotient & 1u))) ++quotient;
    return static_cast<uint16_t>(sign | quotient);  // 0x400 after a carry is the smallest normal
  }
  // Normal: drop 13 mantissa bits and rebias the exponent (127 -> 15); a carry out of the
  // mantissa correctly increments the exponent.
  uint32_t h = (abs_bits >> 13) - (112u << 10);
  const uint32_t remainder = abs_bits & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float bfloat16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bfloat16(float value) {
  const uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // NaN
  // Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even; overflow lands on inf.
  const uint32_t rounding_bias = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding_bias) >> 16);
}

// Step of a quantisation range from its bfloat16 lo and hi (KeySketchParams: 15 levels;
// KeyCodesParams: 2^bits - 1): float32 arithmetic on the widened values, shared by the builders
// and the scorers so both agree.
inline float sketch_step(uint16_t lo_bits, uint16_t hi_bits, int32_t levels = kSketchLevels) {
  return (bfloat16_to_float(hi_bits) - bfloat16_to_float(lo_bits)) / static_cast<float>(levels);
}

// Code of value x in the range starting at lo with the given step: rint((x - lo) / step) clamped
// to [0, levels]; 0 when the step is not > 0 (a constant range) or the quotient is NaN.
inline uint32_t quantise_level(float x, float lo, float step, int32_t levels) {
  if (!(step > 0.0f)) return 0;
  const float level = std::nearbyint((x - lo) / step);  // default mode: nearest, ties to even
  if (!(level > 0.0f)) return 0;  // also a NaN quotient: rint of NaN has no code
  return static_cast<uint32_t>(std::min(level, static_cast<float>(levels)));
}

// Why P = blocks_per_sketch cannot be used with this block size and capacity (KeySketchParams in
// params.h), or "" when it can. Shared by the builder and the scorer, which both index sketch
// blocks as m = j / P in rows of num_blocks / P.
constexpr int kMaxSketchBlockTokens = 128;  // P * block_size <= 128 (params.h)
inline std::string blocks_per_sketch_error(int32_t per, int32_t block_size, int32_t num_blocks,
                                           const std::string& name = "blocks_per_sketch") {
  if (per < 1 || per > kMaxBlocksPerSketch || (per & (per - 1)) != 0) {
    return "unsupported " + name + " " + std::to_string(per) + " (allowed: a power of two, 1.." +
           std::to_string(kMaxBlocksPerSketch) + ")";
  }
  if (static_cast<int64_t>(block_size) * per > kMaxSketchBlockTokens) {
    return "block_size " + std::to_string(block_size) + " * " + name + " " + std::to_string(per) + " exceeds " +
           std::to_string(kMaxSketchBlockTokens) + " tokens (allowed: at most " +
           std::to_string(kMaxSketchBlockTokens) + ")";
  }
  if (num_blocks % per != 0) {
    return "num_blocks " + std::to_string(num_blocks) + " is not a multiple of " + name + " " +
           std::to_string(per) + " (allowed: num_blocks % " + name + " == 0)";
  }
  return "";
}

inline float to_float(float value) { return value; }
inline float to_float(Half value) { return half_to_float(value.bits); }
inline float to_float(BFloat16 value) { return bfloat16_to_float(value.bits); }

template <typename T>
T from_float(float value);
template <>
inline float from_float<float>(float value) {
  return value;
}
template <>
inline Half from_float<Half>(float value) {
  return Half{float_to_half(value)};
}
template <>
inline BFloat16 from_float<BFloat16>(float value) {
  return BFloat16{float_to_bfloat16(value)};
}

// Converts n elements of type T to float32.
template <typename T>
inline void load_row(const T* source, int64_t n, float* destination) {
  for (int64_t i = 0; i < n; ++i) destination[i] = to_float(source[i]);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the storage type of `dtype`; `what` names the caller in the error.
template <typename Fn>
void dispatch_dtype(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(TypeTag<float>{});
      return;
    case DType::kFloat16:
      fn(TypeTag<Half>{});
      return;
    case DType::kBFloat16:
      fn(TypeTag<BFloat16>{});
      return;
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype value " +
                              std::to_string(static_cast<int32_t>(dtype)) +
                              " (allowed: 0 float32, 1 float16, 2 bfloat16)");
}

// Address of token t of sequence b, KV head h (see KVLayout in params.h).
template <typename T>
inline const T* kv_token(const KVLayout& layout, int64_t b, int64_t h, int64_t t) {
  const T* base = static_cast<const T*>(layout.data);
  if (layout.block_table == nullptr) {
    return base + b * layout.stride_seq + h * layout.stride_head + t * layout.stride_token;
  }
  const int64_t page = layout.block_table[b * layout.block_table_stride + t / layout.page_size];
  return base + page * layout.stride_seq + h * layout.stride_head +
         (t % layout.page_size) * layout.stride_token;
}

// Number of worker threads: AETHER_NUM_THREADS if set (>= 1), else the hardware concurrency.
inline int num_threads() {
  if (const char* env = std::getenv("AETHER_NUM_THREADS")) {
    const int requested = std::atoi(env);
    if (requested >= 1) return requested;
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware == 0 ? 1 : static_cast<int>(hardware);
}

// Runs fn(i) for i in [0, n), spread over std::threads in contiguous chunks. std::thread rather
// than OpenMP: torch has its own OpenMP pool and two runtimes in one process oversubscribe. The
// first exception thrown by any item is rethrown on the calling thread after all workers end.
template <typename Fn>
void parallel_for(int64_t n, Fn&& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, num_threads());
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::exception_ptr first_error;
  std::mutex error_mutex;
  auto run_chunk = [&](int64_t worker) {
    const int64_t begin = n * worker / workers;
    const int64_t end = n * (worker + 1) / workers;
    try {
      for (int64_t i = begin; i < end; ++i) fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(workers - 1));
  for (int64_t worker = 1; worker < workers; ++worker) threads.emplace_back(run_chunk, worker);
  run_chunk(0);  // the calling thread takes a share instead of idling in join()
  for (std::thread& thread : threads) thread.join();
  if (first_error) std::rethrow_exception(first_error);
}

// Number of blocks of a sequence of `len` tokens, clamped to the capacity so that a bad length
// can never index past the statistics tensors.
inline int32_t valid_blocks(int32_t len, int32_t block_size, int32_t capacity) {
  if (len <= 0) return 0;
  const int64_t blocks = (static_cast<int64_t>(len) + block_size - 1) / block_size;
  return static_cast<int32_t>(std::min<int64_t>(blocks, capacity));
}

}  // namespace cpu
}  // namespace aether
