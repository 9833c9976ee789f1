// Launchers of dlm_ops.h: argument checks and grid shapes. CUDA and std headers only.
#include <algorithm>
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

cudaError_t DlmQkvRopeScatter(const DlmKvScatterParams& p, int heads, const float* d_bias_q,
                              uint16_t* d_q_out, cudaStream_t stream) {
  if (p.m < 0 || p.kv_heads <= 0 || heads < p.kv_heads || p.head_dim <= 0 ||
      p.head_dim % 2 != 0 || p.layer < 0 || p.src_ld < heads * p.head_dim) {
    return cudaErrorInvalidValue;
  }
  if (p.m == 0) return cudaSuccess;
  if (p.d_src == nullptr || p.d_live_row == nullptr || p.d_live_req == nullptr ||
      p.d_caches == nullptr || p.d_inv_freq == nullptr || d_q_out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int pairs = heads * (p.head_dim / 2);
  const dim3 grid(p.m, (pairs + kThreads - 1) / kThreads);
  dlm_ops::QkvRopeScatterKernel<<<grid, kThreads, 0, stream>>>(p, heads, d_bias_q, d_q_out);
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

size_t DlmAttentionWorkFloats(int count, int m, int head_dim, int splits) {
  if (splits <= 1 || count <= 0 || m <= 0) return 0;
  return static_cast<size_t>(count) * splits * m * (head_dim + 2);
}

int DlmAttentionSplits(int count, int m, int n_keys, int num_sms) {
  const int tiles = (n_keys + dlm_ops::kAttnKeys - 1) / dlm_ops::kAttnKeys;
  if (count <= 0 || m <= 0 || tiles <= 1) return 1;
  const int64_t ctas = static_cast<int64_t>(count) * ((m + kDlmAttnRowsPerCta - 1) / kDlmAttnRowsPerCta);
  // The kernel fits 2 CTAs per SM (170 registers × 128 threads): one wave of at most
  // 2 · num_sms CTAs (rounding up made 288 CTAs for 32 heads on 132 SMs, a second wave).
  const int want = static_cast<int>(std::min<int64_t>(2 * std::max(num_sms, 1) / ctas, tiles));
  return std::max(want, 1);
}

namespace {

template <int HD>
cudaError_t LaunchFusedAttention(const DlmAttentionParams& p, cudaStream_t stream) {
  constexpr int smem = dlm_ops::AttnSmemBytes<HD>();
  // Above the 48 KiB default for HD = 128; idempotent, so a race between threads is harmless.
  static bool attr_set = false;
  if (!attr_set) {
    const cudaError_t e = cudaFuncSetAttribute(dlm_ops::FusedAttentionKernel<HD>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    attr_set = true;
  }
  const unsigned row_blocks = (p.m + kDlmAttnRowsPerCta - 1) / kDlmAttnRowsPerCta;
  dlm_ops::FusedAttentionKernel<HD>
      <<<dim3(p.count, p.splits, row_blocks), dlm_ops::kAttnThreads, smem, stream>>>(p);
  if (p.splits > 1) {
    dlm_ops::AttentionCombineKernel<HD><<<dim3(p.count, p.m), HD, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t DlmFusedAttention(const DlmAttentionParams& p, cudaStream_t stream) {
  if (p.count < 0 || p.m < 1 || p.m > (1 << 22) || p.n_keys < 1 ||
      (p.head_dim != 64 && p.head_dim != 128) || p.ldq < p.head_dim || p.ldq % 2 != 0 ||
      p.splits < 1 || p.count > 0x7fffffff / std::max(p.splits, 1)) {
    return cudaErrorInvalidValue;
  }
  if (p.count == 0) return cudaSuccess;
  if (p.d_k == nullptr || p.d_q == nullptr || p.d_v == nullptr || p.d_o == nullptr ||
      (p.splits > 1 && p.d_work == nullptr)) {
    return cudaErrorInvalidValue;
  }
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      major < 8) {
    cudaGetLastError();
    return cudaErrorInvalidValue;
  }
  return p.head_dim == 64 ? LaunchFusedAttention<64>(p, stream)
                          : LaunchFusedAttention<128>(p, stream);
}

}  // namespace prehoc::kernels
