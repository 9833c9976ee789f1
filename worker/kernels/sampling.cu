// Host side of sampling.h: checks and the instantiations: the shipped variant (512 threads per
// row, an 8-entry register cache per thread in front of the shared histograms) and the direct
// variant it is compared with (1024 threads, shared atomics per run of equal digits).
#include <cstdint>

#include "worker/kernels/sampling.cuh"

namespace prehoc::kernels {
namespace sampling {
template __global__ void SampleRowsKernel<512, 8>(SampleRowsParams);
template __global__ void SampleRowsKernel<1024, 0>(SampleRowsParams);
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
  if (p.direct_histogram) {
    sampling::SampleRowsKernel<1024, 0><<<p.rows, 1024, 0, stream>>>(p);
  } else {
    sampling::SampleRowsKernel<512, 8><<<p.rows, 512, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace prehoc::kernels
