// The diffusion-LM forward with per-layer caches on one GPU: the same contract as the CPU
// reference (DlmModel, dlm_model.h), behind the same DlmBackend interface, so the decoding loop
// (decoder.h) runs unchanged on it for every cache policy, and batches of requests
// (DiffuseBatchWithSchedule) run as one forward per step.
//
// Device state:
//   weights  bf16, uploaded once from a DlmModel (its float32 weights and singular proxies) or
//            generated on the device (benchmarks): per layer wqkv [(Hq + 2 Hkv) hd][D] (q, k, v
//            rows fused), wo [D][Hq hd], w_gate_up [2F][D], w_down [D][F], proxy [r][D]; embed
//            and lm_head [V][D]. Norm weights and biases f32.
//   caches   per request (CudaDlmCache), one allocation: K and V bf16 [layers][Hkv][rows][hd]
//            (head-major, so one head's keys are a contiguous [rows][hd] matrix), δ f32
//            [layers][rows][D], proxies f32 [layers][rows][r]; zero at creation.
// A step (all requests of a batch together; rows of the batch concatenated):
//   embed the live rows → per layer ℓ: h = RMSNorm(x) (bf16) for the live rows;
//     selection (kSpa: proxy GEMM h·Pᵀ, cosine with the cached proxies and store; kDllm: V GEMM,
//       cosine with the cached V and store) → per request the k smallest cosines
//       (DlmSelectSmallest) → the recomputed rows Q; otherwise Q = all live rows;
//     K/V GEMM on the rows whose K/V are recomputed (all live rows or Q), RoPE, scatter into the
//       cache; Q GEMM + RoPE on Q;
//     attention of Q over every canvas row of its request (bidirectional), one call per group of
//       requests with the same (canvas rows, |Q|): the fused kernel (DlmFusedAttention,
//       fused_attention), or cuBLAS batched GEMMs S = scale·Q Kᵀ (f32), softmax → P (bf16),
//       O = P V (bf16);
//     O GEMM, x + a → RMSNorm → gate/up GEMM → SiLU·up → down GEMM accumulated onto a, so
//       a = δ; every live row: x += δ (fresh for Q, stored; cached otherwise);
//   final RMSNorm + LM head GEMM on the logit rows only; top-1 + probability on the device (or
//   the full logits copied back).
// GEMMs: bf16 × bf16 → f32 with f32 accumulation: cublasGemmEx, or for small row counts the
// fastest cuBLASLt algorithm measured per shape (CudaDlmOptions::gemm_tune). Numerics therefore differ from
// the CPU reference by bf16 rounding of weights, GEMM inputs, K/V, P and O (tolerances in
// cuda_forward_test.cc).
//
// Differences from the CPU reference: the drift statistics of store_proxy steps (spa-auto
// calibration) are not measured (calibrate on the CPU); a batch whose items differ in select /
// first_selective_layer / kv_all_rows / store_proxy runs as several forwards, one per kind.
// Limits: head_dim even; at most 8192 live rows per request in a selective step (the
// per-request selection runs in one CTA's shared memory); the cuBLAS attention path (fused
// attention off or above fused_attention_max_rows) needs Σ_requests |Q|·Hq·rows f32 + bf16 of
// scores per layer (3.2 + 1.6 GB for 16 requests of 1256 rows at LLaDA-8B shape in a full step);
// the fused kernel only its key splits' partials.
//
// Without a GPU (or in a build without CUDA) Create returns UNAVAILABLE with the reason.
// Thread-safety: ForwardBatch / NewCache calls are serialised by an internal mutex; a cache
// belongs to one request and must not outlive the model.
#ifndef PREHOC_WORKER_DLM_CUDA_FORWARD_H_
#define PREHOC_WORKER_DLM_CUDA_FORWARD_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/model_config.h"
#include "worker/dlm/dlm_backend.h"
#include "worker/dlm/dlm_model.h"

