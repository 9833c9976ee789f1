#include "services/worker/worker_server.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "services/common/plan_convert.h"
#include "services/common/proto_convert.h"

namespace prehoc {

absl::StatusOr<std::unique_ptr<WorkerServer>> WorkerServer::Create(WorkerServerOptions options) {
  auto s = std::unique_ptr<WorkerServer>(new WorkerServer());
  s->registry_ = options.registry ? options.registry : std::make_shared<prometheus::Registry>();
  s->model_name_ = options.model_name;
  if (s->model_name_.empty()) {
    s->model_name_ =
        std::filesystem::path(options.engine.model_dir).lexically_normal().filename().string();
    if (s->model_name_.empty()) {
      s->model_name_ = std::filesystem::path(options.engine.model_dir)
                           .lexically_normal()
                           .parent_path()
                           .filename()
                           .string();
    }
    if (s->model_name_.empty()) s->model_name_ = "default";
  }
  if (options.engine.weights == nullptr && !options.engine.model_dir.empty()) {
    DlmRunnerOptions dro = options.dlm;
    dro.model_name = s->model_name_;
    dro.worker_id = options.worker_id.empty() ? "worker" : options.worker_id;
    dro.registry = s->registry_.get();
    dro.device = options.device;
    // The DLM model shares the device (and the weights) with the scheduler's backend: a failed
    // forward fails the worker as a failed step does. The scheduler exists before any Diffuse
    // can run (requests arrive once the server listens).
    dro.on_backend_failure = [p = s.get()](const absl::Status& st) {
      p->scheduler_->MarkBackendFailed(st);
    };
    absl::StatusOr<std::unique_ptr<DlmRunner>> runner =
        MaybeCreateDlmRunner(options.engine.model_dir, options.engine.num_threads,
                             options.dlm_calibrate, std::move(dro), &options.engine.weights);
    if (!runner.ok()) return runner.status();
    s->dlm_runner_ = std::move(*runner);
  }
  if (s->dlm_runner_ == nullptr) {
    s->no_diffusion_ = std::make_unique<NoDiffusionBackend>(absl::StrCat(
        "model: '", s->model_name_,
        "' is autoregressive (is_causal true); Diffuse needs a diffusion LM, use Generate"));
  }
  BackendOptions bo;
  bo.device = options.device;
  bo.engine = options.engine;
  absl::StatusOr<std::unique_ptr<ModelBackend>> engine = CreateBackend(bo);
  if (!engine.ok()) return engine.status();
  if (options.wrap_backend) *engine = options.wrap_backend(std::move(*engine));

  s->liveness_follows_backend_ = options.liveness_follows_backend;
  s->metrics_struct_ = std::make_unique<SchedulerMetrics>(*s->registry_, s->model_name_);
  SchedulerOptions so = options.scheduler;
  so.model_name = s->model_name_;
  so.metrics = s->metrics_struct_.get();
  // The worker id defaults to the advertised address, known only once the port is bound; the
  // scheduler gets it (SetWorkerId) before readiness goes true.
  so.worker_id = options.worker_id.empty() ? "worker" : options.worker_id;
  so.on_backend_failure = [p = s.get()](const absl::Status& st) { p->OnBackendFailure(st); };
  absl::StatusOr<std::unique_ptr<Scheduler>> sched = Scheduler::Create(std::move(*engine), so);
  if (!sched.ok()) return sched.status();
  s->scheduler_ = std::move(*sched);
  DiffusionBackend* diffusion =
      s->dlm_runner_ ? static_cast<DiffusionBackend*>(s->dlm_runner_.get()) : s->no_diffusion_.get();
  s->inference_service_ = std::make_unique<InferenceService>(
      s->scheduler_.get(), InferenceServiceOptions{options.max_request_bytes, diffusion});
  s->worker_service_ = std::make_unique<WorkerService>(s->scheduler_.get());
  absl::StatusOr<GrpcServer> server = StartGrpcServer(
      options.listen_address, {s->inference_service_.get(), s->worker_service_.get()},
      TransportMessageLimit(options.max_request_bytes));
  if (!server.ok()) return server.status();
  s->grpc_ = std::move(*server);
  s->advertise_ = options.advertise_address.empty()
                      ? WithPort(options.listen_address, s->grpc_.port)
                      : options.advertise_address;
  s->worker_id_ = options.worker_id.empty() ? s->advertise_ : options.worker_id;
  s->scheduler_->SetWorkerId(s->worker_id_);
  if (s->dlm_runner_) s->dlm_runner_->SetWorkerId(s->worker_id_);
  if (!options.metrics_address.empty()) {
    absl::StatusOr<MetricsEndpoint> m = StartMetricsEndpoint(options.metrics_address, s->registry_);
    if (!m.ok()) return m.status();
    s->metrics_ = std::move(*m);
  }
  {
    // Under mu_ with OnBackendFailure: a failure recorded before this point reads here as
    // !Ready(); one after it finds serving_ and turns readiness off itself.
    absl::MutexLock l(&s->mu_);
    s->serving_ = true;
    if (s->liveness_follows_backend_ && !s->scheduler_->backend_status().ok()) {
      SetLiveness(s->grpc_.server.get(), false);
    }
    SetReadiness(s->grpc_.server.get(), s->scheduler_->Ready());
  }
  LOG(INFO) << "worker serving model=" << s->model_name_ << " id=" << s->worker_id_
            << " grpc=" << s->advertise_ << " metrics_port=" << s->metrics_.port
            << " kv_pages=" << s->scheduler_->Load().kv_pages_total;
  if (!options.cachemgr_address.empty()) {
    s->cachemgr_address_ = options.cachemgr_address;
    s->register_retry_ = options.register_retry;
    s->clock_ = options.scheduler.clock;
    s->clock_offset_s_ =
        &prometheus::BuildGauge()
             .Name("prehoc_worker_cachemgr_clock_offset_seconds")
             .Help("Cache manager's clock minus this worker's, estimated from the min-RTT "
                   "register/heartbeat round trip of the last 32 (plan ages are corrected by it).")
             .Register(*s->registry_)
             .Add({});
    s->clock_rtt_s_ = &prometheus::BuildGauge()
                           .Name("prehoc_worker_cachemgr_clock_rtt_seconds")
                           .Help("Round trip of the sample behind the clock offset estimate "
                                 "(the estimate's error is at most half of it).")
                           .Register(*s->registry_)
                           .Add({});
    grpc::ChannelArguments args;
    // Find a restarted cache manager within about a second.
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    s->cachemgr_ = v1::CacheManager::NewStub(grpc::CreateCustomChannel(
        options.cachemgr_address, grpc::InsecureChannelCredentials(), args));
    s->agent_ = std::thread([p = s.get()] { p->AgentLoop(); });
    s->plan_thread_ = std::thread([p = s.get()] { p->PlanLoop(); });
  }
  return s;
}

WorkerServer::~WorkerServer() { Shutdown(absl::Now()); }

std::vector<ModelDescription> WorkerServer::DescribeModels() const {
  std::vector<ModelDescription> models = scheduler_->ListModels();
  DescribeDiffusion(dlm_runner_.get(), &models);
  return models;
}

void WorkerServer::OnBackendFailure(const absl::Status& status) {
  LOG(ERROR) << "worker is no longer ready: backend failed: " << status
             << (liveness_follows_backend_ ? " (liveness NOT_SERVING: restart the process)" : "");
  absl::MutexLock l(&mu_);
  if (serving_ && !shut_down_) {
    // Liveness first: whoever sees readiness change also sees liveness changed.
    if (liveness_follows_backend_) SetLiveness(grpc_.server.get(), false);
    SetReadiness(grpc_.server.get(), false);
  }
}

bool WorkerServer::registered() const {
  absl::MutexLock l(&mu_);
  return registered_;
}

void WorkerServer::Shutdown(absl::Time drain_deadline) {
  {
    absl::MutexLock l(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (grpc_.server == nullptr) return;  // Create failed before serving
  LOG(INFO) << "worker " << worker_id_ << " draining";
  // Refuse first, then announce: a client that sees NOT_SERVING is already refused.
  scheduler_->StartDrain();
  if (dlm_runner_) dlm_runner_->StartDrain();
  SetReadiness(grpc_.server.get(), false);
  if (!scheduler_->WaitIdle(drain_deadline)) {
    LOG(WARNING) << "drain deadline passed with requests in flight; ending them";
    scheduler_->CancelAll(absl::UnavailableError("worker shutting down"));
    scheduler_->WaitIdle(absl::InfiniteFuture());
  }
  if (dlm_runner_ && !dlm_runner_->WaitIdle(drain_deadline)) {
    LOG(WARNING) << "drain deadline passed with Diffuse requests in flight; ending them";
    dlm_runner_->CancelAll(absl::UnavailableError("worker shutting down"));
    dlm_runner_->WaitIdle(absl::InfiniteFuture());
  }
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    if (plan_ctx_ != nullptr) plan_ctx_->TryCancel();
  }
  if (agent_.joinable()) agent_.join();
  if (plan_thread_.joinable()) plan_thread_.join();
  grpc_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  grpc_.server->Wait();
  LOG(INFO) << "worker " << worker_id_ << " stopped";
}

void WorkerServer::SendTelemetry(int64_t epoch) {
  std::vector<SequenceTelemetry> seqs = scheduler_->TakeTelemetry();
  if (seqs.empty()) return;
  const v1::TelemetryBatch batch =
      TelemetryToProto(worker_id_, epoch, scheduler_->Load(), seqs);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  v1::ReportTelemetryResponse resp;
  std::unique_ptr<grpc::ClientWriter<v1::TelemetryBatch>> writer =
      cachemgr_->ReportTelemetry(&ctx, &resp);
  writer->Write(batch);
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) {
    LOG(WARNING) << "telemetry for " << seqs.size() << " sequences not delivered: "
                 << s.error_message();
  }
}

void WorkerServer::AddClockSample(absl::Time sent, int64_t server_unix_micros,
                                  absl::Time received) {
  if (server_unix_micros == 0) return;  // an older cache manager
  cachemgr_clock_.AddSample(sent, absl::FromUnixMicros(server_unix_micros), received);
  if (const auto e = cachemgr_clock_.estimate(); e.has_value()) {
    clock_offset_s_->Set(absl::ToDoubleSeconds(e->offset));
    clock_rtt_s_->Set(absl::ToDoubleSeconds(e->rtt));
  }
}

void WorkerServer::AgentLoop() {
  int64_t epoch = 0;
  absl::Duration interval = register_retry_;
  bool warned = false;
  while (true) {
    {
      absl::MutexLock l(&mu_);
      if (stop_) break;
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    bool registered;
    {
      absl::MutexLock l(&mu_);
      registered = registered_;
    }
    grpc::Status status;
    if (!registered) {
      v1::RegisterWorkerRequest req;
      req.set_worker_id(worker_id_);
      req.set_address(advertise_);
      for (const ModelDescription& m : DescribeModels()) *req.add_models() = ToProto(m);
      req.set_page_size(scheduler_->backend().page_size());
      for (const ModelDescription& m : scheduler_->ListModels()) {
        v1::ModelShape* shape = req.add_model_shapes();
        shape->set_model(m.name);
        shape->set_num_layers(m.num_layers);
        shape->set_num_kv_heads(m.num_kv_heads);
      }
      *req.mutable_load() = ToProto(scheduler_->Load());
      req.set_ready(scheduler_->Ready());
      for (const LiveSequenceInfo& q : scheduler_->LiveSequences()) {
        v1::LiveSequence* ls = req.add_live_sequences();
        ls->set_sequence_id(q.request_id);
        ls->set_length(q.length);
        ls->set_kv_pages(q.kv_pages);
      }
      v1::RegisterWorkerResponse resp;
      const absl::Time sent = Now();
      status = cachemgr_->RegisterWorker(&ctx, req, &resp);
      if (status.ok()) {
        // Possibly another cache-manager process (machine): start the estimate afresh.
        cachemgr_clock_.Reset();
        AddClockSample(sent, resp.server_unix_micros(), Now());
        epoch = resp.epoch();
        interval = resp.heartbeat_interval_ms() > 0 ? absl::Milliseconds(resp.heartbeat_interval_ms())
                                                    : register_retry_;
        absl::MutexLock l(&mu_);
        registered_ = true;
        epoch_ = epoch;
        LOG(INFO) << "registered with cache manager " << cachemgr_address_ << " epoch=" << epoch
                  << " heartbeat_interval=" << absl::FormatDuration(interval);
      }
    } else {
      v1::HeartbeatRequest req;
      req.set_worker_id(worker_id_);
      req.set_epoch(epoch);
      *req.mutable_load() = ToProto(scheduler_->Load());
      req.set_ready(scheduler_->Ready());
      v1::HeartbeatResponse resp;
      const absl::Time sent = Now();
      status = cachemgr_->Heartbeat(&ctx, req, &resp);
      if (status.ok()) AddClockSample(sent, resp.server_unix_micros(), Now());
      if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
        LOG(WARNING) << "cache manager does not know this worker (" << status.error_message()
                     << "); registering again";
        absl::MutexLock l(&mu_);
        registered_ = false;
        continue;  // re-register at once
      }
      if (status.ok()) SendTelemetry(epoch);
    }
    if (!status.ok()) {
      if (!warned) {
        LOG(WARNING) << "cache manager " << cachemgr_address_ << ": " << status.error_message()
                     << " (retrying)";
      }
      warned = true;
    } else {
      warned = false;
    }
    const absl::Duration wait = status.ok() ? interval : std::min(interval, register_retry_);
    absl::MutexLock l(&mu_);
    auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; };
    mu_.AwaitWithTimeout(absl::Condition(&stopping), wait);
  }
}

