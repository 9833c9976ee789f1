#include "cachemgr/selection_plan.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/strings/ascii.h"

namespace prehoc {

absl::StatusOr<SelectionPolicy> ParseSelectionPolicy(const std::string& name) {
  if (name == "dense" || name.empty()) return SelectionPolicy::kDense;
  if (name == "prhs" || name == "prhs-budget-matched") return SelectionPolicy::kPrhs;
  if (name == "oracle") return SelectionPolicy::kOracle;
  if (name == "streaming") return SelectionPolicy::kStreaming;
  if (name == "h2o") return SelectionPolicy::kH2O;
  if (name == "quest") return SelectionPolicy::kQuest;
  if (name == "hshare") return SelectionPolicy::kHShare;
  return absl::InvalidArgumentError(absl::StrCat(
      "sparsity.policy '", name,
      "' is unknown; valid: dense, prhs, prhs-budget-matched, oracle, streaming, h2o, quest, hshare"));
}

const char* SelectionPolicyName(SelectionPolicy policy) {
  switch (policy) {
    case SelectionPolicy::kDense: return "dense";
    case SelectionPolicy::kPrhs: return "prhs";
    case SelectionPolicy::kOracle: return "oracle";
    case SelectionPolicy::kStreaming: return "streaming";
    case SelectionPolicy::kH2O: return "h2o";
    case SelectionPolicy::kQuest: return "quest";
    case SelectionPolicy::kHShare: return "hshare";
  }
  return "?";
}

int64_t SelectionPlan::Budget(int64_t t) const {
  if (budget_fraction > 0) return std::llround(budget_fraction * static_cast<double>(t));
  return budget_tokens;
}

int64_t SelectionPlan::TopK(int layer, int64_t t, int kv_head) const {
  const LayerSelectionPlan& l = layers[layer];
  double k = static_cast<double>(std::max<int64_t>(0, Budget(t) - l.sink - l.local));
  if (budget_matched && policy == SelectionPolicy::kPrhs) {
    // Real kept ≈ k + 2r·(m_fraction·k): solve for k.
    k = k / (1.0 + 2.0 * l.dilate_r * l.dilate_m_fraction);
  }
  double scale = l.k_scale;
  if (kv_head >= 0 && static_cast<size_t>(kv_head) < l.head_k_scale.size()) {
    scale *= l.head_k_scale[kv_head];
  }
  return static_cast<int64_t>(std::floor(k * scale));
}

std::vector<int64_t> EtfFrozenRows(const SelectionPlan& plan, int num_layers, int64_t rows,
                                   int page_size) {
  std::vector<int64_t> frozen(num_layers, 0);
  int64_t prev = 0;
  for (int l = 0; l < num_layers && l < static_cast<int>(plan.layers.size()); ++l) {
    const double f = plan.layers[l].etf_freeze_fraction;
    int64_t e = static_cast<int64_t>(f * static_cast<double>(rows)) / page_size * page_size;
    e = std::min<int64_t>(e, (rows - 1) / page_size * page_size);  // the last row always runs
    prev = std::max(prev, e);
    frozen[l] = prev;
  }
  return frozen;
}

absl::StatusOr<std::map<std::string, double>> ParseOverrides(const std::string& text) {
  std::map<std::string, double> out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::vector<std::string> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (kv.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsity override '", item, "' is not of the form key=value"));
    }
    std::string key(absl::StripAsciiWhitespace(kv[0]));
    std::string value(absl::StripAsciiWhitespace(kv[1]));
    double v;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    if (ec != std::errc() || p != value.data() + value.size() || !std::isfinite(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsity override '", key, "': '", value, "' is not a number"));
    }
    out[key] = v;
  }
  return out;
}

absl::StatusOr<SelectionPlan> MakeSelectionPlan(const ModelConfig& model,
                                                const SparsityOptions& options,
                                                const std::map<std::string, double>& overrides) {
  SelectionPlan plan;
  auto policy = ParseSelectionPolicy(options.policy);
  if (!policy.ok()) return policy.status();
  plan.policy = *policy;
  plan.policy_name = options.policy.empty() ? "dense" : options.policy;
  plan.budget_matched = options.policy == "prhs-budget-matched";
  if (!(options.target_delta >= 0 && options.target_delta < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparsity.target_delta must be in [0, 1), got ", options.target_delta));
  }
  plan.target_delta = options.target_delta;
  if (!(options.budget >= 0) || !std::isfinite(options.budget)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparsity.budget must be >= 0, got ", options.budget));
  }
  if (options.budget == 0) {
    plan.budget_fraction = 0.125;
  } else if (options.budget <= 1) {
    plan.budget_fraction = options.budget;
  } else {
    plan.budget_tokens = static_cast<int64_t>(options.budget);
  }

  // Keys of the whole plan, and keys of one layer's plan: the latter also as "key@L" (layer L
  // only; wins over the plain key).
  static const std::set<std::string> kPlanKeys = {
      "psaw_start", "psaw_phi", "psaw_alpha", "etf_start", "etf_psi", "etf_gamma",
      "budget_tokens", "budget_fraction"};
  static const std::set<std::string> kLayerKeys = {
      "sink", "local", "tau", "max_reuse", "dilate_r", "dilate_m_fraction", "refresh_interval",
      "approx_channels", "gqa_max", "gate_unrotated", "follow", "scan_slices", "scan_follow",
      "scan_reserve", "gate_delta", "gate_exact_delta", "gate_lse", "keep_trail", "k_scale", "gate_error",
      "gate_exact_error"};
  const int N = model.num_hidden_layers;
  for (const auto& [k, v] : overrides) {
    const size_t at = k.find('@');
    if (at == std::string::npos ? (kPlanKeys.count(k) || kLayerKeys.count(k))
                                : kLayerKeys.count(k.substr(0, at)) > 0) {
      if (at == std::string::npos) continue;
      int layer = -1;
      const char* b = k.data() + at + 1;
      const char* e = k.data() + k.size();
      auto [ptr, ec] = std::from_chars(b, e, layer);
      if (ec == std::errc() && ptr == e && b != e && layer >= 0 && layer < N) continue;
      return absl::InvalidArgumentError(absl::StrCat("sparsity override key '", k,
                                                     "': the layer after '@' must be in [0, ", N,
                                                     ")"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "sparsity override key '", k, "' is unknown; valid: ", absl::StrJoin(kPlanKeys, ", "), ", ",
        absl::StrJoin(kLayerKeys, ", "), " (the last group also as key@layer)"));
  }
  auto get = [&](const std::string& key, double def) {
    auto it = overrides.find(key);
    return it == overrides.end() ? def : it->second;
  };
  // A layer's value: key@layer, else key, else def.
  auto lget = [&](int layer, const std::string& key, double def) {
    auto it = overrides.find(absl::StrCat(key, "@", layer));
    return it == overrides.end() ? get(key, def) : it->second;
  };
  if (overrides.count("budget_tokens")) {
    plan.budget_tokens = static_cast<int64_t>(get("budget_tokens", 0));
    plan.budget_fraction = 0;
  }
  if (overrides.count("budget_fraction")) plan.budget_fraction = get("budget_fraction", 0);
  if (plan.budget_fraction < 0 || plan.budget_fraction > 1 || plan.budget_tokens < 0) {
    return absl::InvalidArgumentError("sparsity budget_fraction must be in [0, 1] and budget_tokens >= 0");
  }

  const SelectionPolicy p = plan.policy;
  int sink = 8, local = 32;
  if (p == SelectionPolicy::kH2O) sink = 0;
  if (p == SelectionPolicy::kOracle || p == SelectionPolicy::kQuest) {
    sink = 0;
    local = 0;
  }
  const int psaw_start = static_cast<int>(get("psaw_start", N / 2));
  // PSAW is off by default (φ = 1): on the shipped model it cut needles planted in the first
  // few % of an 8K context (docs/quality.md). psaw_phi < 1 turns it on.
  const double phi = get("psaw_phi", 1.0), alpha = get("psaw_alpha", 1.0);
  const int etf_start = static_cast<int>(get("etf_start", N));  // off by default
  const double psi = get("etf_psi", 0.9), gamma = get("etf_gamma", 1.0);
  if (!(phi > 0 && phi <= 1) || !(psi > 0 && psi <= 1)) {
    return absl::InvalidArgumentError("sparsity psaw_phi and etf_psi must be in (0, 1]");
  }

  plan.layers.resize(N);
  for (int l = 0; l < N; ++l) {
    LayerSelectionPlan& lp = plan.layers[l];
    auto get = [&](const std::string& key, double def) { return lget(l, key, def); };
    lp.sink = static_cast<int>(get("sink", sink));
    lp.local = static_cast<int>(get("local", local));
    if (lp.sink < 0 || lp.local < 0) {
      return absl::InvalidArgumentError("sparsity sink and local must be >= 0");
    }
    lp.tau = get("tau", 0.8);
    if (!(lp.tau >= -1 && lp.tau <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsity override tau must be in [-1, 1], got ", lp.tau));
    }
    lp.k_scale = get("k_scale", 1.0);
    if (!(lp.k_scale > 0 && lp.k_scale <= 64)) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsity override k_scale must be in (0, 64], got ", lp.k_scale));
    }
    lp.max_reuse = static_cast<int>(get("max_reuse", 64));
    lp.dilate_r = static_cast<int>(get("dilate_r", 1));
    lp.dilate_m_fraction = get("dilate_m_fraction", 1.0 / 3.0);
    if (p == SelectionPolicy::kPrhs && l >= psaw_start && N > psaw_start) {
      lp.psaw_drop_fraction =
          1.0 - std::pow(phi, alpha * static_cast<double>(l - psaw_start) / (N - psaw_start));
    }
    if (p == SelectionPolicy::kPrhs && l >= etf_start && N > etf_start) {
      lp.etf_freeze_fraction =
          1.0 - std::pow(psi, gamma * static_cast<double>(l - etf_start) / (N - etf_start));
      lp.etf_alias_layer = etf_start;
    }
    lp.gqa_max = get("gqa_max", 0) != 0;
    lp.gate_unrotated = get("gate_unrotated", 0) != 0;
    lp.follow = get("follow", 0) != 0;
    lp.scan_slices = static_cast<int>(get("scan_slices", 0));
    lp.scan_follow = static_cast<int>(get("scan_follow", 0));
    lp.gate_delta = get("gate_delta", 0);
    lp.gate_exact_delta = get("gate_exact_delta", 0);
    lp.gate_lse = get("gate_lse", 0);
    lp.scan_reserve = get("scan_reserve", 0);
    lp.keep_trail = get("keep_trail", 0) != 0;
    lp.gate_error = get("gate_error", 0);
    lp.gate_exact_error = get("gate_exact_error", 0);
    if (!(lp.gate_error >= 0 && lp.gate_error < 10) ||
        !(lp.gate_exact_error >= 0 && lp.gate_exact_error < 10)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparsity overrides gate_error (", lp.gate_error, ") and gate_exact_error (",
          lp.gate_exact_error, ") must be in [0, 10) (relative output error)"));
    }
    if (lp.gate_error > 0 && lp.scan_slices == 0) {
      return absl::InvalidArgumentError(
          "sparsity override gate_error > 0 needs scan_slices >= 1 (the output estimate samples "
          "the scan's slice)");
    }
    if (!(lp.gate_lse >= 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("sparsity override gate_lse must be >= 0 (nats), got ", lp.gate_lse));
    }
    if (!(lp.scan_reserve >= 0 && lp.scan_reserve <= 4)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparsity override scan_reserve must be in [0, 4] (times the set size), got ",
          lp.scan_reserve));
    }
    if (lp.scan_reserve > 0 && lp.scan_slices == 0) {
      return absl::InvalidArgumentError("sparsity override scan_reserve > 0 needs scan_slices >= 1");
    }
    if (lp.scan_slices < 0 || lp.scan_follow < 0 || !(lp.gate_delta >= 0 && lp.gate_delta < 1) ||
        !(lp.gate_exact_delta >= 0 && lp.gate_exact_delta < 1)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparsity overrides: scan_slices (", lp.scan_slices, ") and scan_follow (",
          lp.scan_follow, ") must be >= 0, gate_delta (", lp.gate_delta,
          ") and gate_exact_delta (", lp.gate_exact_delta, ") in [0, 1)"));
    }
    if (lp.gate_delta > 0 && lp.scan_slices == 0) {
      return absl::InvalidArgumentError(
          "sparsity override gate_delta > 0 needs scan_slices >= 1 (the δ estimate samples the "
          "scan's slice)");
    }
    if (lp.scan_follow > 0 && lp.scan_slices == 0) {
      return absl::InvalidArgumentError("sparsity override scan_follow > 0 needs scan_slices >= 1");
    }
    if (p == SelectionPolicy::kHShare) {
      lp.refresh_interval = static_cast<int>(get("refresh_interval", 2));
      lp.approx_channels = static_cast<int>(get("approx_channels", 16));
    }
    if (lp.max_reuse < 0 || lp.dilate_r < 0 || lp.refresh_interval < 1 || lp.approx_channels < 0 ||
        lp.dilate_m_fraction < 0 || lp.dilate_m_fraction > 1) {
      return absl::InvalidArgumentError(
          "sparsity overrides: max_reuse, dilate_r, approx_channels must be >= 0, "
          "refresh_interval >= 1, dilate_m_fraction in [0, 1]");
    }
  }
  plan.version = 1;
  return plan;
}

}  // namespace prehoc
