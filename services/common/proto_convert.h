// Conversions between prehoc.v1 protos and the plain serving structs of worker/scheduler_types.h.
// The only place (besides the reactors) where services touch both worlds.
#ifndef PREHOC_SERVICES_COMMON_PROTO_CONVERT_H_
#define PREHOC_SERVICES_COMMON_PROTO_CONVERT_H_

#include <string>

#include "absl/status/statusor.h"
#include "prehoc/v1/cachemgr.pb.h"
#include "prehoc/v1/inference.pb.h"
#include "worker/scheduler_types.h"

namespace prehoc {

// GenerateRequest -> InferenceRequest. INVALID_ARGUMENT naming the field when the prompt oneof
// is unset or the sparsity policy enum is unknown. Sampling: seed 0 with temperature > 0 picks a
// random seed (proto contract); top_p 0 means 1 (off). Deadline is left infinite (the caller
// sets it from the call).
absl::StatusOr<InferenceRequest> FromProto(const v1::GenerateRequest& proto);
// InferenceRequest -> GenerateRequest (the cache manager forwarding to a worker). Lossless for
// requests produced by FromProto (the resolved seed is forwarded).
v1::GenerateRequest ToProto(const InferenceRequest& request);

// Appends `event` to `*out` (tokens, text; first/final fields when set). Merging several
// non-terminal events into one message is allowed (that is how the reactors coalesce).
void AppendEvent(const InferenceEvent& event, v1::GenerateResponse* out);
// GenerateResponse -> InferenceEvent (the cache manager reading a worker's stream).
InferenceEvent EventFromProto(const v1::GenerateResponse& proto);

v1::ModelInfo ToProto(const ModelDescription& model);
ModelDescription FromProto(const v1::ModelInfo& proto);
v1::WorkerLoad ToProto(const LoadReport& load);
LoadReport FromProto(const v1::WorkerLoad& proto);

// "dense" <-> SparsityParams::DENSE etc. Unknown names map to POLICY_UNSPECIFIED.
v1::SparsityParams::Policy PolicyToProto(const std::string& name);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_PROTO_CONVERT_H_
