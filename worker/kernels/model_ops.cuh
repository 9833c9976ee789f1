// Kernels of model_ops.h (shapes, layouts and dtypes are documented there). Templated on the
// block size of the row-wise kernels; model_ops.cu holds the one runtime -> template switch and
// the explicit instantiations. CUDA and std headers only.
#ifndef PREHOC_WORKER_KERNELS_MODEL_OPS_CUH_
#define PREHOC_WORKER_KERNELS_MODEL_OPS_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "worker/kernels/model_ops.h"

namespace prehoc::kernels::model_ops {

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

__device__ __forceinline__ uint16_t FloatToBf16Bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Sum over the block; every thread gets the result. REQUIRES: blockDim.x == kThreads, a
// multiple of 32, and every thread calls it.
template <int kThreads>
__device__ __forceinline__ float BlockSum(float v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
  __shared__ float partial[kThreads / 32];
  __shared__ float total;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) total = s;
  }
  __syncthreads();
  return total;
}

// One block per output row.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    EmbeddingKernel(const uint16_t* __restrict__ table, const int32_t* __restrict__ tokens, int d,
                    int vocab, float* __restrict__ x) {
  const int r = blockIdx.x;
  const int t = tokens[r];
  float* xr = x + static_cast<size_t>(r) * d;
  if (t < 0 || t >= vocab) {
    for (int j = threadIdx.x; j < d; j += kThreads) xr[j] = __int_as_float(0x7fc00000);
    return;
  }
  const uint16_t* src = table + static_cast<size_t>(t) * d;
  for (int j = threadIdx.x; j < d; j += kThreads) xr[j] = Bf16BitsToFloat(src[j]);
}

// One block per output row.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    RmsNormKernel(const float* __restrict__ x, const int32_t* __restrict__ rows, int d,
                  const float* __restrict__ w, float eps, uint16_t* __restrict__ y) {
  const int r = blockIdx.x;
  const int src = rows != nullptr ? rows[r] : r;
  const float* xr = x + static_cast<size_t>(src) * d;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < d; j += kThreads) ss += xr[j] * xr[j];
  ss = BlockSum<kThreads>(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  uint16_t* yr = y + static_cast<size_t>(r) * d;
  for (int j = threadIdx.x; j < d; j += kThreads) yr[j] = FloatToBf16Bits(w[j] * (xr[j] * inv));
}

// One block per row: rotates the q and k heads (pairs (i, i + h)), writes q to q_out and k, v to
// the pools.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) RopeAppendKernel(RopeAppendParams p) {
  const int r = blockIdx.x;
  const int hd = p.head_dim, half = hd / 2;
  const int hq = p.num_q_heads, hkv = p.num_kv_heads;
  const int width = (hq + 2 * hkv) * hd;
  const float* row = p.d_qkv + static_cast<size_t>(r) * width;
  const float pos = static_cast<float>(p.d_pos[r]);
  const int slot = p.d_slot[r];
  // Pool offset of (slot, kv head 0): ((page * Hkv + kh) * page_size + slot % page_size) * hd.
  const int64_t page = slot >= 0 ? slot / p.page_size : 0;
  const int in_page = slot >= 0 ? slot % p.page_size : 0;
  auto pool_offset = [&](int kh) {
    return ((page * hkv + kh) * p.page_size + in_page) * static_cast<int64_t>(hd);
  };
  const int rope_pairs = (hq + hkv) * half;
  for (int idx = threadIdx.x; idx < rope_pairs; idx += kThreads) {
    const int head = idx / half;  // q heads first, then k heads
    const int i = idx % half;
    const int c0 = head * hd + i, c1 = c0 + half;
    float a = row[c0], b = row[c1];
    if (p.d_bias != nullptr) {
      a += p.d_bias[c0];
      b += p.d_bias[c1];
    }
    float s, c;
    sincosf(pos * p.d_inv_freq[i], &s, &c);
    const float ra = a * c - b * s;
    const float rb = b * c + a * s;
    if (head < hq) {
      uint16_t* q = p.d_q_out + (static_cast<size_t>(r) * hq + head) * hd;
      q[i] = FloatToBf16Bits(ra);
      q[i + half] = FloatToBf16Bits(rb);
    } else if (slot >= 0) {
      uint16_t* k = p.d_k_pool + pool_offset(head - hq);
      k[i] = FloatToBf16Bits(ra);
      k[i + half] = FloatToBf16Bits(rb);
    }
  }
  if (slot < 0) return;
  const int v_elems = hkv * hd;
  const int v_col0 = (hq + hkv) * hd;
  for (int idx = threadIdx.x; idx < v_elems; idx += kThreads) {
    const int kh = idx / hd, j = idx % hd;
    float v = row[v_col0 + idx];
    if (p.d_bias != nullptr) v += p.d_bias[v_col0 + idx];
    p.d_v_pool[pool_offset(kh) + j] = FloatToBf16Bits(v);
  }
}

