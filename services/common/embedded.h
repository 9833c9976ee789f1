// Embedded mode: the worker core (Scheduler over an Engine) and the cache-manager core (Router
// with its registries and the selection planner) in one process, joined by an in-process
// WorkerLink instead of gRPC. Selection plans take the split-mode path: the Router opens each
// sparse sequence's plan in the cache manager's PlanManager (δ-controller per (model, policy,
// δ*)); an agent thread offers queued plans to the Scheduler (swapped in at step boundaries, as
// the worker's StreamPlans reader does) and, every telemetry_interval (the worker's heartbeat
// cadence), hands the Scheduler's telemetry to the Router — converted through the same
// TelemetryBatch as on the wire — which feeds the same controllers.
// EmbeddedCluster is the in-process backend (CLI, tests, loadgen); EmbeddedServer serves it as
// prehoc.v1.Inference with health, reflection and metrics: `prehoc serve`.
#ifndef PREHOC_SERVICES_COMMON_EMBEDDED_H_
#define PREHOC_SERVICES_COMMON_EMBEDDED_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/dlm_router.h"
#include "cachemgr/plan_manager.h"
#include "cachemgr/router.h"
#include "cachemgr/sequence_registry.h"
#include "cachemgr/worker_registry.h"
#include "prometheus/registry.h"
#include "services/common/inference_service.h"
#include "services/common/server_util.h"
#include "worker/backend_factory.h"
#include "worker/dlm/dlm_runner.h"
#include "worker/scheduler.h"

namespace prehoc {

// WorkerLink to a Scheduler in the same process.
class LocalWorkerLink : public WorkerLink {
 public:
  // `scheduler` is not owned and must outlive the link's streams.
  explicit LocalWorkerLink(Scheduler* scheduler) : scheduler_(scheduler) {}
  absl::Status Start(const std::string& sequence_id, const InferenceRequest& request,
                     InferenceCallback callback) override;
  void Free(const std::string& sequence_id) override;

 private:
  Scheduler* const scheduler_;
};

// DiffusionLink to a DlmRunner in the same process.
class LocalDiffusionLink : public DiffusionLink {
 public:
  // `runner` is not owned and must outlive the link's streams.
  explicit LocalDiffusionLink(DlmRunner* runner) : runner_(runner) {}
  absl::Status Start(const DiffusionRequest& request, DiffusionCallback callback) override;
  void Cancel(const std::string& request_id) override;

 private:
  DlmRunner* const runner_;
};

struct EmbeddedOptions {
  EngineOptions engine;
  // Backend: "cpu" (default here, so library users and tests get the reference), "auto" (CUDA
  // when a device is usable, else CPU; the servers' flag default) or "cuda" (see
  // worker/backend_factory.h).
  std::string device = "cpu";
  SchedulerOptions scheduler;  // model_name / worker_id / metrics filled in
  std::string model_name;      // "" = the model directory's base name
  // Metrics registry; null = a private one.
  std::shared_ptr<prometheus::Registry> registry;
  // Diffuse, for a diffusion model (see WorkerServerOptions::dlm); model_name, worker_id and
  // registry are filled in.
  DlmRunnerOptions dlm;
  bool dlm_calibrate = false;
  // How often the Scheduler's telemetry (refresh δ samples, sequence records) goes to the
  // cache-manager core: the cadence at which a split-mode worker sends it (after every
  // heartbeat; the cache manager's default heartbeat interval is 1 s).
  absl::Duration telemetry_interval = absl::Seconds(1);
  // Test hook: wraps the model backend before the scheduler takes it (e.g. fault injection).
  std::function<std::unique_ptr<ModelBackend>(std::unique_ptr<ModelBackend>)> wrap_backend;
};

// Scheduler + Router in one process. Thread-safe (it is an InferenceBackend: the Router).
class EmbeddedCluster {
 public:
  static absl::StatusOr<std::unique_ptr<EmbeddedCluster>> Create(EmbeddedOptions options);
  // Ends every stream UNAVAILABLE (router first, then the scheduler).
  ~EmbeddedCluster();

