// DlmSchedule: the query-independent part of diffusion-LM (DLM) cache policies for one request,
// computed by the cache manager from the model shape and the request's cache policy, and consumed
// by the worker's DLM decode loop (worker/dlm/). Plain data, no gRPC types.
//
// Policies (ALGORITHMS.md §5):
//   none      vanilla: every step is a full forward over the whole canvas.
//   prefix    Fast-dLLM PrefixCache: full forward at each block start (and every `block_refresh`
//             steps inside a block when > 0); other steps feed the rows from the block start to
//             the end of the canvas, reading the cached K/V of the rows before the block.
//   dual      Fast-dLLM DualCache: like prefix, but other steps feed only the block's rows; K/V of
//             every row outside the block stay frozen until the next block.
//   dllm      dLLM-Cache: full forward every `prompt_refresh` (K_p) steps, response refresh every
//             `gen_refresh` (K_r) steps; other steps recompute, in every layer, the
//             floor(L · dllm_ratio) response rows whose full-width V moved most (smallest cosine
//             with the cached V); the other rows reuse their cached layer output.
//   spa       SPA-Cache: full forward every `r_full` steps, response refresh every `r_gen` steps;
//             other steps compute layer 0 in full and, in layer ℓ ≥ 1, recompute the
//             floor(L · ρ(ℓ)) response rows whose singular proxy moved most. ρ(ℓ) is the
//             piecewise-Gaussian curve `rho_curve` (hand-set constants).
//   spa-auto  SPA-Cache whose ρ curve is fitted to a per-layer drift profile measured on
//             calibration prompts when the model is loaded (FitRhoCurve below), at the same mean
//             budget as the fixed curve unless `rho_mean` is given.
// Steps are counted from 0 over the whole request (not per block); step 0 is always a full forward.
#ifndef PREHOC_CACHEMGR_DLM_SCHEDULE_H_
#define PREHOC_CACHEMGR_DLM_SCHEDULE_H_

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_config.h"

namespace prehoc {

enum class DlmCachePolicy { kNone, kPrefix, kDual, kDllm, kSpa, kSpaAuto };

// Parses "none", "prefix", "dual", "dllm", "spa", "spa-auto". INVALID_ARGUMENT naming the field
// `cache`, the value and the valid names otherwise.
absl::StatusOr<DlmCachePolicy> ParseDlmCachePolicy(const std::string& name);
const char* DlmCachePolicyName(DlmCachePolicy policy);

// SPA-Cache's piecewise-Gaussian update-ratio curve over normalised depth x = ℓ / N:
//   x <  μ:  ρ = max(peak · exp(ln(start/peak) · ((x − μ)/μ)²), floor)
//   x >= μ:  ρ = peak · exp(ln(end/peak) · ((x − μ)/(1 − μ))²)
// so ρ(0) = start (before the floor), ρ(μ) = peak and ρ → end as x → 1. `scale` multiplies
// start, peak and end (not the floor), as in the reference code. Defaults: the paper's LLaDA-8B
// constants (μ 0.75, start 0.03, peak 0.25, end 0.13, floor 0.0625 → mean ρ ≈ 0.16 over 32 layers).
struct RhoCurve {
  double peak_pos = 0.75;
  double start = 0.03;
  double peak = 0.25;
  double end = 0.13;
  double floor = 0.0625;
  double scale = 1.0;

