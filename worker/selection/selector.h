// Decode-time KV selection: for each decode step and layer, which cached tokens each kv head
// attends to. One SequenceSelector per sequence holds the policy's state (CIS anchors, H2O
// accumulated scores, Quest page bounds, ...). The engine calls Select() after writing the
// current token's K/V and before attention, then Observe() with the probabilities attention gave
// the chosen tokens (H2O needs them).
//
// Index lists are sorted, unique token positions in [0, t) where t = kv.length() includes the
// current token. GQA: one list per kv head, shared by the group's query heads.
#ifndef PREHOC_WORKER_SELECTION_SELECTOR_H_
#define PREHOC_WORKER_SELECTION_SELECTOR_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "cachemgr/selection_plan.h"
#include "common/model_config.h"
#include "worker/kv_cache.h"
#include "worker/sparsity.h"

namespace prehoc {

// Read access to one sequence's cached K/V at one layer. `alias` (optional, one entry per page)
// redirects a page to another layer's pool: ETF's cross-layer KV sharing (−1 = this layer).
class KvView {
 public:
  KvView(const KvCache* cache, std::span<const int32_t> page_table, int layer, int length,
         std::span<const int16_t> alias = {})
      : cache_(cache), pages_(page_table), alias_(alias), layer_(layer), length_(length),
        page_size_(cache->shape().page_size) {}
  int length() const { return length_; }
  int page_size() const { return page_size_; }
  const float* key(int kv_head, int t) const {
    const int p = t / page_size_;
    return cache_->K(LayerOf(p), pages_[p], kv_head) +
           static_cast<size_t>(t % page_size_) * cache_->shape().head_dim;
  }
  const float* value(int kv_head, int t) const {
    const int p = t / page_size_;
    return cache_->V(LayerOf(p), pages_[p], kv_head) +
           static_cast<size_t>(t % page_size_) * cache_->shape().head_dim;
  }

 private:
  int LayerOf(int page) const {
    return (static_cast<size_t>(page) < alias_.size() && alias_[page] >= 0) ? alias_[page] : layer_;
  }
  const KvCache* cache_;
  std::span<const int32_t> pages_;
  std::span<const int16_t> alias_;
  int layer_;
  int length_;
  int page_size_;
};

// What selection did, accumulated over a sequence's decode steps.
struct SelectionTelemetry {
  int64_t selections = 0;     // (step, layer, kv head) triples selected for
  int64_t refreshes = 0;      // exact re-selections (retrievals)
  int64_t shares = 0;         // reuses of an earlier index set without scoring
  double kept_fraction_sum = 0;  // Σ |S| / t over selections
  int64_t kept_tokens_sum = 0;   // Σ |S|
  // Work of selection itself, in keys whose exact score it computed beyond the kept set's (which
  // the sparse attention computes anyway): t per refresh, the scanned keys per share step of
  // PrHS's incremental scan, t per step of a gate that reads every key. Σ t over selections is
  // the per-step-selection reference, so scored / context is an equivalent refresh rate.
  int64_t scored_keys_sum = 0;
  int64_t context_keys_sum = 0;  // Σ t
  std::vector<int64_t> refreshes_per_layer;
  std::vector<int64_t> shares_per_layer;
  std::vector<int64_t> refreshes_per_unit;  // per (layer, kv head): layer · kv_heads + kv head
  // Exact dropped mass of the index set in use until each refresh (mean over the group's query
  // heads), with the layer it was measured at: the telemetry the δ-controller consumes.
  std::vector<float> refresh_delta;
  std::vector<int16_t> refresh_delta_layer;
  std::vector<int16_t> refresh_delta_head;  // kv head of each refresh_delta sample
  // Exact dropped mass of every selection, when measured (eval mode; costs a dense pass), the
  // (layer, kv head) unit of each sample (layer · kv_heads + kv head), and the relative error of
  // the attention output over the chosen list against dense attention, ‖o_S − o‖ / ‖o‖ (mean
  // over the group's query heads): how much of what the layer reads the selection changed.
  std::vector<float> step_delta;
  std::vector<int16_t> step_delta_unit;
  std::vector<float> step_output_error;
  std::vector<char> step_refreshed;  // 1 where the unit refreshed at that selection
};

class SequenceSelector {
 public:
  virtual ~SequenceSelector() = default;

