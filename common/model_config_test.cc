#include "common/model_config.h"

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace prehoc {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using Json = nlohmann::json;

// Llama-3.2-1B's config.json as written by transformers v4.
constexpr char kLlama32V4[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 16,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// The same model as written by transformers v5 (rope_parameters, no top-level
// rope_theta / rope_scaling).
constexpr char kLlama32V5[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 128000,
  "dtype": "bfloat16",
  "eos_token_id": 128001,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 16,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": true,
  "transformers_version": "5.0.0",
  "vocab_size": 128256
})";

// Qwen2.5-0.5B-Instruct.
constexpr char kQwen25[] = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

// Mistral-7B-v0.3.
constexpr char kMistralV03[] = R"({
  "architectures": ["MistralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.0.dev0",
  "use_cache": true,
  "vocab_size": 32768
})";

// A minimal Llama config with every optional key absent.
constexpr char kMinimal[] = R"({
  "model_type": "llama",
  "vocab_size": 1000,
  "hidden_size": 256,
  "intermediate_size": 512,
  "num_hidden_layers": 2,
  "num_attention_heads": 4
})";

ModelConfig ParseOk(const std::string& text) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig();
}

// kMinimal with `patch` merged in (a null value deletes the key).
std::string Minimal(const Json& patch) {
  Json j = Json::parse(kMinimal);
  j.merge_patch(patch);
  return j.dump();
}

// Expects INVALID_ARGUMENT with every substring in the message.
void ExpectInvalid(const std::string& text,
                   const std::vector<std::string>& substrings) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(text);
  ASSERT_FALSE(c.ok()) << text;
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument)
      << c.status();
  for (const std::string& s : substrings) {
    EXPECT_THAT(c.status().message(), HasSubstr(s)) << text;
  }
}

TEST(ModelConfigTest, ParsesLlama32V4) {
  ModelConfig c = ParseOk(kLlama32V4);
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.intermediate_size, 8192);
  EXPECT_EQ(c.num_hidden_layers, 16);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 32.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.is_causal);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(128001));
  EXPECT_EQ(c.pad_token_id, -1);
  EXPECT_EQ(c.mask_token_id, -1);
}

