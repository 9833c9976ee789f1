// Prometheus metrics of a worker's scheduler (documented in docs/metrics.md). Children are bound
// up front per sparsity policy (a bounded label set), so the step loop does no lookups.
#ifndef PREHOC_WORKER_SCHEDULER_METRICS_H_
#define PREHOC_WORKER_SCHEDULER_METRICS_H_

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace prehoc {

// How a request ended; the `outcome` label of prehoc_requests_total.
enum class RequestOutcome {
  kOk = 0,
  kCancelled,
  kDeadlineExceeded,
  kInvalidArgument,
  kResourceExhausted,
  kUnavailable,
  kError,
};
inline constexpr int kNumRequestOutcomes = 7;
const char* RequestOutcomeName(RequestOutcome outcome);

struct SchedulerMetrics {
  struct PerPolicy {
    prometheus::Histogram* time_to_first_token_s = nullptr;
    prometheus::Histogram* inter_token_latency_s = nullptr;
    prometheus::Histogram* e2e_request_latency_s = nullptr;
    prometheus::Histogram* kept_fraction = nullptr;
    prometheus::Histogram* delta_observed = nullptr;
    prometheus::Gauge* delta_target = nullptr;
    prometheus::Counter* generation_tokens = nullptr;
    prometheus::Counter* prompt_tokens = nullptr;
    prometheus::Counter* refreshes = nullptr;
    prometheus::Counter* shares = nullptr;
    prometheus::Counter* dense_fallbacks = nullptr;
    prometheus::Counter* plans_applied = nullptr;
    std::array<prometheus::Counter*, kNumRequestOutcomes> requests{};
  };

  // Registers every family in `registry` (which must outlive the result) with label
  // model=`model` and, where per policy, policy in KnownSparsityPolicies().
  SchedulerMetrics(prometheus::Registry& registry, const std::string& model);

  // Children for `policy`; unknown names map to "dense". Not for the hot path (linear scan):
  // the scheduler resolves it once per request.
  PerPolicy* ForPolicy(const std::string& policy);

  std::vector<PerPolicy> per_policy;  // index i = KnownSparsityPolicies()[i]
  prometheus::Gauge* queue_depth = nullptr;
  prometheus::Gauge* running = nullptr;
  prometheus::Gauge* kv_pages_used = nullptr;
  prometheus::Gauge* kv_pages_reserved = nullptr;
  prometheus::Gauge* kv_pages_total = nullptr;
  prometheus::Gauge* kv_usage_ratio = nullptr;
  prometheus::Gauge* throughput_tokens_per_s = nullptr;
  prometheus::Gauge* plan_age_s = nullptr;
  // The cache manager's plan stream (updated by the worker server).
  prometheus::Gauge* plan_stream_connected = nullptr;
  prometheus::Counter* plans_received = nullptr;
  prometheus::Gauge* ready = nullptr;
  // 1 until the backend's first failed step, then 0 for good (readiness goes false with it).
  prometheus::Gauge* backend_healthy = nullptr;
  prometheus::Counter* backend_failures = nullptr;  // failed backend steps
  prometheus::Counter* steps = nullptr;
  prometheus::Histogram* step_seconds = nullptr;
  prometheus::Histogram* step_tokens = nullptr;
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_SCHEDULER_METRICS_H_
