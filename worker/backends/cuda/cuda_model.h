// The CUDA backend: the whole Llama-family forward pass (prefill, decode, bidirectional) on one
// GPU, with the same interface and results as the CPU engine (worker/engine.h) within a
// documented bf16 tolerance (cuda_model_test.cc).
//
// Device state:
//   weights   bf16, uploaded once: per layer wqkv [(Hq + 2 Hkv) hd][D] (q, k, v rows fused),
//             wo [D][Hq hd], w_gate_up [2F][D] (gate rows, then up rows), w_down [D][F];
//             embed [V][D]; lm_head [V][D] (the embedding when tied). Norm weights and biases
//             stay f32.
//   KV cache  bf16 paged pools, per layer K and V [num_pages][Hkv][page_size][hd]
//             (worker/kernels/paged_decode.h's layout); one page id addresses the same slot in
//             every layer, so a sequence has one page table (as the CPU cache).
//   activations: residual stream f32, GEMM inputs bf16, GEMM outputs f32 (cuBLAS, bf16 x bf16
//             -> f32 with f32 accumulation).
// One forward per call, on the model's own CUDA stream:
//   embed -> per layer [RMSNorm -> QKV GEMM -> RoPE + K/V append -> attention -> O GEMM
//   accumulated into x (+ bias) -> RMSNorm -> gate/up GEMM -> SiLU * up -> down GEMM accumulated
//   into x] -> final RMSNorm of the rows whose logits are wanted -> LM head GEMM -> argmax
//   (or, for StepSample, the device draw of worker/kernels/sampling.h).
// Attention: decode steps (one new token per sequence) use the split-KV paged decode kernel when
// head_dim is 64 or 128 and page_size is 16 (dense, or token-sparse CSR lists); everything else
// (prefill chunks, mixed batches, bidirectional rows) uses the tiled tensor-core prefill kernel
// for head_dim 64 / 128 (CudaModelOptions::tiled_prefill, default on) and the simple exact paged
// prefill kernel otherwise (worker/kernels/prefill_attention.h).
//
// PrHS decode on the device: a decode item may carry its sequence's SelectionPlan (policy dense,
// prhs / prhs-budget-matched, also with a δ target, oracle, streaming, quest, h2o or hshare; the
// baselines run as per-sequence modes of the same kernels: docs/kernels.md, "PrHS decode in the
// model"). H2O also adds, after each layer's sparse attention, the kept tokens' attention
// probabilities to their accumulated scores, kept per (sequence, layer, kv head) in device slots.
// HShare calibrates at a sequence's first non-dense step: channels and exact top-k sets on the
// device, then per layer the greedy overlap (sharing) map on the host from a copy of those sets
// (one stream synchronisation per layer at that step only).
// Per layer, after Q and K are produced, the selection kernels
// (worker/kernels/selection_prhs.h) run the CIS gate, exact refresh scoring + top-k + dilation +
// δ for the rows whose gate fired, and build the CSR lists (sink ∪ selected ∪ local) that the
// token-sparse decode kernel reads — the same algorithm as the CPU PrhsSelector. The CIS state
// (anchor query, reuse count, anchor set per layer and kv head) lives on the device in a pool
// slot owned by the sequence and is freed with it. What selection did (refresh / share counts,
// kept counts, δ at refreshes) is copied back once per step (one asynchronous copy) and added to
// the item's SelectionTelemetry, as the CPU selector would have.
//
// Without a GPU (or when built without CUDA) Create returns UNAVAILABLE with a message saying
// why; callers fall back to the CPU engine.
//
// PSAW (plans with psaw_phi < 1) runs on the device: a multi-token causal item's prefill_plan
// applies the band of Engine::Step (row at position p of layer l attends to [0, sink) ∪
// [floor(f_l · (p + 1)), p]; keys outside are never read), and a prhs decode plan bounds the
// refresh candidates below by floor(f_l · t), as PrhsSelector.
//
// ETF (plans with etf_start < N) runs on the device under Engine::Step's conditions — a causal
// step whose only item prefills from position 0 with a prefill_plan (other steps ignore ETF, as
// the CPU does): layer l computes only rows [E_l, T), E_l = floor(f_l · T) rounded down to
// whole pages, non-decreasing, the last row always computed. Frozen rows are a prefix, so the
// norms, GEMMs and MLP run on the row suffix (fewer GEMM rows) and attention is a chunked-prefill
// continuation from position E_l over the cache. Before layer l's attention the sequence's pages
// [0, E_l / page_size) of layer l − 1's K/V pool are copied into layer l's (CopyPagesBf16,
// model_ops.h), so every later read — this prefill's, later chunks', decode's, selection's —
// sees exactly what the CPU reads through its alias table (chains resolve because layer l − 1
// already holds the shared values). Frozen rows' final hidden state (all_logits) is the one
// they had when frozen, as on the CPU. AliasedPages counts the copied (layer, page) slots like
// Engine::AliasedPages. Memory: the copies occupy the per-layer slots every page has anyway
// (one page id addresses all layers), so ETF saves prefill compute, not KV memory — the same
// as the CPU engine, whose aliased slots are simply unused. f_0 > 0 is refused (no earlier
// layer to share from; MakeSelectionPlan never makes it).
//
// Not supported (refused by SupportsPlan or not offered): the CPU-only CIS options gqa_max,
// gate_unrotated and follow; head_dim > 256;
// fp16 weights; more than one GPU. The PrHS items of one step must share the per-layer τ,
// max_reuse and dilation (the kernels take one value per layer for the batch; sink, local and k
// are per sequence); CudaBackend runs differing ones as separate forwards. The HShare items of
// one step must share the per-layer refresh_interval and approx_channels (INVALID_ARGUMENT
// otherwise; plans of the hshare preset with the same overrides do).
//
// Thread-safety: a CudaModel is driven by one thread at a time.
#ifndef PREHOC_WORKER_BACKENDS_CUDA_CUDA_MODEL_H_
#define PREHOC_WORKER_BACKENDS_CUDA_CUDA_MODEL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cachemgr/selection_plan.h"
#include "common/model_config.h"
#include "worker/model_weights.h"
#include "worker/sampler.h"
#include "worker/selection/selector.h"

