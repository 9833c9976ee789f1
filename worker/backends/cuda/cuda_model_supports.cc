// CudaModel::Supports: shared by the CUDA build and the no-CUDA stub (needs no device).
#include "absl/strings/str_cat.h"
#include "worker/backends/cuda/cuda_model.h"

namespace prehoc {

absl::Status CudaModel::Supports(const ModelConfig& c, int page_size) {
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.vocab_size <= 0 ||
      c.num_hidden_layers <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model sizes must be positive (hidden_size=", c.hidden_size, ", intermediate_size=",
        c.intermediate_size, ", vocab_size=", c.vocab_size, ", num_hidden_layers=",
        c.num_hidden_layers, ")"));
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.head_dim > 256) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_dim=", c.head_dim, " is not supported by the CUDA backend (even, <= 256)"));
  }
  if (c.num_attention_heads <= 0 || c.num_attention_heads > 65535 ||
      c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_attention_heads=", c.num_attention_heads, " and num_key_value_heads=",
        c.num_key_value_heads, " are not supported (kv heads must divide heads, heads <= 65535)"));
  }
  if (page_size < 1 || page_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be in [1, 1024], got ", page_size));
  }
  return absl::OkStatus();
}

}  // namespace prehoc
