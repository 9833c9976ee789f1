// Host side of sampling.h: checks and the one instantiation (1024 threads per row).
#include <cstdint>

#include "worker/kernels/sampling.cuh"

namespace prehoc::kernels {
namespace sampling {
constexpr int kThreads = 1024;
template __global__ void SampleRowsKernel<kThreads>(SampleRowsParams);
}  // namespace sampling

const char* SampleRowsCheck(const SampleRowsParams& p) {
  if (p.rows < 0) return "rows must be >= 0";
  if (p.vocab < 1 || p.vocab > kMaxSamplingVocab) return "vocab must be in [1, 2^19]";
  if (p.row_stride != 0 && p.row_stride < p.vocab) return "row_stride must be 0 or >= vocab";
  if (p.rows > 0 && (p.d_logits == nullptr || p.d_row_params == nullptr || p.d_out == nullptr)) {
    return "d_logits, d_row_params and d_out are required";
  }
  return nullptr;
}

cudaError_t SampleRows(const SampleRowsParams& p, cudaStream_t stream) {
  if (SampleRowsCheck(p) != nullptr) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  sampling::SampleRowsKernel<sampling::kThreads><<<p.rows, sampling::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace prehoc::kernels
