// A weight-streaming GEMM for few rows: Y[m][n] = X[m][k] · W[n][k]ᵀ (+ beta · Y), bf16 inputs,
// f32 accumulation and output, m <= kSkinnyGemmMaxRows. Written for the batch-1 cached steps of
// the diffusion-LM forward (worker/dlm/cuda_forward.h), whose projections multiply 8–64 selected
// rows by a 4096-wide weight matrix: the cost is reading W once, and cuBLAS's tile grid leaves
// most of the H100 idle at that shape (docs/dlm.md). Host API; kernel in skinny_gemm.cuh.
//
// Layouts (row-major; bf16 = bfloat16 bits in uint16_t):
//   X  bf16 [m][ldx]  (the first k columns are used)
//   W  bf16 [n][ldw]  (the first k columns are used; a PyTorch Linear weight)
//   Y  f32  [m][ldy]  (the first n columns are written); read only when beta != 0.
// REQUIRES (else cudaErrorInvalidValue): 1 <= m <= kSkinnyGemmMaxRows, n >= 1, k >= 1, k, ldx and
// ldw multiples of 8, ldy >= n, X and W 16-byte aligned, non-null pointers; an sm_90 device
// (thread-block clusters). m == 0 launches nothing.
//
// Method: CTAs of 8 warps; a CTA owns 128 rows of W and a contiguous range of k (split-K over
// the CTAs of one thread-block cluster, at most 8). Per 128-wide k chunk the CTA stages X in
// shared memory (cp.async, double-buffered) and every warp streams its 16 W rows straight into
// registers (ld.global.nc.L1::no_allocate; X and W of the next chunk in flight while this one is
// multiplied) and runs
// mma.sync m16n8k16 with W as the A operand and X as B — the k order inside each 32-wide slice
// is permuted identically for both, so one 16-byte load per row feeds two MMAs. The split
// partials are summed in cluster rank order through distributed shared memory (each CTA of the
// cluster reduces a slice of the tile): deterministic
// for a given (m, n, k, device), no atomics and no workspace.
#ifndef PREHOC_WORKER_KERNELS_SKINNY_GEMM_H_
#define PREHOC_WORKER_KERNELS_SKINNY_GEMM_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prehoc::kernels {

constexpr int kSkinnyGemmMaxRows = 64;

struct SkinnyGemmParams {
  const uint16_t* d_x = nullptr;
  int m = 0, k = 0, ldx = 0;
  const uint16_t* d_w = nullptr;
  int n = 0, ldw = 0;
  float* d_y = nullptr;
  int ldy = 0;
  float beta = 0.0f;
  // Split-K factor: 0 = SkinnyGemmSplits(n, k, SMs of the current device); else 1..8.
  int splits = 0;
};

// True when p meets the REQUIRES above (so SkinnyGemmBf16 will launch).
bool SkinnyGemmSupported(const SkinnyGemmParams& p);

// The split-K factor used for splits == 0: the S in [1, 8] (at most the number of 128-wide k
// chunks) whose grid of ceil(n / 128) × S CTAs fills whole waves of 2 CTAs per SM best
// (ties: the smaller S).
int SkinnyGemmSplits(int n, int k, int num_sms);

cudaError_t SkinnyGemmBf16(const SkinnyGemmParams& p, cudaStream_t stream);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_SKINNY_GEMM_H_
