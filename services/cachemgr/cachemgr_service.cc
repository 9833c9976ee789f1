#include "services/cachemgr/cachemgr_service.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/tsan_annotations.h"
#include "services/common/plan_convert.h"
#include "services/common/proto_convert.h"

namespace prehoc {

grpc::ServerUnaryReactor* CacheManagerService::RegisterWorker(
    grpc::CallbackServerContext* ctx, const v1::RegisterWorkerRequest* request,
    v1::RegisterWorkerResponse* response) {
  WorkerRegistration r;
  r.worker_id = request->worker_id();
  r.address = request->address();
  for (const v1::ModelInfo& m : request->models()) r.models.push_back(FromProto(m));
  for (const v1::ModelShape& shape : request->model_shapes()) {
    for (ModelDescription& m : r.models) {
      if (m.name != shape.model()) continue;
      m.num_layers = shape.num_layers();
      m.num_kv_heads = shape.num_kv_heads();
    }
  }
  r.page_size = request->page_size();
  r.load = FromProto(request->load());
  r.ready = request->ready();
  for (const v1::LiveSequence& s : request->live_sequences()) {
    r.live_sequences.push_back(s.sequence_id());
  }
  absl::StatusOr<int64_t> epoch = router_->RegisterWorker(std::move(r));
  if (epoch.ok()) {
    response->set_epoch(*epoch);
    response->set_heartbeat_interval_ms(
        static_cast<int32_t>(absl::ToInt64Milliseconds(workers_->heartbeat_interval())));
    response->set_server_unix_micros(absl::ToUnixMicros(PlanClock()));
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(epoch.status()));
  return reactor;
}

grpc::ServerUnaryReactor* CacheManagerService::Heartbeat(grpc::CallbackServerContext* ctx,
                                                         const v1::HeartbeatRequest* request,
                                                         v1::HeartbeatResponse* response) {
  absl::Status s = router_->Heartbeat(request->worker_id(), request->epoch(),
                                      FromProto(request->load()), request->ready());
  if (s.ok()) response->set_server_unix_micros(absl::ToUnixMicros(PlanClock()));
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

namespace {

// Reads telemetry batches until the worker half-closes, recording each in the router.
class TelemetryReader final : public grpc::ServerReadReactor<v1::TelemetryBatch> {
 public:
  explicit TelemetryReader(Router* router) : router_(router) {
    StartRead(&batch_);
    TsanRelease(this);  // see common/tsan_annotations.h
  }
  void OnReadDone(bool ok) override {
    ReactionScope reaction(this);
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    router_->RecordTelemetry(TelemetryReportFromProto(batch_));
    StartRead(&batch_);
  }
  void OnDone() override {
    TsanAcquire(this);
    delete this;
  }

 private:
  Router* const router_;
  v1::TelemetryBatch batch_;
};

}  // namespace

grpc::ServerReadReactor<v1::TelemetryBatch>* CacheManagerService::ReportTelemetry(
    grpc::CallbackServerContext* ctx, v1::ReportTelemetryResponse* response) {
  return new TelemetryReader(router_);
}

namespace {

// Writes the plans PlanManager queues for one worker: at most one write in flight; updates
// queued meanwhile go out together in the next message (newest plan per sequence).
//
// Lifetime: PlanManager may run a wake-up (Pump on another thread) after Unsubscribe returned,
// and gRPC may run reactions (even OnDone) inline inside StartWrite. So wake-ups reach the
// reactor through a shared Link that counts the Pumps in flight; OnDone clears the link, and
// whoever finishes last — OnDone or the last such Pump — deletes the reactor.
class PlanWriter final : public grpc::ServerWriteReactor<v1::SelectionPlanUpdate> {
 public:
  PlanWriter(PlanManager* plans, std::string worker_id)
      : plans_(plans), worker_id_(std::move(worker_id)), link_(std::make_shared<Link>()) {
    {
      absl::MutexLock l(&link_->mu);
      link_->writer = this;
    }
    // Queues every open plan of the worker and wakes (possibly on this thread).
    const uint64_t handle = plans_->Subscribe(worker_id_, [link = link_] { Wake(link); });
    {
      absl::MutexLock l(&mu_);
      handle_ = handle;
    }
    TsanRelease(this);  // see common/tsan_annotations.h
  }

  void OnWriteDone(bool ok) override {
    ReactionScope reaction(this);
    bool finish = false;
    {
      absl::MutexLock l(&mu_);
      writing_ = false;
      if (!ok) done_ = true;  // the stream is broken: nothing more can be written
      finish = done_ && !finish_called_;
      if (finish) finish_called_ = true;
    }
    if (finish) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "plan stream ended"));
    } else {
      Pump();
    }
  }

