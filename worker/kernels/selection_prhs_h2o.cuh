// H2O (heavy-hitter oracle) rows of the selection kernels (PrhsRowMode kHeavy): the per-step
// select (keep the heavy budget's best accumulated scores below the recent window, evict the
// rest for good) and the post-attention observe (add each tracked token's attention probability
// over the step's list). Semantics: selection_prhs.h (PrhsHeavySelect, PrhsHeavyObserve); CPU
// reference: H2OSelector (worker/selection/selector.cc). Included by selection_prhs.cu only.
#ifndef PREHOC_WORKER_KERNELS_SELECTION_PRHS_H2O_CUH_
#define PREHOC_WORKER_KERNELS_SELECTION_PRHS_H2O_CUH_

#include "worker/kernels/selection_prhs.cuh"

namespace prehoc::kernels::prhs {

constexpr int kHeavyThreads = 512;

// Key row j of kv head h of sequence b (the page table's logical position j).
template <typename T, int D>
__device__ __forceinline__ const T* HeavyKeyRow(const Args& a, int b, int h, int j) {
  const int page = __ldg(a.page_indices + a.page_indptr[b] + j / kPageSize);
  return static_cast<const T*>(a.k_pool) +
         (static_cast<size_t>(page) * a.hkv + h) * kPageSize * D +
         static_cast<size_t>(j % kPageSize) * D;
}

// The group's queries of row (b, h) into shared fp32 qs[g][d]; ends with a barrier.
template <typename T, int D>
__device__ __forceinline__ void HeavyLoadQuery(const Args& a, int b, int h, float (*qs)[D]) {
  const T* q = static_cast<const T*>(a.q) +
               (static_cast<size_t>(b) * a.hq + static_cast<size_t>(h) * a.group) * D;
  for (int i = threadIdx.x; i < a.group * D; i += blockDim.x) qs[i / D][i % D] = ToFloat<T>(q[i]);
  __syncthreads();
}

// s[g] = scale · q_g · K (fp32, the dimensions in order), g < group.
template <typename T, int D>
__device__ __forceinline__ void HeavyLogits(const Args& a, const float (*qs)[D], const T* k,
                                            float (&s)[kMaxGroup]) {
  float acc[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) acc[g] = 0.f;
  const uint4* k4 = reinterpret_cast<const uint4*>(k);
#pragma unroll 4
  for (int i = 0; i < D / 8; ++i) {
    float kf[8];
    Unpack8<T>(__ldg(k4 + i), kf);
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g < a.group) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g] = fmaf(qs[g][i * 8 + e], kf[e], acc[g]);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) s[g] = acc[g] * a.scale;
}

// lse over lg[g * L + i], i < n, per query head g < group, into s_lse (block-wide).
__device__ __forceinline__ void HeavyLse(const Args& a, const float* lg, int n, float* s_lse,
                                         float* red_m, float* red_l) {
  for (int g = 0; g < a.group; ++g) {
    float m = -INFINITY, l = 0.f;
    for (int i = threadIdx.x; i < n; i += kHeavyThreads) {
      const float x = lg[static_cast<size_t>(g) * a.L + i];
      if (x == -INFINITY) continue;
      if (x > m) {
        l = l * expf(m - x) + 1.f;
        m = x;
      } else {
        l += expf(x - m);
      }
    }
    const float lse = BlockLse<kHeavyThreads>(m, l, red_m, red_l);
    if (threadIdx.x == 0) s_lse[g] = lse;
  }
  __syncthreads();
}

