#include "cachemgr/dlm_schedule.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace prehoc {
namespace {

constexpr double kMinSlope = -1e-3;  // keeps start/end strictly below peak

absl::Status Bad(absl::string_view field, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", message));
}

// Least squares for y ≈ c + a·u (left rows) / c + b·w (right rows), with a and/or b optionally
// fixed. Returns false when the system is singular in the free unknowns.
bool SolveLogFit(const std::vector<double>& y, const std::vector<double>& u,
                 const std::vector<char>& left, bool fix_a, double a_fixed, bool fix_b,
                 double b_fixed, double* c, double* a, double* b) {
  // Unknown vector z = (c, a, b) restricted to the free ones; normal equations with a tiny ridge
  // on the slopes so that an empty side stays solvable (its slope then goes to 0).
  double m[3][3] = {}, r[3] = {};
  const size_t n = y.size();
  for (size_t i = 0; i < n; ++i) {
    double row[3] = {1.0, left[i] ? u[i] : 0.0, left[i] ? 0.0 : u[i]};
    double target = y[i];
    if (fix_a) target -= row[1] * a_fixed, row[1] = 0;
    if (fix_b) target -= row[2] * b_fixed, row[2] = 0;
    for (int p = 0; p < 3; ++p) {
      r[p] += row[p] * target;
      for (int q = 0; q < 3; ++q) m[p][q] += row[p] * row[q];
    }
  }
  m[1][1] += 1e-9;
  m[2][2] += 1e-9;
  if (fix_a) m[1][1] = 1, m[1][0] = m[0][1] = m[1][2] = m[2][1] = 0, r[1] = a_fixed;
  if (fix_b) m[2][2] = 1, m[2][0] = m[0][2] = m[2][1] = m[1][2] = 0, r[2] = b_fixed;
  // Gaussian elimination with partial pivoting.
  for (int col = 0; col < 3; ++col) {
    int piv = col;
    for (int row = col + 1; row < 3; ++row) {
      if (std::abs(m[row][col]) > std::abs(m[piv][col])) piv = row;
    }
    if (std::abs(m[piv][col]) < 1e-300) return false;
    std::swap(m[piv], m[col]);
    std::swap(r[piv], r[col]);
    for (int row = col + 1; row < 3; ++row) {
      const double f = m[row][col] / m[col][col];
      for (int k = col; k < 3; ++k) m[row][k] -= f * m[col][k];
      r[row] -= f * r[col];
    }
  }
  double z[3];
  for (int row = 2; row >= 0; --row) {
    double s = r[row];
    for (int k = row + 1; k < 3; ++k) s -= m[row][k] * z[k];
    z[row] = s / m[row][row];
  }
  *c = z[0];
  *a = fix_a ? a_fixed : z[1];
  *b = fix_b ? b_fixed : z[2];
  return std::isfinite(*c) && std::isfinite(*a) && std::isfinite(*b);
}

double MeanFrom1(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  double s = 0;
  for (size_t i = 1; i < v.size(); ++i) s += v[i];
  return s / static_cast<double>(v.size() - 1);
}

}  // namespace

absl::StatusOr<DlmCachePolicy> ParseDlmCachePolicy(const std::string& name) {
  if (name == "none" || name == "vanilla") return DlmCachePolicy::kNone;
  if (name == "prefix") return DlmCachePolicy::kPrefix;
  if (name == "dual") return DlmCachePolicy::kDual;
  if (name == "dllm") return DlmCachePolicy::kDllm;
  if (name == "spa") return DlmCachePolicy::kSpa;
  if (name == "spa-auto") return DlmCachePolicy::kSpaAuto;
  return absl::InvalidArgumentError(absl::StrCat(
      "cache: unknown policy '", name, "' (valid: none, prefix, dual, dllm, spa, spa-auto)"));
}

const char* DlmCachePolicyName(DlmCachePolicy policy) {
  switch (policy) {
    case DlmCachePolicy::kNone: return "none";
    case DlmCachePolicy::kPrefix: return "prefix";
    case DlmCachePolicy::kDual: return "dual";
    case DlmCachePolicy::kDllm: return "dllm";
    case DlmCachePolicy::kSpa: return "spa";
    case DlmCachePolicy::kSpaAuto: return "spa-auto";
  }
  return "?";
}

const char* DlmStepKindName(DlmStepKind kind) {
  switch (kind) {
    case DlmStepKind::kFull: return "full";
    case DlmStepKind::kGenRefresh: return "gen-refresh";
    case DlmStepKind::kPartial: return "partial";
  }
  return "?";
}

