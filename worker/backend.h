// The model backend interface: what the continuous-batching Scheduler and GenerateBatch need
// from a model that holds a paged KV cache — metadata (config, tokenizer, limits, page
// accounting), sequence lifetime, and one forward step over a batch of prefill chunks and
// decode tokens with the sequences' sparsity plans. Implemented by the CPU Engine
// (worker/engine.h, the reference) and by CudaBackend (worker/backends/cuda/cuda_backend.h).
//
// Thread-safety: a backend is driven by one thread at a time (the step loop). The metadata
// accessors marked "thread-safe" may be called concurrently with the step thread.
#ifndef PREHOC_WORKER_BACKEND_H_
#define PREHOC_WORKER_BACKEND_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cachemgr/selection_plan.h"
#include "common/model_config.h"
#include "worker/sampler.h"
#include "worker/selection/selector.h"
#include "worker/tokenizer.h"

namespace prehoc {

// One sequence's share of a step.
struct BackendStepItem {
  int64_t seq = 0;
  std::span<const int32_t> tokens;  // appended to the sequence (>= 1 token)
  bool all_logits = false;          // logits for every new token instead of only the last
  // Decode-time KV selection for this sequence (not owned); null = dense. Applied to
  // single-token items (decode steps); prefill chunks attend densely. The CPU engine calls the
  // selector per layer; the CUDA backend runs the selector's plan on the device and writes what
  // it did into selector->mutable_telemetry() (the selector's own Select is not called).
  SequenceSelector* selector = nullptr;
  // Prefill-time selection (not owned; null = dense prefill): PSAW's band and ETF, see
  // Engine::StepItem. Backends that cannot apply a plan refuse it in SupportsPlan.
  const SelectionPlan* prefill_plan = nullptr;
};

class ModelBackend {
 public:
  using SeqId = int64_t;
  using StepItem = BackendStepItem;

  virtual ~ModelBackend() = default;

  // "cpu" or "cuda". Thread-safe.
  virtual const char* kind() const = 0;
  // Human-readable placement for logs, e.g. "CPU, 16 threads" or "NVIDIA H100 ... (sm_90)".
  // Thread-safe.
  virtual std::string description() const = 0;
  // Thread-safe (immutable after creation).
  virtual const ModelConfig& config() const = 0;
  // Null when the model directory declares no tokenizer (prompts must then be token ids).
  // Thread-safe.
  virtual const Tokenizer* tokenizer() const = 0;
  // Longest sequence accepted. Thread-safe.
  virtual int max_context() const = 0;
  // Tokens per KV page, total pages and pages in use. Thread-safe.
  virtual int page_size() const = 0;
  virtual int32_t num_pages() const = 0;
  virtual int32_t used_pages() const = 0;

  // OK when decode steps (and, for prefill_plan, prefills) can run `plan` exactly as the CPU
  // reference would; otherwise INVALID_ARGUMENT (a plan field the backend lacks, naming it) or
  // UNIMPLEMENTED (a policy this backend does not run, naming the policy and the backend).
  // Called when a request is validated, so a step never meets an unsupported plan. Thread-safe.
  virtual absl::Status SupportsPlan(const SelectionPlan& plan) const = 0;

  // Starts an empty sequence.
  virtual SeqId CreateSequence() = 0;
  // Ends a sequence, returns its pages and any per-sequence selection state. NOT_FOUND for an
  // unknown id.
  virtual absl::Status FreeSequence(SeqId seq) = 0;
  // Current length in tokens; NOT_FOUND for an unknown id.
  virtual absl::StatusOr<int> SequenceLength(SeqId seq) const = 0;
  virtual int num_sequences() const = 0;

  // Runs one forward over the batch: appends every item's tokens to its sequence and returns
  // per item the logits of its last new token ([vocab]) or, with all_logits, of every new token
  // ([n, vocab] row-major). causal = false: bidirectional attention (diffusion LMs). Errors
  // leave every sequence unchanged: INVALID_ARGUMENT for an empty item, a token out of
  // [0, vocab) (naming item and position), a duplicate or unknown sequence, a length above
  // max_context, or a plan SupportsPlan refuses; RESOURCE_EXHAUSTED when the KV cache has too
  // few free pages; INTERNAL for a device fault.
  virtual absl::StatusOr<std::vector<std::vector<float>>> Step(std::span<const StepItem> items,
                                                               bool causal = true) = 0;

  // Runs the same forward as Step and returns per item the token drawn from its last new
  // token's logits: SampleWithUniform(logits, draws[i].options, draws[i].u) (worker/sampler.h),
  // or -1 where !draws[i].wanted. One draw per item (INVALID_ARGUMENT naming the item for a
  // count mismatch or a draw TokenDraw::Validate refuses); other errors as Step.
  // This default runs Step and samples on the host — the CPU engine's path. The CUDA backend
  // (with CudaBackendOptions::device_sampling) overrides it to sample on the device, so that
  // only the token ids leave the GPU instead of vocab floats per item (greedy: the device argmax; otherwise the kernel of
  // worker/kernels/sampling.h on the same u, whose fixed-point masses can differ from the host's
  // f64 sums only when u · mass or top_p · mass falls within ~vocab · 2^-44 of a token boundary).
  virtual absl::StatusOr<std::vector<int32_t>> StepSample(std::span<const StepItem> items,
                                                          std::span<const TokenDraw> draws,
                                                          bool causal = true);
  // Whether StepSample draws on the device (true for the CUDA backend). Thread-safe.
  virtual bool samples_on_device() const { return false; }
};


// What a valid step asks of the KV cache.
struct StepDemand {
  int64_t new_pages = 0;  // Σ PagesFor(new length) − PagesFor(length)
  int64_t tokens = 0;     // new tokens in all
};

// Checks `items` as ModelBackend::Step promises, every error INVALID_ARGUMENT naming the batch
// item: a known sequence (`length_of` returns its length, nullopt when unknown), not repeated in
// the step, at least one token, token ids in [0, vocab_size), new length <= max_context.
// Returns what the step needs.
absl::StatusOr<StepDemand> ValidateStepItems(
    std::span<const BackendStepItem> items, int vocab_size, int max_context, int page_size,
    const std::function<std::optional<int>(int64_t seq)>& length_of);

}  // namespace prehoc

#endif  // PREHOC_WORKER_BACKEND_H_