TEST(ModelConfigTest, V5RopeParametersMatchV4) {
  ModelConfig v4 = ParseOk(kLlama32V4);
  ModelConfig v5 = ParseOk(kLlama32V5);
  EXPECT_DOUBLE_EQ(v5.rope_theta, 500000.0);
  EXPECT_EQ(v5.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(v5.rope_scaling.factor, v4.rope_scaling.factor);
  EXPECT_DOUBLE_EQ(v5.rope_scaling.low_freq_factor,
                   v4.rope_scaling.low_freq_factor);
  EXPECT_DOUBLE_EQ(v5.rope_scaling.high_freq_factor,
                   v4.rope_scaling.high_freq_factor);
  EXPECT_EQ(v5.rope_scaling.original_max_position_embeddings,
            v4.rope_scaling.original_max_position_embeddings);
  EXPECT_EQ(v5.head_dim, v4.head_dim);
  EXPECT_EQ(v5.num_key_value_heads, v4.num_key_value_heads);
}

TEST(ModelConfigTest, V5DefaultRopeParameters) {
  ModelConfig c = ParseOk(Minimal(
      {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 1e6}}}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
}

TEST(ModelConfigTest, RopeParametersWinOverV4Keys) {
  ModelConfig c = ParseOk(Minimal(
      {{"rope_theta", 10000.0},
       {"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}}},
       {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 5e5}}}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_DOUBLE_EQ(c.rope_theta, 5e5);
  // rope_parameters without rope_theta keeps the top-level value.
  ModelConfig d = ParseOk(Minimal(
      {{"rope_theta", 20000.0},
       {"rope_parameters", {{"rope_type", "linear"}, {"factor", 4.0}}}}));
  EXPECT_EQ(d.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_DOUBLE_EQ(d.rope_scaling.factor, 4.0);
  EXPECT_DOUBLE_EQ(d.rope_theta, 20000.0);
}

TEST(ModelConfigTest, Qwen2Defaults) {
  ModelConfig c = ParseOk(kQwen25);
  EXPECT_EQ(c.model_type, "qwen2");
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(c.head_dim, 64);  // 896 / 14
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  // sliding_window is present but use_sliding_window is false.
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(151645));
}

TEST(ModelConfigTest, Qwen2IgnoresAttentionBiasKey) {
  Json j = Json::parse(kQwen25);
  j["attention_bias"] = true;
  ModelConfig c = ParseOk(j.dump());
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
}

TEST(ModelConfigTest, Qwen2SlidingWindow) {
  Json j = Json::parse(kQwen25);
  j["use_sliding_window"] = true;
  j["max_window_layers"] = 0;  // every layer
  EXPECT_EQ(ParseOk(j.dump()).sliding_window, 32768);
  j["max_window_layers"] = 24;  // no layer
  EXPECT_EQ(ParseOk(j.dump()).sliding_window, 0);
  j["max_window_layers"] = 21;  // layers 21..23 only
  ExpectInvalid(j.dump(), {"max_window_layers", "21"});
}

TEST(ModelConfigTest, MistralSlidingWindowNull) {
  ModelConfig c = ParseOk(kMistralV03);
  EXPECT_EQ(c.model_type, "mistral");
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(2));

  // Mistral-7B-v0.1 declares a 4096-token window.
  Json j = Json::parse(kMistralV03);
  j["sliding_window"] = 4096;
  EXPECT_EQ(ParseOk(j.dump()).sliding_window, 4096);
}

TEST(ModelConfigTest, MinimalConfigDefaults) {
  ModelConfig c = ParseOk(kMinimal);
  EXPECT_EQ(c.architecture, "");
  EXPECT_EQ(c.num_key_value_heads, 4);  // = num_attention_heads
  EXPECT_EQ(c.head_dim, 64);            // 256 / 4
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_TRUE(c.is_causal);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_THAT(c.eos_token_ids, IsEmpty());
  EXPECT_EQ(c.pad_token_id, -1);
  EXPECT_EQ(c.mask_token_id, -1);
}

TEST(ModelConfigTest, GqaAndNullDefaults) {
  ModelConfig c = ParseOk(Minimal({{"num_attention_heads", 8},
                                   {"num_key_value_heads", 2},
                                   {"hidden_size", 512}}));
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  // Explicit nulls behave like absent keys.
  Json j = Json::parse(kMinimal);
  j["num_key_value_heads"] = nullptr;
  j["head_dim"] = nullptr;
  j["rope_scaling"] = nullptr;
  j["eos_token_id"] = nullptr;
  ModelConfig d = ParseOk(j.dump());
  EXPECT_EQ(d.num_key_value_heads, 4);
  EXPECT_EQ(d.head_dim, 64);
  EXPECT_EQ(d.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_THAT(d.eos_token_ids, IsEmpty());
}

TEST(ModelConfigTest, ExplicitHeadDim) {
  // Mistral-Nemo style: head_dim * heads != hidden_size.
  ModelConfig c = ParseOk(Minimal({{"model_type", "mistral"},
                                   {"hidden_size", 5120},
                                   {"num_attention_heads", 32},
                                   {"num_key_value_heads", 8},
                                   {"head_dim", 128}}));
  EXPECT_EQ(c.head_dim, 128);
  // With an explicit head_dim, hidden_size need not divide by heads.
  EXPECT_EQ(ParseOk(Minimal({{"hidden_size", 100},
                             {"num_attention_heads", 3},
                             {"num_key_value_heads", 1},
                             {"head_dim", 32}}))
                .head_dim,
            32);
}

TEST(ModelConfigTest, LinearRopeScaling) {
  // Older configs use "type" instead of "rope_type".
  ModelConfig c = ParseOk(
      Minimal({{"rope_scaling", {{"type", "linear"}, {"factor", 4.0}}}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
  ModelConfig d = ParseOk(
      Minimal({{"rope_scaling", {{"rope_type", "linear"}, {"factor", 2}}}}));
  EXPECT_EQ(d.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_DOUBLE_EQ(d.rope_scaling.factor, 2.0);
  ModelConfig e =
      ParseOk(Minimal({{"rope_scaling", {{"rope_type", "default"}}}}));
  EXPECT_EQ(e.rope_scaling.type, RopeScaling::Type::kNone);
}

TEST(ModelConfigTest, Llama3RopeScalingValues) {
  ModelConfig c =
      ParseOk(Minimal({{"rope_scaling",
                        {{"rope_type", "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 2.0},
                         {"high_freq_factor", 6.0},
                         {"original_max_position_embeddings", 4096}}},
                       {"rope_theta", 500000.0}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 2.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 6.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
}

TEST(ModelConfigTest, EosTokenList) {
  // Llama-3.1-8B-Instruct.
  ModelConfig c = ParseOk(Minimal({{"vocab_size", 128256},
                                   {"eos_token_id", {128001, 128008, 128009}},
                                   {"bos_token_id", 128000}}));
  EXPECT_THAT(c.eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_EQ(c.bos_token_id, 128000);
  ExpectInvalid(Minimal({{"eos_token_id", {1, "2"}}}),
                {"eos_token_id", "integer"});
  ExpectInvalid(Minimal({{"eos_token_id", 1000}}),
                {"eos_token_id", "1000", "vocab_size"});
}

TEST(ModelConfigTest, MaskedDiffusionModel) {
  ModelConfig c =
      ParseOk(Minimal({{"architectures", {"LlamaForMaskedDiffusion"}},
                       {"vocab_size", 126464},
                       {"mask_token_id", 126336},
                       {"pad_token_id", 126081}}));
  EXPECT_EQ(c.architecture, "LlamaForMaskedDiffusion");
  EXPECT_FALSE(c.is_causal);
  EXPECT_EQ(c.mask_token_id, 126336);
  EXPECT_EQ(c.pad_token_id, 126081);

  ModelConfig d = ParseOk(
      Minimal({{"architectures", {"LlamaForCausalLM"}}, {"is_causal", false}}));
  EXPECT_FALSE(d.is_causal);
  EXPECT_TRUE(ParseOk(Minimal({{"is_causal", true}})).is_causal);
}

TEST(ModelConfigTest, AttentionBiasForLlama) {
  ModelConfig c = ParseOk(Minimal({{"attention_bias", true}}));
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_TRUE(c.o_bias);
}

TEST(ModelConfigTest, PadTokenMinusOneMeansNone) {
  EXPECT_EQ(ParseOk(Minimal({{"pad_token_id", -1}})).pad_token_id, -1);
  ExpectInvalid(Minimal({{"pad_token_id", -5}}), {"pad_token_id"});
}

// ---- errors -----------------------------------------------------------------

TEST(ModelConfigErrorTest, UnknownModelType) {
  ExpectInvalid(
      Minimal({{"model_type", "gpt2"}}),
      {"model_type 'gpt2' is not supported", "llama, mistral, qwen2"});
  ExpectInvalid(Minimal({{"model_type", nullptr}}),
                {"missing required key 'model_type'"});
  ExpectInvalid(Minimal({{"model_type", 3}}), {"'model_type'", "string"});
}

TEST(ModelConfigErrorTest, UnsupportedRopeTypes) {
  ExpectInvalid(
      Minimal({{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}),
      {"rope_scaling.rope_type 'yarn' is not supported; supported: default, "
       "linear, llama3"});
  ExpectInvalid(
      Minimal({{"rope_scaling", {{"type", "dynamic"}, {"factor", 2.0}}}}),
      {"rope_scaling.rope_type 'dynamic' is not supported"});
  ExpectInvalid(Minimal({{"rope_parameters",
                          {{"rope_type", "longrope"}, {"rope_theta", 1e4}}}}),
                {"rope_parameters.rope_type 'longrope' is not supported"});
  ExpectInvalid(Minimal({{"rope_scaling", "linear"}}),
                {"'rope_scaling'", "object"});
  ExpectInvalid(Minimal({{"rope_parameters",
                          {{"full_attention", {{"rope_type", "default"}}}}}}),
                {"rope_parameters.full_attention", "per-layer-type"});
}

TEST(ModelConfigErrorTest, BadRopeFactors) {
  ExpectInvalid(Minimal({{"rope_scaling", {{"rope_type", "linear"}}}}),
                {"missing required key 'rope_scaling.factor'"});
  ExpectInvalid(
      Minimal({{"rope_scaling", {{"rope_type", "linear"}, {"factor", -2.0}}}}),
      {"'rope_scaling.factor'", "positive"});
  ExpectInvalid(
      Minimal({{"rope_scaling", {{"rope_type", "linear"}, {"factor", "2"}}}}),
      {"'rope_scaling.factor'", "number"});
  ExpectInvalid(Minimal({{"rope_scaling",
                          {{"rope_type", "llama3"},
                           {"factor", 8.0},
                           {"high_freq_factor", 4.0},
                           {"original_max_position_embeddings", 8192}}}}),
                {"missing required key 'rope_scaling.low_freq_factor'"});
  ExpectInvalid(Minimal({{"rope_scaling",
                          {{"rope_type", "llama3"},
                           {"factor", 8.0},
                           {"low_freq_factor", 4.0},
                           {"high_freq_factor", 1.0},
                           {"original_max_position_embeddings", 8192}}}}),
                {"'rope_scaling.high_freq_factor'"});
  ExpectInvalid(
      Minimal({{"rope_parameters",
                {{"rope_type", "llama3"},
                 {"factor", 8.0},
                 {"low_freq_factor", 1.0},
                 {"high_freq_factor", 4.0},
                 {"original_max_position_embeddings", 0}}}}),
      {"'rope_parameters.original_max_position_embeddings'", "positive"});
  ExpectInvalid(Minimal({{"rope_theta", 0}}), {"'rope_theta'", "positive"});
}

TEST(ModelConfigErrorTest, BadDivisibility) {
  ExpectInvalid(Minimal({{"hidden_size", 100}, {"num_attention_heads", 3}}),
                {"'hidden_size'", "100", "num_attention_heads", "3"});
  ExpectInvalid(
      Minimal({{"num_attention_heads", 4}, {"num_key_value_heads", 3}}),
      {"num_attention_heads", "num_key_value_heads", "3"});
  ExpectInvalid(Minimal({{"head_dim", 63}}), {"'head_dim'", "63", "even"});
}

TEST(ModelConfigErrorTest, NonPositiveAndMistypedSizes) {
  ExpectInvalid(Minimal({{"hidden_size", -256}}),
                {"'hidden_size'", "positive", "-256"});
  ExpectInvalid(Minimal({{"num_hidden_layers", 0}}),
                {"'num_hidden_layers'", "positive"});
  ExpectInvalid(Minimal({{"num_key_value_heads", -1}}),
                {"'num_key_value_heads'", "positive"});
  ExpectInvalid(Minimal({{"head_dim", 0}}), {"'head_dim'", "positive"});
  ExpectInvalid(Minimal({{"vocab_size", "1000"}}), {"'vocab_size'", "integer"});
  ExpectInvalid(Minimal({{"intermediate_size", 512.5}}),
                {"'intermediate_size'", "integer"});
  ExpectInvalid(Minimal({{"hidden_size", 1e12}}), {"'hidden_size'"});
  ExpectInvalid(Minimal({{"hidden_size", 4294967296}}),
                {"'hidden_size'", "out of range"});
  ExpectInvalid(Minimal({{"max_position_embeddings", -1}}),
                {"'max_position_embeddings'"});
  ExpectInvalid(Minimal({{"rms_norm_eps", 0}}), {"'rms_norm_eps'"});
  ExpectInvalid(Minimal({{"sliding_window", -4}}), {"'sliding_window'"});
  ExpectInvalid(Minimal({{"tie_word_embeddings", "yes"}}),
                {"'tie_word_embeddings'"});
}

TEST(ModelConfigErrorTest, MissingRequiredKeyNamesKey) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size",
                          "num_hidden_layers", "num_attention_heads"}) {
    SCOPED_TRACE(key);
    Json j = Json::parse(kMinimal);
    j.erase(key);
    ExpectInvalid(j.dump(), {absl::StrCat("missing required key '", key, "'")});
  }
}

TEST(ModelConfigErrorTest, UnsupportedFeatures) {
  ExpectInvalid(Minimal({{"hidden_act", "gelu"}}),
                {"'hidden_act'", "'gelu'", "silu"});
  ExpectInvalid(Minimal({{"mlp_bias", true}}), {"'mlp_bias'"});
  ExpectInvalid(Minimal({{"architectures", "LlamaForCausalLM"}}),
                {"'architectures'", "list"});
  ExpectInvalid(Minimal({{"architectures", {1}}}), {"'architectures'"});
  ExpectInvalid(Minimal({{"is_causal", "no"}}), {"'is_causal'"});
}

TEST(ModelConfigErrorTest, NotJson) {
  ExpectInvalid("", {"not valid JSON"});
  ExpectInvalid("{\"model_type\": \"llama\",", {"not valid JSON"});
  ExpectInvalid("model_type: llama", {"not valid JSON"});
  ExpectInvalid("[1, 2]", {"must be a JSON object"});
  ExpectInvalid(std::string(100000, '[') + std::string(100000, ']'),
                {"must be a JSON object", "[[[...]]]"});
}

// ---- Real fixtures (config.json written by transformers 5.x) ----------------

// <repo>/tests/fixtures/hf/<model>, located from this source file (falls back
// to a path relative to the working directory, which ctest sets to the repo).
std::string FixtureDir(const std::string& model) {
  const std::filesystem::path root =
      std::filesystem::path(__FILE__).parent_path().parent_path();
  return (root / "tests" / "fixtures" / "hf" / model).string();
}

ModelConfig LoadFixture(const std::string& model) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(FixtureDir(model));
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig();
}

TEST(ModelConfigFixtureTest, LlamaGqa) {
  ModelConfig c = LoadFixture("llama_gqa_f32");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.vocab_size, 260);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 160);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.max_position_embeddings, 256);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_TRUE(c.is_causal);
  EXPECT_EQ(c.bos_token_id, 256);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(257));
  EXPECT_EQ(c.pad_token_id, 258);
}

TEST(ModelConfigFixtureTest, LlamaTiedLlama3) {
  ModelConfig c = LoadFixture("llama_tied_llama3_bf16");
  EXPECT_EQ(c.num_hidden_layers, 3);
  EXPECT_EQ(c.num_key_value_heads, 1);
  EXPECT_EQ(c.head_dim, 32);  // != hidden_size / heads
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 32);
}

TEST(ModelConfigFixtureTest, Mistral) {
  ModelConfig c = LoadFixture("mistral_f32");
  EXPECT_EQ(c.model_type, "mistral");
  EXPECT_EQ(c.num_key_value_heads, 1);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_FALSE(c.qkv_bias);
}

TEST(ModelConfigFixtureTest, Qwen2BiasLinearRope) {
  ModelConfig c = LoadFixture("qwen2_bias_f32");
  EXPECT_EQ(c.model_type, "qwen2");
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 2.0);
}

// ---- LoadModelConfig --------------------------------------------------------

class LoadModelConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "model_config_test_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  void WriteConfig(const std::string& text) { WriteFile("config.json", text); }
  void WriteFile(const std::string& name, const std::string& text) {
    std::ofstream out(dir_ + "/" + name, std::ios::binary);
    out << text;
    ASSERT_TRUE(out.good());
  }
  std::string dir_;
};

TEST_F(LoadModelConfigTest, LoadsFromDirectory) {
  WriteConfig(kQwen25);
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "qwen2");
  EXPECT_EQ(c->hidden_size, 896);
}

TEST_F(LoadModelConfigTest, MissingFileIsNotFoundNamingPath) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(dir_));
  EXPECT_THAT(c.status().message(), HasSubstr("config.json"));
  EXPECT_EQ(LoadModelConfig(dir_ + "/no/such/dir").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(LoadModelConfigTest, ParseErrorNamesPath) {
  WriteConfig("{not json");
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(dir_ + "/config.json"));
  EXPECT_THAT(c.status().message(), HasSubstr("not valid JSON"));

  WriteConfig(Minimal({{"model_type", "gemma"}}));
  c = LoadModelConfig(dir_);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(dir_ + "/config.json"));
  EXPECT_THAT(c.status().message(), HasSubstr("'gemma'"));
}

