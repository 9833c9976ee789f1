// What a request asks of sparse attention, and what sparse attention did for it. Plain structs
// shared by the worker, the cache manager and the services (which map them to/from proto).
#ifndef PREHOC_WORKER_SPARSITY_H_
#define PREHOC_WORKER_SPARSITY_H_

#include <cstdint>
#include <string>

namespace prehoc {

// A named sparse-attention policy (presets in cachemgr/ fill in every parameter).
//   "dense"      all tokens
//   "prhs"       pre-hoc selection: CIS (time) + PSAW (depth) [+ ETF in prefill]
//   "prhs-budget-matched"  prhs with k reduced so the real kept count (with dilation) = budget
//   "oracle"     exact top-k every step (quality upper bound per budget)
//   "streaming"  sinks + recent window (StreamingLLM)
//   "h2o"        heavy hitters by accumulated attention + recent window
//   "quest"      per-page min/max key bounds, top pages every step
//   "hshare"     HShare-style sharing of approximate top-k across steps/heads/layers
struct SparsityOptions {
  std::string policy = "dense";
  // Target dropped attention mass δ* in (0, 1); 0 = use `budget` / the preset default.
  double target_delta = 0.0;
  // Tokens kept per (layer, kv head) including sink and local window; 0 = preset default.
  // A value in (0, 1] is read as a fraction of the context (e.g. 0.125 = 1/8), > 1 as tokens.
  double budget = 0.0;
  // Preset overrides, "key=value,key=value" (see cachemgr/selection_plan.h for the keys).
  std::string overrides;
};

struct SparsityReport {
  std::string policy = "dense";
  double mean_kept_fraction = 1.0;  // mean over decode steps × layers × kv heads
  double mean_delta = 0.0;          // mean exact dropped mass measured at refreshes
  double max_delta = 0.0;
  int64_t refreshes = 0;            // exact top-k recomputations (retrievals)
  int64_t shares = 0;               // (step, layer, head) uses of a reused index set
  // Version of the plan in use at the end: the cache manager's once one was applied
  // (plan_updates > 0), else the worker's local plan's.
  int64_t plan_version = 0;
  int plan_updates = 0;             // plans from the cache manager applied at step boundaries
  int64_t dense_fallback_steps = 0; // decode steps of a sparse policy that attended every token
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_SPARSITY_H_
