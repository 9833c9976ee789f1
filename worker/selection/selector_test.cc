#include "worker/selection/selector.h"

#include <filesystem>
#include <numeric>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/engine.h"
#include "worker/rope.h"

namespace prehoc {
namespace {

namespace fs = std::filesystem;

TEST(SelectionHelpersTest, TopKMergeAndDroppedMass) {
  std::vector<float> s = {0.1f, 0.5f, 0.2f, 0.5f, 0.05f, 0.15f};
  EXPECT_EQ(TopKIndices(s, 0, 6, 3), (std::vector<int32_t>{1, 3, 2}));  // ties: lower index first
  EXPECT_EQ(TopKIndices(s, 2, 5, 10), (std::vector<int32_t>{3, 2, 4}));
  EXPECT_TRUE(TopKIndices(s, 4, 2, 3).empty());
  std::vector<int32_t> mid = {7, 3, 3, 9, 1};
  // sink [0,2), local [8,10): 1 is inside the sink, 9 inside the window.
  EXPECT_EQ(MergeIndexSet(2, mid, 2, 10), (std::vector<int32_t>{0, 1, 3, 7, 8, 9}));
  EXPECT_EQ(MergeIndexSet(5, {}, 5, 4), (std::vector<int32_t>{0, 1, 2, 3}));
  std::vector<float> p = {0.5f, 0.25f, 0.25f};
  std::vector<int32_t> keep = {0, 2};
  EXPECT_NEAR(DroppedMass(p, keep), 0.25, 1e-7);
  EXPECT_NEAR(DroppedMass(p, std::vector<int32_t>{0, 1, 2}), 0.0, 1e-7);
}

// A real engine with a prefilled 300-token sequence: the selectors see real K/V.
class SelectorEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    EngineOptions o;
    o.model_dir =
        (fs::path(PREHOC_SOURCE_DIR) / "tests" / "fixtures" / "hf" / "llama_gqa_f32").string();
    o.num_threads = 2;
    o.kv_cache_bytes = 32 << 20;
    o.max_context = 1024;  // the fixture declares 256 positions; RoPE extrapolates fine
    auto e = Engine::Create(o);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
    std::mt19937 rng(3);
    prompt_.resize(300);
    for (int32_t& t : prompt_) t = static_cast<int32_t>(rng() % 256);
    seq_ = engine_->CreateSequence();
    Engine::StepItem item{seq_, prompt_, false};
    auto r = engine_->Step(std::span<const Engine::StepItem>(&item, 1));
    ASSERT_TRUE(r.ok()) << r.status();
  }

  // Decodes `n` tokens (fixed inputs) on a fork of the prompt with `sel`; returns the logits.
  std::vector<std::vector<float>> Decode(SequenceSelector* sel, int n) {
    auto fork = engine_->ForkSequence(seq_);
    EXPECT_TRUE(fork.ok());
    std::vector<std::vector<float>> out;
    for (int i = 0; i < n; ++i) {
      int32_t tok = 40 + i;
      Engine::StepItem item{*fork, std::span<const int32_t>(&tok, 1), false, sel};
      auto r = engine_->Step(std::span<const Engine::StepItem>(&item, 1));
      EXPECT_TRUE(r.ok()) << r.status();
      out.push_back((*r)[0]);
    }
    EXPECT_TRUE(engine_->FreeSequence(*fork).ok());
    return out;
  }

  std::unique_ptr<SequenceSelector> Make(const std::string& policy, double budget,
                                         std::map<std::string, double> ov = {}) {
    auto plan = MakeSelectionPlan(engine_->config(), SparsityOptions{.policy = policy, .budget = budget}, ov);
    EXPECT_TRUE(plan.ok()) << plan.status();
    auto sel = CreateSelector(engine_->config(), *plan);
    EXPECT_TRUE(sel.ok()) << sel.status();
    return std::move(*sel);
  }

  std::unique_ptr<Engine> engine_;
  std::vector<int32_t> prompt_;
  Engine::SeqId seq_;
};

float MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

