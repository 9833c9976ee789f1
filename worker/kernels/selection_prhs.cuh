// PrHS selection kernels: CIS gate, refresh scoring, top-k + dilation, CSR list build. Contract,
// shapes, layouts and dtypes: selection_prhs.h.
//
// GateKernel      one warp per row: cos of the group's concatenated query (G*D elements, 16-byte
//                 loads) vs the anchor, fp32; updates reuse/valid/anchor.
// ScoreKernel     persistent grid; every CTA compacts the flagged rows into shared memory (block
//                 scan over refresh[], so the order is deterministic) and walks work items
//                 (flagged row, 256-token chunk). A token's 256-byte key row is read by D/8
//                 lanes (16 bytes each, so a warp load covers 32/(D/8) whole rows), dotted with
//                 the G query heads held in registers, reduced with xor shuffles. Writes f32
//                 logits [row][g][j]. Memory-bound on K (the whole sequence's keys per row).
// SelectKernel    one CTA of 1024 threads per flagged row, all passes over L2-resident scratch:
//                   1. lse_g = log Σ_j exp(s_gj) (online max/sum per thread, block merge);
//                   2. δ of the previous set (sink ∪ S_anchor ∪ local) at refresh == 2;
//                   3. p_j over [lo, hi) written to probs[] + first radix histogram;
//                   4. radix select (4 × 8-bit digits of the order-preserving key of p_j, 256-bin
//                      shared histograms with warp-aggregated atomics) of the k-th and m-th
//                      largest keys v_k, v_m at once, with how many ties at the threshold to take
//                      (16 private histogram copies, one per warp pair, summed per pass: one
//                      shared copy serialised on the few bins that hold nearly every
//                      probability's exponent byte);
//                   5. keep-mask in position order, in chunks of 8 positions per thread (ties
//                      at a threshold taken lowest position first via block scans with running
//                      totals): keep = T (top-k) ∪ the ±r neighbourhood of M (best m);
//                   6. compaction of the keep-mask (block scan per chunk) into S_anchor
//                      (ascending).
// ListKernel      one CTA per row: its CSR offset is the sum of the row counts before it (each
//                 count is O(1) from seq_lens, topk, valid and anchor_count), then it writes
//                 sink ∪ S_anchor ∪ local (or all tokens for a dense row; the tokens of the
//                 selected pages for a kPages row).
// Quest (kPages rows):
// BoundsKernel    grid (rows, kBoundsSplit), head_dim threads: thread d folds channel d of the
//                 page's tokens below t (coalesced 2·D-byte key rows) into min / max.
// PageScoreKernel one warp per (row, logical page), grid-stride: Σ_g Σ_d max(q·min, q·max)
//                 (lanes over d, xor-shuffle sum) into the row's probabilities; the last page
//                 +inf. SelectKernel then takes these scores as given (no lse, no δ).
#ifndef PREHOC_WORKER_KERNELS_SELECTION_PRHS_CUH_
#define PREHOC_WORKER_KERNELS_SELECTION_PRHS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "worker/kernels/block_primitives.cuh"
#include "worker/kernels/selection_prhs.h"

namespace prehoc::kernels::prhs {

constexpr int kMaxGroup = 8;
constexpr int kMaxRows = 8192;
constexpr int kPageSize = 16;
constexpr int kGateWarps = 8;
constexpr int kScoreThreads = 256;
constexpr int kScoreChunk = 256;  // tokens per work item: 32 per warp
constexpr int kSelectThreads = 1024;
constexpr int kListThreads = 256;
constexpr int kHistCopies = 16;  // SelectKernel: private histograms, one per 2 warps
constexpr int kPassUnroll = 4;   // SelectKernel: elements per thread in flight per pass step
constexpr int kRowAlign = 64;  // L is a multiple of this (256-byte rows of f32)
constexpr int kBoundsSplit = 16;     // BoundsKernel: CTAs per row (pages split among them)
constexpr int kPageScoreWarps = 8;   // PageScoreKernel: warps per CTA

// Everything the kernels read, with the workspace resolved.
struct Args {
  int batch, hq, hkv, group, rows;
  int sink, local, max_reuse, dilate_r, anchor_stride;
  float tau, scale;
  double m_fraction;
  int64_t L;  // workspace row stride (elements)
  int64_t index_capacity;

  const void* q;
  const void* k_pool;
  const int32_t* page_indptr;
  const int32_t* page_indices;
  const int32_t* seq_lens;
  const int32_t* topk;  // [batch], or [rows] with topk_per_head
  const int32_t* cand_lo;
  int topk_per_head;
  const int32_t* mode;    // [batch] PrhsRowMode or null (kCis)
  const int32_t* sink_b;  // [batch] or null (sink)
  const int32_t* local_b; // [batch] or null (local)
  void* page_bounds;              // kPages: [num_pages][hkv][2][D] T, or null
  const int32_t* bounds_from;     // kPages: [batch] first logical page to recompute

