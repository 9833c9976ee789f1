// DlmRunner: the worker's Diffuse backend. Runs the DLM decode loop (worker/dlm/decoder.h) for
// gRPC requests on an executor thread of its own, separate from the Scheduler's step thread, so
// diffusion requests never hold up Generate traffic (they share only CPU/GPU time) and Generate
// never holds up a diffusion request.
//
//   Diffuse():  validate (tokenize, options, schedule) → INVALID_ARGUMENT / FAILED_PRECONDITION
//               synchronously; admission: at most max_running requests decode at once and at
//               most max_queue wait → RESOURCE_EXHAUSTED naming the limit; then FIFO.
//   executor:   continuous batching. One thread steps every running request together: each
//               step, every running request (each with its own schedule, options and canvas
//               length) prepares its next step (dlm::DlmRequestRun) and all of them go to the
//               backend in ONE DlmBackend::ForwardBatch call (on CUDA one batched forward per
//               step kind; canvases of different lengths are concatenated, attention grouped by
//               shape; on the CPU the items run one after another). Queued requests join at the
//               next step boundary; a request leaves when it finishes. A request's tokens do not
//               depend on which requests share its forwards (tested: batched == alone). Each
//               block is streamed when its last mask is committed; an interrupt checked before
//               every step of each request ends it between steps on Cancel / CancelDiffusion,
//               its deadline or shutdown, without disturbing the others.
//   backend:    the CPU DlmModel or CudaDlmModel (MaybeCreateDlmRunner's device choice).
//   metrics:    dlm::DlmMetrics::Record per finished request, RecordOutcome for every end,
//               RecordBatch per batched step.
//   failure:    a failed forward ends the requests of that step INTERNAL and the queued ones
//               UNAVAILABLE, and marks the backend failed for good: Diffuse then refuses new
//               requests UNAVAILABLE naming the cause ("backend failed: ..."), and
//               DlmRunnerOptions::on_backend_failure tells the server (readiness).
//
// Thread-safety: every public method may be called from any thread. Callbacks run on the
// executor thread (or on the caller of Cancel*/the destructor for queued requests).
#ifndef PREHOC_WORKER_DLM_DLM_RUNNER_H_
#define PREHOC_WORKER_DLM_DLM_RUNNER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "worker/dlm/decoder.h"
#include "worker/dlm/diffusion_types.h"
#include "worker/dlm/dlm_backend.h"
#include "worker/dlm/dlm_metrics.h"
#include "worker/dlm/dlm_model.h"
#include "worker/model_weights.h"
#include "worker/scheduler_types.h"
#include "worker/tokenizer.h"

namespace prehoc {

struct DlmRunnerOptions {
  std::string model_name = "default";  // the name requests may use ("" in a request = this)
  std::string worker_id = "worker";    // served_by of the first event
  int max_running = 8;   // requests decoding at once (batched into one forward per step), >= 1
  int max_queue = 16;    // admitted requests waiting for an executor thread, >= 0
  int max_gen_length = 1024;  // largest gen_length accepted
  // Per-layer drift profile measured at load (calibration.h); empty = spa-auto unavailable.
  std::vector<double> drift;
  // Not owned; must outlive the runner. Null = the runner registers its own in `registry`
  // (model_name, the model's layer count) when that is set, else no metrics.
  dlm::DlmMetrics* metrics = nullptr;
  prometheus::Registry* registry = nullptr;
  // Clock for deadlines; null = absl::Now.
  std::function<absl::Time()> clock;
  // MaybeCreateDlmRunner's backend: "cpu", "cuda" (UNAVAILABLE without a usable device) or
  // "auto" (CUDA when usable, else the CPU with the reason logged); CUDA device ordinal.
  std::string device = "cpu";
  int cuda_device = 0;
  // Test hook, called on the executor thread before every step's interrupt check with the
  // request id and the step about to run (a gate: tests block here to act mid-request).
  std::function<void(const std::string& request_id, int step)> before_step;
  // Called once, on the executor thread, after the first failed forward (a device fault: every
  // request's steps were validated when it started, so the backend's state is no longer
  // trusted). backend_status() already returns the failure when it runs. Null = none.
  std::function<void(const absl::Status&)> on_backend_failure;
  // Test hook for MaybeCreateDlmRunner: wraps the backend it picked (e.g. fault injection).
  std::function<std::shared_ptr<const dlm::DlmBackend>(std::shared_ptr<const dlm::DlmBackend>)>
      wrap_backend;
};

class DlmRunner : public DiffusionBackend {
 public:
  // `model` is a diffusion-LM backend (the CPU DlmModel or CudaDlmModel). `tokenizer` may be
  // null (then a DlmModel's own; text prompts are refused when there is none). INVALID_ARGUMENT
  // naming the option for bad options. The model is shared (immutable; several runners may use
  // one, e.g. in tests).
  static absl::StatusOr<std::unique_ptr<DlmRunner>> Create(
      std::shared_ptr<const dlm::DlmBackend> model, std::unique_ptr<Tokenizer> tokenizer,
      DlmRunnerOptions options);
  // Ends every request UNAVAILABLE ("worker shutting down") and joins the executor.
  ~DlmRunner() override;

