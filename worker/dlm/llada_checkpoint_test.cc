#include "worker/dlm/llada_checkpoint.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "worker/dlm/decoder.h"

namespace prehoc::dlm {
namespace {

// GSAI-ML/LLaDA-8B-Instruct's config.json (the keys that matter).
constexpr char kLlada8B[] = R"({
  "activation_type": "silu", "alibi": false, "alibi_bias_max": 8.0,
  "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": false,
  "attention_layer_norm_with_affine": true, "bias_for_layer_norm": false, "block_group_size": 1,
  "block_type": "llama", "d_model": 4096, "embedding_dropout": 0.0, "embedding_size": 126464,
  "eos_token_id": 126081, "flash_attention": false, "include_bias": false,
  "include_qkv_bias": false, "init_cutoff_factor": null, "init_device": "meta",
  "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": false, "layer_norm_type": "rms",
  "layer_norm_with_affine": true, "mask_token_id": 126336, "max_sequence_length": 4096,
  "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": null,
  "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081,
  "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": true,
  "rope_full_precision": true, "rope_theta": 500000.0, "scale_logits": false,
  "transformers_version": "4.46.3", "use_cache": false, "vocab_size": 126464,
  "weight_tying": false})";

TEST(LladaConfigTest, ParsesLlada8B) {
  EXPECT_TRUE(IsLladaConfigJson(kLlada8B));
  auto c = ParseLladaConfig(kLlada8B);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "llada");
  EXPECT_EQ(c->architecture, "LLaDAModelLM");
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->intermediate_size, 12288);
  EXPECT_EQ(c->vocab_size, 126464);
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_EQ(c->rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_EQ(c->mask_token_id, 126336);
  ASSERT_EQ(c->eos_token_ids.size(), 1u);
  EXPECT_EQ(c->eos_token_ids[0], 126081);
  EXPECT_FALSE(c->is_causal);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->qkv_bias);
}

TEST(LladaConfigTest, DefaultsAndRefusals) {
  nlohmann::json base = nlohmann::json::parse(kLlada8B);
  auto parse = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = base;
    edit(j);
    return ParseLladaConfig(j.dump());
  };
  // Defaults: mlp_hidden_size null → mlp_ratio · d_model; n_kv_heads null → n_heads; MQA → 1.
  auto d = parse([](nlohmann::json& j) {
    j["mlp_hidden_size"] = nullptr;
    j["n_kv_heads"] = nullptr;
    j.erase("mask_token_id");
  });
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->intermediate_size, 4 * 4096);
  EXPECT_EQ(d->num_key_value_heads, 32);
  EXPECT_EQ(d->mask_token_id, 126336);  // LLaDA's generate() default
  auto mqa = parse([](nlohmann::json& j) { j["multi_query_attention"] = true; });
  ASSERT_TRUE(mqa.ok());
  EXPECT_EQ(mqa->num_key_value_heads, 1);
  auto expect_bad = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& key) {
    auto r = parse(edit);
    ASSERT_FALSE(r.ok()) << key;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("'" + key + "'"), std::string::npos) << r.status();
  };
  expect_bad([](nlohmann::json& j) { j["block_type"] = "sequential"; }, "block_type");
  expect_bad([](nlohmann::json& j) { j["layer_norm_type"] = "default"; }, "layer_norm_type");
  expect_bad([](nlohmann::json& j) { j["activation_type"] = "gelu"; }, "activation_type");
  expect_bad([](nlohmann::json& j) { j["include_bias"] = true; }, "include_bias");
  expect_bad([](nlohmann::json& j) { j["alibi"] = true; }, "alibi");
  expect_bad([](nlohmann::json& j) { j["attention_layer_norm"] = true; }, "attention_layer_norm");
  expect_bad([](nlohmann::json& j) { j["rope"] = false; }, "rope");
  expect_bad([](nlohmann::json& j) { j.erase("d_model"); }, "d_model");
  expect_bad([](nlohmann::json& j) { j["n_heads"] = 31; }, "d_model");  // 4096 % 31
  expect_bad([](nlohmann::json& j) { j["n_kv_heads"] = 5; }, "n_kv_heads");
  expect_bad([](nlohmann::json& j) { j["mask_token_id"] = 200000; }, "mask_token_id");
  expect_bad([](nlohmann::json& j) { j["embedding_size"] = 100; }, "embedding_size");
  EXPECT_FALSE(IsLladaConfigJson(R"({"model_type": "llama"})"));
  EXPECT_FALSE(IsLladaConfigJson("not json"));
}

std::string FixtureDir() {
  return (std::filesystem::path(PREHOC_SOURCE_DIR) / "tests" / "fixtures" / "llada" / "tiny").string();
}

