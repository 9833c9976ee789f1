// The server-streaming reactor shared by prehoc.v1.Inference/Generate (worker and cache manager),
// prehoc.v1.Worker/RunSequence and prehoc.v1.Inference/Diffuse: it starts a request on an
// InferenceBackend (or a DiffusionBackend) and writes the backend's events to the stream without
// ever blocking the backend's thread.
//
// Events arriving while a write is in flight are coalesced into the next message (tokens and
// text appended), so a slow client costs one buffered message, not one per token. Client
// cancellation, a broken stream and the call's deadline are forwarded to InferenceBackend::Cancel;
// the reactor finishes once the backend's terminal event arrives and deletes itself in OnDone.
#ifndef PREHOC_SERVICES_COMMON_STREAM_REACTOR_H_
#define PREHOC_SERVICES_COMMON_STREAM_REACTOR_H_

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "prehoc/v1/cachemgr.pb.h"
#include "prehoc/v1/inference.pb.h"
#include "worker/dlm/diffusion_types.h"
#include "worker/scheduler_types.h"

namespace prehoc {

// The call's deadline as absl::Time (InfiniteFuture when none).
absl::Time CallDeadline(const grpc::CallbackServerContext* ctx);

// Starts `request` on `backend` (or finishes at once with request's error) and returns the
// reactor for the gRPC method to return. The request's deadline is set from `ctx`.
// Response is v1::GenerateResponse or v1::RunSequenceResponse.
template <typename Response>
grpc::ServerWriteReactor<Response>* StartStream(InferenceBackend* backend,
                                                grpc::CallbackServerContext* ctx,
                                                absl::StatusOr<InferenceRequest> request);

extern template grpc::ServerWriteReactor<v1::GenerateResponse>* StartStream(
    InferenceBackend*, grpc::CallbackServerContext*, absl::StatusOr<InferenceRequest>);
extern template grpc::ServerWriteReactor<v1::RunSequenceResponse>* StartStream(
    InferenceBackend*, grpc::CallbackServerContext*, absl::StatusOr<InferenceRequest>);

// The same for Diffuse: events are DiffusionEvents (blocks), coalesced likewise.
grpc::ServerWriteReactor<v1::DiffuseResponse>* StartDiffuseStream(
    DiffusionBackend* backend, grpc::CallbackServerContext* ctx,
    absl::StatusOr<DiffusionRequest> request);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_STREAM_REACTOR_H_
