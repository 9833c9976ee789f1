#include "services/common/inference_service.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "services/common/diffuse_convert.h"
#include "services/common/proto_convert.h"
#include "services/common/stream_reactor.h"

namespace prehoc {
namespace {

// Finishes at once (Diffuse on a server without a diffusion backend).
class UnimplementedDiffuse final : public grpc::ServerWriteReactor<v1::DiffuseResponse> {
 public:
  void OnDone() override { delete this; }
};

}  // namespace

int TransportMessageLimit(int64_t max_request_bytes) {
  const int64_t limit = 2 * max_request_bytes + (64 << 10);
  return static_cast<int>(std::min<int64_t>(limit, std::numeric_limits<int>::max()));
}

InferenceService::InferenceService(InferenceBackend* backend,
                                   const InferenceServiceOptions& options)
    : backend_(backend), options_(options) {}

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  const int64_t size = static_cast<int64_t>(request->ByteSizeLong());
  absl::StatusOr<InferenceRequest> converted;
  if (size > options_.max_request_bytes) {
    converted = absl::InvalidArgumentError(
        absl::StrCat("request: message of ", size, " bytes exceeds the limit of ",
                     options_.max_request_bytes, " bytes (max_request_bytes)"));
  } else {
    converted = FromProto(*request);
  }
  return StartStream<v1::GenerateResponse>(backend_, ctx, std::move(converted));
}

grpc::ServerWriteReactor<v1::DiffuseResponse>* InferenceService::Diffuse(
    grpc::CallbackServerContext* ctx, const v1::DiffuseRequest* request) {
  if (options_.diffusion == nullptr) {
    auto* reactor = new UnimplementedDiffuse();
    reactor->Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                                 "Diffuse is not served by this server"));
    return reactor;
  }
  const int64_t size = static_cast<int64_t>(request->ByteSizeLong());
  absl::StatusOr<DiffusionRequest> converted;
  if (size > options_.max_request_bytes) {
    converted = absl::InvalidArgumentError(
        absl::StrCat("request: message of ", size, " bytes exceeds the limit of ",
                     options_.max_request_bytes, " bytes (max_request_bytes)"));
  } else {
    converted = DiffusionFromProto(*request);
  }
  return StartDiffuseStream(options_.diffusion, ctx, std::move(converted));
}

grpc::ServerUnaryReactor* InferenceService::Cancel(grpc::CallbackServerContext* ctx,
                                                   const v1::CancelRequest* request,
                                                   v1::CancelResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (request->request_id().empty()) {
    reactor->Finish(ToGrpcStatus(absl::InvalidArgumentError("request_id: is empty")));
  } else {
    absl::Status s = backend_->Cancel(request->request_id());
    if (s.code() == absl::StatusCode::kNotFound && options_.diffusion != nullptr) {
      s = options_.diffusion->CancelDiffusion(request->request_id(),
                                              absl::CancelledError("cancelled"));
    }
    reactor->Finish(ToGrpcStatus(s));
  }
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::ListModels(grpc::CallbackServerContext* ctx,
                                                       const v1::ListModelsRequest* request,
                                                       v1::ListModelsResponse* response) {
  for (const ModelDescription& m : backend_->ListModels()) *response->add_models() = ToProto(m);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace prehoc