  const int32_t* state_slot;  // [batch] or null: CIS state rows slot*hkv + h (null: row r)
  void* anchor_q;
  int32_t* reuse;
  int32_t* valid;
  int32_t* anchor_set;
  int32_t* anchor_count;
  int32_t* h2o_pos;    // kHeavy state (or null)
  float* h2o_acc;
  int32_t* h2o_count;
  int h2o_stride;
  int32_t* hs_channels;    // kApprox state (or null)
  const int32_t* hs_source;
  int hs_r, hs_interval;
  const int32_t* aset_base;
  const int32_t* acount_base;
  int64_t layer_rows;

  int32_t* refresh;
  float* cos;
  float* delta;
  int32_t* index_indptr;
  int32_t* index_indices;

  float* logits;   // [rows][G][L]
  float* probs;    // [rows][L]
  uint8_t* flags;  // [rows][L]
  float* lse;      // [rows][G]
};

// ---- element conversion (two elements per 32-bit word, low half first) ------------------------
template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float Lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  static __device__ __forceinline__ float Hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float Lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float Hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
};
template <typename T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
// Exact for values that came from T (min / max of T values).
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ void Unpack8(const uint4& v, float (&f)[8]) {
  f[0] = Cvt<T>::Lo(v.x);
  f[1] = Cvt<T>::Hi(v.x);
  f[2] = Cvt<T>::Lo(v.y);
  f[3] = Cvt<T>::Hi(v.y);
  f[4] = Cvt<T>::Lo(v.z);
  f[5] = Cvt<T>::Hi(v.z);
  f[6] = Cvt<T>::Lo(v.w);
  f[7] = Cvt<T>::Hi(v.w);
}

// ---- block primitives (kThreads a multiple of 32, <= 1024): block_primitives.cuh --------------
using block::BlockExclusiveScan;
using block::BlockSum;
// Merge of (max, Σ exp(x - max)) pairs.
__device__ __forceinline__ void MergeMaxSum(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  l = l * expf(m - mx) + l2 * expf(m2 - mx);
  m = mx;
}
// Block-wide log Σ exp over every thread's (m, l); every thread gets it (-inf when empty).
template <int kThreads>
__device__ __forceinline__ float BlockLse(float m, float l, float* sm, float* sl) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, o);
    MergeMaxSum(m, l, m2, l2);
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) {
    sm[threadIdx.x / 32] = m;
    sl[threadIdx.x / 32] = l;
  }
  __syncthreads();
  float bm = -INFINITY, bl = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) MergeMaxSum(bm, bl, sm[w], sl[w]);
  return bm == -INFINITY ? -INFINITY : bm + logf(bl);
}

// Monotone map of a float to uint32 (larger float -> larger key).
__device__ __forceinline__ uint32_t OrderedKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Adds 1 to hist[bin] for every lane with bin < 256 (warp-aggregated). All 32 lanes must call.
__device__ __forceinline__ void HistAdd(int* hist, int bin) {
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  const int leader = __ffs(peers) - 1;
  if (bin < 256 && static_cast<int>(threadIdx.x % 32) == leader) {
    atomicAdd(&hist[bin], __popc(peers));
  }
}

// One radix-select step, run by one whole warp: among the candidates counted in hist (256 bins
// of the digit at `shift`), finds the bin holding the *rem-th largest, appends it to *prefix,
// makes *rem the rank within that bin and *eq the bin's count. REQUIRES 1 <= *rem <= Σ hist.
__device__ __forceinline__ void ChooseDigit(const int* hist, int shift, uint32_t* prefix, int* rem,
                                            int* eq) {
  const int lane = threadIdx.x % 32;
  int c[8];
  int s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // lane owns bins 255 - 8*lane - i (descending)
    c[i] = hist[255 - 8 * lane - i];
    s += c[i];
  }
  int inc = s;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  const int r = *rem;
  const unsigned ballot = __ballot_sync(0xffffffffu, inc >= r);
  const int owner = __ffs(ballot) - 1;
  if (lane == owner) {
    int cum = inc - s;
    bool done = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (!done && cum + c[i] >= r) {
        *prefix |= static_cast<uint32_t>(255 - 8 * lane - i) << shift;
        *rem = r - cum;
        *eq = c[i];
        done = true;
      }
      cum += c[i];
    }
  }
}

