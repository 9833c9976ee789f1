#include "worker/selection/selector.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "worker/backends/cpu/cpu_ops.h"
#include "worker/rope.h"

namespace prehoc {

// ---------------------------------------------------------------------------------------------
// Helpers.

void GroupProbabilities(const float* q, const KvView& kv, int kv_head, int group, int head_dim,
                        std::vector<float>* probs, bool use_max) {
  const int t = kv.length();
  probs->assign(t, 0.0f);
  std::vector<float> s(t);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (int g = 0; g < group; ++g) {
    const float* qh = q + static_cast<size_t>(kv_head * group + g) * head_dim;
    float mx = -INFINITY;
    for (int j = 0; j < t; ++j) {
      s[j] = cpu::Dot(qh, kv.key(kv_head, j), head_dim) * scale;
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int j = 0; j < t; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    if (use_max) {
      const float inv = static_cast<float>(1.0 / sum);
      for (int j = 0; j < t; ++j) (*probs)[j] = std::max((*probs)[j], s[j] * inv);
    } else {
      const float inv = static_cast<float>(1.0 / (sum * group));
      for (int j = 0; j < t; ++j) (*probs)[j] += s[j] * inv;
    }
  }
}

double DroppedMass(std::span<const float> probs, std::span<const int32_t> indices) {
  double kept = 0;
  for (int32_t i : indices) kept += probs[i];
  return std::clamp(1.0 - kept, 0.0, 1.0);
}

double AttentionOutputError(const float* q, const KvView& kv, int kv_head, int group,
                            int head_dim, std::span<const int32_t> list,
                            std::vector<float>* group_probs) {
  const int t = kv.length(), hd = head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::vector<double> w(t), o(hd), os(hd);
  if (group_probs != nullptr) group_probs->assign(t, 0.0f);
  double err = 0;
  for (int g = 0; g < group; ++g) {
    // One dense pass per query head: softmax weights over all t keys, the dense output o and
    // the output over the list o_S (the same weights renormalised over S).
    const float* qh = q + static_cast<size_t>(kv_head * group + g) * hd;
    double mx = -INFINITY;
    for (int j = 0; j < t; ++j) mx = std::max(mx, w[j] = cpu::Dot(qh, kv.key(kv_head, j), hd) * scale);
    double sum = 0;
    for (int j = 0; j < t; ++j) sum += (w[j] = std::exp(w[j] - mx));
    std::fill(o.begin(), o.end(), 0.0);
    std::fill(os.begin(), os.end(), 0.0);
    for (int j = 0; j < t; ++j) {
      if (group_probs != nullptr) (*group_probs)[j] += static_cast<float>(w[j] / (sum * group));
      const float* v = kv.value(kv_head, j);
      for (int d = 0; d < hd; ++d) o[d] += w[j] * v[d];
    }
    double sum_s = 0;
    for (int32_t j : list) {
      sum_s += w[j];
      const float* v = kv.value(kv_head, j);
      for (int d = 0; d < hd; ++d) os[d] += w[j] * v[d];
    }
    double diff = 0, norm = 0;
    for (int d = 0; d < hd; ++d) {
      const double od = o[d] / sum, osd = sum_s > 0 ? os[d] / sum_s : 0.0;
      diff += (osd - od) * (osd - od);
      norm += od * od;
    }
    err += (norm > 0 ? std::sqrt(diff / norm) : (diff > 0 ? 1.0 : 0.0)) / group;
  }
  return err;
}

std::vector<int32_t> TopKIndices(std::span<const float> scores, int64_t lo, int64_t hi, int64_t k) {
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

std::vector<int32_t> MergeIndexSet(int64_t sink, std::span<const int32_t> middle, int64_t local,
                                   int64_t t) {
  std::vector<int32_t> out;
  sink = std::clamp<int64_t>(sink, 0, t);
  const int64_t local_start = std::clamp<int64_t>(t - local, 0, t);
  out.reserve(sink + middle.size() + (t - local_start));
  for (int64_t i = 0; i < sink; ++i) out.push_back(static_cast<int32_t>(i));
  for (int32_t i : middle) {
    if (i >= sink && i < local_start) out.push_back(i);
  }
  for (int64_t i = std::max(local_start, sink); i < t; ++i) out.push_back(static_cast<int32_t>(i));
  std::sort(out.begin() + sink, out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

namespace {
std::vector<int32_t> AllTokens(int64_t t) {
  std::vector<int32_t> v(t);
  std::iota(v.begin(), v.end(), 0);
  return v;
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Base.

SequenceSelector::SequenceSelector(const ModelConfig& model, const SelectionPlan& plan)
    : model_(model), plan_(plan) {
  telemetry_.refreshes_per_layer.assign(model.num_hidden_layers, 0);
  telemetry_.shares_per_layer.assign(model.num_hidden_layers, 0);
  telemetry_.refreshes_per_unit.assign(
      static_cast<size_t>(model.num_hidden_layers) * model.num_key_value_heads, 0);
}

void SequenceSelector::Account(int64_t kept, int64_t t) {
  ++telemetry_.selections;
  telemetry_.kept_tokens_sum += kept;
  telemetry_.kept_fraction_sum += t > 0 ? static_cast<double>(kept) / t : 1.0;
  telemetry_.context_keys_sum += t;
}

void SequenceSelector::SelectAndMeasure(int layer, const float* q, const KvView& kv,
                                        std::vector<std::vector<int32_t>>* out) {
  if (!measure_step_delta_) {  // the serving path: nothing to measure
    Select(layer, q, kv, out);
    return;
  }
  const int kvh = model_.num_key_value_heads;
  const size_t first = static_cast<size_t>(layer) * kvh;
  std::vector<int64_t>& per_unit = telemetry_.refreshes_per_unit;
  if (per_unit.size() < first + kvh) per_unit.resize(first + kvh, 0);
  const std::vector<int64_t> before(per_unit.begin() + first, per_unit.begin() + first + kvh);
  Select(layer, q, kv, out);
  const int group = model_.num_attention_heads / kvh;
  for (int kh = 0; kh < kvh; ++kh) {
    telemetry_.step_refreshed.push_back(per_unit[first + kh] != before[kh]);
    const double err =
        AttentionOutputError(q, kv, kh, group, model_.head_dim, (*out)[kh], &measure_probs_);
    telemetry_.step_delta.push_back(static_cast<float>(DroppedMass(measure_probs_, (*out)[kh])));
    telemetry_.step_delta_unit.push_back(static_cast<int16_t>(layer * kvh + kh));
    telemetry_.step_output_error.push_back(static_cast<float>(err));
  }
}

SparsityReport SequenceSelector::Report() const {
  SparsityReport r;
  r.policy = plan_.policy_name;
  r.mean_kept_fraction =
      telemetry_.selections > 0 ? telemetry_.kept_fraction_sum / telemetry_.selections : 1.0;
  r.refreshes = telemetry_.refreshes;
  r.shares = telemetry_.shares;
  const std::vector<float>& d =
      telemetry_.refresh_delta.empty() ? telemetry_.step_delta : telemetry_.refresh_delta;
  if (!d.empty()) {
    double sum = 0, mx = 0;
    for (float x : d) {
      sum += x;
      mx = std::max<double>(mx, x);
    }
    r.mean_delta = sum / d.size();
    r.max_delta = mx;
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Policies.

namespace {

class DenseSelector : public SequenceSelector {
 public:
  DenseSelector(const ModelConfig& m, const SelectionPlan& p) : SequenceSelector(m, p) {}
  bool is_dense() const override { return true; }
  void Select(int layer, const float* q, const KvView& kv,
              std::vector<std::vector<int32_t>>* out) override {
    out->assign(model_.num_key_value_heads, AllTokens(kv.length()));
    for (int kh = 0; kh < model_.num_key_value_heads; ++kh) Account(kv.length(), kv.length());
  }
};

// Exact top-B by group-mean attention probability, every step.
class OracleSelector : public SequenceSelector {
 public:
  OracleSelector(const ModelConfig& m, const SelectionPlan& p) : SequenceSelector(m, p) {}
  void Select(int layer, const float* q, const KvView& kv,
              std::vector<std::vector<int32_t>>* out) override {
    const int t = kv.length(), group = model_.num_attention_heads / model_.num_key_value_heads;
    out->resize(model_.num_key_value_heads);
    const int64_t budget = std::min<int64_t>(plan_.Budget(t), t);
    for (int kh = 0; kh < model_.num_key_value_heads; ++kh) {
      auto& s = (*out)[kh];
      if (budget >= t) {
        s = AllTokens(t);
      } else {
        GroupProbabilities(q, kv, kh, group, model_.head_dim, &probs_);
        s = TopKIndices(probs_, 0, t, budget);
        std::sort(s.begin(), s.end());
        telemetry_.scored_keys_sum += t;
        ++telemetry_.refreshes;
        ++telemetry_.refreshes_per_layer[layer];
        ++telemetry_.refreshes_per_unit[layer * model_.num_key_value_heads + kh];
      }
      Account(static_cast<int64_t>(s.size()), t);
    }
  }

 private:
  std::vector<float> probs_;
};

// StreamingLLM: sinks + the most recent B − sink tokens.
class StreamingSelector : public SequenceSelector {
 public:
  StreamingSelector(const ModelConfig& m, const SelectionPlan& p) : SequenceSelector(m, p) {}
  void Select(int layer, const float* q, const KvView& kv,
              std::vector<std::vector<int32_t>>* out) override {
    const int t = kv.length();
    const LayerSelectionPlan& lp = plan_.layers[layer];
    const int64_t budget = std::max<int64_t>(plan_.Budget(t), lp.sink + 1);
    std::vector<int32_t> s = MergeIndexSet(lp.sink, {}, budget - lp.sink, t);
    out->assign(model_.num_key_value_heads, s);
    for (int kh = 0; kh < model_.num_key_value_heads; ++kh) Account(static_cast<int64_t>(s.size()), t);
  }
};

// H2O: heavy hitters by attention accumulated over decode steps (initialised from the first
// decode query's full attention, standing in for the prefill column sums) + recent window.
// Tokens that fall out are evicted for good.
class H2OSelector : public SequenceSelector {
 public:
  H2OSelector(const ModelConfig& m, const SelectionPlan& p)
      : SequenceSelector(m, p), state_(m.num_hidden_layers * m.num_key_value_heads) {}
  bool wants_observe() const override { return true; }
  void Select(int layer, const float* q, const KvView& kv,
              std::vector<std::vector<int32_t>>* out) override {
    const int t = kv.length(), group = model_.num_attention_heads / model_.num_key_value_heads;
    const LayerSelectionPlan& lp = plan_.layers[layer];
    out->resize(model_.num_key_value_heads);
    const int64_t budget = std::min<int64_t>(std::max<int64_t>(plan_.Budget(t), 1), t);
    const int64_t recent = std::min<int64_t>(lp.local, budget);
    const int64_t heavy = budget - recent;
    for (int kh = 0; kh < model_.num_key_value_heads; ++kh) {
      State& st = state_[layer * model_.num_key_value_heads + kh];
      if (st.acc.empty()) {
        GroupProbabilities(q, kv, kh, group, model_.head_dim, &st.acc);
        st.evicted.assign(t, false);
      }
      st.acc.resize(t, 0.0f);
      st.evicted.resize(t, false);
      std::vector<float> masked(st.acc);
      for (int j = 0; j < t; ++j) {
        if (st.evicted[j]) masked[j] = -INFINITY;
      }
      const int64_t hi = t - recent;
      std::vector<int32_t> top = TopKIndices(masked, 0, hi, heavy);
      std::vector<bool> keep(t, false);
      for (int32_t i : top) keep[i] = !st.evicted[i];
      for (int64_t j = 0; j < hi; ++j) {
        if (!keep[j]) st.evicted[j] = true;
      }
      std::vector<int32_t> mid;
      for (int32_t i : top) {
        if (keep[i]) mid.push_back(i);
      }
      (*out)[kh] = MergeIndexSet(0, mid, recent, t);
      Account(static_cast<int64_t>((*out)[kh].size()), t);
    }
  }
  void Observe(int layer, int head, std::span<const int32_t> indices,
               std::span<const float> probs) override {
    const int group = model_.num_attention_heads / model_.num_key_value_heads;
    State& st = state_[layer * model_.num_key_value_heads + head / group];
    for (size_t i = 0; i < indices.size(); ++i) st.acc[indices[i]] += probs[i] / group;
  }

 private:
  struct State {
    std::vector<float> acc;
    std::vector<bool> evicted;
  };
  std::vector<State> state_;
};

// Quest: per logical page, element-wise min and max of the keys; page score for query q is
// Σ_d max(q_d·min_d, q_d·max_d) (summed over the group's heads); attend to the top ⌈B/page⌉
// pages, always including the current (last) page.
class QuestSelector : public SequenceSelector {
 public:
  QuestSelector(const ModelConfig& m, const SelectionPlan& p)
      : SequenceSelector(m, p), state_(m.num_hidden_layers * m.num_key_value_heads) {}
  void Select(int layer, const float* q, const KvView& kv,
              std::vector<std::vector<int32_t>>* out) override {
    const int t = kv.length(), hd = model_.head_dim, ps = kv.page_size();
    const int group = model_.num_attention_heads / model_.num_key_value_heads;
    const int num_pages = (t + ps - 1) / ps;
    const int64_t want_pages = std::max<int64_t>(1, (plan_.Budget(t) + ps - 1) / ps);
    out->resize(model_.num_key_value_heads);
    for (int kh = 0; kh < model_.num_key_value_heads; ++kh) {
      State& st = state_[layer * model_.num_key_value_heads + kh];
      // Fold keys not yet seen into their page's bounds (a page's bounds are final once full).
      st.mins.resize(static_cast<size_t>(num_pages) * hd, INFINITY);
      st.maxs.resize(static_cast<size_t>(num_pages) * hd, -INFINITY);
      for (int j = st.seen; j < t; ++j) {
        const float* k = kv.key(kh, j);
        float* mn = st.mins.data() + static_cast<size_t>(j / ps) * hd;
        float* mx = st.maxs.data() + static_cast<size_t>(j / ps) * hd;
        for (int d = 0; d < hd; ++d) {
          mn[d] = std::min(mn[d], k[d]);
          mx[d] = std::max(mx[d], k[d]);
        }
      }
      st.seen = t;
      std::vector<int32_t>& s = (*out)[kh];
      if (want_pages >= num_pages) {
        s = AllTokens(t);
      } else {
        std::vector<float> score(num_pages, 0.0f);
        for (int p = 0; p < num_pages; ++p) {
          const float* mn = st.mins.data() + static_cast<size_t>(p) * hd;
          const float* mx = st.maxs.data() + static_cast<size_t>(p) * hd;
          for (int g = 0; g < group; ++g) {
            const float* qh = q + static_cast<size_t>(kh * group + g) * hd;
            for (int d = 0; d < hd; ++d) score[p] += std::max(qh[d] * mn[d], qh[d] * mx[d]);
          }
        }
        score[num_pages - 1] = INFINITY;  // the current page is always attended
        std::vector<int32_t> pages = TopKIndices(score, 0, num_pages, want_pages);
        std::sort(pages.begin(), pages.end());
        s.clear();
        for (int32_t p : pages) {
          for (int j = p * ps; j < std::min(t, (p + 1) * ps); ++j) s.push_back(j);
        }
        ++telemetry_.refreshes;
        ++telemetry_.refreshes_per_layer[layer];
      }
      Account(static_cast<int64_t>(s.size()), t);
    }
  }

 private:
  struct State {
    int seen = 0;
    std::vector<float> mins, maxs;
  };
  std::vector<State> state_;
};

// PrHS: CIS (clustered indices sharing over time) with PSAW candidate windows.
class PrhsSelector : public SequenceSelector {
 public:
  PrhsSelector(const ModelConfig& m, const SelectionPlan& p)
      : SequenceSelector(m, p), state_(m.num_hidden_layers * m.num_key_value_heads) {}
  void Select(int layer, const float* q, const KvView& kv,
              std::vector<std::vector<int32_t>>* out) override {
    const int t = kv.length(), hd = model_.head_dim;
    const int group = model_.num_attention_heads / model_.num_key_value_heads;
    const LayerSelectionPlan& lp = plan_.layers[layer];
    out->resize(model_.num_key_value_heads);
    for (int kh = 0; kh < model_.num_key_value_heads; ++kh) {
      const int64_t k = plan_.TopK(layer, t, kh);
      std::vector<int32_t>& s = (*out)[kh];
      if (plan_.Budget(t) >= t) {  // budget covers the whole context: attend densely
        s = AllTokens(t);
        Account(t, t);
        continue;
      }
      State& st = state_[layer * model_.num_key_value_heads + kh];
      const float* qg = GateQuery(q, kh, group, t, lp);
      const int qlen = group * hd;
      bool share = st.valid && st.reuse < lp.max_reuse;
      if (share) {
        double dot = 0, nq = 0, na = 0;
        for (int i = 0; i < qlen; ++i) {
          dot += static_cast<double>(qg[i]) * st.anchor[i];
          nq += static_cast<double>(qg[i]) * qg[i];
          na += static_cast<double>(st.anchor[i]) * st.anchor[i];
        }
        const double cos = (nq > 0 && na > 0) ? dot / std::sqrt(nq * na) : -1.0;
        share = cos > lp.tau;
      }
      if (share && lp.gate_exact_delta > 0) {
        // Diagnostic gate on the exact dropped mass of the list a share would use.
        GroupProbabilities(q, kv, kh, group, hd, &probs_);
        telemetry_.scored_keys_sum += t;
        share = DroppedMass(probs_, SharedList(lp, st, st.reuse + 1, t)) <=
                st.anchor_delta + lp.gate_exact_delta;
      }
      if (share && lp.gate_exact_error > 0) {
        // Diagnostic gate on the exact attention-output error of the list a share would use.
        telemetry_.scored_keys_sum += t;
        share = AttentionOutputError(q, kv, kh, group, hd, SharedList(lp, st, st.reuse + 1, t)) <=
                st.anchor_error + lp.gate_exact_error;
      }
      if (share && lp.gate_lse > 0) {
        // The shared list's log-sum-exp (the sparse attention's own) fell from the refresh's.
        share = st.anchor_lse - MeanLse(q, kv, kh, group, SharedList(lp, st, st.reuse + 1, t)) <=
                lp.gate_lse;
      }
      if (share && lp.scan_slices > 0) share = Scan(q, kv, kh, group, lp, st.reuse + 1, &st);
      if (share) {
        ++st.reuse;
        ++telemetry_.shares;
        ++telemetry_.shares_per_layer[layer];
        s = SharedList(lp, st, st.reuse, t);
      } else {
        Refresh(layer, kh, q, kv, group, lp, k, &st);
        s = MergeIndexSet(lp.sink, st.set, lp.local, t);
      }
      Account(static_cast<int64_t>(s.size()), t);
    }
  }

 private:
  struct State {
    bool valid = false;
    int reuse = 0;
    std::vector<float> anchor;
    std::vector<int32_t> set;   // sorted, unique; excludes nothing (merge clamps)
    std::vector<int32_t> best;  // the best m of the refresh's top-k (the dilated ones)
    double anchor_delta = 0;    // exact dropped mass of the refreshed list at its refresh
    double anchor_lse = 0;      // gate_lse: the refreshed list's mean log-sum-exp at its refresh
    double anchor_error = 0;    // gate_error / gate_exact_error: the list's output error then
    int64_t scan_phase = 0;     // rotating slice of the incremental scan
    int64_t window_start = 0;   // t − local at the refresh (keep_trail)
    std::vector<int32_t> reserve;  // scan_reserve: out-of-set runner-ups scored every scan
    size_t reserve_size = 0;
  };

  // The list a share `reuse` steps after the refresh uses: sink ∪ set ∪ local, and with
  // `follow` the best m anchors' ±r neighbourhoods shifted by `reuse` (copy heads read a target
  // that advances one position per generated token).
  // With keep_trail the local window still reaches back to where it began at the refresh.
  std::vector<int32_t> SharedList(const LayerSelectionPlan& lp, const State& st, int reuse,
                                  int t) {
    const int64_t local =
        lp.keep_trail ? std::max<int64_t>(lp.local, t - st.window_start) : lp.local;
    if (!lp.follow) return MergeIndexSet(lp.sink, st.set, local, t);
    followed_ = st.set;
    for (int32_t b : st.best) {
      for (int d = -lp.dilate_r; d <= lp.dilate_r; ++d) followed_.push_back(b + reuse + d);
    }
    return MergeIndexSet(lp.sink, followed_, local, t);
  }

  // Incremental scan of a share step (scan_slices > 0). Scores exactly the list the share would
  // use (what the sparse attention computes anyway) and every scan_slices-th out-of-set
  // candidate of [lo, t − local) (a slice that rotates with each scan). The out-of-set mass is
  // estimated per query head as the slice's mass scaled to all out-of-set candidates; a key's
  // score is its group-mean probability under (kept + estimated out-of-set) mass. With
  // gate_delta > 0, returns false (refresh) when the estimated dropped mass exceeds
  // st->anchor_delta + gate_delta, and with gate_error > 0 when the estimated attention-output
  // error of the kept list (the same stratified estimate, with the scanned keys' values) exceeds
  // st->anchor_error + gate_error. Otherwise swaps slice keys into st->set where they beat its
  // weakest members (members that left [lo, t − local) count as weakest), keeping |st->set|;
  // then the next position j + 1 of each of the scan_follow strongest kept candidates j joins
  // the set unscored in place of the weakest remaining member (a copy head's target moves one
  // position per token, and j + 1 is not strong yet when it must already be kept).
  bool Scan(const float* q, const KvView& kv, int kh, int group, const LayerSelectionPlan& lp,
            int reuse, State* st) {
    const int t = kv.length();
    const int64_t lo = std::max<int64_t>(lp.sink, static_cast<int64_t>(lp.psaw_drop_fraction * t));
    const int64_t hi = t - lp.local;
    if (hi <= lo) return true;
    const std::vector<int32_t> kept = SharedList(lp, *st, reuse, t);
    in_list_.assign(hi - lo, 0);
    int64_t n_out = hi - lo;
    for (int32_t j : kept) {
      if (j >= lo && j < hi) {
        in_list_[j - lo] = 1;
        --n_out;
      }
    }
    const int R = lp.scan_slices;
    const int64_t phase = st->scan_phase++ % R;
    // Candidates: the reserve (runner-ups, scored every step) first, then the slice.
    cand_.clear();
    for (int32_t j : st->reserve) {
      if (j >= lo && j < hi && !in_list_[j - lo]) {
        cand_.push_back(j);
        in_list_[j - lo] = 2;
      }
    }
    const size_t n_res = cand_.size();
    for (int64_t j = lo + ((phase - lo % R) % R + R) % R; j < hi; j += R) {
      if (!in_list_[j - lo]) cand_.push_back(static_cast<int32_t>(j));
    }
    const size_t nk = kept.size(), nc = cand_.size(), n_slice = nc - n_res;
    Logits(q, kv, kh, group, kept, &kept_logits_);
    Logits(q, kv, kh, group, cand_, &cand_logits_);
    telemetry_.scored_keys_sum += static_cast<int64_t>(nc);
    // Per head: normaliser = kept mass + reserve mass + slice mass scaled to the other
    // out-of-set candidates (a stratified estimate of the out-of-set mass).
    head_max_.assign(group, -INFINITY);
    head_norm_.assign(group, 0.0);
    const int hd = model_.head_dim;
    double delta = 0, error = 0;
    for (int g = 0; g < group; ++g) {
      float mx = -INFINITY;
      for (size_t i = 0; i < nk; ++i) mx = std::max(mx, kept_logits_[g * nk + i]);
      for (size_t i = 0; i < nc; ++i) mx = std::max(mx, cand_logits_[g * nc + i]);
      double zk = 0, zr = 0, zs = 0;
      for (size_t i = 0; i < nk; ++i) zk += std::exp(static_cast<double>(kept_logits_[g * nk + i] - mx));
      for (size_t i = 0; i < nc; ++i) {
        (i < n_res ? zr : zs) += std::exp(static_cast<double>(cand_logits_[g * nc + i] - mx));
      }
      const int64_t n_tail = n_out - static_cast<int64_t>(n_res);
      const double zout =
          zr + (n_slice > 0 ? zs * static_cast<double>(n_tail) / static_cast<double>(n_slice) : 0.0);
      head_max_[g] = mx;
      head_norm_[g] = zk + zout;
      delta += zout / (zk + zout) / group;
      if (lp.gate_error > 0) {
        // Output over the kept list (what the sparse attention computes) against the estimated
        // dense output: kept + reserve exact + slice scaled to the rest, values included.
        const double f = n_slice > 0 ? static_cast<double>(n_tail) / static_cast<double>(n_slice) : 0.0;
        num_kept_.assign(hd, 0.0);
        num_out_.assign(hd, 0.0);
        for (size_t i = 0; i < nk; ++i) {
          const double w = std::exp(static_cast<double>(kept_logits_[g * nk + i] - mx));
          const float* v = kv.value(kh, kept[i]);
          for (int d = 0; d < hd; ++d) num_kept_[d] += w * v[d];
        }
        for (size_t i = 0; i < nc; ++i) {
          const double w = std::exp(static_cast<double>(cand_logits_[g * nc + i] - mx)) * (i < n_res ? 1.0 : f);
          const float* v = kv.value(kh, cand_[i]);
          for (int d = 0; d < hd; ++d) num_out_[d] += w * v[d];
        }
        double diff = 0, norm = 0;
        for (int d = 0; d < hd; ++d) {
          const double o = (num_kept_[d] + num_out_[d]) / (zk + zout), os = num_kept_[d] / zk;
          diff += (os - o) * (os - o);
          norm += o * o;
        }
        error += (norm > 0 ? std::sqrt(diff / norm) : 0.0) / group;
      }
    }
    if (lp.gate_error > 0) telemetry_.scored_keys_sum += static_cast<int64_t>(nc);  // their values
    if (lp.gate_delta > 0 && delta > st->anchor_delta + lp.gate_delta) return false;
    if (lp.gate_error > 0 && error > st->anchor_error + lp.gate_error) return false;
    auto prob = [&](const std::vector<float>& l, size_t n, size_t i) {
      double p = 0;
      for (int g = 0; g < group; ++g) {
        p += std::exp(static_cast<double>(l[g * n + i] - head_max_[g])) / head_norm_[g];
      }
      return p / group;
    };
    // Members of st->set, weakest first (outside [lo, hi) = weakest: the window or PSAW covers
    // them now). Kept list positions are found by binary search (kept is sorted).
    std::vector<std::pair<double, int32_t>> members;
    members.reserve(st->set.size());
    for (int32_t j : st->set) {
      double p = -1.0;
      if (j >= lo && j < hi) {
        const size_t i = std::lower_bound(kept.begin(), kept.end(), j) - kept.begin();
        p = prob(kept_logits_, nk, i);
      }
      members.emplace_back(p, j);
    }
    std::sort(members.begin(), members.end());
    std::vector<std::pair<double, int32_t>> incoming;
    incoming.reserve(nc);
    for (size_t i = 0; i < nc; ++i) incoming.emplace_back(prob(cand_logits_, nc, i), cand_[i]);
    std::sort(incoming.begin(), incoming.end(), std::greater<>());
    bool changed = false;
    std::vector<std::pair<double, int32_t>> evicted;
    size_t swapped = 0;
    for (; swapped < incoming.size() && swapped < members.size(); ++swapped) {
      if (incoming[swapped].first <= members[swapped].first) break;
      if (members[swapped].first >= 0) evicted.push_back(members[swapped]);
      members[swapped] = incoming[swapped];
      changed = true;
    }
    if (lp.scan_reserve > 0) {
      // Next reserve: the best of the candidates not swapped in and the evicted members.
      evicted.insert(evicted.end(), incoming.begin() + swapped, incoming.end());
      std::sort(evicted.begin(), evicted.end(), std::greater<>());
      const size_t n = std::min(evicted.size(), st->reserve_size);
      st->reserve.clear();
      for (size_t i = 0; i < n; ++i) st->reserve.push_back(evicted[i].second);
    }
    if (lp.scan_follow > 0 && !members.empty()) {
      std::vector<float> strength(nk, -INFINITY);  // group-mean logit of kept candidates
      for (size_t i = 0; i < nk; ++i) {
        if (kept[i] < lo || kept[i] >= hi) continue;
        float sum = 0;
        for (int g = 0; g < group; ++g) sum += kept_logits_[g * nk + i];
        strength[i] = sum / group;
      }
      std::sort(members.begin(), members.end());
      size_t weakest = 0;
      for (int32_t i : TopKIndices(strength, 0, static_cast<int64_t>(nk), lp.scan_follow)) {
        const int64_t next = static_cast<int64_t>(kept[i]) + 1;
        if (strength[i] == -INFINITY || next >= hi || in_list_[next - lo] == 1) continue;
        bool member = false;
        for (const auto& m : members) member = member || m.second == next;
        if (member || weakest >= members.size()) continue;
        members[weakest++] = {INFINITY, static_cast<int32_t>(next)};
        changed = true;
      }
    }
    if (changed) {
      st->set.clear();
      for (const auto& m : members) st->set.push_back(m.second);
      std::sort(st->set.begin(), st->set.end());
      st->set.erase(std::unique(st->set.begin(), st->set.end()), st->set.end());
    }
    return true;
  }

  // Exact logits scale·q_h·K_j of the group's query heads over `idx`, head-major.
  void Logits(const float* q, const KvView& kv, int kh, int group, std::span<const int32_t> idx,
              std::vector<float>* out) const {
    const int hd = model_.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    out->resize(static_cast<size_t>(group) * idx.size());
    for (int g = 0; g < group; ++g) {
      const float* qh = q + static_cast<size_t>(kh * group + g) * hd;
      for (size_t i = 0; i < idx.size(); ++i) {
        (*out)[g * idx.size() + i] = cpu::Dot(qh, kv.key(kh, idx[i]), hd) * scale;
      }
    }
  }

  // Mean over the group's query heads of log Σ_{j ∈ list} exp(logit_hj): the log-sum-exp the
  // sparse attention over `list` computes.
  double MeanLse(const float* q, const KvView& kv, int kh, int group, std::span<const int32_t> list) {
    Logits(q, kv, kh, group, list, &kept_logits_);
    const size_t n = list.size();
    double sum = 0;
    for (int g = 0; g < group; ++g) {
      float mx = -INFINITY;
      for (size_t i = 0; i < n; ++i) mx = std::max(mx, kept_logits_[g * n + i]);
      double z = 0;
      for (size_t i = 0; i < n; ++i) z += std::exp(static_cast<double>(kept_logits_[g * n + i] - mx));
      sum += mx + std::log(z);
    }
    return sum / group;
  }

  void Refresh(int layer, int kh, const float* q, const KvView& kv, int group,
               const LayerSelectionPlan& lp, int64_t k, State* st) {
    const int t = kv.length();
    const float* qg = GateQuery(q, kh, group, t, lp);
    const int qlen = group * model_.head_dim;
    GroupProbabilities(q, kv, kh, group, model_.head_dim, &probs_);
    if (lp.gqa_max) GroupProbabilities(q, kv, kh, group, model_.head_dim, &rank_, true);
    const std::vector<float>& rank = lp.gqa_max ? rank_ : probs_;
    if (st->valid) {
      // Exact δ of the set that was in use until now, on this step's exact scores.
      const std::vector<int32_t> prev = MergeIndexSet(lp.sink, st->set, lp.local, t);
      telemetry_.refresh_delta.push_back(static_cast<float>(DroppedMass(probs_, prev)));
      telemetry_.refresh_delta_layer.push_back(static_cast<int16_t>(layer));
      telemetry_.refresh_delta_head.push_back(static_cast<int16_t>(kh));
    }
    const int64_t lo = std::max<int64_t>(lp.sink, static_cast<int64_t>(lp.psaw_drop_fraction * t));
    const int64_t hi = t - lp.local;
    std::vector<int32_t> top = TopKIndices(rank, lo, hi, k);
    const int64_t m = static_cast<int64_t>(lp.dilate_m_fraction * static_cast<double>(top.size()));
    std::vector<int32_t> set(top);
    for (int64_t i = 0; i < m; ++i) {
      for (int d = 1; d <= lp.dilate_r; ++d) {
        if (top[i] - d >= lo) set.push_back(top[i] - d);
        if (top[i] + d < hi) set.push_back(top[i] + d);
      }
    }
    std::sort(set.begin(), set.end());
    set.erase(std::unique(set.begin(), set.end()), set.end());
    st->set = std::move(set);
    if (lp.gate_delta > 0 || lp.gate_exact_delta > 0) {
      st->anchor_delta = DroppedMass(probs_, MergeIndexSet(lp.sink, st->set, lp.local, t));
    }
    if (lp.scan_slices > 0 && lp.scan_reserve > 0) {
      // Runner-ups: the best candidates after the set, scored on every scan.
      st->reserve_size = static_cast<size_t>(std::ceil(lp.scan_reserve * st->set.size()));
      st->reserve.clear();
      for (int32_t j : TopKIndices(rank, lo, hi, static_cast<int64_t>(st->set.size() + st->reserve_size))) {
        if (st->reserve.size() < st->reserve_size &&
            !std::binary_search(st->set.begin(), st->set.end(), j)) {
          st->reserve.push_back(j);
        }
      }
    }
    if (lp.gate_error > 0 || lp.gate_exact_error > 0) {
      // Exact output error of the refreshed list (reads every value: counted as t more keys).
      st->anchor_error = AttentionOutputError(q, kv, kh, group, model_.head_dim,
                                              MergeIndexSet(lp.sink, st->set, lp.local, t));
      telemetry_.scored_keys_sum += t;
    }
    if (lp.gate_lse > 0) st->anchor_lse = MeanLse(q, kv, kh, group, MergeIndexSet(lp.sink, st->set, lp.local, t));
    telemetry_.scored_keys_sum += t;
    st->window_start = std::max<int64_t>(0, t - lp.local);
    st->best.assign(top.begin(), top.begin() + m);
    st->anchor.assign(qg, qg + qlen);
    st->reuse = 0;
    st->valid = true;
    ++telemetry_.refreshes;
    ++telemetry_.refreshes_per_layer[layer];
    ++telemetry_.refreshes_per_unit[layer * model_.num_key_value_heads + kh];
  }

  // The group's queries as the gate compares them: post-RoPE as given, or rotated back to
  // position 0 (the current token is at position t − 1). Valid until the next call.
  const float* GateQuery(const float* q, int kh, int group, int t, const LayerSelectionPlan& lp) {
    const float* qg = q + static_cast<size_t>(kh * group) * model_.head_dim;  // contiguous group
    if (!lp.gate_unrotated) return qg;
    if (inv_freq_.empty()) inv_freq_ = RopeInvFrequencies(model_);
    gate_q_.assign(qg, qg + static_cast<size_t>(group) * model_.head_dim);
    ApplyRope(gate_q_.data(), group, model_.head_dim, -(t - 1), inv_freq_);
    return gate_q_.data();
  }

  std::vector<State> state_;
  std::vector<float> probs_;
  std::vector<float> rank_;
  std::vector<float> inv_freq_;
  std::vector<float> gate_q_;
  std::vector<int32_t> followed_;
  std::vector<char> in_list_;  // Scan: 1 = in the list, over [lo, hi)
  std::vector<int32_t> cand_;
  std::vector<float> kept_logits_, cand_logits_;
  std::vector<float> head_max_;
  std::vector<double> head_norm_;
  std::vector<double> num_kept_, num_out_;  // Scan: weighted value sums (gate_error)
};

// HShare-style baseline: sink + heavy + local, the heavy set chosen every refresh_interval steps
// from approximate scores on `approx_channels` channels calibrated at the first decode step
// (largest mean |K|); at calibration a greedy overlap map lets a (layer, kv head) whose exact
// top-k overlaps an earlier one's by ≥ 50 % reuse that one's heavy set (cross-head and
// cross-layer sharing).
class HShareSelector : public SequenceSelector {
 public:
  HShareSelector(const ModelConfig& m, const SelectionPlan& p)
      : SequenceSelector(m, p), state_(m.num_hidden_layers * m.num_key_value_heads) {}
  void Select(int layer, const float* q, const KvView& kv,
              std::vector<std::vector<int32_t>>* out) override {
    const int t = kv.length(), hd = model_.head_dim, KVH = model_.num_key_value_heads;
    const int group = model_.num_attention_heads / KVH;
    const LayerSelectionPlan& lp = plan_.layers[layer];
    out->resize(KVH);
    for (int kh = 0; kh < KVH; ++kh) {
      const int64_t k = plan_.TopK(layer, t, kh);
      std::vector<int32_t>& s = (*out)[kh];
      if (plan_.Budget(t) >= t) {
        s = AllTokens(t);
        Account(t, t);
        continue;
      }
      const int id = layer * KVH + kh;
      State& st = state_[id];
      if (!st.calibrated) Calibrate(layer, kh, q, kv, group, lp, k, &st);
      if (st.source >= 0) {
        st.heavy = state_[st.source].heavy;  // shared from the representative
        ++telemetry_.shares;
        ++telemetry_.shares_per_layer[layer];
      } else if (st.steps % lp.refresh_interval == 0) {
        std::vector<float> approx(t, 0.0f);
        for (int j = 0; j < t; ++j) {
          const float* key = kv.key(kh, j);
          float a = 0;
          for (int g = 0; g < group; ++g) {
            const float* qh = q + static_cast<size_t>(kh * group + g) * hd;
            for (int c : st.channels) a += qh[c] * key[c];
          }
          approx[j] = a;
        }
        st.heavy = TopKIndices(approx, lp.sink, t - lp.local, k);
        ++telemetry_.refreshes;
        ++telemetry_.refreshes_per_layer[layer];
      } else {
        ++telemetry_.shares;
        ++telemetry_.shares_per_layer[layer];
      }
      ++st.steps;
      s = MergeIndexSet(lp.sink, st.heavy, lp.local, t);
      Account(static_cast<int64_t>(s.size()), t);
    }
  }

 private:
  struct State {
    bool calibrated = false;
    int source = -1;  // representative (layer*KVH + kh) whose heavy set this one reuses
    int64_t steps = 0;
    std::vector<int> channels;
    std::vector<int32_t> exact;  // exact top-k at calibration (for the overlap map)
    std::vector<int32_t> heavy;
  };

  void Calibrate(int layer, int kh, const float* q, const KvView& kv, int group,
                 const LayerSelectionPlan& lp, int64_t k, State* st) {
    const int t = kv.length(), hd = model_.head_dim, KVH = model_.num_key_value_heads;
    std::vector<float> mean_abs(hd, 0.0f);
    for (int j = 0; j < t; ++j) {
      const float* key = kv.key(kh, j);
      for (int c = 0; c < hd; ++c) mean_abs[c] += std::abs(key[c]);
    }
    const int r = std::clamp(lp.approx_channels, 1, hd);
    std::vector<int32_t> ch = TopKIndices(mean_abs, 0, hd, r);
    st->channels.assign(ch.begin(), ch.end());
    GroupProbabilities(q, kv, kh, group, hd, &probs_);
    st->exact = TopKIndices(probs_, lp.sink, t - lp.local, k);
    std::sort(st->exact.begin(), st->exact.end());
    // Greedy overlap map: reuse the first calibrated representative with ≥ 50 % overlap.
    const int id = layer * KVH + kh;
    for (int other = 0; other < id && !st->exact.empty(); ++other) {
      const State& o = state_[other];
      if (!o.calibrated || o.source >= 0 || o.exact.empty()) continue;
      std::vector<int32_t> common;
      std::set_intersection(st->exact.begin(), st->exact.end(), o.exact.begin(), o.exact.end(),
                            std::back_inserter(common));
      if (common.size() * 2 >= st->exact.size()) {
        st->source = other;
        break;
      }
    }
    st->calibrated = true;
  }

  std::vector<State> state_;
  std::vector<float> probs_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SequenceSelector>> CreateSelector(const ModelConfig& model,
                                                                 const SelectionPlan& plan) {
  if (static_cast<int>(plan.layers.size()) != model.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("selection plan has ", plan.layers.size(),
                                                   " layers, model has ",
                                                   model.num_hidden_layers));
  }
  switch (plan.policy) {
    case SelectionPolicy::kDense: return std::unique_ptr<SequenceSelector>(new DenseSelector(model, plan));
    case SelectionPolicy::kOracle: return std::unique_ptr<SequenceSelector>(new OracleSelector(model, plan));
    case SelectionPolicy::kStreaming: return std::unique_ptr<SequenceSelector>(new StreamingSelector(model, plan));
    case SelectionPolicy::kH2O: return std::unique_ptr<SequenceSelector>(new H2OSelector(model, plan));
    case SelectionPolicy::kQuest: return std::unique_ptr<SequenceSelector>(new QuestSelector(model, plan));
    case SelectionPolicy::kPrhs: return std::unique_ptr<SequenceSelector>(new PrhsSelector(model, plan));
    case SelectionPolicy::kHShare: return std::unique_ptr<SequenceSelector>(new HShareSelector(model, plan));
  }
  return absl::InternalError("unhandled selection policy");
}

}  // namespace prehoc