  // Chooses index lists for `layer`. q: [num_heads, head_dim] of the current token (post-RoPE).
  // out is resized to num_kv_heads lists.
  virtual void Select(int layer, const float* q, const KvView& kv,
                      std::vector<std::vector<int32_t>>* out) = 0;
  // Attention probabilities of query head `head` over out[head / group] (same order).
  virtual void Observe(int layer, int head, std::span<const int32_t> indices,
                       std::span<const float> probs) {}
  // Whether the engine should call Observe (costs a copy per head).
  virtual bool wants_observe() const { return false; }
  // Whether attention is dense (the engine then skips selection entirely).
  virtual bool is_dense() const { return false; }

  const SelectionTelemetry& telemetry() const { return telemetry_; }
  SelectionTelemetry* mutable_telemetry() { return &telemetry_; }
  // Replaces the plan (a newer version from the cache manager / δ-controller); state such as
  // CIS anchors is kept. REQUIRES: same policy and layer count.
  void UpdatePlan(const SelectionPlan& plan) { plan_ = plan; }
  const SelectionPlan& plan() const { return plan_; }

  // Summary for the request's final message.
  SparsityReport Report() const;

  // Select() and, when measuring, the exact dropped mass of every chosen list (one dense pass per
  // kv head, appended to telemetry().step_delta). The engine calls this.
  void SelectAndMeasure(int layer, const float* q, const KvView& kv,
                        std::vector<std::vector<int32_t>>* out);
  void set_measure_step_delta(bool on) { measure_step_delta_ = on; }

 protected:
  SequenceSelector(const ModelConfig& model, const SelectionPlan& plan);
  // Records one selection of `kept` tokens out of t (and exact δ if measured).
  void Account(int64_t kept, int64_t t);

  const ModelConfig model_;
  SelectionPlan plan_;
  SelectionTelemetry telemetry_;
  bool measure_step_delta_ = false;
  std::vector<float> measure_probs_;  // scratch
};

// Builds the selector for plan.policy. INVALID_ARGUMENT when the plan does not fit the model
// (layer count).
absl::StatusOr<std::unique_ptr<SequenceSelector>> CreateSelector(const ModelConfig& model,
                                                                 const SelectionPlan& plan);

// ---- Helpers shared by policies and tests (exposed for testing).

// Per-kv-head probabilities over all t keys, reduced over the group's query heads:
// p[j] = mean_{h in group} softmax_j(scale · q_h · K_j)  (or max_h with use_max).
// `probs` is resized to t. The mean is what the group's average dropped mass δ measures.
void GroupProbabilities(const float* q, const KvView& kv, int kv_head, int group, int head_dim,
                        std::vector<float>* probs, bool use_max = false);

// Dropped mass of a sorted index list under `probs`: 1 − Σ_{i∈S} probs[i], clamped to [0, 1].
double DroppedMass(std::span<const float> probs, std::span<const int32_t> indices);

// Relative error of attention over `list` against dense attention, ‖o_S − o‖ / ‖o‖, averaged
// over the kv head's group of query heads (o_S: the same softmax weights renormalised over the
// sorted list). One dense pass (K and V of all t keys). With group_probs, also returns the
// group-mean probabilities GroupProbabilities would.
double AttentionOutputError(const float* q, const KvView& kv, int kv_head, int group,
                            int head_dim, std::span<const int32_t> list,
                            std::vector<float>* group_probs = nullptr);

// Indices of the k largest values of `scores` among positions [lo, hi) (ties: lower index),
// returned in descending score order. k is clamped to hi − lo.
std::vector<int32_t> TopKIndices(std::span<const float> scores, int64_t lo, int64_t hi, int64_t k);

// Sorted union of [0, sink) ∪ middle ∪ [t − local, t), clamped to [0, t).
std::vector<int32_t> MergeIndexSet(int64_t sink, std::span<const int32_t> middle, int64_t local,
                                   int64_t t);

}  // namespace prehoc

#endif  // PREHOC_WORKER_SELECTION_SELECTOR_H_