absl::Status RhoCurve::Validate() const {
  auto bad = [](absl::string_view f, double v, absl::string_view want) {
    return absl::InvalidArgumentError(absl::StrCat("rho_", f, ": ", v, " ", want));
  };
  if (!(peak_pos > 0 && peak_pos < 1)) return bad("peak_pos", peak_pos, "must be in (0, 1)");
  if (!(peak > 0 && peak <= 1)) return bad("peak", peak, "must be in (0, 1]");
  if (!(start > 0 && start < peak)) return bad("start", start, "must be in (0, rho_peak)");
  if (!(end > 0 && end < peak)) return bad("end", end, "must be in (0, rho_peak)");
  if (!(floor >= 0 && floor <= 1)) return bad("floor", floor, "must be in [0, 1]");
  if (!(scale > 0 && std::isfinite(scale))) return bad("scale", scale, "must be > 0");
  return absl::OkStatus();
}

double RhoCurve::At(double x) const {
  const double mu = peak_pos;
  const double pk = peak * scale;
  double rho;
  if (x < mu) {
    const double z = (x - mu) / mu;
    rho = std::max(pk * std::exp(std::log(start / peak) * z * z), floor);
  } else {
    const double z = (x - mu) / (1.0 - mu);
    rho = pk * std::exp(std::log(end / peak) * z * z);
  }
  return std::min(rho, 1.0);
}

std::vector<double> RhoCurve::Profile(int num_layers) const {
  std::vector<double> out(std::max(num_layers, 0));
  for (int l = 0; l < num_layers; ++l) out[l] = At(static_cast<double>(l) / num_layers);
  return out;
}

absl::StatusOr<RhoFit> FitRhoCurve(std::span<const double> drift, double mean_rho, double floor) {
  const int n = static_cast<int>(drift.size());
  if (n < 3) return Bad("drift", absl::StrCat("need >= 3 layers, got ", n));
  if (!(mean_rho > 0 && mean_rho <= 1)) {
    return Bad("rho_mean", absl::StrCat(mean_rho, " must be in (0, 1]"));
  }
  if (!(floor >= 0 && floor <= 1)) return Bad("rho_floor", absl::StrCat(floor, " must be in [0, 1]"));
  double sum = 0;
  for (int l = 0; l < n; ++l) {
    if (!(drift[l] >= 0) || !std::isfinite(drift[l])) {
      return Bad("drift", absl::StrCat("layer ", l, " has drift ", drift[l]));
    }
    if (l >= 1) sum += drift[l];
  }
  if (sum <= 0) return Bad("drift", "all zero over layers >= 1");
  const double mean = sum / (n - 1);
  RhoFit fit;
  fit.target.assign(n, 0.0);
  std::vector<double> y, u, x;
  for (int l = 1; l < n; ++l) {
    fit.target[l] = std::clamp(drift[l] * mean_rho / mean, 1e-4, 1.0);
    y.push_back(std::log(fit.target[l]));
    x.push_back(static_cast<double>(l) / n);
  }
  double best_err = std::numeric_limits<double>::infinity();
  RhoCurve best;
  for (int step = 5; step <= 95; ++step) {
    const double mu = step / 100.0;
    std::vector<char> left(x.size());
    u.assign(x.size(), 0.0);
    for (size_t i = 0; i < x.size(); ++i) {
      left[i] = x[i] < mu;
      const double z = left[i] ? (x[i] - mu) / mu : (x[i] - mu) / (1.0 - mu);
      u[i] = z * z;
    }
    // Unconstrained, then with each violating slope pinned to kMinSlope.
    for (int variant = 0; variant < 4; ++variant) {
      const bool fix_a = variant & 1, fix_b = variant & 2;
      double c, a, b;
      if (!SolveLogFit(y, u, left, fix_a, kMinSlope, fix_b, kMinSlope, &c, &a, &b)) continue;
      if (a > kMinSlope || b > kMinSlope) continue;  // infeasible; a pinned variant covers it
      RhoCurve cand;
      cand.peak_pos = mu;
      cand.peak = std::min(std::exp(c), 1.0);
      cand.start = cand.peak * std::exp(a);
      cand.end = cand.peak * std::exp(b);
      cand.floor = 0;
      if (!cand.Validate().ok()) continue;
      double err = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        const double d = cand.At(x[i]) - std::exp(y[i]);
        err += d * d;
      }
      if (err < best_err) {
        best_err = err;
        best = cand;
      }
    }
  }
  if (!std::isfinite(best_err)) return absl::InternalError("FitRhoCurve: no feasible fit");
  best.floor = floor;
  // Scale so that the mean over layers >= 1 equals mean_rho (monotone in scale: bisection).
  auto mean_at = [&](double s) {
    RhoCurve c = best;
    c.scale = s;
    return MeanFrom1(c.Profile(n));
  };
  double lo = 1e-6, hi = 1e6;
  for (int it = 0; it < 200; ++it) {
    const double mid = std::sqrt(lo * hi);
    (mean_at(mid) < mean_rho ? lo : hi) = mid;
  }
  best.scale = std::sqrt(lo * hi);
  fit.curve = best;
  const std::vector<double> prof = best.Profile(n);
  double se = 0;
  for (int l = 1; l < n; ++l) se += (prof[l] - fit.target[l]) * (prof[l] - fit.target[l]);
  fit.rmse = std::sqrt(se / (n - 1));
  return fit;
}

