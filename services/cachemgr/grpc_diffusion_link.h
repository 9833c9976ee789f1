// DiffusionLink over gRPC: the cache manager calls the worker's prehoc.v1.Inference/Diffuse with
// the request and its DLM plan (client callback reactors), on the channel of the worker's
// GrpcWorkerLink when it has one.
#ifndef PREHOC_SERVICES_CACHEMGR_GRPC_DIFFUSION_LINK_H_
#define PREHOC_SERVICES_CACHEMGR_GRPC_DIFFUSION_LINK_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "cachemgr/dlm_router.h"
#include "prehoc/v1/inference.grpc.pb.h"

namespace prehoc {

class GrpcDiffusionLink : public DiffusionLink,
                          public std::enable_shared_from_this<GrpcDiffusionLink> {
 public:
  // `channel` to the worker at `address` (named in errors as worker `worker_id`).
  static std::shared_ptr<GrpcDiffusionLink> Create(const std::string& worker_id,
                                                   std::shared_ptr<grpc::Channel> channel);
  // For DlmRouterOptions::link_factory: reuses the GrpcWorkerLink's channel when the worker has
  // one, else dials w.address.
  static std::shared_ptr<DiffusionLink> ForWorker(const WorkerSnapshot& w);

  absl::Status Start(const DiffusionRequest& request, DiffusionCallback callback) override;
  void Cancel(const std::string& request_id) override;

 private:
  class Call;
  GrpcDiffusionLink(std::string worker_id, std::shared_ptr<grpc::Channel> channel);
  void Forget(const std::string& request_id);

  const std::string worker_id_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> stub_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<grpc::ClientContext>> calls_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_CACHEMGR_GRPC_DIFFUSION_LINK_H_
