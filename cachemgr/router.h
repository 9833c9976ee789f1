// The cache manager's front door as a core class (no gRPC types): an InferenceBackend that
// places each request on a ready worker, relays the worker's stream to the client, mirrors the
// sequence's growth in the SequenceRegistry, and fails the streams of a worker that stops
// heartbeating with UNAVAILABLE (releasing its sequences' pages from the accounting).
//
// Placement: among ready workers with a healthy link that serve the model, skip the full ones
// (this cache manager's sequences there >= max_running + max_queue, or too few unreserved KV
// pages for prompt + max_tokens), then pick the lowest sequences / max_running, ties to the most
// free pages, then round robin. Counts come from the SequenceRegistry (exact, immediate) rather than from the
// heartbeat load (stale by up to one interval).
//
// Threading: Generate/Cancel/RegisterWorker/Heartbeat/Tick from any thread. Link callbacks
// arrive on link threads; deliveries to one client stream are serialised by a per-stream mutex
// and stop after the terminal event. Tick() is called periodically by the server (or a test).
#ifndef PREHOC_CACHEMGR_ROUTER_H_
#define PREHOC_CACHEMGR_ROUTER_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/plan_manager.h"
#include "cachemgr/sequence_registry.h"
#include "cachemgr/worker_registry.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "worker/scheduler_types.h"

namespace prehoc {

// Metrics of the cache manager (docs/metrics.md), prefix prehoc_cachemgr_.
struct RouterMetrics {
  explicit RouterMetrics(prometheus::Registry& registry);
  // Creates the request counters of an autoregressive `model` at 0 for every outcome of the
  // policies it serves and "default" (the label of requests naming none). Router::RegisterWorker
  // calls it; no-op for a bidirectional (diffusion) model.
  void PrepareModel(const ModelDescription& model);
  // Other per (model, policy[, outcome]) children are added on first use (once per request,
  // never per token); prometheus-cpp returns the existing child for known labels.
  prometheus::Family<prometheus::Counter>* requests = nullptr;
  prometheus::Family<prometheus::Histogram>* time_to_first_token_s = nullptr;
  prometheus::Family<prometheus::Counter>* tokens = nullptr;
  prometheus::Gauge* active_streams = nullptr;
  prometheus::Gauge* workers_registered = nullptr;
  prometheus::Gauge* workers_ready = nullptr;
  prometheus::Counter* worker_failures = nullptr;
  prometheus::Gauge* sequences = nullptr;
  prometheus::Gauge* kv_pages_used = nullptr;
  prometheus::Gauge* kv_pages_reserved = nullptr;
  prometheus::Gauge* kv_pages_total = nullptr;
  // From worker telemetry, per policy.
  prometheus::Family<prometheus::Histogram>* delta_observed = nullptr;
  prometheus::Family<prometheus::Histogram>* kept_fraction = nullptr;
  prometheus::Family<prometheus::Counter>* refreshes = nullptr;
  prometheus::Counter* telemetry_batches = nullptr;
};

// One telemetry batch from a worker, as plain data (see cachemgr.proto TelemetryBatch).
struct TelemetryReport {
  struct Sequence {
    std::string sequence_id;
    std::string policy;
    double mean_kept_fraction = 1.0;
    int64_t refreshes = 0;
    int64_t shares = 0;
    bool in_progress = false;  // a running sequence's interim record (totals not final)
  };
  struct Refresh {
    std::string sequence_id;
    int layer = -1;
    int kv_head = -1;
    double delta = 0;
  };
  std::string worker_id;
  std::vector<Sequence> sequences;
  std::vector<Refresh> refreshes;
};

struct RouterOptions {
  // Prefix of sequence ids and assigned request ids (unique per cache-manager process).
  std::string id_prefix = "cm";
  // May be null. Must outlive the router.
  RouterMetrics* metrics = nullptr;
  // Selection planner: when set, every placed sequence with an explicit sparse policy gets a
  // plan once the worker reports its first token (queued for the worker's plan stream; the
  // worker decodes with its local copy of the preset until then), closed when the sequence
  // ends; telemetry feeds the planner's δ-controllers. May be null (no cache-manager plans). Must outlive the router.
  PlanManager* plans = nullptr;
  // Called by RegisterWorker for each model the worker serves, after the router's own metrics
  // were prepared (e.g. the Diffuse front door's DlmRouterMetrics::PrepareModel). May be empty.
  std::function<void(const ModelDescription&)> on_model_registered;
};

class Router : public InferenceBackend {
 public:
  // `workers` and `sequences` are not owned and must outlive the router.
  Router(WorkerRegistry* workers, SequenceRegistry* sequences, RouterOptions options);
  // Ends every stream UNAVAILABLE, frees its sequence on the worker and waits until every link
  // stream has delivered its terminal event.
  ~Router() override;