  // INVALID_ARGUMENT naming the field unless 0 < peak_pos < 1, 0 < start < peak, 0 < end < peak,
  // peak <= 1, 0 <= floor <= 1, scale > 0.
  absl::Status Validate() const;
  // ρ at normalised depth x, clamped to at most 1.
  double At(double x) const;
  // ρ(ℓ) = At(ℓ / num_layers) for ℓ = 0..num_layers−1.
  std::vector<double> Profile(int num_layers) const;
};

// Result of fitting a RhoCurve to a measured per-layer drift profile (spa-auto).
struct RhoFit {
  RhoCurve curve;
  std::vector<double> target;  // per layer: the drift rescaled to the requested mean (layer 0: 0)
  double rmse = 0;             // of curve.Profile() vs target over layers 1..N−1
};

// Fits the curve to `drift` (per layer ℓ = 0..N−1, mean proxy drift 1 − cos between consecutive
// steps; layer 0 is ignored since it is always recomputed):
//   1. target(ℓ) = drift(ℓ) · mean_rho / mean_{ℓ≥1} drift  (budget proportional to drift);
//   2. for each μ on a grid of 0.01 in [0.05, 0.95], least squares in log space, which is linear:
//        ln target = ln peak + a·((x−μ)/μ)²   (x < μ),   ln peak + b·((x−μ)/(1−μ))²   (x ≥ μ),
//      with a, b <= 0 enforced (a positive slope is clamped to 0 and ln peak refitted);
//      start = peak·e^a, end = peak·e^b (kept strictly below peak);
//   3. the μ whose curve has the smallest squared error in linear space wins; then `scale` is set
//      so that the curve's mean over layers 1..N−1 equals mean_rho exactly (floor = `floor`).
// INVALID_ARGUMENT for fewer than 3 layers, a negative or non-finite drift, an all-zero drift over
// layers ≥ 1, or mean_rho outside (0, 1].
absl::StatusOr<RhoFit> FitRhoCurve(std::span<const double> drift, double mean_rho,
                                   double floor = 0.0625);

enum class DlmStepKind {
  kFull,        // every row, every layer; refreshes every cache
  kGenRefresh,  // response rows, every layer, prompt K/V from the cache
  kPartial,     // the policy's cheap step
};
const char* DlmStepKindName(DlmStepKind kind);

struct DlmSchedule {
  uint64_t version = 1;
  DlmCachePolicy policy = DlmCachePolicy::kNone;
  std::string policy_name = "none";

  // prefix / dual: extra full forwards every `block_refresh` steps inside a block (0 = only at
  // the block start).
  int block_refresh = 0;

  // dllm (dLLM-Cache): K_p, K_r (0 = never after step 0) and the uniform recompute ratio.
  int prompt_refresh = 50;
  int gen_refresh = 7;
  double dllm_ratio = 0.25;

  // spa / spa-auto: full refresh every r_full steps, response refresh every r_gen steps (0 =
  // never after step 0), the curve, and ρ(ℓ) per layer (rho[0] = 1: layer 0 is always full).
  int r_full = 50;
  int r_gen = 7;
  RhoCurve rho_curve;
  std::vector<double> rho;
  // true: K,V recomputed for every response row in layers ≥ 1 (the reference code); false: only
  // for the selected rows (the other rows keep their cached K,V).
  bool kv_all_rows = true;
  // dllm / spa: at least this many response rows are recomputed in every selective layer
  // (floor(L·ρ) is 0 or 1 for short responses, e.g. the 6-token retrieval answers). Not in the
  // papers. Defaults (measured in docs/dlm.md, all 64 retrieval_2k rows): 3 for spa / spa-auto
  // (2 lost 3 of 64 answers to vanilla), 0 (the paper's rule) for dllm. No effect once
  // floor(L·ρ(ℓ)) >= min_rows (L >= 48 with the default curve's 0.0625 floor).
  int min_rows = 0;
  // spa-auto only: the measured drift the curve was fitted to, and the fit error.
  std::vector<double> drift;
  double fit_rmse = 0;

  // What global step `step` (0-based, whole request) that is step `block_step` of its block does.
  DlmStepKind StepKind(int step, int block_step) const;
  // Rows of the `gen_rows` response rows recomputed in `layer` at a partial step:
  // floor(gen_rows · ρ(layer)) for spa, floor(gen_rows · dllm_ratio) for dllm (every layer),
  // raised to min(min_rows, gen_rows); gen_rows otherwise.
  int UpdateRows(int layer, int gen_rows) const;
  // Mean of rho over layers 1..N−1 (spa), dllm_ratio (dllm), 1 otherwise.
  double MeanUpdateRatio() const;
};

// Builds the schedule for `cache` on `model`. Overrides (by name):
//   block_refresh (prefix/dual); prompt_refresh, gen_refresh, dllm_ratio (dllm);
//   r_full, r_gen, rho_peak_pos, rho_start, rho_peak, rho_end, rho_floor, rho_scale,
//   rho_mean (sets rho_scale so that the mean over layers ≥ 1 equals it), rho (one uniform ratio
//   for every layer ≥ 1, replacing the curve), kv_all_rows (0/1), min_rows (spa, spa-auto).
// spa-auto needs `drift` (one value per layer, from the worker's calibration); its curve is
// FitRhoCurve(drift, rho_mean or the fixed curve's mean on this model, rho_floor).
// Errors: INVALID_ARGUMENT naming `cache`, the override key (`cache_overrides.<key>`) or value,
// or a drift profile of the wrong length.
absl::StatusOr<DlmSchedule> MakeDlmSchedule(const ModelConfig& model, const std::string& cache,
                                            const std::map<std::string, double>& overrides = {},
                                            std::span<const double> drift = {});

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_DLM_SCHEDULE_H_
