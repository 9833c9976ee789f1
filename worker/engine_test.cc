#include "worker/engine.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/generator.h"
#include "worker/sampler.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

std::string FixtureDir(const std::string& name) {
  return (fs::path(PREHOC_SOURCE_DIR) / "tests" / "fixtures" / "hf" / name).string();
}

std::unique_ptr<Engine> Make(int64_t kv_bytes = 16 << 20, int max_context = 0) {
  EngineOptions o;
  o.model_dir = FixtureDir("llama_gqa_f32");
  o.num_threads = 2;
  o.kv_cache_bytes = kv_bytes;
  o.max_context = max_context;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return std::move(*e);
}

float MaxDiff(std::span<const float> a, std::span<const float> b) {
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

TEST(EngineTest, ChunkedPrefillEqualsOneShot) {
  auto e = Make();
  std::vector<int32_t> ids = {256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140,
                              150, 160, 170, 180};  // 19 tokens: crosses a page boundary
  auto full = e->ForwardFull(ids, true);
  ASSERT_TRUE(full.ok());
  const Engine::SeqId s = e->CreateSequence();
  std::span<const int32_t> all(ids);
  std::vector<float> last;
  for (auto [b, n] : {std::pair{0, 5}, {5, 12}, {17, 2}}) {
    Engine::StepItem it{s, all.subspan(b, n), true};
    auto out = e->Step(std::span<const Engine::StepItem>(&it, 1));
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ((*out)[0].size(), static_cast<size_t>(n) * 260);
    EXPECT_LT(MaxDiff((*out)[0], std::span<const float>(*full).subspan(b * 260, n * 260)), 1e-4f);
  }
  EXPECT_EQ(*e->SequenceLength(s), 19);
  EXPECT_EQ(e->PageTable(s)->size(), 2u);
  EXPECT_EQ(e->pages().num_used(), 2);
  ASSERT_TRUE(e->FreeSequence(s).ok());
  EXPECT_EQ(e->pages().num_used(), 0);
  EXPECT_EQ(e->FreeSequence(s).code(), absl::StatusCode::kNotFound);
}

TEST(EngineTest, BidirectionalModeSeesLaterTokensCausalDoesNot) {
  auto e = Make();
  std::vector<int32_t> a = {256, 1, 2, 3, 4}, b = {256, 1, 2, 3, 99};
  auto ca = e->ForwardFull(a, true), cb = e->ForwardFull(b, true);
  auto ba = e->ForwardFull(a, false), bb = e->ForwardFull(b, false);
  ASSERT_TRUE(ca.ok() && cb.ok() && ba.ok() && bb.ok());
  auto row0 = [](const std::vector<float>& v) { return std::span<const float>(v).first(260); };
  EXPECT_EQ(MaxDiff(row0(*ca), row0(*cb)), 0.0f);  // causal: position 0 cannot see position 4
  EXPECT_GT(MaxDiff(row0(*ba), row0(*bb)), 1e-3f);  // bidirectional: it can
  // A single token has nothing to hide: both modes agree exactly.
  auto c1 = e->ForwardFull(std::vector<int32_t>{42}, true), b1 = e->ForwardFull(std::vector<int32_t>{42}, false);
  ASSERT_TRUE(c1.ok() && b1.ok());
  EXPECT_EQ(*c1, *b1);
  EXPECT_EQ(e->pages().num_used(), 0);
}

TEST(EngineTest, BadBatchesAreRejectedAndChangeNothing) {
  auto e = Make(16 << 20, /*max_context=*/32);
  const Engine::SeqId s = e->CreateSequence();
  std::vector<int32_t> ok = {1, 2, 3};
  std::vector<int32_t> bad = {1, 260, 3};
  std::vector<int32_t> empty;
  std::vector<int32_t> too_long(33, 5);
  auto expect_invalid = [&](std::vector<Engine::StepItem> items, const std::string& what) {
    auto r = e->Step(items);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_THAT(r.status().message(), HasSubstr(what));
    EXPECT_EQ(*e->SequenceLength(s), 0);
    EXPECT_EQ(e->pages().num_used(), 0);
  };
  expect_invalid({{s, bad, false}}, "token id 260 at position 1");
  expect_invalid({{s, empty, false}}, "no tokens");
  expect_invalid({{s, too_long, false}}, "exceeds max_context 32");
  expect_invalid({{s, ok, false}, {s, ok, false}}, "appears twice");
  expect_invalid({{s, ok, false}, {12345, ok, false}}, "unknown sequence 12345");
}

// ModelBackend::StepSample's default (the CPU path): Step, then SampleWithUniform on the last
// row of each wanted item; -1 for unwanted ones; bad draws are refused before anything runs.
TEST(EngineTest, StepSampleDrawsFromTheStepsLogits) {
  auto e = Make();
  auto ref = Make();
  const std::vector<int32_t> a = {256, 10, 20, 30, 40}, b = {256, 7, 8}, c = {256, 99};
  std::vector<Engine::SeqId> es, rs;
  for (int i = 0; i < 3; ++i) {
    es.push_back(e->CreateSequence());
    rs.push_back(ref->CreateSequence());
  }
  std::vector<TokenDraw> draws(3);
  draws[0].options = SamplingOptions{0.9f, 0, 0.8f, 0};
  draws[0].u = 0.37;
  draws[1].wanted = false;
  draws[2].options = SamplingOptions{};  // greedy
  const std::vector<Engine::StepItem> ei = {{es[0], a, true}, {es[1], b}, {es[2], c}};
  const std::vector<Engine::StepItem> ri = {{rs[0], a, true}, {rs[1], b}, {rs[2], c}};
  // Refused draws leave the sequences unchanged.
  std::vector<TokenDraw> bad = draws;
  bad[2].u = 1.5;
  bad[2].options.temperature = 1.0f;
  auto refused = e->StepSample(ei, bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("batch item 2"));
  EXPECT_EQ(e->StepSample(ei, std::span<const TokenDraw>(draws).first(2)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*e->SequenceLength(es[0]), 0);
  auto ids = e->StepSample(ei, draws);
  ASSERT_TRUE(ids.ok()) << ids.status();
  auto logits = ref->Step(ri);
  ASSERT_TRUE(logits.ok());
  const size_t V = 260;
  ASSERT_EQ(ids->size(), 3u);
  EXPECT_EQ((*ids)[0], SampleWithUniform(std::span<const float>((*logits)[0]).last(V),
                                         draws[0].options, draws[0].u));
  EXPECT_EQ((*ids)[1], -1);
  EXPECT_EQ((*ids)[2], ArgMax((*logits)[2]));
  EXPECT_EQ(*e->SequenceLength(es[0]), 5);
  EXPECT_FALSE(e->samples_on_device());
}

TEST(EngineTest, KvExhaustionIsResourceExhaustedAndAllOrNothing) {
  // Room for exactly 3 pages (48 tokens).
  const int64_t page = KvPageBytes(Make()->config(), 16);
  auto e = Make(3 * page);
  EXPECT_EQ(e->pages().num_pages(), 3);
  const Engine::SeqId a = e->CreateSequence(), b = e->CreateSequence();
  std::vector<int32_t> t40(40, 7), t20(20, 9);
  auto r1 = e->Step(std::vector<Engine::StepItem>{{a, t40, false}});
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(e->pages().num_used(), 3);
  auto r2 = e->Step(std::vector<Engine::StepItem>{{b, t20, false}});
  EXPECT_EQ(r2.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(*e->SequenceLength(b), 0);
  ASSERT_TRUE(e->FreeSequence(a).ok());
  EXPECT_TRUE(e->Step(std::vector<Engine::StepItem>{{b, t20, false}}).ok());
}

TEST(EngineTest, CreateRejectsBadOptionsAndModels) {
  EngineOptions o;
  EXPECT_THAT(Engine::Create(o).status().message(), HasSubstr("model_dir is empty"));
  o.model_dir = FixtureDir("llama_gqa_f32");
  o.page_size = 0;
  EXPECT_THAT(Engine::Create(o).status().message(), HasSubstr("page_size"));
  o.page_size = 16;
  o.kv_cache_bytes = 10;
  EXPECT_THAT(Engine::Create(o).status().message(), HasSubstr("kv_cache_bytes"));
  o.kv_cache_bytes = 1 << 20;
  o.model_dir = "/nonexistent/model";
  EXPECT_EQ(Engine::Create(o).status().code(), absl::StatusCode::kNotFound);
}

TEST(EngineTest, RandomWeightsRunWithTheSameShapes) {
  auto real = Make();
  EngineOptions o;
  o.weights = ModelWeights::Random(real->config(), 1);
  o.num_threads = 1;
  o.kv_cache_bytes = 4 << 20;
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->weights().num_parameters(), real->weights().num_parameters());
  auto logits = (*e)->ForwardFull(std::vector<int32_t>{1, 2, 3}, true);
  ASSERT_TRUE(logits.ok());
  for (float v : *logits) ASSERT_TRUE(std::isfinite(v));
  EXPECT_EQ((*e)->tokenizer(), nullptr);
}

TEST(GeneratorTest, ValidatesRequestsByIndexAndField) {
  auto e = Make(16 << 20, 64);
  auto run = [&](GenerateRequest r) { return GenerateBatch(*e, {GenerateRequest{{1}, 1}, r}).status(); };
  EXPECT_THAT(run(GenerateRequest{{}, 4}).message(), HasSubstr("request 1: prompt is empty"));
  EXPECT_THAT(run(GenerateRequest{{1, -3}, 4}).message(), HasSubstr("prompt token 1 = -3"));
  EXPECT_THAT(run(GenerateRequest{{1}, 0}).message(), HasSubstr("max_tokens must be >= 1"));
  EXPECT_THAT(run(GenerateRequest{{1, 2}, 63}).message(), HasSubstr("exceeds the maximum context of 64"));
  GenerateRequest r{{1}, 2};
  r.sampling.top_p = 2;
  EXPECT_THAT(run(r).message(), HasSubstr("top_p"));
  EXPECT_EQ(e->num_sequences(), 0);
}

TEST(GeneratorTest, RunsToMaxTokensAndReportsStats) {
  auto e = Make();
  GenerateRequest r{{256, 3, 1, 4, 1, 5}, 12};
  r.stop_at_eos = false;
  GenerateStats stats;
  int callbacks = 0;
  auto res = GenerateBatch(*e, {r}, [&](int i, int32_t) { EXPECT_EQ(i, 0); ++callbacks; }, &stats);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ((*res)[0].tokens.size(), 12u);
  EXPECT_EQ((*res)[0].finish_reason, "length");
  EXPECT_EQ(callbacks, 12);
  EXPECT_EQ(stats.generated_tokens, 12);
  EXPECT_EQ(stats.decode_steps, 11);
  EXPECT_EQ(stats.prompt_tokens, 6);
  EXPECT_EQ((*res)[0].sparsity.policy, "dense");
  EXPECT_EQ((*res)[0].sparsity.mean_kept_fraction, 1.0);
}

TEST(GeneratorTest, SeededSamplingIsReproducible) {
  auto e = Make();
  GenerateRequest r{{256, 9, 8, 7}, 10};
  r.stop_at_eos = false;
  r.sampling.temperature = 0.8f;
  r.sampling.top_p = 0.9f;
  r.sampling.seed = 1234;
  auto a = GenerateBatch(*e, {r}), b = GenerateBatch(*e, {r});
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_EQ((*a)[0].tokens, (*b)[0].tokens);
}

// generation_config.json's end-of-text ids are merged into config.json's (LoadModelConfig) and
// generation stops on any of them, the second included (Llama-3-Instruct's <|eot_id|>).
TEST(GeneratorTest, StopsOnASecondEndOfTextIdFromGenerationConfig) {
  auto e = Make();
  GenerateRequest r{{256, 3, 1, 4, 1, 5}, 12};
  r.stop_at_eos = false;
  auto free_run = GenerateBatch(*e, {r});
  ASSERT_TRUE(free_run.ok()) << free_run.status();
  const std::vector<int32_t> t = (*free_run)[0].tokens;
  // The first token from index 2 on that is new and comes before any 257 (config.json's id).
  int k = -1;
  for (int i = 2; i < static_cast<int>(t.size()) && t[i] != 257; ++i) {
    if (std::find(t.begin(), t.begin() + i, t[i]) == t.begin() + i) {
      k = i;
      break;
    }
  }
  ASSERT_GE(k, 0) << "greedy tokens give no usable stop id";

  const fs::path dir = fs::temp_directory_path() / ("engine_eos_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::copy(FixtureDir("llama_gqa_f32"), dir, fs::copy_options::recursive);
  {
    std::ofstream out(dir / "generation_config.json", std::ios::binary | std::ios::trunc);
    out << R"({"bos_token_id": 256, "eos_token_id": [257, )" << t[k] << "]}";
    ASSERT_TRUE(out.good());
  }
  EngineOptions o;
  o.model_dir = dir.string();
  o.num_threads = 2;
  o.kv_cache_bytes = 16 << 20;
  auto e2 = Engine::Create(o);
  ASSERT_TRUE(e2.ok()) << e2.status();
  EXPECT_EQ((*e2)->config().eos_token_ids, (std::vector<int>{257, t[k]}));
  r.stop_at_eos = true;
  auto stopped = GenerateBatch(**e2, {r});
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  EXPECT_EQ((*stopped)[0].finish_reason, "eos");
  EXPECT_EQ((*stopped)[0].tokens, std::vector<int32_t>(t.begin(), t.begin() + k + 1));
  // The fixture itself (both files declare 257 only) does not stop there.
  auto unchanged = GenerateBatch(*e, {r});
  ASSERT_TRUE(unchanged.ok()) << unchanged.status();
  auto end = std::find(t.begin(), t.end(), 257);
  if (end != t.end()) ++end;  // the end-of-text token is included
  EXPECT_EQ((*unchanged)[0].tokens, std::vector<int32_t>(t.begin(), end));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace prehoc

namespace prehoc {
namespace {

TEST(GeneratorSparsityTest, SparsePolicyRunsAndReports) {
  auto e = Make(16 << 20, 1024);
  GenerateRequest r{std::vector<int32_t>(200, 0), 8};
  for (int i = 0; i < 200; ++i) r.prompt[i] = (i * 37) % 256;
  r.stop_at_eos = false;
  r.sparsity = SparsityOptions{.policy = "prhs", .budget = 0.25, .overrides = "tau=1"};
  auto res = GenerateBatch(*e, {r});
  ASSERT_TRUE(res.ok()) << res.status();
  const GenerateResult& g = (*res)[0];
  EXPECT_EQ(g.sparsity.policy, "prhs");
  EXPECT_LT(g.sparsity.mean_kept_fraction, 0.5);
  const int units = e->config().num_hidden_layers * e->config().num_key_value_heads;
  EXPECT_EQ(g.sparsity.refreshes, 7 * units);  // τ = 1: every decode step refreshes
  EXPECT_EQ(g.telemetry.refresh_delta.size(), static_cast<size_t>(6 * units));
  EXPECT_GE(g.sparsity.max_delta, g.sparsity.mean_delta);
}

TEST(GeneratorSparsityTest, DeltaTargetEngagesTheController) {
  auto e = Make(16 << 20, 1024);
  GenerateRequest r{std::vector<int32_t>(300, 0), 12};
  for (int i = 0; i < 300; ++i) r.prompt[i] = (i * 91 + 7) % 256;
  r.stop_at_eos = false;
  // A tiny budget and a strict target: violations must raise the budget as decoding goes on.
  r.sparsity = SparsityOptions{.policy = "prhs", .target_delta = 0.001, .budget = 0.15,
                               .overrides = "tau=1"};
  auto res = GenerateBatch(*e, {r});
  ASSERT_TRUE(res.ok()) << res.status();
  const auto& t = (*res)[0].telemetry;
  ASSERT_GT(t.refresh_delta.size(), 4u);
  // Kept tokens per selection grow once the controller reacts.
  const int units = e->config().num_hidden_layers * e->config().num_key_value_heads;
  EXPECT_GT(t.kept_tokens_sum, 0);
  GenerateRequest fixed = r;
  fixed.sparsity.target_delta = 0;
  auto base = GenerateBatch(*e, {fixed});
  ASSERT_TRUE(base.ok());
  EXPECT_GT(t.kept_tokens_sum, (*base)[0].telemetry.kept_tokens_sum) << units;
}

TEST(GeneratorSparsityTest, BadSparsityOptionsAreInvalidArgument) {
  auto e = Make();
  GenerateRequest r{{1, 2, 3}, 2};
  r.sparsity.policy = "magic";
  auto s = GenerateBatch(*e, {r}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("request 0: sparsity.policy 'magic'"));
  r.sparsity = SparsityOptions{.policy = "prhs", .overrides = "tau=high"};
  EXPECT_THAT(GenerateBatch(*e, {r}).status().message(), HasSubstr("'high' is not a number"));
  EXPECT_EQ(e->num_sequences(), 0);
}

}  // namespace
}  // namespace prehoc
