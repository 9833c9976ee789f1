#include "worker/backend.h"

#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/kv_cache.h"

namespace prehoc {

absl::StatusOr<StepDemand> ValidateStepItems(
    std::span<const BackendStepItem> items, int vocab_size, int max_context, int page_size,
    const std::function<std::optional<int>(int64_t seq)>& length_of) {
  std::unordered_set<int64_t> seen;
  StepDemand d;
  for (size_t b = 0; b < items.size(); ++b) {
    const BackendStepItem& it = items[b];
    const std::optional<int> len = length_of(it.seq);
    if (!len.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat("batch item ", b, ": unknown sequence ", it.seq));
    }
    if (!seen.insert(it.seq).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch item ", b, ": sequence ", it.seq, " appears twice in one step"));
    }
    if (it.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("batch item ", b, ": no tokens"));
    }
    for (size_t i = 0; i < it.tokens.size(); ++i) {
      if (it.tokens[i] < 0 || it.tokens[i] >= vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("batch item ", b, ": token id ",
                                                       it.tokens[i], " at position ", i,
                                                       " is outside [0, ", vocab_size, ")"));
      }
    }
    const int64_t new_len = *len + static_cast<int64_t>(it.tokens.size());
    if (new_len > max_context) {
      return absl::InvalidArgumentError(absl::StrCat("batch item ", b, ": sequence length ",
                                                     new_len, " exceeds max_context ",
                                                     max_context));
    }
    d.new_pages += PagesFor(new_len, page_size) - PagesFor(*len, page_size);
    d.tokens += static_cast<int64_t>(it.tokens.size());
  }
  return d;
}

absl::StatusOr<std::vector<int32_t>> ModelBackend::StepSample(std::span<const StepItem> items,
                                                              std::span<const TokenDraw> draws,
                                                              bool causal) {
  RETURN_IF_ERROR(ValidateDraws(items.size(), draws));
  ASSIGN_OR_RETURN(std::vector<std::vector<float>> logits, Step(items, causal));
  const size_t vocab = static_cast<size_t>(config().vocab_size);
  std::vector<int32_t> out(items.size(), -1);
  for (size_t b = 0; b < items.size(); ++b) {
    if (!draws[b].wanted) continue;
    const std::span<const float> row = std::span<const float>(logits[b]).last(vocab);
    out[b] = SampleWithUniform(row, draws[b].options, draws[b].u);
  }
  return out;
}

}  // namespace prehoc
