// Continuous batching over a ModelBackend (the CPU Engine or the CUDA backend): requests join
// and leave the running batch at every engine step; prompt prefill is split into chunks that
// share steps with the decode tokens of running requests; cancellation and deadlines are checked before every step; admission control reserves
// each request's worst-case KV pages (prompt + max_tokens) so a step never runs out of pages.
//
// Threading: one step thread (started by Create) is the only thread that touches the backend.
// Generate / Cancel / Load / LiveSequences may be called from any thread; they take `mu_`
// briefly. Event callbacks run on the step thread, outside `mu_` (see scheduler_types.h).
//
// Step loop, each iteration:
//   1. reap: end cancelled requests and requests past their deadline (their pages are freed);
//   2. admit: move waiting requests (FIFO) into the running set while fewer than max_running run
//      and their reservation fits in the free pages;
//   3. build one batch: one decode token per running request that finished prefill, then prompt
//      chunks (<= prefill_chunk tokens each) in arrival order while the batch has fewer than
//      max_step_tokens tokens;
//   4. ModelBackend::StepSample without the lock (each sampled item's draw comes from its
//      request's Sampler::NextDraw; the CUDA backend with device_sampling draws on the GPU);
//      emit events, end finished requests.
//
// Backend health: the first failed step (StepSample returning an error: a device fault, or a
// bug a page reservation should have prevented) is sticky. The step's requests end INTERNAL
// ("engine step failed: ..."), every other queued or running request ends UNAVAILABLE
// ("backend failed: ..."), Ready() turns false for good, Generate refuses new requests with
// UNAVAILABLE naming the cause, and SchedulerOptions::on_backend_failure tells the server (which
// turns its readiness health status NOT_SERVING; heartbeats carry ready=false).
#ifndef PREHOC_WORKER_SCHEDULER_H_
#define PREHOC_WORKER_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/backend.h"
#include "worker/scheduler_metrics.h"
#include "worker/scheduler_types.h"

namespace prehoc {

class DeltaController;
class SelectionSession;

struct SchedulerOptions {
  // Name reported by ListModels; requests naming another model are INVALID_ARGUMENT.
  std::string model_name = "default";
  // Reported as InferenceEvent::served_by and used as the prefix of assigned request ids.
  std::string worker_id = "worker";
  // Most requests in the running batch at once (>= 1).
  int max_running = 32;
  // Most requests waiting for admission; beyond it Generate is RESOURCE_EXHAUSTED (>= 0).
  int max_queue = 256;
  // Most tokens in one engine step, decode tokens plus prefill chunks (>= max_running).
  int max_step_tokens = 512;
  // Most prompt tokens of one request in one step (>= 1).
  int prefill_chunk = 256;
  // Largest max_tokens accepted; 0 = the engine's max_context.
  int max_tokens_limit = 0;
  // Sparsity policies this worker can run; others are INVALID_ARGUMENT. "" in a request means
  // `default_policy`.
  std::vector<std::string> sparsity_policies = KnownSparsityPolicies();
  std::string default_policy = "dense";
  // Clock for deadlines and latency metrics; null = absl::Now.
  std::function<absl::Time()> clock;
  // Test hook run on the step thread before each engine step (after the batch is built).
  std::function<void()> before_step;
  // Artificial delay added to every step (simulates a slower device in tests and benchmarks).
  absl::Duration step_delay = absl::ZeroDuration();
  // Metrics to update; may be null. Must outlive the scheduler.
  SchedulerMetrics* metrics = nullptr;
  // Called once, on the step thread and outside the scheduler's lock, with the first backend
  // failure (Ready() is already false and backend_status() returns it when this runs).
  std::function<void(const absl::Status&)> on_backend_failure;
  // Requests with a δ target share one δ-controller per (policy, δ*), so the budget learned by
  // earlier requests carries over; false = one controller per request.
  bool share_delta_controllers = true;
  // Finished sequences kept for TakeTelemetry(); the oldest are dropped beyond it.
  int telemetry_capacity = 1024;
  // Refresh δ samples kept per sequence in its telemetry record.
  int telemetry_deltas_per_sequence = 256;
};

// What one sequence did (worker -> cache manager telemetry): a finished sequence's totals, or
// (in_progress) a running sequence's state with the refresh δ measured since its last record.
struct SequenceTelemetry {
  std::string request_id;
  std::string policy;
  double target_delta = 0;
  bool in_progress = false;
  int length = 0;    // tokens in the KV cache (at the end, or now)
  int kv_pages = 0;
  SparsityReport report;  // totals so far
  // Exact dropped mass of the index set in use until each refresh, with its layer and kv head,
  // in order, measured since the sequence's previous record: at most
  // telemetry_deltas_per_sequence per record (later samples are dropped and counted in
  // telemetry_deltas_dropped()).
  std::vector<float> refresh_delta;
  std::vector<int16_t> refresh_layer;
  std::vector<int16_t> refresh_head;
};

// A sequence the scheduler holds (for the cache manager's registry after a restart).
struct LiveSequenceInfo {
  std::string request_id;
  int length = 0;
  int kv_pages = 0;
};

class Scheduler : public InferenceBackend {
 public:
  // Takes the model backend (CPU Engine or CUDA) and starts the step thread. INVALID_ARGUMENT
  // naming the option for bad options. Requests whose sparsity plan the backend cannot run
  // (ModelBackend::SupportsPlan) are refused in Generate with the backend's error.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(std::unique_ptr<ModelBackend> engine,
                                                           const SchedulerOptions& options);
  // Ends every request with UNAVAILABLE ("shutting down"), delivers the terminal events and
  // joins the step thread.
  ~Scheduler() override;

