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

TEST_F(SelectorEngineTest, MeasuredOutputErrorAndUnitsMatchTheLists) {
  // A full budget attends to everything: output error 0. A 1/8 budget changes the output, and
  // more where it drops more mass; every sample names its (layer, kv head) unit in order.
  const int kvh = engine_->config().num_key_value_heads, layers = engine_->config().num_hidden_layers;
  auto full = Make("oracle", 1.0);
  auto sparse = Make("streaming", 0.125);
  full->set_measure_step_delta(true);
  sparse->set_measure_step_delta(true);
  Decode(full.get(), 3);
  Decode(sparse.get(), 3);
  for (const SequenceSelector* sel : {full.get(), sparse.get()}) {
    const SelectionTelemetry& t = sel->telemetry();
    ASSERT_EQ(t.step_output_error.size(), t.step_delta.size());
    ASSERT_EQ(t.step_delta_unit.size(), t.step_delta.size());
    for (size_t i = 0; i < t.step_delta_unit.size(); ++i) {
      EXPECT_EQ(t.step_delta_unit[i], static_cast<int>(i % (layers * kvh))) << i;
    }
  }
  for (float e : full->telemetry().step_output_error) EXPECT_LT(e, 1e-5f);
  double err = 0, high = 0, low = 0;
  int n_high = 0, n_low = 0;
  const SelectionTelemetry& t = sparse->telemetry();
  for (size_t i = 0; i < t.step_output_error.size(); ++i) {
    EXPECT_GE(t.step_output_error[i], 0.0f);
    err += t.step_output_error[i];
    (t.step_delta[i] > 0.5 ? high : low) += t.step_output_error[i];
    (t.step_delta[i] > 0.5 ? n_high : n_low) += 1;
  }
  EXPECT_GT(err / t.step_output_error.size(), 0.01);
  if (n_high > 0 && n_low > 0) {
    EXPECT_GT(high / n_high, low / n_low);
  }
}

TEST_F(SelectorEngineTest, PerLayerOverridesChangeOnlyTheirLayer) {
  // τ = −1 shares everywhere, except layer 0 with max_reuse@0 = 0: it refreshes every step.
  const int kvh = engine_->config().num_key_value_heads, layers = engine_->config().num_hidden_layers;
  auto sel = Make("prhs", 0.25, {{"tau", -1}, {"max_reuse@0", 0}});
  Decode(sel.get(), 5);
  const SelectionTelemetry& t = sel->telemetry();
  EXPECT_EQ(t.refreshes_per_layer[0], 5 * kvh);
  for (int l = 1; l < layers; ++l) EXPECT_EQ(t.refreshes_per_layer[l], kvh) << l;
  for (int u = 0; u < layers * kvh; ++u) {
    EXPECT_EQ(t.refreshes_per_unit[u], u < kvh ? 5 : 1) << u;
  }
}

