#include "services/cachemgr/grpc_worker_link.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "services/common/proto_convert.h"

namespace prehoc {

class GrpcWorkerLink::Call final : public grpc::ClientReadReactor<v1::RunSequenceResponse> {
 public:
  Call(std::shared_ptr<GrpcWorkerLink> link, std::string sequence_id,
       std::shared_ptr<grpc::ClientContext> ctx, InferenceCallback callback)
      : link_(std::move(link)),
        sequence_id_(std::move(sequence_id)),
        ctx_(std::move(ctx)),
        callback_(std::move(callback)) {}

  void Begin(v1::RunSequenceRequest request) {
    request_ = std::move(request);
    link_->stub_->async()->RunSequence(ctx_.get(), &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows with the status
    link_->broken_ = false;
    InferenceEvent ev = EventFromProto(response_.response());
    ev.sequence_length = response_.sequence_length();
    ev.kv_pages = response_.kv_pages();
    if (ev.finished) terminal_sent_ = true;
    callback_(std::move(ev));
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    if (!terminal_sent_) {
      InferenceEvent ev;
      ev.request_id = sequence_id_;
      if (status.ok()) {
        ev.status = absl::InternalError(
            absl::StrCat("worker ", link_->worker_id_, " ended the stream without a final message"));
      } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
        link_->broken_ = true;
        ev.status = absl::UnavailableError(
            absl::StrCat("worker ", link_->worker_id_, ": ", status.error_message()));
      } else {
        ev.status = FromGrpcStatus(status);
      }
      callback_(std::move(ev));
    }
    link_->Forget(sequence_id_);
    delete this;
  }

 private:
  std::shared_ptr<GrpcWorkerLink> link_;
  const std::string sequence_id_;
  std::shared_ptr<grpc::ClientContext> ctx_;
  InferenceCallback callback_;
  v1::RunSequenceRequest request_;
  v1::RunSequenceResponse response_;
  bool terminal_sent_ = false;  // reactions of one call are serialised by gRPC
};

std::shared_ptr<GrpcWorkerLink> GrpcWorkerLink::Create(const std::string& worker_id,
                                                       const std::string& address) {
  grpc::ChannelArguments args;
  // Reconnect quickly to a restarted worker.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  return std::shared_ptr<GrpcWorkerLink>(new GrpcWorkerLink(worker_id, std::move(channel)));
}

GrpcWorkerLink::GrpcWorkerLink(std::string worker_id, std::shared_ptr<grpc::Channel> channel)
    : worker_id_(std::move(worker_id)),
      channel_(std::move(channel)),
      stub_(v1::Worker::NewStub(channel_)) {}

absl::Status GrpcWorkerLink::Start(const std::string& sequence_id,
                                   const InferenceRequest& request, InferenceCallback callback) {
  auto ctx = std::make_shared<grpc::ClientContext>();
  if (request.deadline != absl::InfiniteFuture()) {
    ctx->set_deadline(absl::ToChronoTime(request.deadline));
  }
  v1::RunSequenceRequest req;
  req.set_sequence_id(sequence_id);
  *req.mutable_request() = ToProto(request);
  req.mutable_request()->clear_request_id();
  {
    absl::MutexLock l(&mu_);
    calls_[sequence_id] = ctx;
  }
  auto* call = new Call(shared_from_this(), sequence_id, ctx, std::move(callback));
  call->Begin(std::move(req));
  return absl::OkStatus();
}

void GrpcWorkerLink::Free(const std::string& sequence_id) {
  std::shared_ptr<grpc::ClientContext> ctx;
  {
    absl::MutexLock l(&mu_);
    auto it = calls_.find(sequence_id);
    if (it != calls_.end()) ctx = it->second;
  }
  if (ctx != nullptr) {
    ctx->TryCancel();  // the worker's reactor sees the cancellation and frees the sequence
    return;
  }
  // Not started through this link (an orphan of a previous cache manager): ask the worker.
  struct Pending {
    grpc::ClientContext ctx;
    v1::FreeSequenceRequest request;
    v1::FreeSequenceResponse response;
    std::shared_ptr<GrpcWorkerLink> keep;
  };
  auto* p = new Pending();
  p->keep = shared_from_this();
  p->request.set_sequence_id(sequence_id);
  p->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  stub_->async()->FreeSequence(&p->ctx, &p->request, &p->response,
                               [p](grpc::Status) { delete p; });
}

bool GrpcWorkerLink::Healthy() const {
  const grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/broken_.load());
  if (state == GRPC_CHANNEL_READY) {
    broken_ = false;
    return true;
  }
  if (state == GRPC_CHANNEL_TRANSIENT_FAILURE || state == GRPC_CHANNEL_SHUTDOWN) return false;
  return !broken_.load();
}

void GrpcWorkerLink::Forget(const std::string& sequence_id) {
  absl::MutexLock l(&mu_);
  calls_.erase(sequence_id);
}

}  // namespace prehoc
