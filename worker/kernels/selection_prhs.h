// PrHS decode-time selection on the GPU (CIS gate, exact refresh scoring, top-k + dilation, and
// the per-step CSR index lists that paged_decode.h's sparse kernel reads), for one layer and a
// batch of sequences. Host-side API; kernels in selection_prhs.cuh. Includes only CUDA and std
// headers. The CPU reference of the same algorithm is PrhsSelector (worker/selection/
// selector.cc); selection_reference.h restates it for the tests. Algorithm: ALGORITHMS.md §2,
// docs/selection.md, docs/kernels.md ("PrHS selection").
//
// ---------------------------------------------------------------------------------------------
// Rows: r = b * num_kv_heads + h (sequence b, kv head h), G = num_q_heads / num_kv_heads, and the
// group of kv head h is query heads h*G .. h*G+G-1 (Hugging Face repeat_kv), contiguous in q.
//
// Inputs (device pointers, T = fp16 or bf16, the same T for q and the K pool):
//   q            [batch][num_q_heads][head_dim]                  T  (post-RoPE, this step)
//   k_pool       [num_pages][num_kv_heads][page_size][head_dim]  T  (paged_decode.h's layout)
//   page_indptr  [batch + 1], page_indices, seq_lens [batch]    int32 (paged_decode.h's contract;
//                seq_lens[b] = t includes the current token)
//   topk         [batch] int32: k(t) of the plan (>= 0), or -1 when the budget covers the whole
//                sequence (PrhsSelector's "Budget(t) >= t"): the row attends densely, the gate
//                is not evaluated and the CIS state is left untouched.
//                With topk_per_head, topk is [batch][num_kv_heads] (k per row r = b*Hkv + h:
//                the δ-controller's per-kv-head budgets); -1 then marks a dense row.
//   cand_lo      [batch] int32 or null: PSAW's lower bound P_l(t) (null = 0). Candidates of a
//                refresh are [lo, hi) with lo = max(sink, cand_lo[b]) and hi = t - local.
//   mode, sink_b, local_b  [batch] int32 each, or null: per-sequence policy (null mode = kCis for
//                every row) and sink / local window (null = the scalars sink / local), so that
//                sequences of different policies share one launch:
//                  kCis    (0) PrHS as below;
//                  kExact  (1) oracle top-k: the gate always refreshes (no share, the cos is not
//                              evaluated) and no dilation (m = 0); with sink_b = local_b = 0 the
//                              candidates are [cand_lo, t) and the list is exactly the top-k;
//                  kWindow (2) StreamingLLM: no gate, no scoring, CIS state untouched (as a dense
//                              row); the list is [0, min(sink, t)) ∪ [max(t - local, sink), t).
//                  kPages  (3) Quest (page size 16): k is a number of pages; every step the
//                              row's logical pages P = ceil(t / 16) are scored against the page
//                              bounds (below), s_p = Σ_g Σ_d max(q_gd·min_pd, q_gd·max_pd) (fp32),
//                              the last page's score is +inf (always kept), S_anchor = the k best
//                              pages (ties: lower page first), ascending; the list is every token
//                              of those pages (< t). refresh = 1 (no δ), valid = 1, reuse = 0;
//                              anchor_q is not written; sink and local are ignored.
//                  kHeavy  (4) H2O (H2OSelector): heavy hitters by accumulated attention
//                              probability + the recent window, permanent eviction. k = the
//                              heavy budget B - recent (never -1), sink_b = 0, local_b = recent.
//                              No gate, no scoring by stages (a)-(c1); PrhsHeavySelect (below)
//                              writes S_anchor = the kept heavy hitters (ascending) and
//                              PrhsHeavyObserve, after attention, adds the attention
//                              probabilities over the list to the kept tokens' scores.
//                  kApprox (5) HShare (HShareSelector) after its calibration: a row whose
//                              hs_source (below) is >= 0 shares that unit's S_anchor (refresh
//                              = 0); otherwise, with reuse counting the row's steps, at steps
//                              reuse % hs_interval == 0 it refreshes (refresh = 1): approximate
//                              scores a_j = Σ_g Σ_{c ∈ channels} q_gc·K_jc (fp32, channels in
//                              their stored order) over all t keys (into the probabilities' row
//                              of the workspace), S_anchor = the k largest over [sink, t - local)
//                              (ties: lower position first), no δ, no dilation; else it shares
//                              (refresh = 0, S_anchor kept). reuse += 1 and valid = 1 each step.
//                              Lists as kCis. REQUIRES valid = 1 and channels / hs_source set
//                              (PrhsHShareCalibrate + the caller's overlap map).
//   page_bounds  [num_pages][num_kv_heads][2][head_dim] T, or null (no kPages rows): per physical
//                page and kv head the element-wise min (index 0) and max (1) of the keys of the
//                page's tokens below the sequence length (QuestSelector's metadata). Maintained
//                by this step: for each sequence, the bounds of its logical pages
//                [bounds_from[b], ceil(t / 16)) are recomputed from K first (bounds_from [batch]
//                int32; the caller passes the page of the first position not folded at the last
//                step, 0 for a new sequence, and INT32_MAX for sequences without kPages rows).
// CIS state per state row (persistent across steps; the caller zero-fills valid and reuse once).
// State row of row r = b * num_kv_heads + h: r itself, or, with state_slot [batch] int32,
// state_slot[b] * num_kv_heads + h — a sequence keeps its state at a fixed slot of a pool while
// the batch's composition changes from step to step (slots distinct within a step):
//   anchor_q     [rows][G * head_dim]  T      the group's concatenated query at the last refresh
//   reuse        [rows] int32                 shares since the last refresh
//   valid        [rows] int32 (0/1)           an anchor exists
//   anchor_set   [rows][anchor_stride] int32  S_anchor: the dilated top-k, ascending, unique,
//                                             within [lo, hi) of its refresh
//   anchor_count [rows] int32                 |S_anchor| (<= anchor_stride)
// Per-step outputs:
//   refresh      [rows] int32: 0 = share (or dense row), 1 = refresh of a row with no anchor,
//                2 = refresh of a row whose previous set's δ is measured this step
//   cos          [rows] f32 (optional): cos(q group, anchor) when evaluated, else NaN
//   delta        [rows] f32 (optional): at refresh == 2, the exact dropped mass of the previous
//                index set [0, sink) ∪ S_anchor ∪ [t - local, t) on this step's scores
//                (δ = 1 - Σ_{i∈S} p_i, p = group-mean softmax over all t keys); NaN otherwise
//   index_indptr [rows + 1], index_indices [index_capacity] int32: CSR of logical token
//                positions per row (paged_decode.h's kToken selection), ascending:
//                [0, min(sink, t)) ∪ S_anchor ∪ [max(t - local, min(sink, t)), t), or [0, t) for a
//                dense row. Entries of S_anchor outside the middle range (only when sink/local
//                changed since the refresh) are written as -1, which the sparse kernel ignores.
//
// Step semantics per non-dense row (PrhsSelector::Select):
//   gate:    share = valid && reuse < max_reuse && cos(q_g, anchor_q) > tau, with
//            cos = dot / sqrt(|q|²|a|²) (-1 when a norm is 0); share → reuse += 1; else refresh:
//            anchor_q = q_g, reuse = 0, valid = 1.
//   refresh: scores s_gj = scale * q_g · K_j over all t keys, lse_g = log Σ_j exp(s_gj),
//            p_j = (1/G) Σ_g exp(s_gj - lse_g); k' = min(k, hi - lo); T = the k' largest p_j over
//            [lo, hi) (ties: lower position first); M = the best m = floor(m_fraction * k') of T;
//            S_anchor = T ∪ {i ± d : i ∈ M, 1 <= d <= dilate_r} ∩ [lo, hi), sorted unique.
//   lists:   the CSR above, for every row, every step (the local window moves with t).
// Precision: scores and probabilities in fp32 (fp32 accumulation of T products), cos in fp32.
// Ranking is exact on the computed fp32 probabilities (a total order by (p desc, position asc)).
//
// REQUIRES: head_dim 64 or 128, page_size 16, 1 <= G <= 8, batch * num_kv_heads <= 8192,
//   seq_lens[b] <= max_seq_len, anchor_stride >= k + 2 * dilate_r * floor(m_fraction * k) for
//   every k passed (entries past the stride are dropped), index_capacity >= the lists' total
//   (entries past it are not written), 0 <= dilate_r <= 64, sink and local constant for a row
//   between its refreshes and seq_lens non-decreasing (decode), or the caller clears valid.
// ---------------------------------------------------------------------------------------------
#ifndef PREHOC_WORKER_KERNELS_SELECTION_PRHS_H_
#define PREHOC_WORKER_KERNELS_SELECTION_PRHS_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "worker/kernels/paged_decode.h"