// The CIS state row (anchor_q, reuse, valid, anchor_set, anchor_count) of row r = b*hkv + h.
__device__ __forceinline__ int StateRow(const Args& a, int row) {
  return a.state_slot == nullptr ? row : a.state_slot[row / a.hkv] * a.hkv + row % a.hkv;
}
// Per-row plan values: k (-1 = dense), mode, sink and local window of row r = b*hkv + h.
__device__ __forceinline__ int RowTopK(const Args& a, int row) {
  return a.topk[a.topk_per_head ? row : row / a.hkv];
}
__device__ __forceinline__ int RowMode(const Args& a, int row) {
  return a.mode == nullptr ? kPrhsModeCis : a.mode[row / a.hkv];
}
__device__ __forceinline__ int RowSink(const Args& a, int row) {
  return a.sink_b == nullptr ? a.sink : a.sink_b[row / a.hkv];
}
__device__ __forceinline__ int RowLocal(const Args& a, int row) {
  return a.local_b == nullptr ? a.local : a.local_b[row / a.hkv];
}
// Whether ScoreKernel computes the row's token logits (refreshed, not a kPages / kApprox row:
// their scores come from PageScoreKernel / ApproxScoreKernel).
__device__ __forceinline__ bool ScoresTokens(const Args& a, int row) {
  return a.refresh[row] != 0 && RowMode(a, row) != kPrhsModePages &&
         RowMode(a, row) != kPrhsModeApprox;
}

// ---- (q) Quest page bounds ------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(128) BoundsKernel(Args a) {
  const int row = blockIdx.x, d = threadIdx.x;
  if (d >= D) return;
  const int b = row / a.hkv, h = row % a.hkv;
  const int t = a.seq_lens[b];
  const int np = (t + kPageSize - 1) / kPageSize;
  const int from = max(a.bounds_from[b], 0);  // INT32_MAX: nothing to fold
  if (from >= np) return;
  const int32_t* pages = a.page_indices + a.page_indptr[b];
  const size_t page_stride = static_cast<size_t>(a.hkv) * kPageSize * D;
  for (int p = from + static_cast<int>(blockIdx.y); p < np; p += static_cast<int>(gridDim.y)) {
    const int phys = __ldg(pages + p);
    const T* k = static_cast<const T*>(a.k_pool) + phys * page_stride +
                 static_cast<size_t>(h) * kPageSize * D + d;
    const int n = min(kPageSize, t - p * kPageSize);
    float mn = INFINITY, mx = -INFINITY;
    for (int i = 0; i < n; ++i) {
      const float v = ToFloat<T>(k[static_cast<size_t>(i) * D]);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    T* out = static_cast<T*>(a.page_bounds) + (static_cast<size_t>(phys) * a.hkv + h) * 2 * D;
    out[d] = FromFloat<T>(mn);
    out[D + d] = FromFloat<T>(mx);
  }
}

// ---- (b') Quest page scores -----------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kPageScoreWarps * 32) PageScoreKernel(Args a, int max_pages) {
  const int lane = threadIdx.x % 32;
  const int64_t items = static_cast<int64_t>(a.rows) * max_pages;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kPageScoreWarps + threadIdx.x / 32;
       w < items; w += static_cast<int64_t>(gridDim.x) * kPageScoreWarps) {
    const int row = static_cast<int>(w / max_pages), p = static_cast<int>(w % max_pages);
    if (RowMode(a, row) != kPrhsModePages || RowTopK(a, row) < 0) continue;  // warp-uniform
    const int b = row / a.hkv, h = row % a.hkv;
    const int t = a.seq_lens[b];
    const int np = (t + kPageSize - 1) / kPageSize;
    if (p >= np) continue;
    float* out = a.probs + static_cast<size_t>(row) * a.L;
    if (p == np - 1) {  // the current page is always attended
      if (lane == 0) out[p] = INFINITY;
      continue;
    }
    const int phys = __ldg(a.page_indices + a.page_indptr[b] + p);
    const T* bnd = static_cast<const T*>(a.page_bounds) + (static_cast<size_t>(phys) * a.hkv + h) * 2 * D;
    const T* q = static_cast<const T*>(a.q) +
                 (static_cast<size_t>(b) * a.hq + static_cast<size_t>(h) * a.group) * D;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) {
      const float mn = ToFloat<T>(bnd[d]), mx = ToFloat<T>(bnd[D + d]);
      for (int g = 0; g < a.group; ++g) {
        const float qv = ToFloat<T>(__ldg(q + static_cast<size_t>(g) * D + d));
        acc += fmaxf(qv * mn, qv * mx);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[p] = acc;
  }
}

