// Conversions between the prehoc.v1 Diffuse protos (DiffuseRequest, DiffuseResponse, DlmPlan,
// DlmCacheParams) and the plain types of worker/dlm/diffusion_types.h.
#ifndef PREHOC_SERVICES_COMMON_DIFFUSE_CONVERT_H_
#define PREHOC_SERVICES_COMMON_DIFFUSE_CONVERT_H_

#include "absl/status/statusor.h"
#include "prehoc/v1/inference.pb.h"
#include "worker/dlm/diffusion_types.h"

namespace prehoc {

// DiffuseRequest -> DiffusionRequest. INVALID_ARGUMENT naming the field when the prompt oneof is
// unset, sampling.top_k / sampling.top_p are set, a count is negative, or the plan names an
// unknown policy. cache_params become cache_overrides (MakeDlmSchedule's keys); `rho` is copied;
// defaults (gen_length 0, empty remasking / cache) are applied by the backend.
absl::StatusOr<DiffusionRequest> DiffusionFromProto(const v1::DiffuseRequest& proto);
// DiffusionRequest -> DiffuseRequest (the cache manager forwarding to a worker, plan included).
v1::DiffuseRequest DiffusionToProto(const DiffusionRequest& request);

// Appends `event` to `*out` (tokens and text; block / block_start when `*out` has no tokens yet;
// first / final fields when set). Several non-terminal events may be merged into one message.
void AppendDiffusionEvent(const DiffusionEvent& event, v1::DiffuseResponse* out);
// DiffuseResponse -> DiffusionEvent (the cache manager reading a worker's stream).
DiffusionEvent DiffusionEventFromProto(const v1::DiffuseResponse& proto);

v1::DlmPlan DlmPlanToProto(const DlmSchedule& plan);
// INVALID_ARGUMENT naming plan.policy for an unknown policy.
absl::StatusOr<DlmSchedule> DlmPlanFromProto(const v1::DlmPlan& proto);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_DIFFUSE_CONVERT_H_
