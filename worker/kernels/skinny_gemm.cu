// Launcher of skinny_gemm.h: argument checks, the split-K choice and the one switch from the row
// count to the template. CUDA and std headers only.
#include <cstdint>

#include "worker/kernels/skinny_gemm.cuh"

namespace prehoc::kernels {

namespace {

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <int MT>
cudaError_t Launch(const SkinnyGemmParams& p, int splits, int chunks_per_split,
                   cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((p.n + skinny::kRowsPerCta - 1) / skinny::kRowsPerCta, splits, 1);
  cfg.blockDim = dim3(skinny::kThreads, 1, 1);
  cfg.dynamicSmemBytes = skinny::SmemBytes(MT);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = splits;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, skinny::SkinnyGemmKernel<MT>, p, chunks_per_split);
}

}  // namespace

bool SkinnyGemmSupported(const SkinnyGemmParams& p) {
  return p.m >= 1 && p.m <= kSkinnyGemmMaxRows && p.n >= 1 && p.k >= 1 && p.k % 8 == 0 &&
         p.ldx % 8 == 0 && p.ldw % 8 == 0 && p.ldx >= p.k && p.ldw >= p.k && p.ldy >= p.n &&
         p.d_x != nullptr && p.d_w != nullptr && p.d_y != nullptr && Aligned16(p.d_x) &&
         Aligned16(p.d_w) && p.splits >= 0 && p.splits <= 8;
}

int SkinnyGemmSplits(int n, int k, int num_sms) {
  const int64_t blocks = (n + skinny::kRowsPerCta - 1) / skinny::kRowsPerCta;
  const int nchunks = (k + skinny::kChunk - 1) / skinny::kChunk;
  const int64_t slots = 2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  int best = 1;
  double best_eff = -1;
  for (int s = 1; s <= 8 && s <= nchunks; ++s) {
    const int64_t ctas = blocks * s;
    const int64_t waves = (ctas + slots - 1) / slots;
    const double eff = static_cast<double>(ctas) / static_cast<double>(waves * slots);
    if (eff > best_eff + 1e-9) {
      best_eff = eff;
      best = s;
    }
  }
  return best;
}

cudaError_t SkinnyGemmBf16(const SkinnyGemmParams& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  if (!SkinnyGemmSupported(p)) return cudaErrorInvalidValue;
  int splits = p.splits;
  if (splits == 0) {
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    splits = SkinnyGemmSplits(p.n, p.k, sms);
  }
  // No empty split: S' = ceil(chunks / ceil(chunks / S)) <= S.
  const int nchunks = (p.k + skinny::kChunk - 1) / skinny::kChunk;
  if (splits > nchunks) splits = nchunks;
  const int cps = (nchunks + splits - 1) / splits;
  splits = (nchunks + cps - 1) / cps;
  switch ((p.m + 7) / 8) {
    case 1: return Launch<1>(p, splits, cps, stream);
    case 2: return Launch<2>(p, splits, cps, stream);
    case 3: return Launch<3>(p, splits, cps, stream);
    case 4: return Launch<4>(p, splits, cps, stream);
    case 5: return Launch<5>(p, splits, cps, stream);
    case 6: return Launch<6>(p, splits, cps, stream);
    case 7: return Launch<7>(p, splits, cps, stream);
    case 8: return Launch<8>(p, splits, cps, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace prehoc::kernels
