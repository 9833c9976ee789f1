#include "cachemgr/selection_plan.h"

#include <tuple>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;

ModelConfig Model(int layers) {
  ModelConfig c;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  return c;
}

TEST(SelectionPlanTest, PrhsDefaultsAndPsawSchedule) {
  auto off = MakeSelectionPlan(Model(8), SparsityOptions{.policy = "prhs"});
  ASSERT_TRUE(off.ok()) << off.status();
  for (const auto& l : off->layers) EXPECT_EQ(l.psaw_drop_fraction, 0.0);  // PSAW off by default
  auto plan = MakeSelectionPlan(Model(8), SparsityOptions{.policy = "prhs"}, {{"psaw_phi", 0.9}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->policy, SelectionPolicy::kPrhs);
  EXPECT_DOUBLE_EQ(plan->budget_fraction, 0.125);
  ASSERT_EQ(plan->layers.size(), 8u);
  for (int l = 0; l < 4; ++l) EXPECT_EQ(plan->layers[l].psaw_drop_fraction, 0.0) << l;
  // ℓ ≥ ℓ_s = 4: 1 − 0.9^{(ℓ−4)/4}, increasing with depth.
  EXPECT_DOUBLE_EQ(plan->layers[4].psaw_drop_fraction, 0.0);
  EXPECT_NEAR(plan->layers[6].psaw_drop_fraction, 1 - std::pow(0.9, 0.5), 1e-12);
  EXPECT_GT(plan->layers[7].psaw_drop_fraction, plan->layers[6].psaw_drop_fraction);
  EXPECT_EQ(plan->layers[0].sink, 8);
  EXPECT_EQ(plan->layers[0].local, 32);
  EXPECT_DOUBLE_EQ(plan->layers[0].tau, 0.8);
  EXPECT_EQ(plan->layers[7].etf_alias_layer, -1);  // ETF off by default
}

TEST(SelectionPlanTest, BudgetAndTopK) {
  auto plan = MakeSelectionPlan(Model(2), SparsityOptions{.policy = "prhs", .budget = 0.0625});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->Budget(4096), 256);
  EXPECT_EQ(plan->TopK(0, 4096), 256 - 8 - 32);
  EXPECT_EQ(plan->TopK(0, 100), 0);  // budget below sink + local
  auto matched = MakeSelectionPlan(Model(2), SparsityOptions{.policy = "prhs-budget-matched",
                                                             .budget = 0.0625});
  ASSERT_TRUE(matched.ok());
  EXPECT_TRUE(matched->budget_matched);
  // k + 2·r·(k/3) ≈ 216 → k = 216 / (5/3) = 129.6 → 129.
  EXPECT_EQ(matched->TopK(0, 4096), 129);
  auto absolute = MakeSelectionPlan(Model(2), SparsityOptions{.policy = "quest", .budget = 512});
  ASSERT_TRUE(absolute.ok());
  EXPECT_EQ(absolute->Budget(100000), 512);
  EXPECT_EQ(absolute->layers[0].sink, 0);
}

TEST(SelectionPlanTest, OverridesApplyAndBadOnesAreNamed) {
  auto ov = ParseOverrides("tau=0.9, sink=4,psaw_start=0,psaw_phi=0.9");
  ASSERT_TRUE(ov.ok()) << ov.status();
  auto plan = MakeSelectionPlan(Model(4), SparsityOptions{.policy = "prhs"}, *ov);
  ASSERT_TRUE(plan.ok());
  EXPECT_DOUBLE_EQ(plan->layers[0].tau, 0.9);
  EXPECT_EQ(plan->layers[0].sink, 4);
  EXPECT_GT(plan->layers[1].psaw_drop_fraction, 0.0);
  EXPECT_THAT(ParseOverrides("tau").status().message(), HasSubstr("key=value"));
  EXPECT_THAT(ParseOverrides("tau=abc").status().message(), HasSubstr("'abc' is not a number"));
  EXPECT_THAT(MakeSelectionPlan(Model(4), SparsityOptions{.policy = "prhs"}, {{"bogus", 1}})
                  .status()
                  .message(),
              HasSubstr("key 'bogus' is unknown"));
  EXPECT_THAT(MakeSelectionPlan(Model(4), SparsityOptions{.policy = "magic"}).status().message(),
              HasSubstr("sparsity.policy 'magic' is unknown"));
  EXPECT_THAT(MakeSelectionPlan(Model(4), SparsityOptions{.policy = "prhs", .target_delta = 1.5})
                  .status()
                  .message(),
              HasSubstr("target_delta"));
  EXPECT_THAT(MakeSelectionPlan(Model(4), SparsityOptions{.policy = "prhs"}, {{"tau", 3}})
                  .status()
                  .message(),
              HasSubstr("tau"));
}

