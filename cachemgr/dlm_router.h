// DlmRouter: the cache manager's Diffuse front door (core, no gRPC types). For each request it
// picks a ready worker serving the model as a diffusion LM, computes the request's DLM plan
// with cachemgr/dlm_schedule (policy, ρ(ℓ) per layer, R_full / R_gen, dLLM-Cache K_p / K_r /
// ratio, kv_all_rows, min_rows; request overrides win; spa-auto fits ρ to the drift profile the
// worker measured at load and reported at registration), sends request + plan over the worker's
// DiffusionLink and relays the block stream. The worker's final message reports the per-layer
// recompute counts; the router adds them to its metrics (prehoc_cachemgr_dlm_*).
//
// Failure semantics: a worker that leaves the registry (missed heartbeats, removal) fails its
// Diffuse streams UNAVAILABLE at the next Tick(); a broken connection fails them at once through
// the link. Cancel (client, deadline) is forwarded to the link; the stream's terminal event then
// carries the cancelling status. Thread-safe; the router's mutex is never held while calling a
// link or a client callback (a per-stream mutex serialises one stream's deliveries).
#ifndef PREHOC_CACHEMGR_DLM_ROUTER_H_
#define PREHOC_CACHEMGR_DLM_ROUTER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/worker_registry.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "worker/dlm/diffusion_types.h"

namespace prehoc {

// How the DlmRouter reaches one worker's Diffuse. Thread-safe.
class DiffusionLink {
 public:
  virtual ~DiffusionLink() = default;
  // Starts `request` (request.request_id = the worker-side id, request.plan set) on the worker.
  // Events follow the DiffusionBackend contract; an error returned here means the callback is
  // never called.
  virtual absl::Status Start(const DiffusionRequest& request, DiffusionCallback callback) = 0;
  // Ends the request on the worker, best effort, without blocking; its terminal event still
  // arrives.
  virtual void Cancel(const std::string& request_id) = 0;
};

// Makes the link for a worker (gRPC in split mode, in-process in embedded mode).
using DiffusionLinkFactory =
    std::function<std::shared_ptr<DiffusionLink>(const WorkerSnapshot& worker)>;

// prehoc_cachemgr_dlm_* (docs/metrics.md). Children per (model, policy[, outcome | layer]) are
// added on first use, once per request; layer is bounded by the model's layer count.
struct DlmRouterMetrics {
  explicit DlmRouterMetrics(prometheus::Registry& registry);
  // Creates the request counters of a diffusion `model` at 0 for every outcome of the cache
  // policies it serves (wired to RouterOptions::on_model_registered); no-op for an
  // autoregressive model.
  void PrepareModel(const ModelDescription& model);
  prometheus::Family<prometheus::Counter>* requests = nullptr;
  prometheus::Family<prometheus::Counter>* tokens = nullptr;
  prometheus::Family<prometheus::Counter>* steps = nullptr;
  prometheus::Family<prometheus::Counter>* refreshes = nullptr;
  prometheus::Family<prometheus::Counter>* rows_recomputed = nullptr;
  prometheus::Gauge* active_streams = nullptr;
};

struct DlmRouterOptions {
  std::string id_prefix = "d";        // worker-side ids are <id_prefix>-d<n>
  DiffusionLinkFactory link_factory;  // required
  DlmRouterMetrics* metrics = nullptr;  // not owned; null = none
};

class DlmRouter : public DiffusionBackend {
 public:
  // `workers` is not owned and must outlive the router.
  DlmRouter(WorkerRegistry* workers, DlmRouterOptions options);
  // Fails every stream UNAVAILABLE and cancels it on its worker.
  ~DlmRouter() override;

  // Errors: INVALID_ARGUMENT naming the field (cache, cache_params.*, rho); FAILED_PRECONDITION
  // when the model is autoregressive or spa-auto lacks a drift profile; UNAVAILABLE when no
  // ready worker serves the model or the router is draining; ALREADY_EXISTS for an id in use.
  // Everything else (prompt, lengths, admission) is checked by the worker and ends the stream.
  absl::StatusOr<std::string> Diffuse(DiffusionRequest request,
                                      DiffusionCallback callback) override;
  absl::Status CancelDiffusion(std::string_view request_id, absl::Status status) override;

  // Fails the streams of workers no longer in the registry (UNAVAILABLE). Returns their ids.
  std::vector<std::string> Tick();
  void StartDrain();
  bool WaitIdle(absl::Time deadline);
  int ActiveStreams() const;

 private:
  struct Stream;
  void OnWorkerEvent(const std::shared_ptr<Stream>& s, DiffusionEvent ev);
  // Delivers the terminal `ev` once (false if the stream had already ended).
  bool End(const std::shared_ptr<Stream>& s, DiffusionEvent ev);
  std::shared_ptr<DiffusionLink> LinkFor(const WorkerSnapshot& w);

  WorkerRegistry* const workers_;
  const DlmRouterOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Stream>> streams_ ABSL_GUARDED_BY(mu_);
  // Per worker id: its address and link (recreated when the address changes).
  std::map<std::string, std::pair<std::string, std::shared_ptr<DiffusionLink>>> links_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> per_worker_ ABSL_GUARDED_BY(mu_);  // active streams per worker
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t plan_version_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t round_robin_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_DLM_ROUTER_H_