DlmStepKind DlmSchedule::StepKind(int step, int block_step) const {
  switch (policy) {
    case DlmCachePolicy::kNone:
      return DlmStepKind::kFull;
    case DlmCachePolicy::kPrefix:
    case DlmCachePolicy::kDual:
      if (block_step == 0 || (block_refresh > 0 && block_step % block_refresh == 0)) {
        return DlmStepKind::kFull;
      }
      return DlmStepKind::kPartial;
    case DlmCachePolicy::kDllm:
      if (step == 0 || (prompt_refresh > 0 && step % prompt_refresh == 0)) return DlmStepKind::kFull;
      if (gen_refresh > 0 && step % gen_refresh == 0) return DlmStepKind::kGenRefresh;
      return DlmStepKind::kPartial;
    case DlmCachePolicy::kSpa:
    case DlmCachePolicy::kSpaAuto:
      if (step == 0 || (r_full > 0 && step % r_full == 0)) return DlmStepKind::kFull;
      if (r_gen > 0 && step % r_gen == 0) return DlmStepKind::kGenRefresh;
      return DlmStepKind::kPartial;
  }
  return DlmStepKind::kFull;
}

int DlmSchedule::UpdateRows(int layer, int gen_rows) const {
  double ratio = 1.0;
  if (policy == DlmCachePolicy::kDllm) {
    ratio = dllm_ratio;
  } else if (policy == DlmCachePolicy::kSpa || policy == DlmCachePolicy::kSpaAuto) {
    ratio = layer < static_cast<int>(rho.size()) ? rho[layer] : 1.0;
  }
  int k = static_cast<int>(std::floor(gen_rows * ratio + 1e-9));
  if (policy == DlmCachePolicy::kDllm || policy == DlmCachePolicy::kSpa ||
      policy == DlmCachePolicy::kSpaAuto) {
    k = std::max(k, std::min(min_rows, gen_rows));
  }
  return std::clamp(k, 0, gen_rows);
}

double DlmSchedule::MeanUpdateRatio() const {
  if (policy == DlmCachePolicy::kDllm) return dllm_ratio;
  if (policy == DlmCachePolicy::kSpa || policy == DlmCachePolicy::kSpaAuto) return MeanFrom1(rho);
  return 1.0;
}

