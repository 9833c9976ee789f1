#include "worker/dlm/dlm_metrics.h"

#include <algorithm>
#include <string>

namespace prehoc::dlm {

DlmMetrics::DlmMetrics(prometheus::Registry& registry, const std::string& model, int num_layers) {
  using prometheus::BuildCounter;
  using prometheus::BuildHistogram;
  auto& requests = BuildCounter().Name("prehoc_dlm_requests_total")
                       .Help("Diffusion decoding requests, by cache policy and outcome.")
                       .Register(registry);
  auto& steps = BuildCounter().Name("prehoc_dlm_steps_total")
                    .Help("Denoising steps (one forward each), by cache policy and step kind.")
                    .Register(registry);
  auto& tokens = BuildCounter().Name("prehoc_dlm_generated_tokens_total")
                     .Help("Response tokens committed by diffusion decoding.")
                     .Register(registry);
  auto& seconds = BuildCounter().Name("prehoc_dlm_decode_seconds_total")
                      .Help("Wall time spent in diffusion decode loops.")
                      .Register(registry);
  auto& rows = BuildCounter().Name("prehoc_dlm_tokens_recomputed_total")
                   .Help("Canvas rows recomputed (Q, attention, MLP), by layer.")
                   .Register(registry);
  auto& kv = BuildCounter().Name("prehoc_dlm_kv_recomputed_total")
                 .Help("Canvas rows whose K/V were recomputed, by layer.")
                 .Register(registry);
  auto& frac = BuildHistogram().Name("prehoc_dlm_recompute_fraction")
                   .Help("Per request: rows recomputed per step and layer over canvas rows "
                         "(1 = vanilla).")
                   .Register(registry);
  auto& tps = BuildHistogram().Name("prehoc_dlm_tokens_per_second")
                  .Help("Per request: committed response tokens per second of decoding.")
                  .Register(registry);
  auto& per_step = BuildHistogram().Name("prehoc_dlm_tokens_recomputed_per_step")
                       .Help("Per request: canvas rows recomputed per denoising step, averaged "
                             "over layers.")
                       .Register(registry);
  batch_size = &BuildHistogram()
                    .Name("prehoc_dlm_batch_size")
                    .Help("Per batched denoising step: Diffuse requests sharing its forward.")
                    .Register(registry)
                    .Add({{"model", model}},
                         prometheus::Histogram::BucketBoundaries{1, 2, 3, 4, 6, 8, 12, 16, 24, 32,
                                                                 48, 64});
  const prometheus::Histogram::BucketBoundaries rows_b = {1,   2,   4,    8,    16,   32,  64,
                                                          128, 256, 512, 1024, 2048, 4096};
  const prometheus::Histogram::BucketBoundaries frac_b = {0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25,
                                                         0.3,  0.4,  0.5,  0.6, 0.8,  1.0};
  const prometheus::Histogram::BucketBoundaries tps_b = {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000};
  for (DlmCachePolicy p : {DlmCachePolicy::kNone, DlmCachePolicy::kPrefix, DlmCachePolicy::kDual,
                           DlmCachePolicy::kDllm, DlmCachePolicy::kSpa, DlmCachePolicy::kSpaAuto}) {
    const std::string name = DlmCachePolicyName(p);
    PerPolicy pp;
    for (const std::string& outcome : Outcomes()) {
      pp.outcomes.push_back(
          &requests.Add({{"model", model}, {"policy", name}, {"outcome", outcome}}));
    }
    pp.requests = pp.outcomes[0];
    pp.full_steps = &steps.Add({{"model", model}, {"policy", name}, {"kind", "full"}});
    pp.gen_refresh_steps = &steps.Add({{"model", model}, {"policy", name}, {"kind", "gen_refresh"}});
    pp.partial_steps = &steps.Add({{"model", model}, {"policy", name}, {"kind", "partial"}});
    pp.tokens = &tokens.Add({{"model", model}, {"policy", name}});
    pp.seconds = &seconds.Add({{"model", model}, {"policy", name}});
    for (int l = 0; l < num_layers; ++l) {
      const std::string layer = std::to_string(l);
      pp.rows_recomputed.push_back(&rows.Add({{"model", model}, {"policy", name}, {"layer", layer}}));
      pp.kv_recomputed.push_back(&kv.Add({{"model", model}, {"policy", name}, {"layer", layer}}));
    }
    pp.recompute_fraction = &frac.Add({{"model", model}, {"policy", name}}, frac_b);
    pp.tokens_per_second = &tps.Add({{"model", model}, {"policy", name}}, tps_b);
    pp.rows_per_step = &per_step.Add({{"model", model}, {"policy", name}}, rows_b);
    per_policy.push_back(std::move(pp));
  }
}

void DlmMetrics::Record(const DiffuseResult& r) {
  const size_t idx = static_cast<size_t>(r.schedule.policy);
  if (idx >= per_policy.size()) return;
  PerPolicy& p = per_policy[idx];
  const DlmRunStats& s = r.stats;
  p.full_steps->Increment(s.full_steps);
  p.gen_refresh_steps->Increment(s.gen_refresh_steps);
  p.partial_steps->Increment(s.partial_steps);
  p.tokens->Increment(s.decoded_tokens);
  p.seconds->Increment(std::max(s.seconds, 0.0));
  const size_t layers = std::min(p.rows_recomputed.size(), s.forward.q_rows.size());
  double frac = 0;
  for (size_t l = 0; l < layers; ++l) {
    p.rows_recomputed[l]->Increment(static_cast<double>(s.forward.q_rows[l]));
    p.kv_recomputed[l]->Increment(static_cast<double>(s.forward.kv_rows[l]));
    if (l < s.recompute_fraction.size()) frac += s.recompute_fraction[l];
  }
  if (layers > 0) p.recompute_fraction->Observe(frac / layers);
  if (!s.rows_per_step.empty()) {
    double rows = 0;
    for (double v : s.rows_per_step) rows += v;
    p.rows_per_step->Observe(rows / static_cast<double>(s.rows_per_step.size()));
  }
  if (s.seconds > 0) p.tokens_per_second->Observe(s.tokens_per_second());
}

void DlmMetrics::RecordBatch(int requests) { batch_size->Observe(requests); }

const std::vector<std::string>& DlmMetrics::Outcomes() {
  static const auto* const kOutcomes = new std::vector<std::string>{
      "ok", "cancelled", "deadline_exceeded", "invalid_argument", "resource_exhausted",
      "unavailable", "error"};
  return *kOutcomes;
}

void DlmMetrics::RecordOutcome(DlmCachePolicy policy, const absl::Status& status) {
  const size_t idx = static_cast<size_t>(policy);
  if (idx >= per_policy.size()) return;
  size_t o = 6;  // error
  switch (status.code()) {
    case absl::StatusCode::kOk: o = 0; break;
    case absl::StatusCode::kCancelled: o = 1; break;
    case absl::StatusCode::kDeadlineExceeded: o = 2; break;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition: o = 3; break;
    case absl::StatusCode::kResourceExhausted: o = 4; break;
    case absl::StatusCode::kUnavailable: o = 5; break;
    default: break;
  }
  per_policy[idx].outcomes[o]->Increment();
}

}  // namespace prehoc::dlm
