// One sequence's selection machinery on the worker: the plan (what the cache manager would
// send), the selector that executes it, and — when a target δ* is set — the δ-controller that
// turns refresh telemetry into plan updates. This local loop runs until the sequence's first
// cache-manager plan is applied, and for good on a standalone worker and in `prehoc generate`;
// in split and embedded mode (`prehoc serve`) alike the cache manager's PlanManager then keeps
// the controller and sends the plans (docs/selection.md, 'Where it runs').
#ifndef PREHOC_WORKER_SELECTION_SESSION_H_
#define PREHOC_WORKER_SELECTION_SESSION_H_

#include <memory>

#include "absl/status/statusor.h"
#include "cachemgr/delta_controller.h"
#include "cachemgr/selection_plan.h"
#include "common/model_config.h"
#include "worker/selection/selector.h"
#include "worker/sparsity.h"

namespace prehoc {

class SelectionSession {
 public:
  // INVALID_ARGUMENT naming the bad sparsity field or override. With target_delta > 0 the
  // session uses `shared_controller` (not owned; e.g. one per (model, policy, δ*) kept by the
  // cache manager, so budgets learned on earlier requests carry over) or, when null, its own.
  static absl::StatusOr<std::unique_ptr<SelectionSession>> Create(
      const ModelConfig& model, const SparsityOptions& options,
      DeltaController* shared_controller = nullptr);

  SequenceSelector* selector() { return selector_.get(); }
  const SelectionPlan& plan() const { return plan_; }
  const DeltaController* controller() const { return controller_; }

  // Call after every decode step: feeds the refresh δ measured since the last call to the
  // controller and, when it changed the budget, hands the selector the new plan version.
  void AfterStep();

  // Replaces the plan with one computed elsewhere (the cache manager's, in split mode) at a
  // step boundary; the selector keeps its state (CIS anchors, ...). From then on the plan's
  // owner runs the δ loop: this session no longer feeds or applies a local controller.
  // INVALID_ARGUMENT when `plan` does not fit (another policy or layer count); the current plan
  // stays. REQUIRES: not concurrently with a step of this session's selector.
  absl::Status AdoptPlan(SelectionPlan plan);
  bool external_plan() const { return external_plan_; }

 private:
  SelectionSession() = default;
  SelectionPlan plan_;
  std::unique_ptr<SequenceSelector> selector_;
  std::unique_ptr<DeltaController> own_controller_;
  DeltaController* controller_ = nullptr;
  uint64_t applied_version_ = 0;
  size_t delta_seen_ = 0;
  bool external_plan_ = false;
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_SELECTION_SESSION_H_
