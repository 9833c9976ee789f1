// The LLaDA-style diffusion decoding loop with pluggable cache policies (ALGORITHMS.md §4–5).
//
// Canvas = prompt | response (gen_length MASK tokens) | suffix (optional fixed tokens after the
// response, for infilling, e.g. the closing quote of a retrieval query). Bidirectional attention;
// one step = one (possibly partial) forward. For each block b of block_length response rows, in
// order (semi-autoregressive; block_length = gen_length is pure diffusion):
//   masks of the block are split evenly over steps_per_block = steps / num_blocks steps (the first
//   masks % steps_per_block steps commit one more, as LLaDA's get_num_transfer_tokens);
//   each step: logits of the block's masked rows → x0 = argmax(logits + T·g), g ~ Gumbel(0, 1)
//   drawn from the request's seeded generator (T = temperature; T = 0 is plain argmax);
//   confidence = softmax(logits)[x0] (low_confidence remasking) or U(0, 1) (random remasking);
//   commit the k_t most confident (ties: the lower position first); a committed token is never
//   re-masked. With parallel_threshold τ > 0 instead: commit every masked row of the block whose
//   confidence is >= τ, and always at least the most confident one; the block then takes as many
//   steps as it needs (steps only has to be valid).
//   After a block completes, with stop_at_eos, decoding stops if the response so far contains
//   any of the model's end-of-text ids (DlmBackend::eos_ids: config.json's eos_token_id, then
//   generation_config.json's); the response rows never decoded stay MASK.
// Which rows a step computes is decided by the DlmSchedule (cachemgr/dlm_schedule.h) and realised
// with DlmModel::Forward: full steps carry every row; prefix steps the rows from the block start
// to the end; dual steps the block's rows; dllm/spa partial steps the response rows with row
// selection; gen-refresh steps the response rows in full. Logits are computed only for the
// block's masked rows.
#ifndef PREHOC_WORKER_DLM_DECODER_H_
#define PREHOC_WORKER_DLM_DECODER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cachemgr/dlm_schedule.h"
#include "worker/dlm/dlm_backend.h"
#include "worker/dlm/dlm_model.h"

namespace prehoc::dlm {

enum class Remasking { kLowConfidence, kRandom };

struct DiffuseOptions {
  int gen_length = 64;    // response rows (MASK tokens to decode)
  int block_length = 0;   // 0 = gen_length (one block); must divide gen_length
  int steps = 0;          // total steps; 0 = gen_length; steps / num_blocks per block
  std::string remasking = "low_confidence";  // or "random"
  float temperature = 0;  // Gumbel-max temperature; 0 = argmax
  uint64_t seed = 0;
  double parallel_threshold = 0;  // τ_par in (0, 1]; 0 = fixed schedule
  bool stop_at_eos = false;
  std::string cache = "none";  // none | prefix | dual | dllm | spa | spa-auto
  std::map<std::string, double> cache_overrides;  // see MakeDlmSchedule

