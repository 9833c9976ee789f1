// Header-only helpers of the benchmark binaries: abort on a CUDA error, and time launches with
// CUDA events.
#ifndef PREHOC_BENCH_BENCH_UTIL_H_
#define PREHOC_BENCH_BENCH_UTIL_H_

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

// Prints the failing expression and the CUDA error, and exits with status 1.
#define PREHOC_BENCH_CHECK_CUDA(expr)                                                 \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr,               \
                   cudaGetErrorString(e_));                                           \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

namespace prehoc::bench {

// Milliseconds per call of `launch` (which enqueues work on the default stream): one warm-up
// call, then `reps` calls between two events. Exits on a CUDA error.
template <typename F>
double TimeLaunchesMs(int reps, F&& launch) {
  launch();
  PREHOC_BENCH_CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  PREHOC_BENCH_CHECK_CUDA(cudaEventCreate(&a));
  PREHOC_BENCH_CHECK_CUDA(cudaEventCreate(&b));
  PREHOC_BENCH_CHECK_CUDA(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) launch();
  PREHOC_BENCH_CHECK_CUDA(cudaEventRecord(b));
  PREHOC_BENCH_CHECK_CUDA(cudaEventSynchronize(b));
  float ms = 0;
  PREHOC_BENCH_CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
  PREHOC_BENCH_CHECK_CUDA(cudaEventDestroy(a));
  PREHOC_BENCH_CHECK_CUDA(cudaEventDestroy(b));
  return ms / reps;
}

}  // namespace prehoc::bench

#endif  // PREHOC_BENCH_BENCH_UTIL_H_