TEST_F(SelectorEngineTest, FullBudgetPoliciesEqualDense) {
  auto dense = Decode(nullptr, 4);
  for (std::string p : {"dense", "oracle", "prhs", "quest", "hshare"}) {
    auto sel = Make(p, 1.0);  // budget = the whole context
    auto got = Decode(sel.get(), 4);
    for (int i = 0; i < 4; ++i) EXPECT_LT(MaxDiff(got[i], dense[i]), 1e-5f) << p << " step " << i;
    EXPECT_NEAR(sel->Report().mean_kept_fraction, 1.0, 1e-12) << p;
  }
  EXPECT_EQ(engine_->pages().num_used(), static_cast<int>(PagesFor(300, 16)));
}

TEST_F(SelectorEngineTest, EveryPolicyEmitsValidListsWithinBudget) {
  for (std::string p : {"oracle", "streaming", "h2o", "quest", "prhs", "prhs-budget-matched", "hshare"}) {
    auto sel = Make(p, 0.25);
    sel->set_measure_step_delta(true);
    Decode(sel.get(), 6);
    const SelectionTelemetry& t = sel->telemetry();
    const int kvh = engine_->config().num_key_value_heads, layers = engine_->config().num_hidden_layers;
    EXPECT_EQ(t.selections, 6 * kvh * layers) << p;
    ASSERT_EQ(t.step_delta.size(), static_cast<size_t>(t.selections)) << p;
    for (float d : t.step_delta) {
      EXPECT_GE(d, 0.0f);
      EXPECT_LE(d, 1.0f);
    }
    const double kept = sel->Report().mean_kept_fraction;
    // Budget 1/4 of ~303 tokens; PrHS may exceed it through dilation (≤ 2·k/3), Quest rounds up
    // to whole pages.
    EXPECT_GT(kept, 0.05) << p;
    EXPECT_LT(kept, p == "prhs" ? 0.25 * 5.0 / 3.0 : 0.32) << p;
  }
}

TEST_F(SelectorEngineTest, OracleDropsTheLeastMassForItsSize) {
  auto oracle = Make("oracle", 0.25);
  auto stream = Make("streaming", 0.25);
  oracle->set_measure_step_delta(true);
  stream->set_measure_step_delta(true);
  Decode(oracle.get(), 3);
  Decode(stream.get(), 3);
  const auto& a = oracle->telemetry().step_delta;
  const auto& b = stream->telemetry().step_delta;
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_LE(a[i], b[i] + 1e-6f) << i;
}

TEST_F(SelectorEngineTest, CisGateSharesOrRefreshesAsTauSays) {
  // τ = −1: every gate passes, so each (layer, kv head) refreshes once and then shares.
  auto always = Make("prhs", 0.25, {{"tau", -1}});
  Decode(always.get(), 5);
  const int units = engine_->config().num_hidden_layers * engine_->config().num_key_value_heads;
  EXPECT_EQ(always->telemetry().refreshes, units);
  EXPECT_EQ(always->telemetry().shares, 4 * units);
  for (int l = 0; l < engine_->config().num_hidden_layers; ++l) {
    EXPECT_EQ(always->telemetry().refreshes_per_layer[l], engine_->config().num_key_value_heads);
    EXPECT_EQ(always->telemetry().shares_per_layer[l], 4 * engine_->config().num_key_value_heads);
  }
  // τ = 1: cos > 1 never holds, so every step refreshes and measures δ of the previous set.
  auto never = Make("prhs", 0.25, {{"tau", 1}});
  Decode(never.get(), 5);
  EXPECT_EQ(never->telemetry().refreshes, 5 * units);
  EXPECT_EQ(never->telemetry().shares, 0);
  EXPECT_EQ(never->telemetry().refresh_delta.size(), static_cast<size_t>(4 * units));
  // max_reuse bounds sharing.
  auto bounded = Make("prhs", 0.25, {{"tau", -1}, {"max_reuse", 1}});
  Decode(bounded.get(), 5);
  EXPECT_EQ(bounded->telemetry().refreshes, 3 * units);  // steps 0, 2, 4
}

