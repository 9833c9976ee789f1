// Device building blocks shared by several kernels: block-wide sum and exclusive scan, the count of
// non-zero bytes in a word (keep-mask compaction), and a launcher with programmatic dependent
// launch. Users: index_lists.cuh (mask -> CSR), paged_decode.cuh (fused mask compaction, split
// reduction), selection_prhs.cuh. Inline functions and templates only, so any number of .cu files
// may include it.
#ifndef PREHOC_WORKER_KERNELS_BLOCK_PRIMITIVES_CUH_
#define PREHOC_WORKER_KERNELS_BLOCK_PRIMITIVES_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace prehoc::kernels::block {

// Number of non-zero bytes in a 32-bit word.
__device__ __forceinline__ int NonZeroBytes(uint32_t x) {
  x |= x >> 4;
  x |= x >> 2;
  x |= x >> 1;
  return __popc(x & 0x01010101u);
}
__device__ __forceinline__ int NonZeroBytes(uint4 v) {
  return NonZeroBytes(v.x) + NonZeroBytes(v.y) + NonZeroBytes(v.z) + NonZeroBytes(v.w);
}

// Block-wide sum over kN threads (a multiple of 32, <= 1024); every thread gets the total.
// `scratch` holds kN / 32 values.
template <int kN, typename V>
__device__ __forceinline__ V BlockSum(V v, V* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  V total = 0;
#pragma unroll
  for (int w = 0; w < kN / 32; ++w) total += scratch[w];
  return total;
}

// Block-wide exclusive scan over kN threads in index order; returns the thread's exclusive prefix
// and sets *total. `scratch` holds kN / 32 ints.
template <int kN>
__device__ __forceinline__ int BlockExclusiveScan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % 32;
  int inc = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) scratch[threadIdx.x / 32] = inc;
  __syncthreads();
  int warp_base = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kN / 32; ++w) {
    const int s = scratch[w];
    if (w < static_cast<int>(threadIdx.x / 32)) warp_base += s;
    sum += s;
  }
  *total = sum;
  return warp_base + inc - v;
}

// Launches `kernel` with programmatic stream serialization: its CTAs may be scheduled once the
// previous kernel in the stream has triggered (griddepcontrol.launch_dependents) or exited, so the
// kernel must execute griddepcontrol.wait before reading anything that kernel (or an earlier one)
// wrote.
template <typename... KArgs, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

}  // namespace prehoc::kernels::block

#endif  // PREHOC_WORKER_KERNELS_BLOCK_PRIMITIVES_CUH_
