// Runs generation requests to completion on a ModelBackend (CPU Engine or CUDA): prefill every
// prompt, then decode all active sequences together one token per step until each hits
// max_tokens or end-of-text.
// Used by the CLI, tests and the eval harness; the services' continuous batcher (Scheduler) builds
// on ModelBackend::Step.
#ifndef PREHOC_WORKER_GENERATOR_H_
#define PREHOC_WORKER_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/backend.h"
#include "worker/sampler.h"
#include "worker/selection/selector.h"
#include "worker/sparsity.h"

namespace prehoc {

struct GenerateRequest {
  std::vector<int32_t> prompt;  // token ids, non-empty
  int max_tokens = 16;          // >= 1
  SamplingOptions sampling;
  bool stop_at_eos = true;      // stop after the model's end-of-text token (it is included)
  SparsityOptions sparsity;     // decode-time KV selection policy (see worker/sparsity.h)
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids
  std::string finish_reason;    // "length" or "eos"
  int prompt_tokens = 0;
  double time_to_first_token_s = 0;
  SparsityReport sparsity;
  SelectionTelemetry telemetry;  // the selector's full telemetry (per-layer counts, δ samples)
};

struct GenerateStats {
  double prefill_s = 0;
  double decode_s = 0;
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  int64_t decode_steps = 0;
  // Generated tokens per second of decode time (excludes the first token, made by prefill).
  double decode_tokens_per_s() const;
};

// Called for each generated token: (request index, token id).
using TokenCallback = std::function<void(int, int32_t)>;

// Validates every request first (INVALID_ARGUMENT naming the request index and the field: empty
// prompt, token out of vocabulary, max_tokens < 1, prompt + max_tokens over the engine's
// max_context, bad sampling or sparsity options, or a plan the backend refuses — its
// SupportsPlan error), then runs them as one batch. Each request's
// sparsity options become a SelectionPlan and a selector for its decode steps; with
// target_delta > 0 a DeltaController adjusts the plan from the refresh δ after every step. Sequences are always freed,
// also on error. RESOURCE_EXHAUSTED when the KV cache cannot hold the batch.
absl::StatusOr<std::vector<GenerateResult>> GenerateBatch(ModelBackend& engine,
                                                          const std::vector<GenerateRequest>& requests,
                                                          const TokenCallback& on_token = nullptr,
                                                          GenerateStats* stats = nullptr);

}  // namespace prehoc

#endif  // PREHOC_WORKER_GENERATOR_H_
