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
