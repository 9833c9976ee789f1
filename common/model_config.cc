#include "common/model_config.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "common/json_brief.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace prehoc {
namespace {

// absl here is built with its own string_view (ABSL_OPTION_USE_STD_STRING_VIEW
// is 0), so std::string_view must be converted before reaching absl::StrCat.

using Json = nlohmann::json;

// `file` names the JSON file in the message (config.json or
// generation_config.json).
absl::Status Invalid(std::string_view key, std::string_view what,
                     std::string_view file = "config.json") {
  return absl::InvalidArgumentError(
      absl::StrCat(Av(file), ": '", Av(key), "' ", Av(what)));
}

// Typed access to the keys of one JSON object. Keys are reported as
// `prefix + key` (e.g. "rope_scaling.factor"). A key whose value is null is
// treated as absent.
class ObjectReader {
 public:
  ObjectReader(const Json& obj, std::string prefix)
      : obj_(obj), prefix_(std::move(prefix)) {}

  std::string Name(std::string_view key) const {
    return absl::StrCat(prefix_, Av(key));
  }

  // nullptr when absent or null.
  const Json* Find(std::string_view key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::StatusOr<std::optional<int64_t>> Int(std::string_view key) const {
    const Json* v = Find(key);
    if (v == nullptr) return std::optional<int64_t>();
    return ToInt(*v, Name(key));
  }

  absl::StatusOr<int> RequiredPositiveInt(std::string_view key) const {
    ASSIGN_OR_RETURN(std::optional<int64_t> v, Int(key));
    if (!v.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.json: missing required key '", Name(key), "'"));
    }
    return CheckPositive(key, *v);
  }

  // `fallback` when absent or null.
  absl::StatusOr<int> OptionalPositiveInt(std::string_view key,
                                          int fallback) const {
    ASSIGN_OR_RETURN(std::optional<int64_t> v, Int(key));
    if (!v.has_value()) return fallback;
    return CheckPositive(key, *v);
  }

  absl::StatusOr<std::optional<double>> Number(std::string_view key) const {
    const Json* v = Find(key);
    if (v == nullptr) return std::optional<double>();
    if (!v->is_number()) {
      return Invalid(Name(key),
                     absl::StrCat("must be a number, got ", BriefJson(*v)));
    }
    return std::optional<double>(v->get<double>());
  }

  absl::StatusOr<std::optional<bool>> Bool(std::string_view key) const {
    const Json* v = Find(key);
    if (v == nullptr) return std::optional<bool>();
    if (!v->is_boolean()) {
      return Invalid(Name(key),
                     absl::StrCat("must be true or false, got ", BriefJson(*v)));
    }
    return std::optional<bool>(v->get<bool>());
  }

  absl::StatusOr<std::optional<std::string>> String(
      std::string_view key) const {
    const Json* v = Find(key);
    if (v == nullptr) return std::optional<std::string>();
    if (!v->is_string()) {
      return Invalid(Name(key),
                     absl::StrCat("must be a string, got ", BriefJson(*v)));
    }
    return std::optional<std::string>(v->get<std::string>());
  }

  // Integer in int range.
  static absl::StatusOr<int64_t> ToInt(const Json& v, std::string_view name,
                                       std::string_view file = "config.json") {
    constexpr int64_t kMin = std::numeric_limits<int>::min();
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u <= static_cast<uint64_t>(kMax)) return static_cast<int64_t>(u);
    } else if (v.is_number_integer()) {
      int64_t i = v.get<int64_t>();
      if (i >= kMin && i <= kMax) return i;
    } else {
      return Invalid(
          name, absl::StrCat("must be an integer, got ", BriefJson(v)), file);
    }
    return Invalid(name, absl::StrCat("is out of range: ", BriefJson(v)), file);
  }

 private:
  absl::StatusOr<int> CheckPositive(std::string_view key, int64_t v) const {
    if (v <= 0) {
      return Invalid(Name(key), absl::StrCat("must be positive, got ", v));
    }
    return static_cast<int>(v);
  }

  const Json& obj_;
  std::string prefix_;
};

// A token id: absent/null -> -1; -1 is accepted as "not declared"; otherwise
// it must lie in [0, vocab_size) (pad ids are only required to be >= -1).
absl::StatusOr<int> TokenId(const Json& v, std::string_view name,
                            int vocab_size, bool check_vocab,
                            std::string_view file = "config.json") {
  ASSIGN_OR_RETURN(int64_t id, ObjectReader::ToInt(v, name, file));
  if (id == -1) return -1;
  if (id < 0 || (check_vocab && id >= vocab_size)) {
    return Invalid(
        name,
        absl::StrCat("= ", id, " is outside [0, vocab_size=", vocab_size, ")"),
        file);
  }
  return static_cast<int>(id);
}

