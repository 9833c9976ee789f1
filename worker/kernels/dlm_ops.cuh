// Kernels of dlm_ops.h (shapes, layouts and dtypes are documented there); launched from
// dlm_ops.cu, which is the only file including this one. CUDA and std headers only.
#ifndef PREHOC_WORKER_KERNELS_DLM_OPS_CUH_
#define PREHOC_WORKER_KERNELS_DLM_OPS_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "worker/kernels/dlm_ops.h"

namespace prehoc::kernels::dlm_ops {

constexpr int kThreads = 256;

__device__ __forceinline__ float Bf16ToF(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}
__device__ __forceinline__ uint16_t FToBf16(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// Block-wide reduction (sum or max); every thread gets the result. REQUIRES: blockDim.x ==
// kThreads and every thread calls it.
template <bool kMax>
__device__ __forceinline__ float BlockReduce(float v) {
  __shared__ float partial[kThreads / 32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  __syncthreads();  // `partial` may still be read by a previous call
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : (kMax ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
      const float w = __shfl_xor_sync(0xffffffffu, s, o);
      s = kMax ? fmaxf(s, w) : s + w;
    }
    if (threadIdx.x == 0) total = s;
  }
  __syncthreads();
  return total;
}

// One block per row j.
__global__ void __launch_bounds__(kThreads) KvScatterKernel(DlmKvScatterParams p) {
  const int j = blockIdx.x;
  const int i = p.d_sel != nullptr ? p.d_sel[j] : j;
  const int row = p.d_live_row[i];
  const DlmCacheView c = p.d_caches[p.d_live_req[i]];
  const int hd = p.head_dim, half = hd / 2;
  const float* src = p.d_src + static_cast<size_t>(j) * p.src_ld;
  auto dst = [&](uint16_t* base, int kh) {
    return base + ((static_cast<size_t>(p.layer) * p.kv_heads + kh) * c.rows + row) * hd;
  };
  if (p.k_col >= 0) {
    const float pos = static_cast<float>(row);
    for (int idx = threadIdx.x; idx < p.kv_heads * half; idx += kThreads) {
      const int kh = idx / half, e = idx % half;
      const int c0 = kh * hd + e, c1 = c0 + half;
      float a = src[p.k_col + c0], b = src[p.k_col + c1];
      if (p.d_bias_k != nullptr) {
        a += p.d_bias_k[c0];
        b += p.d_bias_k[c1];
      }
      float s, co;
      sincosf(pos * p.d_inv_freq[e], &s, &co);
      uint16_t* k = dst(c.k, kh);
      k[e] = FToBf16(a * co - b * s);
      k[e + half] = FToBf16(b * co + a * s);
    }
  }
  if (p.v_col >= 0) {
    for (int idx = threadIdx.x; idx < p.kv_heads * hd; idx += kThreads) {
      float v = src[p.v_col + idx];
      if (p.d_bias_v != nullptr) v += p.d_bias_v[idx];
      dst(c.v, idx / hd)[idx % hd] = FToBf16(v);
    }
  }
}

// One block per row j.
__global__ void __launch_bounds__(kThreads)
    RopeQKernel(const float* __restrict__ src, int src_ld, const float* __restrict__ bias,
                const int32_t* __restrict__ sel, const int32_t* __restrict__ live_row, int heads,
                int hd, const float* __restrict__ inv_freq, uint16_t* __restrict__ out) {
  const int j = blockIdx.x;
  const int i = sel != nullptr ? sel[j] : j;
  const float pos = static_cast<float>(live_row[i]);
  const int half = hd / 2, width = heads * hd;
  const float* s_row = src + static_cast<size_t>(j) * src_ld;
  uint16_t* o = out + static_cast<size_t>(j) * width;
  for (int idx = threadIdx.x; idx < heads * half; idx += kThreads) {
    const int h = idx / half, e = idx % half;
    const int c0 = h * hd + e, c1 = c0 + half;
    float a = s_row[c0], b = s_row[c1];
    if (bias != nullptr) {
      a += bias[c0];
      b += bias[c1];
    }
    float s, co;
    sincosf(pos * inv_freq[e], &s, &co);
    o[c0] = FToBf16(a * co - b * s);
    o[c1] = FToBf16(b * co + a * s);
  }
}

// One warp per live row; 4 warps per block.
__global__ void __launch_bounds__(128) CosineStoreKernel(DlmCosineParams p) {
  const int i = blockIdx.x * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= p.n) return;
  const int row = p.d_live_row[i];
  const DlmCacheView c = p.d_caches[p.d_live_req[i]];
  const float* src = p.d_src + static_cast<size_t>(i) * p.width;
  const bool proxy = p.target == DlmCosineTarget::kProxy;
  float* pold = proxy ? c.proxy + (static_cast<size_t>(p.layer) * c.rows + row) * p.width
                      : nullptr;
  // Value cache: head-major [layer][kh][rows][hd]; element e of the row is (e / hd, e % hd).
  const int kv_heads = proxy ? 1 : p.width / p.head_dim;
  auto vptr = [&](int e) {
    return c.v + ((static_cast<size_t>(p.layer) * kv_heads + e / p.head_dim) * c.rows + row) *
                     p.head_dim +
           e % p.head_dim;
  };
  float ab = 0, aa = 0, bb = 0;
  for (int e = lane; e < p.width; e += 32) {
    float a = src[e];
    if (p.d_bias != nullptr) a += p.d_bias[e];
    const float b = proxy ? pold[e] : Bf16ToF(*vptr(e));
    ab += a * b;
    aa += a * a;
    bb += b * b;
  }
  for (int o = 16; o > 0; o >>= 1) {
    ab += __shfl_xor_sync(0xffffffffu, ab, o);
    aa += __shfl_xor_sync(0xffffffffu, aa, o);
    bb += __shfl_xor_sync(0xffffffffu, bb, o);
  }
  if (lane == 0 && p.d_cos_out != nullptr) {
    p.d_cos_out[i] = ab / fmaxf(sqrtf(aa) * sqrtf(bb), 1e-8f);
  }
  if (proxy && (row < c.proxy_lo || row >= c.proxy_hi)) return;
  for (int e = lane; e < p.width; e += 32) {
    float a = src[e];
    if (p.d_bias != nullptr) a += p.d_bias[e];
    if (proxy) {
      pold[e] = a;
    } else {
      *vptr(e) = FToBf16(a);
    }
  }
}

// One block per request: rank by counting (O(len²) / threads), then a chunked block scan.
__global__ void __launch_bounds__(kThreads)
    SelectSmallestKernel(const float* __restrict__ cos, const int32_t* __restrict__ seg_begin,
                         const int32_t* __restrict__ seg_len, const int32_t* __restrict__ kk,
                         const int32_t* __restrict__ out_off, int32_t* __restrict__ sel,
                         int32_t* __restrict__ inv) {
  __shared__ float val[kDlmSelectMaxRows];
  __shared__ unsigned char flag[kDlmSelectMaxRows];
  __shared__ int counts[kThreads];
  const int b = blockIdx.x;
  const int begin = seg_begin[b], len = seg_len[b], k = kk[b];
  for (int i = threadIdx.x; i < len; i += kThreads) val[i] = cos[begin + i];
  __syncthreads();
  for (int i = threadIdx.x; i < len; i += kThreads) {
    const float ci = val[i];
    int rank = 0;
    for (int j = 0; j < len; ++j) {
      const float cj = val[j];
      rank += (cj < ci) || (cj == ci && j < i);
    }
    flag[i] = rank < k;
  }
  __syncthreads();
  // Each thread owns a contiguous chunk; exclusive scan of the chunk counts by thread 0.
  const int chunk = (len + kThreads - 1) / kThreads;
  const int lo = min(len, static_cast<int>(threadIdx.x) * chunk), hi = min(len, lo + chunk);
  int cnt = 0;
  for (int i = lo; i < hi; ++i) cnt += flag[i];
  counts[threadIdx.x] = cnt;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int t = 0; t < kThreads; ++t) {
      const int c = counts[t];
      counts[t] = run;
      run += c;
    }
  }
  __syncthreads();
  int pos = out_off[b] + counts[threadIdx.x];
  for (int i = lo; i < hi; ++i) {
    if (flag[i]) {
      sel[pos] = begin + i;
      inv[begin + i] = pos;
      ++pos;
    } else {
      inv[begin + i] = -1;
    }
  }
}

