// SelectionPlan: the query-independent part of sparse-attention selection for one sequence,
// computed by the cache manager from the model shape and the request's policy, and consumed by
// the worker, which adds the query-dependent part (CIS gate, exact top-k refresh) on the device
// that holds K. Plain data: no gRPC types (services map it to cachemgr.proto).
//
// Budget convention: per (layer, kv head) a policy keeps
//   sink tokens [0, sink) ∪ selected tokens ∪ local window [t − local, t)
// and the budget B(t) = budget_tokens, or round(budget_fraction · t) when budget_fraction > 0,
// counts all three. Top-k size k(t) = max(0, B(t) − sink − local) · k_scale.
#ifndef PREHOC_CACHEMGR_SELECTION_PLAN_H_
#define PREHOC_CACHEMGR_SELECTION_PLAN_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "worker/sparsity.h"

namespace prehoc {

enum class SelectionPolicy { kDense, kPrhs, kOracle, kStreaming, kH2O, kQuest, kHShare };

// Parses a policy name ("dense", "prhs", "prhs-budget-matched" → kPrhs, "oracle", "streaming",
// "h2o", "quest", "hshare"). INVALID_ARGUMENT naming the value and the valid names otherwise.
absl::StatusOr<SelectionPolicy> ParseSelectionPolicy(const std::string& name);
const char* SelectionPolicyName(SelectionPolicy policy);

struct LayerSelectionPlan {
  int sink = 8;      // always-kept leading tokens (attention sinks)
  int local = 32;    // always-kept recent window, includes the current token
  // Multipliers on k(t): k_scale for the layer (1 = preset) times head_k_scale[kv_head] set by
  // the δ-controller per kv head (empty = 1 for every head).
  double k_scale = 1.0;
  std::vector<double> head_k_scale;
  double base_tau = -2.0;  // τ before controller increments (−2 = not captured; controller-owned)
  // CIS (PrHS time axis): reuse the anchor's index set while cos(q, q_anchor) > tau and the
  // set has been reused fewer than max_reuse times; else refresh with exact top-k.
  double tau = 0.8;
  int max_reuse = 64;
  // Dilation: the best dilate_m_fraction·k of the top-k indices are widened by ±dilate_r.
  double dilate_m_fraction = 1.0 / 3.0;
  int dilate_r = 1;
  // PSAW (depth axis): candidates start at lo(t) = max(sink, floor(psaw_drop_fraction · t)),
  // psaw_drop_fraction = 1 − φ^{α(ℓ−ℓ_s)/(N−ℓ_s)} for ℓ ≥ ℓ_s, else 0.
  double psaw_drop_fraction = 0.0;
  // ETF (layer axis, prefill): the first floor(etf_freeze_fraction · T) prompt tokens are frozen
  // from this layer on and read K/V of layer etf_alias_layer. 0 / −1 = not frozen.
  double etf_freeze_fraction = 0.0;
  int etf_alias_layer = -1;
  // HShare-style baseline: refresh the heavy set every `refresh_interval` steps using
  // approximate scores on `approx_channels` channels.
  int refresh_interval = 1;
  int approx_channels = 0;
  // GQA: a kv head's token score is the mean (default) or the max over its query heads of the
  // softmax probability; the CIS gate compares the concatenated group query with the anchor.
  bool gqa_max = false;
  // CIS gate frame: false = compare the post-RoPE queries (q_t vs q_anchor as attention sees
  // them); true = compare them rotated back to position 0 (pre-RoPE), so that a query whose
  // content has not changed is not refreshed merely because RoPE turned it by (t − t_anchor).
  bool gate_unrotated = false;
  // CIS share steps: the best m anchors' ±dilate_r neighbourhoods also move forward by the
  // number of steps since the refresh (copy heads' targets advance one position per token).
  bool follow = false;
  // CIS share steps, incremental scan (0 = off): every share step scores a rotating
  // 1/scan_slices of the out-of-set candidates exactly and swaps those whose group-mean
  // probability beats the weakest kept candidate into the set (its size stays the same).
  int scan_slices = 0;
  // With the scan: the next position j + 1 of each of the scan_follow strongest kept candidates
  // j of the step joins the set unscored, in place of the weakest member (a copy head's target
  // moves one position per token; 0 = off).
  int scan_follow = 0;
  // With the scan: a reserve of scan_reserve·|set| out-of-set runner-ups (the next best at the
  // refresh; then the best scanned keys that were not swapped in and the evicted members) is
  // scored on every share step besides the slice: swap candidates, and the exact part of a
  // stratified out-of-set mass estimate (reserve exact + slice scaled to the rest). 0 = off.
  double scan_reserve = 0.0;
  // δ-estimate gate (needs scan_slices >= 1; 0 = off): on a would-be share step, estimate the
  // shared set's dropped mass from the kept set's exact scores (what the sparse attention
  // computes) and the scanned slice scaled to all out-of-set candidates; refresh when it exceeds
  // the dropped mass the set had at its refresh by more than gate_delta.
  double gate_delta = 0.0;
  // Diagnostic only (reads every key every step, so no saving; CPU): the same gate on the exact
  // dropped mass of the shared set; shows what any δ gate could reach at a given refresh rate.
  double gate_exact_delta = 0.0;
  // Kept-mass gate (0 = off): refresh when the shared list's log-sum-exp (mean over the group's
  // query heads; the sparse attention computes it) is more than gate_lse nats below what the
  // list had at its refresh.
  double gate_lse = 0.0;
  // CIS share steps: tokens that left the local window since the refresh stay kept (the window
  // reaches back to where it began at the refresh; a refresh's top-k never saw them, as they
  // were in the window then). Costs no scoring; the real kept count includes them.
  bool keep_trail = false;
  // Gates on the attention output instead of the dropped mass (0 = off). The relative error of
  // the shared list's attention output against dense attention, ‖o_S − o‖ / ‖o‖ (mean over the
  // group's query heads), may exceed the refreshed list's (computed exactly at the refresh,
  // which then reads every value too) by at most the margin. gate_error estimates o with the
  // scan (needs scan_slices >= 1: kept list exact, reserve exact, slice scaled to the other
  // out-of-set candidates, values of the scanned keys read too); gate_exact_error is its
  // diagnostic (exact o every step: reads every key and value, no saving).
  double gate_error = 0.0;
  double gate_exact_error = 0.0;
};

struct SelectionPlan {
  uint64_t version = 0;   // bumped on every change (controller, length milestones)
  SelectionPolicy policy = SelectionPolicy::kDense;
  std::string policy_name = "dense";
  int64_t budget_tokens = 0;     // absolute budget B (used when budget_fraction == 0)
  double budget_fraction = 0.0;  // B(t) = round(budget_fraction · t)
  bool budget_matched = false;   // k chosen so that the real kept count with dilation ≈ B
  double target_delta = 0.0;     // δ* for the controller (0 = no control)
  std::vector<LayerSelectionPlan> layers;