// ---- (a) gate ---------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kGateWarps * 32) GateKernel(Args a) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kGateWarps + static_cast<int>(threadIdx.x / 32);
  if (row >= a.rows) return;
  const int b = row / a.hkv, h = row % a.hkv;
  const int mode = RowMode(a, row);
  if (RowTopK(a, row) < 0 || mode == kPrhsModeWindow || mode == kPrhsModeHeavy) {
    // no gate, CIS state untouched (kHeavy: PrhsHeavySelect owns the row's state)
    if (lane == 0) {
      a.refresh[row] = 0;
      if (a.cos != nullptr) a.cos[row] = __int_as_float(0x7fc00000);
    }
    return;
  }
  if (mode == kPrhsModeApprox) {  // HShare: share a source's set, or refresh every interval
    if (lane == 0) {
      const int srow = StateRow(a, row);
      const int steps = a.reuse[srow];
      a.refresh[row] = (a.hs_source[srow] < 0 && steps % a.hs_interval == 0) ? 1 : 0;
      a.reuse[srow] = steps + 1;
      a.valid[srow] = 1;
      if (a.cos != nullptr) a.cos[row] = __int_as_float(0x7fc00000);
    }
    return;
  }
  if (mode == kPrhsModePages) {  // Quest selects every step; no anchor query
    if (lane == 0) {
      const int srow = StateRow(a, row);
      a.refresh[row] = 1;
      a.reuse[srow] = 0;
      a.valid[srow] = 1;
      if (a.cos != nullptr) a.cos[row] = __int_as_float(0x7fc00000);
    }
    return;
  }
  const int n8 = a.group * D / 8;
  const uint4* q = reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) +
                                                  (static_cast<size_t>(b) * a.hq +
                                                   static_cast<size_t>(h) * a.group) * D);
  const int srow = StateRow(a, row);
  uint4* anc = reinterpret_cast<uint4*>(static_cast<T*>(a.anchor_q) +
                                        static_cast<size_t>(srow) * a.group * D);
  const int valid = a.valid[srow], reuse = a.reuse[srow];
  const bool eval = mode == kPrhsModeCis && valid != 0 && reuse < a.max_reuse;
  float dot = 0.f, nq = 0.f, na = 0.f;
  if (eval) {
    for (int i = lane; i < n8; i += 32) {
      float qf[8], af[8];
      Unpack8<T>(__ldg(q + i), qf);
      Unpack8<T>(anc[i], af);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dot = fmaf(qf[e], af[e], dot);
        nq = fmaf(qf[e], qf[e], nq);
        na = fmaf(af[e], af[e], na);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      dot += __shfl_xor_sync(0xffffffffu, dot, o);
      nq += __shfl_xor_sync(0xffffffffu, nq, o);
      na += __shfl_xor_sync(0xffffffffu, na, o);
    }
  }
  const float c = (eval && nq > 0.f && na > 0.f) ? dot / (sqrtf(nq) * sqrtf(na)) : -1.f;
  const bool share = eval && c > a.tau;
  if (!share) {
    for (int i = lane; i < n8; i += 32) anc[i] = __ldg(q + i);
  }
  if (lane == 0) {
    a.refresh[row] = share ? 0 : (valid != 0 ? 2 : 1);
    a.reuse[srow] = share ? reuse + 1 : 0;
    a.valid[srow] = 1;
    if (a.cos != nullptr) a.cos[row] = eval ? c : __int_as_float(0x7fc00000);
  }
}

// ---- (b) refresh scoring -------------------------------------------------------------------------
// kG: the largest group this variant serves (1, or kMaxGroup); q fragments of kG heads live in
// registers, so G = 1 (MHA, the LLaMA-2-7B shape) keeps register use and occupancy low.
template <typename T, int D, int kG>
__global__ void __launch_bounds__(kScoreThreads) ScoreKernel(Args a, int max_chunks) {
  __shared__ int list[kMaxRows];
  __shared__ int scan[kScoreThreads / 32];
  // Flagged rows in row order (every CTA builds the same list).
  const int per = (a.rows + kScoreThreads - 1) / kScoreThreads;
  const int r0 = static_cast<int>(threadIdx.x) * per;
  int c = 0;
  for (int i = 0; i < per; ++i) {
    const int r = r0 + i;
    if (r < a.rows && ScoresTokens(a, r)) ++c;
  }
  int total = 0;
  int pos = BlockExclusiveScan<kScoreThreads>(c, scan, &total);
  for (int i = 0; i < per; ++i) {
    const int r = r0 + i;
    if (r < a.rows && ScoresTokens(a, r)) list[pos++] = r;
  }
  __syncthreads();

  constexpr int kLanes = D / 8;              // lanes per token row
  constexpr int kTokPerLoad = 32 / kLanes;   // token rows per warp load
  constexpr int kWarpTokens = kScoreChunk / (kScoreThreads / 32);
  constexpr int kLoads = kWarpTokens / kTokPerLoad;
  constexpr int kUnroll = kG == 1 ? 8 : 4;
  static_assert(kLoads % kUnroll == 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane % kLanes, tok_in_load = lane / kLanes;
  const int64_t items = static_cast<int64_t>(total) * max_chunks;
  const size_t page_stride = static_cast<size_t>(a.hkv) * kPageSize * D;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int row = list[w / max_chunks];
    const int chunk = static_cast<int>(w % max_chunks);
    const int b = row / a.hkv, h = row % a.hkv;
    const int t = a.seq_lens[b];
    const int j0 = chunk * kScoreChunk + warp * kWarpTokens;
    if (j0 >= t) continue;  // warp-uniform; no block barrier inside this loop
    float qf[kG][8];
    const T* qrow = static_cast<const T*>(a.q) +
                    (static_cast<size_t>(b) * a.hq + static_cast<size_t>(h) * a.group) * D +
                    sub * 8;
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (g < a.group) {
        Unpack8<T>(__ldg(reinterpret_cast<const uint4*>(qrow + g * D)), qf[g]);
      }
    }
    const int32_t* pages = a.page_indices + a.page_indptr[b];
    const T* kbase = static_cast<const T*>(a.k_pool) + static_cast<size_t>(h) * kPageSize * D +
                     sub * 8;
    float* out = a.logits + static_cast<size_t>(row) * a.group * a.L;
#pragma unroll 1
    for (int l0 = 0; l0 < kLoads; l0 += kUnroll) {
      uint4 kv[kUnroll];
      int tok[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        tok[u] = j0 + (l0 + u) * kTokPerLoad + tok_in_load;
        kv[u] = make_uint4(0u, 0u, 0u, 0u);
        if (tok[u] < t) {
          const int page = __ldg(pages + tok[u] / kPageSize);
          kv[u] = __ldg(reinterpret_cast<const uint4*>(kbase + page * page_stride +
                                                       (tok[u] % kPageSize) * D));
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float kf[8];
        Unpack8<T>(kv[u], kf);
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          if (g < a.group) {  // warp-uniform
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) s = fmaf(qf[g][e], kf[e], s);
#pragma unroll
            for (int o = kLanes / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (sub == 0 && tok[u] < t) out[static_cast<size_t>(g) * a.L + tok[u]] = s * a.scale;
          }
        }
      }
    }
  }
}

