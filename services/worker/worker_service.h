// prehoc.v1.Worker (cachemgr.proto) over the worker's Scheduler: RunSequence streams one
// sequence's tokens with its growth ("extend" events); FreeSequence cancels it.
#ifndef PREHOC_SERVICES_WORKER_WORKER_SERVICE_H_
#define PREHOC_SERVICES_WORKER_WORKER_SERVICE_H_

#include "prehoc/v1/cachemgr.grpc.pb.h"
#include "worker/scheduler_types.h"

namespace prehoc {

class WorkerService final : public v1::Worker::CallbackService {
 public:
  // `backend` is not owned and must outlive the server.
  explicit WorkerService(InferenceBackend* backend) : backend_(backend) {}

  grpc::ServerWriteReactor<v1::RunSequenceResponse>* RunSequence(
      grpc::CallbackServerContext* ctx, const v1::RunSequenceRequest* request) override;
  grpc::ServerUnaryReactor* FreeSequence(grpc::CallbackServerContext* ctx,
                                         const v1::FreeSequenceRequest* request,
                                         v1::FreeSequenceResponse* response) override;

 private:
  InferenceBackend* const backend_;
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_WORKER_WORKER_SERVICE_H_
