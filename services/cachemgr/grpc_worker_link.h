// WorkerLink over gRPC: RunSequence streams (client callback reactors) and FreeSequence calls to
// one worker's prehoc.v1.Worker service.
#ifndef PREHOC_SERVICES_CACHEMGR_GRPC_WORKER_LINK_H_
#define PREHOC_SERVICES_CACHEMGR_GRPC_WORKER_LINK_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/worker_registry.h"
#include "prehoc/v1/cachemgr.grpc.pb.h"

namespace prehoc {

class GrpcWorkerLink : public WorkerLink, public std::enable_shared_from_this<GrpcWorkerLink> {
 public:
  static std::shared_ptr<GrpcWorkerLink> Create(const std::string& worker_id,
                                                const std::string& address);

  absl::Status Start(const std::string& sequence_id, const InferenceRequest& request,
                     InferenceCallback callback) override;
  void Free(const std::string& sequence_id) override;
  // False after a stream failed at the transport (UNAVAILABLE) until the channel is READY again.
  bool Healthy() const override;
  // The channel to the worker (shared with its Diffuse link, grpc_diffusion_link.h).
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

 private:
  class Call;
  GrpcWorkerLink(std::string worker_id, std::shared_ptr<grpc::Channel> channel);
  void Forget(const std::string& sequence_id);

  const std::string worker_id_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Worker::Stub> stub_;
  mutable std::atomic<bool> broken_{false};
  absl::Mutex mu_;
  // Contexts of the running streams, for Free (shared so TryCancel never races deletion).
  absl::flat_hash_map<std::string, std::shared_ptr<grpc::ClientContext>> calls_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CACHEMGR_GRPC_WORKER_LINK_H_
