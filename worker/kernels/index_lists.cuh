// Keep-mask -> CSR index-list compaction (the sparse decode kernel's input). Contract in
// paged_decode.h (BuildIndexListsFromMask).
//   mask    [num_rows][stride] uint8, read as 16-byte vectors (stride % 16 == 0)
//   counts  [num_rows] int32       (CountKernel output)
//   indptr  [num_rows + 1] int32   (CompactKernel output)
//   indices [indptr[num_rows]] int32, ascending within a row
// One CTA of kThreads per row in both kernels. CompactKernel finds its row's offset by summing
// counts[0, row) itself (num_rows is at most a few thousand), so no separate scan launch is needed.
#ifndef PREHOC_WORKER_KERNELS_INDEX_LISTS_CUH_
#define PREHOC_WORKER_KERNELS_INDEX_LISTS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "worker/kernels/block_primitives.cuh"

namespace prehoc::kernels::index_lists {

using block::BlockExclusiveScan;
using block::BlockSum;
using block::NonZeroBytes;

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    CountKernel(const uint8_t* __restrict__ mask, int stride, int32_t* __restrict__ counts) {
  // The compact kernel (launched with programmatic dependent launch) may start loading its mask
  // now; it waits for this grid's counts before using them.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  __shared__ int scratch[kThreads / 32];
  const uint4* row = reinterpret_cast<const uint4*>(mask + static_cast<size_t>(blockIdx.x) * stride);
  const int n16 = stride / 16;
  int c = 0;
#pragma unroll 8
  for (int i = threadIdx.x; i < n16; i += kThreads) c += NonZeroBytes(__ldg(row + i));
  c = BlockSum<kThreads>(c, scratch);
  if (threadIdx.x == 0) counts[blockIdx.x] = c;
}

__global__ void __launch_bounds__(kThreads)
    CompactKernel(const uint8_t* __restrict__ mask, int stride, const int32_t* __restrict__ counts,
                  int32_t* __restrict__ indptr, int32_t* __restrict__ indices) {
  __shared__ int scratch[kThreads / 32];
  const int r = blockIdx.x;
  const uint4* row = reinterpret_cast<const uint4*>(mask + static_cast<size_t>(r) * stride);
  const int n16 = stride / 16;
  // Each step covers kThreads * kVecs vectors; thread t owns vectors [(step_base + t) * kVecs, +kVecs)
  // (contiguous, so its output indices are ascending and follow those of threads < t). The next
  // step's vectors are loaded before this step's scan.
  constexpr int kVecs = 4;
  auto load = [&](int step_base, uint4 (&v)[kVecs]) {
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int i = (step_base + static_cast<int>(threadIdx.x)) * kVecs + k;
      v[k] = i < n16 ? __ldg(row + i) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  uint4 cur[kVecs], next[kVecs];
  load(0, cur);  // the mask is not written by the count kernel: load it before waiting
  // Launched with programmatic dependent launch: the counts (and, transitively, whatever the
  // kernels before them wrote) are visible only after this wait.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  int base = 0;
  for (int i = threadIdx.x; i < r; i += kThreads) base += counts[i];
  base = BlockSum<kThreads>(base, scratch);
  if (threadIdx.x == 0) {
    if (r == 0) indptr[0] = 0;
    indptr[r + 1] = base + counts[r];
  }
  int running = base;
  for (int step_base = 0; step_base * kVecs < n16; step_base += kThreads) {
    load(step_base + kThreads, next);
    int c = 0;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) c += NonZeroBytes(cur[k]);
    int total;
    int pos = running + BlockExclusiveScan<kThreads>(c, scratch, &total);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int i0 = ((step_base + static_cast<int>(threadIdx.x)) * kVecs + k) * 16;
      const uint32_t words[4] = {cur[k].x, cur[k].y, cur[k].z, cur[k].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        if (words[w] == 0u) continue;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          if ((words[w] >> (8 * b)) & 0xffu) indices[pos++] = i0 + w * 4 + b;
        }
      }
    }
    running += total;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) cur[k] = next[k];
  }
}

}  // namespace prehoc::kernels::index_lists

#endif  // PREHOC_WORKER_KERNELS_INDEX_LISTS_CUH_
