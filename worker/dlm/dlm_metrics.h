// Prometheus metrics of the DLM decode loop (issue 7), per cache policy and, where per layer,
// per layer (a bounded label set: the model's layer count). Children are bound up front; Record()
// does no lookups beyond indexing and is thread-safe (prometheus-cpp counters are atomic).
//
//   prehoc_dlm_requests_total{model,policy,outcome}      outcome = ok | cancelled |
//                                  deadline_exceeded | invalid_argument | resource_exhausted |
//                                  unavailable | error (as prehoc_requests_total)
//   prehoc_dlm_steps_total{model,policy,kind}            kind = full | gen_refresh | partial
//   prehoc_dlm_generated_tokens_total{model,policy}      response tokens committed
//   prehoc_dlm_decode_seconds_total{model,policy}        wall time of the decode loops
//   prehoc_dlm_tokens_recomputed_total{model,policy,layer}  rows recomputed (Q, attention, MLP)
//   prehoc_dlm_kv_recomputed_total{model,policy,layer}      rows whose K/V were recomputed
//   prehoc_dlm_recompute_fraction{model,policy}          histogram, per request: rows recomputed
//                                                        per step and layer / canvas rows
//   prehoc_dlm_tokens_per_second{model,policy}           histogram, per request
//   prehoc_dlm_tokens_recomputed_per_step{model,policy}  histogram, per request: rows recomputed
//                                                        per step, averaged over layers
//   prehoc_dlm_batch_size{model}                         histogram, per batched step of the
//                                                        worker's DlmRunner: requests sharing
//                                                        the step's forward
#ifndef PREHOC_WORKER_DLM_DLM_METRICS_H_
#define PREHOC_WORKER_DLM_DLM_METRICS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cachemgr/dlm_schedule.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "worker/dlm/decoder.h"

namespace prehoc::dlm {

struct DlmMetrics {
  struct PerPolicy {
    prometheus::Counter* requests = nullptr;  // outcome "ok"
    std::vector<prometheus::Counter*> outcomes;  // index = DlmOutcomeIndex
    prometheus::Counter* full_steps = nullptr;
    prometheus::Counter* gen_refresh_steps = nullptr;
    prometheus::Counter* partial_steps = nullptr;
    prometheus::Counter* tokens = nullptr;
    prometheus::Counter* seconds = nullptr;
    std::vector<prometheus::Counter*> rows_recomputed;  // per layer
    std::vector<prometheus::Counter*> kv_recomputed;    // per layer
    prometheus::Histogram* recompute_fraction = nullptr;
    prometheus::Histogram* tokens_per_second = nullptr;
    prometheus::Histogram* rows_per_step = nullptr;
  };

  // Registers every family in `registry` (which must outlive this) with model=`model`, policy in
  // none/prefix/dual/dllm/spa/spa-auto and layer in 0..num_layers−1.
  DlmMetrics(prometheus::Registry& registry, const std::string& model, int num_layers);

  // Adds one finished request (steps, tokens, recompute counts, tokens/s); its outcome is
  // counted by RecordOutcome.
  void Record(const DiffuseResult& result);
  // Counts one request's end under prehoc_dlm_requests_total{outcome} (OK = "ok"; codes map as
  // for prehoc_requests_total; FAILED_PRECONDITION counts as "invalid_argument").
  void RecordOutcome(DlmCachePolicy policy, const absl::Status& status);
  // One batched step (one DlmBackend::ForwardBatch) of `requests` requests.
  void RecordBatch(int requests);
  static const std::vector<std::string>& Outcomes();

  std::vector<PerPolicy> per_policy;  // index = static_cast<int>(DlmCachePolicy)
  prometheus::Histogram* batch_size = nullptr;
};

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_DLM_METRICS_H_