  // InferenceBackend. Generate validates synchronously (see InferenceBackend) and queues the
  // request; RESOURCE_EXHAUSTED when the queue holds max_queue requests or the request's
  // prompt + max_tokens needs more pages than the whole cache; UNAVAILABLE while draining and,
  // naming the cause ("backend failed: ..."), after a backend failure. Ready(): not draining
  // and the backend has not failed.
  absl::StatusOr<std::string> Generate(InferenceRequest request, InferenceCallback callback) override;
  absl::Status Cancel(std::string_view request_id,
                      absl::Status status = absl::CancelledError("cancelled")) override;
  std::vector<ModelDescription> ListModels() const override;
  bool Ready() const override;

  // Stops admitting new requests (Generate -> UNAVAILABLE, Ready() -> false); running and
  // queued requests continue.
  void StartDrain();
  // Blocks until no request is queued or running and every terminal event has been delivered,
  // or until `deadline`; returns true when idle.
  bool WaitIdle(absl::Time deadline);
  // Ends every request with `status`.
  void CancelAll(const absl::Status& status);

  // OK while the backend is healthy; after a failed step, that first step's error (sticky).
  absl::Status backend_status() const;
  // Records a failure of the device this scheduler's backend runs on that another component
  // observed (the worker's DlmRunner shares the device and the weights): as a failed step does,
  // it marks the backend failed for good (Ready() false, Generate refuses UNAVAILABLE naming
  // `status`, queued and running requests end UNAVAILABLE at the next step boundary, the
  // failure counter and backend-healthy gauge move) and calls on_backend_failure, on the
  // calling thread. No-op when the backend had already failed. `status` must not be OK.
  void MarkBackendFailed(const absl::Status& status);

  LoadReport Load() const;
  std::vector<LiveSequenceInfo> LiveSequences() const;

  // Removes and returns the telemetry of the sequences finished since the last call (oldest
  // first; at most telemetry_capacity), followed by one in_progress record per running
  // sequence that measured refresh δ since its previous record. Thread-safe.
  std::vector<SequenceTelemetry> TakeTelemetry();
  // Sequences whose telemetry was dropped because nobody took it in time.
  int64_t telemetry_dropped() const;
  // Refresh δ samples dropped because a record already held telemetry_deltas_per_sequence.
  int64_t telemetry_deltas_dropped() const;

  // Offers a selection plan computed by the cache manager for running request `request_id`
  // (produced at `produced`, for the plan-age metric). Never blocks on a step: the newest offer
  // is swapped in at the request's next step boundary. Older or equal versions than the newest
  // offered or applied are ignored (OK). NOT_FOUND for an unknown request; INVALID_ARGUMENT
  // when the plan does not fit the request (another policy or layer count) or the backend
  // cannot run it — the request keeps its plan. Thread-safe.
  absl::Status OfferPlan(std::string_view request_id, SelectionPlan plan, absl::Time produced);
  // Blocks until request `request_id` has been offered (or has applied) a cache-manager plan of
  // version >= `version`, until it ends, or until `deadline`; true when it has (tests).
  bool AwaitPlan(std::string_view request_id, uint64_t version, absl::Time deadline);

