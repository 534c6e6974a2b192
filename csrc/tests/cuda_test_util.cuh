// Shared helpers of the CUDA GoogleTests: status assertion, device detection, and an owning
// device buffer that copies to and from host memory.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstddef>

namespace aether {
namespace test {

#define ASSERT_CUDA(expr)                                                               \
  do {                                                                                  \
    const cudaError_t status_ = (expr);                                                 \
    ASSERT_EQ(status_, cudaSuccess) << #expr << ": " << cudaGetErrorString(status_);    \
  } while (0)

inline bool has_cuda_device() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// Device memory of `size` bytes (optionally initialised from host), freed on scope exit.
struct DeviceBytes {
  void* ptr = nullptr;
  size_t size = 0;
  explicit DeviceBytes(size_t bytes) : size(bytes) {
    if (cudaMalloc(&ptr, bytes == 0 ? 1 : bytes) != cudaSuccess) ptr = nullptr;
  }
  DeviceBytes(const void* host, size_t bytes) : DeviceBytes(bytes) {
    if (ptr != nullptr && host != nullptr && bytes > 0) cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice);
  }
  ~DeviceBytes() { cudaFree(ptr); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr); }
  void download(void* host) const { cudaMemcpy(host, ptr, size, cudaMemcpyDeviceToHost); }
  void upload(const void* host) const { cudaMemcpy(ptr, host, size, cudaMemcpyHostToDevice); }
};

}  // namespace test
}  // namespace aether