// Parses the rope settings from `rope` (a rope_scaling or rope_parameters
// object, keys reported under `prefix`). rope_theta is read from it when
// `read_theta` (v5 style).
absl::Status ParseRope(const Json& rope, const std::string& prefix,
                       bool read_theta, ModelConfig* config) {
  const std::string obj_name = prefix.substr(0, prefix.size() - 1);
  if (!rope.is_object()) {
    return Invalid(
        obj_name, absl::StrCat("must be an object or null, got ", BriefJson(rope)));
  }
  ObjectReader r(rope, prefix);
  if (read_theta) {
    ASSIGN_OR_RETURN(std::optional<double> theta, r.Number("rope_theta"));
    if (theta.has_value()) config->rope_theta = *theta;
  }
  ASSIGN_OR_RETURN(std::optional<std::string> rope_type, r.String("rope_type"));
  if (!rope_type.has_value()) {
    ASSIGN_OR_RETURN(rope_type, r.String("type"));
  }
  if (!rope_type.has_value()) {
    // transformers v5 may key rope_parameters by layer type (e.g.
    // {"full_attention": {...}, "sliding_attention": {...}}); we support a
    // single set of parameters for every layer only.
    for (const auto& [key, value] : rope.items()) {
      if (value.is_object()) {
        return Invalid(absl::StrCat(prefix, key),
                       "per-layer-type rope parameters are not supported");
      }
    }
    rope_type = "default";
  }
  RopeScaling& s = config->rope_scaling;
  s = RopeScaling();
  if (*rope_type == "default") return absl::OkStatus();
  if (*rope_type != "linear" && *rope_type != "llama3") {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: ", prefix, "rope_type '", *rope_type,
                     "' is not supported; supported: default, linear, llama3"));
  }

  ASSIGN_OR_RETURN(std::optional<double> factor, r.Number("factor"));
  if (!factor.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: missing required key '", r.Name("factor"),
                     "' for rope_type '", *rope_type, "'"));
  }
  if (!(*factor > 0.0)) {
    return Invalid(r.Name("factor"),
                   absl::StrCat("must be positive, got ", *factor));
  }
  s.factor = *factor;
  if (*rope_type == "linear") {
    s.type = RopeScaling::Type::kLinear;
    return absl::OkStatus();
  }

  s.type = RopeScaling::Type::kLlama3;
  for (const char* key : {"low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings"}) {
    if (r.Find(key) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("config.json: missing required key '", r.Name(key),
                       "' for rope_type 'llama3'"));
    }
  }
  ASSIGN_OR_RETURN(std::optional<double> low, r.Number("low_freq_factor"));
  ASSIGN_OR_RETURN(std::optional<double> high, r.Number("high_freq_factor"));
  if (!(*low > 0.0)) {
    return Invalid(r.Name("low_freq_factor"),
                   absl::StrCat("must be positive, got ", *low));
  }
  if (!(*high > *low)) {
    return Invalid(r.Name("high_freq_factor"),
                   absl::StrCat("must be greater than low_freq_factor (", *low,
                                "), got ", *high));
  }
  s.low_freq_factor = *low;
  s.high_freq_factor = *high;
  ASSIGN_OR_RETURN(s.original_max_position_embeddings,
                   r.RequiredPositiveInt("original_max_position_embeddings"));
  return absl::OkStatus();
}