// The tiny LLaDA-layout checkpoint of tools/fixtures/make_llada_fixture.py (bf16, 2 shards):
// its logits come from an independent float64 pure-Python forward of the same weights.
TEST(LladaCheckpointTest, MatchesTheReferenceForwardAndDecode) {
  std::ifstream in(std::filesystem::path(FixtureDir()) / "expected.json");
  ASSERT_TRUE(in) << FixtureDir();
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json ref = nlohmann::json::parse(ss.str());
  auto llada = IsLladaCheckpoint(FixtureDir());
  ASSERT_TRUE(llada.ok() && *llada);
  DlmModelOptions o;
  o.model_dir = FixtureDir();
  o.num_threads = 1;
  auto m = DlmModel::Create(o);
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = (*m)->config();
  EXPECT_EQ(c.model_type, "llada");
  EXPECT_EQ((*m)->mask_id(), 53);
  EXPECT_EQ(std::vector<int>((*m)->eos_ids().begin(), (*m)->eos_ids().end()),
            std::vector<int>{51});
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.vocab_size, 56);  // embedding_size, not vocab_size
  EXPECT_EQ((*m)->tokenizer(), nullptr);

  const std::vector<int32_t> ids = ref["input_ids"].get<std::vector<int32_t>>();
  const int n = static_cast<int>(ids.size()), V = c.vocab_size;
  DlmState st(c, n, (*m)->proxy_rank());
  std::vector<int32_t> all(n);
  std::iota(all.begin(), all.end(), 0);
  ForwardSpec spec;
  spec.live = all;
  spec.logit_rows = all;
  std::vector<float> logits;
  ASSERT_TRUE((*m)->Forward(&st, ids, spec, &logits, nullptr).ok());
  float max_diff = 0;
  for (int t = 0; t < n; ++t) {
    int arg = 0;
    for (int v = 0; v < V; ++v) {
      const double want = ref["logits"][t][v].get<double>();
      max_diff = std::max(max_diff, static_cast<float>(std::abs(logits[t * V + v] - want)));
      if (logits[t * V + v] > logits[t * V + arg]) arg = v;
    }
    EXPECT_EQ(arg, ref["argmax"][t].get<int>()) << t;
  }
  EXPECT_LT(max_diff, 1e-4f);

  const nlohmann::json& dec = ref["decode"];
  DiffuseRequest r;
  r.prompt = dec["prompt"].get<std::vector<int32_t>>();
  r.options.gen_length = dec["gen_length"].get<int>();
  r.options.block_length = dec["block_length"].get<int>();
  r.options.steps = dec["steps"].get<int>();
  auto res = Diffuse(**m, r);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->response, dec["tokens"].get<std::vector<int32_t>>());
}

TEST(LladaCheckpointTest, MissingTensorIsNamed) {
  // Copy the fixture without its second shard's index entry target: the loader names the shard.
  const std::filesystem::path tmp =
      std::filesystem::temp_directory_path() / ("llada_missing_" + std::to_string(::getpid()));
  std::filesystem::create_directories(tmp);
  for (const char* f : {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"}) {
    std::filesystem::copy_file(std::filesystem::path(FixtureDir()) / f, tmp / f,
                               std::filesystem::copy_options::overwrite_existing);
  }
  auto w = LoadLladaWeights(tmp.string());
  EXPECT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("model-00002-of-00002"), std::string::npos) << w.status();
  std::filesystem::remove_all(tmp);
}

// A copy of the tiny fixture in a fresh temp directory, with `generation_config` written as its
// generation_config.json (none when empty).
class LladaGenerationConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("llada_generation_config_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
    for (const char* f : {"config.json", "model.safetensors.index.json",
                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
      std::filesystem::copy_file(std::filesystem::path(FixtureDir()) / f, dir_ / f,
                                 std::filesystem::copy_options::overwrite_existing);
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void WriteGenerationConfig(const std::string& text) {
    std::ofstream out(dir_ / "generation_config.json", std::ios::binary);
    out << text;
    ASSERT_TRUE(out.good());
  }
  // The loaded end-of-text ids, or the load's error.
  absl::StatusOr<std::vector<int>> EosIds() {
    auto w = LoadLladaWeights(dir_.string());
    if (!w.ok()) return w.status();
    return (*w)->config.eos_token_ids;
  }
  std::filesystem::path dir_;
};

TEST_F(LladaGenerationConfigTest, MergesEndOfTextIds) {
  auto ids = EosIds();  // no generation_config.json: config.json's eos_token_id
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, std::vector<int>{51});
  WriteGenerationConfig(R"({"bos_token_id": 50, "eos_token_id": 52, "pad_token_id": 51})");
  ids = EosIds();
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int>{51, 52}));
  WriteGenerationConfig(R"({"eos_token_id": [52, 51, 52, 54]})");  // duplicates dropped
  ids = EosIds();
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, (std::vector<int>{51, 52, 54}));
  // The model reports them all (what the decoder stops on).
  DlmModelOptions o;
  o.model_dir = dir_.string();
  o.num_threads = 1;
  auto m = DlmModel::Create(o);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(std::vector<int>((*m)->eos_ids().begin(), (*m)->eos_ids().end()),
            (std::vector<int>{51, 52, 54}));
}

TEST_F(LladaGenerationConfigTest, BadFileFailsTheLoadNamingIt) {
  WriteGenerationConfig(R"({"eos_token_id": [52, 56]})");  // embedding_size 56
  auto ids = EosIds();
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ids.status().message().find((dir_ / "generation_config.json").string()),
            std::string::npos)
      << ids.status();
  EXPECT_NE(ids.status().message().find("'eos_token_id' = 56 is outside"), std::string::npos)
      << ids.status();
  WriteGenerationConfig("{\"eos_token_id\": [52,");
  ids = EosIds();
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ids.status().message().find("generation_config.json is not valid JSON"),
            std::string::npos)
      << ids.status();
}

}  // namespace
}  // namespace prehoc::dlm
