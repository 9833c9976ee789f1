#include "services/common/embedded.h"

#include <filesystem>

#include "common/logging.h"

namespace prehoc {

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

absl::StatusOr<std::unique_ptr<EmbeddedCluster>> EmbeddedCluster::Create(EmbeddedOptions o) {
  auto c = std::unique_ptr<EmbeddedCluster>(new EmbeddedCluster());
  c->registry_ = o.registry ? o.registry : std::make_shared<prometheus::Registry>();
  std::string name = o.model_name;
  if (name.empty()) {
    name = std::filesystem::path(o.engine.model_dir).lexically_normal().filename().string();
    if (name.empty()) name = "default";
  }
  BackendOptions bo;
  bo.device = o.device;
  bo.engine = o.engine;
  absl::StatusOr<std::unique_ptr<ModelBackend>> engine = CreateBackend(bo);
  if (!engine.ok()) return engine.status();
  c->scheduler_metrics_ = std::make_unique<SchedulerMetrics>(*c->registry_, name);
  c->router_metrics_ = std::make_unique<RouterMetrics>(*c->registry_);
  SchedulerOptions so = o.scheduler;
  so.model_name = name;
  so.worker_id = "embedded";
  so.metrics = c->scheduler_metrics_.get();
  absl::StatusOr<std::unique_ptr<Scheduler>> sched = Scheduler::Create(std::move(*engine), so);
  if (!sched.ok()) return sched.status();
  c->scheduler_ = std::move(*sched);
  c->workers_ = std::make_unique<WorkerRegistry>(WorkerRegistryOptions{});
  c->sequences_ = std::make_unique<SequenceRegistry>();
  c->router_ = std::make_unique<Router>(c->workers_.get(), c->sequences_.get(),
                                        RouterOptions{"em", c->router_metrics_.get()});
  WorkerRegistration r;
  r.worker_id = "embedded";
  r.address = "in-process";
  r.models = c->scheduler_->ListModels();
  r.page_size = c->scheduler_->backend().page_size();
  r.load = c->scheduler_->Load();
  r.ready = true;
  r.local = true;
  r.link = std::make_shared<LocalWorkerLink>(c->scheduler_.get());
  absl::StatusOr<int64_t> epoch = c->router_->RegisterWorker(std::move(r));
  if (!epoch.ok()) return epoch.status();
  return c;
}

EmbeddedCluster::~EmbeddedCluster() {
  router_.reset();     // ends client streams; waits for the scheduler's terminal events
  scheduler_.reset();  // then the step thread
}

absl::StatusOr<std::unique_ptr<EmbeddedServer>> EmbeddedServer::Create(EmbeddedServerOptions o) {
  auto s = std::unique_ptr<EmbeddedServer>(new EmbeddedServer());
  absl::StatusOr<std::unique_ptr<EmbeddedCluster>> cluster = EmbeddedCluster::Create(o.cluster);
  if (!cluster.ok()) return cluster.status();
  s->cluster_ = std::move(*cluster);
  s->service_ = std::make_unique<InferenceService>(&s->cluster_->backend(),
                                                   InferenceServiceOptions{o.max_request_bytes});
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
  SetReadiness(grpc_.server.get(), false);
  cluster_->router().WaitIdle(deadline);
  grpc_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  grpc_.server->Wait();
  cluster_.reset();
}

}  // namespace prehoc
