#include "worker/dlm/dlm_backend.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace prehoc::dlm {

absl::Status ValidateForward(const ModelConfig& c, int proxy_rank, int rows,
                             std::span<const int32_t> canvas, const ForwardSpec& spec,
                             const std::function<bool(int)>& proxy_valid,
                             std::vector<int>* logit_local) {
  const int NL = c.num_hidden_layers, V = c.vocab_size;
  if (static_cast<int>(canvas.size()) != rows) {
    return absl::InvalidArgumentError(absl::StrCat("canvas: length ", canvas.size(),
                                                   " differs from the state's ", rows, " rows"));
  }
  for (int i = 0; i < rows; ++i) {
    if (canvas[i] < 0 || canvas[i] >= V) {
      return absl::InvalidArgumentError(
          absl::StrCat("canvas: token ", canvas[i], " at position ", i, " is outside [0, ", V, ")"));
    }
  }
  const std::span<const int32_t> live = spec.live;
  const int n = static_cast<int>(live.size());
  if (n == 0) return absl::InvalidArgumentError("live: no rows");
  for (int i = 0; i < n; ++i) {
    if (live[i] < 0 || live[i] >= rows || (i > 0 && live[i] <= live[i - 1])) {
      return absl::InvalidArgumentError(
          absl::StrCat("live: rows must be sorted, unique and in [0, ", rows, "); bad entry ", i));
    }
  }
  std::vector<int> local(spec.logit_rows.size());
  for (size_t i = 0; i < spec.logit_rows.size(); ++i) {
    auto it = std::lower_bound(live.begin(), live.end(), spec.logit_rows[i]);
    if (it == live.end() || *it != spec.logit_rows[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("logit_rows: row ", spec.logit_rows[i], " is not live"));
    }
    local[i] = static_cast<int>(it - live.begin());
  }
  const bool selective = spec.select != RowSelect::kAll;
  if (selective && static_cast<int>(spec.update_rows.size()) < NL) {
    return absl::InvalidArgumentError(absl::StrCat("update_rows: need ", NL, " entries, got ",
                                                   spec.update_rows.size()));
  }
  if ((spec.select == RowSelect::kSpa || spec.store_proxy) && proxy_rank <= 0) {
    return absl::InvalidArgumentError("cache: spa needs singular proxies (model built with proxy_rank -1)");
  }
  if (spec.select == RowSelect::kSpa) {
    for (int l = std::max(spec.first_selective_layer, 0); l < NL; ++l) {
      if (!proxy_valid(l)) {
        return absl::FailedPreconditionError(
            absl::StrCat("spa step at layer ", l, " before any step stored its proxies"));
      }
    }
  }
  if (logit_local != nullptr) *logit_local = std::move(local);
  return absl::OkStatus();
}

absl::Status CheckBatchItems(std::span<const DlmBatchItem> items) {
  for (const DlmBatchItem& it : items) {
    if (it.cache == nullptr || it.spec == nullptr || (it.logits == nullptr) == (it.top1 == nullptr) ||
        (it.top1 != nullptr && it.top1_prob == nullptr)) {
      return absl::InvalidArgumentError(
          "items: each needs a cache, a spec and exactly one of logits / top1 (with top1_prob)");
    }
  }
  return absl::OkStatus();
}

void Top1FromLogits(const float* lg, int vocab, int32_t* best_out, double* prob) {
  int best = 0;
  for (int v = 1; v < vocab; ++v) {
    if (lg[v] > lg[best]) best = v;
  }
  float mx = lg[0];
  for (int v = 1; v < vocab; ++v) mx = std::max(mx, lg[v]);
  double sum = 0;
  for (int v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(lg[v]) - mx);
  *best_out = best;
  *prob = std::exp(static_cast<double>(lg[best]) - mx) / sum;
}

}  // namespace prehoc::dlm
