// Token sampling from logits: greedy, temperature, top-k, top-p, with a seeded generator whose
// output is identical on every platform (the same seed gives the same tokens).
#ifndef PREHOC_WORKER_SAMPLER_H_
#define PREHOC_WORKER_SAMPLER_H_

#include <cstdint>
#include <random>
#include <span>

#include "absl/status/status.h"

namespace prehoc {

struct SamplingOptions {
  float temperature = 0.0f;  // 0 = greedy (argmax, lowest id wins ties)
  int top_k = 0;             // 0 = no top-k cut
  float top_p = 1.0f;        // 1 = no nucleus cut; must be in (0, 1]
  uint64_t seed = 0;

  // INVALID_ARGUMENT naming the field for temperature < 0 or non-finite, top_k < 0,
  // top_p outside (0, 1].
  absl::Status Validate() const;
};

// One token to draw from a row of logits, with the draw's randomness fixed in advance (so a
// backend can draw on the device, worker/kernels/sampling.h): the options and the uniform u.
// SampleWithUniform(logits, options, u) is the token; `options.seed` is not used.
struct TokenDraw {
  bool wanted = true;  // false: no token (and no logits) needed from this row
  SamplingOptions options;
  double u = 0;  // in [0, 1); ignored when options.temperature == 0 (greedy)

  // INVALID_ARGUMENT naming the field: SamplingOptions::Validate's errors, u outside [0, 1).
  absl::Status Validate() const;
};

// INVALID_ARGUMENT naming the batch item unless there is one valid draw per item (`items`
// items in the step).
absl::Status ValidateDraws(size_t items, std::span<const TokenDraw> draws);

class Sampler {
 public:
  // REQUIRES: options.Validate().ok().
  explicit Sampler(const SamplingOptions& options);

  // Picks a token id from `logits` (one row of size vocab). Order of operations: temperature
  // scaling, top-k (ties at the boundary kept by lower id), softmax, top-p over the sorted
  // probabilities (smallest prefix with mass >= top_p), renormalise, draw.
  int32_t Sample(std::span<const float> logits);

  // Uniform double in [0, 1) from the generator (53 bits).
  double NextUniform();

  // The next token's draw: the options and, when not greedy, NextUniform(). For every logits
  // row, SampleWithUniform(logits, d.options, d.u) with d = NextDraw() is what Sample(logits)
  // would have returned at this point of the stream (and advances the generator the same way):
  // the Scheduler draws through it whether the backend samples on the host or on the device,
  // so a seed gives the same uniforms on the CPU and on the GPU.
  TokenDraw NextDraw();

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
};

// Sampler::Sample's choice for a given uniform u in [0, 1) (the draw without the generator; the
// CPU reference of the device sampler, worker/kernels/sampling.h). With `candidates`, stores the
// number of tokens the draw was made from: 1 when greedy, else the top-k / nucleus prefix of the
// sorted order (the whole vocabulary when neither cuts). REQUIRES: options.Validate().ok(),
// non-empty logits.
int32_t SampleWithUniform(std::span<const float> logits, const SamplingOptions& options, double u,
                          int32_t* candidates = nullptr);

// Index of the largest value (first on ties). REQUIRES: non-empty.
int32_t ArgMax(std::span<const float> values);

}  // namespace prehoc

#endif  // PREHOC_WORKER_SAMPLER_H_