namespace prehoc::kernels {

// Per-sequence selection mode (PrhsSelectParams::d_mode).
enum PrhsRowMode : int32_t {
  kPrhsModeCis = 0,
  kPrhsModeExact = 1,
  kPrhsModeWindow = 2,
  kPrhsModePages = 3,
  kPrhsModeHeavy = 4,
  kPrhsModeApprox = 5
};

struct PrhsSelectParams {
  AttnDType dtype = AttnDType::kBFloat16;
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;  // REQUIRES: divides num_q_heads, G <= 8
  int head_dim = 128;    // 64 or 128
  int page_size = 16;    // 16
  int max_seq_len = 0;   // >= every seq_lens[b]; sizes the workspace

  // Plan (per layer; PrhsSelector's LayerSelectionPlan).
  int sink = 8;
  int local = 32;
  float tau = 0.8f;
  int max_reuse = 64;
  int dilate_r = 1;
  double dilate_m_fraction = 1.0 / 3.0;
  float scale = 0.0f;  // softmax scale; 0 = 1/sqrt(head_dim)

  const void* d_q = nullptr;
  const void* d_k_pool = nullptr;
  const int32_t* d_page_indptr = nullptr;
  const int32_t* d_page_indices = nullptr;
  const int32_t* d_seq_lens = nullptr;
  const int32_t* d_topk = nullptr;
  const int32_t* d_cand_lo = nullptr;  // optional
  bool topk_per_head = false;          // d_topk is [batch][num_kv_heads]
  const int32_t* d_mode = nullptr;     // optional [batch] PrhsRowMode (null = kCis)
  const int32_t* d_sink = nullptr;     // optional [batch] (null = sink)
  const int32_t* d_local = nullptr;    // optional [batch] (null = local)
  void* d_page_bounds = nullptr;          // kPages: [num_pages][Hkv][2][head_dim] T (this layer)
  const int32_t* d_bounds_from = nullptr; // kPages: [batch] first logical page to recompute