// ---- (h) H2O select ----------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kHeavyThreads) HeavySelectKernel(Args a) {
  const int row = blockIdx.x;
  if (a.h2o_pos == nullptr || RowMode(a, row) != kPrhsModeHeavy) return;
  __shared__ float qs[kMaxGroup][D];
  __shared__ float red_m[kHeavyThreads / 32], red_l[kHeavyThreads / 32];
  __shared__ int scan[kHeavyThreads / 32];
  __shared__ float s_lse[kMaxGroup];
  __shared__ int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_rem, s_eq;
  const int tid = threadIdx.x, b = row / a.hkv, h = row % a.hkv, G = a.group;
  const int t = a.seq_lens[b];
  const int srow = StateRow(a, row);
  const int heavy = max(RowTopK(a, row), 0);
  const int hi = max(t - RowLocal(a, row), 0);
  float* lg = a.logits + static_cast<size_t>(row) * G * a.L;
  float* cacc = a.probs + static_cast<size_t>(row) * a.L;
  int* cpos = reinterpret_cast<int*>(lg);  // after the first step's scores are consumed
  int32_t* spos = a.h2o_pos + static_cast<size_t>(srow) * a.h2o_stride;
  float* sacc = a.h2o_acc + static_cast<size_t>(srow) * a.h2o_stride;

  // 1. candidates (cpos ascending, cacc).
  int nc;
  if (a.valid[srow] == 0) {  // first step: every position, scored by GroupProbabilities
    HeavyLoadQuery<T, D>(a, b, h, qs);
    for (int j = tid; j < t; j += kHeavyThreads) {
      float s[kMaxGroup];
      HeavyLogits<T, D>(a, qs, HeavyKeyRow<T, D>(a, b, h, j), s);
      for (int g = 0; g < G; ++g) lg[static_cast<size_t>(g) * a.L + j] = s[g];
    }
    __syncthreads();
    HeavyLse(a, lg, t, s_lse, red_m, red_l);
    const float inv_g = 1.f / static_cast<float>(G);
    for (int j = tid; j < t; j += kHeavyThreads) {
      float p = 0.f;
      for (int g = 0; g < G; ++g) p += expf(lg[static_cast<size_t>(g) * a.L + j] - s_lse[g]);
      cacc[j] = p * inv_g;
    }
    __syncthreads();
    for (int j = tid; j < t; j += kHeavyThreads) cpos[j] = j;
    nc = t;
  } else {  // the tracked list, then the positions appended since the last step (score 0)
    const int n = min(a.h2o_count[srow], a.h2o_stride), t_prev = a.reuse[srow];
    for (int i = tid; i < n; i += kHeavyThreads) {
      cpos[i] = spos[i];
      cacc[i] = sacc[i];
    }
    for (int j = t_prev + tid; j < t; j += kHeavyThreads) {
      cpos[n + j - t_prev] = j;
      cacc[n + j - t_prev] = 0.f;
    }
    nc = n + max(t - t_prev, 0);
  }
  __syncthreads();

  // 2. threshold of the `heavy` best scores among the candidates below hi (a prefix: ascending).
  int below = 0;
  for (int i = tid; i < nc; i += kHeavyThreads) below += cpos[i] < hi;
  const int nlo = BlockSum<kHeavyThreads>(below, scan);
  const bool all = heavy >= nlo;
  uint32_t vk = 0u;
  int need = 0;
  if (!all && heavy > 0) {  // block-uniform
    if (tid == 0) {
      s_prefix = 0u;
      s_rem = heavy;
      s_eq = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kHeavyThreads) hist[i] = 0;
      __syncthreads();
      const uint32_t hmask = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
      const uint32_t pre = s_prefix;
      for (int base = 0; base < nlo; base += kHeavyThreads) {
        const int i = base + tid;
        const uint32_t key = i < nlo ? OrderedKey(cacc[i]) : 0u;
        HistAdd(hist, (i < nlo && (key & hmask) == (pre & hmask))
                          ? static_cast<int>((key >> shift) & 255u)
                          : 256);
      }
      __syncthreads();
      if (tid < 32) ChooseDigit(hist, shift, &s_prefix, &s_rem, &s_eq);
      __syncthreads();
    }
    vk = s_prefix;
    need = s_rem;
  }

  // 3. kept = the `heavy` best below hi (ties: lower position first) → S_anchor; the tracked
  // list becomes kept ∪ the candidates >= hi (the old list was copied to the workspace).
  int32_t* aset = a.anchor_set + static_cast<size_t>(srow) * a.anchor_stride;
  int run_tie = 0, out_anchor = 0, out_state = 0;
  for (int base = 0; base < nc; base += kHeavyThreads) {
    const int i = base + tid;
    const bool in = i < nc;
    const bool lo = in && i < nlo;
    const uint32_t key = lo ? OrderedKey(cacc[i]) : 0u;
    const bool eq = lo && !all && heavy > 0 && key == vk;
    int tot = 0;
    const int rank = run_tie + BlockExclusiveScan<kHeavyThreads>(eq ? 1 : 0, scan, &tot);
    run_tie += tot;
    const bool keep = lo && (all || (heavy > 0 && (key > vk || (eq && rank < need))));
    const bool track = keep || (in && !lo);
    int ta = 0, tt = 0;
    const int pa = out_anchor + BlockExclusiveScan<kHeavyThreads>(keep ? 1 : 0, scan, &ta);
    const int pt = out_state + BlockExclusiveScan<kHeavyThreads>(track ? 1 : 0, scan, &tt);
    if (keep && pa < a.anchor_stride) aset[pa] = cpos[i];
    if (track && pt < a.h2o_stride) {
      spos[pt] = cpos[i];
      sacc[pt] = cacc[i];
    }
    out_anchor += ta;
    out_state += tt;
  }
  if (tid == 0) {
    a.anchor_count[srow] = min(out_anchor, a.anchor_stride);
    a.h2o_count[srow] = min(out_state, a.h2o_stride);
    a.valid[srow] = 1;
    a.reuse[srow] = t;
  }
}