TEST_F(SelectorEngineTest, UnrotatedGateComparesQueriesBeforeRope) {
  // The same query content at positions 289 and 299: post-RoPE the two differ by a rotation of
  // 10 positions (cos well below 0.99 with random content); rotated back to position 0 they are
  // equal (cos 1), so only the unrotated gate shares the anchor's set.
  const ModelConfig& c = engine_->config();
  const std::vector<float> inv_freq = RopeInvFrequencies(c);
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> q0(c.num_attention_heads * c.head_dim);
  for (float& x : q0) x = u(rng);
  auto at = [&](int pos) {
    std::vector<float> q = q0;
    ApplyRope(q.data(), c.num_attention_heads, c.head_dim, pos, inv_freq);
    return q;
  };
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  std::vector<std::vector<int32_t>> lists;
  for (int unrotated : {0, 1}) {
    auto sel = Make("prhs", 0.25, {{"tau", 0.99}, {"gate_unrotated", unrotated}});
    sel->Select(0, at(289).data(), KvView(&engine_->kv_cache(), *pages, 0, 290), &lists);
    sel->Select(0, at(299).data(), KvView(&engine_->kv_cache(), *pages, 0, 300), &lists);
    const int kvh = c.num_key_value_heads;
    EXPECT_EQ(sel->telemetry().refreshes, unrotated ? kvh : 2 * kvh) << unrotated;
    EXPECT_EQ(sel->telemetry().shares, unrotated ? kvh : 0) << unrotated;
  }
}

TEST_F(SelectorEngineTest, FollowShiftsTheBestAnchorsOnShareSteps) {
  // Refresh at length 260, then share (τ = −1) at 262: with `follow` the list also holds the
  // best anchors' ±1 neighbourhoods moved by the 1 step since the refresh, and nothing else.
  const ModelConfig& c = engine_->config();
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> q(c.num_attention_heads * c.head_dim);
  for (float& x : q) x = u(rng);
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  std::vector<std::vector<int32_t>> plain, followed;
  for (int follow : {0, 1}) {
    auto sel = Make("prhs", 0.25, {{"tau", -1}, {"follow", follow}});
    std::vector<std::vector<int32_t>> lists;
    sel->Select(0, q.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &lists);
    sel->Select(0, q.data(), KvView(&engine_->kv_cache(), *pages, 0, 261), &lists);
    EXPECT_EQ(sel->telemetry().shares, c.num_key_value_heads);
    (follow ? followed : plain) = lists;
  }
  const int local_start = 261 - 32;
  for (int kh = 0; kh < c.num_key_value_heads; ++kh) {
    std::set<int32_t> base(plain[kh].begin(), plain[kh].end());
    int extra = 0;
    for (int32_t x : base) EXPECT_TRUE(std::binary_search(followed[kh].begin(), followed[kh].end(), x));
    for (int32_t x : followed[kh]) {
      if (base.count(x)) continue;
      ++extra;
      // x = b + 1 + d for an anchor b of the shared set and |d| <= 1: some member of the plain
      // list's middle lies within [x - 2, x].
      const bool near = base.count(x - 2) || base.count(x - 1) || base.count(x);
      EXPECT_TRUE(near && x >= 8 && x < local_start) << x;
    }
    EXPECT_GT(extra, 0) << "kv head " << kh;
  }
}

TEST_F(SelectorEngineTest, PsawExcludesTheEarlyCandidates) {
  // Tiny model: 2 layers, PSAW from layer 0 with φ = 0.1: layer 1 drops 1 − 0.1^{1/2} ≈ 68 %.
  auto sel = Make("prhs", 0.25, {{"psaw_start", 0}, {"psaw_phi", 0.1}, {"tau", 1}});
  const double drop = 1 - std::sqrt(0.1);
  ASSERT_NEAR(sel->plan().layers[1].psaw_drop_fraction, drop, 1e-12);
  auto fork = engine_->ForkSequence(seq_);
  ASSERT_TRUE(fork.ok());
  int32_t tok = 7;
  Engine::StepItem item{*fork, std::span<const int32_t>(&tok, 1), false, sel.get()};
  ASSERT_TRUE(engine_->Step(std::span<const Engine::StepItem>(&item, 1)).ok());
  // Re-run selection for layer 1 on the same state to inspect the list.
  std::vector<float> q(engine_->config().num_attention_heads * engine_->config().head_dim, 0.1f);
  auto pages = engine_->PageTable(*fork);
  KvView view(&engine_->kv_cache(), *pages, 1, 301);
  std::vector<std::vector<int32_t>> lists;
  sel->Select(1, q.data(), view, &lists);
  for (const auto& l : lists) {
    ASSERT_FALSE(l.empty());
    for (int32_t i : l) EXPECT_TRUE(i < 8 || i >= static_cast<int32_t>(drop * 301)) << i;
  }
  ASSERT_TRUE(engine_->FreeSequence(*fork).ok());
}