TEST(SelectionPlanTest, ScanAndDeltaGateOptions) {
  auto off = MakeSelectionPlan(Model(3), SparsityOptions{.policy = "prhs"});
  ASSERT_TRUE(off.ok());
  auto fields = [](const LayerSelectionPlan& l) {
    return std::make_tuple(l.scan_slices, l.scan_follow, l.gate_delta, l.gate_exact_delta,
                           l.gate_lse, l.scan_reserve, l.keep_trail);
  };
  for (const auto& l : off->layers) {  // off by default
    EXPECT_EQ(fields(l), std::make_tuple(0, 0, 0.0, 0.0, 0.0, 0.0, false));
  }
  auto on = MakeSelectionPlan(
      Model(3), SparsityOptions{.policy = "prhs"},
      {{"scan_slices", 16}, {"scan_follow", 8}, {"gate_delta", 0.03}, {"gate_exact_delta", 0.05},
       {"gate_lse", 0.5}, {"scan_reserve", 0.25}, {"keep_trail", 1}});
  ASSERT_TRUE(on.ok()) << on.status();
  for (const auto& l : on->layers) {
    EXPECT_EQ(fields(l), std::make_tuple(16, 8, 0.03, 0.05, 0.5, 0.25, true));
  }
  auto message = [](std::map<std::string, double> ov) {
    return std::string(
        MakeSelectionPlan(Model(3), SparsityOptions{.policy = "prhs"}, ov).status().message());
  };
  EXPECT_THAT(message({{"gate_delta", 0.05}}), HasSubstr("gate_delta > 0 needs scan_slices"));
  EXPECT_THAT(message({{"scan_follow", 4}}), HasSubstr("scan_follow > 0 needs scan_slices"));
  EXPECT_THAT(message({{"scan_slices", -1}}), HasSubstr("scan_slices (-1)"));
  EXPECT_THAT(message({{"scan_slices", 4}, {"gate_delta", 1.5}}), HasSubstr("gate_delta (1.5)"));
  EXPECT_THAT(message({{"gate_exact_delta", -0.1}}), HasSubstr("gate_exact_delta (-0.1)"));
  EXPECT_THAT(message({{"gate_lse", -1}}), HasSubstr("gate_lse must be >= 0"));
  EXPECT_THAT(message({{"scan_reserve", 0.5}}), HasSubstr("scan_reserve > 0 needs scan_slices"));
  EXPECT_THAT(message({{"scan_slices", 8}, {"scan_reserve", 5}}), HasSubstr("[0, 4]"));
}

