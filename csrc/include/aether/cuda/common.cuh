// Device helpers shared by the AETHER CUDA kernels: element types, vector loads, warp and block
// reductions, order-preserving integer keys for floating-point priorities, and a few host helpers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <utility>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "aether/params.h"

namespace aether {
namespace cuda {

// Return the first CUDA error of an expression from the enclosing launcher.
#define AETHER_CUDA_TRY(expr)            \
  do {                                   \
    const cudaError_t aether_err_ = (expr); \
    if (aether_err_ != cudaSuccess) return aether_err_; \
  } while (0)

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Host helpers.

// An attribute of the current device; used for grid sizing (SM count) and the shared-memory
// opt-in limit. Cheap, no synchronisation, legal during stream capture.
inline cudaError_t current_device_attribute(cudaDeviceAttr attr, int* value) {
  int device = 0;
  AETHER_CUDA_TRY(cudaGetDevice(&device));
  return cudaDeviceGetAttribute(value, attr, device);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lets `kernel` launch with `dynamic_bytes` of dynamic shared memory. The default limit (48 KiB)
// counts the kernel's static shared memory too, so a dynamic size a little under 48 KiB fails to
// launch ("invalid argument") unless the kernel opts in; past the device's opt-in limit this
// returns cudaErrorInvalidValue (the launchers' "G too large").
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t dynamic_bytes) {
  cudaFuncAttributes attributes{};
  AETHER_CUDA_TRY(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)));
  const size_t total = dynamic_bytes + attributes.sharedSizeBytes;
  if (total <= 48 * 1024) return cudaSuccess;
  int optin = 0;
  AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &optin));
  if (total > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(dynamic_bytes));
}

