// On-device token sampling: per row of logits, temperature, optional top-k, top-p (nucleus) and
// one draw from a counter-based generator, with Sampler's semantics (worker/sampler.h, whose
// SampleWithUniform is the CPU reference). Host API; kernel in sampling.cuh, instantiated in
// sampling.cu. CUDA and std headers only.
//
// ---------------------------------------------------------------------------------------------
// Tensors (device pointers):
//   logits      [rows][row_stride] f32 (the first `vocab` of each row are used)
//   row_params  [rows] SamplingRow
//   uniform     [rows] f64 in [0, 1), optional: the draw's u (tests); null = SamplingUniform(
//               seed, step) of the row
//   out         [rows] int32 token ids (written)
//   candidates  [rows] int32, optional: how many tokens the draw was made from (1 when greedy,
//               else the size of the top-k / nucleus prefix of the sorted order)
// Per row, with the total order "logit descending, lower id first on ties" (NaN below −inf):
//   temperature == 0 (or a non-finite maximum logit): the first maximum (argmax, NaN never wins).
//   Otherwise p_i = exp((x_i − max) / T) in f64; the top_k first tokens when 0 < top_k < vocab;
//   then, when top_p < 1, the nucleus: the shortest prefix whose mass is >= top_p · (kept mass);
//   then the first token of the prefix whose cumulative mass exceeds u · (prefix mass).
// Masses are summed as 64-bit fixed point, W_i = round(p_i · 2^44) (integer sums do not depend
// on the summation order, so a row's result is reproducible bit for bit): tokens with
// p_i < 2^-45 (relative to the most likely one) have no mass, and a cut or a draw can differ
// from Sampler's f64 sums only when top_p · mass or u · mass lies within ~vocab · 2^-44 of a
// prefix boundary.
// Algorithm: one 1024-thread block per row; each cut and the draw is a "prefix select" — an
// MSB-first radix select (8-bit digits) over the 64-bit key (order-preserving bits of x_i << 32
// | ~i) that descends into the digit bin where the cumulative count or mass crosses the target,
// stopping as soon as that bin holds one token. No sort, no workspace; a pass reads the row once
// (from L2 after the first).
// ---------------------------------------------------------------------------------------------
#ifndef PREHOC_WORKER_KERNELS_SAMPLING_H_
#define PREHOC_WORKER_KERNELS_SAMPLING_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#if defined(__CUDACC__)
#define PREHOC_SAMPLING_HD __host__ __device__
#else
#define PREHOC_SAMPLING_HD
#endif

namespace prehoc::kernels {

// One row's sampling options (SamplingOptions of worker/sampler.h plus the draw's counter).
// REQUIRES (not checked on the device): temperature finite and >= 0, top_k >= 0, top_p in
// (0, 1] — SamplingOptions::Validate.
struct SamplingRow {
  float temperature = 0.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = no top-k cut
  float top_p = 1.0f;        // 1 = no nucleus cut
  int32_t reserved = 0;
  uint64_t seed = 0;  // the request's seed
  uint64_t step = 0;  // the draw's counter (e.g. the number of tokens generated so far)
};

struct SampleRowsParams {
  int rows = 0;
  int vocab = 0;           // REQUIRES: in [1, kMaxSamplingVocab]
  int64_t row_stride = 0;  // elements between rows; 0 = vocab
  const float* d_logits = nullptr;
  const SamplingRow* d_row_params = nullptr;
  const double* d_uniform = nullptr;  // optional
  int32_t* d_out = nullptr;
  int32_t* d_candidates = nullptr;  // optional
};

// Fixed-point headroom: vocab · 2^44 < 2^64.
constexpr int kMaxSamplingVocab = 1 << 19;

// SplitMix64's output function (Steele, Lea, Flood 2014).
PREHOC_SAMPLING_HD inline uint64_t SplitMix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The draw's uniform in [0, 1) (53 bits) for (seed, step): a counter-based generator, so a row's
// draw depends on nothing else (not on the batch, the row's index or earlier draws).
PREHOC_SAMPLING_HD inline double SamplingUniform(uint64_t seed, uint64_t step) {
  return static_cast<double>(SplitMix64(SplitMix64(seed) ^ step) >> 11) * 0x1.0p-53;
}

// nullptr when well-formed, otherwise a static message naming the field.
const char* SampleRowsCheck(const SampleRowsParams& p);

// Enqueues the sampling of every row on `stream` (one block per row). cudaErrorInvalidValue when
// SampleRowsCheck fails, otherwise the launch error.
cudaError_t SampleRows(const SampleRowsParams& p, cudaStream_t stream);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_SAMPLING_H_