namespace prehoc {

struct CudaModelOptions {
  // Exactly one source of weights:
  //  - `weights`: host float32 weights (converted to bf16 and uploaded), e.g. shared with a CPU
  //    Engine;
  //  - `model_dir`: a Hugging Face directory (loaded with ModelWeights::Load, then uploaded);
  //  - `random_config`: random bf16 weights generated on the device (uniform with the variance of
  //    normal(0, 0.02), norm weights 1): the cost per token of the real model, for benchmarks.
  std::shared_ptr<const ModelWeights> weights;
  std::string model_dir;
  std::optional<ModelConfig> random_config;
  uint64_t random_seed = 1;

  // Tokens per KV page. The fast decode kernel needs 16.
  int page_size = 16;
  // Device memory for the bf16 KV pools; the number of pages is derived from it. Default 1 GiB.
  int64_t kv_cache_bytes = int64_t{1} << 30;
  // Longest sequence accepted; 0 = the model's max_position_embeddings.
  int max_context = 0;
  // CUDA device ordinal.
  int device = 0;
  // Tests: use the generic paged attention kernel for decode steps too.
  bool force_generic_attention = false;
  // Prefill attention (steps that are not all single tokens) with the tiled tensor-core kernel
  // (PrefillAttentionTiled; head_dim 64 / 128; ~23x faster than the simple kernel at 16K on an
  // H100) — the default. P enters P·V as two bf16 terms, so it is as exact as the simple fp32
  // kernel (same relative RMS error vs float64; whole-model PSAW test 1.22e-2 vs 1.24e-2 for the
  // simple kernel, bound 1.5e-2): docs/kernels.md. false, other head dims and
  // force_generic_attention use the simple kernel (PrefillAttention, the reference).
  bool tiled_prefill = true;
  // GEMMs with at most 64 rows (decode steps): on first use of each shape, time cublasGemmEx's
  // default against cublasLt's heuristic candidates and keep the fastest (logged). Larger GEMMs
  // (prefill) always use cublasGemmEx's default.
  bool gemm_autotune = true;
};

// Per-layer token-sparse selection for a decode step, as device CSR lists over rows
// b * num_kv_heads + h (b = the sequence's position in the step) of logical token positions
// (worker/kernels/paged_decode.h, KvSelection::kToken). Not owned.
struct CudaKvSelection {
  // One entry per layer, or a single entry used by every layer.
  std::vector<const int32_t*> d_indptr;
  std::vector<const int32_t*> d_indices;
  // Upper bound on any list's length (sizes the split-KV grid).
  int max_list_len = 0;
};

class CudaModel {
 public:
  using SeqId = int64_t;