TEST(SelectionPlanTest, PerLayerOverridesApplyToTheirLayerOnly) {
  // key@L sets layer L only and wins over the plain key; k_scale scales that layer's top-k.
  auto p = MakeSelectionPlan(Model(4), SparsityOptions{.policy = "prhs", .budget = 0.125},
                             {{"gate_delta", 0.03}, {"scan_slices", 8}, {"gate_delta@2", 0.08},
                              {"max_reuse@0", 0}, {"local@3", 64}, {"k_scale@1", 0.5}});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->layers[0].max_reuse, 0);
  EXPECT_EQ(p->layers[1].max_reuse, 64);
  EXPECT_DOUBLE_EQ(p->layers[1].gate_delta, 0.03);
  EXPECT_DOUBLE_EQ(p->layers[2].gate_delta, 0.08);
  EXPECT_DOUBLE_EQ(p->layers[3].gate_delta, 0.03);
  EXPECT_EQ(p->layers[3].local, 64);
  EXPECT_EQ(p->layers[2].local, 32);
  // t = 4096: B = 512, k = 512 − 8 − 32 = 472; layer 1 at half; layer 3's wider window.
  EXPECT_EQ(p->TopK(0, 4096), 472);
  EXPECT_EQ(p->TopK(1, 4096), 236);
  EXPECT_EQ(p->TopK(3, 4096), 440);
  auto message = [](std::map<std::string, double> ov) {
    return std::string(
        MakeSelectionPlan(Model(4), SparsityOptions{.policy = "prhs"}, ov).status().message());
  };
  EXPECT_THAT(message({{"tau@4", 0.5}}), HasSubstr("'tau@4': the layer after '@' must be in [0, 4)"));
  EXPECT_THAT(message({{"tau@x", 0.5}}), HasSubstr("'tau@x'"));
  EXPECT_THAT(message({{"tau@", 0.5}}), HasSubstr("'tau@'"));
  EXPECT_THAT(message({{"budget_fraction@1", 0.5}}), HasSubstr("is unknown"));  // plan-wide key
  EXPECT_THAT(message({{"bogus@1", 0.5}}), HasSubstr("is unknown"));
  EXPECT_THAT(message({{"tau@2", 3}}), HasSubstr("tau must be in [-1, 1], got 3"));
  EXPECT_THAT(message({{"k_scale@0", -1}}), HasSubstr("k_scale must be in (0, 64]"));
  EXPECT_THAT(message({{"gate_delta@1", 0.05}}), HasSubstr("gate_delta > 0 needs scan_slices"));
  EXPECT_THAT(message({{"gate_error", 0.05}}), HasSubstr("gate_error > 0 needs scan_slices"));
  EXPECT_THAT(message({{"gate_exact_error", -1}}), HasSubstr("gate_exact_error (-1)"));
}

TEST(SelectionPlanTest, HShareAndEtfParameters) {
  auto h = MakeSelectionPlan(Model(4), SparsityOptions{.policy = "hshare"});
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->layers[2].refresh_interval, 2);
  EXPECT_EQ(h->layers[2].approx_channels, 16);
  auto e = MakeSelectionPlan(Model(8), SparsityOptions{.policy = "prhs"}, {{"etf_start", 2}});
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->layers[1].etf_alias_layer, -1);
  EXPECT_EQ(e->layers[5].etf_alias_layer, 2);
  EXPECT_GT(e->layers[7].etf_freeze_fraction, e->layers[5].etf_freeze_fraction);
}

// The frozen rows Engine::Step and CudaModel share: whole pages, the last row's page never,
// non-decreasing over layers, 0 beyond the plan's layers.
TEST(SelectionPlanTest, EtfFrozenRowsArePagedMonotoneAndSpareTheLastRow) {
  SelectionPlan plan;
  plan.layers.resize(4);
  plan.layers[1].etf_freeze_fraction = 0.30;  // 0.30 * 100 = 30 -> 16
  plan.layers[2].etf_freeze_fraction = 0.10;  // 10 -> 0, but not below layer 1's 16
  plan.layers[3].etf_freeze_fraction = 1.0;   // 100 -> 96 = the pages before row 99
  EXPECT_EQ(EtfFrozenRows(plan, 4, 100, 16), (std::vector<int64_t>{0, 16, 16, 96}));
  EXPECT_EQ(EtfFrozenRows(plan, 6, 100, 16), (std::vector<int64_t>{0, 16, 16, 96, 0, 0}));
  EXPECT_EQ(EtfFrozenRows(plan, 2, 100, 16), (std::vector<int64_t>{0, 16}));
  EXPECT_EQ(EtfFrozenRows(plan, 4, 96, 16), (std::vector<int64_t>{0, 16, 16, 80}));
  EXPECT_EQ(EtfFrozenRows(plan, 4, 1, 16), (std::vector<int64_t>{0, 0, 0, 0}));
}

}  // namespace
}  // namespace prehoc
