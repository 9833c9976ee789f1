#include "worker/selection/session.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace prehoc {

absl::StatusOr<std::unique_ptr<SelectionSession>> SelectionSession::Create(
    const ModelConfig& model, const SparsityOptions& options, DeltaController* shared_controller) {
  auto s = std::unique_ptr<SelectionSession>(new SelectionSession());
  ASSIGN_OR_RETURN(auto overrides, ParseOverrides(options.overrides));
  ASSIGN_OR_RETURN(s->plan_, MakeSelectionPlan(model, options, overrides));
  if (s->plan_.target_delta > 0) {
    if (shared_controller != nullptr) {
      s->controller_ = shared_controller;
    } else {
      DeltaControllerOptions o;
      o.target_delta = s->plan_.target_delta;
      s->own_controller_ = std::make_unique<DeltaController>(model.num_hidden_layers,
                                                             model.num_key_value_heads, o);
      s->controller_ = s->own_controller_.get();
    }
    // Start from what the controller has learned so far.
    s->controller_->Apply(&s->plan_);
    s->applied_version_ = s->controller_->version();
  }
  ASSIGN_OR_RETURN(s->selector_, CreateSelector(model, s->plan_));
  return s;
}

void SelectionSession::AfterStep() {
  if (controller_ == nullptr) return;
  const SelectionTelemetry& t = selector_->telemetry();
  const size_t end = t.refresh_delta.size();
  if (end != delta_seen_) {
    controller_->Observe(std::span<const int16_t>(t.refresh_delta_layer).subspan(delta_seen_),
                         std::span<const int16_t>(t.refresh_delta_head).subspan(delta_seen_),
                         std::span<const float>(t.refresh_delta).subspan(delta_seen_));
    delta_seen_ = end;
  }
  // Re-plan when this or any other sequence sharing the controller moved it.
  const uint64_t v = controller_->version();
  if (v != applied_version_) {
    applied_version_ = v;
    controller_->Apply(&plan_);
    selector_->UpdatePlan(plan_);
  }
}

absl::Status SelectionSession::AdoptPlan(SelectionPlan plan) {
  if (plan.policy != plan_.policy || plan.budget_matched != plan_.budget_matched ||
      plan.layers.size() != plan_.layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "plan: policy '", plan.policy_name, "' with ", plan.layers.size(),
        " layers does not fit the sequence's policy '", plan_.policy_name, "' with ",
        plan_.layers.size(), " layers"));
  }
  plan_ = std::move(plan);
  selector_->UpdatePlan(plan_);
  controller_ = nullptr;
  external_plan_ = true;
  return absl::OkStatus();
}

}  // namespace prehoc