  // OK when the backend can run `config` with `page_size`; otherwise INVALID_ARGUMENT naming the
  // unsupported field (head_dim odd or > 256, bad head counts, page_size out of [1, 1024]).
  // Needs no device.
  static absl::Status Supports(const ModelConfig& config, int page_size);
  // OK when decode steps can run `plan` on the device exactly as the CPU engine would (its
  // PrhsSelector, OracleSelector, StreamingSelector, QuestSelector, H2OSelector or
  // HShareSelector; δ targets included), and prefills can apply it (the PSAW band and ETF).
  // Errors: INVALID_ARGUMENT naming a plan field the GPU path lacks (gqa_max, gate_unrotated,
  // follow, the CPU-only share-step options, dilate_r > 64, negative k scales, a layer count
  // that does not match, an ETF fraction outside [0, 1] or above 0 at layer 0) or a model shape the selection kernels do not take (head_dim other than
  // 64 / 128, page_size other than 16, more than 8 query heads per kv head).
  // Needs no device.
  static absl::Status SupportsPlan(const ModelConfig& config, int page_size,
                                   const SelectionPlan& plan);

  // Uploads the weights and allocates the KV pools. Errors: UNAVAILABLE when there is no usable
  // CUDA device or the binary was built without CUDA (message says which); INVALID_ARGUMENT for
  // bad options or an unsupported config (Supports); RESOURCE_EXHAUSTED when device memory is
  // too small (naming the bytes asked for and free); those of ModelWeights::Load; INTERNAL for a
  // CUDA or cuBLAS failure.
  static absl::StatusOr<std::unique_ptr<CudaModel>> Create(const CudaModelOptions& options);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const;
  int max_context() const;
  int page_size() const;
  int32_t num_pages() const;
  int32_t free_pages() const;
  // Bytes of the matrices one decode step streams (every layer's weights and the LM head).
  int64_t weight_bytes() const;
  // KV bytes per token over all layers (K and V, bf16).
  int64_t kv_bytes_per_token() const;
  // e.g. "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".
  std::string device_name() const;
  // The cudaStream_t (as void*) all of the model's work is enqueued on, for events and interop
  // (benchmarks time with events recorded on it). Owned by the model.
  void* cuda_stream() const;

  SeqId CreateSequence();
  // Ends a sequence and returns its pages and its PrHS state slot. NOT_FOUND for an unknown id.
  absl::Status FreeSequence(SeqId seq);
  // NOT_FOUND for an unknown id.
  absl::StatusOr<int> SequenceLength(SeqId seq) const;
  // Number of (layer, page) slots whose K/V are an earlier layer's (ETF), as
  // Engine::AliasedPages. NOT_FOUND for an unknown id.
  absl::StatusOr<int64_t> AliasedPages(SeqId seq) const;