  // INVALID_ARGUMENT naming the field: gen_length <= 0, block_length < 0 or not dividing
  // gen_length, steps < 0, steps not a multiple of the number of blocks, steps per block above
  // block_length (a step would commit nothing), unknown remasking, temperature < 0 or not finite,
  // parallel_threshold outside [0, 1], unknown cache policy.
  absl::Status Validate() const;
  int effective_block_length() const { return block_length > 0 ? block_length : gen_length; }
  int effective_steps() const { return steps > 0 ? steps : gen_length; }
};

struct DiffuseRequest {
  std::vector<int32_t> prompt;  // includes BOS if the model wants one; >= 1 token
  std::vector<int32_t> suffix;  // fixed tokens after the response (may be empty)
  DiffuseOptions options;
};

// One step, reported to the observer after its commits.
struct DlmStepInfo {
  int step = 0;        // global, from 0
  int block = 0;
  int block_step = 0;
  DlmStepKind kind = DlmStepKind::kFull;
  std::vector<int32_t> committed_rows;    // response-relative positions, increasing
  std::vector<int32_t> committed_tokens;  // same order
  std::vector<float> committed_confidence;
  int masked_before = 0;  // masked rows in the block before this step
  // Every candidate of the step (the block's masked rows): position, proposed token, confidence.
  std::vector<int32_t> candidate_rows, candidate_tokens;
  std::vector<float> candidate_confidence;
};

struct DlmRunStats {
  int steps = 0;            // forwards (every step is one)
  int full_steps = 0, gen_refresh_steps = 0, partial_steps = 0;
  int blocks = 0;           // blocks decoded (fewer than num_blocks after an EOS stop)
  int decoded_tokens = 0;   // response rows committed
  double seconds = 0;       // wall time of the loop (model load and schedule excluded)
  ForwardStats forward;     // rows recomputed per layer, time by phase
  int canvas_rows = 0;
  // Recomputed rows per step and layer, and their fraction of the canvas rows a vanilla step
  // recomputes: q_rows[l] / steps, q_rows[l] / (steps · canvas_rows).
  std::vector<double> rows_per_step;
  std::vector<double> recompute_fraction;
  double tokens_per_second() const { return seconds > 0 ? decoded_tokens / seconds : 0; }
};

struct DiffuseResult {
  std::vector<int32_t> response;  // gen_length ids; MASK where never decoded (EOS stop)
  std::vector<int32_t> output;    // response up to (excluding) the first end-of-text (any id)
  std::string finish_reason;      // "length" or "eos"
  DlmSchedule schedule;
  DlmRunStats stats;
};

using DlmStepObserver = std::function<void(const DlmStepInfo&)>;
// Called before every step (after the previous step's observer call); a non-OK status stops
// decoding and is returned as the result (cancellation and deadlines in the services).
using DlmInterrupt = std::function<absl::Status()>;

// Runs the loop with `schedule` (from MakeDlmSchedule on the model's config; its policy wins over
// request.options.cache). Errors: request.options.Validate(); INVALID_ARGUMENT for an empty
// prompt, a token outside [0, vocab) or equal to the mask id in prompt/suffix (naming the field
// and position), a canvas longer than max_position_embeddings (naming gen_length), a model
// without an end-of-text id when stop_at_eos; FAILED_PRECONDITION for spa on a model without
// proxies.
absl::StatusOr<DiffuseResult> DiffuseWithSchedule(const DlmBackend& model,
                                                  const DiffuseRequest& request,
                                                  const DlmSchedule& schedule,
                                                  const DlmStepObserver& observer = nullptr,
                                                  const DlmInterrupt& interrupt = nullptr);

// Same, building the schedule from request.options.cache / cache_overrides (spa-auto uses
// `drift`, the model's measured drift profile: see calibration.h).
absl::StatusOr<DiffuseResult> Diffuse(const DlmBackend& model, const DiffuseRequest& request,
                                      std::span<const double> drift = {},
                                      const DlmStepObserver& observer = nullptr,
                                      const DlmInterrupt& interrupt = nullptr);

// Several requests decoded together with `schedule`: every step, each unfinished request adds its
// step to one DlmBackend::ForwardBatch call (a GPU runs them as one batched forward). Each
// result is the one DiffuseWithSchedule would give for that request alone on the same backend
// (bit-identical on the CPU backend; on CUDA up to the batched GEMMs' summation order); its
// stats.seconds is the wall time of the whole batch's loop and its phase times are those of the
// batched forwards. Errors as DiffuseWithSchedule for any request (nothing is decoded then);
// INVALID_ARGUMENT naming `requests` for an empty batch. `interrupt` is called before every
// batched step.
absl::StatusOr<std::vector<DiffuseResult>> DiffuseBatchWithSchedule(
    const DlmBackend& model, std::span<const DiffuseRequest> requests,
    const DlmSchedule& schedule, const DlmStepObserver& observer = nullptr,
    const DlmInterrupt& interrupt = nullptr);

// The rows a step of `kind` carries and how it picks the rows it recomputes (docs/dlm.md's policy
// table), for a canvas prompt (P rows) | response (L) | suffix (S) while the block [bs, be)
// (canvas positions) is decoded.
struct DlmStepPlan {
  std::vector<int32_t> live;
  RowSelect select = RowSelect::kAll;
  int first_selective_layer = 1;
  bool kv_all_rows = true;
};
DlmStepPlan PlanStep(const DlmSchedule& schedule, DlmStepKind kind, int P, int L, int S, int bs,
                     int be);
// The forward of a planned step: its live rows, row selection and K/V variant, with
// `update_rows` (per layer) when it selects; logit rows and proxies are left to the caller.
// The spec views plan.live and update_rows: both must outlive it.
ForwardSpec SpecForPlan(const DlmStepPlan& plan, std::span<const int> update_rows);
ForwardSpec SpecForPlan(DlmStepPlan&& plan, std::span<const int> update_rows) = delete;

// One request's decoding loop as a step machine, so that a caller can run several requests (each
// with its own schedule, canvas length and options) through one DlmBackend::ForwardBatch per step:
//   Init() once (errors as DiffuseWithSchedule; makes the request's caches), then
//   while (Prepare()) { the backend runs item() together with other requests' items; Commit(); }
//   and Finish(). DiffuseBatchWithSchedule and the worker's DlmRunner (continuous batching of
// Diffuse requests) drive it. A request's result does not depend on which other requests share
// its forwards (the backend contract: each item is its own step). `model`, `request` and
// `schedule` must outlive the run. Not thread-safe.
class DlmRequestRun {
 public:
  DlmRequestRun(const DlmBackend& model, const DiffuseRequest& request, const DlmSchedule& schedule,
                DlmStepObserver observer = nullptr);
  DlmRequestRun(const DlmRequestRun&) = delete;
  DlmRequestRun& operator=(const DlmRequestRun&) = delete;