  InferenceBackend& backend() { return *router_; }
  // Diffuse through the cache-manager core (DlmRouter → LocalDiffusionLink → DlmRunner).
  DlmRouter& diffusion() { return *dlm_router_; }
  DlmRunner* dlm_runner() { return dlm_runner_.get(); }
  Router& router() { return *router_; }
  Scheduler& scheduler() { return *scheduler_; }
  // The cache-manager core's selection planner (plans and δ-controllers).
  PlanManager& plans() { return *plans_; }
  // Hands the Scheduler's pending telemetry to the Router now (what the agent thread does every
  // telemetry_interval); returns the number of sequence records handed over.
  int ReportTelemetry();
  prometheus::Registry& registry() { return *registry_; }
  const std::shared_ptr<prometheus::Registry>& shared_registry() { return registry_; }
  // Called (on the scheduler's step thread, or here when it already happened) with the
  // scheduler's first backend failure, after the in-process worker was marked not ready in the
  // router's registry; null clears it. Thread-safe.
  void SetBackendFailureListener(std::function<void(const absl::Status&)> listener);

 private:
  EmbeddedCluster() = default;
  // Scheduler::on_backend_failure: the worker is no longer ready (a heartbeat with ready=false,
  // as a split-mode worker's next heartbeat carries), then the listener.
  void OnBackendFailure(const absl::Status& status);
  // Agent thread: offers plans the PlanManager queued (on wake-ups) and reports telemetry every
  // telemetry_interval.
  void AgentLoop();
  void OfferPendingPlans();

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<SchedulerMetrics> scheduler_metrics_;
  std::unique_ptr<RouterMetrics> router_metrics_;
  std::unique_ptr<PlanMetrics> plan_metrics_;
  std::unique_ptr<PlanManager> plans_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<WorkerRegistry> workers_;
  std::unique_ptr<SequenceRegistry> sequences_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<DlmRunner> dlm_runner_;  // null for an autoregressive model
  std::unique_ptr<DlmRouterMetrics> dlm_router_metrics_;
  std::unique_ptr<DlmRouter> dlm_router_;

  absl::Duration telemetry_interval_;
  int64_t epoch_ = 0;  // of the in-process worker's registration
  uint64_t plan_subscription_ = 0;
  absl::Mutex failure_mu_;
  absl::Status backend_failure_ ABSL_GUARDED_BY(failure_mu_);
  bool closing_ ABSL_GUARDED_BY(failure_mu_) = false;  // the router is going away
  std::function<void(const absl::Status&)> failure_listener_ ABSL_GUARDED_BY(failure_mu_);
  std::thread agent_;
  absl::Mutex agent_mu_;
  bool agent_stop_ ABSL_GUARDED_BY(agent_mu_) = false;
  bool plans_queued_ ABSL_GUARDED_BY(agent_mu_) = false;
};

struct EmbeddedServerOptions {
  EmbeddedOptions cluster;
  std::string listen_address = "127.0.0.1:0";
  std::string metrics_address;  // "" = none
  int64_t max_request_bytes = int64_t{4} << 20;
  // After a backend failure also turn health `liveness` NOT_SERVING (see
  // WorkerServerOptions::liveness_follows_backend).
  bool liveness_follows_backend = false;
};

// `prehoc serve`: EmbeddedCluster behind prehoc.v1.Inference + health + reflection + metrics.
class EmbeddedServer {
 public:
  static absl::StatusOr<std::unique_ptr<EmbeddedServer>> Create(EmbeddedServerOptions options);
  ~EmbeddedServer();
  int port() const { return grpc_.port; }
  int metrics_port() const { return metrics_.port; }
  EmbeddedCluster& cluster() { return *cluster_; }
  // Readiness (health `readiness`) is true once serving and false for good after the
  // scheduler's backend fails (EmbeddedCluster::SetBackendFailureListener; a failed diffusion
  // forward fails it too) or the drain starts; liveness too with liveness_follows_backend.
  // Drain: readiness false, new requests UNAVAILABLE, active streams may finish until
  // `deadline`, then the server stops. Idempotent.
  void Shutdown(absl::Time deadline);

 private:
  EmbeddedServer() = default;
  std::unique_ptr<EmbeddedCluster> cluster_;
  std::unique_ptr<InferenceService> service_;
  GrpcServer grpc_;
  MetricsEndpoint metrics_;
  bool shut_down_ = false;
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_EMBEDDED_H_