  struct StepItem {
    SeqId seq = 0;
    std::span<const int32_t> tokens;  // appended to the sequence (>= 1 token)
    bool all_logits = false;          // logits for every new token instead of only the last
    // Decode-time selection for this sequence (single-token items only; see "PrHS decode" at
    // the top): the plan (not owned; must pass SupportsPlan; null = dense) and the telemetry
    // the step's selection results are added to (not owned; required with a non-dense plan).
    const SelectionPlan* plan = nullptr;
    SelectionTelemetry* telemetry = nullptr;
    // Prefill-time selection (not owned; null = dense prefill; must pass SupportsPlan): PSAW's
    // band for items of more than one token in causal steps, and ETF when the item is the
    // step's only one and starts at position 0, as Engine::StepItem::prefill_plan (see "ETF"
    // at the top).
    const SelectionPlan* prefill_plan = nullptr;
  };
  // As Engine::Step: appends every item's tokens (their K/V go to the GPU cache) and returns per
  // item the f32 logits of its last new token ([vocab]) or, with all_logits, of every new token
  // ([n, vocab] row-major); causal = false attends to the whole sequence (diffusion LMs).
  // `greedy` (optional) receives the device argmax of every returned logits row, in order.
  // `selection` (optional) applies to steps whose items are all single tokens and that run on the
  // fast decode kernel; INVALID_ARGUMENT otherwise. Items with a non-dense plan need the same
  // kind of step (INVALID_ARGUMENT otherwise: callers run prefill chunks in a separate step) and no
  // `selection`; the PrHS items of one step must agree on the per-layer CIS scalars (they do
  // when every plan passed SupportsPlan). Their telemetry is complete when Step returns. Synchronous. Errors leave every sequence
  // unchanged: INVALID_ARGUMENT (empty item, token outside [0, vocab), unknown or repeated
  // sequence, length above max_context), RESOURCE_EXHAUSTED (too few free pages); INTERNAL for a
  // CUDA failure (the model is unusable afterwards).
  absl::StatusOr<std::vector<std::vector<float>>> Step(
      std::span<const StepItem> items, bool causal = true, std::vector<int32_t>* greedy = nullptr,
      const CudaKvSelection* selection = nullptr);

  // As Step, but per item the token drawn on the device from its last new token's logits
  // instead of the logits: SampleWithUniform(row, draws[i].options, draws[i].u) semantics
  // (worker/kernels/sampling.h's SampleRows on that u; the device argmax when every draw is
  // greedy), or -1 for !draws[i].wanted (the item gets no logits row at all). Only the ids
  // come back to the host. `logits` (optional, tests) also receives Step's logits of the wanted
  // items (empty for the others). Vocabularies above kernels::kMaxSamplingVocab (2^19) are
  // sampled on the host from copied logits. Errors: ValidateDraws's, then as Step.
  absl::StatusOr<std::vector<int32_t>> StepSample(
      std::span<const StepItem> items, std::span<const TokenDraw> draws, bool causal = true,
      std::vector<std::vector<float>>* logits = nullptr);

  // A greedy decode step with the tokens on the device: sequence seqs[b] appends token
  // d_tokens[b]; d_next[b] receives the argmax of its logits. Asynchronous: returns once the work
  // is enqueued (the host may prepare the next step while the GPU runs); the lengths advance
  // immediately. Errors as Step (tokens are not range-checked on the host: an out-of-range token
  // yields NaN logits and token 0).
  absl::Status DecodeGreedyAsync(std::span<const SeqId> seqs, const int32_t* d_tokens,
                                 int32_t* d_next, const CudaKvSelection* selection = nullptr);
  // The same with PrHS / dense plans per sequence (plans[b], telemetry[b]: as StepItem's; both
  // spans empty or seqs.size() long). The selection results are copied back asynchronously and
  // added to telemetry[b] when the copy has landed: at a later call that finds it done (at most
  // a few steps behind) or at the latest at Synchronize(); telemetry[b] must stay valid until
  // then. Errors as Step.
  absl::Status DecodeGreedyAsync(std::span<const SeqId> seqs, const int32_t* d_tokens,
                                 int32_t* d_next, std::span<const SelectionPlan* const> plans,
                                 std::span<SelectionTelemetry* const> telemetry);
  // Waits for the model's stream and accounts every pending selection result. INTERNAL on a
  // device fault.
  absl::Status Synchronize();

  // Benchmarks: grows `seq` by n positions without computing them (their K/V are whatever the
  // pools hold; see FillKvRandom). INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND as Step.
  absl::Status AppendUninitialized(SeqId seq, int n);
  // Benchmarks: fills every K/V pool with uniform(-1, 1) bf16 values.
  absl::Status FillKvRandom(uint64_t seed);

  struct Impl;

 private:
  explicit CudaModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_BACKENDS_CUDA_CUDA_MODEL_H_
