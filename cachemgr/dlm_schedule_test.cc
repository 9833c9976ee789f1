#include "cachemgr/dlm_schedule.h"

#include <cmath>
#include <numeric>

#include "gtest/gtest.h"

namespace prehoc {
namespace {

ModelConfig Model(int layers) {
  ModelConfig c;
  c.num_hidden_layers = layers;
  c.hidden_size = 64;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 100;
  c.is_causal = false;
  return c;
}

double Mean1(const std::vector<double>& v) {
  return std::accumulate(v.begin() + 1, v.end(), 0.0) / (v.size() - 1);
}

TEST(DlmScheduleTest, ParsesPolicies) {
  for (const char* name : {"none", "prefix", "dual", "dllm", "spa", "spa-auto"}) {
    auto p = ParseDlmCachePolicy(name);
    ASSERT_TRUE(p.ok()) << name;
    EXPECT_EQ(DlmCachePolicyName(*p), std::string(name));
  }
  auto bad = ParseDlmCachePolicy("fast");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("cache"), std::string::npos);
  EXPECT_NE(bad.status().message().find("fast"), std::string::npos);
}

TEST(DlmScheduleTest, RhoCurveMatchesFormula) {
  RhoCurve c;  // LLaDA-8B constants
  ASSERT_TRUE(c.Validate().ok());
  EXPECT_NEAR(c.At(0.75), 0.25, 1e-12);
  EXPECT_NEAR(c.At(1.0), 0.13, 1e-12);              // right end = end
  EXPECT_NEAR(c.At(0.0), 0.0625, 1e-12);            // start 0.03 floored to 0.0625
  // Left: peak · (start/peak)^(((x−μ)/μ)²), x = 0.5 → exponent 1/9.
  EXPECT_NEAR(c.At(0.5), 0.25 * std::pow(0.03 / 0.25, 1.0 / 9.0), 1e-12);
  // Right: peak · (end/peak)^(((x−μ)/(1−μ))²), x = 0.875 → exponent 1/4.
  EXPECT_NEAR(c.At(0.875), 0.25 * std::pow(0.13 / 0.25, 0.25), 1e-12);
  // The floor applies on the left only (as the reference code).
  RhoCurve f = c;
  f.floor = 0.2;
  EXPECT_NEAR(f.At(0.875), 0.25 * std::pow(0.13 / 0.25, 0.25), 1e-12);  // 0.198 < floor
  EXPECT_NEAR(f.At(0.5), 0.2, 1e-12);
  // The paper's mean over LLaDA-8B's 32 layers is ≈ 0.16.
  const std::vector<double> prof = c.Profile(32);
  const double mean = std::accumulate(prof.begin(), prof.end(), 0.0) / 32;
  EXPECT_NEAR(mean, 0.16, 0.01);
  // Scale multiplies start/peak/end.
  RhoCurve s = c;
  s.scale = 2;
  EXPECT_NEAR(s.At(0.75), 0.5, 1e-12);
  s.scale = 10;
  EXPECT_EQ(s.At(0.75), 1.0);  // clamped
}

TEST(DlmScheduleTest, RhoCurveValidateNamesField) {
  RhoCurve c;
  c.start = 0.3;  // above peak
  absl::Status st = c.Validate();
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("rho_start"), std::string::npos);
  c = RhoCurve();
  c.peak_pos = 1.0;
  EXPECT_NE(c.Validate().message().find("rho_peak_pos"), std::string::npos);
}

TEST(DlmScheduleTest, SpaScheduleAndOverrides) {
  auto s = MakeDlmSchedule(Model(6), "spa");
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->rho.size(), 6u);
  EXPECT_EQ(s->rho[0], 1.0);
  RhoCurve c;
  for (int l = 1; l < 6; ++l) EXPECT_NEAR(s->rho[l], c.At(l / 6.0), 1e-12);
  EXPECT_EQ(s->UpdateRows(0, 64), 64);
  for (int l = 1; l < 6; ++l) {
    EXPECT_EQ(s->UpdateRows(l, 64), static_cast<int>(std::floor(64 * s->rho[l] + 1e-9)));
  }
  EXPECT_TRUE(s->kv_all_rows);
  // rho_mean rescales so that the mean over layers >= 1 is exact.
  auto m = MakeDlmSchedule(Model(6), "spa", {{"rho_mean", 0.1}});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_NEAR(Mean1(m->rho), 0.1, 1e-6);
  EXPECT_NEAR(m->MeanUpdateRatio(), 0.1, 1e-6);
  auto u = MakeDlmSchedule(Model(6), "spa", {{"rho", 0.5}, {"kv_all_rows", 0}, {"r_full", 3}});
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->rho[0], 1.0);
  EXPECT_EQ(u->rho[3], 0.5);
  EXPECT_FALSE(u->kv_all_rows);
  EXPECT_EQ(u->r_full, 3);
}

