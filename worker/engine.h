// The inference engine core: model weights, the paged KV cache, the sequences living in it and
// the forward pass over a batch of sequences (prefill chunks and decode tokens mixed freely).
//
// Thread-safety: an Engine is driven by one thread at a time (the step loop); it is not
// internally synchronised except for the page allocator. Kernels use the engine's thread pool.
#ifndef PREHOC_WORKER_ENGINE_H_
#define PREHOC_WORKER_ENGINE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "common/thread_pool.h"
#include "worker/backend.h"
#include "worker/kv_cache.h"
#include "worker/model_weights.h"
#include "worker/selection/selector.h"
#include "worker/tokenizer.h"

namespace prehoc {

struct EngineOptions {
  // Hugging Face model directory (config.json + safetensors). Ignored when `weights` is set.
  std::string model_dir;
  // Pre-built weights (e.g. ModelWeights::Random for benchmarks); takes precedence.
  std::shared_ptr<const ModelWeights> weights;
  // Worker threads for CPU kernels; 0 = all hardware threads.
  int num_threads = 0;
  // Tokens per KV page.
  int page_size = 16;
  // Memory for the KV cache; the number of pages is derived from it. Default 1 GiB.
  int64_t kv_cache_bytes = int64_t{1} << 30;
  // Longest sequence accepted; 0 = the model's max_position_embeddings.
  int max_context = 0;
};

class Engine : public ModelBackend {
 public:
  using SeqId = ModelBackend::SeqId;
  using StepItem = ModelBackend::StepItem;

  // Loads the model (or takes `options.weights`) and sizes the KV cache. Errors: those of
  // ModelWeights::Load and the tokenizer; INVALID_ARGUMENT for bad options (naming the option).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);

  // ModelBackend metadata.
  const char* kind() const override { return "cpu"; }
  std::string description() const override;
  const ModelConfig& config() const override { return weights_->config; }
  // Null when the model directory declares no tokenizer (prompts must then be token ids).
  const Tokenizer* tokenizer() const override { return tokenizer_.get(); }
  int max_context() const override { return max_context_; }
  int page_size() const override { return cache_.shape().page_size; }
  int32_t num_pages() const override { return allocator_.num_pages(); }
  int32_t used_pages() const override { return allocator_.num_used(); }
  // The CPU engine runs every policy and prefill plan: always OK.
  absl::Status SupportsPlan(const SelectionPlan& plan) const override { return absl::OkStatus(); }

  const ModelWeights& weights() const { return *weights_; }
  const PageAllocator& pages() const { return allocator_; }
  const KvCache& kv_cache() const { return cache_; }
  int num_threads() const { return pool_.num_threads(); }

  // Starts an empty sequence.
  SeqId CreateSequence() override;
  // Ends a sequence and returns its pages. NOT_FOUND for an unknown id.
  absl::Status FreeSequence(SeqId seq) override;
  // Current length in tokens; NOT_FOUND for an unknown id.
  absl::StatusOr<int> SequenceLength(SeqId seq) const override;
  // The sequence's page table (for tests and selection). NOT_FOUND for an unknown id.
  absl::StatusOr<std::vector<int32_t>> PageTable(SeqId seq) const;
  // Number of (layer, page) slots that alias another layer's K/V (ETF), for tests and reports.
  absl::StatusOr<int64_t> AliasedPages(SeqId seq) const;
  int num_sequences() const override { return static_cast<int>(seqs_.size()); }

  // Items: see BackendStepItem (worker/backend.h). For multi-token items `prefill_plan` applies
  // PSAW's band (row at position p of layer ℓ attends to [0, sink) ∪ [P_ℓ(p+1), p]); and, when
  // the item is the batch's only item and prefills a whole prompt from position 0, ETF: layer ℓ
  // freezes the first E_ℓ(T) tokens (rounded down to whole pages) — their rows skip QKV,
  // attention and MLP there and deeper, and their K/V pages alias the last layer that computed
  // them (a per-layer alias table beside the page table).
  // Runs one forward over the batch: appends every item's tokens to its sequence (their K/V go to
  // the cache) and returns per item the logits of its last new token ([vocab]) or, with
  // all_logits, of every new token ([n, vocab] row-major). With causal = false every new token
  // attends to the whole sequence including later tokens (bidirectional, for diffusion LMs).
  // Errors leave every sequence unchanged: INVALID_ARGUMENT for an empty item, a token id out of
  // [0, vocab) (naming item and position), a duplicate or unknown sequence, or a length above
  // max_context; RESOURCE_EXHAUSTED when the KV cache has too few free pages.
  absl::StatusOr<std::vector<std::vector<float>>> Step(std::span<const StepItem> items,
                                                       bool causal = true) override;

  // Starts a new sequence holding a copy of `seq`'s tokens and K/V (fresh pages), e.g. to try
  // several policies after one prefill. NOT_FOUND / RESOURCE_EXHAUSTED.
  absl::StatusOr<SeqId> ForkSequence(SeqId seq);

  // Convenience: runs `tokens` through a temporary sequence and returns logits for every
  // position ([n, vocab]); causal = false is the diffusion-LM full-sequence forward.
  absl::StatusOr<std::vector<float>> ForwardFull(std::span<const int32_t> tokens, bool causal);

 private:
  struct Sequence {
    int length = 0;
    std::vector<int32_t> page_table;
    // ETF aliases: alias[layer][page] = layer whose K/V the page uses (−1 = own). Empty = none.
    std::vector<std::vector<int16_t>> alias;
    std::span<const int16_t> Alias(int layer) const {
      return alias.empty() ? std::span<const int16_t>() : std::span<const int16_t>(alias[layer]);
    }
  };
  Engine(std::shared_ptr<const ModelWeights> weights, std::unique_ptr<Tokenizer> tokenizer,
         const EngineOptions& options, int32_t num_pages);

  std::shared_ptr<const ModelWeights> weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ThreadPool pool_;
  const int max_context_;
  PageAllocator allocator_;
  KvCache cache_;
  std::vector<float> inv_freq_;
  std::unordered_map<SeqId, Sequence> seqs_;
  SeqId next_seq_ = 1;
};

// Bytes one KV page takes over all layers (K and V, float32).
int64_t KvPageBytes(const ModelConfig& config, int page_size);

}  // namespace prehoc

#endif  // PREHOC_WORKER_ENGINE_H_