  // Budget B(t) in tokens for context length t (at least sink + local of layer 0 is not
  // enforced here; callers clamp to t).
  int64_t Budget(int64_t t) const;
  // Top-k size for (`layer`, `kv_head`) at length t (see the file comment); for budget_matched
  // PrHS the dilation's growth (up to 2r·m extra tokens) is taken out of k.
  int64_t TopK(int layer, int64_t t, int kv_head = -1) const;
};

// Parameters of the presets, every one overridable by name through `overrides`
// ("sink", "local", "tau", "max_reuse", "dilate_r", "dilate_m_fraction", "psaw_start",
// "psaw_phi", "psaw_alpha", "etf_start", "etf_psi", "etf_gamma", "refresh_interval",
// "approx_channels", "budget_tokens", "budget_fraction", "gqa_max", "gate_unrotated", "follow"
// (0/1), "scan_slices", "scan_follow", "scan_reserve", "gate_delta", "gate_exact_delta",
// "gate_lse", "keep_trail" (0/1), "k_scale", "gate_error", "gate_exact_error"). Per-layer keys (all but budget_*, psaw_* and etf_*)
// also take the form "key@L": layer L only, winning over the plain key (e.g. gate_delta@2=0.08,
// max_reuse@0=0 for per-step selection in layer 0, k_scale@1=0.5).
// Defaults (chosen and measured in docs/quality.md):
//   prhs: sink 8, local 32, τ 0.8, max_reuse 64, m = k/3, r = 1; PSAW off (φ = 1; when
//         enabled it starts at layer N/2, α = 1) and ETF off — both measured to cost retrieval
//         on the shipped model (docs/quality.md), both available as overrides.
//   streaming: sink 8, local = B − 8.  h2o: local 32, heavy = B − 32 (no sinks).
//   quest: page granularity 16, top ⌈B/16⌉ pages incl. the current page.
//   hshare: sink 8, local 32, heavy refreshed every 2 steps on 16 calibrated channels.
//   oracle: exact top-B every step, no forced sink/local.
// Budget: SparsityOptions.budget in (0, 1] is a fraction of the context, > 1 an absolute token
// count; 0 = 1/8.
// Errors: INVALID_ARGUMENT naming the bad policy, override key or value.
absl::StatusOr<SelectionPlan> MakeSelectionPlan(const ModelConfig& model,
                                                const SparsityOptions& options,
                                                const std::map<std::string, double>& overrides = {});

// ETF's frozen rows for a prefill of `rows` prompt tokens from position 0 (what the CPU engine
// and the CUDA model apply): for layer l < min(num_layers, plan.layers.size()),
// floor(etf_freeze_fraction_l · rows) rounded down to whole pages of `page_size`, at most the
// pages before the last row (the last row always runs), made non-decreasing over layers; 0 for
// the other layers. Rows [0, result[l]) skip layer l. REQUIRES: rows >= 1, page_size >= 1.
std::vector<int64_t> EtfFrozenRows(const SelectionPlan& plan, int num_layers, int64_t rows,
                                   int page_size);

// Parses "key=value,key=value" into an overrides map; INVALID_ARGUMENT naming the bad item.
absl::StatusOr<std::map<std::string, double>> ParseOverrides(const std::string& text);

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_SELECTION_PLAN_H_
