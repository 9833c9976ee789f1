// Conversions between the SelectionPlan struct (cachemgr/selection_plan.h) and
// prehoc.v1.SelectionPlan (cachemgr.proto), used by CacheManager.StreamPlans and the worker's
// plan stream client.
#ifndef PREHOC_SERVICES_COMMON_PLAN_CONVERT_H_
#define PREHOC_SERVICES_COMMON_PLAN_CONVERT_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/selection_plan.h"
#include "prehoc/v1/cachemgr.pb.h"

namespace prehoc {

// Every field of `plan` the proto carries, plus the sequence id and the production time.
v1::SelectionPlan PlanToProto(const std::string& sequence_id, const SelectionPlan& plan,
                              absl::Time produced);

// The inverse. Fields the proto leaves at zero where zero is not a valid setting (k_scale,
// refresh_interval, base_tau) take the struct's defaults. `*produced` (optional) receives
// created_unix_micros. INVALID_ARGUMENT naming the field for an unknown policy, no layers,
// a negative sink/local/max_reuse/r, or a head_k_scale or k_scale that is not finite and > 0.
absl::StatusOr<SelectionPlan> PlanFromProto(const v1::SelectionPlan& proto,
                                            absl::Time* produced = nullptr);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_PLAN_CONVERT_H_
