// The C++ engine against references computed on the GPU machine for the models we ship
// (tests/fixtures/models, made by tools/train/fixtures.py):
//   prehoc-code-ar: transformers' own float32 logits (prefill + 8 cached greedy decode steps);
//   prehoc-code-dlm: our PyTorch reference's bidirectional float32 logits (prompts with MASKs),
//                    itself checked against transformers (max |diff| 1.2e-5).
// Bound: |ours − ref| ≤ 2e-4 absolute on every logit (6 layers, d = 384, |logits| up to ~30;
// float32 summation order differs), and identical argmax where the fixture records it.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/engine.h"
#include "worker/generator.h"
#include "worker/sampler.h"

namespace prehoc {
namespace {

namespace fs = std::filesystem;
constexpr float kTol = 2e-4f;

struct Ref {
  nlohmann::json j;
  std::unique_ptr<SafetensorsFile> t;
  std::vector<float> Get(const std::string& name) const {
    const TensorView* v = t->Find(name);
    EXPECT_NE(v, nullptr) << name;
    if (v == nullptr) return {};
    std::vector<float> out(v->num_elements());
    ConvertToFloat32(v->dtype, v->data, out.size(), out.data());
    return out;
  }
};

Ref LoadRef(const std::string& model) {
  fs::path dir = fs::path(PREHOC_SOURCE_DIR) / "tests" / "fixtures" / "models" / model;
  Ref r;
  std::ifstream in(dir / "expected.json");
  std::stringstream ss;
  ss << in.rdbuf();
  r.j = nlohmann::json::parse(ss.str());
  auto f = SafetensorsFile::Open((dir / "expected.safetensors").string());
  EXPECT_TRUE(f.ok()) << f.status();
  r.t = std::move(*f);
  return r;
}

std::unique_ptr<Engine> Load(const std::string& model) {
  EngineOptions o;
  o.model_dir = (fs::path(PREHOC_SOURCE_DIR) / "models" / model).string();
  o.num_threads = 2;
  o.kv_cache_bytes = 64 << 20;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

float MaxDiff(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    EXPECT_TRUE(std::isfinite(a[i]));
    m = std::max(m, std::abs(a[i] - b[i]));
  }
  return m;
}

TEST(ShippedArModelTest, MatchesTransformersPrefillDecodeAndGreedy) {
  Ref ref = LoadRef("prehoc-code-ar");
  auto e = Load("prehoc-code-ar");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->config().num_hidden_layers, 6);
  EXPECT_EQ(e->config().rope_theta, 500000.0);  // read from v5 rope_parameters
  ASSERT_NE(e->tokenizer(), nullptr);
  for (const auto& p : ref.j["prompts"]) {
    std::vector<int32_t> ids = p["input_ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> greedy = p["greedy_tokens"].get<std::vector<int32_t>>();
    auto full = e->ForwardFull(ids, true);
    ASSERT_TRUE(full.ok()) << full.status();
    EXPECT_LE(MaxDiff(*full, ref.Get(p["prefill"])), kTol);
    const Engine::SeqId s = e->CreateSequence();
    Engine::StepItem item{s, ids, false};
    auto logits = e->Step(std::span<const Engine::StepItem>(&item, 1));
    ASSERT_TRUE(logits.ok());
    EXPECT_EQ(ArgMax((*logits)[0]), greedy[0]);
    std::vector<float> dec = ref.Get(p["decode"]);
    for (size_t i = 0; i < greedy.size(); ++i) {
      Engine::StepItem d{s, std::span<const int32_t>(&greedy[i], 1), false};
      auto out = e->Step(std::span<const Engine::StepItem>(&d, 1));
      ASSERT_TRUE(out.ok());
      EXPECT_LE(MaxDiff((*out)[0], std::span<const float>(dec).subspan(i * 260, 260)), kTol) << i;
      if (i + 1 < greedy.size()) EXPECT_EQ(ArgMax((*out)[0]), greedy[i + 1]) << i;
    }
    ASSERT_TRUE(e->FreeSequence(s).ok());
    // The generator produces the same greedy continuation.
    GenerateRequest r{ids, static_cast<int>(greedy.size())};
    r.stop_at_eos = false;
    auto g = GenerateBatch(*e, {r});
    ASSERT_TRUE(g.ok());
    EXPECT_EQ((*g)[0].tokens, greedy);
  }
}

TEST(ShippedDlmModelTest, BidirectionalForwardMatchesReference) {
  Ref ref = LoadRef("prehoc-code-dlm");
  auto e = Load("prehoc-code-dlm");
  ASSERT_NE(e, nullptr);
  EXPECT_FALSE(e->config().is_causal);
  EXPECT_EQ(e->config().mask_token_id, 259);
  for (const auto& p : ref.j["prompts"]) {
    std::vector<int32_t> ids = p["input_ids"].get<std::vector<int32_t>>();
    auto full = e->ForwardFull(ids, /*causal=*/false);
    ASSERT_TRUE(full.ok()) << full.status();
    EXPECT_LE(MaxDiff(*full, ref.Get(p["full"])), kTol);
    std::vector<int> masks = p["mask_positions"].get<std::vector<int>>();
    std::vector<int> want = p["argmax_at_masks"].get<std::vector<int>>();
    for (size_t i = 0; i < masks.size(); ++i) {
      EXPECT_EQ(ArgMax(std::span<const float>(*full).subspan(masks[i] * 260, 260)), want[i]);
    }
  }
}

}  // namespace
}  // namespace prehoc
