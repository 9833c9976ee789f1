#include "worker/scheduler_metrics.h"

#include "worker/scheduler_types.h"

namespace prehoc {
namespace {

// Latency buckets from 1 ms to 60 s (vLLM uses a similar spread for TTFT).
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* const b = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
      0.75,  1.0,    2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 60.0};
  return *b;
}
const prometheus::Histogram::BucketBoundaries& FractionBuckets() {
  static const auto* const b = new prometheus::Histogram::BucketBoundaries{
      0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0};
  return *b;
}
const prometheus::Histogram::BucketBoundaries& DeltaBuckets() {
  static const auto* const b = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5};
  return *b;
}

}  // namespace

const char* RequestOutcomeName(RequestOutcome outcome) {
  switch (outcome) {
    case RequestOutcome::kOk: return "ok";
    case RequestOutcome::kCancelled: return "cancelled";
    case RequestOutcome::kDeadlineExceeded: return "deadline_exceeded";
    case RequestOutcome::kInvalidArgument: return "invalid_argument";
    case RequestOutcome::kResourceExhausted: return "resource_exhausted";
    case RequestOutcome::kUnavailable: return "unavailable";
    case RequestOutcome::kError: return "error";
  }
  return "error";
}

SchedulerMetrics::SchedulerMetrics(prometheus::Registry& registry, const std::string& model) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  auto& ttft = BuildHistogram()
                   .Name("prehoc_time_to_first_token_seconds")
                   .Help("Time from request arrival at the worker to its first generated token.")
                   .Register(registry);
  auto& itl = BuildHistogram()
                  .Name("prehoc_inter_token_latency_seconds")
                  .Help("Time between consecutive generated tokens of one request.")
                  .Register(registry);
  auto& e2e = BuildHistogram()
                  .Name("prehoc_e2e_request_latency_seconds")
                  .Help("Time from arrival to the end of a request, any outcome.")
                  .Register(registry);
  auto& kept = BuildHistogram()
                   .Name("prehoc_sparsity_kept_fraction")
                   .Help("Per request: mean fraction of KV entries attended (1 = dense).")
                   .Register(registry);
  auto& delta = BuildHistogram()
                    .Name("prehoc_sparsity_delta_observed")
                    .Help("Per request: mean dropped attention mass measured at refreshes.")
                    .Register(registry);
  auto& delta_target = BuildGauge()
                           .Name("prehoc_sparsity_delta_target")
                           .Help("Target dropped attention mass of the last request per policy.")
                           .Register(registry);
  auto& gen = BuildCounter()
                  .Name("prehoc_generation_tokens_total")
                  .Help("Generated tokens.")
                  .Register(registry);
  auto& prompt = BuildCounter()
                     .Name("prehoc_prompt_tokens_total")
                     .Help("Prompt tokens prefilled.")
                     .Register(registry);
  auto& refreshes = BuildCounter()
                        .Name("prehoc_sparsity_refreshes_total")
                        .Help("Exact top-k recomputations (retrievals) of sparse attention.")
                        .Register(registry);
  auto& shares = BuildCounter()
                     .Name("prehoc_sparsity_shares_total")
                     .Help("(step, layer, head) uses of a reused index set.")
                     .Register(registry);
  auto& fallbacks = BuildCounter()
                        .Name("prehoc_sparsity_dense_fallbacks_total")
                        .Help("Decode steps of a sparse-policy request that attended every "
                              "token of the context at every layer and kv head.")
                        .Register(registry);
  auto& plans_applied =
      BuildCounter()
          .Name("prehoc_selection_plans_applied_total")
          .Help("Selection plans from the cache manager swapped in at a step boundary.")
          .Register(registry);
  auto& requests = BuildCounter()
                       .Name("prehoc_requests_total")
                       .Help("Requests by outcome (ok, cancelled, deadline_exceeded, "
                             "invalid_argument, resource_exhausted, unavailable, error).")
                       .Register(registry);
  const std::vector<std::string>& policies = KnownSparsityPolicies();
  per_policy.resize(policies.size());
  for (size_t i = 0; i < policies.size(); ++i) {
    const prometheus::Labels l{{"model", model}, {"policy", policies[i]}};
    PerPolicy& p = per_policy[i];
    p.time_to_first_token_s = &ttft.Add(l, LatencyBuckets());
    p.inter_token_latency_s = &itl.Add(l, LatencyBuckets());
    p.e2e_request_latency_s = &e2e.Add(l, LatencyBuckets());
    p.kept_fraction = &kept.Add(l, FractionBuckets());
    p.delta_observed = &delta.Add(l, DeltaBuckets());
    p.delta_target = &delta_target.Add(l);
    p.generation_tokens = &gen.Add(l);
    p.prompt_tokens = &prompt.Add(l);
    p.refreshes = &refreshes.Add(l);
    p.shares = &shares.Add(l);
    p.dense_fallbacks = &fallbacks.Add(l);
    p.plans_applied = &plans_applied.Add(l);
    for (int o = 0; o < kNumRequestOutcomes; ++o) {
      prometheus::Labels lo = l;
      lo["outcome"] = RequestOutcomeName(static_cast<RequestOutcome>(o));
      p.requests[o] = &requests.Add(lo);
    }
  }
  const prometheus::Labels m{{"model", model}};
  auto gauge = [&](const char* name, const char* help) {
    return &BuildGauge().Name(name).Help(help).Register(registry).Add(m);
  };
  queue_depth = gauge("prehoc_num_requests_waiting", "Requests waiting for admission.");
  running = gauge("prehoc_num_requests_running", "Requests in the running batch.");
  kv_pages_used = gauge("prehoc_kv_cache_pages_used", "KV pages allocated to sequences.");
  kv_pages_reserved =
      gauge("prehoc_kv_cache_pages_reserved", "KV pages reserved by admitted requests.");
  kv_pages_total = gauge("prehoc_kv_cache_pages_total", "KV pages in the cache.");
  kv_usage_ratio = gauge("prehoc_kv_cache_usage_ratio", "kv_cache_pages_used / pages_total.");
  throughput_tokens_per_s =
      gauge("prehoc_generation_throughput_tokens_per_second",
            "Generated tokens per second, exponentially smoothed over about 10 s.");
  plan_age_s = gauge("prehoc_selection_plan_age_seconds",
                     "At the last step: the largest age (now - time produced) of the selection "
                     "plans in use by decoding requests (0 when none decodes).");
  plan_stream_connected = gauge("prehoc_selection_plan_stream_connected",
                                "1 while the cache manager's plan stream is open, else 0.");
  plans_received = &BuildCounter()
                        .Name("prehoc_selection_plans_received_total")
                        .Help("Selection plans received on the cache manager's plan stream.")
                        .Register(registry)
                        .Add(m);
  ready = gauge("prehoc_ready", "1 when the server is ready to serve, else 0.");
  backend_healthy = gauge("prehoc_worker_backend_healthy",
                          "1 until the model backend's first failed step, then 0 for good (the "
                          "worker is no longer ready).");
  backend_failures = &BuildCounter()
                          .Name("prehoc_worker_backend_failures_total")
                          .Help("Model backend steps that failed (device faults).")
                          .Register(registry)
                          .Add(m);
  steps = &BuildCounter()
               .Name("prehoc_scheduler_steps_total")
               .Help("Engine steps run by the scheduler.")
               .Register(registry)
               .Add(m);
  step_seconds = &BuildHistogram()
                      .Name("prehoc_scheduler_step_seconds")
                      .Help("Duration of one engine step (prefill chunks + decode tokens).")
                      .Register(registry)
                      .Add(m, LatencyBuckets());
  step_tokens = &BuildHistogram()
                     .Name("prehoc_scheduler_step_tokens")
                     .Help("Tokens processed per engine step.")
                     .Register(registry)
                     .Add(m, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128,
                                                                     256, 512, 1024, 2048});
}

SchedulerMetrics::PerPolicy* SchedulerMetrics::ForPolicy(const std::string& policy) {
  const std::vector<std::string>& policies = KnownSparsityPolicies();
  for (size_t i = 0; i < policies.size(); ++i) {
    if (policies[i] == policy) return &per_policy[i];
  }
  return &per_policy[0];
}

}  // namespace prehoc