// One block per row.
__global__ void __launch_bounds__(kThreads)
    SoftmaxKernel(const float* __restrict__ s, int cols, uint16_t* __restrict__ p) {
  const float* row = s + static_cast<size_t>(blockIdx.x) * cols;
  uint16_t* out = p + static_cast<size_t>(blockIdx.x) * cols;
  float mx = -INFINITY;
  for (int t = threadIdx.x; t < cols; t += kThreads) mx = fmaxf(mx, row[t]);
  mx = BlockReduce<true>(mx);
  float sum = 0;
  for (int t = threadIdx.x; t < cols; t += kThreads) sum += expf(row[t] - mx);
  sum = BlockReduce<false>(sum);
  const float inv = 1.0f / sum;
  for (int t = threadIdx.x; t < cols; t += kThreads) out[t] = FToBf16(expf(row[t] - mx) * inv);
}

// One block per row j.
__global__ void __launch_bounds__(kThreads)
    AddRmsNormKernel(const float* __restrict__ x, const int32_t* __restrict__ sel,
                     float* __restrict__ a, const float* __restrict__ bo, int d,
                     const float* __restrict__ w, float eps, uint16_t* __restrict__ out) {
  const int j = blockIdx.x;
  const int i = sel != nullptr ? sel[j] : j;
  const float* xr = x + static_cast<size_t>(i) * d;
  float* ar = a + static_cast<size_t>(j) * d;
  float ss = 0;
  for (int e = threadIdx.x; e < d; e += kThreads) {
    float av = ar[e];
    if (bo != nullptr) {
      av += bo[e];
      ar[e] = av;
    }
    const float xm = xr[e] + av;
    ss += xm * xm;
  }
  ss = BlockReduce<false>(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  uint16_t* o = out + static_cast<size_t>(j) * d;
  for (int e = threadIdx.x; e < d; e += kThreads) o[e] = FToBf16(w[e] * ((xr[e] + ar[e]) * inv));
}

// One block per live row i. With w (DlmResidualRmsNorm): then the RMSNorm of the updated row
// into out (each thread re-reads only the elements it wrote itself).
__global__ void __launch_bounds__(kThreads)
    ResidualKernel(float* __restrict__ x, const int32_t* __restrict__ inv,
                   const float* __restrict__ fresh, int d, int layer,
                   const int32_t* __restrict__ live_row, const int32_t* __restrict__ live_req,
                   const DlmCacheView* __restrict__ caches, const float* __restrict__ w,
                   float eps, uint16_t* __restrict__ out) {
  const int i = blockIdx.x;
  const int j = inv != nullptr ? inv[i] : i;
  const DlmCacheView c = caches[live_req[i]];
  float* delta = c.delta + (static_cast<size_t>(layer) * c.rows + live_row[i]) * d;
  float* xr = x + static_cast<size_t>(i) * d;
  float ss = 0;
  if (j >= 0) {
    const float* f = fresh + static_cast<size_t>(j) * d;
    for (int e = threadIdx.x; e < d; e += kThreads) {
      const float v = f[e];
      delta[e] = v;
      const float nx = xr[e] + v;
      xr[e] = nx;
      ss += nx * nx;
    }
  } else {
    for (int e = threadIdx.x; e < d; e += kThreads) {
      const float nx = xr[e] + delta[e];
      xr[e] = nx;
      ss += nx * nx;
    }
  }
  if (w == nullptr) return;  // uniform per launch
  ss = BlockReduce<false>(ss);
  const float inv_rms = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  uint16_t* o = out + static_cast<size_t>(i) * d;
  for (int e = threadIdx.x; e < d; e += kThreads) o[e] = FToBf16(w[e] * (xr[e] * inv_rms));
}

// One block per row.
__global__ void __launch_bounds__(kThreads)
    Top1Kernel(const float* __restrict__ logits, int vocab, int32_t* __restrict__ top1,
               float* __restrict__ prob) {
  __shared__ float best_v[kThreads];
  __shared__ int best_i[kThreads];
  const float* row = logits + static_cast<size_t>(blockIdx.x) * vocab;
  float bv = -INFINITY;
  int bi = -1;
  for (int v = threadIdx.x; v < vocab; v += kThreads) {
    const float l = row[v];
    if (l > bv || (bi < 0 && l == bv)) bv = l, bi = v;  // NaN never compares true
  }
  best_v[threadIdx.x] = bv;
  best_i[threadIdx.x] = bi;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = best_v[threadIdx.x + s];
      const int oi = best_i[threadIdx.x + s];
      const float mv = best_v[threadIdx.x];
      const int mi = best_i[threadIdx.x];
      const bool take = oi >= 0 && (mi < 0 || ov > mv || (ov == mv && oi < mi));
      if (take) best_v[threadIdx.x] = ov, best_i[threadIdx.x] = oi;
    }
    __syncthreads();
  }
  const float mx = best_v[0];
  const int arg = best_i[0];
  float sum = 0;
  if (arg >= 0) {
    for (int v = threadIdx.x; v < vocab; v += kThreads) {
      const float l = row[v];
      if (l == l) sum += expf(l - mx);
    }
  }
  sum = BlockReduce<false>(sum);
  if (threadIdx.x == 0) {
    top1[blockIdx.x] = arg >= 0 ? arg : 0;
    prob[blockIdx.x] = arg >= 0 ? 1.0f / sum : 0.0f;
  }
}

}  // namespace prehoc::kernels::dlm_ops

#endif  // PREHOC_WORKER_KERNELS_DLM_OPS_CUH_
