// Plain request/response types of the serving API, shared by the worker's scheduler, the cache
// manager's router and the gRPC adapters in services/ (which map them to/from prehoc.v1 protos).
// No gRPC or protobuf types here.
//
// Contract of a stream: InferenceBackend::Generate either fails synchronously (and never calls
// the callback) or accepts the request and then calls the callback one or more times, in order,
// from backend threads; exactly one call is terminal (InferenceEvent::terminal()) and it is the
// last. Callbacks must not block (they run on the step loop / network threads) and must not call
// back into the backend's Generate; calling Cancel from a callback is allowed.
#ifndef PREHOC_WORKER_SCHEDULER_TYPES_H_
#define PREHOC_WORKER_SCHEDULER_TYPES_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/sampler.h"
#include "worker/sparsity.h"

namespace prehoc {

// Field names used in INVALID_ARGUMENT messages are the prehoc.v1.GenerateRequest proto field
// names ("text", "token_ids", "max_tokens", "sampling.top_p", "sparsity.policy", ...).
struct InferenceRequest {
  std::string request_id;            // "" = the backend assigns one
  std::string model;                 // "" = the default model
  std::optional<std::string> text;   // prompt as text (tokenized by the worker, BOS prepended)
  std::vector<int32_t> token_ids;    // prompt as ids; used when `text` is unset
  int max_tokens = 0;                // >= 1 and <= the backend's limit
  SamplingOptions sampling;
  bool stop_at_eos = false;
  SparsityOptions sparsity;          // policy "" = the backend's default policy
  absl::Time deadline = absl::InfiniteFuture();
};

struct InferenceEvent {
  std::string request_id;            // always set
  bool first = false;                // the first event of the stream
  std::string served_by;             // worker id (set on the first event)
  std::vector<int32_t> tokens;       // new tokens since the previous event
  std::string text;                  // their text (complete UTF-8 characters only)
  // Terminal, successful: finished = true with finish_reason "length" or "eos".
  bool finished = false;
  std::string finish_reason;
  // Terminal, failed: a non-OK status (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, INTERNAL).
  absl::Status status;
  // Set on the finished event.
  int prompt_tokens = 0;
  int completion_tokens = 0;
  double time_to_first_token_s = 0;
  SparsityReport sparsity;
  double sparsity_target_delta = 0;  // the request's delta target (0 = budget-driven)
  // The sequence's state after this event (the "extend" information the cache manager mirrors).
  int sequence_length = 0;
  int kv_pages = 0;

  bool terminal() const { return finished || !status.ok(); }
};

// Called for each event of one stream; see the contract at the top of this file.
using InferenceCallback = std::function<void(InferenceEvent)>;

struct ModelDescription {
  std::string name;
  std::string architecture;
  int vocab_size = 0;
  int max_context = 0;
  bool bidirectional = false;
  int max_tokens_limit = 0;
  std::vector<std::string> sparsity_policies;
  // Shape the cache manager's selection planner needs (0 = unknown).
  int num_layers = 0;
  int num_kv_heads = 0;
  // Diffusion models served by Diffuse: the cache policies and the per-layer drift profile
  // measured at load (spa-auto; empty when not measured). Empty for autoregressive models.
  std::vector<std::string> dlm_cache_policies;
  std::vector<double> dlm_drift;
};

// Load of one worker, for placement and metrics.
struct LoadReport {
  int32_t kv_pages_total = 0;
  int32_t kv_pages_used = 0;
  int32_t kv_pages_reserved = 0;
  int32_t queue_depth = 0;
  int32_t running = 0;
  int32_t max_queue = 0;
  int32_t max_running = 0;
};

// Anything that serves generation: the worker's Scheduler, the cache manager's Router, and the
// embedded combination of both. Thread-safe.
class InferenceBackend {
 public:
  virtual ~InferenceBackend() = default;

  // Validates and admits a request. On success returns its request id and the callback will be
  // invoked (possibly before Generate returns) as described at the top of this file. Errors
  // (the callback is then never invoked): INVALID_ARGUMENT naming the field; RESOURCE_EXHAUSTED
  // stating the queue or page limit; UNAVAILABLE when draining / no ready worker;
  // ALREADY_EXISTS for a request_id in use.
  virtual absl::StatusOr<std::string> Generate(InferenceRequest request,
                                               InferenceCallback callback) = 0;
  // Ends a running request: its stream's terminal event carries `status` (CANCELLED by
  // default). NOT_FOUND when no running request has this id.
  virtual absl::Status Cancel(std::string_view request_id,
                              absl::Status status = absl::CancelledError("cancelled")) = 0;
  virtual std::vector<ModelDescription> ListModels() const = 0;
  // Readiness: true when new requests can be served.
  virtual bool Ready() const = 0;
};

// The canonical policy names, in the order of prehoc.v1.SparsityParams.Policy (index 0 = "").
// Used for metric label sets (bounded) and proto mapping.
inline const std::vector<std::string>& KnownSparsityPolicies() {
  static const auto* const kPolicies = new std::vector<std::string>{
      "dense", "prhs", "quest", "streaming", "h2o", "oracle", "prhs-budget-matched", "hshare"};
  return *kPolicies;
}

}  // namespace prehoc

#endif  // PREHOC_WORKER_SCHEDULER_TYPES_H_