  // Replaces SchedulerOptions::worker_id (for servers that learn their id after binding a port).
  void SetWorkerId(const std::string& worker_id);

  // Read-only model metadata (config, tokenizer, page counts). The backend's mutable state is
  // the step thread's; callers use only the members ModelBackend marks thread-safe.
  const ModelBackend& backend() const { return *engine_; }
  const SchedulerOptions& options() const { return options_; }
  int max_tokens_limit() const { return max_tokens_limit_; }

 private:
  struct Request;
  using Delivery = std::pair<Request*, InferenceEvent>;

  Scheduler(std::unique_ptr<ModelBackend> engine, const SchedulerOptions& options);
  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }
  // Resolves and validates `request` into prompt ids; errors name the field.
  absl::Status Validate(const InferenceRequest& request, std::vector<int32_t>* prompt,
                        std::string* policy, std::unique_ptr<SelectionSession>* session);
  // The shared δ-controller for (policy, target_delta), created on first use.
  DeltaController* SharedController(const std::string& policy, double target_delta);
  void StepLoop();
  // A failed backend step (or MarkBackendFailed): counts it, records `status` as the sticky
  // failure when it is the first (returns true then), and marks every request to end UNAVAILABLE
  // naming the recorded failure at the next reap.
  bool RecordBackendFailureLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends `r` with `status` (or successfully when ok, with `reason`): frees its sequence, queues
  // the terminal event (carrying `event`'s tokens), moves ownership to `graveyard`.
  void FinishLocked(Request* r, absl::Status status, InferenceEvent event,
                    std::vector<Delivery>* out, std::vector<std::unique_ptr<Request>>* graveyard)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UpdateGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Step-boundary plan handling for decode request `r` (step thread): swaps in the newest
  // offered plan; returns the age of the plan in use at `now`.
  absl::Duration ApplyOfferedPlanLocked(Request* r, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After a decode step of `r` (step thread): counts a dense fallback when every selection of
  // the step kept all `t` tokens (`before` = the selector's counters before the step), and
  // moves the refresh δ measured since the last call into r's telemetry outbox.
  void AfterDecodeStepLocked(Request* r, int64_t t, int64_t selections_before,
                             int64_t kept_before) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Version of the plan `r` uses: the cache manager's once applied, else the local one's.
  int64_t PlanVersionLocked(const Request& r) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The telemetry record of `r` (takes r's δ outbox). in_progress: called off the step thread,
  // so the selector's report is left out (policy, plan and fallback counters only).
  SequenceTelemetry TelemetryRecordLocked(Request* r, bool in_progress)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs the callbacks of `out` (without mu_), then accounts for the terminal ones.
  void Deliver(std::vector<Delivery>* out) ABSL_LOCKS_EXCLUDED(mu_);

  const SchedulerOptions options_;
  std::unique_ptr<ModelBackend> engine_;  // touched only by the step thread (except metadata)
  const int max_tokens_limit_;
  const int32_t total_pages_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<Request>> requests_ ABSL_GUARDED_BY(mu_);
  std::deque<Request*> waiting_ ABSL_GUARDED_BY(mu_);
  std::vector<Request*> running_ ABSL_GUARDED_BY(mu_);  // admitted, in arrival order
  int32_t reserved_pages_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::string worker_id_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  // The first failed step's error; OK while the backend is healthy (see the file comment).
  absl::Status backend_failure_ ABSL_GUARDED_BY(mu_);
  // Terminal events queued for delivery but not yet delivered (WaitIdle waits for them too).
  int undelivered_terminals_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  double throughput_ewma_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<SequenceTelemetry> telemetry_ ABSL_GUARDED_BY(mu_);
  int64_t telemetry_dropped_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t telemetry_deltas_dropped_ ABSL_GUARDED_BY(mu_) = 0;

  absl::Mutex controllers_mu_;
  std::map<std::pair<std::string, double>, std::unique_ptr<DeltaController>> controllers_
      ABSL_GUARDED_BY(controllers_mu_);
  std::thread thread_;
};

// Takes the generated bytes in `*pending` that form complete characters and returns them as
// valid UTF-8 (proto3 strings must be): invalid bytes become U+FFFD; an incomplete trailing
// character stays in `*pending` unless `flush`, which replaces it with U+FFFD too.
std::string TakeCompleteUtf8(std::string* pending, bool flush = false);

}  // namespace prehoc

#endif  // PREHOC_WORKER_SCHEDULER_H_
