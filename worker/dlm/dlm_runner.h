// DlmRunner: the worker's Diffuse backend. Runs the DLM decode loop (worker/dlm/decoder.h) for
// gRPC requests on a small bounded executor of its own, separate from the Scheduler's step
// thread, so diffusion requests never hold up Generate traffic (they share only CPU/GPU time)
// and Generate never holds up a diffusion request.
//
//   Diffuse():  validate (tokenize, options, schedule) → INVALID_ARGUMENT / FAILED_PRECONDITION
//               synchronously; admission: at most max_running requests decode at once (one
//               executor thread each) and at most max_queue wait → RESOURCE_EXHAUSTED naming
//               the limit; then FIFO on the executor.
//   executor:   DiffuseWithSchedule with an observer that streams each block when its last
//               mask is committed, and an interrupt checked before every step: Cancel /
//               CancelDiffusion, the request's deadline and shutdown end the loop between steps.
//   metrics:    dlm::DlmMetrics::Record per finished request and RecordOutcome for every end.
//
// Thread-safety: every public method may be called from any thread. Callbacks run on the
// executor threads (or on the caller of Cancel*/the destructor for queued requests).
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
#include "worker/dlm/diffusion_types.h"
#include "worker/dlm/dlm_metrics.h"
#include "worker/dlm/dlm_model.h"
#include "worker/model_weights.h"
#include "worker/scheduler_types.h"
#include "worker/tokenizer.h"

namespace prehoc {

struct DlmRunnerOptions {
  std::string model_name = "default";  // the name requests may use ("" in a request = this)
  std::string worker_id = "worker";    // served_by of the first event
  int max_running = 1;   // requests decoding at once (executor threads), >= 1. The model's
                         // Forward is serialised on its thread pool, so more than 1 only
                         // interleaves requests step by step.
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
  // Test hook, called on the executor thread before every step's interrupt check with the
  // request id and the step about to run (a gate: tests block here to act mid-request).
  std::function<void(const std::string& request_id, int step)> before_step;
};

class DlmRunner : public DiffusionBackend {
 public:
  // `model` must be a diffusion model (DlmModel). `tokenizer` may be null (then the model's own,
  // and text prompts are refused when it has none). INVALID_ARGUMENT naming the option for bad
  // options.
  // The model is shared (immutable; several runners may use one, e.g. in tests).
  static absl::StatusOr<std::unique_ptr<DlmRunner>> Create(
      std::shared_ptr<const dlm::DlmModel> model, std::unique_ptr<Tokenizer> tokenizer,
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

  const dlm::DlmModel& model() const { return *model_; }
  const std::vector<double>& drift() const { return options_.drift; }
  int num_layers() const;
  // Requests queued + running.
  int Active() const;

 private:
  struct Job;
  explicit DlmRunner(DlmRunnerOptions options) : options_(std::move(options)) {}
  void ExecutorLoop();
  void Run(const std::shared_ptr<Job>& job);
  void Finish(const std::shared_ptr<Job>& job, DiffusionEvent ev);
  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }

  DlmRunnerOptions options_;  // constant after Create
  std::unique_ptr<dlm::DlmMetrics> own_metrics_;
  std::shared_ptr<const dlm::DlmModel> model_;
  std::unique_ptr<Tokenizer> own_tokenizer_;
  const Tokenizer* tokenizer_ = nullptr;
  std::vector<std::thread> threads_;

  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<Job>> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::string worker_id_ ABSL_GUARDED_BY(mu_);
};

// For servers: when `model_dir` holds a diffusion model (config is_causal false), loads its
// weights once into `*shared_weights` (so the Engine can share them), builds the DlmModel over
// them (num_threads CPU threads; proxies per DlmModelOptions defaults), measures the drift
// profile when `calibrate` (about 3 s for the shipped model), and returns the runner. Returns
// nullptr (and leaves *shared_weights alone) for an autoregressive model. Errors: those of
// loading the config, weights, tokenizer or calibration.
absl::StatusOr<std::unique_ptr<DlmRunner>> MaybeCreateDlmRunner(
    const std::string& model_dir, int num_threads, bool calibrate, DlmRunnerOptions options,
    std::shared_ptr<const ModelWeights>* shared_weights);

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
