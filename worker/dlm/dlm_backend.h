// The interface every diffusion-LM forward backend implements (CPU reference: DlmModel in
// dlm_model.h; CUDA: CudaDlmModel in cuda_forward.h), so that the decoding loop (decoder.h) runs
// unchanged on either. The step contract — which rows are carried, recomputed and read from the
// per-layer caches — is ForwardSpec below and the file comment of dlm_model.h.
//
// A backend owns the weights; a DlmCache (made by the backend) holds one request's per-layer
// caches over a canvas of rows(): post-RoPE K and V of every row, each layer's residual update δ
// of every row, and the response rows' singular proxies. ForwardBatch runs one step for several
// requests at once (each with its own cache, canvas and spec), which is how a GPU batches DLM
// requests.
#ifndef PREHOC_WORKER_DLM_DLM_BACKEND_H_
#define PREHOC_WORKER_DLM_DLM_BACKEND_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_config.h"

namespace prehoc::dlm {

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
  // Part of seconds_rows: the attention itself (scores, softmax, weighted sum; layers >= 1).
  double seconds_attn = 0;
  // Drift measured by store_proxy steps, per layer: proxy (1 − cos) and output (relative δ change).
  std::vector<double> drift_sum;
  std::vector<int64_t> drift_count;
  std::vector<double> out_drift_sum;
  std::vector<int64_t> out_drift_count;

  void Resize(int layers);
  void Add(const ForwardStats& other);
  // Add() split in two: the row counts, `forwards` and drift; the phase times.
  void AddCounts(const ForwardStats& other);
  void AddTimes(const ForwardStats& other);
};

// One request's per-layer caches; concrete type is the backend's (a cache is only valid with the
// backend that made it). Not thread-safe: belongs to one request.
class DlmCache {
 public:
  virtual ~DlmCache() = default;
  virtual int rows() const = 0;
  // Whether layer `layer`'s proxies were stored by some step (a kSpa step needs them).
  virtual bool proxy_valid(int layer) const = 0;
};

// One request's part of a batched step. Exactly one of `logits` or `top1` must be set.
struct DlmBatchItem {
  DlmCache* cache = nullptr;
  std::span<const int32_t> canvas;
  const ForwardSpec* spec = nullptr;
  // [logit_rows.size(), vocab] row-major.
  std::vector<float>* logits = nullptr;
  // Per logit row: the first index of the maximum logit (NaN never wins) and its softmax
  // probability. `top1_prob` must be set with `top1`.
  std::vector<int32_t>* top1 = nullptr;
  std::vector<double>* top1_prob = nullptr;
  // Row counts (q_rows, kv_rows, live_rows, lm_rows, forwards) are added here (may be null).
  ForwardStats* stats = nullptr;
};

class DlmBackend {
 public:
  virtual ~DlmBackend() = default;
  virtual const ModelConfig& config() const = 0;
  virtual int mask_id() const = 0;
  // The declared end-of-text ids, in order; any of them ends a response (decoder.h,
  // stop_at_eos). Empty when the model declares none.
  virtual std::span<const int> eos_ids() const = 0;
  // Rank of the singular proxies (0: none; the spa policies are then refused).
  virtual int proxy_rank() const = 0;
  // "cpu" or "cuda (<device>)".
  virtual std::string backend_name() const = 0;
  // Caches for a canvas of `rows` positions. INVALID_ARGUMENT for rows <= 0; RESOURCE_EXHAUSTED
  // when the backend's memory is too small.
  virtual absl::StatusOr<std::unique_ptr<DlmCache>> NewCache(int rows) const = 0;
  // Runs one step (dlm_model.h's contract) for every item; the phase times of the whole batched
  // step are added to *batch_stats (may be null). Errors: those of ValidateForward for any item
  // (nothing runs then), INTERNAL for a device fault. Calls are serialised by the backend.
  virtual absl::Status ForwardBatch(std::span<const DlmBatchItem> items,
                                    ForwardStats* batch_stats) const = 0;
};

// Whether `token` is one of `eos_ids` (DlmBackend::eos_ids()).
inline bool IsEos(std::span<const int> eos_ids, int32_t token) {
  return std::find(eos_ids.begin(), eos_ids.end(), token) != eos_ids.end();
}

// The checks every backend applies to one step (see DlmModel::Forward for the errors). On success
// *logit_local (may be null) holds, per logit row, its index within spec.live.
absl::Status ValidateForward(const ModelConfig& config, int proxy_rank, int rows,
                             std::span<const int32_t> canvas, const ForwardSpec& spec,
                             const std::function<bool(int)>& proxy_valid,
                             std::vector<int>* logit_local);

// INVALID_ARGUMENT naming `items` unless every item has a cache, a spec and exactly one of
// logits / top1 (top1 with top1_prob).
absl::Status CheckBatchItems(std::span<const DlmBatchItem> items);

// The CPU rule for one logits row: *best = the first index of the maximum (NaN never wins),
// *prob = exp(l[best] − max) / Σ exp(l − max) in double.
void Top1FromLogits(const float* logits, int vocab, int32_t* best, double* prob);

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_DLM_BACKEND_H_