TEST(DlmScheduleTest, BadOverridesNameTheKey) {
  auto check = [](const std::string& cache, std::map<std::string, double> ov, const std::string& want) {
    auto s = MakeDlmSchedule(Model(6), cache, ov);
    ASSERT_FALSE(s.ok()) << cache;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find(want), std::string::npos) << s.status();
  };
  check("spa", {{"foo", 1}}, "cache_overrides.foo");
  check("spa", {{"r_full", -1}}, "cache_overrides.r_full");
  check("spa", {{"r_gen", 2.5}}, "cache_overrides.r_gen");
  check("spa", {{"kv_all_rows", 2}}, "cache_overrides.kv_all_rows");
  check("spa", {{"rho_peak", 0.01}}, "rho_start");  // start 0.03 no longer below peak
  check("dllm", {{"dllm_ratio", 0}}, "cache_overrides.dllm_ratio");
  check("dllm", {{"r_full", 5}}, "cache_overrides.r_full");  // spa key on dllm
  check("none", {{"block_refresh", 1}}, "cache_overrides.block_refresh");
  check("bogus", {}, "cache");
  check("spa-auto", {}, "drift");  // no calibration profile
}

TEST(DlmScheduleTest, StepKinds) {
  auto none = MakeDlmSchedule(Model(4), "none");
  ASSERT_TRUE(none.ok());
  for (int s = 0; s < 5; ++s) EXPECT_EQ(none->StepKind(s, s), DlmStepKind::kFull);

  auto dual = MakeDlmSchedule(Model(4), "dual", {{"block_refresh", 3}});
  ASSERT_TRUE(dual.ok());
  EXPECT_EQ(dual->StepKind(10, 0), DlmStepKind::kFull);
  EXPECT_EQ(dual->StepKind(11, 1), DlmStepKind::kPartial);
  EXPECT_EQ(dual->StepKind(12, 2), DlmStepKind::kPartial);
  EXPECT_EQ(dual->StepKind(13, 3), DlmStepKind::kFull);
  EXPECT_EQ(dual->UpdateRows(2, 64), 64);

  auto spa = MakeDlmSchedule(Model(4), "spa", {{"r_full", 6}, {"r_gen", 4}});
  ASSERT_TRUE(spa.ok());
  std::vector<DlmStepKind> want = {DlmStepKind::kFull,       DlmStepKind::kPartial,
                                   DlmStepKind::kPartial,    DlmStepKind::kPartial,
                                   DlmStepKind::kGenRefresh, DlmStepKind::kPartial,
                                   DlmStepKind::kFull,       DlmStepKind::kPartial,
                                   DlmStepKind::kGenRefresh};
  for (int s = 0; s < static_cast<int>(want.size()); ++s) {
    EXPECT_EQ(spa->StepKind(s, 0), want[s]) << s;  // block start does not refresh SPA
  }
  auto never = MakeDlmSchedule(Model(4), "dllm", {{"prompt_refresh", 0}, {"gen_refresh", 0}});
  ASSERT_TRUE(never.ok());
  EXPECT_EQ(never->StepKind(0, 0), DlmStepKind::kFull);
  for (int s = 1; s < 100; ++s) EXPECT_EQ(never->StepKind(s, 0), DlmStepKind::kPartial);
  EXPECT_EQ(never->UpdateRows(0, 64), 16);  // dllm: uniform 25 %, layer 0 included
  EXPECT_EQ(never->UpdateRows(3, 10), 2);
  // min_rows lifts floor(L·ρ) for short responses, never above L.
  auto minr = MakeDlmSchedule(Model(6), "spa");  // spa default: min_rows 3
  ASSERT_TRUE(minr.ok());
  EXPECT_EQ(minr->min_rows, 3);
  auto paper = MakeDlmSchedule(Model(6), "spa", {{"min_rows", 0}});
  ASSERT_TRUE(paper.ok());
  EXPECT_EQ(paper->UpdateRows(1, 6), 0);  // the paper's floor(L·ρ)
  EXPECT_EQ(minr->UpdateRows(1, 6), 3);   // floor(6 · 0.069) = 0 → 3
  EXPECT_EQ(minr->UpdateRows(1, 2), 2);   // never above L
  EXPECT_EQ(minr->UpdateRows(4, 64), 15);  // floor(64 · 0.244) = 15 already above
  EXPECT_EQ(minr->UpdateRows(1, 1), 1);
  EXPECT_EQ(minr->UpdateRows(0, 6), 6);
}

