#include "services/common/stream_reactor.h"

#include <chrono>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_status.h"
#include "services/common/diffuse_convert.h"
#include "services/common/proto_convert.h"

namespace prehoc {
namespace {

// How a reactor talks to each kind of backend and writes each kind of response.
void AppendTo(const InferenceEvent& e, v1::GenerateResponse* r) { AppendEvent(e, r); }
void AppendTo(const InferenceEvent& e, v1::RunSequenceResponse* r) {
  AppendEvent(e, r->mutable_response());
  r->set_sequence_length(e.sequence_length);
  r->set_kv_pages(e.kv_pages);
}
void AppendTo(const DiffusionEvent& e, v1::DiffuseResponse* r) { AppendDiffusionEvent(e, r); }
bool HasContent(const InferenceEvent& e) {
  return !e.tokens.empty() || !e.text.empty() || e.first || e.finished;
}
bool HasContent(const DiffusionEvent& e) {
  return !e.tokens.empty() || !e.text.empty() || e.first || e.finished;
}
absl::StatusOr<std::string> StartOn(InferenceBackend* b, InferenceRequest r, InferenceCallback cb) {
  return b->Generate(std::move(r), std::move(cb));
}
absl::StatusOr<std::string> StartOn(DiffusionBackend* b, DiffusionRequest r, DiffusionCallback cb) {
  return b->Diffuse(std::move(r), std::move(cb));
}
absl::Status CancelOn(InferenceBackend* b, const std::string& id, absl::Status s) {
  return b->Cancel(id, std::move(s));
}
absl::Status CancelOn(DiffusionBackend* b, const std::string& id, absl::Status s) {
  return b->CancelDiffusion(id, std::move(s));
}

template <typename Backend, typename Request, typename Event, typename Response>
class StreamReactor final : public grpc::ServerWriteReactor<Response> {
 public:
  StreamReactor(Backend* backend, grpc::CallbackServerContext* ctx)
      : backend_(backend), ctx_(ctx) {}

  void Begin(absl::StatusOr<Request> request) {
    if (!request.ok()) {
      this->Finish(ToGrpcStatus(request.status()));
      return;
    }
    request->deadline = CallDeadline(ctx_);
    absl::StatusOr<std::string> id =
        StartOn(backend_, std::move(*request), [this](Event ev) { OnEvent(std::move(ev)); });
    Action action;
    bool cancel = false;
    std::string cancel_id;
    absl::Status cancel_status;
    Backend* backend = backend_;
    {
      absl::MutexLock l(&mu_);
      if (!id.ok()) {
        terminal_ = true;  // the callback is never called
        finish_status_ = ToGrpcStatus(id.status());
      } else {
        id_ = *id;
        if (cancelled_ && !terminal_) {
          cancel = true;
          cancel_id = id_;
          cancel_status = cancel_status_;
        }
      }
      started_ = true;
      action = NextActionLocked();
    }
    if (cancel) CancelOn(backend, cancel_id, cancel_status).IgnoreError();
    Do(action);
  }

  void OnWriteDone(bool ok) override {
    Action action;
    bool cancel = false;
    std::string cancel_id;
    {
      absl::MutexLock l(&mu_);
      writing_ = false;
      if (!ok) {
        write_failed_ = true;
        has_pending_ = false;
        pending_.Clear();
        cancel = !terminal_;
        cancel_id = id_;
      }
      action = NextActionLocked();
    }
    if (cancel) {
      CancelOn(backend_, cancel_id, absl::CancelledError("client stream broken")).IgnoreError();
    }
    Do(action);
  }

  void OnCancel() override {
    const bool expired = CallDeadline(ctx_) <= absl::Now();
    absl::Status status = expired ? absl::DeadlineExceededError("deadline exceeded")
                                  : absl::CancelledError("cancelled by the client");
    bool cancel = false;
    std::string cancel_id;
    {
      absl::MutexLock l(&mu_);
      cancelled_ = true;
      cancel_status_ = status;
      cancel = started_ && !terminal_;
      cancel_id = id_;
    }
    if (cancel) CancelOn(backend_, cancel_id, status).IgnoreError();
  }

  void OnDone() override { delete this; }

