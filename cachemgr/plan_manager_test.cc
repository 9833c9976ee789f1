#include "cachemgr/plan_manager.h"

#include <atomic>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;

constexpr PlanModelShape kShape{/*num_layers=*/2, /*num_kv_heads=*/2};

SparsityOptions Prhs(double target_delta, const std::string& overrides = "") {
  SparsityOptions s;
  s.policy = "prhs";
  s.target_delta = target_delta;
  s.budget = 48;
  s.overrides = overrides;
  return s;
}

TEST(PlanManagerTest, OpenComputesThePresetPlanWithOverridesAndQueuesIt) {
  absl::Time now = absl::FromUnixSeconds(1000);
  PlanManagerOptions o;
  o.clock = [&] { return now; };
  PlanManager pm(o);
  auto v = pm.Open("s1", "w1", "tiny", kShape, Prhs(0, "sink=4,tau=0.7"));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, 1u);
  std::vector<PlanUpdate> u = pm.TakePending("w1");
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].sequence_id, "s1");
  EXPECT_EQ(u[0].produced, now);
  EXPECT_EQ(u[0].plan.policy, SelectionPolicy::kPrhs);
  EXPECT_EQ(u[0].plan.budget_tokens, 48);
  ASSERT_EQ(u[0].plan.layers.size(), 2u);
  EXPECT_EQ(u[0].plan.layers[1].sink, 4);
  EXPECT_DOUBLE_EQ(u[0].plan.layers[1].tau, 0.7);
  EXPECT_TRUE(pm.TakePending("w1").empty());  // taken
  EXPECT_TRUE(pm.TakePending("w2").empty());

  // Nothing to plan for dense / the worker's default; bad overrides name the key.
  SparsityOptions dense;
  EXPECT_EQ(pm.Open("s2", "w1", "tiny", kShape, dense).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(pm.Open("s2", "w1", "tiny", {}, Prhs(0)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto bad = pm.Open("s2", "w1", "tiny", kShape, Prhs(0, "nope=1"));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("nope"));
  EXPECT_EQ(pm.Open("s1", "w1", "tiny", kShape, Prhs(0)).status().code(),
            absl::StatusCode::kAlreadyExists);
  pm.Close("s1");
  EXPECT_EQ(pm.open_plans(), 0);
}

// A synthetic telemetry trace: violations on layer 1 head 0 raise that unit's k, every open
// sequence under the same (model, policy, δ*) gets a new version, others do not.
TEST(PlanManagerTest, TelemetryDrivesTheSharedControllerAndQueuesNewVersions) {
  prometheus::Registry registry;
  PlanMetrics metrics(registry);
  absl::Time now = absl::FromUnixSeconds(1000);
  PlanManagerOptions o;
  o.clock = [&] { return now; };
  o.metrics = &metrics;
  PlanManager pm(o);
  ASSERT_TRUE(pm.Open("a", "w1", "tiny", kShape, Prhs(0.05)).ok());
  ASSERT_TRUE(pm.Open("b", "w2", "tiny", kShape, Prhs(0.05)).ok());
  ASSERT_TRUE(pm.Open("c", "w1", "tiny", kShape, Prhs(0.01)).ok());  // another controller
  ASSERT_TRUE(pm.Open("d", "w1", "tiny", kShape, Prhs(0)).ok());     // budget-driven
  pm.TakePending("w1");
  pm.TakePending("w2");
  const uint64_t va = pm.Get("a")->plan.version;
  const uint64_t vc = pm.Get("c")->plan.version;

  // Within the target: nothing changes.
  std::vector<RefreshSample> calm = {{"a", 1, 0, 0.03}, {"b", 0, 1, 0.04}};
  EXPECT_EQ(pm.Observe(calm), 0);
  EXPECT_TRUE(pm.TakePending("w1").empty());

  now += absl::Seconds(3);
  std::vector<RefreshSample> trace = {{"a", 1, 0, 0.2}, {"a", 1, 0, 0.3}, {"zz", 0, 0, 0.9},
                                      {"d", 0, 0, 0.9}, {"a", 7, 0, 0.9}};
  EXPECT_EQ(pm.Observe(trace), 2);  // a and b share the controller
  std::vector<PlanUpdate> w1 = pm.TakePending("w1");
  ASSERT_EQ(w1.size(), 1u);
  EXPECT_EQ(w1[0].sequence_id, "a");
  EXPECT_EQ(w1[0].plan.version, va + 1);
  EXPECT_EQ(w1[0].produced, now);
  ASSERT_EQ(w1[0].plan.layers[1].head_k_scale.size(), 2u);
  EXPECT_DOUBLE_EQ(w1[0].plan.layers[1].head_k_scale[0], 1.5 * 1.5);
  EXPECT_DOUBLE_EQ(w1[0].plan.layers[1].head_k_scale[1], 1.0);
  EXPECT_DOUBLE_EQ(w1[0].plan.layers[0].head_k_scale[0], 1.0);
  // The budget the worker will use grew accordingly: k(t) = (B − sink − local) · scale.
  EXPECT_EQ(w1[0].plan.TopK(1, 200, 0), static_cast<int64_t>((48 - 8 - 32) * 2.25));
  std::vector<PlanUpdate> w2 = pm.TakePending("w2");
  ASSERT_EQ(w2.size(), 1u);
  EXPECT_EQ(w2[0].sequence_id, "b");
  EXPECT_EQ(pm.Get("c")->plan.version, vc);
  EXPECT_EQ(pm.Get("d")->plan.version, 1u);

  // A new sequence under the same key starts from what the controller learned.
  ASSERT_TRUE(pm.Open("e", "w2", "tiny", kShape, Prhs(0.05)).ok());
  EXPECT_DOUBLE_EQ(pm.Get("e")->plan.layers[1].head_k_scale[0], 2.25);
  EXPECT_GT(pm.Get("e")->plan.version, 1u);
  ASSERT_NE(pm.Controller("tiny", "prhs", 0.05), nullptr);
  EXPECT_EQ(pm.Controller("tiny", "prhs", 0.05)->violations(), 2);

  for (const auto& f : registry.Collect()) {
    if (f.name == "prehoc_cachemgr_delta_samples_ignored_total") {
      EXPECT_EQ(f.metric[0].counter.value, 3);  // zz (unknown), d (no target), layer 7
    }
    if (f.name == "prehoc_cachemgr_selection_plans") {
      EXPECT_EQ(f.metric[0].gauge.value, 5);
    }
  }
}

TEST(PlanManagerTest, PendingKeepsOnlyTheNewestPlanAndSubscribeRequeuesOpenPlans) {
  PlanManager pm;
  ASSERT_TRUE(pm.Open("a", "w1", "tiny", kShape, Prhs(0.05)).ok());
  const uint64_t v0 = pm.Get("a")->plan.version;
  std::vector<RefreshSample> v = {{"a", 0, 0, 0.5}};
  EXPECT_EQ(pm.Observe(v), 1);
  EXPECT_EQ(pm.Observe(v), 1);
  std::vector<PlanUpdate> u = pm.TakePending("w1");
  ASSERT_EQ(u.size(), 1u);  // coalesced: one entry, the newest version
  EXPECT_EQ(u[0].plan.version, v0 + 2);

  std::atomic<int> wakes{0};
  const uint64_t h = pm.Subscribe("w1", [&] { ++wakes; });
  EXPECT_EQ(wakes.load(), 1);  // the open plan was queued again for the (re)connected worker
  u = pm.TakePending("w1");
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].plan.version, v0 + 2);
  EXPECT_EQ(pm.Observe(v), 1);
  EXPECT_EQ(wakes.load(), 2);
  pm.Close("a");
  EXPECT_TRUE(pm.TakePending("w1").empty());  // a closed sequence's update is dropped
  pm.Unsubscribe(h);
  ASSERT_TRUE(pm.Open("b", "w1", "tiny", kShape, Prhs(0.05)).ok());
  EXPECT_EQ(wakes.load(), 2);  // no longer subscribed
}

}  // namespace
}  // namespace prehoc
