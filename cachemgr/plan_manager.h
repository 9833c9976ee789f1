// PlanManager: the cache manager's selection planner. For every sequence the Router places it
// computes the versioned SelectionPlan (preset + the request's overrides + what the δ-controller
// has learned), feeds the exact δ that workers measure at refresh steps into the δ-controller,
// and queues a new plan version for the worker holding the sequence whenever the controller
// changes a budget or τ. The gRPC adapter (CacheManager.StreamPlans) drains the queue of one
// worker; plain data only, no gRPC types.
//
// Controllers are keyed per (model, policy, δ*) — not per sequence — so the budget learned on
// earlier requests of the same model and policy carries over to new ones (the same sharing the
// worker's local loop uses); every open sequence under that key gets the new plan version. Split
// mode (CacheManagerServer) and embedded mode (EmbeddedCluster) both plan through this class.
//
// Queue semantics: per worker, at most one pending update per sequence (the newest plan: a
// worker only ever needs the newest), so the queue is bounded by the worker's open sequences.
// Subscribe() queues every open plan of the worker again, so a worker that reconnects receives
// the newest plan of each of its sequences.
//
// Threading: all methods are thread-safe. Wake callbacks run on the thread that queued the
// update (Open, Observe, Subscribe) with no lock of the manager held, so they may call any
// method, including Unsubscribe(). A callback copied for a wake-up just before Unsubscribe()
// may still run after it returns: callbacks must stay safe to call (e.g. hold a shared_ptr to
// what they touch).
#ifndef PREHOC_CACHEMGR_PLAN_MANAGER_H_
#define PREHOC_CACHEMGR_PLAN_MANAGER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachemgr/delta_controller.h"
#include "cachemgr/selection_plan.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "worker/sparsity.h"

namespace prehoc {

// Metrics of the planner (docs/metrics.md), prefix prehoc_cachemgr_.
struct PlanMetrics {
  explicit PlanMetrics(prometheus::Registry& registry);
  prometheus::Gauge* open_plans = nullptr;            // sequences with a plan
  prometheus::Family<prometheus::Counter>* versions = nullptr;  // {policy}: versions produced
  prometheus::Counter* plans_sent = nullptr;          // updates handed to plan streams
  prometheus::Gauge* streams = nullptr;               // workers subscribed to plan streams
  prometheus::Counter* refresh_samples = nullptr;     // δ samples fed to controllers
  prometheus::Counter* unknown_samples = nullptr;     // δ samples of sequences without a plan
};

// The shape the planner needs from a model (from the worker's registration).
struct PlanModelShape {
  int num_layers = 0;
  int num_kv_heads = 0;
};

// One plan on its way to a worker.
struct PlanUpdate {
  std::string sequence_id;
  SelectionPlan plan;
  absl::Time produced;  // when this version was computed (the worker's plan-age metric)
};

// One exact δ measurement at a refresh (worker telemetry).
struct RefreshSample {
  std::string sequence_id;
  int layer = -1;
  int kv_head = -1;
  double delta = 0;
};

struct PlanManagerOptions {
  // Clock for `produced`; null = absl::Now.
  std::function<absl::Time()> clock;
  // Controller gains; target_delta is replaced by each key's δ*.
  DeltaControllerOptions controller;
  // May be null. Must outlive the manager.
  PlanMetrics* metrics = nullptr;
};

class PlanManager {
 public:
  explicit PlanManager(PlanManagerOptions options = {});

  // Computes and tracks the plan of sequence `sequence_id`, placed on `worker_id`, for a request
  // of `model` with `sparsity`, and queues it for the worker. Returns the plan's version (>= 1).
  // FAILED_PRECONDITION when there is nothing to plan (policy "" — the worker's default, which
  // only the worker knows — or "dense", or an unknown shape); INVALID_ARGUMENT naming the field
  // for a bad policy, target or override (the worker refuses such a request itself);
  // ALREADY_EXISTS when the sequence has a plan.
  absl::StatusOr<uint64_t> Open(const std::string& sequence_id, const std::string& worker_id,
                                const std::string& model, const PlanModelShape& shape,
                                const SparsityOptions& sparsity);
  // Forgets the sequence's plan (and any pending update). No-op when unknown.
  void Close(const std::string& sequence_id);

  // Feeds δ samples to the controllers of their sequences (samples of sequences without a plan
  // or out of the model's range are ignored). Every open plan whose controller changed gets a
  // new version, queued for its worker. Returns the number of new plan versions.
  int Observe(std::span<const RefreshSample> samples);

  // Registers `wake`, called whenever an update is queued for `worker_id`, and once before
  // Subscribe returns (every open plan of the worker is queued again). Returns a handle.
  uint64_t Subscribe(const std::string& worker_id, std::function<void()> wake);
  void Unsubscribe(uint64_t handle);
  // Removes and returns the pending updates of `worker_id` (one per sequence, newest plan).
  std::vector<PlanUpdate> TakePending(const std::string& worker_id);

  // The current plan of a sequence (tests, operators).
  std::optional<PlanUpdate> Get(const std::string& sequence_id) const;
  // The controller serving (model, policy, δ*), null when none was created.
  const DeltaController* Controller(const std::string& model, const std::string& policy,
                                    double target_delta) const;
  int open_plans() const;
  // The clock plans are stamped with (PlanManagerOptions::clock).
  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }

 private:
  using Key = std::tuple<std::string, std::string, double>;  // model, policy, δ*
  struct Entry {
    std::string worker_id;
    PlanUpdate update;
    DeltaController* controller = nullptr;  // null = no δ target
  };
  // Queues the sequence's plan for its worker; returns the worker id.
  const std::string& QueueLocked(const std::string& sequence_id, const Entry& e)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Wake(const std::set<std::string>& workers) ABSL_LOCKS_EXCLUDED(mu_, subs_mu_);

  const PlanManagerOptions options_;

  mutable absl::Mutex mu_;  // never held together with subs_mu_
  std::map<std::string, Entry> plans_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::set<std::string>> pending_ ABSL_GUARDED_BY(mu_);  // worker → seqs
  std::map<Key, std::unique_ptr<DeltaController>> controllers_ ABSL_GUARDED_BY(mu_);

  absl::Mutex subs_mu_;
  struct Subscriber {
    std::string worker_id;
    std::function<void()> wake;
  };
  std::map<uint64_t, Subscriber> subs_ ABSL_GUARDED_BY(subs_mu_);
  uint64_t next_sub_ ABSL_GUARDED_BY(subs_mu_) = 1;
};

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_PLAN_MANAGER_H_
