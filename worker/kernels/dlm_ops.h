// Row-wise kernels of the diffusion-LM forward with per-layer caches on CUDA
// (worker/dlm/cuda_forward.h): scatter of fresh K/V rows into a request's per-layer cache, the
// cosine row-selection signal (SPA proxies, dLLM-Cache values), the per-request k-smallest
// selection, the residual update from cached / fresh layer outputs, a softmax for attention
// through cuBLAS, and the top-1 token with its probability. Host API; kernels in dlm_ops.cuh,
// launched from dlm_ops.cu. CUDA and std headers only.
//
// ---------------------------------------------------------------------------------------------
// Conventions (device pointers, row-major, contiguous; bf16 = bfloat16 bits in uint16_t):
//   A step carries n *live* rows, numbered i in [0, n) over the whole batch (each request's live
//   rows are contiguous, in increasing canvas position). live_row[i] is the row's canvas position
//   in its request, live_req[i] the request (an index into `caches`).
//   A row list `sel` ([m] int32, entries in [0, n)) names the live rows an op works on; null
//   means the identity (m == n).
//   Per request b, caches[b] (a DlmCacheView, in device memory) addresses its caches:
//     k, v   bf16 [layers][Hkv][rows][head_dim]   post-RoPE K and V of every canvas row
//     delta  f32  [layers][rows][hidden]          each layer's residual update (attn + MLP out)
//     proxy  f32  [layers][rows][proxy_rank]      singular proxies (may be null when rank 0)
// RoPE is "rotate_half" at the row's canvas position (as model_ops.h RopeAppendKv).
// Every launcher returns cudaErrorInvalidValue for ill-formed arguments, otherwise the launch
// error; execution is asynchronous on `stream`. Zero rows launch nothing.
// ---------------------------------------------------------------------------------------------
#ifndef PREHOC_WORKER_KERNELS_DLM_OPS_H_
#define PREHOC_WORKER_KERNELS_DLM_OPS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prehoc::kernels {

struct DlmCacheView {
  uint16_t* k = nullptr;
  uint16_t* v = nullptr;
  float* delta = nullptr;
  float* proxy = nullptr;
  int rows = 0;
  // Canvas rows [proxy_lo, proxy_hi) whose proxies DlmCosineStore writes (the response rows).
  int proxy_lo = 0, proxy_hi = 0;
};

// Fresh K and/or V of m rows into the caches of `layer`:
//   row j is live row i = sel ? sel[j] : j;  kh = kv head, e = element within the head
//   K: x = src[j][k_col + kh*hd + e] (+ bias_k), rotated at live_row[i], stored at
//      caches[live_req[i]].k[layer][kh][live_row[i]][e]  (skipped when k_col < 0)
//   V: src[j][v_col + kh*hd + e] (+ bias_v) → .v likewise (skipped when v_col < 0)
// src f32 [m][src_ld]; inv_freq f32 [head_dim / 2].
struct DlmKvScatterParams {
  int m = 0;
  int kv_heads = 0, head_dim = 0, layer = 0;
  const float* d_src = nullptr;
  int src_ld = 0, k_col = -1, v_col = -1;
  const float* d_bias_k = nullptr;
  const float* d_bias_v = nullptr;
  const int32_t* d_sel = nullptr;
  const int32_t* d_live_row = nullptr;
  const int32_t* d_live_req = nullptr;
  const DlmCacheView* d_caches = nullptr;
  const float* d_inv_freq = nullptr;
};
cudaError_t DlmKvScatter(const DlmKvScatterParams& p, cudaStream_t stream);

// q_out[j] = bf16(RoPE(src[j] + bias, live_row[sel ? sel[j] : j])) for m rows of `heads` heads.
// src f32 [m][src_ld] (the first heads*head_dim columns; src_ld = 0 means heads*head_dim — e.g.
// a fused Q|K|V projection passes its full width), bias f32 or null, q_out bf16
// [m][heads*head_dim].
cudaError_t DlmRopeQ(const float* d_src, int src_ld, const float* d_bias, const int32_t* d_sel,
                     const int32_t* d_live_row, int m, int heads, int head_dim,
                     const float* d_inv_freq, uint16_t* d_q_out, cudaStream_t stream);

// DlmRopeQ and DlmKvScatter of one fused Q|K|V projection in one launch (the same values, bit for
// bit): q_out[j] = bf16(RoPE(src[j][0, heads·hd) + bias_q)) ([m][heads·hd]), and K (k_col) / V
// (v_col) of the same rows into the caches as DlmKvScatter. REQUIRES: kv_heads <= heads,
// src_ld >= heads·head_dim. One thread per rotation pair: m × heads·hd/2 threads (DlmKvScatter
// and DlmRopeQ run one block per row).
cudaError_t DlmQkvRopeScatter(const DlmKvScatterParams& p, int heads, const float* d_bias_q,
                              uint16_t* d_q_out, cudaStream_t stream);

// For every live row i in [0, n): new = src[i] (+ bias), old = the cached value of the row at
// `layer` (target kProxy: caches[b].proxy, width = proxy rank; kValue: caches[b].v, width =
// kv_heads·head_dim, head-major). cos_out[i] (if not null) = new·old / max(|new|·|old|, 1e-8);
// then the cache row ← new (kProxy: only for rows in [proxy_lo, proxy_hi) of their request).
enum class DlmCosineTarget { kProxy, kValue };
struct DlmCosineParams {
  int n = 0, width = 0, layer = 0, head_dim = 0;
  DlmCosineTarget target = DlmCosineTarget::kProxy;
  const float* d_src = nullptr;
  const float* d_bias = nullptr;
  const int32_t* d_live_row = nullptr;
  const int32_t* d_live_req = nullptr;
  const DlmCacheView* d_caches = nullptr;
  float* d_cos_out = nullptr;
};
cudaError_t DlmCosineStore(const DlmCosineParams& p, cudaStream_t stream);

