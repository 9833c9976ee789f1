// CPU reference of the PrHS selection kernels (selection_prhs.h), for tests and benchmarks. It
// restates PrhsSelector (worker/selection/selector.cc: gate, Refresh, TopKIndices,
// MergeIndexSet, DroppedMass) on the GPU's data layout, without the worker library. Scores and
// cosines are float64 from the stored 16-bit inputs; ranking takes the scores as given (tests
// pass the GPU's own fp32 probabilities so index sets compare exactly).
#ifndef PREHOC_WORKER_KERNELS_SELECTION_REFERENCE_H_
#define PREHOC_WORKER_KERNELS_SELECTION_REFERENCE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "worker/kernels/paged_decode.h"

namespace prehoc::kernels {

// cos(q, a) over n elements in float64; -1 when either norm is 0 (PrhsSelector's convention).
double RefCosine(const uint16_t* q, const uint16_t* a, int n, AttnDType dtype);

// Logits s[g][j] = scale * q_g · K_j (float64) for kv head h of sequence b and all j < t, with
// the paged layout of paged_decode.h. q points at the group's first head [G][head_dim].
// Returns [G][t] row-major.
std::vector<double> RefGroupLogits(const uint16_t* q_group, int group, const uint16_t* k_pool,
                                   const int32_t* pages, int t, int kv_head, int num_kv_heads,
                                   int head_dim, double scale, AttnDType dtype);

// lse_g = log Σ_j exp(s[g][j]) per head, and p_j = (1/G) Σ_g exp(s[g][j] - lse_g).
void RefGroupProbs(const std::vector<double>& logits, int group, int t, std::vector<double>* lse,
                   std::vector<double>* probs);

// The k largest of scores[lo, hi) (k clamped to hi - lo), in descending order; ties: lower
// position first (TopKIndices).
std::vector<int32_t> RefTopK(std::span<const float> scores, int64_t lo, int64_t hi, int64_t k);

// CIS refresh set: top-k over [lo, hi), the best m = floor(m_fraction * |top|) dilated by
// ±1..r within [lo, hi), sorted unique (PrhsSelector::Refresh).
std::vector<int32_t> RefCisSet(std::span<const float> scores, int64_t lo, int64_t hi, int64_t k,
                               double m_fraction, int r);

// Sorted union [0, sink) ∪ middle ∪ [t − local, t), clamped to [0, t) (MergeIndexSet).
std::vector<int32_t> RefMergeIndexSet(int64_t sink, std::span<const int32_t> middle,
                                      int64_t local, int64_t t);

// 1 − Σ_{i∈S} probs[i], clamped to [0, 1] (DroppedMass).
double RefDroppedMass(std::span<const double> probs, std::span<const int32_t> indices);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_SELECTION_REFERENCE_H_