// Appends the ids of an `eos_token_id` value (an integer or a list of them;
// -1 = none) to *ids, skipping ids already there. Errors name `file`.
absl::Status AppendEosIds(const Json& v, int vocab_size, std::string_view file,
                          std::vector<int>* ids) {
  auto add = [&](const Json& e) -> absl::Status {
    ASSIGN_OR_RETURN(int id,
                     TokenId(e, "eos_token_id", vocab_size, true, file));
    if (id >= 0 && std::find(ids->begin(), ids->end(), id) == ids->end()) {
      ids->push_back(id);
    }
    return absl::OkStatus();
  };
  if (!v.is_array()) return add(v);
  for (const Json& e : v) RETURN_IF_ERROR(add(e));
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> Parse(const Json& root) {
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: must be a JSON object, got ", BriefJson(root)));
  }
  ObjectReader r(root, "");
  ModelConfig c;

  ASSIGN_OR_RETURN(std::optional<std::string> model_type,
                   r.String("model_type"));
  if (!model_type.has_value()) {
    return absl::InvalidArgumentError(
        "config.json: missing required key 'model_type'");
  }
  if (*model_type != "llama" && *model_type != "mistral" &&
      *model_type != "qwen2") {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: model_type '", *model_type,
                     "' is not supported; supported: llama, mistral, qwen2"));
  }
  c.model_type = *model_type;

  if (const Json* archs = r.Find("architectures")) {
    if (!archs->is_array()) {
      return Invalid(
          "architectures",
          absl::StrCat("must be a list of strings, got ", BriefJson(*archs)));
    }
    for (const Json& a : *archs) {
      if (!a.is_string()) {
        return Invalid(
            "architectures",
            absl::StrCat("must be a list of strings, got ", BriefJson(*archs)));
      }
      const std::string& name = a.get_ref<const std::string&>();
      if (c.architecture.empty()) c.architecture = name;
      if (name == "LlamaForMaskedDiffusion") c.is_causal = false;
    }
  }
  ASSIGN_OR_RETURN(std::optional<bool> is_causal, r.Bool("is_causal"));
  if (is_causal.has_value() && !*is_causal) c.is_causal = false;

  ASSIGN_OR_RETURN(std::optional<std::string> act, r.String("hidden_act"));
  if (act.has_value() && *act != "silu") {
    return Invalid(
        "hidden_act",
        absl::StrCat("'", *act, "' is not supported; supported: silu"));
  }

  ASSIGN_OR_RETURN(c.vocab_size, r.RequiredPositiveInt("vocab_size"));
  ASSIGN_OR_RETURN(c.hidden_size, r.RequiredPositiveInt("hidden_size"));
  ASSIGN_OR_RETURN(c.intermediate_size,
                   r.RequiredPositiveInt("intermediate_size"));
  ASSIGN_OR_RETURN(c.num_hidden_layers,
                   r.RequiredPositiveInt("num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_attention_heads,
                   r.RequiredPositiveInt("num_attention_heads"));
  ASSIGN_OR_RETURN(
      c.num_key_value_heads,
      r.OptionalPositiveInt("num_key_value_heads", c.num_attention_heads));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Invalid("num_attention_heads",
                   absl::StrCat("= ", c.num_attention_heads,
                                " is not divisible by num_key_value_heads = ",
                                c.num_key_value_heads));
  }
  if (r.Find("head_dim") != nullptr) {
    ASSIGN_OR_RETURN(c.head_dim, r.RequiredPositiveInt("head_dim"));
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return Invalid(
          "hidden_size",
          absl::StrCat("= ", c.hidden_size,
                       " is not divisible by num_attention_heads = ",
                       c.num_attention_heads, " (and head_dim is not given)"));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) {
    return Invalid(
        "head_dim",
        absl::StrCat("= ", c.head_dim, " must be even for rotary embeddings"));
  }
  ASSIGN_OR_RETURN(c.max_position_embeddings,
                   r.OptionalPositiveInt("max_position_embeddings",
                                         c.max_position_embeddings));

  ASSIGN_OR_RETURN(std::optional<double> eps, r.Number("rms_norm_eps"));
  if (eps.has_value()) {
    if (!(*eps > 0.0)) {
      return Invalid("rms_norm_eps",
                     absl::StrCat("must be positive, got ", *eps));
    }
    c.rms_norm_eps = *eps;
  }

  // Rope: v5 `rope_parameters` wins over v4 `rope_theta` + `rope_scaling`.
  ASSIGN_OR_RETURN(std::optional<double> theta, r.Number("rope_theta"));
  if (theta.has_value()) c.rope_theta = *theta;
  if (const Json* params = r.Find("rope_parameters")) {
    RETURN_IF_ERROR(ParseRope(*params, "rope_parameters.", true, &c));
  } else if (const Json* scaling = r.Find("rope_scaling")) {
    RETURN_IF_ERROR(ParseRope(*scaling, "rope_scaling.", false, &c));
  }
  if (!(c.rope_theta > 0.0)) {
    return Invalid("rope_theta",
                   absl::StrCat("must be positive, got ", c.rope_theta));
  }

  ASSIGN_OR_RETURN(std::optional<bool> attention_bias,
                   r.Bool("attention_bias"));
  if (c.model_type == "qwen2") {
    c.qkv_bias = true;
    c.o_bias = false;
  } else {
    c.qkv_bias = c.o_bias = attention_bias.value_or(false);
  }
  ASSIGN_OR_RETURN(std::optional<bool> mlp_bias, r.Bool("mlp_bias"));
  if (mlp_bias.value_or(false)) {
    return Invalid("mlp_bias", "= true is not supported");
  }
  ASSIGN_OR_RETURN(std::optional<bool> tie, r.Bool("tie_word_embeddings"));
  c.tie_word_embeddings = tie.value_or(false);

  // Sliding window. Qwen2 configs carry `sliding_window` even when it is off;
  // it applies only with `use_sliding_window`, and then only to layers
  // >= max_window_layers (we support all layers or none).
  ASSIGN_OR_RETURN(std::optional<int64_t> window, r.Int("sliding_window"));
  if (window.has_value() && *window < 0) {
    return Invalid("sliding_window",
                   absl::StrCat("must be null or non-negative, got ", *window));
  }
  c.sliding_window = static_cast<int>(window.value_or(0));
  if (c.model_type == "qwen2") {
    ASSIGN_OR_RETURN(std::optional<bool> use, r.Bool("use_sliding_window"));
    if (!use.value_or(false)) {
      c.sliding_window = 0;
    } else {
      ASSIGN_OR_RETURN(std::optional<int64_t> max_window_layers,
                       r.Int("max_window_layers"));
      const int64_t mwl = max_window_layers.value_or(28);
      if (mwl >= c.num_hidden_layers) {
        c.sliding_window = 0;
      } else if (mwl > 0) {
        return Invalid(
            "max_window_layers",
            absl::StrCat("= ", mwl, ": sliding window on only some of the ",
                         c.num_hidden_layers, " layers is not supported"));
      }
    }
  }

  if (const Json* v = r.Find("bos_token_id")) {
    ASSIGN_OR_RETURN(c.bos_token_id,
                     TokenId(*v, "bos_token_id", c.vocab_size, true));
  }
  if (const Json* v = r.Find("pad_token_id")) {
    ASSIGN_OR_RETURN(c.pad_token_id,
                     TokenId(*v, "pad_token_id", c.vocab_size, false));
  }
  if (const Json* v = r.Find("mask_token_id")) {
    ASSIGN_OR_RETURN(c.mask_token_id,
                     TokenId(*v, "mask_token_id", c.vocab_size, true));
  }
  if (const Json* v = r.Find("eos_token_id")) {
    RETURN_IF_ERROR(
        AppendEosIds(*v, c.vocab_size, "config.json", &c.eos_token_ids));
  }
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  try {
    Json root = Json::parse(json_text);
    return Parse(root);
  } catch (const Json::exception& e) {
    // parse errors; every other access is type-checked first, so anything
    // else reaching here is a bug surfaced as an error rather than a throw.
    return absl::InvalidArgumentError(
        absl::StrCat("config.json is not valid JSON: ", e.what()));
  }
}