absl::StatusOr<DlmSchedule> MakeDlmSchedule(const ModelConfig& model, const std::string& cache,
                                            const std::map<std::string, double>& overrides,
                                            std::span<const double> drift) {
  DlmSchedule s;
  auto policy = ParseDlmCachePolicy(cache);
  if (!policy.ok()) return policy.status();
  s.policy = *policy;
  s.policy_name = DlmCachePolicyName(s.policy);
  const int n = model.num_hidden_layers;
  if (n < 1) return Bad("model", "num_hidden_layers must be >= 1");

  std::vector<std::string> valid;
  switch (s.policy) {
    case DlmCachePolicy::kNone:
      break;
    case DlmCachePolicy::kPrefix:
    case DlmCachePolicy::kDual:
      valid = {"block_refresh"};
      break;
    case DlmCachePolicy::kDllm:
      valid = {"prompt_refresh", "gen_refresh", "dllm_ratio", "min_rows"};
      break;
    case DlmCachePolicy::kSpa:
    case DlmCachePolicy::kSpaAuto:
      valid = {"r_full",   "r_gen",     "rho_peak_pos", "rho_start", "rho_peak", "rho_end",
               "rho_floor", "rho_scale", "rho_mean",     "rho",       "kv_all_rows",
               "min_rows"};
      break;
  }
  if (s.policy == DlmCachePolicy::kSpa || s.policy == DlmCachePolicy::kSpaAuto) s.min_rows = 3;
  auto field = [](const std::string& k) { return absl::StrCat("cache_overrides.", k); };
  auto interval = [&](const std::string& k, double v, int* out) -> absl::Status {
    if (!(v >= 0) || v != std::floor(v) || v > 1e9) {
      return Bad(field(k), absl::StrCat(v, " must be an integer >= 0 (0 = never)"));
    }
    *out = static_cast<int>(v);
    return absl::OkStatus();
  };
  double rho_mean = -1, rho_uniform = -1;
  for (const auto& [key, v] : overrides) {
    if (std::find(valid.begin(), valid.end(), key) == valid.end()) {
      return Bad(field(key), absl::StrCat("unknown key for cache '", s.policy_name, "' (valid: ",
                                          valid.empty() ? "none" : absl::StrJoin(valid, ", "), ")"));
    }
    if (!std::isfinite(v)) return Bad(field(key), "must be finite");
    absl::Status st;
    if (key == "block_refresh") st = interval(key, v, &s.block_refresh);
    if (key == "prompt_refresh") st = interval(key, v, &s.prompt_refresh);
    if (key == "gen_refresh") st = interval(key, v, &s.gen_refresh);
    if (key == "r_full") st = interval(key, v, &s.r_full);
    if (key == "r_gen") st = interval(key, v, &s.r_gen);
    if (key == "min_rows") st = interval(key, v, &s.min_rows);
    if (!st.ok()) return st;
    if (key == "dllm_ratio") {
      if (!(v > 0 && v <= 1)) return Bad(field(key), absl::StrCat(v, " must be in (0, 1]"));
      s.dllm_ratio = v;
    }
    if (key == "rho_peak_pos") s.rho_curve.peak_pos = v;
    if (key == "rho_start") s.rho_curve.start = v;
    if (key == "rho_peak") s.rho_curve.peak = v;
    if (key == "rho_end") s.rho_curve.end = v;
    if (key == "rho_floor") s.rho_curve.floor = v;
    if (key == "rho_scale") s.rho_curve.scale = v;
    if (key == "rho_mean") {
      if (!(v > 0 && v <= 1)) return Bad(field(key), absl::StrCat(v, " must be in (0, 1]"));
      rho_mean = v;
    }
    if (key == "rho") {
      if (!(v >= 0 && v <= 1)) return Bad(field(key), absl::StrCat(v, " must be in [0, 1]"));
      rho_uniform = v;
    }
    if (key == "kv_all_rows") {
      if (v != 0 && v != 1) return Bad(field(key), absl::StrCat(v, " must be 0 or 1"));
      s.kv_all_rows = v == 1;
    }
  }
  if (s.policy != DlmCachePolicy::kSpa && s.policy != DlmCachePolicy::kSpaAuto) return s;

  if (absl::Status st = s.rho_curve.Validate(); !st.ok()) {
    return Bad("cache_overrides", st.message());
  }
  auto set_scale_for_mean = [&](RhoCurve* c, double target) {
    double lo = 1e-6, hi = 1e6;
    for (int it = 0; it < 200; ++it) {
      const double mid = std::sqrt(lo * hi);
      RhoCurve t = *c;
      t.scale = mid;
      (MeanFrom1(t.Profile(n)) < target ? lo : hi) = mid;
    }
    c->scale = std::sqrt(lo * hi);
  };
  if (s.policy == DlmCachePolicy::kSpa) {
    if (rho_mean > 0) set_scale_for_mean(&s.rho_curve, rho_mean);
    s.rho = s.rho_curve.Profile(n);
  } else {
    if (static_cast<int>(drift.size()) != n) {
      return Bad("drift", absl::StrCat("spa-auto needs a measured drift profile of ", n,
                                       " layers (one per layer), got ", drift.size()));
    }
    const double target = rho_mean > 0 ? rho_mean : MeanFrom1(s.rho_curve.Profile(n));
    auto fit = FitRhoCurve(drift, target, s.rho_curve.floor);
    if (!fit.ok()) return fit.status();
    s.rho_curve = fit->curve;
    s.rho = s.rho_curve.Profile(n);
    s.drift.assign(drift.begin(), drift.end());
    s.fit_rmse = fit->rmse;
  }
  if (rho_uniform >= 0) s.rho.assign(n, rho_uniform);
  s.rho[0] = 1.0;  // layer 0 is always computed in full
  return s;
}

}  // namespace prehoc