  absl::StatusOr<std::string> Diffuse(DiffusionRequest request,
                                      DiffusionCallback callback) override;
  absl::Status CancelDiffusion(std::string_view request_id, absl::Status status) override;

  // Drain: new requests UNAVAILABLE; running and queued ones continue.
  void StartDrain();
  // True once no request is queued or running, false at `deadline` otherwise.
  bool WaitIdle(absl::Time deadline);
  // Ends every queued and running request with `status` (running ones at their next step).
  void CancelAll(const absl::Status& status);
  void SetWorkerId(const std::string& id);

  const dlm::DlmBackend& model() const { return *model_; }
  const std::vector<double>& drift() const { return options_.drift; }
  int num_layers() const;
  // Requests queued + running.
  int Active() const;
  // OK while the backend is healthy; after a failed forward, that forward's error (sticky).
  absl::Status backend_status() const;

 private:
  struct Job;
  struct Running;
  explicit DlmRunner(DlmRunnerOptions options) : options_(std::move(options)) {}
  void ExecutorLoop();
  // Makes the admitted job's decoding state; null (after ending the job) when Init fails.
  std::unique_ptr<Running> Start(const std::shared_ptr<Job>& job);
  // One batched step of every running request; removes the ones that end.
  void Step(std::vector<std::unique_ptr<Running>>* running);
  absl::Status Interrupt(const Running& r) const;
  void OnStep(Running* r, const dlm::DlmStepInfo& info);
  // The final event of a request whose decoding finished.
  void Complete(Running* r);
  // Terminal event of `job`; `was_running`: it held one of the max_running places.
  void Finish(const std::shared_ptr<Job>& job, DiffusionEvent ev, bool was_running);
  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }

  DlmRunnerOptions options_;  // constant after Create
  std::unique_ptr<dlm::DlmMetrics> own_metrics_;
  std::shared_ptr<const dlm::DlmBackend> model_;
  std::unique_ptr<Tokenizer> own_tokenizer_;
  const Tokenizer* tokenizer_ = nullptr;
  std::thread executor_;

  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<Job>> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // requests admitted to the executor
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status backend_failure_ ABSL_GUARDED_BY(mu_);  // the first failed forward's error
  std::string worker_id_ ABSL_GUARDED_BY(mu_);
};

// For servers: when `model_dir` holds a diffusion model (config is_causal false), loads its
// weights once into `*shared_weights` (so the Engine can share them), builds the DlmModel over
// them (num_threads CPU threads; proxies per DlmModelOptions defaults), measures the drift
// profile when `calibrate` (about 3 s for the shipped model; on the CPU model), picks the
// backend by options.device (CreateDlmBackend) and returns the runner. Returns nullptr (and
// leaves *shared_weights alone) for an autoregressive model. Errors: those of loading the
// config, weights, tokenizer or calibration, and CreateDlmBackend's.
absl::StatusOr<std::unique_ptr<DlmRunner>> MaybeCreateDlmRunner(
    const std::string& model_dir, int num_threads, bool calibrate, DlmRunnerOptions options,
    std::shared_ptr<const ModelWeights>* shared_weights);

// The diffusion backend `device` asks for, over the CPU model `cpu` (its weights and proxies are
// uploaded for CUDA):
//   cpu   `cpu` itself;
//   cuda  CudaDlmModel on `cuda_device`; UNAVAILABLE (with the reason) without a usable device or
//         in a build without CUDA;
//   auto  CUDA when usable, else `cpu`; the log line (also in *why, optional) says which and why.
// INVALID_ARGUMENT naming `device` for any other value.
absl::StatusOr<std::shared_ptr<const dlm::DlmBackend>> CreateDlmBackend(
    const std::string& device, std::shared_ptr<const dlm::DlmModel> cpu, int cuda_device = 0,
    std::string* why = nullptr);

// Adds what the cache manager needs to place Diffuse requests to the descriptions of the model
// `runner` serves (its DLM cache policies and drift profile). No-op when runner is null.
void DescribeDiffusion(const DlmRunner* runner, std::vector<ModelDescription>* models);

// A DiffusionBackend that refuses everything with FAILED_PRECONDITION `reason` (a worker
// serving an autoregressive model).
class NoDiffusionBackend : public DiffusionBackend {
 public:
  explicit NoDiffusionBackend(std::string reason) : reason_(std::move(reason)) {}
  absl::StatusOr<std::string> Diffuse(DiffusionRequest, DiffusionCallback) override {
    return absl::FailedPreconditionError(reason_);
  }
  absl::Status CancelDiffusion(std::string_view id, absl::Status) override {
    return absl::NotFoundError(absl::StrCat("request_id: no running Diffuse has id '", std::string(id), "'"));
  }

 private:
  const std::string reason_;
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_DLM_DLM_RUNNER_H_
