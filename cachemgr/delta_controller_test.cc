#include "cachemgr/delta_controller.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace prehoc {
namespace {

bool Feed(DeltaController& c, int16_t layer, int16_t head, float delta) {
  std::vector<int16_t> l = {layer}, h = {head};
  std::vector<float> d = {delta};
  return c.Observe(l, h, d);
}

TEST(DeltaControllerTest, ViolationRaisesThatHeadsBudgetImmediately) {
  DeltaController c(2, 2, DeltaControllerOptions{.target_delta = 0.1});
  const uint64_t v0 = c.version();
  EXPECT_TRUE(Feed(c, 1, 0, 0.2f));
  EXPECT_DOUBLE_EQ(c.k_scale(1, 0), 1.5);
  EXPECT_DOUBLE_EQ(c.k_scale(1, 1), 1.0);
  EXPECT_DOUBLE_EQ(c.k_scale(0, 0), 1.0);
  EXPECT_EQ(c.violations(), 1);
  EXPECT_GT(c.version(), v0);
  EXPECT_FALSE(Feed(c, 7, 0, 0.9f));  // out of range: ignored
  EXPECT_EQ(c.observations(), 1);
}

TEST(DeltaControllerTest, SustainedSlackLowersBudgetSlowly) {
  DeltaController c(1, 1, DeltaControllerOptions{.target_delta = 0.1, .window = 4});
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(Feed(c, 0, 0, 0.01f));
  EXPECT_FALSE(Feed(c, 0, 0, 0.08f));  // dead band resets the run
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(Feed(c, 0, 0, 0.01f));
  EXPECT_TRUE(Feed(c, 0, 0, 0.01f));
  EXPECT_DOUBLE_EQ(c.k_scale(0, 0), 0.95);
}

TEST(DeltaControllerTest, ApplyWritesHeadScalesAndBumpsVersionOnlyOnChange) {
  ModelConfig m;
  m.num_hidden_layers = 2;
  m.num_attention_heads = 4;
  m.num_key_value_heads = 2;
  auto plan = MakeSelectionPlan(m, SparsityOptions{.policy = "prhs", .budget = 0.25});
  ASSERT_TRUE(plan.ok());
  DeltaController c(2, 2, DeltaControllerOptions{.target_delta = 0.1});
  c.Apply(&*plan);
  const uint64_t v = plan->version;
  c.Apply(&*plan);
  EXPECT_EQ(plan->version, v);
  Feed(c, 0, 1, 0.5f);
  c.Apply(&*plan);
  EXPECT_EQ(plan->version, v + 1);
  EXPECT_EQ(plan->TopK(0, 1000, 1), static_cast<int64_t>(std::floor((250 - 40) * 1.5)));
  EXPECT_EQ(plan->TopK(0, 1000, 0), 250 - 40);
}

TEST(DeltaControllerTest, AtMaxScaleRaisesTauOncePerViolationNotPerApply) {
  DeltaController c(1, 1, DeltaControllerOptions{.target_delta = 0.1, .max_scale = 1.5});
  SelectionPlan plan;
  plan.layers.resize(1);
  plan.layers[0].tau = 0.8;
  Feed(c, 0, 0, 0.5f);  // scale 1 → 1.5 (max)
  Feed(c, 0, 0, 0.5f);  // τ + 0.05
  c.Apply(&plan);
  c.Apply(&plan);
  EXPECT_NEAR(plan.layers[0].tau, 0.85, 1e-12);
}

// Closed loop against a synthetic plant whose dropped mass falls with the budget and differs per
// head: δ = base_u · exp(−2 · k_scale_u) · lognormal noise. The controller must keep ≥ 99 % of
// post-warm-up measurements at or below δ* and settle each unit near the smallest scale that
// achieves it (so concentrated heads are not charged for diffuse ones).
TEST(DeltaControllerTest, ClosedLoopMeetsTargetPerHeadOnSyntheticPlant) {
  const double target = 0.05;
  DeltaController c(2, 2, DeltaControllerOptions{.target_delta = target});
  std::mt19937_64 rng(5);
  std::normal_distribution<double> noise(0.0, 0.25);
  auto base = [](int u) { return 0.1 + 0.3 * u; };
  int64_t ok = 0, n = 0;
  for (int step = 0; step < 40000; ++step) {
    const int u = step % 4;
    const double delta = base(u) * std::exp(-2.0 * c.k_scale(u / 2, u % 2)) * std::exp(noise(rng));
    Feed(c, static_cast<int16_t>(u / 2), static_cast<int16_t>(u % 2), static_cast<float>(delta));
    if (step >= 4000) {
      ++n;
      ok += delta <= target;
    }
  }
  EXPECT_GE(static_cast<double>(ok) / n, 0.99);
  for (int u = 0; u < 4; ++u) {
    const double needed = std::log(base(u) / target) / 2.0;
    EXPECT_GT(c.k_scale(u / 2, u % 2), needed) << u;
    EXPECT_LT(c.k_scale(u / 2, u % 2), needed * 2.0 + 0.3) << u;
  }
}

}  // namespace
}  // namespace prehoc