// ---- generation_config.json ------------------------------------------------

// config.json's ids, then the generation config's new ones.
std::vector<int> MergedEos(const std::vector<int>& config_ids,
                           const std::string& generation_config) {
  ModelConfig c;
  c.vocab_size = 128256;
  c.eos_token_ids = config_ids;
  absl::Status s = MergeGenerationConfig(generation_config, &c);
  EXPECT_TRUE(s.ok()) << s;
  return c.eos_token_ids;
}

TEST(GenerationConfigTest, MergesIntAndList) {
  EXPECT_THAT(MergedEos({128001}, R"({"eos_token_id": 128009})"),
              ElementsAre(128001, 128009));
  // Llama-3-Instruct: the list repeats config.json's id.
  EXPECT_THAT(MergedEos({128001}, R"({"eos_token_id": [128001, 128009]})"),
              ElementsAre(128001, 128009));
  EXPECT_THAT(MergedEos({}, R"({"eos_token_id": [7, 5, 7, -1]})"),
              ElementsAre(7, 5));
  EXPECT_THAT(MergedEos({5, 7}, R"({"eos_token_id": [7, 5]})"),
              ElementsAre(5, 7));
}

TEST(GenerationConfigTest, NoIdsLeavesConfigIds) {
  EXPECT_THAT(MergedEos({2}, R"({"bos_token_id": 1, "pad_token_id": 3})"),
              ElementsAre(2));
  EXPECT_THAT(MergedEos({2}, R"({"eos_token_id": null})"), ElementsAre(2));
  EXPECT_THAT(MergedEos({2}, R"({"eos_token_id": -1})"), ElementsAre(2));
  EXPECT_THAT(MergedEos({2}, R"({"eos_token_id": []})"), ElementsAre(2));
}