// ---- (o) H2O observe ---------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kHeavyThreads) HeavyObserveKernel(Args a) {
  const int row = blockIdx.x;
  if (a.h2o_pos == nullptr || RowMode(a, row) != kPrhsModeHeavy) return;
  __shared__ float qs[kMaxGroup][D];
  __shared__ float red_m[kHeavyThreads / 32], red_l[kHeavyThreads / 32];
  __shared__ float s_lse[kMaxGroup];
  const int b = row / a.hkv, h = row % a.hkv, G = a.group;
  const int srow = StateRow(a, row);
  HeavyLoadQuery<T, D>(a, b, h, qs);
  const int begin = a.index_indptr[row];
  const int n = static_cast<int>(
      min(static_cast<int64_t>(a.index_indptr[row + 1]), a.index_capacity) - begin);
  float* lg = a.logits + static_cast<size_t>(row) * G * a.L;
  for (int i = threadIdx.x; i < n; i += kHeavyThreads) {
    const int j = a.index_indices[begin + i];
    float s[kMaxGroup];
    if (j >= 0) {
      HeavyLogits<T, D>(a, qs, HeavyKeyRow<T, D>(a, b, h, j), s);
    } else {
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) s[g] = -INFINITY;
    }
    for (int g = 0; g < G; ++g) lg[static_cast<size_t>(g) * a.L + i] = s[g];
  }
  __syncthreads();
  HeavyLse(a, lg, max(n, 0), s_lse, red_m, red_l);
  const int cnt = min(a.h2o_count[srow], a.h2o_stride);
  int32_t* spos = a.h2o_pos + static_cast<size_t>(srow) * a.h2o_stride;
  float* sacc = a.h2o_acc + static_cast<size_t>(srow) * a.h2o_stride;
  const float gf = static_cast<float>(G);
  for (int i = threadIdx.x; i < cnt; i += kHeavyThreads) {
    float s[kMaxGroup];
    HeavyLogits<T, D>(a, qs, HeavyKeyRow<T, D>(a, b, h, spos[i]), s);
    float acc = sacc[i];
    for (int g = 0; g < G; ++g) acc += expf(s[g] - s_lse[g]) / gf;
    sacc[i] = acc;
  }
}

template <typename T, int D>
cudaError_t LaunchHeavy(const Args& a, bool observe, cudaStream_t stream) {
  if (observe) {
    HeavyObserveKernel<T, D><<<a.rows, kHeavyThreads, 0, stream>>>(a);
  } else {
    HeavySelectKernel<T, D><<<a.rows, kHeavyThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

#define PREHOC_INSTANTIATE_PRHS_HEAVY(T, D)                                                      \
  template cudaError_t prehoc::kernels::prhs::LaunchHeavy<T, D>(                                \
      const prehoc::kernels::prhs::Args&, bool, cudaStream_t);

}  // namespace prehoc::kernels::prhs

#endif  // PREHOC_WORKER_KERNELS_SELECTION_PRHS_H2O_CUH_