  const int32_t* d_state_slot = nullptr;  // optional [batch]: state rows slot * Hkv + h
  // kHeavy (H2O) state per state row (null when no row is kHeavy; see PrhsHeavySelect):
  int32_t* d_h2o_pos = nullptr;    // [rows][h2o_stride] tracked positions, ascending
  float* d_h2o_acc = nullptr;      // [rows][h2o_stride] their accumulated probabilities
  int32_t* d_h2o_count = nullptr;  // [rows] tracked entries
  int h2o_stride = 0;
  // kApprox (HShare) state per state row (null when no row is kApprox):
  int32_t* d_hs_channels = nullptr;      // [rows][hs_r] calibrated channels, best first
  const int32_t* d_hs_source = nullptr;  // [rows] unit (layer * Hkv + kv head) shared, or -1
  int hs_r = 0;                          // channels per row (1..head_dim)
  int hs_interval = 1;                   // refresh every hs_interval steps (>= 1)
  // The pools' first layer (the source unit's state row is source_layer * layer_rows +
  // slot * Hkv + source_head, slot from d_state_slot): anchor_set / anchor_count of layer 0.
  const int32_t* d_anchor_set_base = nullptr;
  const int32_t* d_anchor_count_base = nullptr;
  int64_t layer_rows = 0;                // state rows per layer of the pools
  void* d_anchor_q = nullptr;
  int32_t* d_reuse = nullptr;
  int32_t* d_valid = nullptr;
  int32_t* d_anchor_set = nullptr;
  int32_t* d_anchor_count = nullptr;
  int anchor_stride = 0;

  int32_t* d_refresh = nullptr;
  float* d_cos = nullptr;    // optional
  float* d_delta = nullptr;  // optional
  int32_t* d_index_indptr = nullptr;
  int32_t* d_index_indices = nullptr;
  int64_t index_capacity = 0;

