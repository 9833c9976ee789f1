#include "worker/dlm/diffusion_types.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace prehoc {
namespace {

// MakeDlmSchedule names its override map "cache_overrides.<key>"; the API's typed message is
// DlmCacheParams ("cache_params.<field>", the uniform ratio "rho" being `rho_uniform`).
absl::Status ApiOverrideNames(const absl::Status& s) {
  if (s.ok()) return s;
  std::string m = absl::StrReplaceAll(
      s.message(), {{"cache_overrides.rho:", "cache_params.rho_uniform:"},
                    {"cache_overrides", "cache_params"}});
  return absl::Status(s.code(), m);
}

}  // namespace

absl::Status ApplyRhoOverrides(const std::vector<double>& rho, int num_layers,
                               DlmSchedule* schedule) {
  if (rho.empty()) return absl::OkStatus();
  if (schedule->policy != DlmCachePolicy::kSpa && schedule->policy != DlmCachePolicy::kSpaAuto) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rho: per-layer ratios apply to cache spa or spa-auto, not '", schedule->policy_name, "'"));
  }
  if (static_cast<int>(rho.size()) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("rho: has ", rho.size(),
                                                   " values, the model has ", num_layers,
                                                   " layers (give one per layer or none)"));
  }
  for (size_t l = 0; l < rho.size(); ++l) {
    if (!(rho[l] >= 0 && rho[l] <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("rho: value ", rho[l], " of layer ", l, " is outside [0, 1]"));
    }
  }
  schedule->rho.assign(rho.begin(), rho.end());
  schedule->rho[0] = 1.0;  // layer 0 is always recomputed in full
  return absl::OkStatus();
}

absl::StatusOr<DlmSchedule> ResolveDlmSchedule(const DiffusionRequest& request, int num_layers,
                                               const std::vector<double>& drift) {
  if (request.plan.has_value()) {
    const DlmSchedule& p = *request.plan;
    const bool spa = p.policy == DlmCachePolicy::kSpa || p.policy == DlmCachePolicy::kSpaAuto;
    if (spa && static_cast<int>(p.rho.size()) != num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("plan.rho: has ", p.rho.size(),
                                                     " values, the model has ", num_layers,
                                                     " layers"));
    }
    for (double r : p.rho) {
      if (!(r >= 0 && r <= 1)) {
        return absl::InvalidArgumentError(absl::StrCat("plan.rho: value ", r, " outside [0, 1]"));
      }
    }
    if (p.r_full < 0 || p.r_gen < 0 || p.prompt_refresh < 0 || p.gen_refresh < 0 ||
        p.block_refresh < 0 || p.min_rows < 0 || !(p.dllm_ratio > 0 && p.dllm_ratio <= 1)) {
      return absl::InvalidArgumentError(
          "plan: refresh intervals and min_rows must be >= 0 and dllm_ratio in (0, 1]");
    }
    return p;
  }
  const std::string cache = request.options.cache.empty() ? "none" : request.options.cache;
  absl::StatusOr<DlmCachePolicy> policy = ParseDlmCachePolicy(cache);
  if (!policy.ok()) return policy.status();
  if (*policy == DlmCachePolicy::kSpaAuto && drift.empty()) {
    return absl::FailedPreconditionError(
        "cache: spa-auto needs the per-layer drift profile measured when the model is loaded; "
        "this worker was started without calibration (prehoc-worker --dlm-calibrate)");
  }
  ModelConfig shape;
  shape.num_hidden_layers = num_layers;
  absl::StatusOr<DlmSchedule> s =
      MakeDlmSchedule(shape, cache, request.options.cache_overrides, drift);
  if (!s.ok()) return ApiOverrideNames(s.status());
  absl::Status st = ApplyRhoOverrides(request.rho, num_layers, &*s);
  if (!st.ok()) return st;
  return s;
}

}  // namespace prehoc
