#include "services/cachemgr/cachemgr_server.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "services/cachemgr/grpc_diffusion_link.h"
#include "services/cachemgr/grpc_worker_link.h"

namespace prehoc {

absl::StatusOr<std::unique_ptr<CacheManagerServer>> CacheManagerServer::Create(
    CacheManagerServerOptions options) {
  auto s = std::unique_ptr<CacheManagerServer>(new CacheManagerServer());
  s->registry_ = options.registry ? options.registry : std::make_shared<prometheus::Registry>();
  s->metrics_struct_ = std::make_unique<RouterMetrics>(*s->registry_);
  WorkerRegistryOptions wo;
  wo.heartbeat_interval = options.heartbeat_interval;
  wo.missed_heartbeats = options.missed_heartbeats;
  wo.link_factory = [](const std::string& id, const std::string& address) {
    return std::static_pointer_cast<WorkerLink>(GrpcWorkerLink::Create(id, address));
  };
  s->workers_ = std::make_unique<WorkerRegistry>(wo);
  s->sequences_ = std::make_unique<SequenceRegistry>();
  s->plan_metrics_ = std::make_unique<PlanMetrics>(*s->registry_);
  PlanManagerOptions po;
  po.metrics = s->plan_metrics_.get();
  po.clock = options.clock;
  s->plans_ = std::make_unique<PlanManager>(po);
  RouterOptions ro;
  ro.id_prefix = options.id_prefix.empty()
                     ? absl::StrCat("cm", absl::Hex(absl::ToUnixMicros(absl::Now())))
                     : options.id_prefix;
  ro.metrics = s->metrics_struct_.get();
  ro.plans = s->plans_.get();
  s->dlm_metrics_ = std::make_unique<DlmRouterMetrics>(*s->registry_);
  ro.on_model_registered = [dm = s->dlm_metrics_.get()](const ModelDescription& m) {
    dm->PrepareModel(m);
  };
  s->router_ = std::make_unique<Router>(s->workers_.get(), s->sequences_.get(), ro);
  DlmRouterOptions dro;
  dro.id_prefix = ro.id_prefix;
  dro.link_factory = &GrpcDiffusionLink::ForWorker;
  dro.metrics = s->dlm_metrics_.get();
  s->dlm_router_ = std::make_unique<DlmRouter>(s->workers_.get(), dro);
  s->inference_service_ = std::make_unique<InferenceService>(
      s->router_.get(), InferenceServiceOptions{options.max_request_bytes, s->dlm_router_.get()});
  s->cachemgr_service_ = std::make_unique<CacheManagerService>(
      s->router_.get(), s->workers_.get(), s->sequences_.get(), s->plans_.get());
  absl::StatusOr<GrpcServer> server = StartGrpcServer(
      options.listen_address, {s->inference_service_.get(), s->cachemgr_service_.get()},
      TransportMessageLimit(options.max_request_bytes));
  if (!server.ok()) return server.status();
  s->grpc_ = std::move(*server);
  if (!options.metrics_address.empty()) {
    absl::StatusOr<MetricsEndpoint> m = StartMetricsEndpoint(options.metrics_address, s->registry_);
    if (!m.ok()) return m.status();
    s->metrics_ = std::move(*m);
  }
  s->tick_ = std::max(absl::Milliseconds(10), options.heartbeat_interval / 4);
  s->ticker_ = std::thread([p = s.get()] { p->TickLoop(); });
  LOG(INFO) << "cache manager serving grpc_port=" << s->grpc_.port
            << " metrics_port=" << s->metrics_.port
            << " heartbeat_interval=" << absl::FormatDuration(options.heartbeat_interval)
            << " id_prefix=" << ro.id_prefix;
  return s;
}

CacheManagerServer::~CacheManagerServer() { Shutdown(absl::Now()); }

void CacheManagerServer::TickLoop() {
  bool was_ready = false;
  while (true) {
    router_->Tick();
    dlm_router_->Tick();  // after the registry dropped dead workers
    const bool ready = router_->Ready();
    if (ready != was_ready) {
      SetReadiness(grpc_.server.get(), ready);
      LOG(INFO) << "cache manager readiness=" << (ready ? "SERVING" : "NOT_SERVING");
      was_ready = ready;
    }
    absl::MutexLock l(&mu_);
    auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; };
    if (mu_.AwaitWithTimeout(absl::Condition(&stopping), tick_)) break;
  }
}

void CacheManagerServer::Shutdown(absl::Time deadline) {
  {
    absl::MutexLock l(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (grpc_.server == nullptr) return;  // Create failed before serving
  LOG(INFO) << "cache manager draining";
  router_->StartDrain();
  dlm_router_->StartDrain();
  SetReadiness(grpc_.server.get(), false);
  if (!dlm_router_->WaitIdle(deadline)) {
    LOG(WARNING) << "drain deadline passed with " << dlm_router_->ActiveStreams()
                 << " Diffuse streams active; ending them";
  }
  if (!router_->WaitIdle(deadline)) {
    LOG(WARNING) << "drain deadline passed with " << router_->ActiveStreams()
                 << " streams active; ending them";
  }
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  if (ticker_.joinable()) ticker_.join();
  SetReadiness(grpc_.server.get(), false);
  // Cancels the streams still running (their reactors cancel them in the router), then waits.
  grpc_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  grpc_.server->Wait();
  dlm_router_.reset();  // fails what is left UNAVAILABLE
  router_.reset();  // waits for the worker links' streams to end
  LOG(INFO) << "cache manager stopped";
}

}  // namespace prehoc