// ---- (c1) refresh selection ---------------------------------------------------------------------
template <int kThreads>
__global__ void __launch_bounds__(kThreads) SelectKernel(Args a) {
  const int row = blockIdx.x;
  const int flag = a.refresh[row];
  if (flag == 0) return;
  __shared__ float red_m[kThreads / 32], red_l[kThreads / 32];
  __shared__ int scan[kThreads / 32];
  __shared__ float s_lse[kMaxGroup];
  __shared__ int hist[2][kHistCopies][256];  // per select, per warp pair (no cross-warp contention)
  __shared__ int hsum[2][256];
  __shared__ uint32_t s_prefix[2];
  __shared__ int s_rem[2], s_eq[2];
  const int tid = threadIdx.x;
  const int b = row / a.hkv;
  const int t = a.seq_lens[b];
  const int G = a.group;
  const float* lg = a.logits + static_cast<size_t>(row) * G * a.L;
  // kPages rows: the page scores are already in probs (PageScoreKernel); no lse, no δ. kApprox
  // rows likewise (ApproxScoreKernel's scores), over the token candidates [sink, t - local).
  const bool pages_mode = RowMode(a, row) == kPrhsModePages;
  const bool approx = RowMode(a, row) == kPrhsModeApprox;
  const bool pages = pages_mode || approx;

  // 1. lse per query head of the group.
  for (int g = 0; g < (pages ? 0 : G); ++g) {
    float m = -INFINITY, l = 0.f;
#pragma unroll 4
    for (int j = tid; j < t; j += kThreads) {
      const float x = lg[static_cast<size_t>(g) * a.L + j];
      if (x > m) {
        l = l * expf(m - x) + 1.f;
        m = x;
      } else {
        l += expf(x - m);
      }
    }
    const float lse = BlockLse<kThreads>(m, l, red_m, red_l);
    if (tid == 0) {
      s_lse[g] = lse;
      a.lse[static_cast<size_t>(row) * G + g] = lse;
    }
  }
  __syncthreads();
  const float inv_g = 1.f / static_cast<float>(G);
  float* pr = a.probs + static_cast<size_t>(row) * a.L;
  auto prob = [&](int j) {
    if (pages) return pr[j];
    float p = 0.f;
    for (int g = 0; g < G; ++g) p += expf(lg[static_cast<size_t>(g) * a.L + j] - s_lse[g]);
    return p * inv_g;
  };

  // 2. δ of the set in use until now.
  const int sink = RowSink(a, row), local = RowLocal(a, row);
  const int sink_eff = min(sink, t);
  const int local_start = max(t - local, sink_eff);
  const int srow = StateRow(a, row);
  int32_t* set = a.anchor_set + static_cast<size_t>(srow) * a.anchor_stride;
  if (a.delta != nullptr) {
    if (flag == 2 && !pages) {
      float kept = 0.f;
      for (int j = tid; j < sink_eff; j += kThreads) kept += prob(j);
      for (int j = local_start + tid; j < t; j += kThreads) kept += prob(j);
      const int cnt = min(a.anchor_count[srow], a.anchor_stride);
      for (int i = tid; i < cnt; i += kThreads) {
        const int j = set[i];
        if (j >= sink_eff && j < local_start) kept += prob(j);
      }
      kept = BlockSum<kThreads>(kept, red_m);
      if (tid == 0) a.delta[row] = fminf(fmaxf(1.f - kept, 0.f), 1.f);
    } else if (tid == 0) {
      a.delta[row] = __int_as_float(0x7fc00000);
    }
  }
  __syncthreads();  // every read of the old set is done before it is overwritten

  // 3. candidates [lo, hi).
  const int lo = pages_mode ? 0 : approx ? sink : max(sink, a.cand_lo != nullptr ? a.cand_lo[b] : 0);
  const int hi = pages_mode ? (t + kPageSize - 1) / kPageSize : t - local;
  const int n = hi - lo;
  const int k = RowTopK(a, row);
  if (n <= 0 || k <= 0) {
    if (tid == 0) a.anchor_count[srow] = 0;
    return;
  }
  if (k >= n) {  // every candidate; dilation cannot add anything inside [lo, hi)
    const int cnt = min(n, a.anchor_stride);
    for (int i = tid; i < cnt; i += kThreads) set[i] = lo + i;
    if (tid == 0) a.anchor_count[srow] = cnt;
    return;
  }
  const int m = a.dilate_r > 0 && RowMode(a, row) == kPrhsModeCis
                    ? static_cast<int>(a.m_fraction * static_cast<double>(k))
                    : 0;
  const int nsel = m > 0 ? 2 : 1;

  // 4. radix select of the k-th (and m-th) largest key; pass 0 also writes p_j. Each pass:
  // zero the private histograms, count (warp-aggregated atomics into the warp pair's copy),
  // sum the copies, then one warp per select picks the digit.
  const int warp = tid / 32;
  int* my_hist0 = hist[0][warp % kHistCopies];
  int* my_hist1 = hist[1][warp % kHistCopies];
  auto zero_hists = [&]() {
    for (int i = tid; i < 2 * kHistCopies * 256; i += kThreads) (&hist[0][0][0])[i] = 0;
  };
  auto sum_and_choose = [&](int shift, int selects) {
    __syncthreads();
    for (int i = tid; i < selects * 256; i += kThreads) {
      const int sel = i / 256, bin = i % 256;
      int c = 0;
#pragma unroll
      for (int cp = 0; cp < kHistCopies; ++cp) c += hist[sel][cp][bin];
      hsum[sel][bin] = c;
    }
    __syncthreads();
    if (warp < nsel) {
      ChooseDigit(hsum[selects == 1 ? 0 : warp], shift, &s_prefix[warp], &s_rem[warp],
                  &s_eq[warp]);
    }
    __syncthreads();
  };
  zero_hists();
  if (tid == 0) {
    s_prefix[0] = s_prefix[1] = 0u;
    s_rem[0] = k;
    s_rem[1] = m;
    s_eq[0] = s_eq[1] = 0;
  }
  __syncthreads();
  for (int base = lo; base < hi; base += kThreads * kPassUnroll) {
    int bin[kPassUnroll];
    float p[kPassUnroll];
#pragma unroll
    for (int u = 0; u < kPassUnroll; ++u) {  // all loads before any store (pr may alias lg)
      const int j = base + u * kThreads + tid;
      p[u] = j < hi ? prob(j) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kPassUnroll; ++u) {
      const int j = base + u * kThreads + tid;
      bin[u] = 256;
      if (j < hi) {
        pr[j] = p[u];
        bin[u] = static_cast<int>(OrderedKey(p[u]) >> 24);
      }
    }
#pragma unroll
    for (int u = 0; u < kPassUnroll; ++u) HistAdd(my_hist0, bin[u]);
  }
  sum_and_choose(24, 1);  // no prefix yet: both selects share pass 0's histogram
  for (int shift = 16; shift >= 0; shift -= 8) {
    zero_hists();
    __syncthreads();
    const uint32_t hmask = 0xffffffffu << (shift + 8);
    const uint32_t p0 = s_prefix[0], p1 = s_prefix[1];
    for (int base = lo; base < hi; base += kThreads * kPassUnroll) {
      uint32_t key[kPassUnroll];
      bool in[kPassUnroll];
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int j = base + u * kThreads + tid;
        in[u] = j < hi;
        key[u] = in[u] ? OrderedKey(pr[j]) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int digit = static_cast<int>((key[u] >> shift) & 255u);
        HistAdd(my_hist0, (in[u] && (key[u] & hmask) == p0) ? digit : 256);
        if (nsel == 2) HistAdd(my_hist1, (in[u] && (key[u] & hmask) == p1) ? digit : 256);
      }
    }
    sum_and_choose(shift, nsel);
  }

  // 5. keep-mask over [lo, hi): T (top-k; ties at the threshold lowest position first) and the
  // ±r neighbourhood of M (best m). Chunks of kThreads × kSegE positions; each thread owns
  // kSegE consecutive positions of a chunk and issues all their loads before using them (a
  // serial per-element loop paid one L2 latency per element). Dilation marks are plain byte
  // stores of 1 (concurrent writers store the same value).
  const uint32_t vk = s_prefix[0], vm = s_prefix[1];
  const int need_k = s_rem[0], need_m = s_rem[1];
  const bool tie_k = need_k < s_eq[0];
  const bool tie_m = nsel == 2 && need_m < s_eq[1];
  const int R = nsel == 2 ? a.dilate_r : 0;
  uint8_t* keep = a.flags + static_cast<size_t>(row) * a.L;
  for (int j = lo + tid; j < hi; j += kThreads) keep[j] = 0;
  __syncthreads();
  constexpr int kSegE = 8;
  constexpr int kChunk = kThreads * kSegE;
  int run_k = 0, run_m = 0;  // ties at the thresholds before this chunk (block-wide)
  for (int c0 = lo; c0 < hi; c0 += kChunk) {
    const int j0 = c0 + tid * kSegE;
    uint32_t key[kSegE];
#pragma unroll
    for (int e = 0; e < kSegE; ++e) key[e] = (j0 + e < hi) ? OrderedKey(pr[j0 + e]) : 0u;
    int rank_k = 0, rank_m = 0;
    if (tie_k || tie_m) {  // block-uniform
      int ck = 0, cm = 0;
#pragma unroll
      for (int e = 0; e < kSegE; ++e) {
        if (j0 + e < hi) {
          ck += key[e] == vk;
          cm += key[e] == vm;
        }
      }
      int tk = 0, tm = 0;
      rank_k = run_k + BlockExclusiveScan<kThreads>(ck, scan, &tk);
      rank_m = run_m + BlockExclusiveScan<kThreads>(cm, scan, &tm);
      run_k += tk;
      run_m += tm;
    }
#pragma unroll
    for (int e = 0; e < kSegE; ++e) {
      const int j = j0 + e;
      if (j < hi) {
        bool in_t = key[e] > vk;
        bool in_m = nsel == 2 && key[e] > vm;
        if (key[e] == vk) in_t = rank_k++ < need_k;
        if (nsel == 2 && key[e] == vm) in_m = rank_m++ < need_m;
        if (in_t) keep[j] = 1;
        if (in_m) {
          for (int d = 1; d <= R; ++d) {
            if (j - d >= lo) keep[j - d] = 1;
            if (j + d < hi) keep[j + d] = 1;
          }
        }
      }
    }
  }
  __syncthreads();

  // 6. compaction of the keep-mask into S_anchor (ascending), chunk by chunk.
  int out = 0;  // entries before this chunk (block-wide)
  for (int c0 = lo; c0 < hi; c0 += kChunk) {
    const int j0 = c0 + tid * kSegE;
    uint8_t kv[kSegE];
#pragma unroll
    for (int e = 0; e < kSegE; ++e) kv[e] = (j0 + e < hi) ? keep[j0 + e] : 0;
    int c = 0;
#pragma unroll
    for (int e = 0; e < kSegE; ++e) c += kv[e] != 0;
    int total = 0;
    int pos = out + BlockExclusiveScan<kThreads>(c, scan, &total);
#pragma unroll
    for (int e = 0; e < kSegE; ++e) {
      if (kv[e] != 0) {
        if (pos < a.anchor_stride) set[pos] = j0 + e;
        ++pos;
      }
    }
    out += total;
  }
  if (tid == 0) a.anchor_count[srow] = min(out, a.anchor_stride);
}

