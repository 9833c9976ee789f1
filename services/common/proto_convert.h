// Conversions between prehoc.v1 protos and the plain serving structs of worker/scheduler_types.h.
// The only place (besides the reactors) where services touch both worlds.
#ifndef PREHOC_SERVICES_COMMON_PROTO_CONVERT_H_
#define PREHOC_SERVICES_COMMON_PROTO_CONVERT_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "prehoc/v1/cachemgr.pb.h"
#include "cachemgr/router.h"
#include "prehoc/v1/inference.pb.h"
#include "worker/scheduler.h"
#include "worker/scheduler_types.h"

namespace prehoc {

// INVALID_ARGUMENT "field: what": how every conversion (Generate and Diffuse) names the field
// it refuses.
template <typename... What>
absl::Status FieldError(absl::string_view field, const What&... what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what...));
}

// The prompt oneof shared by GenerateRequest and DiffuseRequest (Proto::kText / kTokenIds).
// INVALID_ARGUMENT "prompt: ..." when neither is set.
template <typename Proto>
absl::Status PromptFromProto(const Proto& p, std::optional<std::string>* text,
                             std::vector<int32_t>* token_ids) {
  switch (p.prompt_case()) {
    case Proto::kText:
      *text = p.text();
      return absl::OkStatus();
    case Proto::kTokenIds:
      token_ids->assign(p.token_ids().ids().begin(), p.token_ids().ids().end());
      return absl::OkStatus();
    default:
      return FieldError("prompt", "set either text or token_ids");
  }
}
template <typename Proto>
void PromptToProto(const std::optional<std::string>& text, const std::vector<int32_t>& token_ids,
                   Proto* p) {
  if (text.has_value()) {
    p->set_text(*text);
  } else {
    p->mutable_token_ids()->mutable_ids()->Add(token_ids.begin(), token_ids.end());
  }
}

// The request fields GenerateRequest and DiffuseRequest share (request_id, model, prompt), for
// Request = InferenceRequest / DiffusionRequest.
template <typename Proto, typename Request>
absl::Status CommonRequestFromProto(const Proto& p, Request* r) {
  r->request_id = p.request_id();
  r->model = p.model();
  return PromptFromProto(p, &r->text, &r->token_ids);
}
template <typename Request, typename Proto>
void CommonRequestToProto(const Request& r, Proto* p) {
  p->set_request_id(r.request_id);
  p->set_model(r.model);
  PromptToProto(r.text, r.token_ids, p);
}

// The stream-message fields GenerateResponse and DiffuseResponse share (tokens, text, the first
// message's request_id / served_by, the final message's finish_reason and usage), for
// Event = InferenceEvent / DiffusionEvent.
template <typename Event, typename Proto>
void AppendCommonEvent(const Event& e, Proto* out) {
  out->mutable_token_ids()->Add(e.tokens.begin(), e.tokens.end());
  out->mutable_text()->append(e.text);
  if (e.first) {
    out->set_request_id(e.request_id);
    out->set_served_by(e.served_by);
  }
  if (e.finished) {
    out->set_finished(true);
    out->set_finish_reason(e.finish_reason);
    out->mutable_usage()->set_prompt_tokens(e.prompt_tokens);
    out->mutable_usage()->set_completion_tokens(e.completion_tokens);
  }
}
template <typename Event, typename Proto>
void CommonEventFromProto(const Proto& p, Event* e) {
  e->tokens.assign(p.token_ids().begin(), p.token_ids().end());
  e->text = p.text();
  if (!p.request_id().empty()) {
    e->first = true;
    e->request_id = p.request_id();
    e->served_by = p.served_by();
  }
  if (p.finished()) {
    e->finished = true;
    e->finish_reason = p.finish_reason();
    e->prompt_tokens = p.usage().prompt_tokens();
    e->completion_tokens = p.usage().completion_tokens();
  }
}

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

// The worker's telemetry as one CacheManager.ReportTelemetry batch (sequence records, and one
// RefreshEvent per refresh δ sample with its layer and kv head).
v1::TelemetryBatch TelemetryToProto(const std::string& worker_id, int64_t epoch,
                                    const LoadReport& load,
                                    const std::vector<SequenceTelemetry>& sequences);
// A telemetry batch as the Router records it. Split mode reads it off the wire; embedded mode
// converts the scheduler's telemetry with TelemetryToProto and this, so both modes feed the
// planner exactly the same samples.
TelemetryReport TelemetryReportFromProto(const v1::TelemetryBatch& batch);

// "dense" <-> SparsityParams::DENSE etc. Unknown names map to POLICY_UNSPECIFIED.
v1::SparsityParams::Policy PolicyToProto(const std::string& name);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_PROTO_CONVERT_H_