// grid.y of the per-block build kernels (block_stats, key_sketch), whose CTAs stride over the
// blocks of one (b, kv_head): a full build gives every block its own CTA; an append (first_block
// set) refreshes one or two blocks per head, so it only needs enough CTAs to fill the GPU once
// (the others exit at once). Capped by the grid.y limit.
inline cudaError_t block_build_slices(int num_blocks, int64_t heads, bool append, int64_t* slices) {
  *slices = num_blocks;
  if (append) {
    int num_sms = 0;
    AETHER_CUDA_TRY(current_device_attribute(cudaDevAttrMultiProcessorCount, &num_sms));
    *slices = std::min<int64_t>(*slices, std::max<int64_t>(1, ceil_div(4 * num_sms, heads)));
  }
  *slices = std::min<int64_t>(*slices, 65535);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (Hopper). A decode step is a chain of small kernels (append,
// score, select, refine, decode, merge), one or two waves each; between two of them the GPU idles
// for the next kernel's launch. Launched with the programmatic-serialisation attribute
// (launch_kernel below), a kernel may be launched before the previous kernel in the stream has
// completed: every AETHER kernel first calls pdl_begin(), which waits until the previous kernel
// has completed and its writes are visible (griddepcontrol.wait; at once for a normal launch).
// Triggered at the start of every CTA (griddepcontrol.launch_dependents), the two-stage step went
// from 195 to 211 us (H200; likely cause, not measured separately: the next kernel's waiting CTAs
// took SM room, so the grids sized to one wave of resident CTAs ran in two). Without a trigger a
// kernel's dependents launch as its last CTAs exit. A few kernels call pdl_trigger() once their
// main loop is done, before a short epilogue (sparse_decode before its combine and writes, the
// selection before its write-out, code_channels before its ranking), so that the next kernel's
// launch overlaps that epilogue; by then every CTA of the grid is resident, so the waiting CTAs
// take only room that no CTA of this grid needs. The dependent still waits in pdl_begin() for
// this grid's completion and writes.
// Before sm_90 there is no programmatic launch: both are no-ops there.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// AETHER_PDL=0 launches every kernel without the attribute (for comparisons; default on).
inline bool pdl_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("AETHER_PDL");
    return env == nullptr || env[0] != '0';
  }();
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialisation (see above)
// and, when cluster_ctas > 0, thread-block clusters of cluster_ctas CTAs along x.
template <typename... Params, typename... Args>
cudaError_t launch_kernel_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, int cluster_ctas, Args&&... args) {
  cudaLaunchAttribute attribute[2];
  unsigned count = 0;
  if (pdl_enabled()) {
    attribute[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  if (cluster_ctas > 0) {
    attribute[count].id = cudaLaunchAttributeClusterDimension;
    attribute[count].val.clusterDim.x = static_cast<unsigned>(cluster_ctas);
    attribute[count].val.clusterDim.y = 1;
    attribute[count].val.clusterDim.z = 1;
    ++count;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = count;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialisation (see above).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  return launch_kernel_clustered(kernel, grid, block, smem, stream, 0, std::forward<Args>(args)...);
}

// ---------------------------------------------------------------------------------------------
// Element conversions.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads 8 consecutive elements (16 bytes for 16-bit types, 32 for float) as float. `ptr` must be
// 16-byte aligned: head_dim is a multiple of 8 and rows start at multiples of 8 elements.
__device__ __forceinline__ void load8_as_float(const float* ptr, float (&out)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(ptr));
  const float4 b = __ldg(reinterpret_cast<const float4*>(ptr) + 1);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void load8_as_float(const T* ptr, float (&out)[8]) {
  static_assert(sizeof(T) == 2, "16-bit element type expected");
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(elems[i]);
}

// Stages rows 0 .. n_rows - 1 (chunks 16-byte vectors of 8 elements each) into shared memory as
// float32, row r at s + r * row_floats. Each thread issues the loads of kBatch vectors before it
// stores any: a loop that loads one vector and stores it waits a full memory latency per vector
// (the sketch and code appends staged 8 vectors per thread that way, 8 latencies in a chain).
// row_of(r) returns row r's first element (it may itself load, e.g. a page table entry).
template <int kThreads, int kBatch, typename RowFn>
__device__ __forceinline__ void stage_rows_as_float(float* s, int row_floats, int n_rows, int chunks, RowFn row_of) {
  const int total = n_rows * chunks;
  for (int base = threadIdx.x; base < total; base += kThreads * kBatch) {
    float x[kBatch][8];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = base + j * kThreads;
      if (i < total) load8_as_float(row_of(i / chunks) + (i % chunks) * 8, x[j]);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = base + j * kThreads;
      if (i < total) {
        float* dst = s + (i / chunks) * row_floats + (i % chunks) * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = x[j][e];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fast base-2 exponential and logarithm (one MUFU instruction each). exp2f and log2f without
// fast-math handle subnormal arguments and results in extra instructions (4 per exp2f, ~25 per
// log2f in SASS). Where the terms are shifted by their maximum (log-sum-exp), a term below 2^-126
// of the largest one does not change the sum, so flushing it to 0 is harmless.
// Relative error about 2^-22 (ex2) and absolute error about 2^-22 (lg2), within the tests'
// tolerances.

__device__ __forceinline__ float fast_exp2(float x) {  // MUFU.EX2; 2^x < 2^-126 flushes to 0; 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_log2(float x) {  // MUFU.LG2; log2(0) = -inf
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// Warp reductions.

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// Sums N values per lane over the 32 lanes of a warp with N - 1 + (5 - log2 N) shuffles (a
// reduce-scatter: each exchange halves the number of values a lane carries) instead of 5 N.
// On return v[0] of lane l holds the warp total of value index l / (32 / N).
template <int N, typename T, int kOffset = 16>
__device__ __forceinline__ void warp_reduce_scatter(T (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of two <= 32");
  if constexpr (N > 1) {
    // Halve: keep N / 2 values, recurse on them with the next offset.
    const bool upper = (lane & kOffset) != 0;
    T half[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const T send = upper ? v[i] : v[i + N / 2];
      const T keep = upper ? v[i + N / 2] : v[i];
      half[i] = keep + __shfl_xor_sync(kFullMask, send, kOffset);
    }
    warp_reduce_scatter<N / 2, T, kOffset / 2>(half, lane);
    v[0] = half[0];
  } else {
#pragma unroll
    for (int offset = kOffset; offset > 0; offset >>= 1) {
      v[0] += __shfl_xor_sync(kFullMask, v[0], offset);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Block reductions. `scratch` must hold one T per warp; every thread of the block must call,
// the result is returned to every thread. The order of the additions is fixed, so the result is
// deterministic.

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T x, T* scratch, Op op) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(kFullMask, x, offset));
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = scratch[0];
  for (int w = 1; w < num_warps; ++w) total = op(total, scratch[w]);
  return total;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// ---------------------------------------------------------------------------------------------
// Order-preserving keys: a > b (as numbers) exactly when key(a) > key(b) (as unsigned integers).
// -0 is folded into +0 first so that equal numbers get equal keys (ties are then broken by the
// block index, as the selection rules require).

__device__ __forceinline__ uint32_t ordered_key(float x) {
  const uint32_t bits = __float_as_uint(x + 0.0f);  // -0 + 0 = +0 under round-to-nearest
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ uint64_t ordered_key(double x) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x + 0.0));
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}

}  // namespace cuda
}  // namespace aether
