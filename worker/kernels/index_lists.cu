// Host launcher for keep-mask -> CSR compaction (index_lists.cuh).
#include <cstdint>

#include "worker/kernels/index_lists.cuh"
#include "worker/kernels/paged_decode.h"

namespace prehoc::kernels {

cudaError_t BuildIndexListsFromMask(const uint8_t* d_mask, int num_rows, int mask_stride,
                                    int32_t* d_counts, int32_t* d_indptr, int32_t* d_indices,
                                    cudaStream_t stream) {
  if (num_rows < 0 || mask_stride < 0 || mask_stride % 16 != 0 ||
      reinterpret_cast<uintptr_t>(d_mask) % 16 != 0 ||
      static_cast<int64_t>(num_rows) * mask_stride >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  if (num_rows == 0) return cudaMemsetAsync(d_indptr, 0, sizeof(int32_t), stream);
  index_lists::CountKernel<<<num_rows, index_lists::kThreads, 0, stream>>>(d_mask, mask_stride,
                                                                          d_counts);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // Programmatic dependent launch: the compact kernel loads its mask while the counts finish.
  return block::LaunchPdl(index_lists::CompactKernel, dim3(num_rows), dim3(index_lists::kThreads),
                          0, stream, d_mask, mask_stride, static_cast<const int32_t*>(d_counts),
                          d_indptr, d_indices);
}

}  // namespace prehoc::kernels
