// The diffusion-LM forward with per-layer caches (CPU reference backend).
//
// A DlmModel holds the weights of a bidirectional Llama-family model (our HF layout with
// `is_causal: false`, or a LLaDA checkpoint), its thread pool and, per layer, the singular proxy
// of W_v (computed once at load). A DlmState holds one request's caches over a fixed canvas of
// `rows` positions; Forward() runs one denoising step over a chosen set of rows, reading every
// other row's K/V (and layer outputs) from the state, as the cache policies need:
//
//   per layer ℓ, for the live rows R (the rows whose hidden state this step carries):
//     h = RMSNorm_attn(x_R)
//     choose Q ⊆ R (rows recomputed) and KV ⊆ R (rows whose K,V are recomputed):
//       kAll:  Q = KV = R  (also below `first_selective_layer`)
//       kSpa:  proxy p_i = P_ℓ h_i; Q = the k_ℓ rows with the smallest cos(p_i, p_i^cached);
//              KV = R (kv_all_rows) or Q; every p_i^cached ← p_i
//       kDllm: v_i = W_v h_i (+b); Q = the k_ℓ rows with the smallest cos(v_i, V_i^cached);
//              V_R^cached ← v_R, K recomputed for Q only
//     K,V (RoPE on K at the row's canvas position) of KV rows → state
//     for i ∈ Q: a_i = Wo·Attn(q_i, K_all, V_all) (bidirectional: every canvas row is a key),
//                δ_i = a_i + MLP(RMSNorm_mlp(x_i + a_i)),  state.delta[ℓ][i] ← δ_i
//     x_i ← x_i + state.delta[ℓ][i]   for every i ∈ R   (cached δ for R \ Q)
//   logits = LMHead(RMSNorm_final(x)) for the requested rows only.
// With every row live and kAll this is exactly the standard bidirectional forward.
//
// Thread-safety: a DlmModel is immutable after Create and may serve several requests, but
// Forward calls are serialised on its thread pool; a DlmState belongs to one request.
#ifndef PREHOC_WORKER_DLM_DLM_MODEL_H_
#define PREHOC_WORKER_DLM_DLM_MODEL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/thread_pool.h"
#include "worker/dlm/dlm_backend.h"
#include "worker/dlm/singular_proxy.h"
#include "worker/model_weights.h"
#include "worker/tokenizer.h"

namespace prehoc::dlm {

struct DlmModelOptions {
  // Hugging Face directory: our Llama layout (config.json with is_causal false) or a LLaDA
  // checkpoint (model_type "llada"; see llada_checkpoint.h). Ignored when `weights` is set.
  std::string model_dir;
  // Pre-built weights (tests, --random-weights benchmarks); take precedence over model_dir.
  std::shared_ptr<const ModelWeights> weights;
  // CPU threads; 0 = all hardware threads.
  int num_threads = 0;
  // Rank r of the SPA singular proxies. 0 = default: max(16, kv_width / 32) clamped to
  // min(kv_width, hidden) (kv_width = kv_heads · head_dim; chosen and measured in docs/dlm.md);
  // > 0 = that rank; −1 = no proxies (the spa policies are then refused).
  int proxy_rank = 0;
  // Mask token id; −1 = the config's mask_token_id (required then).
  int mask_token_id = -1;
  SvdOptions svd;
};

// One request's caches over a canvas of `rows` positions (row = canvas position).
class DlmState : public DlmCache {
 public:
  DlmState(const ModelConfig& config, int rows, int proxy_rank);

  int rows() const override { return rows_; }
  int num_layers() const { return static_cast<int>(k_.size()); }
  // Post-RoPE keys / values of `row` at `layer`: [kv_heads, head_dim].
  float* K(int layer, int row) { return k_[layer].data() + static_cast<size_t>(row) * kv_width_; }
  float* V(int layer, int row) { return v_[layer].data() + static_cast<size_t>(row) * kv_width_; }
  // The layer's residual update of `row` (attention + MLP output): [hidden].
  float* Delta(int layer, int row) {
    return delta_[layer].data() + static_cast<size_t>(row) * hidden_;
  }
  // The row's singular proxy at `layer` as of its last computation: [proxy_rank].
  float* Proxy(int layer, int row) {
    return proxy_[layer].data() + static_cast<size_t>(row) * proxy_rank_;
  }
  bool proxy_valid(int layer) const override { return proxy_valid_[layer]; }
  void set_proxy_valid(int layer) { proxy_valid_[layer] = 1; }
  bool delta_valid(int layer) const { return delta_valid_[layer]; }
  void set_delta_valid(int layer) { delta_valid_[layer] = 1; }
  int64_t bytes() const;

 private:
  int rows_, hidden_, kv_width_, proxy_rank_;
  std::vector<std::vector<float>> k_, v_, delta_, proxy_;
  std::vector<char> proxy_valid_, delta_valid_;
};

class DlmModel : public DlmBackend {
 public:
  // Loads the weights (or takes options.weights), checks Supports(), builds the singular proxies.
  // Errors: those of the loaders; INVALID_ARGUMENT naming the option or config key otherwise.
  static absl::StatusOr<std::unique_ptr<DlmModel>> Create(const DlmModelOptions& options);

  // OK when the config can run diffusion decoding here: bidirectional (is_causal false), no
  // sliding window, a mask id in [0, vocab). INVALID_ARGUMENT naming the key otherwise.
  static absl::Status Supports(const ModelConfig& config, int mask_token_id);

  const ModelConfig& config() const override { return weights_->config; }
  const ModelWeights& weights() const { return *weights_; }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }  // null when none declared
  int mask_id() const override { return mask_id_; }
  // The config's eos_token_ids (config.json, then generation_config.json); when it has none,
  // the tokenizer's end-of-text id; else empty.
  std::span<const int> eos_ids() const override { return eos_ids_; }
  int proxy_rank() const override { return proxy_rank_; }
  std::string backend_name() const override { return "cpu"; }
  const SingularProxy& proxy(int layer) const { return proxies_[layer]; }
  double proxy_build_seconds() const { return proxy_seconds_; }
  int num_threads() const { return pool_->num_threads(); }
  ThreadPool* pool() const { return pool_.get(); }

  // Runs one step (see the file comment) and appends to *stats (may be null). On success
  // *logits holds [logit_rows.size(), vocab] row-major. INVALID_ARGUMENT for a canvas whose
  // length differs from state->rows(), a token outside [0, vocab), unsorted or out-of-range live
  // rows, a logit row that is not live, update_rows shorter than the layer count for a selective
  // step, or a kSpa / store_proxy step on a model without proxies.
  absl::Status Forward(DlmState* state, std::span<const int32_t> canvas, const ForwardSpec& spec,
                       std::vector<float>* logits, ForwardStats* stats) const;

  // DlmBackend: a DlmState; Forward for each item in turn (top1 from the logits by
  // Top1FromLogits). REQUIRES: the items' caches were made by NewCache of this model.
  absl::StatusOr<std::unique_ptr<DlmCache>> NewCache(int rows) const override;
  absl::Status ForwardBatch(std::span<const DlmBatchItem> items,
                            ForwardStats* batch_stats) const override;

 private:
  DlmModel() = default;
  std::shared_ptr<const ModelWeights> weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<float> inv_freq_;
  int mask_id_ = -1;
  std::vector<int> eos_ids_;
  int proxy_rank_ = 0;
  std::vector<SingularProxy> proxies_;
  double proxy_seconds_ = 0;
};

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_DLM_MODEL_H_
