// The prehoc-worker server, as a class so tests run it in-process: loads the model into an
// Engine, runs the continuous-batching Scheduler, and serves prehoc.v1.Inference (direct use),
// prehoc.v1.Worker (for the cache manager), grpc.health.v1 and reflection on one port and
// Prometheus /metrics on another. With a cache-manager address it registers and heartbeats
// (re-registering with its live sequences whenever the cache manager forgets it).
//
// Threads: gRPC's callback threads (adapters only), the scheduler's step thread (the engine),
// one agent thread for registration, heartbeats and telemetry (after each heartbeat: the
// sequences finished since the last batch, and the running ones that measured refresh δ since,
// with the exact δ per (layer, kv head)), and one plan thread holding the cache manager's
// StreamPlans stream open (reconnecting when it breaks): each plan received is offered to the
// scheduler, which swaps it in at the sequence's next step boundary — a step never waits on it.
// Plan time stamps are the cache manager's clock: the worker maps them onto its own clock with
// the offset estimated from its register/heartbeat round trips (ClockOffsetEstimator), so the
// plan-age metric excludes the skew between the machines.
#ifndef PREHOC_SERVICES_WORKER_WORKER_SERVER_H_
#define PREHOC_SERVICES_WORKER_WORKER_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "prehoc/v1/cachemgr.grpc.pb.h"
#include "prometheus/registry.h"
#include "prometheus/gauge.h"
#include "services/common/clock_offset.h"
#include "services/common/inference_service.h"
#include "services/common/server_util.h"
#include "services/worker/worker_service.h"
#include "worker/dlm/dlm_runner.h"
#include "worker/backend_factory.h"
#include "worker/engine.h"
#include "worker/scheduler.h"

namespace prehoc {

struct WorkerServerOptions {
  EngineOptions engine;
  // Backend: "cpu" (default here: library users and tests get the reference), "auto" (CUDA when
  // a device is usable, else CPU; prehoc-worker's flag default) or "cuda".
  std::string device = "cpu";
  // model_name, worker_id and metrics are filled in by Create.
  SchedulerOptions scheduler;
  // Name served by ListModels; "" = the model directory's base name.
  std::string model_name;
  // gRPC address; port 0 picks a free port (see port()).
  std::string listen_address = "127.0.0.1:0";
  // Prometheus address ("host:port"); "" = no metrics endpoint.
  std::string metrics_address;
  // Cache manager to register with; "" = standalone.
  std::string cachemgr_address;
  // Address the cache manager dials; "" = listen host with the bound port.
  std::string advertise_address;
  // Registry id; "" = the advertise address.
  std::string worker_id;
  int64_t max_request_bytes = int64_t{4} << 20;
  // Retry interval for registration while the cache manager is unreachable.
  absl::Duration register_retry = absl::Milliseconds(500);
  // Metrics registry; null = a private one.
  std::shared_ptr<prometheus::Registry> registry;
  // Diffuse (diffusion models only: config is_causal false; the weights are loaded once and
  // shared by the Engine and the DLM model). model_name, worker_id and registry are filled in.
  DlmRunnerOptions dlm;
  // Measure the per-layer drift profile at load (spa-auto; about 3 s for the shipped model).
  bool dlm_calibrate = false;
  // After a backend failure, also turn health `liveness` (and "") NOT_SERVING, so that a
  // liveness probe restarts the process (a device fault rarely heals in-process). Default false:
  // the process stays live (readiness alone goes NOT_SERVING) so the failure can be inspected.
  bool liveness_follows_backend = false;
  // Test hook: wraps the model backend before the scheduler takes it (e.g. fault injection).
  std::function<std::unique_ptr<ModelBackend>(std::unique_ptr<ModelBackend>)> wrap_backend;
};

class WorkerServer {
 public:
  // Loads the model and starts serving. Errors: the engine's (bad model dir), INVALID_ARGUMENT
  // for bad scheduler options, UNAVAILABLE when an address cannot be bound.
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Create(WorkerServerOptions options);
  // Shutdown(absl::Now()) if not done.
  ~WorkerServer();

