// Launchers of dlm_ops.h: argument checks and grid shapes. CUDA and std headers only.
#include <cstdint>

#include "worker/kernels/dlm_ops.cuh"

namespace prehoc::kernels {

using dlm_ops::kThreads;

cudaError_t DlmKvScatter(const DlmKvScatterParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.kv_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 || p.layer < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.m == 0 || (p.k_col < 0 && p.v_col < 0)) return cudaSuccess;
  if (p.d_src == nullptr || p.d_live_row == nullptr || p.d_live_req == nullptr ||
      p.d_caches == nullptr || (p.k_col >= 0 && p.d_inv_freq == nullptr)) {
    return cudaErrorInvalidValue;
  }
  dlm_ops::KvScatterKernel<<<p.m, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t DlmRopeQ(const float* d_src, int src_ld, const float* d_bias, const int32_t* d_sel,
                     const int32_t* d_live_row, int m, int heads, int head_dim,
                     const float* d_inv_freq, uint16_t* d_q_out, cudaStream_t stream) {
  if (m < 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 != 0) return cudaErrorInvalidValue;
  if (src_ld == 0) src_ld = heads * head_dim;
  if (src_ld < heads * head_dim) return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  if (d_src == nullptr || d_live_row == nullptr || d_inv_freq == nullptr || d_q_out == nullptr) {
    return cudaErrorInvalidValue;
  }
  dlm_ops::RopeQKernel<<<m, kThreads, 0, stream>>>(d_src, src_ld, d_bias, d_sel, d_live_row,
                                                   heads, head_dim, d_inv_freq, d_q_out);
  return cudaGetLastError();
}

cudaError_t DlmCosineStore(const DlmCosineParams& p, cudaStream_t stream) {
  if (p.n < 0 || p.width <= 0 || p.layer < 0) return cudaErrorInvalidValue;
  if (p.target == DlmCosineTarget::kValue && (p.head_dim <= 0 || p.width % p.head_dim != 0)) {
    return cudaErrorInvalidValue;
  }
  if (p.n == 0) return cudaSuccess;
  if (p.d_src == nullptr || p.d_live_row == nullptr || p.d_live_req == nullptr ||
      p.d_caches == nullptr) {
    return cudaErrorInvalidValue;
  }
  dlm_ops::CosineStoreKernel<<<(p.n + 3) / 4, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t DlmSelectSmallest(const float* d_cos, const int32_t* d_seg_begin,
                              const int32_t* d_seg_len, const int32_t* d_k,
                              const int32_t* d_out_off, int num_requests, int32_t* d_sel,
                              int32_t* d_inv, cudaStream_t stream) {
  if (num_requests < 0) return cudaErrorInvalidValue;
  if (num_requests == 0) return cudaSuccess;
  if (d_cos == nullptr || d_seg_begin == nullptr || d_seg_len == nullptr || d_k == nullptr ||
      d_out_off == nullptr || d_sel == nullptr || d_inv == nullptr) {
    return cudaErrorInvalidValue;
  }
  dlm_ops::SelectSmallestKernel<<<num_requests, kThreads, 0, stream>>>(
      d_cos, d_seg_begin, d_seg_len, d_k, d_out_off, d_sel, d_inv);
  return cudaGetLastError();
}

cudaError_t DlmSoftmaxRowsToBf16(const float* d_s, int64_t rows, int cols, uint16_t* d_p,
                                 cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (d_s == nullptr || d_p == nullptr) return cudaErrorInvalidValue;
  dlm_ops::SoftmaxKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(d_s, cols, d_p);
  return cudaGetLastError();
}

cudaError_t DlmAddRmsNorm(const float* d_x, const int32_t* d_sel, float* d_a, const float* d_bo,
                          int m, int d, const float* d_w, float eps, uint16_t* d_out,
                          cudaStream_t stream) {
  if (m < 0 || d <= 0) return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  if (d_x == nullptr || d_a == nullptr || d_w == nullptr || d_out == nullptr) {
    return cudaErrorInvalidValue;
  }
  dlm_ops::AddRmsNormKernel<<<m, kThreads, 0, stream>>>(d_x, d_sel, d_a, d_bo, d, d_w, eps, d_out);
  return cudaGetLastError();
}

cudaError_t DlmResidual(float* d_x, const int32_t* d_inv, const float* d_fresh, int n, int d,
                        int layer, const int32_t* d_live_row, const int32_t* d_live_req,
                        const DlmCacheView* d_caches, cudaStream_t stream) {
  if (n < 0 || d <= 0 || layer < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (d_x == nullptr || d_live_row == nullptr || d_live_req == nullptr || d_caches == nullptr) {
    return cudaErrorInvalidValue;
  }
  dlm_ops::ResidualKernel<<<n, kThreads, 0, stream>>>(d_x, d_inv, d_fresh, d, layer, d_live_row,
                                                      d_live_req, d_caches, nullptr, 0.0f,
                                                      nullptr);
  return cudaGetLastError();
}

cudaError_t DlmResidualRmsNorm(float* d_x, const int32_t* d_inv, const float* d_fresh, int n,
                               int d, int layer, const int32_t* d_live_row,
                               const int32_t* d_live_req, const DlmCacheView* d_caches,
                               const float* d_w, float eps, uint16_t* d_out, cudaStream_t stream) {
  if (n < 0 || d <= 0 || layer < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (d_x == nullptr || d_live_row == nullptr || d_live_req == nullptr || d_caches == nullptr ||
      d_w == nullptr || d_out == nullptr) {
    return cudaErrorInvalidValue;
  }
  dlm_ops::ResidualKernel<<<n, kThreads, 0, stream>>>(d_x, d_inv, d_fresh, d, layer, d_live_row,
                                                      d_live_req, d_caches, d_w, eps, d_out);
  return cudaGetLastError();
}

cudaError_t DlmTop1(const float* d_logits, int rows, int vocab, int32_t* d_top1, float* d_prob,
                    cudaStream_t stream) {
  if (rows < 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (d_logits == nullptr || d_top1 == nullptr || d_prob == nullptr) return cudaErrorInvalidValue;
  dlm_ops::Top1Kernel<<<rows, kThreads, 0, stream>>>(d_logits, vocab, d_top1, d_prob);
  return cudaGetLastError();
}

}  // namespace prehoc::kernels