TEST(GenerationConfigTest, BadIdsNameFileAndKeyAndChangeNothing) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"eos_token_id": [5, 128256]})", "outside [0, vocab_size=128256)"},
      {R"({"eos_token_id": -2})", "outside"},
      {R"({"eos_token_id": "2"})", "must be an integer"},
      {R"({"eos_token_id": [5, 1.5]})", "must be an integer"},
      {R"({"eos_token_id": 99999999999})", "out of range"},
  };
  for (const auto& [text, what] : cases) {
    ModelConfig c;
    c.vocab_size = 128256;
    c.eos_token_ids = {2};
    absl::Status s = MergeGenerationConfig(text, &c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(s.message(),
                HasSubstr("generation_config.json: 'eos_token_id'"))
        << text;
    EXPECT_THAT(s.message(), HasSubstr(what)) << text;
    EXPECT_THAT(c.eos_token_ids, ElementsAre(2)) << text;
  }
}

TEST(GenerationConfigTest, MalformedFileIsInvalid) {
  for (const char* text : {"", "{\"eos_token_id\": ", "[128009]"}) {
    ModelConfig c;
    c.vocab_size = 128256;
    absl::Status s = MergeGenerationConfig(text, &c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(s.message(), HasSubstr("generation_config.json")) << text;
  }
}

TEST_F(LoadModelConfigTest, MergesGenerationConfigEos) {
  WriteConfig(kLlama32V4);  // eos_token_id 128001
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids,
              ElementsAre(128001));  // no generation_config.json

  WriteFile("generation_config.json",
            R"({"bos_token_id": 128000, "do_sample": true,
                "eos_token_id": [128001, 128008, 128009], "temperature": 0.6})");
  c = LoadModelConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_EQ(c->bos_token_id, 128000);

  WriteFile("generation_config.json", R"({"eos_token_id": 128009})");
  c = LoadModelConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001, 128009));
}

TEST_F(LoadModelConfigTest, BadGenerationConfigFailsNamingPath) {
  WriteConfig(kLlama32V4);
  WriteFile("generation_config.json", R"({"eos_token_id": [128001, 128256]})");
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(),
              HasSubstr(dir_ + "/generation_config.json"));
  EXPECT_THAT(c.status().message(), HasSubstr("'eos_token_id' = 128256"));

  WriteFile("generation_config.json", "{garbled");
  c = LoadModelConfig(dir_);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(),
              HasSubstr(dir_ + "/generation_config.json"));
  EXPECT_THAT(c.status().message(), HasSubstr("not valid JSON"));
}

}  // namespace
}  // namespace prehoc