  int num_sms = 0;  // 0 = query the current device
  void* d_workspace = nullptr;  // REQUIRES: >= PrhsSelectWorkspaceBytes(*this), 256-aligned
  size_t workspace_bytes = 0;
};

// nullptr when well-formed and supported, else a static message naming the field.
const char* PrhsSelectCheck(const PrhsSelectParams& p);

// Workspace bytes (SIZE_MAX when PrhsSelectCheck fails). Layout (each part 256-aligned, L =
// max_seq_len rounded up to 64): logits f32 [rows][G][L], probabilities f32 [rows][L],
// flags u8 [rows][L], lse f32 [rows][G].
size_t PrhsSelectWorkspaceBytes(const PrhsSelectParams& p);

// Views into the workspace after a step, for tests and telemetry: logits[(r*G + g)*L + j] = s_gj,
// probs[r*L + j] = p_j for j in [lo, hi) of rows refreshed with 0 < k < hi - lo (for kPages rows
// the page scores s_p, p < ceil(t / 16), last page +inf), lse[r*G + g] (natural log) of refreshed
// rows. Null pointers when the parameters are malformed.
struct PrhsWorkspaceView {
  const float* logits = nullptr;
  const float* probs = nullptr;
  const float* lse = nullptr;
  int64_t row_stride = 0;  // L
};
PrhsWorkspaceView PrhsSelectWorkspace(const PrhsSelectParams& p);

// The four stages (each enqueued on `stream`; cudaErrorInvalidValue when PrhsSelectCheck fails,
// else the launch error; asynchronous):
// (q) Quest page bounds: recomputes the bounds of pages [bounds_from[b], ceil(t / 16)) (no-op
//     when d_page_bounds is null).
cudaError_t PrhsPageBounds(const PrhsSelectParams& p, cudaStream_t stream);
// (a) gate: writes refresh/cos and updates reuse, valid, anchor_q.
cudaError_t PrhsGate(const PrhsSelectParams& p, cudaStream_t stream);
// (b) refresh scoring: logits of every key for rows with refresh != 0 (a persistent grid walks
//     the flagged rows' 256-token chunks; other rows cost nothing), and the page scores of kPages
//     rows (into the probabilities' rows of the workspace) when d_page_bounds is set.
cudaError_t PrhsRefreshScores(const PrhsSelectParams& p, cudaStream_t stream);
// (c1) refresh selection: lse, δ of the previous set, top-k + dilation → anchor_set/count (one
//      CTA per row; rows not flagged exit at once).
cudaError_t PrhsRefreshSelect(const PrhsSelectParams& p, cudaStream_t stream);
// (c2) CSR index lists for every row (sink ∪ S_anchor ∪ local window, or all tokens).
cudaError_t PrhsBuildIndexLists(const PrhsSelectParams& p, cudaStream_t stream);
// (h) H2O (kHeavy rows; no-op when d_h2o_pos is null), the CPU H2OSelector's Select per row:
//     state: valid = 0 before the first step; reuse = t_prev, the length at the last step; the
//     tracked list (h2o_pos / h2o_acc / h2o_count) = every position < t_prev not evicted, with
//     its accumulated score. Candidates: at the first step every position j < t with score
//     p_j = (1/G) Σ_g softmax_j(scale · q_g · K) over all t keys (GroupProbabilities); later the
//     tracked list plus the new positions [t_prev, t) with score 0. With hi = t - local: the k
//     candidates below hi of largest score (ties: lower position first) are kept, every other
//     candidate below hi is evicted for good; S_anchor = the kept ones (ascending), the tracked
//     list becomes kept ∪ the candidates >= hi; valid = 1, reuse = t. After the step the
//     workspace rows hold the candidates: positions as int32 in logits row r ([0, nc)), scores
//     in probs row r. REQUIRES h2o_stride >= the tracked list (<= the budget B(t) at every step)
//     and anchor_stride >= k (entries past either are dropped); t - local >= 0.
cudaError_t PrhsHeavySelect(const PrhsSelectParams& p, cudaStream_t stream);
// (o) H2O's Observe, after the sparse attention over this step's lists (index_indptr /
//     index_indices as PrhsBuildIndexLists wrote them): per kHeavy row, lse_g = log Σ_{j∈list}
//     exp(scale · q_g · K_j) and every tracked entry's score += Σ_g exp(s_gj - lse_g) / G (head
//     order; fp32). No-op when d_h2o_pos is null. Uses the logits part of the workspace.
cudaError_t PrhsHeavyObserve(const PrhsSelectParams& p, cudaStream_t stream);
// HShare calibration (rows whose mode in p.d_mode is kExact; call with a mode table that marks
// exactly the calibrating rows kExact and every other row kWindow): per row the hs_r channels of
// largest Σ_{j<t} |K_jc| (fp32; ties: lower channel first), best first, into d_hs_channels. The
// exact top-k of the overlap map is PrhsGate + PrhsRefreshScores + PrhsRefreshSelect with the
// same table (kExact rows: S_anchor = top-k over [sink, t - local)).
cudaError_t PrhsHShareCalibrate(const PrhsSelectParams& p, cudaStream_t stream);
// (s) HShare sharing: every kApprox row with hs_source >= 0 copies its source unit's S_anchor
//     and count (the source is updated earlier in the step: a lower layer, or a lower kv head of
//     this layer, whose refresh this step's (c1) has done). Part of PrhsSelectStep, before (c2).
cudaError_t PrhsHShareCopy(const PrhsSelectParams& p, cudaStream_t stream);
// (q) + (a) + (b) + (c1) + (h) + (s) + (c2): one selection step for the layer.
cudaError_t PrhsSelectStep(const PrhsSelectParams& p, cudaStream_t stream);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_SELECTION_PRHS_H_
