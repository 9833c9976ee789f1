#include "cachemgr/delta_controller.h"

#include <algorithm>
#include <cmath>

namespace prehoc {

DeltaController::DeltaController(int num_layers, const DeltaControllerOptions& options)
    : options_(options), layers_(num_layers) {}

bool DeltaController::Observe(std::span<const int16_t> layers, std::span<const float> deltas) {
  bool changed = false;
  const double target = options_.target_delta;
  for (size_t i = 0; i < deltas.size() && i < layers.size(); ++i) {
    if (layers[i] < 0 || layers[i] >= static_cast<int>(layers_.size())) continue;
    LayerState& st = layers_[layers[i]];
    ++observations_;
    if (deltas[i] > target) {
      ++violations_;
      st.clean_run = 0;
      if (st.k_scale < options_.max_scale) {
        st.k_scale = std::min(st.k_scale * options_.increase, options_.max_scale);
      } else {
        st.tau_delta = std::min(st.tau_delta + options_.tau_step, 1.0);
      }
      changed = true;
    } else if (deltas[i] <= options_.low_water * target) {
      if (++st.clean_run >= options_.window) {
        st.clean_run = 0;
        const double next = std::max(st.k_scale * options_.decrease, options_.min_scale);
        if (next != st.k_scale) {
          st.k_scale = next;
          changed = true;
        }
      }
    } else {
      st.clean_run = 0;  // inside the dead band: hold
    }
  }
  return changed;
}

void DeltaController::Apply(SelectionPlan* plan) {
  bool differs = false;
  for (size_t l = 0; l < plan->layers.size() && l < layers_.size(); ++l) {
    LayerSelectionPlan& lp = plan->layers[l];
    if (lp.k_scale != layers_[l].k_scale) {
      lp.k_scale = layers_[l].k_scale;
      differs = true;
    }
    if (layers_[l].base_tau < -1.5) layers_[l].base_tau = lp.tau;
    const double tau = std::min(options_.tau_max, layers_[l].base_tau + layers_[l].tau_delta);
    if (layers_[l].tau_delta > 0 && tau != lp.tau) {
      lp.tau = tau;
      differs = true;
    }
  }
  if (differs) ++plan->version;
}

}  // namespace prehoc
