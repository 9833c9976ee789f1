// Test-only dlm::DlmBackend that forwards to another backend until told to fail: after
// FailForwards(status), every ForwardBatch returns `status` without running (a device fault that
// does not go away). Header-only; used by the DLM runner and worker server tests.
#ifndef PREHOC_WORKER_TESTING_FAULTY_DLM_BACKEND_H_
#define PREHOC_WORKER_TESTING_FAULTY_DLM_BACKEND_H_

#include <memory>
#include <span>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/dlm/dlm_backend.h"

namespace prehoc::testing {

class FaultyDlmBackend : public dlm::DlmBackend {
 public:
  explicit FaultyDlmBackend(std::shared_ptr<const dlm::DlmBackend> inner)
      : inner_(std::move(inner)) {}

  // From now on every ForwardBatch fails with `status` (must not be OK). Thread-safe.
  void FailForwards(absl::Status status) {
    absl::MutexLock l(&mu_);
    fault_ = std::move(status);
  }
  // ForwardBatch calls refused because of the fault. Thread-safe.
  int failed_forwards() const {
    absl::MutexLock l(&mu_);
    return failed_forwards_;
  }

  const ModelConfig& config() const override { return inner_->config(); }
  int mask_id() const override { return inner_->mask_id(); }
  std::span<const int> eos_ids() const override { return inner_->eos_ids(); }
  int proxy_rank() const override { return inner_->proxy_rank(); }
  std::string backend_name() const override { return inner_->backend_name(); }
  absl::StatusOr<std::unique_ptr<dlm::DlmCache>> NewCache(int rows) const override {
    return inner_->NewCache(rows);
  }
  absl::Status ForwardBatch(std::span<const dlm::DlmBatchItem> items,
                            dlm::ForwardStats* batch_stats) const override {
    {
      absl::MutexLock l(&mu_);
      if (!fault_.ok()) {
        ++failed_forwards_;
        return fault_;
      }
    }
    return inner_->ForwardBatch(items, batch_stats);
  }

 private:
  std::shared_ptr<const dlm::DlmBackend> inner_;
  mutable absl::Mutex mu_;
  absl::Status fault_ ABSL_GUARDED_BY(mu_);
  mutable int failed_forwards_ ABSL_GUARDED_BY(mu_) = 0;
};

// A DlmRunnerOptions::wrap_backend that wraps the backend in a FaultyDlmBackend and stores it in
// *out (valid while the runner lives).
inline auto WrapInFaultyDlmBackend(FaultyDlmBackend** out) {
  return [out](std::shared_ptr<const dlm::DlmBackend> inner)
             -> std::shared_ptr<const dlm::DlmBackend> {
    auto faulty = std::make_shared<FaultyDlmBackend>(std::move(inner));
    *out = faulty.get();
    return faulty;
  };
}

}  // namespace prehoc::testing

#endif  // PREHOC_WORKER_TESTING_FAULTY_DLM_BACKEND_H_