// ---- (c2) CSR index lists ----------------------------------------------------------------------
// Entries of S_anchor in row r's list (0 for kWindow rows, which have no CIS state).
__device__ __forceinline__ int ListMiddleCount(const Args& a, int r) {
  if (RowMode(a, r) == kPrhsModeWindow) return 0;
  const int sr = StateRow(a, r);
  return a.valid[sr] != 0 ? a.anchor_count[sr] : 0;
}

// Tokens of a kPages row's selected pages (all 16 of each but the sequence's last page, which
// holds t - 16 (P - 1)).
__device__ __forceinline__ int PageListCount(const Args& a, int r, int t) {
  const int sr = StateRow(a, r);
  const int cnt = a.anchor_count[sr];
  if (cnt <= 0) return 0;
  const int last = a.anchor_set[static_cast<size_t>(sr) * a.anchor_stride + cnt - 1];
  const int np = (t + kPageSize - 1) / kPageSize;
  return cnt * kPageSize - (last == np - 1 ? np * kPageSize - t : 0);
}

__device__ __forceinline__ int ListRowCount(const Args& a, int r) {
  const int t = a.seq_lens[r / a.hkv];
  if (RowTopK(a, r) < 0) return t;
  if (RowMode(a, r) == kPrhsModePages) return PageListCount(a, r, t);
  const int sink_eff = min(RowSink(a, r), t);
  const int local_start = max(t - RowLocal(a, r), sink_eff);
  return sink_eff + (t - local_start) + ListMiddleCount(a, r);
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) ListKernel(Args a) {
  __shared__ int scratch[kThreads / 32];
  const int row = blockIdx.x;
  int base = 0;
  for (int r = threadIdx.x; r < row; r += kThreads) base += ListRowCount(a, r);
  base = BlockSum<kThreads>(base, scratch);
  const int b = row / a.hkv;
  const int t = a.seq_lens[b];
  const int cnt = ListRowCount(a, row);
  if (threadIdx.x == 0) {
    if (row == 0) a.index_indptr[0] = 0;
    a.index_indptr[row + 1] = base + cnt;
  }
  const int64_t cap = a.index_capacity - base;  // entries this row may write
  int32_t* out = a.index_indices + base;
  if (RowTopK(a, row) < 0) {
    for (int i = threadIdx.x; i < t; i += kThreads) {
      if (i < cap) out[i] = i;
    }
    return;
  }
  const int srow = StateRow(a, row);
  if (RowMode(a, row) == kPrhsModePages) {  // the selected pages' tokens, ascending
    const int32_t* set = a.anchor_set + static_cast<size_t>(srow) * a.anchor_stride;
    for (int i = threadIdx.x; i < cnt; i += kThreads) {
      if (i < cap) out[i] = set[i / kPageSize] * kPageSize + i % kPageSize;
    }
    return;
  }
  const int sink_eff = min(RowSink(a, row), t);
  const int local_start = max(t - RowLocal(a, row), sink_eff);
  const int mid = ListMiddleCount(a, row);
  const int32_t* set = a.anchor_set + static_cast<size_t>(srow) * a.anchor_stride;
  for (int i = threadIdx.x; i < sink_eff; i += kThreads) {
    if (i < cap) out[i] = i;
  }
  for (int i = threadIdx.x; i < mid; i += kThreads) {
    const int v = set[i];
    if (sink_eff + i < cap) out[sink_eff + i] = (v >= sink_eff && v < local_start) ? v : -1;
  }
  for (int i = threadIdx.x; i < t - local_start; i += kThreads) {
    if (sink_eff + mid + i < cap) out[sink_eff + mid + i] = local_start + i;
  }
}