absl::Status MergeGenerationConfig(std::string_view json_text,
                                   ModelConfig* config) {
  constexpr std::string_view kFile = "generation_config.json";
  Json root;
  try {
    root = Json::parse(json_text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(Av(kFile), " is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Av(kFile), ": must be a JSON object, got ", BriefJson(root)));
  }
  const auto it = root.find("eos_token_id");
  if (it == root.end() || it->is_null()) return absl::OkStatus();
  std::vector<int> ids = config->eos_token_ids;
  RETURN_IF_ERROR(AppendEosIds(*it, config->vocab_size, kFile, &ids));
  config->eos_token_ids = std::move(ids);
  return absl::OkStatus();
}

absl::Status LoadGenerationConfig(const std::string& model_dir,
                                  ModelConfig* config) {
  const std::string path =
      (std::filesystem::path(model_dir) / "generation_config.json").string();
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (absl::IsNotFound(text.status())) return absl::OkStatus();
  RETURN_IF_ERROR(text.status());
  absl::Status s = MergeGenerationConfig(*text, config);
  if (!s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path =
      (std::filesystem::path(model_dir) / "config.json").string();
  ASSIGN_OR_RETURN(std::string text, ReadWholeFile(path));
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  RETURN_IF_ERROR(LoadGenerationConfig(model_dir, &*config));
  return config;
}

}  // namespace prehoc
