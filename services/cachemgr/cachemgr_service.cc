#include "services/cachemgr/cachemgr_service.h"

#include "common/grpc_status.h"
#include "services/common/proto_convert.h"

namespace prehoc {

grpc::ServerUnaryReactor* CacheManagerService::RegisterWorker(
    grpc::CallbackServerContext* ctx, const v1::RegisterWorkerRequest* request,
    v1::RegisterWorkerResponse* response) {
  WorkerRegistration r;
  r.worker_id = request->worker_id();
  r.address = request->address();
  for (const v1::ModelInfo& m : request->models()) r.models.push_back(FromProto(m));
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
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

namespace {

// Reads telemetry batches until the worker half-closes, recording each in the router.
class TelemetryReader final : public grpc::ServerReadReactor<v1::TelemetryBatch> {
 public:
  explicit TelemetryReader(Router* router) : router_(router) { StartRead(&batch_); }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    TelemetryReport r;
    r.worker_id = batch_.worker_id();
    for (const v1::SequenceTelemetry& s : batch_.sequences()) {
      r.sequences.push_back(
          {s.sequence_id(), s.policy(), s.mean_kept_fraction(), s.refreshes(), s.shares()});
    }
    for (const v1::RefreshEvent& e : batch_.refreshes()) {
      r.refreshes.push_back({e.sequence_id(), e.layer(), e.delta()});
    }
    router_->RecordTelemetry(r);
    StartRead(&batch_);
  }
  void OnDone() override { delete this; }

 private:
  Router* const router_;
  v1::TelemetryBatch batch_;
};

}  // namespace

grpc::ServerReadReactor<v1::TelemetryBatch>* CacheManagerService::ReportTelemetry(
    grpc::CallbackServerContext* ctx, v1::ReportTelemetryResponse* response) {
  return new TelemetryReader(router_);
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
