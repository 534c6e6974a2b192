// Conversions and parallel_for of aether/cpu/common.h, checked against the double-precision
// rounding of test_util.h (a different method: frexp/nearbyint instead of bit manipulation).
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "aether/cpu/common.h"
#include "aether/cpu/kernels.h"
#include "test_util.h"

namespace aether {
namespace {

using cpu::bfloat16_to_float;
using cpu::float_to_bfloat16;
using cpu::float_to_half;
using cpu::half_to_float;

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

TEST(CpuCommon, HalfToFloatIsExactForEveryPattern) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto h = static_cast<uint16_t>(bits);
    const double expected = test::decode_half(h);
    const float actual = half_to_float(h);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(actual)) << "bits " << bits;
      continue;
    }
    ASSERT_EQ(static_cast<double>(actual), expected) << "bits " << bits;
    ASSERT_EQ(std::signbit(actual), std::signbit(expected)) << "bits " << bits;
    // Every half is a float, so the round trip must give the same pattern back.
    ASSERT_EQ(float_to_half(actual), h) << "bits " << bits;
  }
}

TEST(CpuCommon, BFloat16RoundTripsEveryPattern) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto b = static_cast<uint16_t>(bits);
    const float value = bfloat16_to_float(b);
    if (std::isnan(value)) continue;
    ASSERT_EQ(static_cast<double>(value), test::decode_bf16(b));
    ASSERT_EQ(float_to_bfloat16(value), b) << "bits " << bits;
  }
}

// Random float bit patterns cover every exponent (subnormals, overflow, NaN) uniformly; the
// halfway cases come from floats that are exactly between two representable neighbours.
TEST(CpuCommon, FloatToHalfAndBFloat16RoundToNearestEven) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<float> values;
  for (int n = 0; n < 400000; ++n) values.push_back(float_from_bits(static_cast<uint32_t>(rng())));
  std::uniform_real_distribution<double> small(-70000.0, 70000.0);
  for (int n = 0; n < 100000; ++n) values.push_back(static_cast<float>(small(rng)));
  for (uint32_t bits = 0; bits < 0x7c00; bits += 7) {
    // Midpoints between consecutive halves, and between consecutive bfloat16 values.
    const double low = test::decode_half(static_cast<uint16_t>(bits));
    const double high = test::decode_half(static_cast<uint16_t>(bits + 1));
    values.push_back(static_cast<float>((low + high) / 2));
    values.push_back(-static_cast<float>((low + high) / 2));
    values.push_back(float_from_bits((bits << 16) | 0x8000u));
    values.push_back(float_from_bits(((bits + 0x3f80u) << 16) | 0x8000u));
  }
  values.push_back(65504.0f);
  values.push_back(65519.99f);
  values.push_back(65520.0f);
  values.push_back(std::ldexp(1.0f, -25));
  values.push_back(std::nextafter(std::ldexp(1.0f, -25), 1.0f));
  values.push_back(std::ldexp(3.0f, -26));

  for (float value : values) {
    const uint16_t half = float_to_half(value);
    const uint16_t bf16 = float_to_bfloat16(value);
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(half_to_float(half)));
      EXPECT_TRUE(std::isnan(bfloat16_to_float(bf16)));
      continue;
    }
    const double expected_half = test::round_to_half(value);
    const double expected_bf16 = test::round_to_bf16(value);
    ASSERT_EQ(static_cast<double>(half_to_float(half)), expected_half) << "value " << value;
    ASSERT_EQ(std::signbit(half_to_float(half)), std::signbit(value)) << "value " << value;
    ASSERT_EQ(static_cast<double>(bfloat16_to_float(bf16)), expected_bf16) << "value " << value;
  }
}

TEST(CpuCommon, ParallelForVisitsEachIndexOnce) {
  for (int64_t n : {0, 1, 2, 7, 1000}) {
    std::vector<std::atomic<int>> visits(static_cast<size_t>(n));
    for (auto& visit : visits) visit = 0;
    cpu::parallel_for(n, [&](int64_t i) { visits[static_cast<size_t>(i)]++; });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(visits[static_cast<size_t>(i)].load(), 1) << i;
  }
}

TEST(CpuCommon, ParallelForRethrowsOnCaller) {
  EXPECT_THROW(cpu::parallel_for(64,
                                 [](int64_t i) {
                                   if (i == 37) throw std::runtime_error("item 37");
                                 }),
               std::runtime_error);
}

TEST(CpuCommon, UnknownDTypeNamesTheValue) {
  try {
    cpu::dispatch_dtype(static_cast<DType>(7), "where", [](auto) {});
    FAIL() << "no exception";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("dtype value 7"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("where"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace aether
