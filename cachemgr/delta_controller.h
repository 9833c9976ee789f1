// δ-controller: closes the loop between the dropped attention mass δ that workers measure at
// every CIS refresh (exact, for the index set that was in use until then) and the top-k budget
// in the SelectionPlan, so that an operator sets a target δ* instead of a token count.
//
// A control unit is one (layer, kv head): attention heads differ widely in how concentrated
// their attention is, so one budget per layer would have to serve its most diffuse head.
// Control law, on each refresh measurement δ of unit u:
//   δ > δ*                      → k_scale[u] ← min(k_scale[u] · increase, max_scale)
//                                 (multiplicative increase: one violation is enough to react)
//   `window` consecutive δ ≤ low_water · δ*
//                               → k_scale[u] ← max(k_scale[u] · decrease, min_scale)
//                                 (slow decrease: give tokens back only after sustained slack)
//   when k_scale[u] is at max_scale and a violation still arrives, τ of u's layer rises by
//   tau_step (up to tau_max): the set is stale rather than too small, so refresh more often.
// Asymmetric gains (×1.5 up, ×0.95 down) keep violations rare (target: ≥ 99 % of refresh
// measurements at or below δ*) while drifting towards the smallest budget that meets δ*.
//
// One controller may serve many sequences of a model (the cache manager keeps one per
// (model, policy, δ*)), so what it learned carries over to new requests. Thread-safe.
#ifndef PREHOC_CACHEMGR_DELTA_CONTROLLER_H_
#define PREHOC_CACHEMGR_DELTA_CONTROLLER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/selection_plan.h"

namespace prehoc {

struct DeltaControllerOptions {
  double target_delta = 0.05;  // δ*
  double increase = 1.5;
  double decrease = 0.95;
  double low_water = 0.5;
  int window = 32;
  double min_scale = 0.125;
  double max_scale = 64.0;
  double tau_step = 0.05;
  double tau_max = 0.99;
};

class DeltaController {
 public:
  DeltaController(int num_layers, int num_kv_heads, const DeltaControllerOptions& options);

  // Feeds refresh measurements (layer[i], kv_head[i], delta[i]); entries out of range are
  // ignored. Returns true when any budget or τ changed (plans must then be re-applied).
  bool Observe(std::span<const int16_t> layers, std::span<const int16_t> kv_heads,
               std::span<const float> deltas);

  // Writes the current per-head k scales and τ (the plan's τ at the first Apply to this plan
  // plus the controller's increments) into `plan`, bumping its version if anything differs.
  void Apply(SelectionPlan* plan) const;

  // Bumped on every change; a session re-applies when it sees a newer version.
  uint64_t version() const;
  double k_scale(int layer, int kv_head) const;
  double tau_delta(int layer) const;
  int64_t violations() const;
  int64_t observations() const;
  const DeltaControllerOptions& options() const { return options_; }

 private:
  struct Unit {
    double k_scale = 1.0;
    int clean_run = 0;
  };
  const DeltaControllerOptions options_;
  const int num_layers_;
  const int num_kv_heads_;
  mutable absl::Mutex mu_;
  std::vector<Unit> units_ ABSL_GUARDED_BY(mu_);        // [layer * num_kv_heads + head]
  std::vector<double> tau_delta_ ABSL_GUARDED_BY(mu_);  // [layer]
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t violations_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t observations_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_DELTA_CONTROLLER_H_
