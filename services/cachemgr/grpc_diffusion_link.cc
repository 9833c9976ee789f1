#include "services/cachemgr/grpc_diffusion_link.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "services/cachemgr/grpc_worker_link.h"
#include "services/common/diffuse_convert.h"

namespace prehoc {

// One Diffuse stream to the worker; deletes itself in OnDone.
class GrpcDiffusionLink::Call final : public grpc::ClientReadReactor<v1::DiffuseResponse> {
 public:
  Call(std::shared_ptr<GrpcDiffusionLink> link, std::string id,
       std::shared_ptr<grpc::ClientContext> ctx, DiffusionCallback callback)
      : link_(std::move(link)), id_(std::move(id)), ctx_(std::move(ctx)),
        callback_(std::move(callback)) {}

  void Begin(v1::DiffuseRequest request) {
    request_ = std::move(request);
    link_->stub_->async()->Diffuse(ctx_.get(), &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows with the status
    DiffusionEvent ev = DiffusionEventFromProto(response_);
    ev.request_id = id_;
    finished_ |= ev.finished;
    callback_(std::move(ev));
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    if (!finished_) {
      DiffusionEvent ev;
      ev.request_id = id_;
      if (status.ok()) {
        ev.status = absl::InternalError(absl::StrCat(
            "worker ", link_->worker_id_, " ended the Diffuse stream without a final message"));
      } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
        ev.status = absl::UnavailableError(
            absl::StrCat("worker ", link_->worker_id_, ": ", status.error_message()));
      } else {
        ev.status = FromGrpcStatus(status);
      }
      callback_(std::move(ev));
    }
    link_->Forget(id_);
    delete this;
  }

 private:
  std::shared_ptr<GrpcDiffusionLink> link_;
  const std::string id_;
  std::shared_ptr<grpc::ClientContext> ctx_;
  DiffusionCallback callback_;
  v1::DiffuseRequest request_;
  v1::DiffuseResponse response_;
  bool finished_ = false;  // reactions of one call are serialised by gRPC
};

std::shared_ptr<GrpcDiffusionLink> GrpcDiffusionLink::Create(
    const std::string& worker_id, std::shared_ptr<grpc::Channel> channel) {
  return std::shared_ptr<GrpcDiffusionLink>(new GrpcDiffusionLink(worker_id, std::move(channel)));
}

std::shared_ptr<DiffusionLink> GrpcDiffusionLink::ForWorker(const WorkerSnapshot& w) {
  std::shared_ptr<grpc::Channel> channel;
  if (auto* g = dynamic_cast<GrpcWorkerLink*>(w.link.get()); g != nullptr) {
    channel = g->channel();
  } else {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    channel = grpc::CreateCustomChannel(w.address, grpc::InsecureChannelCredentials(), args);
  }
  return Create(w.worker_id, std::move(channel));
}

GrpcDiffusionLink::GrpcDiffusionLink(std::string worker_id, std::shared_ptr<grpc::Channel> channel)
    : worker_id_(std::move(worker_id)),
      channel_(std::move(channel)),
      stub_(v1::Inference::NewStub(channel_)) {}

absl::Status GrpcDiffusionLink::Start(const DiffusionRequest& request,
                                      DiffusionCallback callback) {
  auto ctx = std::make_shared<grpc::ClientContext>();
  if (request.deadline != absl::InfiniteFuture()) {
    ctx->set_deadline(absl::ToChronoTime(request.deadline));
  }
  {
    absl::MutexLock l(&mu_);
    calls_[request.request_id] = ctx;
  }
  auto* call = new Call(shared_from_this(), request.request_id, ctx, std::move(callback));
  call->Begin(DiffusionToProto(request));
  return absl::OkStatus();
}

void GrpcDiffusionLink::Cancel(const std::string& request_id) {
  std::shared_ptr<grpc::ClientContext> ctx;
  {
    absl::MutexLock l(&mu_);
    auto it = calls_.find(request_id);
    if (it != calls_.end()) ctx = it->second;
  }
  if (ctx != nullptr) ctx->TryCancel();  // the worker's reactor cancels the request
}

void GrpcDiffusionLink::Forget(const std::string& request_id) {
  absl::MutexLock l(&mu_);
  calls_.erase(request_id);
}

}  // namespace prehoc
