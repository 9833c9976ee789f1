// The prehoc-cachemgr server as a class (tests run it in-process): the worker and sequence
// registries and the Router behind prehoc.v1.Inference (the client front door) and
// prehoc.v1.CacheManager (workers), with grpc.health.v1 (readiness = at least one ready worker),
// reflection and Prometheus /metrics.
//
// Threads: gRPC callback threads (adapters, link reactors) and one ticker thread that expires
// workers every heartbeat_interval / 4 and refreshes readiness.
#ifndef PREHOC_SERVICES_CACHEMGR_CACHEMGR_SERVER_H_
#define PREHOC_SERVICES_CACHEMGR_CACHEMGR_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/dlm_router.h"
#include "cachemgr/plan_manager.h"
#include "cachemgr/router.h"
#include "cachemgr/sequence_registry.h"
#include "cachemgr/worker_registry.h"
#include "prometheus/registry.h"
#include "services/cachemgr/cachemgr_service.h"
#include "services/common/inference_service.h"
#include "services/common/server_util.h"

namespace prehoc {

struct CacheManagerServerOptions {
  std::string listen_address = "127.0.0.1:0";
  std::string metrics_address;  // "" = no metrics endpoint
  absl::Duration heartbeat_interval = absl::Seconds(1);
  int missed_heartbeats = 2;
  // Prefix of sequence / request ids; "" = "cm" + this process's start time (unique across
  // restarts, so a new instance never collides with its predecessor's sequences).
  std::string id_prefix;
  int64_t max_request_bytes = int64_t{4} << 20;
  std::shared_ptr<prometheus::Registry> registry;  // null = a private one
  // Clock for plan time stamps and the clock readings sent to workers; null = absl::Now (tests
  // inject an offset).
  std::function<absl::Time()> clock;
};

class CacheManagerServer {
 public:
  // UNAVAILABLE when an address cannot be bound.
  static absl::StatusOr<std::unique_ptr<CacheManagerServer>> Create(
      CacheManagerServerOptions options);
  ~CacheManagerServer();

  int port() const { return grpc_.port; }
  int metrics_port() const { return metrics_.port; }
  Router& router() { return *router_; }
  DlmRouter& dlm_router() { return *dlm_router_; }
  WorkerRegistry& workers() { return *workers_; }
  SequenceRegistry& sequences() { return *sequences_; }
  PlanManager& plans() { return *plans_; }
  prometheus::Registry& registry() { return *registry_; }

  // Readiness false, new requests UNAVAILABLE, active streams may finish until `deadline`
  // (then they end UNAVAILABLE), then the server stops. Idempotent.
  void Shutdown(absl::Time deadline);

 private:
  CacheManagerServer() = default;
  void TickLoop();

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<RouterMetrics> metrics_struct_;
  std::unique_ptr<PlanMetrics> plan_metrics_;
  std::unique_ptr<PlanManager> plans_;
  std::unique_ptr<WorkerRegistry> workers_;
  std::unique_ptr<SequenceRegistry> sequences_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<DlmRouterMetrics> dlm_metrics_;
  std::unique_ptr<DlmRouter> dlm_router_;  // Diffuse
  std::unique_ptr<InferenceService> inference_service_;
  std::unique_ptr<CacheManagerService> cachemgr_service_;
  GrpcServer grpc_;
  MetricsEndpoint metrics_;
  absl::Duration tick_;
  std::thread ticker_;

  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CACHEMGR_CACHEMGR_SERVER_H_
