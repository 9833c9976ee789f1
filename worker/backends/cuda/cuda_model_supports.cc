// CudaModel::Supports and SupportsPlan: shared by the CUDA build and the no-CUDA stub (need no
// device).
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

absl::Status CudaModel::SupportsPlan(const ModelConfig& c, int page_size,
                                     const SelectionPlan& plan) {
  // Every policy runs on the device (dense, prhs, prhs-budget-matched, oracle, streaming, quest,
  // h2o, hshare); what is refused is a plan field or a model shape.
  if (plan.layers.size() != static_cast<size_t>(c.num_hidden_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("sparsity: plan has ", plan.layers.size(),
                                                   " layers, the model ", c.num_hidden_layers));
  }
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    const LayerSelectionPlan& lp = plan.layers[l];
    const char* field = nullptr;
    // PSAW runs on the device (prefill band: prefill_attention.h; decode: the candidates' lower
    // bound of the PrHS refresh), for drop fractions in [0, 1) as MakeSelectionPlan makes them.
    if (!(lp.psaw_drop_fraction >= 0 && lp.psaw_drop_fraction < 1)) {
      field = "PSAW drop fraction outside [0, 1)";
    }
    // ETF runs on the device (CudaModel::Step: the frozen prefix's K/V pages copied from the
    // previous layer), for fractions in [0, 1] as MakeSelectionPlan makes them (0 at layer 0:
    // rows frozen there would have no layer to take K/V from — the CPU engine would read slots
    // nothing wrote).
    if (!(lp.etf_freeze_fraction >= 0 && lp.etf_freeze_fraction <= 1)) {
      field = "ETF freeze fraction outside [0, 1]";
    }
    if (l == 0 && lp.etf_freeze_fraction > 0) {
      field = "ETF freezing at layer 0 (no earlier layer's K/V to share)";
    }
    if (lp.gqa_max) field = "gqa_max=1";
    if (lp.gate_unrotated) field = "gate_unrotated=1";
    if (lp.follow) field = "follow=1";
    if (lp.scan_slices > 0) field = "scan_slices (incremental scan)";
    if (lp.scan_reserve > 0) field = "scan_reserve (incremental scan)";
    if (lp.gate_delta > 0) field = "gate_delta (δ-estimate gate)";
    if (lp.gate_exact_delta > 0) field = "gate_exact_delta (diagnostic exact-δ gate)";
    if (lp.gate_lse > 0) field = "gate_lse (kept log-sum-exp gate)";
    if (lp.keep_trail) field = "keep_trail=1";
    if (lp.gate_error > 0) field = "gate_error (output-error gate)";
    if (lp.gate_exact_error > 0) field = "gate_exact_error (diagnostic exact output-error gate)";
    if (field != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparsity.overrides: ", field, " (layer ", l,
          ") is not supported by the CUDA backend; use --device=cpu for it"));
    }
  }
  if (plan.policy == SelectionPolicy::kDense) return absl::OkStatus();
  // δ targets run: the controller's per-kv-head k scales (head_k_scale) and layer k_scale become
  // per-(sequence, layer, kv head) k in the selection kernels; its per-layer τ splits a batch
  // whose plans disagree into separate forwards (CudaBackend).
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    const LayerSelectionPlan& lp = plan.layers[l];
    bool bad_scale = !(lp.k_scale >= 0);
    for (double s : lp.head_k_scale) bad_scale |= !(s >= 0);
    if (plan.policy == SelectionPolicy::kPrhs && lp.dilate_r > 64) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparsity: layer ", l, " has dilate_r=", lp.dilate_r,
          "; the CUDA backend needs dilate_r <= 64"));
    }
    if (bad_scale) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsity: layer ", l, " has a negative or NaN k scale"));
    }
  }
  if (page_size != 16 || (c.head_dim != 64 && c.head_dim != 128)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparsity.policy: ", plan.policy_name,
        " on the CUDA backend needs head_dim 64 or 128 and page_size 16 (model has head_dim ",
        c.head_dim, ", page_size ", page_size, ")"));
  }
  if (c.num_attention_heads / c.num_key_value_heads > 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparsity.policy: ", plan.policy_name,
        " on the CUDA backend needs at most 8 query heads per kv head (model has ",
        c.num_attention_heads / c.num_key_value_heads, ")"));
  }
  return absl::OkStatus();
}

}  // namespace prehoc