namespace prehoc::dlm {

struct CudaDlmOptions {
  // Exactly one source of weights:
  //  - `model`: a CPU DlmModel; its weights and singular proxies are converted to bf16 and
  //    uploaded (the model may be destroyed afterwards);
  //  - `random_config`: random bf16 weights made on the device (uniform with the variance of
  //    normal(0, 0.02), norms 1) and random proxies of rank `random_proxy_rank` — the cost per
  //    step of the real model, for benchmarks (proxies from an SVD are not computed).
  const DlmModel* model = nullptr;
  std::optional<ModelConfig> random_config;
  int random_proxy_rank = 0;  // 0 = max(16, kv_width / 32) clamped, as DlmModel's default
  uint64_t random_seed = 1;
  int random_mask_id = -1;    // −1 = the config's mask_token_id (required then)
  int device = 0;
  // Time the phases of every forward with CUDA events (ForwardStats seconds_*: layer 0, K/V,
  // selection, selected rows, LM head). Off: those stay 0.
  bool profile = false;
  // Opt-in GEMM autotuning for GEMMs with at most 1024 rows (the cached steps' few selected
  // rows): on the first use of each (rows, out, in, accumulate) shape, time cublasGemmEx's
  // default against up to 8 cuBLASLt heuristic algorithms (split-K among them) and keep the
  // fastest (an Lt algorithm must win by 3 %). Measured on an H100 at LLaDA-8B shape
  // (docs/dlm.md): 84 of 238 shapes chose cuBLASLt, but a step gains only 1–3 % (batch-1 spa
  // partial step 10.54 → 10.41 ms) — cuBLAS's default is near its best for these shapes — while
  // the first forward of each shape pays the timing (~0.8 s for the LM head's 32 logit-row
  // counts in a first decode) and the chosen algorithm (hence the summation order) can differ
  // from run to run. Off by default for those reasons.
  bool gemm_tune = false;
  // Diagnostics: a CUDA event after every launch of a forward; TakeKernelProfile() returns the
  // time per kernel class (the gap before each launch included). Adds ~20 events per layer.
  bool profile_kernels = false;
  // GEMMs with at most kSkinnyGemmMaxRows (64) rows — the cached steps' selected rows at small
  // batch — run on SkinnyGemmBf16 (worker/kernels/skinny_gemm.h: a weight-streaming tensor-core
  // GEMM, split-K reduced deterministically in a thread-block cluster) instead of cuBLAS;
  // needs an sm_90 device (off otherwise). gemm_tune, when on, takes precedence. Off by default:
  // measured slower than cuBLAS's default at LLaDA-8B shape on an H100 (docs/dlm.md).
  bool skinny_gemm = false;
  // Replay a step as a CUDA graph: the launches of a forward from the embedding to the last layer
  // are captured the second time the same step shape occurs — same step kind, requests, live /
  // selected rows per layer and request, workspaces — and replayed from then on (the per-step
  // metadata is copied in before the replay, so tokens, positions and caches may change; the
  // final norm, LM head and top-1 over the logit rows, whose count changes every step, run
  // eagerly after the replay). Up to
  // 64 graphs are kept (all dropped when full). Not used while profile,
  // profile_kernels or gemm_tune is on.
  bool cuda_graphs = true;
  // Fewer launches per layer: one GEMM over wqkv's contiguous Q|K|V rows when K/V are
  // recomputed for exactly the Q rows (every policy but spa's reference "K/V of all response
  // rows"; dllm: Q|K) and then its Q RoPE and K/V scatter in one launch (DlmQkvRopeScatter),
  // and the residual update fused with the next layer's input RMSNorm (DlmResidualRmsNorm).
  // Off: the separate Q and K/V GEMMs, RoPE / scatter and norm kernels.
  bool fused_row_ops = true;
  // Attention in one fused tensor-core kernel (DlmFusedAttention: S and P stay on chip, keys
  // split over CTAs when the rows alone do not fill the GPU) instead of cuBLAS batched QKᵀ →
  // softmax → PV through memory; head_dim 64 or 128. Only for groups with at most
  // `fused_attention_max_rows` recomputed rows per request when that is > 0 (64: the cached
  // steps only, as measured in session 5's first variant; 0: every step, vanilla's full steps
  // included).
  bool fused_attention = true;
  int fused_attention_max_rows = 0;
};

class CudaDlmModel : public DlmBackend {
 public:
  // Errors: UNAVAILABLE without a usable device or CUDA build; INVALID_ARGUMENT for bad options
  // (naming the field) or a config DlmModel::Supports refuses; RESOURCE_EXHAUSTED when device
  // memory is too small; INTERNAL for a CUDA / cuBLAS failure.
  static absl::StatusOr<std::unique_ptr<CudaDlmModel>> Create(const CudaDlmOptions& options);
  ~CudaDlmModel() override;

  const ModelConfig& config() const override;
  int mask_id() const override;
  std::span<const int> eos_ids() const override;
  int proxy_rank() const override;
  std::string backend_name() const override;
  // A cache for `rows` canvas rows in device memory. INVALID_ARGUMENT for rows <= 0;
  // RESOURCE_EXHAUSTED when it does not fit.
  absl::StatusOr<std::unique_ptr<DlmCache>> NewCache(int rows) const override;
  // REQUIRES: the items' caches were made by this model's NewCache.
  absl::Status ForwardBatch(std::span<const DlmBatchItem> items,
                            ForwardStats* batch_stats) const override;

  // e.g. "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".
  std::string device_name() const;
  // Device bytes of the bf16 weights.
  int64_t weight_bytes() const;
  // gemm_tune: shapes tuned so far, how many use cuBLASLt, and their summed times.
  std::string gemm_tuning_summary() const;
  // cuda_graphs: forwards replayed from a graph / captured / run eagerly so far.
  std::string graph_summary() const;
  // profile_kernels: milliseconds per kernel class summed over the forwards since the last call
  // (in first-launch order), and in *forwards (optional) how many forwards; then resets.
  std::vector<std::pair<std::string, double>> TakeKernelProfile(int64_t* forwards = nullptr) const;

  struct Impl;

 private:
  CudaDlmModel(std::unique_ptr<Impl> impl, const ModelConfig& config, int mask_id,
               std::vector<int> eos_ids, int proxy_rank, std::string device_name,
               int64_t weight_bytes);

  mutable absl::Mutex mu_;
  std::unique_ptr<Impl> impl_ ABSL_PT_GUARDED_BY(mu_);
  const ModelConfig config_;
  const int mask_id_;
  const std::vector<int> eos_ids_;
  const int proxy_rank_;
  const std::string device_name_;
  const int64_t weight_bytes_;
};

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_CUDA_FORWARD_H_
