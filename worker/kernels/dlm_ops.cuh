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
__device__ __forceinline__ uint32_t PackBf16Pair(float lo, float hi) {
  return static_cast<uint32_t>(FToBf16(lo)) | (static_cast<uint32_t>(FToBf16(hi)) << 16);
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

// Grid (m, ceil(heads·hd/2 / kThreads)): one thread per rotation pair (head h, e < hd/2) of Q,
// and for h < kv_heads of K (same angle) and the two V elements e, e + hd/2.
__global__ void __launch_bounds__(kThreads)
    QkvRopeScatterKernel(DlmKvScatterParams p, int heads, const float* __restrict__ bias_q,
                         uint16_t* __restrict__ q_out) {
  const int j = blockIdx.x;
  const int idx = blockIdx.y * kThreads + threadIdx.x;
  const int hd = p.head_dim, half = hd / 2;
  if (idx >= heads * half) return;
  const int h = idx / half, e = idx % half;
  const int i = p.d_sel != nullptr ? p.d_sel[j] : j;
  const int row = p.d_live_row[i];
  const float* src = p.d_src + static_cast<size_t>(j) * p.src_ld;
  float s, co;
  sincosf(static_cast<float>(row) * p.d_inv_freq[e], &s, &co);
  {
    const int c0 = h * hd + e, c1 = c0 + half;
    float a = src[c0], b = src[c1];
    if (bias_q != nullptr) {
      a += bias_q[c0];
      b += bias_q[c1];
    }
    uint16_t* o = q_out + static_cast<size_t>(j) * heads * hd;
    o[c0] = FToBf16(a * co - b * s);
    o[c1] = FToBf16(b * co + a * s);
  }
  if (h >= p.kv_heads) return;
  const DlmCacheView c = p.d_caches[p.d_live_req[i]];
  const size_t base = ((static_cast<size_t>(p.layer) * p.kv_heads + h) * c.rows + row) * hd;
  const int c0 = h * hd + e, c1 = c0 + half;
  if (p.k_col >= 0) {
    float a = src[p.k_col + c0], b = src[p.k_col + c1];
    if (p.d_bias_k != nullptr) {
      a += p.d_bias_k[c0];
      b += p.d_bias_k[c1];
    }
    c.k[base + e] = FToBf16(a * co - b * s);
    c.k[base + e + half] = FToBf16(b * co + a * s);
  }
  if (p.v_col >= 0) {
    float a = src[p.v_col + c0], b = src[p.v_col + c1];
    if (p.d_bias_v != nullptr) {
      a += p.d_bias_v[c0];
      b += p.d_bias_v[c1];
    }
    c.v[base + e] = FToBf16(a);
    c.v[base + e + half] = FToBf16(b);
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
  __shared__ int warp_total[kThreads / 32];
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
  // Each thread owns a contiguous chunk; exclusive scan of the chunk counts (warp shuffles, then
  // the warps' totals; a serial scan by one thread cost ~4 µs per call).
  const int chunk = (len + kThreads - 1) / kThreads;
  const int lo = min(len, static_cast<int>(threadIdx.x) * chunk), hi = min(len, lo + chunk);
  int cnt = 0;
  for (int i = lo; i < hi; ++i) cnt += flag[i];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = cnt;
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_total[w];
  int pos = out_off[b] + before + incl - cnt;
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
  if (d % 4 == 0) {  // 16-byte rows: float4 accesses (uniform per launch)
    const int d4 = d / 4;
    const auto* x4 = reinterpret_cast<const float4*>(xr);
    auto* a4 = reinterpret_cast<float4*>(ar);
    const auto* b4 = reinterpret_cast<const float4*>(bo);
    for (int e = threadIdx.x; e < d4; e += kThreads) {
      float4 av = a4[e];
      if (bo != nullptr) {
        const float4 bv = b4[e];
        av = make_float4(av.x + bv.x, av.y + bv.y, av.z + bv.z, av.w + bv.w);
        a4[e] = av;
      }
      const float4 xv = x4[e];
      const float m0 = xv.x + av.x, m1 = xv.y + av.y, m2 = xv.z + av.z, m3 = xv.w + av.w;
      ss += m0 * m0 + m1 * m1 + m2 * m2 + m3 * m3;
    }
    ss = BlockReduce<false>(ss);
    const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
    const auto* w4 = reinterpret_cast<const float4*>(w);
    auto* o2 = reinterpret_cast<uint2*>(out + static_cast<size_t>(j) * d);
    for (int e = threadIdx.x; e < d4; e += kThreads) {
      const float4 xv = x4[e], av = a4[e], wv = w4[e];
      o2[e] = make_uint2(
          PackBf16Pair(wv.x * ((xv.x + av.x) * inv), wv.y * ((xv.y + av.y) * inv)),
          PackBf16Pair(wv.z * ((xv.z + av.z) * inv), wv.w * ((xv.w + av.w) * inv)));
    }
    return;
  }
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
  if (d % 4 == 0) {  // 16-byte rows: float4 accesses (uniform per launch)
    const int d4 = d / 4;
    auto* x4 = reinterpret_cast<float4*>(xr);
    auto* del4 = reinterpret_cast<float4*>(delta);
    const auto* f4 =
        j >= 0 ? reinterpret_cast<const float4*>(fresh + static_cast<size_t>(j) * d) : nullptr;
    for (int e = threadIdx.x; e < d4; e += kThreads) {
      float4 v;
      if (f4 != nullptr) {
        v = f4[e];
        del4[e] = v;
      } else {
        v = del4[e];
      }
      float4 xv = x4[e];
      xv = make_float4(xv.x + v.x, xv.y + v.y, xv.z + v.z, xv.w + v.w);
      x4[e] = xv;
      ss += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
    }
    if (w == nullptr) return;  // uniform per launch
    ss = BlockReduce<false>(ss);
    const float inv_rms = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
    const auto* w4 = reinterpret_cast<const float4*>(w);
    auto* o2 = reinterpret_cast<uint2*>(out + static_cast<size_t>(i) * d);
    for (int e = threadIdx.x; e < d4; e += kThreads) {
      const float4 xv = x4[e], wv = w4[e];
      o2[e] = make_uint2(PackBf16Pair(wv.x * (xv.x * inv_rms), wv.y * (xv.y * inv_rms)),
                         PackBf16Pair(wv.z * (xv.z * inv_rms), wv.w * (xv.w * inv_rms)));
    }
    return;
  }
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

// ---- Fused attention (DlmFusedAttention).
constexpr int kAttnKeys = 64;      // keys per tile
constexpr int kAttnThreads = 128;  // 4 warps, warp w = query rows [16w, 16w + 16) of the block
static_assert(kAttnThreads / 32 * 16 == kDlmAttnRowsPerCta);

template <int HD>
constexpr int AttnSmemBytes() {
  return 2 * 2 * kAttnKeys * (HD + 8) * 2;  // 2 stages × (K, V) tiles, rows padded by 8 bf16
}

__device__ __forceinline__ void AttnCpAsync16(void* dst, const void* src, bool valid) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void AttnMma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Grid (count, splits, ceil(m / 64)), kAttnThreads threads, AttnSmemBytes<HD>() dynamic shared
// memory.
// Fragment maths (lane = 4g + t): the m16n8k16 accumulator holds rows g and g + 8, columns
// 2t, 2t + 1 of its 16×8 tile; A (Q, P) rows g / g + 8, k 2t.. and 2t + 8..; B (Kᵀ, V) k 2t..
// and 2t + 8.., column g. K tiles in shared memory are [key][dim], so Kᵀ's B fragment is two
// consecutive bf16 of one key row; V's is two consecutive keys of one dim (ldmatrix.trans).
template <int HD>
__global__ void __launch_bounds__(kAttnThreads) FusedAttentionKernel(DlmAttentionParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int LDS = HD + 8;
  extern __shared__ __align__(16) uint16_t attn_smem[];
  const int entry = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const auto* K = static_cast<const uint16_t*>(p.d_k[entry]);
  const auto* V = static_cast<const uint16_t*>(p.d_v[entry]);
  const auto* Qp = static_cast<const uint16_t*>(p.d_q[entry]);
  auto* Op = static_cast<uint16_t*>(p.d_o[entry]);
  const int N = p.n_keys, M = p.m;
  const int tiles = (N + kAttnKeys - 1) / kAttnKeys;
  const int t0 = static_cast<int>(static_cast<int64_t>(split) * tiles / splits);
  const int t1 = static_cast<int>(static_cast<int64_t>(split + 1) * tiles / splits);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.z * kDlmAttnRowsPerCta + warp * 16;
  const bool active = row0 < M;

  auto load_tile = [&](int tile, int stage) {
    uint16_t* ks = attn_smem + stage * 2 * kAttnKeys * LDS;
    uint16_t* vs = ks + kAttnKeys * LDS;
    const int key0 = tile * kAttnKeys;
    for (int c = threadIdx.x; c < kAttnKeys * HD / 8; c += kAttnThreads) {
      const int r = c / (HD / 8), col = (c % (HD / 8)) * 8;
      const bool valid = key0 + r < N;
      const size_t off = valid ? static_cast<size_t>(key0 + r) * HD + col : 0;
      AttnCpAsync16(ks + r * LDS + col, K + off, valid);
      AttnCpAsync16(vs + r * LDS + col, V + off, valid);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };

  uint32_t qa[HD / 16][4];
  float o[HD / 8][4];
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  if (t0 < t1) load_tile(t0, 0);
  {
    const int ra = row0 + g, rb = row0 + g + 8;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
      const int c0 = ks * 16 + 2 * t;
      auto ld = [&](int r, int col) -> uint32_t {
        return r < M ? *reinterpret_cast<const uint32_t*>(Qp + static_cast<size_t>(r) * p.ldq + col)
                     : 0u;
      };
      qa[ks][0] = ld(ra, c0);
      qa[ks][1] = ld(rb, c0);
      qa[ks][2] = ld(ra, c0 + 8);
      qa[ks][3] = ld(rb, c0 + 8);
    }
  }
  const float sl2 = p.scale * 1.4426950408889634f;  // exp(x) = exp2(x · log2 e)
  for (int tile = t0; tile < t1; ++tile) {
    const int stage = (tile - t0) & 1;
    if (tile + 1 < t1) {
      load_tile(tile + 1, stage ^ 1);
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
    __syncthreads();
    if (active) {
      const uint16_t* ks = attn_smem + stage * 2 * kAttnKeys * LDS;
      const uint16_t* vs = ks + kAttnKeys * LDS;
      float sc[kAttnKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kAttnKeys / 8; ++nt) {
        sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
        const uint16_t* krow = ks + (nt * 8 + g) * LDS + 2 * t;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kk * 16);
          const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kk * 16 + 8);
          AttnMma(sc[nt], qa[kk], b0, b1);
        }
      }
      const int key0 = tile * kAttnKeys;
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kAttnKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + nt * 8 + 2 * t + (e & 1);
          sc[nt][e] = key < N ? sc[nt][e] * sl2 : -INFINITY;
        }
        mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
      }
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      // Every tile holds at least one valid key (key0 < N), so the new maxima are finite.
      const float mn0 = fmaxf(mrow[0], mx0), mn1 = fmaxf(mrow[1], mx1);
      const float corr0 = exp2f(mrow[0] - mn0), corr1 = exp2f(mrow[1] - mn1);
      mrow[0] = mn0;
      mrow[1] = mn1;
      float sum0 = 0.0f, sum1 = 0.0f;
      uint32_t pa[kAttnKeys / 16][4];
#pragma unroll
      for (int nt = 0; nt < kAttnKeys / 8; ++nt) {
        // P is rounded to bf16 for the tensor cores; the row sums use the rounded values too,
        // so that Σ_t P = l exactly as P·V sees it.
        const uint32_t lo = PackBf16Pair(exp2f(sc[nt][0] - mn0), exp2f(sc[nt][1] - mn0));
        const uint32_t hi = PackBf16Pair(exp2f(sc[nt][2] - mn1), exp2f(sc[nt][3] - mn1));
        sum0 += Bf16ToF(lo & 0xffffu) + Bf16ToF(lo >> 16);
        sum1 += Bf16ToF(hi & 0xffffu) + Bf16ToF(hi >> 16);
        pa[nt / 2][(nt & 1) * 2 + 0] = lo;
        pa[nt / 2][(nt & 1) * 2 + 1] = hi;
      }
      lrow[0] = lrow[0] * corr0 + sum0;
      lrow[1] = lrow[1] * corr1 + sum1;
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) {
        o[j][0] *= corr0;
        o[j][1] *= corr0;
        o[j][2] *= corr1;
        o[j][3] *= corr1;
      }
#pragma unroll
      for (int kk = 0; kk < kAttnKeys / 16; ++kk) {
        // ldmatrix.x4.trans: matrices (keys 16kk + 0..7 | 8..15) × (dims 8j.. | 8(j+1)..).
        const int vrow = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
        for (int j = 0; j < HD / 8; j += 2) {
          const uint16_t* vp = vs + vrow * LDS + (j + (lane >> 4)) * 8;
          const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(vp));
          uint32_t b0, b1, b2, b3;
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                       : "r"(addr));
          AttnMma(o[j], pa[kk], b0, b1);
          AttnMma(o[j + 1], pa[kk], b2, b3);
        }
      }
    }
    __syncthreads();  // the stage is overwritten by the next iteration's load
  }
  if (!active) return;
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    lrow[0] += __shfl_xor_sync(0xffffffffu, lrow[0], off);
    lrow[1] += __shfl_xor_sync(0xffffffffu, lrow[1], off);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + half * 8;
    if (r >= M) continue;
    if (splits == 1) {
      const float inv = lrow[half] > 0.0f ? 1.0f / lrow[half] : 0.0f;
      uint16_t* orow = Op + static_cast<size_t>(r) * p.ldq;
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) {
        *reinterpret_cast<uint32_t*>(orow + j * 8 + 2 * t) =
            PackBf16Pair(o[j][half * 2] * inv, o[j][half * 2 + 1] * inv);
      }
    } else {
      // Partial: [entry][split][row] × (HD floats of unnormalised O, max (log2 units), sum).
      float* w = p.d_work +
                 ((static_cast<size_t>(entry) * splits + split) * M + r) * (HD + 2);
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) {
        *reinterpret_cast<float2*>(w + j * 8 + 2 * t) =
            make_float2(o[j][half * 2], o[j][half * 2 + 1]);
      }
      if (t == 0) {
        w[HD] = mrow[half];
        w[HD + 1] = lrow[half];
      }
    }
  }
#endif
}

// Grid (count, m), HD threads: merges the splits' partials of one row.
template <int HD>
__global__ void __launch_bounds__(HD) AttentionCombineKernel(DlmAttentionParams p) {
  const int entry = blockIdx.x, r = blockIdx.y, d = threadIdx.x, S = p.splits;
  const float* w = p.d_work + (static_cast<size_t>(entry) * S * p.m + r) * (HD + 2);
  const size_t stride = static_cast<size_t>(p.m) * (HD + 2);
  float mx = -INFINITY;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, w[s * stride + HD]);
  float l = 0.0f, acc = 0.0f;
  for (int s = 0; s < S; ++s) {
    const float* ws = w + s * stride;
    const float ms = ws[HD];
    if (ms == -INFINITY) continue;  // a split without keys
    const float f = exp2f(ms - mx);
    l += f * ws[HD + 1];
    acc += f * ws[d];
  }
  auto* Op = static_cast<uint16_t*>(p.d_o[entry]);
  Op[static_cast<size_t>(r) * p.ldq + d] = FToBf16(l > 0.0f ? acc / l : 0.0f);
}

}  // namespace prehoc::kernels::dlm_ops

#endif  // PREHOC_WORKER_KERNELS_DLM_OPS_CUH_