TEST_F(SelectorEngineTest, OutputErrorGatesBoundTheSharedListsError) {
  // The exact output-error gate shares only while the shared list's measured output error stays
  // within the margin of the error its unit had at the last refresh.
  const int units = engine_->config().num_hidden_layers * engine_->config().num_key_value_heads;
  const double margin = 0.02;
  auto gated = Make("prhs", 0.125, {{"tau", -1}, {"gate_exact_error", margin}});
  auto loose = Make("prhs", 0.125, {{"tau", -1}, {"gate_exact_error", 9}});
  gated->set_measure_step_delta(true);
  Decode(gated.get(), 12);
  Decode(loose.get(), 12);
  const SelectionTelemetry& t = gated->telemetry();
  ASSERT_EQ(t.step_refreshed.size(), t.step_output_error.size());
  std::vector<double> anchor(units, -1);
  int shares = 0;
  for (size_t i = 0; i < t.step_output_error.size(); ++i) {
    const int u = t.step_delta_unit[i];
    if (t.step_refreshed[i]) {
      anchor[u] = t.step_output_error[i];
    } else {
      ASSERT_GE(anchor[u], 0) << i;  // the first selection of a unit is a refresh
      EXPECT_LE(t.step_output_error[i], anchor[u] + margin + 1e-5) << i;
      ++shares;
    }
  }
  EXPECT_EQ(t.refreshes + shares, 12 * units);
  EXPECT_EQ(loose->telemetry().refreshes, units);  // a margin of 9 never refreshes again
  EXPECT_GT(t.refreshes, units);
  // The estimated gate with one slice (every out-of-set key scanned) reads the values of the
  // scanned keys too (counted), and refreshes more at a smaller margin.
  auto est_tight = Make("prhs", 0.125, {{"tau", -1}, {"scan_slices", 1}, {"gate_error", 1e-4}});
  auto est_loose = Make("prhs", 0.125, {{"tau", -1}, {"scan_slices", 1}, {"gate_error", 9}});
  auto scan_only = Make("prhs", 0.125, {{"tau", -1}, {"scan_slices", 1}});
  Decode(est_tight.get(), 12);
  Decode(est_loose.get(), 12);
  Decode(scan_only.get(), 12);
  EXPECT_EQ(est_loose->telemetry().refreshes, units);
  EXPECT_GT(est_tight->telemetry().refreshes, units);
  // Same decisions as the scan alone, plus the scanned keys' values and the refreshes' values.
  EXPECT_EQ(est_loose->telemetry().scored_keys_sum - scan_only->telemetry().scored_keys_sum,
            scan_only->telemetry().scored_keys_sum);
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

// Helpers for the share-step tests below: a random query (all heads) and the exact group-mean
// probabilities of `q` at length t for kv head kh.
std::vector<float> RandomQuery(const ModelConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> q(c.num_attention_heads * c.head_dim);
  for (float& x : q) x = u(rng);
  return q;
}

TEST_F(SelectorEngineTest, FullScanKeepsTheExactTopOfTheSharedSet) {
  // Refresh at length 260 with q1, share (τ = −1) at 261 with an unrelated q2. scan_slices = 1
  // scores every out-of-set candidate, so its δ estimate is exact and the swap leaves the set
  // holding exactly the top-|set| candidates of [sink, t − local) under q2 — what a refresh with
  // the same set size would pick. Without the scan the set stays q1's.
  const ModelConfig& c = engine_->config();
  const int group = c.num_attention_heads / c.num_key_value_heads;
  const std::vector<float> q1 = RandomQuery(c, 21), q2 = RandomQuery(c, 22);
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  // scan 2: the same full scan with a reserve of runner-ups (scored first, not twice).
  for (int scan : {0, 1, 2}) {
    auto sel = Make("prhs", 0.25, {{"tau", -1}, {"scan_slices", scan > 0 ? 1 : 0},
                                   {"scan_reserve", scan == 2 ? 0.5 : 0.0}});
    std::vector<std::vector<int32_t>> first, second;
    sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &first);
    const KvView view(&engine_->kv_cache(), *pages, 0, 261);
    sel->Select(0, q2.data(), view, &second);
    ASSERT_EQ(sel->telemetry().shares, c.num_key_value_heads);
    for (int kh = 0; kh < c.num_key_value_heads; ++kh) {
      const int64_t set_size = static_cast<int64_t>(first[kh].size()) - 8 - 32;
      ASSERT_GT(set_size, 10);
      std::vector<float> p;
      GroupProbabilities(q2.data(), view, kh, group, c.head_dim, &p);
      const std::vector<int32_t> want = MergeIndexSet(8, TopKIndices(p, 8, 261 - 32, set_size), 32, 261);
      if (scan) {
        EXPECT_EQ(second[kh], want) << "kv head " << kh;
      } else {
        std::vector<int32_t> set;  // the refresh's set: first[kh] without sink and window
        for (int32_t j : first[kh]) {
          if (j >= 8 && j < 260 - 32) set.push_back(j);
        }
        EXPECT_EQ(second[kh], MergeIndexSet(8, set, 32, 261));
        EXPECT_NE(second[kh], want);
        EXPECT_GT(DroppedMass(p, second[kh]), DroppedMass(p, want) + 1e-3);
      }
    }
    // Scored keys: 260 per refresh; the full scan scores the 221 − set_size out-of-set candidates.
    const SelectionTelemetry& t = sel->telemetry();
    EXPECT_EQ(t.context_keys_sum, int64_t{(260 + 261)} * c.num_key_value_heads);
    int64_t want_scored = int64_t{260} * c.num_key_value_heads;
    if (scan) {
      for (int kh = 0; kh < c.num_key_value_heads; ++kh) want_scored += 221 - (first[kh].size() - 40);
    }
    EXPECT_EQ(t.scored_keys_sum, want_scored);
  }
}