TEST(DlmScheduleTest, FitRecoversAKnownCurve) {
  RhoCurve truth;
  truth.peak_pos = 0.5;
  truth.start = 0.05;
  truth.peak = 0.3;
  truth.end = 0.25;
  truth.floor = 0;
  const int n = 28;
  std::vector<double> drift = truth.Profile(n);
  for (double& d : drift) d *= 0.01;  // drift in arbitrary units: only its shape matters
  drift[0] = 123;                      // layer 0 is ignored
  auto fit = FitRhoCurve(drift, 0.2, 0.0);
  ASSERT_TRUE(fit.ok()) << fit.status();
  EXPECT_NEAR(fit->curve.peak_pos, 0.5, 0.02);
  EXPECT_LT(fit->rmse, 2e-3);
  const std::vector<double> prof = fit->curve.Profile(n);
  EXPECT_NEAR(Mean1(prof), 0.2, 1e-6);
  // The shape follows the truth up to the mean's rescaling.
  const std::vector<double> t = truth.Profile(n);
  const double k = Mean1(prof) / Mean1(t);
  for (int l = 1; l < n; ++l) EXPECT_NEAR(prof[l], k * t[l], 5e-3) << l;
}

TEST(DlmScheduleTest, FitHandlesMonotoneAndRejectsBadInput) {
  std::vector<double> rising = {0, 0.01, 0.02, 0.04, 0.08, 0.16};
  auto fit = FitRhoCurve(rising, 0.15);
  ASSERT_TRUE(fit.ok()) << fit.status();
  const std::vector<double> prof = fit->curve.Profile(6);
  for (int l = 2; l < 6; ++l) EXPECT_GE(prof[l], prof[l - 1] - 1e-9) << l;
  EXPECT_NEAR(Mean1(prof), 0.15, 1e-6);
  EXPECT_FALSE(FitRhoCurve(std::vector<double>{0, 1}, 0.1).ok());
  EXPECT_FALSE(FitRhoCurve(std::vector<double>{0, 1, -1}, 0.1).ok());
  EXPECT_FALSE(FitRhoCurve(std::vector<double>{1, 0, 0, 0}, 0.1).ok());
  EXPECT_FALSE(FitRhoCurve(rising, 0.0).ok());
}

TEST(DlmScheduleTest, SpaAutoUsesTheFitAtTheFixedCurvesMean) {
  std::vector<double> drift = {0, 0.02, 0.05, 0.09, 0.07, 0.04};
  auto s = MakeDlmSchedule(Model(6), "spa-auto", {}, drift);
  ASSERT_TRUE(s.ok()) << s.status();
  auto fixed = MakeDlmSchedule(Model(6), "spa");
  ASSERT_TRUE(fixed.ok());
  EXPECT_NEAR(s->MeanUpdateRatio(), fixed->MeanUpdateRatio(), 1e-6);
  EXPECT_EQ(s->drift, drift);
  EXPECT_EQ(s->rho[0], 1.0);
  // More drift → more budget.
  EXPECT_GT(s->rho[3], s->rho[1]);
  auto short_drift = MakeDlmSchedule(Model(6), "spa-auto", {}, std::vector<double>{0, 1, 2});
  EXPECT_FALSE(short_drift.ok());
}

}  // namespace
}  // namespace prehoc
