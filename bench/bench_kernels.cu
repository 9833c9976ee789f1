#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bench/bench_kernels.h"
#include "worker/kernels/block_primitives.cuh"

namespace prehoc::bench {
namespace {

__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

__global__ void FillKernel(uint16_t* data, size_t n, uint64_t seed, bool bf16) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(Mix(seed * 0x9e3779b97f4a7c15ULL + i) >> 40) *
                        (2.0f / 16777216.0f) -
                    1.0f;
    if (bf16) {
      const __nv_bfloat16 b = __float2bfloat16_rn(u);
      data[i] = *reinterpret_cast<const uint16_t*>(&b);
    } else {
      const __half h = __float2half_rn(u);
      data[i] = *reinterpret_cast<const uint16_t*>(&h);
    }
  }
}

__global__ void MaskKernel(uint8_t* mask, int rows, int stride, int len, int stratum,
                           int strata, uint64_t seed) {
  const int64_t total = static_cast<int64_t>(rows) * strata;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / strata);
    const int s = static_cast<int>(i % strata);
    const int begin = s * stratum;
    const int width = min(stratum, len - begin);
    const int item = begin + static_cast<int>(Mix(seed ^ (static_cast<uint64_t>(i) << 20)) % width);
    mask[static_cast<size_t>(r) * stride + item] = 1;
  }
}

__global__ void BernoulliKernel(uint8_t* mask, int rows, int stride, int len, int keep,
                                uint64_t seed) {
  const int64_t total = static_cast<int64_t>(rows) * stride;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int item = static_cast<int>(i % stride);
    mask[i] = item < len && Mix(seed * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(i)) % keep == 0;
  }
}

__global__ void SpinKernel(uint64_t ns) {
  uint64_t start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  uint64_t now = start;
  while (now - start < ns) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
}

__global__ void EmptyKernel() {}

__global__ void EmptyPdlKernel() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

}  // namespace

cudaError_t EmptyLaunches(int n, cudaStream_t stream) {
  for (int i = 0; i < n; ++i) {
    cudaError_t err = i == 0 ? (EmptyKernel<<<1, 32, 0, stream>>>(), cudaGetLastError())
                             : kernels::block::LaunchPdl(EmptyPdlKernel, dim3(1), dim3(32), 0,
                                                         stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t FillUniform16(uint16_t* d_data, size_t n, uint64_t seed, bool bf16,
                          cudaStream_t stream) {
  FillKernel<<<4096, 256, 0, stream>>>(d_data, n, seed, bf16);
  return cudaGetLastError();
}

cudaError_t MakeStratifiedMask(uint8_t* d_mask, int rows, int stride, int len, int stratum,
                               uint64_t seed, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(d_mask, 0, static_cast<size_t>(rows) * stride, stream);
  if (err != cudaSuccess || len <= 0) return err;
  const int strata = (len + stratum - 1) / stratum;
  MaskKernel<<<2048, 256, 0, stream>>>(d_mask, rows, stride, len, stratum, strata, seed);
  return cudaGetLastError();
}

cudaError_t MakeBernoulliMask(uint8_t* d_mask, int rows, int stride, int len, int keep,
                              uint64_t seed, cudaStream_t stream) {
  BernoulliKernel<<<4096, 256, 0, stream>>>(d_mask, rows, stride, len, keep, seed);
  return cudaGetLastError();
}

cudaError_t Spin(uint64_t ns, cudaStream_t stream) {
  SpinKernel<<<1, 1, 0, stream>>>(ns);
  return cudaGetLastError();
}

}  // namespace prehoc::bench
