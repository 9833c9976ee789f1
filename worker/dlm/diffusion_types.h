// Plain request/response types of the serving API's Diffuse call (prehoc.v1.Inference/Diffuse),
// shared by the worker's DlmRunner (worker/dlm/dlm_runner.h), the cache manager's DlmRouter
// (cachemgr/dlm_router.h) and the gRPC adapters (services/common/diffuse_*). No gRPC types.
//
// Contract of a stream (the same as InferenceBackend::Generate, scheduler_types.h):
// DiffusionBackend::Diffuse either fails synchronously (and never calls the callback) or accepts
// the request and then calls the callback one or more times, in order, from backend threads;
// exactly one call is terminal (DiffusionEvent::terminal()) and it is the last. Callbacks must
// not block and must not call back into Diffuse; calling CancelDiffusion from one is allowed.
#ifndef PREHOC_WORKER_DLM_DIFFUSION_TYPES_H_
#define PREHOC_WORKER_DLM_DIFFUSION_TYPES_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachemgr/dlm_schedule.h"
#include "worker/dlm/decoder.h"

namespace prehoc {

// Field names in INVALID_ARGUMENT messages are the prehoc.v1.DiffuseRequest proto field names
// ("gen_length", "cache_params.r_full", "rho", "sampling.top_k", ...).
struct DiffusionRequest {
  std::string request_id;           // "" = the backend assigns one
  std::string model;                // "" = the default model
  std::optional<std::string> text;  // prompt as text (tokenized by the worker, BOS prepended)
  std::vector<int32_t> token_ids;   // prompt as ids; used when `text` is unset
  // gen_length, block_length, steps, remasking, temperature, seed, parallel_threshold,
  // stop_at_eos, cache and cache_overrides (keys of MakeDlmSchedule). gen_length 0 = 64,
  // remasking "" = low_confidence, cache "" = none (applied by the backend).
  dlm::DiffuseOptions options;
  // Per-layer ρ overrides for spa / spa-auto: empty or exactly one per layer, each in [0, 1].
  std::vector<double> rho;
  // The cache manager's resolved schedule; when set the worker runs exactly this (and ignores
  // options.cache, cache_overrides and rho).
  std::optional<DlmSchedule> plan;
  absl::Time deadline = absl::InfiniteFuture();
};

// Final statistics of one Diffuse (DiffuseStats in the proto).
struct DiffusionStats {
  std::string cache;  // policy that ran
  int steps = 0, full_steps = 0, gen_refresh_steps = 0, partial_steps = 0;
  int blocks = 0;
  int canvas_rows = 0;
  std::vector<int64_t> rows_recomputed;     // per layer
  std::vector<int64_t> kv_rows_recomputed;  // per layer
  double decode_seconds = 0;
  double tokens_per_second = 0;
  double time_to_first_block_s = 0;
  int64_t plan_version = 0;
  std::vector<double> rho;
  int64_t refreshes() const { return full_steps + gen_refresh_steps; }
};

struct DiffusionEvent {
  std::string request_id;  // always set
  bool first = false;      // the first event of the stream
  std::string served_by;   // worker id (first event)
  // Tokens of the block(s) committed since the previous event, starting at response position
  // `block_start` (block index `block`), and their text (complete UTF-8 characters only).
  std::vector<int32_t> tokens;
  std::string text;
  int block = 0;
  int block_start = 0;
  int step = 0;  // steps run so far
  // Terminal, successful: finished with finish_reason "length" or "eos", usage and stats.
  bool finished = false;
  std::string finish_reason;
  int prompt_tokens = 0;
  int completion_tokens = 0;
  DiffusionStats stats;
  // Terminal, failed: a non-OK status (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, INTERNAL).
  absl::Status status;

  bool terminal() const { return finished || !status.ok(); }
};

using DiffusionCallback = std::function<void(DiffusionEvent)>;

// Anything that serves Diffuse: the worker's DlmRunner, the cache manager's DlmRouter. Thread-safe.
class DiffusionBackend {
 public:
  virtual ~DiffusionBackend() = default;
  // Validates and admits a request; see the contract above. Errors (the callback is then never
  // called): INVALID_ARGUMENT naming the field, FAILED_PRECONDITION when the model cannot run
  // it (autoregressive model, spa-auto without a drift profile), RESOURCE_EXHAUSTED stating the
  // limit, UNAVAILABLE when draining / no ready worker, ALREADY_EXISTS for an id in use,
  // NOT_FOUND for an unknown model.
  virtual absl::StatusOr<std::string> Diffuse(DiffusionRequest request,
                                              DiffusionCallback callback) = 0;
  // Ends a running request: its terminal event carries `status`. NOT_FOUND when no running
  // request has this id.
  virtual absl::Status CancelDiffusion(std::string_view request_id, absl::Status status) = 0;
};

// Applies a request's per-layer ρ overrides to `schedule` (num_layers layers). INVALID_ARGUMENT
// naming `rho` for a wrong count, a value outside [0, 1], or a policy other than spa/spa-auto.
absl::Status ApplyRhoOverrides(const std::vector<double>& rho, int num_layers,
                               DlmSchedule* schedule);

// The schedule for a request: its plan when set (validated against num_layers), otherwise
// MakeDlmSchedule(num_layers, cache, cache_overrides, drift) + ApplyRhoOverrides.
// FAILED_PRECONDITION for spa-auto without a drift profile; INVALID_ARGUMENT otherwise.
absl::StatusOr<DlmSchedule> ResolveDlmSchedule(const DiffusionRequest& request, int num_layers,
                                               const std::vector<double>& drift);

}  // namespace prehoc

#endif  // PREHOC_WORKER_DLM_DIFFUSION_TYPES_H_