  absl::Status Init();
  // Sets up the next step; false once the request is finished (all blocks, or stopped at EOS).
  bool Prepare();
  // The backend's work for the prepared step (valid until the next Prepare()).
  DlmBatchItem item();
  // Chooses x0 and the confidences from the step's output, commits, calls the observer.
  void Commit();
  // Steps committed so far.
  int steps_done() const { return step_; }
  // The result; `seconds` becomes stats.seconds and `times` (the phase times of the forwards this
  // request took part in) are added to stats.forward.
  DiffuseResult Finish(double seconds, const ForwardStats& times);

 private:
  DlmRunStats& stats() { return result_.stats; }

  const DlmBackend& model_;
  const DiffuseRequest& req_;
  const DiffuseOptions& opt_;
  const DlmSchedule& schedule_;
  const DlmStepObserver observer_;
  std::mt19937_64 rng_;
  int V_ = 0, NL_ = 0, mask_ = 0, P_ = 0, L_ = 0, S_ = 0;
  std::vector<int> eos_ids_;  // the model's end-of-text ids
  int bl_ = 0, nb_ = 0, spb_ = 0;
  bool spa_ = false, random_remask_ = false;
  double tau_ = 0;
  std::vector<int32_t> canvas_;
  std::unique_ptr<DlmCache> cache_;
  std::vector<int> update_rows_;
  DiffuseResult result_;
  // Loop position.
  int b_ = 0, i_ = 0, step_ = 0;
  bool block_started_ = false, stopped_ = false;
  std::vector<int> transfer_;
  std::vector<int32_t> mask_rows_;
  DlmStepKind kind_ = DlmStepKind::kFull;
  DlmStepPlan plan_;
  ForwardSpec spec_;
  std::vector<float> logits_;
  std::vector<int32_t> top1_;
  std::vector<double> top1_prob_;
};

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_DECODER_H_
