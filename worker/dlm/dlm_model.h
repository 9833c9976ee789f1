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
class DlmState {
 public:
  DlmState(const ModelConfig& config, int rows, int proxy_rank);

  int rows() const { return rows_; }
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
  bool proxy_valid(int layer) const { return proxy_valid_[layer]; }
  void set_proxy_valid(int layer) { proxy_valid_[layer] = 1; }
  bool delta_valid(int layer) const { return delta_valid_[layer]; }
  void set_delta_valid(int layer) { delta_valid_[layer] = 1; }
  int64_t bytes() const;

 private:
  int rows_, hidden_, kv_width_, proxy_rank_;
  std::vector<std::vector<float>> k_, v_, delta_, proxy_;
  std::vector<char> proxy_valid_, delta_valid_;
};

enum class RowSelect { kAll, kSpa, kDllm };

struct ForwardSpec {
  // Canvas rows carried through the layers this step: sorted, unique, within [0, rows).
  std::span<const int32_t> live;
  RowSelect select = RowSelect::kAll;
  // Layers below this compute every live row even when select != kAll (spa: 1, dllm: 0).
  int first_selective_layer = 1;
  // select != kAll: per layer, how many live rows to recompute (clamped to the live count).
  std::span<const int> update_rows;
  // kSpa: recompute K,V for every live row (true, the reference code) or only the selected rows.
  bool kv_all_rows = true;
  // kAll: compute and store the proxies of the live rows within [proxy_begin, proxy_end) at
  // layers >= 1 (so that later kSpa steps compare against them); when the state already holds
  // proxies for a layer, the drift Σ(1 − cos(new, old)) is added to the stats, and so is the
  // output drift Σ ‖δ_new − δ_old‖ / ‖x + δ_new‖ of those rows (how much reusing the previous
  // step's layer output would perturb the row).
  bool store_proxy = false;
  int proxy_begin = 0, proxy_end = 0;
  // Rows (a subset of `live`, any order) whose logits are returned, in this order.
  std::span<const int32_t> logit_rows;
};

// Accumulated over Forward calls.
struct ForwardStats {
  std::vector<int64_t> q_rows;   // per layer: rows recomputed (Q, attention, MLP)
  std::vector<int64_t> kv_rows;  // per layer: rows whose K (and V) were recomputed
  std::vector<int64_t> live_rows;  // per layer: rows carried
  int64_t lm_rows = 0;
  int64_t forwards = 0;
  // Wall time by phase: layer 0 whole (with the embedding), K/V projections (layers >= 1),
  // row selection (proxy or V and cosine; layers >= 1), selected rows (Q, attention, o_proj, MLP,
  // residual; layers >= 1), final norm + LM head.
  double seconds_layer0 = 0, seconds_kv = 0, seconds_select = 0, seconds_rows = 0, seconds_lm = 0;
  // Drift measured by store_proxy steps, per layer: proxy (1 − cos) and output (relative δ change).
  std::vector<double> drift_sum;
  std::vector<int64_t> drift_count;
  std::vector<double> out_drift_sum;
  std::vector<int64_t> out_drift_count;

  void Resize(int layers);
  void Add(const ForwardStats& other);
};

class DlmModel {
 public:
  // Loads the weights (or takes options.weights), checks Supports(), builds the singular proxies.
  // Errors: those of the loaders; INVALID_ARGUMENT naming the option or config key otherwise.
  static absl::StatusOr<std::unique_ptr<DlmModel>> Create(const DlmModelOptions& options);

  // OK when the config can run diffusion decoding here: bidirectional (is_causal false), no
  // sliding window, a mask id in [0, vocab). INVALID_ARGUMENT naming the key otherwise.
  static absl::Status Supports(const ModelConfig& config, int mask_token_id);

  const ModelConfig& config() const { return weights_->config; }
  const ModelWeights& weights() const { return *weights_; }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }  // null when none declared
  int mask_id() const { return mask_id_; }
  // First declared end-of-text id, or −1.
  int eos_id() const;
  int proxy_rank() const { return proxy_rank_; }
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

 private:
  DlmModel() = default;
  std::shared_ptr<const ModelWeights> weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<float> inv_freq_;
  int mask_id_ = -1;
  int proxy_rank_ = 0;
  std::vector<SingularProxy> proxies_;
  double proxy_seconds_ = 0;
};

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_DLM_MODEL_H_
