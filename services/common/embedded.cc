#include "services/common/embedded.h"

#include <algorithm>
#include <filesystem>

#include "common/logging.h"
#include "services/common/proto_convert.h"

namespace prehoc {
namespace {
constexpr char kWorkerId[] = "embedded";  // the in-process worker (served_by, plan stream)
}  // namespace

absl::Status LocalWorkerLink::Start(const std::string& sequence_id,
                                    const InferenceRequest& request, InferenceCallback callback) {
  InferenceRequest r = request;
  r.request_id = sequence_id;
  absl::StatusOr<std::string> id = scheduler_->Generate(std::move(r), std::move(callback));
  return id.status();
}

void LocalWorkerLink::Free(const std::string& sequence_id) {
  scheduler_->Cancel(sequence_id, absl::CancelledError("sequence freed")).IgnoreError();
}

absl::Status LocalDiffusionLink::Start(const DiffusionRequest& request,
                                       DiffusionCallback callback) {
  return runner_->Diffuse(request, std::move(callback)).status();
}

void LocalDiffusionLink::Cancel(const std::string& request_id) {
  runner_->CancelDiffusion(request_id, absl::CancelledError("cancelled")).IgnoreError();
}

absl::StatusOr<std::unique_ptr<EmbeddedCluster>> EmbeddedCluster::Create(EmbeddedOptions o) {
  auto c = std::unique_ptr<EmbeddedCluster>(new EmbeddedCluster());
  c->registry_ = o.registry ? o.registry : std::make_shared<prometheus::Registry>();
  std::string name = o.model_name;
  if (name.empty()) {
    name = std::filesystem::path(o.engine.model_dir).lexically_normal().filename().string();
    if (name.empty()) name = "default";
  }
  if (o.engine.weights == nullptr && !o.engine.model_dir.empty()) {
    DlmRunnerOptions dro = o.dlm;
    dro.model_name = name;
    dro.worker_id = "embedded";
    dro.registry = c->registry_.get();
    dro.device = o.device;
    // One device for both models: a failed diffusion forward fails the scheduler's backend too
    // (which exists before any Diffuse can run).
    dro.on_backend_failure = [p = c.get()](const absl::Status& st) {
      p->scheduler_->MarkBackendFailed(st);
    };
    absl::StatusOr<std::unique_ptr<DlmRunner>> runner = MaybeCreateDlmRunner(
        o.engine.model_dir, o.engine.num_threads, o.dlm_calibrate, std::move(dro),
        &o.engine.weights);
    if (!runner.ok()) return runner.status();
    c->dlm_runner_ = std::move(*runner);
  }
  BackendOptions bo;
  bo.device = o.device;
  bo.engine = o.engine;
  absl::StatusOr<std::unique_ptr<ModelBackend>> engine = CreateBackend(bo);
  if (!engine.ok()) return engine.status();
  if (o.wrap_backend) *engine = o.wrap_backend(std::move(*engine));
  c->scheduler_metrics_ = std::make_unique<SchedulerMetrics>(*c->registry_, name);
  c->router_metrics_ = std::make_unique<RouterMetrics>(*c->registry_);
  SchedulerOptions so = o.scheduler;
  so.model_name = name;
  so.worker_id = kWorkerId;
  so.metrics = c->scheduler_metrics_.get();
  so.on_backend_failure = [p = c.get()](const absl::Status& st) { p->OnBackendFailure(st); };
  absl::StatusOr<std::unique_ptr<Scheduler>> sched = Scheduler::Create(std::move(*engine), so);
  if (!sched.ok()) return sched.status();
  c->scheduler_ = std::move(*sched);
  c->workers_ = std::make_unique<WorkerRegistry>(WorkerRegistryOptions{});
  c->sequences_ = std::make_unique<SequenceRegistry>();
  // The planner exactly as CacheManagerServer sets it up.
  c->plan_metrics_ = std::make_unique<PlanMetrics>(*c->registry_);
  PlanManagerOptions po;
  po.metrics = c->plan_metrics_.get();
  c->plans_ = std::make_unique<PlanManager>(po);
  c->dlm_router_metrics_ = std::make_unique<DlmRouterMetrics>(*c->registry_);
  RouterOptions ro{"em", c->router_metrics_.get(), c->plans_.get()};
  ro.on_model_registered = [dm = c->dlm_router_metrics_.get()](const ModelDescription& m) {
    dm->PrepareModel(m);
  };
  c->router_ = std::make_unique<Router>(c->workers_.get(), c->sequences_.get(), std::move(ro));
  WorkerRegistration r;
  r.worker_id = kWorkerId;
  r.address = "in-process";
  r.models = c->scheduler_->ListModels();
  DescribeDiffusion(c->dlm_runner_.get(), &r.models);
  r.page_size = c->scheduler_->backend().page_size();
  r.load = c->scheduler_->Load();
  r.ready = true;
  r.local = true;
  r.link = std::make_shared<LocalWorkerLink>(c->scheduler_.get());
  absl::StatusOr<int64_t> epoch = c->router_->RegisterWorker(std::move(r));
  if (!epoch.ok()) return epoch.status();
  c->epoch_ = *epoch;
  DlmRouterOptions dro;
  dro.id_prefix = "em";
  dro.metrics = c->dlm_router_metrics_.get();
  dro.link_factory = [runner = c->dlm_runner_.get()](const WorkerSnapshot&) {
    return std::static_pointer_cast<DiffusionLink>(std::make_shared<LocalDiffusionLink>(runner));
  };
  c->dlm_router_ = std::make_unique<DlmRouter>(c->workers_.get(), dro);
  // The in-process plan stream: wake-ups run on whichever thread queued a plan (the step thread
  // at a stream's first token, the agent after telemetry), so they only flag the agent.
  c->telemetry_interval_ = std::max(o.telemetry_interval, absl::Milliseconds(1));
  c->plan_subscription_ = c->plans_->Subscribe(kWorkerId, [p = c.get()] {
    absl::MutexLock l(&p->agent_mu_);
    p->plans_queued_ = true;
  });
  c->agent_ = std::thread([p = c.get()] { p->AgentLoop(); });
  return c;
}

void EmbeddedCluster::AgentLoop() {
  absl::Time next_report = absl::Now() + telemetry_interval_;
  while (true) {
    bool offer;
    {
      absl::MutexLock l(&agent_mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(agent_mu_) {
        return agent_stop_ || plans_queued_;
      };
      agent_mu_.AwaitWithDeadline(absl::Condition(&wake), next_report);
      if (agent_stop_) return;
      offer = plans_queued_;
      plans_queued_ = false;
    }
    if (offer) OfferPendingPlans();
    if (absl::Now() >= next_report) {
      ReportTelemetry();
      next_report = absl::Now() + telemetry_interval_;
    }
  }
}

void EmbeddedCluster::OfferPendingPlans() {
  for (PlanUpdate& u : plans_->TakePending(kWorkerId)) {
    absl::Status s = scheduler_->OfferPlan(u.sequence_id, std::move(u.plan), u.produced);
    // NOT_FOUND: the sequence ended meanwhile.
    if (!s.ok() && s.code() != absl::StatusCode::kNotFound) {
      LOG(WARNING) << "plan for " << u.sequence_id << " refused: " << s.message();
    }
  }
}

void EmbeddedCluster::OnBackendFailure(const absl::Status& status) {
  LOG(ERROR) << "embedded worker is no longer ready: backend failed: " << status;
  std::function<void(const absl::Status&)> listener;
  {
    absl::MutexLock l(&failure_mu_);
    if (backend_failure_.ok()) backend_failure_ = status;
    listener = failure_listener_;
    // The router exists (no request reaches the scheduler but through it) unless the
    // destructor is taking it down (closing_, set under this lock before the reset).
    if (!closing_) {
      absl::Status hb =
          router_->Heartbeat(kWorkerId, epoch_, scheduler_->Load(), /*ready=*/false);
      if (!hb.ok()) LOG(WARNING) << "marking the embedded worker not ready: " << hb;
    }
  }
  if (listener) listener(status);
}

void EmbeddedCluster::SetBackendFailureListener(
    std::function<void(const absl::Status&)> listener) {
  absl::Status failed;
  {
    absl::MutexLock l(&failure_mu_);
    failure_listener_ = listener;
    failed = backend_failure_;
  }
  if (!failed.ok() && listener) listener(failed);
}

int EmbeddedCluster::ReportTelemetry() {
  std::vector<SequenceTelemetry> seqs = scheduler_->TakeTelemetry();
  if (seqs.empty()) return 0;
  router_->RecordTelemetry(
      TelemetryReportFromProto(TelemetryToProto(kWorkerId, 0, scheduler_->Load(), seqs)));
  return static_cast<int>(seqs.size());
}

EmbeddedCluster::~EmbeddedCluster() {
  if (agent_.joinable()) {
    {
      absl::MutexLock l(&agent_mu_);
      agent_stop_ = true;
    }
    agent_.join();
  }
  {
    absl::MutexLock l(&failure_mu_);
    closing_ = true;
  }
  if (plans_ != nullptr) plans_->Unsubscribe(plan_subscription_);
  dlm_router_.reset();  // ends Diffuse client streams and cancels them in the runner
  dlm_runner_.reset();  // joins the DLM executor
  router_.reset();     // ends client streams; waits for the scheduler's terminal events
  scheduler_.reset();  // then the step thread
}

absl::StatusOr<std::unique_ptr<EmbeddedServer>> EmbeddedServer::Create(EmbeddedServerOptions o) {
  auto s = std::unique_ptr<EmbeddedServer>(new EmbeddedServer());
  absl::StatusOr<std::unique_ptr<EmbeddedCluster>> cluster = EmbeddedCluster::Create(o.cluster);
  if (!cluster.ok()) return cluster.status();
  s->cluster_ = std::move(*cluster);
  s->service_ = std::make_unique<InferenceService>(
      &s->cluster_->backend(),
      InferenceServiceOptions{o.max_request_bytes, &s->cluster_->diffusion()});
  absl::StatusOr<GrpcServer> server = StartGrpcServer(o.listen_address, {s->service_.get()},
                                                      TransportMessageLimit(o.max_request_bytes));
  if (!server.ok()) return server.status();
  s->grpc_ = std::move(*server);
  if (!o.metrics_address.empty()) {
    absl::StatusOr<MetricsEndpoint> m =
        StartMetricsEndpoint(o.metrics_address, s->cluster_->shared_registry());
    if (!m.ok()) return m.status();
    s->metrics_ = std::move(*m);
  }
  SetReadiness(s->grpc_.server.get(), true);
  // A backend failure turns readiness off for good (at once if one happened already).
  s->cluster_->SetBackendFailureListener(
      [server = s->grpc_.server.get(), live = o.liveness_follows_backend](const absl::Status&) {
        if (live) SetLiveness(server, false);  // first: readiness is what tests and probes watch
        SetReadiness(server, false);
      });
  LOG(INFO) << "embedded server grpc_port=" << s->grpc_.port
            << " metrics_port=" << s->metrics_.port;
  return s;
}

EmbeddedServer::~EmbeddedServer() { Shutdown(absl::Now()); }

void EmbeddedServer::Shutdown(absl::Time deadline) {
  if (shut_down_) return;
  shut_down_ = true;
  if (grpc_.server == nullptr) return;  // Create failed before serving
  cluster_->router().StartDrain();
  cluster_->diffusion().StartDrain();
  SetReadiness(grpc_.server.get(), false);
  cluster_->diffusion().WaitIdle(deadline);
  cluster_->router().WaitIdle(deadline);
  cluster_->SetBackendFailureListener(nullptr);  // the server is about to stop
  grpc_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  grpc_.server->Wait();
  cluster_.reset();
}

}  // namespace prehoc