// Per request b (one block each): among live rows [seg_begin[b], seg_begin[b] + seg_len[b]) the
// k[b] with the smallest cos (ties: the lower index) are written, ascending, to
// sel[out_off[b] ...]; inv[i] = the row's position in sel, or −1. REQUIRES: k[b] <= seg_len[b]
// <= kDlmSelectMaxRows; segments disjoint.
constexpr int kDlmSelectMaxRows = 8192;
cudaError_t DlmSelectSmallest(const float* d_cos, const int32_t* d_seg_begin,
                              const int32_t* d_seg_len, const int32_t* d_k,
                              const int32_t* d_out_off, int num_requests, int32_t* d_sel,
                              int32_t* d_inv, cudaStream_t stream);

// P[r][t] = bf16(softmax_t(S[r][t])) over rows of length `cols` (fp32 max / exp / sum).
cudaError_t DlmSoftmaxRowsToBf16(const float* d_s, int64_t rows, int cols, uint16_t* d_p,
                                 cudaStream_t stream);

// The attention output's residual and the MLP input, for m recomputed rows:
//   a[j] += bo (if not null);  xm = x[sel ? sel[j] : j] + a[j];
//   out[j] = bf16(w · xm / sqrt(mean(xm²) + eps)).
// x f32 [n][d], a f32 [m][d] (updated in place), w f32 [d], out bf16 [m][d].
cudaError_t DlmAddRmsNorm(const float* d_x, const int32_t* d_sel, float* d_a, const float* d_bo,
                          int m, int d, const float* d_w, float eps, uint16_t* d_out,
                          cudaStream_t stream);

// Residual update of every live row at `layer`: j = inv ? inv[i] : i; if j >= 0 the row's fresh
// update fresh[j] is stored as its cached delta; then x[i] += cached delta.
// x f32 [n][d], fresh f32 [m][d].
cudaError_t DlmResidual(float* d_x, const int32_t* d_inv, const float* d_fresh, int n, int d,
                        int layer, const int32_t* d_live_row, const int32_t* d_live_req,
                        const DlmCacheView* d_caches, cudaStream_t stream);

// DlmResidual fused with the next layer's input norm (one pass over x instead of two): the same
// update of x, then out[i] = bf16(w · x[i] / sqrt(mean(x[i]²) + eps)) for every live row i —
// RmsNormToBf16 (model_ops.h) of the updated rows. w f32 [d], out bf16 [n][d].
cudaError_t DlmResidualRmsNorm(float* d_x, const int32_t* d_inv, const float* d_fresh, int n,
                               int d, int layer, const int32_t* d_live_row,
                               const int32_t* d_live_req, const DlmCacheView* d_caches,
                               const float* d_w, float eps, uint16_t* d_out, cudaStream_t stream);

// Attention of query rows over all keys, fused (flash style: S and P stay on chip): the
// cached steps' few selected rows, and whole canvases. For entry e in [0, count) — one (request, query head) — with
// K = k[e], V = v[e] ([n_keys][head_dim] bf16, contiguous rows), Q = q[e] and O = o[e] ([m]
// rows of head_dim bf16 at row stride ldq):
//   O[r] = bf16( Σ_t softmax_t(scale · Q[r]·K[t]) V[t] )  for r < m.
// Tensor cores (bf16 mma.sync, f32 accumulation, P rounded to bf16 before P·V as in the
// unfused path); one CTA per (entry, key split, block of kDlmAttnRowsPerCta rows); the keys are
// split over `splits` CTAs whose partial results (unnormalised O, row max, row sum) go to d_work
// and are merged by a second kernel (splits == 1: written directly). REQUIRES: m >= 1, head_dim
// 64 or 128, ldq >= head_dim and even; splits >= 1; d_work holds DlmAttentionWorkFloats(...)
// floats when splits > 1. Needs sm_80+ (mma.sync bf16); cudaErrorInvalidValue otherwise.
constexpr int kDlmAttnRowsPerCta = 64;
struct DlmAttentionParams {
  int count = 0, m = 0, n_keys = 0, head_dim = 0, ldq = 0, splits = 1;
  float scale = 1.0f;
  const void* const* d_k = nullptr;  // [count] device pointer arrays (in device memory)
  const void* const* d_q = nullptr;
  const void* const* d_v = nullptr;
  void* const* d_o = nullptr;
  float* d_work = nullptr;
};
cudaError_t DlmFusedAttention(const DlmAttentionParams& p, cudaStream_t stream);
// Floats of d_work for (count, m, head_dim, splits); 0 when splits == 1.
size_t DlmAttentionWorkFloats(int count, int m, int head_dim, int splits);
// A split count that fills one wave of ≈ 2 CTAs per SM with count · ceil(m / 64) · splits CTAs
// (at least 1, at most one split per 64-key tile).
int DlmAttentionSplits(int count, int m, int n_keys, int num_sms);

// Per logits row: top1[r] = the first index of the maximum (NaN never wins; all NaN → 0),
// prob[r] = 1 / Σ_v exp(l[v] − l[top1]) (its softmax probability, fp32).
cudaError_t DlmTop1(const float* d_logits, int rows, int vocab, int32_t* d_top1, float* d_prob,
                    cudaStream_t stream);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_DLM_OPS_H_
