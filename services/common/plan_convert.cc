#include "services/common/plan_convert.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace prehoc {

v1::SelectionPlan PlanToProto(const std::string& sequence_id, const SelectionPlan& plan,
                              absl::Time produced) {
  v1::SelectionPlan p;
  p.set_sequence_id(sequence_id);
  p.set_version(static_cast<int64_t>(plan.version));
  p.set_policy(plan.policy_name);
  p.set_target_delta(plan.target_delta);
  p.set_created_unix_micros(absl::ToUnixMicros(produced));
  p.set_budget_tokens(plan.budget_tokens);
  p.set_budget_fraction(plan.budget_fraction);
  p.set_budget_matched(plan.budget_matched);
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    const LayerSelectionPlan& lp = plan.layers[l];
    v1::LayerPlan* o = p.add_layers();
    o->set_layer(static_cast<int32_t>(l));
    o->set_sink_tokens(lp.sink);
    o->set_local_window(lp.local);
    o->set_etf_alias_layer(lp.etf_alias_layer);
    o->set_k_scale(lp.k_scale);
    o->mutable_head_k_scale()->Add(lp.head_k_scale.begin(), lp.head_k_scale.end());
    o->set_psaw_drop_fraction(lp.psaw_drop_fraction);
    o->set_etf_freeze_fraction(lp.etf_freeze_fraction);
    o->set_refresh_interval(lp.refresh_interval);
    o->set_approx_channels(lp.approx_channels);
    o->set_gqa_max(lp.gqa_max);
    o->set_gate_unrotated(lp.gate_unrotated);
    o->set_follow(lp.follow);
    o->set_scan_slices(lp.scan_slices);
    o->set_scan_follow(lp.scan_follow);
    o->set_gate_delta(lp.gate_delta);
    o->set_gate_exact_delta(lp.gate_exact_delta);
    o->set_gate_lse(lp.gate_lse);
    o->set_scan_reserve(lp.scan_reserve);
    o->set_keep_trail(lp.keep_trail);
    o->set_gate_error(lp.gate_error);
    o->set_gate_exact_error(lp.gate_exact_error);
    if (lp.base_tau > -1.5) o->set_base_tau(lp.base_tau);
    v1::CisParams* c = o->mutable_cis();
    c->set_tau(lp.tau);
    c->set_r(lp.dilate_r);
    c->set_max_reuse(lp.max_reuse);
    c->set_dilate_m_fraction(lp.dilate_m_fraction);
  }
  return p;
}

absl::StatusOr<SelectionPlan> PlanFromProto(const v1::SelectionPlan& p, absl::Time* produced) {
  absl::StatusOr<SelectionPolicy> policy = ParseSelectionPolicy(p.policy());
  if (!policy.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("plan.policy: ", policy.status().message()));
  }
  if (p.layers().empty()) return absl::InvalidArgumentError("plan.layers: empty");
  if (p.version() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("plan.version: must be > 0, got ", p.version()));
  }
  SelectionPlan plan;
  plan.version = static_cast<uint64_t>(p.version());
  plan.policy = *policy;
  plan.policy_name = p.policy();
  plan.target_delta = p.target_delta();
  plan.budget_tokens = p.budget_tokens();
  plan.budget_fraction = p.budget_fraction();
  plan.budget_matched = p.budget_matched();
  if (!(plan.budget_fraction >= 0 && plan.budget_fraction <= 1) || plan.budget_tokens < 0) {
    return absl::InvalidArgumentError(
        "plan.budget_fraction must be in [0, 1] and plan.budget_tokens >= 0");
  }
  auto positive = [](double x) { return std::isfinite(x) && x > 0; };
  plan.layers.resize(p.layers_size());
  for (int l = 0; l < p.layers_size(); ++l) {
    const v1::LayerPlan& o = p.layers(l);
    LayerSelectionPlan& lp = plan.layers[l];
    const std::string where = absl::StrCat("plan.layers[", l, "].");
    if (o.sink_tokens() < 0 || o.local_window() < 0 || o.cis().max_reuse() < 0 ||
        o.cis().r() < 0 || o.approx_channels() < 0 || o.refresh_interval() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "sink_tokens, local_window, cis.max_reuse, cis.r, approx_channels and "
                 "refresh_interval must be >= 0"));
    }
    lp.sink = o.sink_tokens();
    lp.local = o.local_window();
    lp.etf_alias_layer = o.etf_alias_layer();
    lp.k_scale = o.k_scale() == 0 ? 1.0 : o.k_scale();
    if (!positive(lp.k_scale)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "k_scale must be > 0"));
    }
    for (int h = 0; h < o.head_k_scale_size(); ++h) {
      if (!positive(o.head_k_scale(h))) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "head_k_scale[", h, "] must be > 0, got ", o.head_k_scale(h)));
      }
    }
    lp.head_k_scale.assign(o.head_k_scale().begin(), o.head_k_scale().end());
    lp.psaw_drop_fraction = o.psaw_drop_fraction();
    lp.etf_freeze_fraction = o.etf_freeze_fraction();
    lp.refresh_interval = o.refresh_interval() == 0 ? 1 : o.refresh_interval();
    lp.approx_channels = o.approx_channels();
    lp.gqa_max = o.gqa_max();
    lp.gate_unrotated = o.gate_unrotated();
    lp.follow = o.follow();
    if (o.scan_slices() < 0 || o.scan_follow() < 0 || !(o.gate_delta() >= 0 && o.gate_delta() < 1) ||
        !(o.gate_exact_delta() >= 0 && o.gate_exact_delta() < 1) || !(o.gate_lse() >= 0) ||
        !(o.scan_reserve() >= 0 && o.scan_reserve() <= 4) ||
        ((o.gate_delta() > 0 || o.scan_follow() > 0 || o.scan_reserve() > 0) &&
         o.scan_slices() == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "scan_slices (", o.scan_slices(), ") and scan_follow (", o.scan_follow(),
          ") must be >= 0, gate_delta (", o.gate_delta(), ") and gate_exact_delta (",
          o.gate_exact_delta(), ") in [0, 1), gate_lse (", o.gate_lse(),
          ") >= 0, scan_reserve (", o.scan_reserve(),
          ") in [0, 4], and gate_delta, scan_follow, scan_reserve need scan_slices"));
    }
    lp.scan_slices = o.scan_slices();
    lp.scan_follow = o.scan_follow();
    lp.gate_delta = o.gate_delta();
    lp.gate_exact_delta = o.gate_exact_delta();
    lp.gate_lse = o.gate_lse();
    lp.scan_reserve = o.scan_reserve();
    lp.keep_trail = o.keep_trail();
    if (!(o.gate_error() >= 0 && o.gate_error() < 10) ||
        !(o.gate_exact_error() >= 0 && o.gate_exact_error() < 10) ||
        (o.gate_error() > 0 && o.scan_slices() == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "gate_error (", o.gate_error(), ") and gate_exact_error (", o.gate_exact_error(),
          ") must be in [0, 10), and gate_error needs scan_slices"));
    }
    lp.gate_error = o.gate_error();
    lp.gate_exact_error = o.gate_exact_error();
    if (o.base_tau() != 0) lp.base_tau = o.base_tau();
    lp.tau = o.cis().tau();
    lp.dilate_r = o.cis().r();
    lp.max_reuse = o.cis().max_reuse();
    lp.dilate_m_fraction = o.cis().dilate_m_fraction();
  }
  if (produced != nullptr) *produced = absl::FromUnixMicros(p.created_unix_micros());
  return plan;
}

}  // namespace prehoc
