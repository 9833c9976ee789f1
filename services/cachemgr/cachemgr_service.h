// prehoc.v1.CacheManager (cachemgr.proto) over the Router, the registries and the PlanManager:
// worker registration, heartbeats, telemetry, selection plan streams and the cluster view. Thin
// adapter.
#ifndef PREHOC_SERVICES_CACHEMGR_CACHEMGR_SERVICE_H_
#define PREHOC_SERVICES_CACHEMGR_CACHEMGR_SERVICE_H_

#include "cachemgr/plan_manager.h"
#include "cachemgr/router.h"
#include "cachemgr/sequence_registry.h"
#include "cachemgr/worker_registry.h"
#include "prehoc/v1/cachemgr.grpc.pb.h"

namespace prehoc {

class CacheManagerService final : public v1::CacheManager::CallbackService {
 public:
  // Not owned; must outlive the server. `plans` may be null (StreamPlans is then UNIMPLEMENTED).
  CacheManagerService(Router* router, WorkerRegistry* workers, SequenceRegistry* sequences,
                      PlanManager* plans = nullptr)
      : router_(router), workers_(workers), sequences_(sequences), plans_(plans) {}

  grpc::ServerUnaryReactor* RegisterWorker(grpc::CallbackServerContext* ctx,
                                           const v1::RegisterWorkerRequest* request,
                                           v1::RegisterWorkerResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override;
  grpc::ServerReadReactor<v1::TelemetryBatch>* ReportTelemetry(
      grpc::CallbackServerContext* ctx, v1::ReportTelemetryResponse* response) override;
  // Streams the plans of the worker's sequences (PlanManager::Subscribe / TakePending) until the
  // worker goes away or the server shuts down; the first message (possibly empty) carries the
  // newest plan of every open sequence of the worker. NOT_FOUND for an unknown worker or stale epoch
  // (the worker registers again, then reconnects).
  grpc::ServerWriteReactor<v1::SelectionPlanUpdate>* StreamPlans(
      grpc::CallbackServerContext* ctx, const v1::StreamPlansRequest* request) override;
  grpc::ServerUnaryReactor* GetClusterState(grpc::CallbackServerContext* ctx,
                                            const v1::GetClusterStateRequest* request,
                                            v1::ClusterState* response) override;

 private:
  // The clock plans are stamped with (stamped into register/heartbeat responses, so workers can
  // estimate the clock offset).
  absl::Time PlanClock() const { return plans_ != nullptr ? plans_->Now() : absl::Now(); }

  Router* const router_;
  WorkerRegistry* const workers_;
  SequenceRegistry* const sequences_;
  PlanManager* const plans_;
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CACHEMGR_CACHEMGR_SERVICE_H_
