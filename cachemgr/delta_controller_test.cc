#include "cachemgr/delta_controller.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace prehoc {
namespace {

TEST(DeltaControllerTest, ViolationRaisesBudgetImmediately) {
  DeltaController c(2, DeltaControllerOptions{.target_delta = 0.1});
  std::vector<int16_t> layers = {1};
  std::vector<float> d = {0.2f};
  EXPECT_TRUE(c.Observe(layers, d));
  EXPECT_DOUBLE_EQ(c.k_scale(1), 1.5);
  EXPECT_DOUBLE_EQ(c.k_scale(0), 1.0);
  EXPECT_EQ(c.violations(), 1);
}

TEST(DeltaControllerTest, SustainedSlackLowersBudgetSlowly) {
  DeltaControllerOptions o{.target_delta = 0.1, .window = 4};
  DeltaController c(1, o);
  std::vector<int16_t> l(1, 0);
  std::vector<float> low(1, 0.01f), mid(1, 0.08f);
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(c.Observe(l, low));
  EXPECT_FALSE(c.Observe(l, mid));  // dead band resets the run
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(c.Observe(l, low));
  EXPECT_TRUE(c.Observe(l, low));
  EXPECT_DOUBLE_EQ(c.k_scale(0), 0.95);
}

TEST(DeltaControllerTest, ApplyWritesScalesAndBumpsVersionOnlyOnChange) {
  SelectionPlan plan;
  plan.layers.resize(2);
  plan.version = 3;
  DeltaController c(2, DeltaControllerOptions{.target_delta = 0.1});
  c.Apply(&plan);
  EXPECT_EQ(plan.version, 3u);
  std::vector<int16_t> l = {0};
  std::vector<float> d = {0.5f};
  c.Observe(l, d);
  c.Apply(&plan);
  EXPECT_EQ(plan.version, 4u);
  EXPECT_DOUBLE_EQ(plan.layers[0].k_scale, 1.5);
  c.Apply(&plan);
  EXPECT_EQ(plan.version, 4u);
}

TEST(DeltaControllerTest, AtMaxScaleRaisesTauInsteadOnce) {
  DeltaControllerOptions o{.target_delta = 0.1, .max_scale = 1.5};
  DeltaController c(1, o);
  SelectionPlan plan;
  plan.layers.resize(1);
  plan.layers[0].tau = 0.8;
  std::vector<int16_t> l = {0};
  std::vector<float> d = {0.5f};
  c.Observe(l, d);  // scale 1 → 1.5 (max)
  c.Observe(l, d);  // τ + 0.05
  c.Apply(&plan);
  c.Apply(&plan);  // idempotent: τ is base + increments, not accumulated per Apply
  EXPECT_NEAR(plan.layers[0].tau, 0.85, 1e-12);
}

// Closed loop against a synthetic plant whose dropped mass falls with the budget:
// δ = base · exp(−k_scale · κ) · lognormal noise. The controller must keep ≥ 99 % of the
// measurements at or below δ* and settle near the smallest scale that achieves it.
TEST(DeltaControllerTest, ClosedLoopMeetsTargetOnSyntheticPlant) {
  const double target = 0.05;
  DeltaController c(4, DeltaControllerOptions{.target_delta = target});
  std::mt19937_64 rng(5);
  std::normal_distribution<double> noise(0.0, 0.25);
  int64_t ok = 0, n = 0;
  for (int step = 0; step < 20000; ++step) {
    const int16_t layer = static_cast<int16_t>(step % 4);
    const double base = 0.4 + 0.1 * layer;  // deeper layers need more budget
    const double delta = base * std::exp(-2.0 * c.k_scale(layer)) * std::exp(noise(rng));
    std::vector<int16_t> l = {layer};
    std::vector<float> d = {static_cast<float>(delta)};
    c.Observe(l, d);
    if (step >= 2000) {  // after warm-up
      ++n;
      ok += delta <= target;
    }
  }
  EXPECT_GE(static_cast<double>(ok) / n, 0.99);
  for (int l = 0; l < 4; ++l) {
    // Scale at which the *median* plant output equals the target: the controller may sit above
    // it (noise margin) but not wildly so.
    const double needed = std::log((0.4 + 0.1 * l) / target) / 2.0;
    EXPECT_GT(c.k_scale(l), needed) << l;
    EXPECT_LT(c.k_scale(l), needed * 2.0) << l;
  }
}

}  // namespace
}  // namespace prehoc