// Grid-stride over rows * f.
__global__ void SiluMulKernel(const float* __restrict__ gu, int64_t rows, int f,
                              uint16_t* __restrict__ out) {
  const int64_t n = rows * f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / f;
    const int64_t j = i - r * f;
    const float g = gu[r * 2 * f + j];
    const float u = gu[r * 2 * f + f + j];
    out[i] = FloatToBf16Bits(g / (1.0f + expf(-g)) * u);
  }
}

// Grid-stride over rows * d.
__global__ void AddResidualKernel(float* __restrict__ x, const float* __restrict__ y,
                                  const float* __restrict__ bias, int64_t rows, int d) {
  const int64_t n = rows * d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float add = y != nullptr ? y[i] : 0.0f;
    if (bias != nullptr) add += bias[i % d];
    x[i] += add;
  }
}

// (value, index) pair order for the argmax: larger value wins, then smaller index; index -1 means
// "nothing yet" (value -inf).
__device__ __forceinline__ void ArgMaxCombine(float& v, int& i, float ov, int oi) {
  if (oi < 0) return;
  if (i < 0 || ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// One block per row.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    ArgMaxKernel(const float* __restrict__ logits, int vocab, int32_t* __restrict__ out) {
  const int r = blockIdx.x;
  const float* row = logits + static_cast<size_t>(r) * vocab;
  float best = -INFINITY;
  int best_i = -1;
  for (int j = threadIdx.x; j < vocab; j += kThreads) {
    const float v = row[j];
    if (v > best) {  // strict: the first (smallest) index of this thread's maxima; NaN never wins
      best = v;
      best_i = j;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    ArgMaxCombine(best, best_i, ov, oi);
  }
  __shared__ float sv[kThreads / 32];
  __shared__ int si[kThreads / 32];
  if (threadIdx.x % 32 == 0) {
    sv[threadIdx.x / 32] = best;
    si[threadIdx.x / 32] = best_i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float v = sv[0];
    int i = si[0];
    for (int w = 1; w < kThreads / 32; ++w) ArgMaxCombine(v, i, sv[w], si[w]);
    out[r] = i < 0 ? 0 : i;
  }
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillUniformBf16Kernel(uint16_t* __restrict__ d, size_t n, float amplitude,
                                      uint64_t seed) {
  const uint64_t key = SplitMix64(seed);
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = SplitMix64(key ^ (i * 0xd1b54a32d192ed03ull));
    const float u = static_cast<float>(h >> 40) * 0x1.0p-23f - 1.0f;  // [-1, 1)
    d[i] = FloatToBf16Bits(amplitude * u);
  }
}

__global__ void FillF32Kernel(float* __restrict__ d, size_t n, float value) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    d[i] = value;
  }
}

// Blocks stride over the pages, threads over a page's elements in units of T (uint4: 8 bf16, or
// uint16_t: 1); page_units = page elements / (sizeof(T) / 2).
template <typename T>
__global__ void CopyPagesKernel(const T* __restrict__ src, T* __restrict__ dst,
                                const int32_t* __restrict__ pages, int n_pages,
                                int64_t page_units) {
  for (int i = blockIdx.x; i < n_pages; i += gridDim.x) {
    const int64_t base = static_cast<int64_t>(pages[i]) * page_units;
    for (int64_t j = threadIdx.x; j < page_units; j += blockDim.x) dst[base + j] = src[base + j];
  }
}

}  // namespace prehoc::kernels::model_ops

#endif  // PREHOC_WORKER_KERNELS_MODEL_OPS_CUH_