  // InferenceBackend. Generate errors: INVALID_ARGUMENT for an unknown model (naming `model`)
  // or a bad request_id; UNAVAILABLE when no ready worker serves the model; RESOURCE_EXHAUSTED
  // when every ready worker is full (the message states the limits); ALREADY_EXISTS for a
  // request_id in use. Field validation beyond that is the worker's and arrives as the
  // stream's status.
  absl::StatusOr<std::string> Generate(InferenceRequest request, InferenceCallback callback) override;
  absl::Status Cancel(std::string_view request_id,
                      absl::Status status = absl::CancelledError("cancelled")) override;
  std::vector<ModelDescription> ListModels() const override;
  bool Ready() const override;

  // Registers a worker (see WorkerRegistry::Register); sequences it reports that this cache
  // manager does not know (orphans of a previous instance) are freed on the worker.
  absl::StatusOr<int64_t> RegisterWorker(WorkerRegistration registration);
  absl::Status Heartbeat(const std::string& worker_id, int64_t epoch, const LoadReport& load,
                         bool ready);
  // Expires workers that missed heartbeats: their streams end UNAVAILABLE and their sequences
  // leave the registry. Refreshes the gauges. Returns the expired worker ids.
  std::vector<std::string> Tick();

  int ActiveStreams() const;

  // Records a worker's telemetry batch: metrics, and the refresh δ samples go to the planner's
  // δ-controllers (new plan versions then go out on the plan streams). Thread-safe.
  void RecordTelemetry(const TelemetryReport& report);
  // Blocks until at least `n` telemetry batches were recorded or until `deadline`.
  bool AwaitTelemetry(int64_t n, absl::Time deadline);

  // Drain: new requests get UNAVAILABLE and Ready() is false; running streams continue.
  void StartDrain();
  // Blocks until no stream is active or until `deadline`; true when idle.
  bool WaitIdle(absl::Time deadline);

 private:
  struct Stream;
  void OnLinkEvent(const std::shared_ptr<Stream>& s, InferenceEvent ev);
  // Delivers a terminal error unless the stream already ended; true when delivered.
  bool FailStream(const std::shared_ptr<Stream>& s, const absl::Status& status);
  // Forgets the stream (idempotent).
  void Retire(const std::shared_ptr<Stream>& s);
  // Computes the sequence's selection plan (PlanManager::Open). Called at the stream's first
  // event, so the worker holds the sequence before the plan reaches it; the terminal event,
  // which always follows, closes it.
  void OpenPlan(const Stream& s);
  // Removes the sequence from the registry and closes its plan (idempotent).
  void ReleaseSequence(const std::string& sequence_id);
  void CountOutcome(const Stream& s, const absl::Status& status);
  void UpdateGauges();

  WorkerRegistry* const workers_;
  SequenceRegistry* const sequences_;
  const RouterOptions options_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Stream>> streams_ ABSL_GUARDED_BY(mu_);
  int link_outstanding_ ABSL_GUARDED_BY(mu_) = 0;  // link streams without their terminal yet
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int64_t telemetry_batches_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_ROUTER_H_
