// CudaBackend: the ModelBackend (worker/backend.h) over a CudaModel, so that the Scheduler
// (prehoc-worker, prehoc serve) and GenerateBatch (prehoc generate) run on the GPU.
//
// Sparsity: decode items whose selector runs a dense or prhs / prhs-budget-matched plan run it on
// the device (CudaModel, "PrHS decode"); what selection did lands in the selector's telemetry,
// so SequenceSelector::Report() and the δ-controller plumbing read it as on the CPU. PSAW runs
// on the device too (prefill items' prefill_plan band, and the prhs decode candidates' lower
// bound), and so does ETF (a prefill_plan with etf_start < N, applied when the prefill item is
// its forward's only item and starts at position 0 — Engine::Step's condition; a step with other
// items in the same forward prefills without it, as the CPU engine's would). What the device
// cannot run (the CPU-only plan options) is refused by SupportsPlan with the reason.
//
// Steps: the GPU runs token-sparse decode only in steps made of single-token items, so a step
// that mixes prefill chunks with PrHS decode items is run as separate forwards — the prefill
// chunks first, then the decode items, one forward per group of PrHS sequences whose per-layer
// CIS scalars agree (one group unless requests override them; dense decode items ride with the
// first group, attending to every token through complete lists). A
// split step is validated as a whole first (unknown or repeated sequence, empty item, token out
// of the vocabulary, length above max_context, too few free pages), so only a device fault
// (INTERNAL; the backend is unusable afterwards) can leave it partly applied.
//
// Thread-safety: as ModelBackend (one step thread; metadata accessors are thread-safe).
#ifndef PREHOC_WORKER_BACKENDS_CUDA_CUDA_BACKEND_H_
#define PREHOC_WORKER_BACKENDS_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/backend.h"
#include "worker/backends/cuda/cuda_model.h"
#include "worker/tokenizer.h"

namespace prehoc {

struct CudaBackendOptions {
  // Hugging Face model directory (config.json + safetensors [+ prehoc_tokenizer.json]).
  std::string model_dir;
  // Tokens per KV page (PrHS and the fast decode kernel need 16).
  int page_size = 16;
  // Device memory for the bf16 KV pools. Default 1 GiB.
  int64_t kv_cache_bytes = int64_t{1} << 30;
  // Longest sequence accepted; 0 = the model's max_position_embeddings.
  int max_context = 0;
  // CUDA device ordinal.
  int device = 0;
  // StepSample draws on the device (CudaModel::StepSample: only token ids leave the GPU; the
  // default) instead of ModelBackend's default (logits copied to the host, SampleWithUniform
  // there). H100, LLaMA-2-7B shape, batch 16, 4K: 18.0 vs 86.5 ms per step with T 0.8 / top-p
  // 0.95, 17.7 vs 21.0 ms greedy (docs/benchmarks.md, "On-device sampling in the decode step").
  bool device_sampling = true;
};

class CudaBackend : public ModelBackend {
 public:
  // Loads the model onto the GPU and its tokenizer. Errors: CudaModel::Create's (UNAVAILABLE
  // without a usable device, with the reason), the tokenizer's, INVALID_ARGUMENT for an empty
  // model_dir.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const CudaBackendOptions& options);
  // Wraps an existing model (tests, benchmarks); `tokenizer` may be null; `device_sampling` as
  // CudaBackendOptions'.
  CudaBackend(std::unique_ptr<CudaModel> model, std::unique_ptr<Tokenizer> tokenizer,
              bool device_sampling = true);

  const char* kind() const override { return "cuda"; }
  std::string description() const override { return model_->device_name(); }
  const ModelConfig& config() const override { return model_->config(); }
  const Tokenizer* tokenizer() const override { return tokenizer_.get(); }
  int max_context() const override { return model_->max_context(); }
  int page_size() const override { return model_->page_size(); }
  int32_t num_pages() const override { return model_->num_pages(); }
  int32_t used_pages() const override { return model_->num_pages() - model_->free_pages(); }
  // CudaModel::SupportsPlan.
  absl::Status SupportsPlan(const SelectionPlan& plan) const override;

  SeqId CreateSequence() override;
  absl::Status FreeSequence(SeqId seq) override;
  absl::StatusOr<int> SequenceLength(SeqId seq) const override;
  int num_sequences() const override { return static_cast<int>(live_.size()); }

  // See the file comment for how a step is split. Errors as ModelBackend::Step; an item's plan
  // that SupportsPlan refuses is INVALID_ARGUMENT / UNIMPLEMENTED naming the item.
  absl::StatusOr<std::vector<std::vector<float>>> Step(std::span<const StepItem> items,
                                                       bool causal = true) override;
  // With device_sampling, samples on the device (CudaModel::StepSample): only the token ids come
  // back; split as Step. Otherwise ModelBackend's default (host sampling of Step's logits).
  absl::StatusOr<std::vector<int32_t>> StepSample(std::span<const StepItem> items,
                                                  std::span<const TokenDraw> draws,
                                                  bool causal = true) override;
  bool samples_on_device() const override { return device_sampling_; }

  CudaModel& model() { return *model_; }

 private:
  // Checks a step that will be split into several forwards as a whole (see the file comment).
  absl::Status ValidateSplitStep(std::span<const StepItem> items) const;
  // Splits the step into its forwards (see the file comment) and runs `run_part` on each with
  // the CudaModel items and their indices in `items`, in order. Errors as Step.
  absl::Status RunParts(
      std::span<const StepItem> items,
      const std::function<absl::Status(std::span<const CudaModel::StepItem>,
                                       const std::vector<size_t>&)>& run_part);

  std::unique_ptr<CudaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unordered_set<SeqId> live_;
  const bool device_sampling_;
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_BACKENDS_CUDA_CUDA_BACKEND_H_