// ---- launchers (explicitly instantiated in selection_prhs.cu) ----------------------------------
template <typename T, int D>
cudaError_t LaunchGate(const Args& a, cudaStream_t stream) {
  const int blocks = (a.rows + kGateWarps - 1) / kGateWarps;
  GateKernel<T, D><<<blocks, kGateWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t LaunchQuest(const Args& a, bool bounds, int max_pages, cudaStream_t stream) {
  if (bounds) {
    BoundsKernel<T, D><<<dim3(a.rows, kBoundsSplit), 128, 0, stream>>>(a);
  } else {
    const int64_t warps = static_cast<int64_t>(a.rows) * max_pages;
    const int grid = static_cast<int>(std::min<int64_t>(
        (warps + kPageScoreWarps - 1) / kPageScoreWarps, int64_t{1} << 16));
    PageScoreKernel<T, D><<<std::max(grid, 1), kPageScoreWarps * 32, 0, stream>>>(a, max_pages);
  }
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t ScoreCtasPerSm(int group, int* ctas) {
  return group == 1 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, ScoreKernel<T, D, 1>,
                                                                    kScoreThreads, 0)
                    : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                          ctas, ScoreKernel<T, D, kMaxGroup>, kScoreThreads, 0);
}

template <typename T, int D>
cudaError_t LaunchScore(const Args& a, int grid, int max_chunks, cudaStream_t stream) {
  if (a.group == 1) {
    ScoreKernel<T, D, 1><<<grid, kScoreThreads, 0, stream>>>(a, max_chunks);
  } else {
    ScoreKernel<T, D, kMaxGroup><<<grid, kScoreThreads, 0, stream>>>(a, max_chunks);
  }
  return cudaGetLastError();
}

#define PREHOC_INSTANTIATE_PRHS_SELECT(T, D)                                                     \
  template cudaError_t prehoc::kernels::prhs::LaunchGate<T, D>(                                 \
      const prehoc::kernels::prhs::Args&, cudaStream_t);                                         \
  template cudaError_t prehoc::kernels::prhs::ScoreCtasPerSm<T, D>(int, int*);                        \
  template cudaError_t prehoc::kernels::prhs::LaunchQuest<T, D>(                                \
      const prehoc::kernels::prhs::Args&, bool, int, cudaStream_t);                              \
  template cudaError_t prehoc::kernels::prhs::LaunchScore<T, D>(                                \
      const prehoc::kernels::prhs::Args&, int, int, cudaStream_t);

}  // namespace prehoc::kernels::prhs

#endif  // PREHOC_WORKER_KERNELS_SELECTION_PRHS_CUH_
