#include "services/worker/worker_service.h"

#include "common/grpc_status.h"
#include "services/common/proto_convert.h"
#include "services/common/stream_reactor.h"

namespace prehoc {

grpc::ServerWriteReactor<v1::RunSequenceResponse>* WorkerService::RunSequence(
    grpc::CallbackServerContext* ctx, const v1::RunSequenceRequest* request) {
  absl::StatusOr<InferenceRequest> r;
  if (request->sequence_id().empty()) {
    r = absl::InvalidArgumentError("sequence_id: is empty");
  } else {
    r = FromProto(request->request());
    if (r.ok()) r->request_id = request->sequence_id();
  }
  return StartStream<v1::RunSequenceResponse>(backend_, ctx, std::move(r));
}

grpc::ServerUnaryReactor* WorkerService::FreeSequence(grpc::CallbackServerContext* ctx,
                                                      const v1::FreeSequenceRequest* request,
                                                      v1::FreeSequenceResponse* response) {
  absl::Status s = backend_->Cancel(request->sequence_id(),
                                    absl::CancelledError("sequence freed by the cache manager"));
  if (s.code() == absl::StatusCode::kNotFound) s = absl::OkStatus();  // already gone
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

}  // namespace prehoc