void WorkerServer::PlanLoop() {
  bool warned = false;
  while (true) {
    auto ctx = std::make_shared<grpc::ClientContext>();
    int64_t epoch;
    {
      absl::MutexLock l(&mu_);
      auto go = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || registered_; };
      mu_.Await(absl::Condition(&go));
      if (stop_) break;
      epoch = epoch_;
      plan_ctx_ = ctx;  // Shutdown cancels it
    }
    v1::StreamPlansRequest request;
    request.set_worker_id(worker_id_);
    request.set_epoch(epoch);
    std::unique_ptr<grpc::ClientReader<v1::SelectionPlanUpdate>> reader =
        cachemgr_->StreamPlans(ctx.get(), request);
    v1::SelectionPlanUpdate update;
    int64_t received = 0;
    bool connected = false;
    while (reader->Read(&update)) {
      if (!connected) {  // the cache manager's first message confirms the stream
        connected = true;
        warned = false;
        LOG(INFO) << "plan stream connected to " << cachemgr_address_ << " epoch=" << epoch;
        if (metrics_struct_ != nullptr) metrics_struct_->plan_stream_connected->Set(1);
      }
      for (const v1::SelectionPlan& p : update.plans()) {
        ++received;
        if (metrics_struct_ != nullptr) metrics_struct_->plans_received->Increment();
        absl::Time produced;
        absl::StatusOr<SelectionPlan> plan = PlanFromProto(p, &produced);
        // The stamp is the cache manager's clock; the scheduler measures age on this worker's.
        absl::Status offered =
            plan.ok() ? scheduler_->OfferPlan(p.sequence_id(), *std::move(plan),
                                              cachemgr_clock_.ToLocal(produced))
                      : plan.status();
        // NOT_FOUND: the sequence ended meanwhile.
        if (!offered.ok() && offered.code() != absl::StatusCode::kNotFound) {
          LOG(WARNING) << "plan for " << p.sequence_id() << " refused: " << offered.message();
        }
      }
    }
    const grpc::Status status = reader->Finish();
    if (metrics_struct_ != nullptr) metrics_struct_->plan_stream_connected->Set(0);
    absl::MutexLock l(&mu_);
    plan_ctx_.reset();
    if (stop_) break;
    // Keep decoding with the plans already applied; reconnect after a short wait (a NOT_FOUND
    // epoch is fixed by the agent's next heartbeat, which registers again).
    if (!warned || connected) {
      LOG(WARNING) << "plan stream from " << cachemgr_address_ << " ended after " << received
                   << " plans: " << status.error_message() << " (reconnecting)";
    }
    warned = true;
    auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; };
    mu_.AwaitWithTimeout(absl::Condition(&stopping), register_retry_);
  }
}

}  // namespace prehoc