TEST_F(SelectorEngineTest, ScanSliceRotatesOverTheCandidates) {
  // scan_slices = 4 with the same query every step: step s scores the candidates j ≡ s − 1
  // (mod 4) that are out of the set, so the scored count per step is about a quarter of the
  // out-of-set candidates, and after 4 shares every candidate has been seen once: the set then
  // holds the exact top-|set| at the last step's length, as with a full scan.
  const ModelConfig& c = engine_->config();
  const int group = c.num_attention_heads / c.num_key_value_heads;
  const std::vector<float> q1 = RandomQuery(c, 31), q2 = RandomQuery(c, 32);
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  auto sel = Make("prhs", 0.25, {{"tau", -1}, {"scan_slices", 4}});
  std::vector<std::vector<int32_t>> first, lists;
  sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 250), &first);
  const int64_t scored0 = sel->telemetry().scored_keys_sum;
  int64_t scored = scored0, out_of_set_sum = 0;
  for (int len = 251; len <= 254; ++len) {
    sel->Select(0, q2.data(), KvView(&engine_->kv_cache(), *pages, 0, len), &lists);
    const int64_t step = sel->telemetry().scored_keys_sum - scored;
    scored = sel->telemetry().scored_keys_sum;
    // Out-of-set candidates of [8, len − 32) summed over the kv heads; one residue class of
    // them is scored (the set is clustered, so a class holds between 1/8 and 1/2 of them).
    int64_t out_of_set = 0;
    for (int kh = 0; kh < c.num_key_value_heads; ++kh) {
      out_of_set += (len - 40) - (static_cast<int64_t>(first[kh].size()) - 40);
    }
    out_of_set_sum += out_of_set;
    EXPECT_GE(step, out_of_set / 8) << len;
    EXPECT_LE(step, out_of_set / 2) << len;
  }
  // Over a full rotation every class was scored once: about all out-of-set candidates.
  EXPECT_NEAR(static_cast<double>(scored - scored0), out_of_set_sum / 4.0, out_of_set_sum / 40.0);
  // The set never changes size; after a full rotation it is close to the exact top: its
  // dropped mass is within 2 % of a refresh's of the same size.
  const KvView view(&engine_->kv_cache(), *pages, 0, 254);
  for (int kh = 0; kh < c.num_key_value_heads; ++kh) {
    std::vector<float> p;
    GroupProbabilities(q2.data(), view, kh, group, c.head_dim, &p);
    const int64_t set_size = static_cast<int64_t>(first[kh].size()) - 40;
    const std::vector<int32_t> want = MergeIndexSet(8, TopKIndices(p, 8, 254 - 32, set_size), 32, 254);
    EXPECT_EQ(lists[kh].size(), want.size());
    EXPECT_LE(DroppedMass(p, lists[kh]), DroppedMass(p, want) + 0.02) << kh;
    EXPECT_LT(DroppedMass(p, lists[kh]), DroppedMass(p, first[kh]));
  }
}

TEST_F(SelectorEngineTest, ReserveIsScoredOnEveryScan) {
  // A slice of 1/1000 holds at most one candidate, so a share step scores the reserve:
  // ceil(0.5 · |set|) runner-ups of the refresh (all out of the set and out of the window).
  const ModelConfig& c = engine_->config();
  const std::vector<float> q1 = RandomQuery(c, 61);
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  for (double reserve : {0.0, 0.5}) {
    auto sel = Make("prhs", 0.25, {{"tau", -1}, {"scan_slices", 1000}, {"scan_reserve", reserve}});
    std::vector<std::vector<int32_t>> first, lists;
    sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &first);
    const int64_t before = sel->telemetry().scored_keys_sum;
    sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 261), &lists);
    const int64_t scored = sel->telemetry().scored_keys_sum - before;
    int64_t want = 0;
    for (int kh = 0; kh < c.num_key_value_heads; ++kh) {
      want += static_cast<int64_t>(std::ceil(reserve * (first[kh].size() - 40)));
    }
    EXPECT_GE(scored, want) << reserve;
    EXPECT_LE(scored, want + c.num_key_value_heads) << reserve;  // + at most 1 slice key each
  }
}

