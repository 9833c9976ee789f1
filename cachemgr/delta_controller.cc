#include "cachemgr/delta_controller.h"

#include <algorithm>
#include <cmath>

namespace prehoc {

DeltaController::DeltaController(int num_layers, int num_kv_heads,
                                 const DeltaControllerOptions& options)
    : options_(options),
      num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      units_(static_cast<size_t>(num_layers) * num_kv_heads),
      tau_delta_(num_layers, 0.0) {}

bool DeltaController::Observe(std::span<const int16_t> layers, std::span<const int16_t> kv_heads,
                              std::span<const float> deltas) {
  absl::MutexLock lock(&mu_);
  bool changed = false;
  const double target = options_.target_delta;
  const size_t n = std::min({layers.size(), kv_heads.size(), deltas.size()});
  for (size_t i = 0; i < n; ++i) {
    const int l = layers[i], h = kv_heads[i];
    if (l < 0 || l >= num_layers_ || h < 0 || h >= num_kv_heads_) continue;
    Unit& u = units_[static_cast<size_t>(l) * num_kv_heads_ + h];
    ++observations_;
    if (deltas[i] > target) {
      ++violations_;
      u.clean_run = 0;
      if (u.k_scale < options_.max_scale) {
        u.k_scale = std::min(u.k_scale * options_.increase, options_.max_scale);
      } else {
        tau_delta_[l] = std::min(tau_delta_[l] + options_.tau_step, 2.0);
      }
      changed = true;
    } else if (deltas[i] <= options_.low_water * target) {
      if (++u.clean_run >= options_.window) {
        u.clean_run = 0;
        const double next = std::max(u.k_scale * options_.decrease, options_.min_scale);
        if (next != u.k_scale) {
          u.k_scale = next;
          changed = true;
        }
      }
    } else {
      u.clean_run = 0;  // inside the dead band: hold
    }
  }
  if (changed) ++version_;
  return changed;
}

void DeltaController::Apply(SelectionPlan* plan) const {
  absl::MutexLock lock(&mu_);
  bool differs = false;
  for (int l = 0; l < num_layers_ && l < static_cast<int>(plan->layers.size()); ++l) {
    LayerSelectionPlan& lp = plan->layers[l];
    if (static_cast<int>(lp.head_k_scale.size()) != num_kv_heads_) {
      lp.head_k_scale.assign(num_kv_heads_, 1.0);
      differs = true;
    }
    for (int h = 0; h < num_kv_heads_; ++h) {
      const double s = units_[static_cast<size_t>(l) * num_kv_heads_ + h].k_scale;
      if (lp.head_k_scale[h] != s) {
        lp.head_k_scale[h] = s;
        differs = true;
      }
    }
    if (lp.base_tau < -1.5) lp.base_tau = lp.tau;
    const double tau = std::min(options_.tau_max, lp.base_tau + tau_delta_[l]);
    if (tau_delta_[l] > 0 && tau != lp.tau) {
      lp.tau = tau;
      differs = true;
    }
  }
  if (differs) ++plan->version;
}

uint64_t DeltaController::version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

double DeltaController::k_scale(int layer, int kv_head) const {
  absl::MutexLock lock(&mu_);
  return units_[static_cast<size_t>(layer) * num_kv_heads_ + kv_head].k_scale;
}

double DeltaController::tau_delta(int layer) const {
  absl::MutexLock lock(&mu_);
  return tau_delta_[layer];
}

int64_t DeltaController::violations() const {
  absl::MutexLock lock(&mu_);
  return violations_;
}

int64_t DeltaController::observations() const {
  absl::MutexLock lock(&mu_);
  return observations_;
}

}  // namespace prehoc