  int port() const { return grpc_.port; }
  int metrics_port() const { return metrics_.port; }
  const std::string& worker_id() const { return worker_id_; }
  const std::string& address() const { return advertise_; }
  Scheduler& scheduler() { return *scheduler_; }
  // The Diffuse executor; null when the model is autoregressive.
  DlmRunner* dlm_runner() { return dlm_runner_.get(); }
  // The scheduler's models plus, for a diffusion model, its DLM cache policies and drift profile
  // (what the worker registers with the cache manager).
  std::vector<ModelDescription> DescribeModels() const;
  prometheus::Registry& registry() { return *registry_; }
  // True once registered with the cache manager (always false when standalone).
  bool registered() const;
  // The cache manager's clock relative to this worker's (from heartbeat round trips).
  const ClockOffsetEstimator& cachemgr_clock() const { return cachemgr_clock_; }

  // Readiness (health `readiness` and heartbeats' ready) is true once the model is loaded and
  // the server listens, and false for good once the backend fails (a failed step of the
  // scheduler, or a failed forward of a diffusion model's DlmRunner, which marks the scheduler
  // failed too: Scheduler::backend_status) or the drain starts. Liveness follows the backend
  // only with WorkerServerOptions::liveness_follows_backend.
  //
  // Graceful drain: readiness goes false (health and heartbeats), new requests get
  // UNAVAILABLE, in-flight requests may finish until `drain_deadline`; the rest end UNAVAILABLE;
  // then the gRPC server stops. Idempotent.
  void Shutdown(absl::Time drain_deadline);

 private:
  WorkerServer() = default;
  void AgentLoop();
  // Scheduler::on_backend_failure (step thread, or the DLM executor through
  // Scheduler::MarkBackendFailed): readiness (and, when asked, liveness) NOT_SERVING for good.
  void OnBackendFailure(const absl::Status& status);
  // Sends the scheduler's finished-sequence telemetry as one ReportTelemetry batch.
  void SendTelemetry(int64_t epoch);
  // The plan thread: StreamPlans while registered; Scheduler::OfferPlan for every plan.
  void PlanLoop();
  absl::Time Now() const { return clock_ ? clock_() : absl::Now(); }
  // Adds the round trip [sent, received] with the cache manager's clock reading (0 = none).
  void AddClockSample(absl::Time sent, int64_t server_unix_micros, absl::Time received);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<SchedulerMetrics> metrics_struct_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<DlmRunner> dlm_runner_;
  std::unique_ptr<DiffusionBackend> no_diffusion_;  // an autoregressive model's refusal
  std::unique_ptr<InferenceService> inference_service_;
  std::unique_ptr<WorkerService> worker_service_;
  GrpcServer grpc_;
  MetricsEndpoint metrics_;
  std::string worker_id_;
  std::string advertise_;
  std::string model_name_;
  std::string cachemgr_address_;
  absl::Duration register_retry_;
  std::function<absl::Time()> clock_;  // the scheduler's (deadlines, plan age)
  bool liveness_follows_backend_ = false;
  ClockOffsetEstimator cachemgr_clock_;
  prometheus::Gauge* clock_offset_s_ = nullptr;
  prometheus::Gauge* clock_rtt_s_ = nullptr;
  std::unique_ptr<v1::CacheManager::Stub> cachemgr_;
  std::thread agent_;
  std::thread plan_thread_;

  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  // Readiness has been published (the backend-failure callback may then turn it off).
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool registered_ ABSL_GUARDED_BY(mu_) = false;
  int64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;  // of the current registration
  std::shared_ptr<grpc::ClientContext> plan_ctx_ ABSL_GUARDED_BY(mu_);  // open plan stream
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_WORKER_WORKER_SERVER_H_