TEST_F(SelectorEngineTest, DeltaGatesRefreshWhenTheSharedSetLosesMass) {
  // Same query at the next length: the shared set loses no mass (the new token is in the local
  // window), so both δ gates share. An unrelated query: the anchor's set drops far more than at
  // its refresh, so both refresh. With scan_slices = 1 the estimate equals the exact δ, so the
  // estimated and the exact gate decide alike.
  const ModelConfig& c = engine_->config();
  const std::vector<float> q1 = RandomQuery(c, 41), q2 = RandomQuery(c, 42);
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  const int kvh = c.num_key_value_heads;
  for (const auto& gate : std::vector<std::map<std::string, double>>{
           {{"tau", -1}, {"scan_slices", 1}, {"gate_delta", 0.01}},
           {{"tau", -1}, {"gate_exact_delta", 0.01}}}) {
    auto sel = Make("prhs", 0.25, gate);
    std::vector<std::vector<int32_t>> lists;
    sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &lists);
    sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 261), &lists);
    EXPECT_EQ(sel->telemetry().refreshes, kvh);
    EXPECT_EQ(sel->telemetry().shares, kvh);
    sel->Select(0, q2.data(), KvView(&engine_->kv_cache(), *pages, 0, 262), &lists);
    EXPECT_EQ(sel->telemetry().refreshes, 2 * kvh);
    EXPECT_EQ(sel->telemetry().shares, kvh);
  }
  // A margin of 0.99 never refreshes (scan only).
  auto loose = Make("prhs", 0.25, {{"tau", -1}, {"scan_slices", 1}, {"gate_delta", 0.99}});
  std::vector<std::vector<int32_t>> lists;
  loose->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &lists);
  loose->Select(0, q2.data(), KvView(&engine_->kv_cache(), *pages, 0, 262), &lists);
  EXPECT_EQ(loose->telemetry().refreshes, kvh);
}

TEST_F(SelectorEngineTest, LseGateRefreshesWhenTheSharedListLosesLogSumExp) {
  // gate_lse compares the shared list's log-sum-exp (mean over the group's heads) with the
  // refreshed list's at its refresh. Computed independently here: the same query one token later
  // stays within 0.2 nats (share); the negated query puts the selected keys at the bottom and
  // loses more (refresh).
  const ModelConfig& c = engine_->config();
  const int group = c.num_attention_heads / c.num_key_value_heads, hd = c.head_dim;
  const std::vector<float> q1 = RandomQuery(c, 51), noise = RandomQuery(c, 52);
  std::vector<float> neg = q1;  // −q1, nudged so that cos(neg, q1) > −1 = τ
  for (size_t i = 0; i < neg.size(); ++i) neg[i] = -q1[i] + 0.05f * noise[i];
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  auto lse = [&](const std::vector<float>& q, const std::vector<int32_t>& list, int kh, int t) {
    const KvView view(&engine_->kv_cache(), *pages, 0, t);
    double sum = 0;
    for (int g = 0; g < group; ++g) {
      double z = 0;
      for (int32_t j : list) {
        double dot = 0;
        for (int d = 0; d < hd; ++d) dot += q[(kh * group + g) * hd + d] * view.key(kh, j)[d];
        z += std::exp(dot / std::sqrt(static_cast<double>(hd)));
      }
      sum += std::log(z);
    }
    return sum / group;
  };
  auto sel = Make("prhs", 0.25, {{"tau", -1}, {"gate_lse", 0.2}});
  std::vector<std::vector<int32_t>> first, lists;
  sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &first);
  const int kvh = c.num_key_value_heads;
  for (int kh = 0; kh < kvh; ++kh) {
    std::vector<int32_t> set;
    for (int32_t j : first[kh]) {
      if (j >= 8 && j < 228) set.push_back(j);
    }
    const double anchor = lse(q1, first[kh], kh, 260);
    ASSERT_LT(anchor - lse(q1, MergeIndexSet(8, set, 32, 261), kh, 261), 0.2) << kh;
    ASSERT_GT(anchor - lse(neg, MergeIndexSet(8, set, 32, 262), kh, 262), 0.2) << kh;
  }
  sel->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 261), &lists);
  EXPECT_EQ(sel->telemetry().refreshes, kvh);
  EXPECT_EQ(sel->telemetry().shares, kvh);
  sel->Select(0, neg.data(), KvView(&engine_->kv_cache(), *pages, 0, 262), &lists);
  EXPECT_EQ(sel->telemetry().refreshes, 2 * kvh);
  // Without the gate (τ = −1) the nudged negated query shares.
  auto plain = Make("prhs", 0.25, {{"tau", -1}});
  plain->Select(0, q1.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &lists);
  plain->Select(0, neg.data(), KvView(&engine_->kv_cache(), *pages, 0, 262), &lists);
  EXPECT_EQ(plain->telemetry().refreshes, kvh);
}

