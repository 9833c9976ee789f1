// prehoc.v1.Inference over any InferenceBackend (the worker's Scheduler, the cache manager's
// Router, or both in embedded mode): a thin adapter, callback API, no logic beyond proto
// conversion and the request-size check.
#ifndef PREHOC_SERVICES_COMMON_INFERENCE_SERVICE_H_
#define PREHOC_SERVICES_COMMON_INFERENCE_SERVICE_H_

#include <cstdint>

#include "prehoc/v1/inference.grpc.pb.h"
#include "worker/dlm/diffusion_types.h"
#include "worker/scheduler_types.h"

namespace prehoc {

struct InferenceServiceOptions {
  // Requests whose serialized size exceeds this are INVALID_ARGUMENT ("request: ..."). Servers
  // set gRPC's transport limit above it (see TransportMessageLimit) so the check is reached.
  int64_t max_request_bytes = int64_t{4} << 20;
  // Serves Diffuse (not owned; must outlive the server). Null = Diffuse is UNIMPLEMENTED.
  DiffusionBackend* diffusion = nullptr;
};

// The gRPC max receive size to configure for `max_request_bytes`: 2x + 64 KiB.
int TransportMessageLimit(int64_t max_request_bytes);

class InferenceService final : public v1::Inference::CallbackService {
 public:
  // `backend` is not owned and must outlive the server.
  InferenceService(InferenceBackend* backend, const InferenceServiceOptions& options);

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) override;
  grpc::ServerWriteReactor<v1::DiffuseResponse>* Diffuse(
      grpc::CallbackServerContext* ctx, const v1::DiffuseRequest* request) override;
  // Cancels a Generate, or else a Diffuse, with that id.
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx,
                                   const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

 private:
  InferenceBackend* const backend_;
  const InferenceServiceOptions options_;
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_INFERENCE_SERVICE_H_
