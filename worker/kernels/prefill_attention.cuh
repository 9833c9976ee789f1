// Kernel of prefill_attention.h (shapes, layouts and dtypes are documented there).
//
// One 128-thread block per (query row, query head). Each of the 4 warps walks every 4th key of
// the row's key range with an online softmax in fp32: lane l holds elements l, l + 32, ... of
// q, and of its running output, so one key costs a 32-lane dot product (butterfly reduction) and
// an axpy; the 4 warps' (m, l, o) are merged through shared memory at the end. Templated on the
// elements per lane (kEpl = ceil(head_dim / 32): 1, 2, 4 or 8). Simple rather than fast: it is
// the correctness path for prefill and for head dims the fast decode kernel does not cover.
// PSAW band: the row's keys are walked as a virtual index i in [0, n_keys − jump) mapped to
// t = i for i < front (the sinks) and t = i + jump after, jump = lo − front; with no band
// front = jump = 0, so the walk (and the result) is bitwise the plain causal one.
#ifndef PREHOC_WORKER_KERNELS_PREFILL_ATTENTION_CUH_
#define PREHOC_WORKER_KERNELS_PREFILL_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "worker/kernels/prefill_attention.h"

namespace prehoc::kernels::prefill {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxHeadDim = 256;

__device__ __forceinline__ float Bf16(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

template <int kEpl>
__global__ void __launch_bounds__(kThreads)
    PrefillAttentionKernel(PrefillAttentionParams p, float scale) {
  __shared__ float sm_m[kWarps], sm_l[kWarps];
  __shared__ float sm_o[kWarps][kMaxHeadDim];
  const int r = blockIdx.x;
  const int hq = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int hd = p.head_dim;
  const int hkv = p.num_kv_heads;
  const int kh = hq / (p.num_q_heads / hkv);
  const int b = p.d_row_seq[r];
  int n_keys = p.causal ? p.d_row_pos[r] + 1 : p.d_seq_lens[b];
  int front = 0, jump = 0;  // PSAW band: keys [front, front + jump) are skipped
  if (p.d_band_fraction != nullptr) {
    const double f = p.d_band_fraction[b];
    const int64_t lo =
        f > 0 ? static_cast<int64_t>(f * static_cast<double>(p.d_row_pos[r] + 1)) : 0;
    const int sink = p.d_band_sink[b];
    if (lo > sink) {  // then sink < lo <= pos: [0, sink) ∪ [lo, pos]
      front = sink;
      jump = static_cast<int>(lo) - sink;
      n_keys -= jump;
    }
  }
  const int32_t* pages = p.d_page_indices + p.d_page_indptr[b];

  float q[kEpl], o[kEpl];
  const uint16_t* qr = p.d_q + (static_cast<size_t>(r) * p.num_q_heads + hq) * hd;
#pragma unroll
  for (int e = 0; e < kEpl; ++e) {
    const int d = lane + 32 * e;
    q[e] = d < hd ? Bf16(qr[d]) * scale : 0.0f;
    o[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int i = warp; i < n_keys; i += kWarps) {
    const int t = i < front ? i : i + jump;
    const int64_t page = pages[t / p.page_size];
    // Element (page, kh, slot, 0) of the pool: ((page * Hkv + kh) * page_size + slot) * hd.
    const int64_t base = ((page * hkv + kh) * p.page_size + t % p.page_size) * hd;
    const uint16_t* kt = p.d_k_pool + base;
    const uint16_t* vt = p.d_v_pool + base;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < kEpl; ++e) {
      const int d = lane + 32 * e;
      if (d < hd) s += q[e] * Bf16(kt[d]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float pt = expf(s - m_new);
    l = l * corr + pt;
#pragma unroll
    for (int e = 0; e < kEpl; ++e) {
      const int d = lane + 32 * e;
      o[e] = o[e] * corr + (d < hd ? pt * Bf16(vt[d]) : 0.0f);
    }
    m = m_new;
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < kEpl; ++e) {
    const int d = lane + 32 * e;
    if (d < hd) sm_o[warp][d] = o[e];
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, sm_m[w]);
  float weight[kWarps];
  float l_all = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    // A warp that saw no key has l = 0 (and m = -inf): weight 0.
    weight[w] = sm_l[w] > 0.0f ? expf(sm_m[w] - m_all) : 0.0f;
    l_all += sm_l[w] * weight[w];
  }
  const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
  uint16_t* out = p.d_out + (static_cast<size_t>(r) * p.num_q_heads + hq) * hd;
  for (int d = threadIdx.x; d < hd; d += kThreads) {
    float acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (weight[w] > 0.0f) acc += sm_o[w][d] * weight[w];
    }
    out[d] = __bfloat16_as_ushort(__float2bfloat16_rn(acc * inv_l));
  }
}

}  // namespace prehoc::kernels::prefill

#endif  // PREHOC_WORKER_KERNELS_PREFILL_ATTENTION_CUH_
