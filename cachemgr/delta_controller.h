// δ-controller: closes the loop between the dropped attention mass δ that workers measure at
// every CIS refresh (exact, for the index set that was in use until then) and the per-layer
// top-k budget in the SelectionPlan, so that an operator sets a target δ* instead of a token
// count.
//
// Control law (per layer ℓ, on each refresh measurement δ):
//   δ > δ*                      → k_scale[ℓ] ← min(k_scale[ℓ] · increase, max_scale)
//                                 (multiplicative increase: one violation is enough to react)
//   `window` consecutive δ ≤ low_water · δ*
//                               → k_scale[ℓ] ← max(k_scale[ℓ] · decrease, min_scale)
//                                 (slow decrease: give tokens back only after sustained slack)
//   when k_scale[ℓ] is at max_scale and a violation still arrives, τ[ℓ] ← min(τ + tau_step,
//   tau_max): the set is stale rather than too small, so refresh more often.
// Asymmetric gains (×1.5 up, ×0.95 down) keep violations rare (target: ≥ 99 % of refresh
// measurements at or below δ*) while drifting towards the smallest budget that meets δ*.
// Thread-compatible: one controller per (sequence or model), driven by one thread.
#ifndef PREHOC_CACHEMGR_DELTA_CONTROLLER_H_
#define PREHOC_CACHEMGR_DELTA_CONTROLLER_H_

#include <cstdint>
#include <span>
#include <vector>

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
  DeltaController(int num_layers, const DeltaControllerOptions& options);

  // Feeds refresh measurements (layer[i], delta[i]). Returns true when any layer's budget or τ
  // changed (the plan must then be re-applied and re-sent).
  bool Observe(std::span<const int16_t> layers, std::span<const float> deltas);

  // Writes the current k_scale and τ (the plan's τ at the first Apply plus the controller's
  // increments) into `plan` and bumps its version if they differ.
  void Apply(SelectionPlan* plan);

  double k_scale(int layer) const { return layers_[layer].k_scale; }
  double tau_delta(int layer) const { return layers_[layer].tau_delta; }
  int64_t violations() const { return violations_; }
  int64_t observations() const { return observations_; }
  const DeltaControllerOptions& options() const { return options_; }

 private:
  struct LayerState {
    double k_scale = 1.0;
    double tau_delta = 0.0;  // added to the plan's τ
    double base_tau = -2.0;  // the plan's τ at the first Apply (−2 = not captured yet)
    int clean_run = 0;
  };
  DeltaControllerOptions options_;
  std::vector<LayerState> layers_;
  int64_t violations_ = 0;
  int64_t observations_ = 0;
};

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_DELTA_CONTROLLER_H_
