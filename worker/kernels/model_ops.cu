// Launchers of model_ops.h: argument checks, the one switch from the row width to the block size
// of the row-wise kernels, and the explicit instantiations (2 block sizes x 4 row kernels).
#include <algorithm>
#include <cstdint>

#include "worker/kernels/model_ops.cuh"

namespace prehoc::kernels {
namespace model_ops {

#define PREHOC_INSTANTIATE_MODEL_OPS(N)                                                        \
  template __global__ void EmbeddingKernel<N>(const uint16_t*, const int32_t*, int, int,        \
                                              float*);                                          \
  template __global__ void RmsNormKernel<N>(const float*, const int32_t*, int, const float*,    \
                                            float, uint16_t*);                                  \
  template __global__ void RopeAppendKernel<N>(RopeAppendParams);                               \
  template __global__ void ArgMaxKernel<N>(const float*, int, int32_t*);
PREHOC_INSTANTIATE_MODEL_OPS(128)
PREHOC_INSTANTIATE_MODEL_OPS(256)
#undef PREHOC_INSTANTIATE_MODEL_OPS

}  // namespace model_ops

namespace {

// The one runtime -> template switch: rows of up to 1024 elements get 128 threads, longer ones
// 256 (a decode step has few rows, so wider blocks keep more loads in flight per row).
template <typename F>
cudaError_t ByWidth(int64_t width, F&& f) {
  return width <= 1024 ? f.template operator()<128>() : f.template operator()<256>();
}

// Blocks for a grid-stride element-wise kernel of n elements.
unsigned GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, int64_t{132} * 16));
}

}  // namespace

cudaError_t ModelOpsCheckDevice() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, model_ops::FillF32Kernel);
}

cudaError_t EmbeddingGather(const uint16_t* d_table, const int32_t* d_tokens, int rows, int d,
                            int vocab, float* d_x, cudaStream_t stream) {
  if (rows < 0 || d <= 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (d_table == nullptr || d_tokens == nullptr || d_x == nullptr) return cudaErrorInvalidValue;
  return ByWidth(d, [&]<int N>() {
    model_ops::EmbeddingKernel<N><<<rows, N, 0, stream>>>(d_table, d_tokens, d, vocab, d_x);
    return cudaGetLastError();
  });
}

cudaError_t RmsNormToBf16(const float* d_x, const int32_t* d_rows, int rows, int d,
                          const float* d_w, float eps, uint16_t* d_y, cudaStream_t stream) {
  if (rows < 0 || d <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (d_x == nullptr || d_w == nullptr || d_y == nullptr) return cudaErrorInvalidValue;
  return ByWidth(d, [&]<int N>() {
    model_ops::RmsNormKernel<N><<<rows, N, 0, stream>>>(d_x, d_rows, d, d_w, eps, d_y);
    return cudaGetLastError();
  });
}

cudaError_t RopeAppendKv(const RopeAppendParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.head_dim % 2 != 0 || p.page_size <= 0) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  if (p.d_qkv == nullptr || p.d_pos == nullptr || p.d_slot == nullptr ||
      p.d_inv_freq == nullptr || p.d_q_out == nullptr || p.d_k_pool == nullptr ||
      p.d_v_pool == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t width = static_cast<int64_t>(p.num_q_heads + p.num_kv_heads) * p.head_dim / 2;
  return ByWidth(width, [&]<int N>() {
    model_ops::RopeAppendKernel<N><<<p.rows, N, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t SiluMulToBf16(const float* d_gate_up, int rows, int f, uint16_t* d_out,
                          cudaStream_t stream) {
  if (rows < 0 || f <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (d_gate_up == nullptr || d_out == nullptr) return cudaErrorInvalidValue;
  const int64_t n = static_cast<int64_t>(rows) * f;
  model_ops::SiluMulKernel<<<GridFor(n, 256), 256, 0, stream>>>(d_gate_up, rows, f, d_out);
  return cudaGetLastError();
}

cudaError_t AddResidual(float* d_x, const float* d_y, const float* d_bias, int rows, int d,
                        cudaStream_t stream) {
  if (rows < 0 || d <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (d_x == nullptr || (d_y == nullptr && d_bias == nullptr)) return cudaErrorInvalidValue;
  const int64_t n = static_cast<int64_t>(rows) * d;
  model_ops::AddResidualKernel<<<GridFor(n, 256), 256, 0, stream>>>(d_x, d_y, d_bias, rows, d);
  return cudaGetLastError();
}

cudaError_t ArgMaxRows(const float* d_logits, int rows, int vocab, int32_t* d_out,
                       cudaStream_t stream) {
  if (rows < 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (d_logits == nullptr || d_out == nullptr) return cudaErrorInvalidValue;
  return ByWidth(vocab, [&]<int N>() {
    model_ops::ArgMaxKernel<N><<<rows, N, 0, stream>>>(d_logits, vocab, d_out);
    return cudaGetLastError();
  });
}

cudaError_t FillUniformBf16(uint16_t* d, size_t n, float amplitude, uint64_t seed,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (d == nullptr) return cudaErrorInvalidValue;
  model_ops::FillUniformBf16Kernel<<<GridFor(static_cast<int64_t>(n), 256), 256, 0, stream>>>(
      d, n, amplitude, seed);
  return cudaGetLastError();
}

cudaError_t FillF32(float* d, size_t n, float value, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (d == nullptr) return cudaErrorInvalidValue;
  model_ops::FillF32Kernel<<<GridFor(static_cast<int64_t>(n), 256), 256, 0, stream>>>(d, n,
                                                                                      value);
  return cudaGetLastError();
}

cudaError_t CopyPagesBf16(const uint16_t* d_src, uint16_t* d_dst, const int32_t* d_pages,
                          int n_pages, int64_t page_elems, cudaStream_t stream) {
  if (n_pages < 0 || page_elems <= 0) return cudaErrorInvalidValue;
  if (n_pages == 0) return cudaSuccess;
  if (d_src == nullptr || d_dst == nullptr || d_pages == nullptr || d_src == d_dst) {
    return cudaErrorInvalidValue;
  }
  const unsigned blocks = static_cast<unsigned>(std::min(n_pages, 132 * 16));
  const bool vec = page_elems % 8 == 0 && reinterpret_cast<uintptr_t>(d_src) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(d_dst) % 16 == 0;
  if (vec) {
    model_ops::CopyPagesKernel<uint4><<<blocks, 256, 0, stream>>>(
        reinterpret_cast<const uint4*>(d_src), reinterpret_cast<uint4*>(d_dst), d_pages, n_pages,
        page_elems / 8);
  } else {
    model_ops::CopyPagesKernel<uint16_t>
        <<<blocks, 256, 0, stream>>>(d_src, d_dst, d_pages, n_pages, page_elems);
  }
  return cudaGetLastError();
}

}  // namespace prehoc::kernels
