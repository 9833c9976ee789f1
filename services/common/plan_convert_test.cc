#include "services/common/plan_convert.h"

#include <tuple>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;

TEST(PlanConvertTest, RoundTripKeepsEveryCarriedField) {
  ModelConfig config;
  config.num_hidden_layers = 3;
  config.num_key_value_heads = 2;
  SparsityOptions s;
  s.policy = "prhs-budget-matched";
  s.target_delta = 0.05;
  s.budget = 0.25;
  auto plan = MakeSelectionPlan(config, s,
                                {{"sink", 4}, {"local", 16}, {"tau", 0.7}, {"max_reuse", 9},
                                 {"dilate_r", 2}, {"psaw_phi", 0.8}, {"etf_start", 1},
                                 {"gqa_max", 1}, {"gate_unrotated", 1}, {"follow", 1},
                                 {"scan_slices", 16}, {"scan_follow", 8}, {"gate_delta", 0.03},
                                 {"gate_exact_delta", 0.05}, {"gate_lse", 0.5},
                                 {"scan_reserve", 0.25}, {"keep_trail", 1}, {"gate_error", 0.1},
                                 {"gate_exact_error", 0.2}, {"k_scale@1", 0.5}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  plan->version = 7;
  plan->layers[2].head_k_scale = {1.5, 0.25};
  plan->layers[2].base_tau = 0.7;
  plan->layers[2].tau = 0.75;
  const absl::Time produced = absl::FromUnixMicros(1234567);
  v1::SelectionPlan p = PlanToProto("s1", *plan, produced);
  EXPECT_EQ(p.sequence_id(), "s1");
  absl::Time back_time;
  auto back = PlanFromProto(p, &back_time);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back_time, produced);
  EXPECT_EQ(back->version, 7u);
  EXPECT_EQ(back->policy, SelectionPolicy::kPrhs);
  EXPECT_EQ(back->policy_name, "prhs-budget-matched");
  EXPECT_TRUE(back->budget_matched);
  EXPECT_DOUBLE_EQ(back->budget_fraction, 0.25);
  EXPECT_DOUBLE_EQ(back->target_delta, 0.05);
  ASSERT_EQ(back->layers.size(), 3u);
  for (int l = 0; l < 3; ++l) {
    const LayerSelectionPlan& a = plan->layers[l];
    const LayerSelectionPlan& b = back->layers[l];
    EXPECT_EQ(b.sink, a.sink);
    EXPECT_EQ(b.local, a.local);
    EXPECT_DOUBLE_EQ(b.tau, a.tau);
    EXPECT_EQ(b.max_reuse, a.max_reuse);
    EXPECT_EQ(b.dilate_r, a.dilate_r);
    EXPECT_DOUBLE_EQ(b.dilate_m_fraction, a.dilate_m_fraction);
    EXPECT_DOUBLE_EQ(b.psaw_drop_fraction, a.psaw_drop_fraction);
    EXPECT_DOUBLE_EQ(b.etf_freeze_fraction, a.etf_freeze_fraction);
    EXPECT_EQ(b.etf_alias_layer, a.etf_alias_layer);
    EXPECT_EQ(b.refresh_interval, a.refresh_interval);
    EXPECT_EQ(b.gqa_max, a.gqa_max);
    EXPECT_TRUE(b.gate_unrotated);
    EXPECT_TRUE(b.follow);
    EXPECT_EQ(std::make_tuple(b.scan_slices, b.scan_follow, b.gate_delta, b.gate_exact_delta,
                              b.gate_lse, b.scan_reserve, b.keep_trail),
              std::make_tuple(16, 8, 0.03, 0.05, 0.5, 0.25, true));
    EXPECT_EQ(std::make_pair(b.gate_error, b.gate_exact_error), std::make_pair(0.1, 0.2));
    EXPECT_DOUBLE_EQ(b.k_scale, l == 1 ? 0.5 : 1.0);
    EXPECT_EQ(b.head_k_scale, a.head_k_scale);
    EXPECT_DOUBLE_EQ(b.base_tau, a.base_tau);
    // Same budgets as the original at any context.
    for (int kh = 0; kh < 2; ++kh) EXPECT_EQ(back->TopK(l, 1000, kh), plan->TopK(l, 1000, kh));
  }
  EXPECT_GT(plan->layers[2].psaw_drop_fraction, 0.0);  // the overrides did reach the plan
}

TEST(PlanConvertTest, BadPlansNameTheField) {
  v1::SelectionPlan p;
  p.set_policy("nope");
  p.set_version(1);
  p.add_layers();
  auto r = PlanFromProto(p);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("plan.policy"));
  p.set_policy("prhs");
  p.mutable_layers(0)->add_head_k_scale(-1);
  r = PlanFromProto(p);
  EXPECT_THAT(r.status().message(), HasSubstr("plan.layers[0].head_k_scale[0]"));
  p.mutable_layers(0)->clear_head_k_scale();
  p.mutable_layers(0)->set_sink_tokens(-2);
  EXPECT_THAT(PlanFromProto(p).status().message(), HasSubstr("plan.layers[0].sink_tokens"));
  p.mutable_layers(0)->set_sink_tokens(4);
  p.mutable_layers(0)->set_gate_delta(0.05);  // without scan_slices
  EXPECT_THAT(PlanFromProto(p).status().message(), HasSubstr("plan.layers[0].scan_slices"));
  p.mutable_layers(0)->set_scan_slices(8);
  p.mutable_layers(0)->set_gate_delta(2);
  EXPECT_THAT(PlanFromProto(p).status().message(), HasSubstr("gate_delta (2)"));
  p.mutable_layers(0)->set_gate_delta(0.05);
  p.mutable_layers(0)->set_gate_error(-1);
  EXPECT_THAT(PlanFromProto(p).status().message(), HasSubstr("gate_error (-1)"));
  p.mutable_layers(0)->set_gate_error(0.1);
  p.mutable_layers(0)->set_scan_slices(0);
  p.mutable_layers(0)->set_gate_delta(0);
  EXPECT_THAT(PlanFromProto(p).status().message(), HasSubstr("gate_error needs scan_slices"));
  p.mutable_layers(0)->set_gate_error(0);
  p.clear_layers();
  EXPECT_THAT(PlanFromProto(p).status().message(), HasSubstr("plan.layers"));
  p.add_layers();
  p.set_version(0);
  EXPECT_THAT(PlanFromProto(p).status().message(), HasSubstr("plan.version"));
  p.set_version(2);
  EXPECT_TRUE(PlanFromProto(p).ok());  // zero fields take the defaults
  EXPECT_DOUBLE_EQ(PlanFromProto(p)->layers[0].k_scale, 1.0);
  EXPECT_EQ(PlanFromProto(p)->layers[0].refresh_interval, 1);
}

}  // namespace
}  // namespace prehoc