  void OnCancel() override {
    ReactionScope reaction(this);
    bool finish = false;
    {
      absl::MutexLock l(&mu_);
      done_ = true;
      finish = !writing_ && !finish_called_;  // else OnWriteDone finishes
      if (finish) finish_called_ = true;
    }
    if (finish) Finish(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    TsanAcquire(this);
    uint64_t handle;
    {
      absl::MutexLock l(&mu_);
      handle = handle_;
    }
    plans_->Unsubscribe(handle);
    {
      absl::MutexLock l(&link_->mu);
      link_->writer = nullptr;
      if (link_->pumps > 0) {  // the last Pump in flight deletes
        link_->delete_pending = true;
        return;
      }
    }
    delete this;
  }

 private:
  struct Link {
    absl::Mutex mu;
    PlanWriter* writer ABSL_GUARDED_BY(mu) = nullptr;  // null once OnDone ran
    int pumps ABSL_GUARDED_BY(mu) = 0;                  // wake-ups inside Pump
    bool delete_pending ABSL_GUARDED_BY(mu) = false;
  };

  static void Wake(const std::shared_ptr<Link>& link) {
    PlanWriter* w;
    {
      absl::MutexLock l(&link->mu);
      w = link->writer;
      if (w == nullptr) return;
      ++link->pumps;
    }
    w->Pump();
    bool last;
    {
      absl::MutexLock l(&link->mu);
      last = --link->pumps == 0 && link->delete_pending;
    }
    if (last) delete w;
  }

  // Starts a write of the pending plans unless one is in flight or the stream is done. The
  // first message goes out even when empty: it tells the worker the stream is established.
  void Pump() {
    {
      absl::MutexLock l(&mu_);
      if (done_ || writing_) return;
      std::vector<PlanUpdate> updates = plans_->TakePending(worker_id_);
      if (updates.empty() && !first_) return;
      first_ = false;
      message_.Clear();
      for (const PlanUpdate& u : updates) {
        *message_.add_plans() = PlanToProto(u.sequence_id, u.plan, u.produced);
      }
      writing_ = true;
    }
    StartWrite(&message_);
  }

  PlanManager* const plans_;
  const std::string worker_id_;
  const std::shared_ptr<Link> link_;
  absl::Mutex mu_;
  uint64_t handle_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  bool first_ ABSL_GUARDED_BY(mu_) = true;
  v1::SelectionPlanUpdate message_;  // owned by the write in flight while writing_
};

class FinishedWriter final : public grpc::ServerWriteReactor<v1::SelectionPlanUpdate> {
 public:
  explicit FinishedWriter(const grpc::Status& status) {
    Finish(status);
    TsanRelease(this);
  }
  void OnDone() override {
    TsanAcquire(this);
    delete this;
  }
};

}  // namespace

grpc::ServerWriteReactor<v1::SelectionPlanUpdate>* CacheManagerService::StreamPlans(
    grpc::CallbackServerContext* ctx, const v1::StreamPlansRequest* request) {
  if (plans_ == nullptr) {
    return new FinishedWriter(
        grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "this cache manager computes no plans"));
  }
  std::optional<WorkerSnapshot> w = workers_->Get(request->worker_id());
  if (!w.has_value() || w->epoch != request->epoch()) {
    return new FinishedWriter(grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("worker_id: '", request->worker_id(), "' with epoch ", request->epoch(),
                     " is not registered; register again")));
  }
  return new PlanWriter(plans_, request->worker_id());
}

grpc::ServerUnaryReactor* CacheManagerService::GetClusterState(
    grpc::CallbackServerContext* ctx, const v1::GetClusterStateRequest* request,
    v1::ClusterState* response) {
  const absl::Time now = workers_->Now();
  for (const WorkerSnapshot& w : workers_->Snapshot()) {
    v1::WorkerState* s = response->add_workers();
    s->set_worker_id(w.worker_id);
    s->set_address(w.address);
    s->set_ready(w.ready);
    s->set_alive(true);
    s->set_epoch(w.epoch);
    *s->mutable_load() = ToProto(w.load);
    const SequenceUsage u = sequences_->Usage(w.worker_id);
    s->set_sequences(u.sequences);
    s->set_kv_pages(u.kv_pages);
    s->set_ms_since_heartbeat(absl::ToInt64Milliseconds(now - w.last_heartbeat));
  }
  const SequenceUsage t = sequences_->Totals();
  response->set_sequences(t.sequences);
  response->set_kv_pages(t.kv_pages);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace prehoc
