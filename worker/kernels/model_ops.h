// Element-wise and row-wise ops of the Llama-family forward pass on CUDA (everything except the
// GEMMs, which go through cuBLAS, and attention, in paged_decode.h / prefill_attention.h). Host
// API; kernels in model_ops.cuh, instantiated in model_ops.cu. Includes only CUDA and std headers.
//
// ---------------------------------------------------------------------------------------------
// Conventions (all device pointers, row-major, contiguous):
//   f32  = float, bf16 = bfloat16 stored as uint16_t bits (round to nearest even on output).
//   The residual stream x is f32 [rows][hidden]; GEMM inputs are bf16; GEMM outputs are f32.
//   Row counts are >= 0 (0 launches nothing and returns cudaSuccess).
// The numerics follow the CPU reference (worker/backends/cpu/cpu_ops.h, worker/rope.h) in fp32
// with IEEE expf / sqrtf / sincosf (no fast-math intrinsics); only the bf16 rounding of outputs
// and the order of fp32 sums differ.
// Every launcher returns cudaErrorInvalidValue for ill-formed arguments (null pointers where one
// is required, negative sizes), otherwise the launch error; execution is asynchronous on `stream`.
// ---------------------------------------------------------------------------------------------
#ifndef PREHOC_WORKER_KERNELS_MODEL_OPS_H_
#define PREHOC_WORKER_KERNELS_MODEL_OPS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace prehoc::kernels {

// cudaSuccess when this library's kernels have an image for the current device (e.g.
// cudaErrorNoKernelImageForDevice when built for sm_90a and run elsewhere).
cudaError_t ModelOpsCheckDevice();

// x[r][j] = float(table[tokens[r]][j]).  table bf16 [vocab][d], tokens int32 [rows], x f32
// [rows][d]. A token outside [0, vocab) gives a row of NaN (visible, never an out-of-range read).
cudaError_t EmbeddingGather(const uint16_t* d_table, const int32_t* d_tokens, int rows, int d,
                            int vocab, float* d_x, cudaStream_t stream);

// RMSNorm of selected rows into bf16:
//   src = d_rows ? d_rows[r] : r;  inv = 1 / sqrt(mean_j x[src][j]^2 + eps)
//   y[r][j] = bf16(w[j] * (x[src][j] * inv))
// x f32 [*][d], w f32 [d], d_rows int32 [rows] or null, y bf16 [rows][d].
cudaError_t RmsNormToBf16(const float* d_x, const int32_t* d_rows, int rows, int d,
                          const float* d_w, float eps, uint16_t* d_y, cudaStream_t stream);

// Rotary embedding of q and k plus the K/V append into the paged pools, for one layer.
//   qkv  f32 [rows][(Hq + 2 Hkv) * head_dim]  (the fused projection: q heads, then k, then v)
//   bias f32 [(Hq + 2 Hkv) * head_dim] or null (added to qkv first, as the projection bias)
//   pos  int32 [rows]  logical position of each row (the rotation angle is pos * inv_freq[i])
//   slot int32 [rows]  physical slot page * page_size + pos % page_size of the row's K/V in the
//                      pools, or < 0 to skip the append for that row
//   inv_freq f32 [head_dim / 2]  (worker/rope.h RopeInvFrequencies, scaling already applied)
//   q_out bf16 [rows][Hq][head_dim]  rotated q
//   k_pool, v_pool bf16 [num_pages][Hkv][page_size][head_dim]  (paged_decode.h's layout)
// Rotation ("rotate_half", h = head_dim / 2): x'[i] = x[i] cos - x[i+h] sin,
// x'[i+h] = x[i+h] cos + x[i] sin with (sin, cos) = sincosf(float(pos) * inv_freq[i]).
// REQUIRES: head_dim even; slots distinct across rows.
struct RopeAppendParams {
  int rows = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int page_size = 16;
  const float* d_qkv = nullptr;
  const float* d_bias = nullptr;
  const int32_t* d_pos = nullptr;
  const int32_t* d_slot = nullptr;
  const float* d_inv_freq = nullptr;
  uint16_t* d_q_out = nullptr;
  uint16_t* d_k_pool = nullptr;
  uint16_t* d_v_pool = nullptr;
};
cudaError_t RopeAppendKv(const RopeAppendParams& p, cudaStream_t stream);

// SwiGLU on the fused gate/up projection: gu f32 [rows][2 * f] (gate in columns [0, f), up in
// [f, 2f)); out bf16 [rows][f] = bf16(silu(gate) * up), silu(g) = g / (1 + expf(-g)).
cudaError_t SiluMulToBf16(const float* d_gate_up, int rows, int f, uint16_t* d_out,
                          cudaStream_t stream);

// Residual add: x[r][j] += (y ? y[r][j] : 0) + (bias ? bias[j] : 0).  x, y f32 [rows][d],
// bias f32 [d]. y and bias may not both be null.
cudaError_t AddResidual(float* d_x, const float* d_y, const float* d_bias, int rows, int d,
                        cudaStream_t stream);

// Greedy token per row: out[r] = the smallest j maximising logits[r][j] (NaN never wins; a row
// of only NaN / -inf gives 0, as worker/sampler.h ArgMax). logits f32 [rows][vocab], out int32.
cudaError_t ArgMaxRows(const float* d_logits, int rows, int vocab, int32_t* d_out,
                       cudaStream_t stream);

// Fills d[i] = bf16(amplitude * u_i), u_i uniform in [-1, 1) from a hash of (seed, i). For
// random benchmark weights and KV contents.
cudaError_t FillUniformBf16(uint16_t* d, size_t n, float amplitude, uint64_t seed,
                            cudaStream_t stream);

// d[i] = value.
cudaError_t FillF32(float* d, size_t n, float value, cudaStream_t stream);

// Whole-page copy between two pools of one layout (ETF: a frozen prefix's K or V pages from the
// previous layer's pool into this layer's): for i in [0, n_pages), the page_elems bf16 elements
// of page pages[i] in src are copied to the same page of dst:
//   dst[pages[i] * page_elems + j] = src[pages[i] * page_elems + j],  j in [0, page_elems).
// pages int32 [n_pages], distinct and >= 0; src and dst distinct (non-overlapping) pools. Other
// pages of dst are untouched. 16-byte vector copies when page_elems % 8 == 0 and both pools are
// 16-byte aligned, element copies otherwise.
cudaError_t CopyPagesBf16(const uint16_t* d_src, uint16_t* d_dst, const int32_t* d_pages,
                          int n_pages, int64_t page_elems, cudaStream_t stream);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_MODEL_OPS_H_
