// Device helpers for benchmark inputs (random fill, synthetic selections, a spin kernel to keep
// launches queued ahead of the GPU while timing). Host API; kernels in bench_kernels.cu.
#ifndef PREHOC_BENCH_BENCH_KERNELS_H_
#define PREHOC_BENCH_BENCH_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace prehoc::bench {

// d_data[i] = a uniform(-1, 1) value from hash(seed, i), stored as fp16 (bf16 = false) or bf16.
cudaError_t FillUniform16(uint16_t* d_data, size_t n, uint64_t seed, bool bf16,
                          cudaStream_t stream);

// Stratified random keep-mask: for each row r of `rows` and each stratum s of `stratum` items
// within [0, len), sets exactly one random item of the stratum to 1; the rest of the row
// ([0, stride)) is 0. Each row keeps ceil(len / stratum) items.
cudaError_t MakeStratifiedMask(uint8_t* d_mask, int rows, int stride, int len, int stratum,
                               uint64_t seed, cudaStream_t stream);

// Independent random keep-mask: item i < len of row r is kept with probability 1/keep (a hash of
// (seed, r, i)); items in [len, stride) are 0. Rows (heads) select independently.
cudaError_t MakeBernoulliMask(uint8_t* d_mask, int rows, int stride, int len, int keep,
                              uint64_t seed, cudaStream_t stream);

// Launches n empty kernels (the second and later with programmatic dependent launch): the floor
// of what events around one (n = 1) or two (n = 2) dependent launches measure.
cudaError_t EmptyLaunches(int n, cudaStream_t stream);

// Busy-waits about `ns` nanoseconds on the GPU.
cudaError_t Spin(uint64_t ns, cudaStream_t stream);

}  // namespace prehoc::bench

#endif  // PREHOC_BENCH_BENCH_KERNELS_H_
