// spa-auto: measures how much each layer's response rows drift between consecutive denoising
// steps, so that the cache manager can fit SPA's per-layer budget curve ρ(ℓ) to the model
// (cachemgr/dlm_schedule.h, FitRhoCurve) instead of using hand-set constants.
//
// Two per-layer signals are measured during exact (vanilla: full forward every step)
// low-confidence decoding, averaged over calibration prompts, steps t >= 1 and response rows i:
//   proxy drift   1 − cos(p_ℓ,i(t), p_ℓ,i(t−1)),  p = the layer's singular proxy of
//                 RMSNorm_attn(h): how much the layer's input moves (what SPA ranks rows by);
//   output drift  ‖δ_ℓ,i(t) − δ_ℓ,i(t−1)‖ / ‖x_ℓ,i(t) + δ_ℓ,i(t)‖, δ = the layer's residual
//                 update (attention + MLP output): the relative error that reusing the previous
//                 step's cached output would introduce in that row.
// spa-auto fits ρ(ℓ) to the output drift by default (docs/dlm.md compares both). Layer 0 (always
// recomputed) reports 0.
#ifndef PREHOC_WORKER_DLM_CALIBRATION_H_
#define PREHOC_WORKER_DLM_CALIBRATION_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/dlm/dlm_model.h"

namespace prehoc::dlm {

// Defaults keep the load-time cost at 4 prompts × 8 full forwards of ~70 rows (about 3 s for
// the shipped model on 2 CPU threads).
struct CalibrationOptions {
  int gen_length = 16;
  int block_length = 16;
  int steps = 8;
};

struct DriftProfile {
  std::vector<double> proxy;   // per layer
  std::vector<double> output;  // per layer
};

// Both profiles (size num_hidden_layers). Prompts are token ids (BOS included if wanted); when
// `prompts` is empty, DefaultCalibrationPrompts(model) is used. Errors: those of Diffuse;
// FAILED_PRECONDITION for a model without proxies.
absl::StatusOr<DriftProfile> MeasureDrift(const DlmModel& model,
                                          const std::vector<std::vector<int32_t>>& prompts,
                                          const CalibrationOptions& options = {});

// The output-drift profile (what spa-auto fits by default).
absl::StatusOr<std::vector<double>> MeasureDriftProfile(
    const DlmModel& model, const std::vector<std::vector<int32_t>>& prompts,
    const CalibrationOptions& options = {});

// Four short built-in source-code snippets, byte-encoded with BOS when the model has a byte
// tokenizer; otherwise four deterministic pseudo-random id sequences of 48 tokens in
// [0, min(vocab, 256)) avoiding the mask id.
std::vector<std::vector<int32_t>> DefaultCalibrationPrompts(const DlmModel& model);

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_CALIBRATION_H_
