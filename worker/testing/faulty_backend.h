// Test-only ModelBackend that forwards to another backend until told to fail: after
// FailSteps(status), every Step / StepSample returns `status` without running (a device fault
// that does not go away). Header-only; used by the scheduler, worker server and embedded tests.
#ifndef PREHOC_WORKER_TESTING_FAULTY_BACKEND_H_
#define PREHOC_WORKER_TESTING_FAULTY_BACKEND_H_

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/backend.h"

namespace prehoc::testing {

class FaultyBackend : public ModelBackend {
 public:
  explicit FaultyBackend(std::unique_ptr<ModelBackend> inner) : inner_(std::move(inner)) {}

  // From now on every step fails with `status` (must not be OK). Thread-safe.
  void FailSteps(absl::Status status) {
    absl::MutexLock l(&mu_);
    fault_ = std::move(status);
  }
  // Steps refused because of the fault. Thread-safe.
  int failed_steps() const {
    absl::MutexLock l(&mu_);
    return failed_steps_;
  }

  const char* kind() const override { return inner_->kind(); }
  std::string description() const override { return inner_->description(); }
  const ModelConfig& config() const override { return inner_->config(); }
  const Tokenizer* tokenizer() const override { return inner_->tokenizer(); }
  int max_context() const override { return inner_->max_context(); }
  int page_size() const override { return inner_->page_size(); }
  int32_t num_pages() const override { return inner_->num_pages(); }
  int32_t used_pages() const override { return inner_->used_pages(); }
  absl::Status SupportsPlan(const SelectionPlan& plan) const override {
    return inner_->SupportsPlan(plan);
  }
  SeqId CreateSequence() override { return inner_->CreateSequence(); }
  absl::Status FreeSequence(SeqId seq) override { return inner_->FreeSequence(seq); }
  absl::StatusOr<int> SequenceLength(SeqId seq) const override {
    return inner_->SequenceLength(seq);
  }
  int num_sequences() const override { return inner_->num_sequences(); }
  bool samples_on_device() const override { return inner_->samples_on_device(); }

  absl::StatusOr<std::vector<std::vector<float>>> Step(std::span<const StepItem> items,
                                                       bool causal = true) override {
    if (absl::Status s = Fault(); !s.ok()) return s;
    return inner_->Step(items, causal);
  }
  absl::StatusOr<std::vector<int32_t>> StepSample(std::span<const StepItem> items,
                                                  std::span<const TokenDraw> draws,
                                                  bool causal = true) override {
    if (absl::Status s = Fault(); !s.ok()) return s;
    return inner_->StepSample(items, draws, causal);
  }

 private:
  absl::Status Fault() {
    absl::MutexLock l(&mu_);
    if (!fault_.ok()) ++failed_steps_;
    return fault_;
  }

  std::unique_ptr<ModelBackend> inner_;
  mutable absl::Mutex mu_;
  absl::Status fault_ ABSL_GUARDED_BY(mu_);
  int failed_steps_ ABSL_GUARDED_BY(mu_) = 0;
};

// A backend-wrapping hook (WorkerServerOptions / EmbeddedOptions::wrap_backend) that puts the
// server's backend inside a FaultyBackend and stores it in `*out` (owned by the scheduler).
inline std::function<std::unique_ptr<ModelBackend>(std::unique_ptr<ModelBackend>)>
WrapInFaultyBackend(FaultyBackend** out) {
  return [out](std::unique_ptr<ModelBackend> inner) -> std::unique_ptr<ModelBackend> {
    auto f = std::make_unique<FaultyBackend>(std::move(inner));
    *out = f.get();
    return f;
  };
}

}  // namespace prehoc::testing

#endif  // PREHOC_WORKER_TESTING_FAULTY_BACKEND_H_