 private:
  enum class Action { kNone, kWrite, kFinish };

  void OnEvent(Event ev) {
    Action action;
    {
      absl::MutexLock l(&mu_);
      if (HasContent(ev)) {
        AppendTo(ev, &pending_);
        has_pending_ = !write_failed_;
        if (write_failed_) pending_.Clear();
      }
      if (ev.terminal()) {
        terminal_ = true;
        finish_status_ = ToGrpcStatus(ev.status);
      }
      action = NextActionLocked();
    }
    // OnEvent runs on the backend's thread, outside gRPC's reactor callbacks, so once mu_ is
    // released another thread may finish the stream and OnDone may delete this reactor: when
    // there is nothing to do, touch nothing (not even a member call — UBSan's vptr check reads
    // *this; ASan caught it in ProcessTest.ServeSubcommand... as a heap-use-after-free when an
    // OnWriteDone on a gRPC thread finished the stream between the unlock and Do). kWrite and
    // kFinish are safe: no other thread can finish while this one owns the write or the finish.
    if (action == Action::kNone) return;
    Do(action);
  }

  Action NextActionLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!started_ || writing_ || finish_called_) return Action::kNone;
    if (has_pending_) {
      current_.Clear();
      current_.Swap(&pending_);
      has_pending_ = false;
      writing_ = true;
      return Action::kWrite;
    }
    if (terminal_) {
      finish_called_ = true;
      return Action::kFinish;
    }
    return Action::kNone;
  }

  // Runs outside mu_. After Finish the reactor may be deleted at any time: touch nothing.
  void Do(Action action) {
    if (action == Action::kWrite) {
      this->StartWrite(&current_);
    } else if (action == Action::kFinish) {
      grpc::Status status;
      {
        absl::MutexLock l(&mu_);
        status = finish_status_;
      }
      this->Finish(status);
    }
  }

  Backend* const backend_;
  grpc::CallbackServerContext* const ctx_;
  absl::Mutex mu_;
  std::string id_ ABSL_GUARDED_BY(mu_);
  bool started_ ABSL_GUARDED_BY(mu_) = false;   // Begin has returned from Generate
  bool writing_ ABSL_GUARDED_BY(mu_) = false;   // a StartWrite is in flight with current_
  bool has_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool terminal_ ABSL_GUARDED_BY(mu_) = false;  // the backend's last event arrived
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  bool write_failed_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status cancel_status_ ABSL_GUARDED_BY(mu_);
  grpc::Status finish_status_ ABSL_GUARDED_BY(mu_);
  Response pending_ ABSL_GUARDED_BY(mu_);  // events not yet written, coalesced
  Response current_;                       // owned by the in-flight write
};

}  // namespace

absl::Time CallDeadline(const grpc::CallbackServerContext* ctx) {
  const auto d = ctx->deadline();
  if (d >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(d);
}

template <typename Response>
grpc::ServerWriteReactor<Response>* StartStream(InferenceBackend* backend,
                                                grpc::CallbackServerContext* ctx,
                                                absl::StatusOr<InferenceRequest> request) {
  auto* reactor = new StreamReactor<InferenceBackend, InferenceRequest, InferenceEvent, Response>(
      backend, ctx);
  reactor->Begin(std::move(request));
  return reactor;
}

grpc::ServerWriteReactor<v1::DiffuseResponse>* StartDiffuseStream(
    DiffusionBackend* backend, grpc::CallbackServerContext* ctx,
    absl::StatusOr<DiffusionRequest> request) {
  auto* reactor =
      new StreamReactor<DiffusionBackend, DiffusionRequest, DiffusionEvent, v1::DiffuseResponse>(
          backend, ctx);
  reactor->Begin(std::move(request));
  return reactor;
}

template grpc::ServerWriteReactor<v1::GenerateResponse>* StartStream(
    InferenceBackend*, grpc::CallbackServerContext*, absl::StatusOr<InferenceRequest>);
template grpc::ServerWriteReactor<v1::RunSequenceResponse>* StartStream(
    InferenceBackend*, grpc::CallbackServerContext*, absl::StatusOr<InferenceRequest>);

}  // namespace prehoc
