#include "worker/selection/session.h"

#include "common/status.h"

namespace prehoc {

absl::StatusOr<std::unique_ptr<SelectionSession>> SelectionSession::Create(
    const ModelConfig& model, const SparsityOptions& options) {
  auto s = std::unique_ptr<SelectionSession>(new SelectionSession());
  ASSIGN_OR_RETURN(auto overrides, ParseOverrides(options.overrides));
  ASSIGN_OR_RETURN(s->plan_, MakeSelectionPlan(model, options, overrides));
  ASSIGN_OR_RETURN(s->selector_, CreateSelector(model, s->plan_));
  if (s->plan_.target_delta > 0) {
    DeltaControllerOptions o;
    o.target_delta = s->plan_.target_delta;
    s->controller_ = std::make_unique<DeltaController>(model.num_hidden_layers, o);
  }
  return s;
}

void SelectionSession::AfterStep() {
  if (controller_ == nullptr) return;
  const SelectionTelemetry& t = selector_->telemetry();
  const size_t end = t.refresh_delta.size();
  if (end == delta_seen_) return;
  const bool changed =
      controller_->Observe(std::span<const int16_t>(t.refresh_delta_layer).subspan(delta_seen_),
                           std::span<const float>(t.refresh_delta).subspan(delta_seen_));
  delta_seen_ = end;
  if (changed) {
    controller_->Apply(&plan_);
    selector_->UpdatePlan(plan_);
  }
}

}  // namespace prehoc
