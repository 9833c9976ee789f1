#include "worker/kernels/selection_reference.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "worker/kernels/attention_reference.h"

namespace prehoc::kernels {

double RefCosine(const uint16_t* q, const uint16_t* a, int n, AttnDType dtype) {
  double dot = 0, nq = 0, na = 0;
  for (int i = 0; i < n; ++i) {
    const double x = HalfBitsToDouble(q[i], dtype), y = HalfBitsToDouble(a[i], dtype);
    dot += x * y;
    nq += x * x;
    na += y * y;
  }
  return (nq > 0 && na > 0) ? dot / std::sqrt(nq * na) : -1.0;
}

std::vector<double> RefGroupLogits(const uint16_t* q_group, int group, const uint16_t* k_pool,
                                   const int32_t* pages, int t, int kv_head, int num_kv_heads,
                                   int head_dim, double scale, AttnDType dtype) {
  std::vector<double> s(static_cast<size_t>(group) * t);
  std::vector<double> q(static_cast<size_t>(group) * head_dim);
  for (size_t i = 0; i < q.size(); ++i) q[i] = HalfBitsToDouble(q_group[i], dtype);
  for (int j = 0; j < t; ++j) {
    const uint16_t* k = k_pool + ((static_cast<size_t>(pages[j / 16]) * num_kv_heads + kv_head) *
                                      16 + j % 16) * head_dim;
    for (int g = 0; g < group; ++g) {
      double dot = 0;
      for (int d = 0; d < head_dim; ++d) {
        dot += q[static_cast<size_t>(g) * head_dim + d] * HalfBitsToDouble(k[d], dtype);
      }
      s[static_cast<size_t>(g) * t + j] = dot * scale;
    }
  }
  return s;
}

void RefGroupProbs(const std::vector<double>& logits, int group, int t, std::vector<double>* lse,
                   std::vector<double>* probs) {
  lse->assign(group, -INFINITY);
  probs->assign(t, 0.0);
  for (int g = 0; g < group; ++g) {
    const double* s = logits.data() + static_cast<size_t>(g) * t;
    double mx = -INFINITY;
    for (int j = 0; j < t; ++j) mx = std::max(mx, s[j]);
    if (t == 0) continue;
    double sum = 0;
    for (int j = 0; j < t; ++j) sum += std::exp(s[j] - mx);
    (*lse)[g] = mx + std::log(sum);
    for (int j = 0; j < t; ++j) (*probs)[j] += std::exp(s[j] - (*lse)[g]) / group;
  }
}

std::vector<int32_t> RefTopK(std::span<const float> scores, int64_t lo, int64_t hi, int64_t k) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, static_cast<int64_t>(scores.size()));
  if (hi <= lo || k <= 0) return {};
  std::vector<int32_t> idx(hi - lo);
  std::iota(idx.begin(), idx.end(), static_cast<int32_t>(lo));
  k = std::min<int64_t>(k, hi - lo);
  auto better = [&](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), better);
  idx.resize(k);
  return idx;
}

std::vector<int32_t> RefCisSet(std::span<const float> scores, int64_t lo, int64_t hi, int64_t k,
                               double m_fraction, int r) {
  const std::vector<int32_t> top = RefTopK(scores, lo, hi, k);
  const int64_t m = static_cast<int64_t>(m_fraction * static_cast<double>(top.size()));
  std::vector<int32_t> set(top);
  for (int64_t i = 0; i < m; ++i) {
    for (int d = 1; d <= r; ++d) {
      if (top[i] - d >= lo) set.push_back(top[i] - d);
      if (top[i] + d < hi) set.push_back(top[i] + d);
    }
  }
  std::sort(set.begin(), set.end());
  set.erase(std::unique(set.begin(), set.end()), set.end());
  return set;
}

std::vector<int32_t> RefMergeIndexSet(int64_t sink, std::span<const int32_t> middle,
                                      int64_t local, int64_t t) {
  std::vector<int32_t> out;
  sink = std::clamp<int64_t>(sink, 0, t);
  const int64_t local_start = std::clamp<int64_t>(t - local, 0, t);
  for (int64_t i = 0; i < sink; ++i) out.push_back(static_cast<int32_t>(i));
  for (int32_t i : middle) {
    if (i >= sink && i < local_start) out.push_back(i);
  }
  for (int64_t i = std::max(local_start, sink); i < t; ++i) out.push_back(static_cast<int32_t>(i));
  std::sort(out.begin() + sink, out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

double RefDroppedMass(std::span<const double> probs, std::span<const int32_t> indices) {
  double kept = 0;
  for (int32_t i : indices) kept += probs[i];
  return std::clamp(1.0 - kept, 0.0, 1.0);
}

}  // namespace prehoc::kernels