TEST_F(SelectorEngineTest, ScanFollowAddsTheNextPositionOfTheStrongestKeptKey) {
  // scan_follow = 1 with a slice of 1/1000 (at most one scanned key): on the share step the
  // kept candidate j with the highest group-mean logit (computed here independently) brings
  // j + 1 into the set unscored, in place of the weakest member, so the list keeps its size.
  const ModelConfig& c = engine_->config();
  const int group = c.num_attention_heads / c.num_key_value_heads, hd = c.head_dim;
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  int checked = 0;
  for (uint32_t seed = 81; seed < 91; ++seed) {
    const std::vector<float> q = RandomQuery(c, seed);
    // No dilation, so that j + 1 is usually not in the set already.
    auto sel = Make("prhs", 0.25,
                    {{"tau", -1}, {"scan_slices", 1000}, {"scan_follow", 1}, {"dilate_r", 0}});
    std::vector<std::vector<int32_t>> first, second;
    sel->Select(0, q.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &first);
    const KvView view(&engine_->kv_cache(), *pages, 0, 261);
    sel->Select(0, q.data(), view, &second);
    for (int kh = 0; kh < c.num_key_value_heads; ++kh) {
      int32_t best = -1;
      double best_logit = -1e30;
      for (int32_t j : first[kh]) {
        if (j < 8 || j >= 261 - 32) continue;  // set members only
        double sum = 0;
        for (int g = 0; g < group; ++g) {
          for (int d = 0; d < hd; ++d) sum += q[(kh * group + g) * hd + d] * view.key(kh, j)[d];
        }
        if (sum > best_logit) best_logit = sum, best = j;
      }
      ASSERT_GE(best, 0);
      const bool next_new = best + 1 < 261 - 32 &&
                            !std::binary_search(first[kh].begin(), first[kh].end(), best + 1);
      if (!next_new) continue;
      ++checked;
      EXPECT_TRUE(std::binary_search(second[kh].begin(), second[kh].end(), best + 1)) << seed;
      // Same size as the plain share list at 261 (window moved by one: 228 left it).
      const size_t plain = first[kh].size();  // 228 left the window, 260 joined it
      EXPECT_LE(second[kh].size(), plain + 1) << seed;  // + at most the one slice key
      EXPECT_GE(second[kh].size(), plain) << seed;
    }
  }
  EXPECT_GT(checked, 10);
}

TEST_F(SelectorEngineTest, KeepTrailKeepsWhatLeftTheWindowSinceTheRefresh) {
  // Refresh at length 260 (window [228, 260)), share at 265: plain sharing drops 228..232 (they
  // left the window and the refresh's top-k never saw them); keep_trail keeps exactly them.
  const ModelConfig& c = engine_->config();
  const std::vector<float> q = RandomQuery(c, 71);
  auto pages = engine_->PageTable(seq_);
  ASSERT_TRUE(pages.ok());
  std::vector<std::vector<int32_t>> plain, trail;
  for (int keep : {0, 1}) {
    auto sel = Make("prhs", 0.25, {{"tau", -1}, {"keep_trail", keep}});
    std::vector<std::vector<int32_t>> lists;
    sel->Select(0, q.data(), KvView(&engine_->kv_cache(), *pages, 0, 260), &lists);
    sel->Select(0, q.data(), KvView(&engine_->kv_cache(), *pages, 0, 265), &lists);
    EXPECT_EQ(sel->telemetry().shares, c.num_key_value_heads);
    (keep ? trail : plain) = lists;
  }
  for (int kh = 0; kh < c.num_key_value_heads; ++kh) {
    std::vector<int32_t> want = plain[kh];
    for (int32_t j = 228; j < 233; ++j) want.push_back(j);
    std::sort(want.begin(), want.end());
    want.erase(std::unique(want.begin(), want.end()), want.end());
    EXPECT_EQ(trail[kh], want) << kh;
    EXPECT_GT(trail[kh].size(), plain[kh].size()) << kh;
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
