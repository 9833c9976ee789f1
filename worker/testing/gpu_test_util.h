// Test-only helpers shared by the GPU tests (label gpu) of worker/kernels/ and
// worker/backends/cuda/: the device check behind their skip, a CUDA_OK assertion and plain
// upload/download of host vectors. Header-only; included only by tests that CMake builds with
// PREHOC_ENABLE_CUDA (they link the CUDA runtime), so CPU-only builds never compile it.
#ifndef PREHOC_WORKER_TESTING_GPU_TEST_UTIL_H_
#define PREHOC_WORKER_TESTING_GPU_TEST_UTIL_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "gtest/gtest.h"

namespace prehoc {

// True when a CUDA device is present. Clears the error a failed query leaves behind (and any
// earlier non-sticky one), so the next CUDA call of a test does not report it.
inline bool HaveCudaDevice() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}

// Device copy of `h` (at least one element allocated, so an empty vector gives a valid pointer);
// free with cudaFree.
template <typename T>
T* Upload(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(h.size(), 1) * sizeof(T)),
            cudaSuccess);
  if (!h.empty()) {
    EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  return d;
}

// The first `n` elements at device pointer `d`.
template <typename T>
std::vector<T> Download(const T* d, size_t n) {
  std::vector<T> h(n);
  if (n > 0) {
    EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  return h;
}

}  // namespace prehoc

// Skips the current test when no CUDA device is present.
#define SKIP_WITHOUT_DEVICE() \
  if (!::prehoc::HaveCudaDevice()) GTEST_SKIP() << "no CUDA device"

// Asserts that a CUDA call returns cudaSuccess (evaluates `expr` once).
#define CUDA_OK(expr)                                                      \
  do {                                                                     \
    const cudaError_t cuda_ok_err_ = (expr);                               \
    ASSERT_EQ(cuda_ok_err_, cudaSuccess) << #expr << ": "                  \
                                         << cudaGetErrorString(cuda_ok_err_); \
  } while (0)

#endif  // PREHOC_WORKER_TESTING_GPU_TEST_UTIL_H_