TEST_F(SelectorEngineTest, H2OEvictsPermanently) {
  auto sel = Make("h2o", 0.2);
  Decode(sel.get(), 8);
  // Kept count per selection never exceeds the budget.
  EXPECT_LE(sel->telemetry().kept_tokens_sum,
            static_cast<int64_t>(sel->telemetry().selections * (0.2 * 308 + 1)));
}

TEST_F(SelectorEngineTest, BadPlanIsRejected) {
  SelectionPlan plan;
  plan.layers.resize(5);
  EXPECT_EQ(CreateSelector(engine_->config(), plan).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace prehoc

namespace prehoc {
namespace {

class PrefillPlanTest : public SelectorEngineTest {
 protected:
  // Prefills prompt_ with `plan` on a fresh sequence; returns the last logits and the seq.
  std::pair<std::vector<float>, Engine::SeqId> Prefill(const SelectionPlan* plan) {
    const Engine::SeqId s = engine_->CreateSequence();
    Engine::StepItem item{s, prompt_, false, nullptr, plan};
    auto r = engine_->Step(std::span<const Engine::StepItem>(&item, 1));
    EXPECT_TRUE(r.ok()) << r.status();
    return {(*r)[0], s};
  }
  SelectionPlan Plan(std::map<std::string, double> ov) {
    auto p = MakeSelectionPlan(engine_->config(), SparsityOptions{.policy = "prhs"}, ov);
    EXPECT_TRUE(p.ok()) << p.status();
    return *p;
  }
};

TEST_F(PrefillPlanTest, NeutralPlanEqualsDensePrefill) {
  auto [dense, s0] = Prefill(nullptr);
  SelectionPlan neutral = Plan({{"psaw_phi", 1.0}});  // no band, ETF off by default
  auto [same, s1] = Prefill(&neutral);
  EXPECT_LT(MaxDiff(dense, same), 1e-6f);
  EXPECT_EQ(*engine_->AliasedPages(s1), 0);
}

TEST_F(PrefillPlanTest, PsawBandChangesPrefillButStaysFinite) {
  auto [dense, s0] = Prefill(nullptr);
  SelectionPlan band = Plan({{"psaw_start", 0}, {"psaw_phi", 0.2}});
  auto [banded, s1] = Prefill(&band);
  EXPECT_GT(MaxDiff(dense, banded), 1e-4f);
  for (float v : banded) ASSERT_TRUE(std::isfinite(v));
}

TEST_F(PrefillPlanTest, EtfFreezesWholePagesAndAliasesThem) {
  auto [dense, s0] = Prefill(nullptr);
  // Layer 1 of 2 freezes 1 − 0.2^{1/2} ≈ 55 % of 300 tokens → 160 tokens = 10 whole pages.
  SelectionPlan etf = Plan({{"etf_start", 0}, {"etf_psi", 0.2}, {"psaw_phi", 1.0}});
  auto [frozen, s1] = Prefill(&etf);
  EXPECT_EQ(*engine_->AliasedPages(s1), 10);
  EXPECT_GT(MaxDiff(dense, frozen), 1e-4f);
  for (float v : frozen) ASSERT_TRUE(std::isfinite(v));
  // Decoding after ETF reads the aliased pages (and a fork keeps the aliases).
  auto fork = engine_->ForkSequence(s1);
  ASSERT_TRUE(fork.ok());
  EXPECT_EQ(*engine_->AliasedPages(*fork), 10);
  int32_t tok = 5;
  Engine::StepItem a{s1, std::span<const int32_t>(&tok, 1), false};
  Engine::StepItem b{*fork, std::span<const int32_t>(&tok, 1), false};
  auto ra = engine_->Step(std::span<const Engine::StepItem>(&a, 1));
  auto rb = engine_->Step(std::span<const Engine::StepItem>(&b, 1));
  ASSERT_TRUE(ra.ok() && rb.ok());
  EXPECT_EQ((*ra)[0], (*rb)[0]);
}

}  // namespace
}  // namespace prehoc
