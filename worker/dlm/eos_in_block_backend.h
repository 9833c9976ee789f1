// A DlmBackend wrapper that makes end-of-text the answer of every logit row inside one range of
// canvas positions: a *synthetic answer length* for throughput benchmarks with random weights,
// which never produce end-of-text on their own. With DiffuseOptions::stop_at_eos and the range =
// one block, the real decoder commits end-of-text in that block and stops after it (decoder.h),
// so a benchmark times exactly the steps a decode whose answer ends in that block would run.
// Everything else (caches, rows, step kinds) is the wrapped backend's. Benchmarks and tests only.
#ifndef PREHOC_WORKER_DLM_EOS_IN_BLOCK_BACKEND_H_
#define PREHOC_WORKER_DLM_EOS_IN_BLOCK_BACKEND_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/dlm/dlm_backend.h"

namespace prehoc::dlm {

class EosInBlockBackend final : public DlmBackend {
 public:
  // Logit rows at canvas positions in [row_begin, row_end) answer eos_id() with probability 1
  // (top-1 items), or get eos_id()'s logit raised 1000 above the row's maximum (logit items).
  // REQUIRES: `inner` outlives this.
  EosInBlockBackend(const DlmBackend& inner, int row_begin, int row_end)
      : inner_(inner), row_begin_(row_begin), row_end_(row_end) {}

  const ModelConfig& config() const override { return inner_.config(); }
  int mask_id() const override { return inner_.mask_id(); }
  int eos_id() const override { return inner_.eos_id(); }
  int proxy_rank() const override { return inner_.proxy_rank(); }
  std::string backend_name() const override { return inner_.backend_name(); }
  absl::StatusOr<std::unique_ptr<DlmCache>> NewCache(int rows) const override {
    return inner_.NewCache(rows);
  }

  // The wrapped backend's step, then the rewrite above. FAILED_PRECONDITION when the model
  // declares no end-of-text id; otherwise the wrapped backend's errors.
  absl::Status ForwardBatch(std::span<const DlmBatchItem> items,
                            ForwardStats* batch_stats) const override {
    const int eos = inner_.eos_id();
    if (eos < 0) return absl::FailedPreconditionError("the model declares no end-of-text id");
    absl::Status s = inner_.ForwardBatch(items, batch_stats);
    if (!s.ok()) return s;
    const size_t vocab = static_cast<size_t>(inner_.config().vocab_size);
    for (const DlmBatchItem& it : items) {
      const std::span<const int32_t> rows = it.spec->logit_rows;
      for (size_t j = 0; j < rows.size(); ++j) {
        if (rows[j] < row_begin_ || rows[j] >= row_end_) continue;
        if (it.top1 != nullptr) {
          (*it.top1)[j] = eos;
          (*it.top1_prob)[j] = 1.0;
        } else if (it.logits != nullptr) {
          float* row = it.logits->data() + j * vocab;
          row[eos] = *std::max_element(row, row + vocab) + 1000.0f;
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  const DlmBackend& inner_;
  const int row_begin_, row_end_;
};

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_EOS_IN_BLOCK_BACKEND_H_
