// SkinnyGemmBf16 vs cuBLAS (cublasGemmEx, default algorithm: what CudaDlmModel used before) at
// the GEMM shapes of a batch-1 cached step at LLaDA-8B shape, and the device's copy bandwidth:
// µs per call and W bytes / time. Weights rotate over enough copies that no call hits L2.
//
//   skinny_gemm_bench [--rows=8,32,41,64] [--iters=20]
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "worker/kernels/skinny_gemm.h"

namespace {

#define CK(x)                                                              \
  do {                                                                     \
    auto e_ = (x);                                                         \
    if (static_cast<int>(e_) != 0) {                                       \
      std::fprintf(stderr, "%s failed: %d\n", #x, static_cast<int>(e_));   \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

// Every bf16 = 0x3c3c (≈ 0.0115): values do not change the time.
void Fill(uint16_t* d, size_t n) { CK(cudaMemset(d, 0x3c, n * 2)); }

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> rows = {8, 32, 41, 64};
  int iters = 20;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--rows=", 0) == 0) {
      rows.clear();
      for (auto p : absl::StrSplit(a.substr(7), ',')) {
        int v = 0;
        if (absl::SimpleAtoi(p, &v)) rows.push_back(v);
      }
    } else if (a.rfind("--iters=", 0) == 0) {
      if (!absl::SimpleAtoi(a.substr(8), &iters)) return 2;
    } else {
      std::fprintf(stderr, "usage: skinny_gemm_bench [--rows=8,32,41,64] [--iters=20]\n");
      return 2;
    }
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  cublasHandle_t h;
  CK(cublasCreate(&h));
  CK(cublasSetStream(h, stream));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  // Copy bandwidth: 1 GiB device-to-device, (read + write) / time.
  {
    const size_t bytes = size_t{1} << 30;
    void *a = nullptr, *b = nullptr;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    CK(cudaEventRecord(e0, stream));
    for (int i = 0; i < 5; ++i) CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    CK(cudaEventRecord(e1, stream));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    std::printf("device %s (%d SMs); copy bandwidth (read + write) %.0f GB/s\n", prop.name,
                prop.multiProcessorCount, 2.0 * bytes * 5 / (ms * 1e-3) / 1e9);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  struct Shape {
    const char* name;
    int n, k;
  };
  const Shape shapes[] = {{"q/o 4096x4096", 4096, 4096},   {"kv 8192x4096", 8192, 4096},
                          {"gate/up 24576x4096", 24576, 4096}, {"down 4096x12288", 4096, 12288},
                          {"lm_head 126464x4096", 126464, 4096}};
  std::printf("%-22s %5s %12s %12s %12s %12s %8s\n", "shape", "rows", "cublas us", "skinny us",
              "cublas GB/s", "skinny GB/s", "speedup");
  for (const Shape& s : shapes) {
    const size_t wbytes = static_cast<size_t>(s.n) * s.k * 2;
    const int copies = static_cast<int>(std::max<size_t>(2, (size_t{256} << 20) / wbytes + 1));
    std::vector<uint16_t*> w(copies);
    for (auto& p : w) {
      CK(cudaMalloc(reinterpret_cast<void**>(&p), wbytes));
      Fill(p, wbytes / 2);
    }
    for (int m : rows) {
      uint16_t* x = nullptr;
      float* y = nullptr;
      CK(cudaMalloc(reinterpret_cast<void**>(&x), static_cast<size_t>(m) * s.k * 2));
      CK(cudaMalloc(reinterpret_cast<void**>(&y), static_cast<size_t>(m) * s.n * 4));
      Fill(x, static_cast<size_t>(m) * s.k);
      const float alpha = 1, beta = 0;
      auto cublas = [&](int i) {
        CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha, w[i % copies],
                        CUDA_R_16BF, s.k, x, CUDA_R_16BF, s.k, &beta, y, CUDA_R_32F, s.n,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      };
      auto skinny = [&](int i) {
        prehoc::kernels::SkinnyGemmParams p;
        p.d_x = x;
        p.m = m;
        p.k = s.k;
        p.ldx = s.k;
        p.d_w = w[i % copies];
        p.n = s.n;
        p.ldw = s.k;
        p.d_y = y;
        p.ldy = s.n;
        CK(prehoc::kernels::SkinnyGemmBf16(p, stream));
      };
      auto time_us = [&](auto&& f) {
        for (int i = 0; i < 3; ++i) f(i);
        CK(cudaEventRecord(e0, stream));
        for (int i = 0; i < iters; ++i) f(i);
        CK(cudaEventRecord(e1, stream));
        CK(cudaEventSynchronize(e1));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        return ms * 1e3 / iters;
      };
      const double tc = time_us(cublas), ts = time_us(skinny);
      std::printf("%-22s %5d %12.1f %12.1f %12.0f %12.0f %7.2fx\n", s.name, m, tc, ts,
                  wbytes / (tc * 1e-6) / 1e9, wbytes / (ts * 1e-6) / 1e9, tc / ts);
      CK(cudaFree(x));
      CK(cudaFree(y));
    }
    for (auto p : w) CK(cudaFree(p));
  }
  std::fflush(stdout);
  return 0;
}
