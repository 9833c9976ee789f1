// A DlmBackend wrapper that makes end-of-text the answer of every logit row inside one range of
// canvas positions: a *synthetic answer length* for throughput benchmarks with random weights,
// which never produce end-of-text on their own. With DiffuseOptions::stop_at_eos and the range =
// one block, the real decoder commits end-of-text in that block and stops after it (decoder.h),
// so a benchmark times exactly the steps a decode whose answer ends in that block would run.
// Everything else (caches, rows, step kinds) is the wrapped backend's. Benchmarks and tests only.
#ifndef PREHOC_WORKER_TESTING_EOS_IN_BLOCK_BACKEND_H_
#define PREHOC_WORKER_TESTING_EOS_IN_BLOCK_BACKEND_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/dlm/dlm_backend.h"

namespace prehoc::dlm {

class EosInBlockBackend final : public DlmBackend {
 public:
  // Logit rows at canvas positions in [row_begin, row_end) answer end-of-text with probability
  // 1 (top-1 items), or get its logit raised 1000 above the row's maximum (logit items). The id
  // written is eos_ids()[eos_index] (default the first).
  // REQUIRES: `inner` outlives this.
  EosInBlockBackend(const DlmBackend& inner, int row_begin, int row_end, int eos_index = 0)
      : inner_(inner), row_begin_(row_begin), row_end_(row_end), eos_index_(eos_index) {}

  const ModelConfig& config() const override { return inner_.config(); }
  int mask_id() const override { return inner_.mask_id(); }
  std::span<const int> eos_ids() const override { return inner_.eos_ids(); }
  int proxy_rank() const override { return inner_.proxy_rank(); }
  std::string backend_name() const override { return inner_.backend_name(); }
  absl::StatusOr<std::unique_ptr<DlmCache>> NewCache(int rows) const override {
    return inner_.NewCache(rows);
  }

  // The wrapped backend's step, then the rewrite above. FAILED_PRECONDITION when the model
  // declares no end-of-text id at eos_index; otherwise the wrapped backend's errors.
  absl::Status ForwardBatch(std::span<const DlmBatchItem> items,
                            ForwardStats* batch_stats) const override {
    const std::span<const int> ids = inner_.eos_ids();
    if (eos_index_ < 0 || eos_index_ >= static_cast<int>(ids.size())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the model declares ", ids.size(), " end-of-text ids, none at index ", eos_index_));
    }
    const int eos = ids[eos_index_];
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
  const int row_begin_, row_end_, eos_index_;
};

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_TESTING_EOS_IN_BLOCK_BACKEND_H_
