#include "worker/dlm/llada_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace prehoc::dlm {
namespace {

using Json = nlohmann::json;

absl::Status Invalid(const std::string& key, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json (LLaDA): '", key, "' ", what));
}

// A key whose value is null counts as absent.
const Json* Find(const Json& obj, const std::string& key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<int> Int(const Json& obj, const std::string& key, int fallback, bool required,
                        int min_value) {
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (required) return Invalid(key, "is required");
    return fallback;
  }
  if (!v->is_number_integer()) return Invalid(key, absl::StrCat("must be an integer, got ", v->dump()));
  const int64_t x = v->get<int64_t>();
  if (x < min_value || x > (int64_t{1} << 30)) {
    return Invalid(key, absl::StrCat("must be >= ", min_value, ", got ", x));
  }
  return static_cast<int>(x);
}

absl::StatusOr<double> Num(const Json& obj, const std::string& key, double fallback) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_number()) return Invalid(key, absl::StrCat("must be a number, got ", v->dump()));
  return v->get<double>();
}

absl::StatusOr<bool> Bool(const Json& obj, const std::string& key, bool fallback) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return Invalid(key, absl::StrCat("must be a boolean, got ", v->dump()));
  return v->get<bool>();
}

absl::StatusOr<std::string> Str(const Json& obj, const std::string& key, const std::string& fallback) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_string()) return Invalid(key, absl::StrCat("must be a string, got ", v->dump()));
  return v->get<std::string>();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

bool IsLladaConfigJson(std::string_view json_text) {
  Json j = Json::parse(json_text.begin(), json_text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) return false;
  if (const Json* t = Find(j, "model_type"); t != nullptr && t->is_string() && *t == "llada") {
    return true;
  }
  if (const Json* a = Find(j, "architectures");
      a != nullptr && a->is_array() && !a->empty() && (*a)[0].is_string() &&
      (*a)[0] == "LLaDAModelLM") {
    return true;
  }
  return false;
}

absl::StatusOr<ModelConfig> ParseLladaConfig(std::string_view json_text) {
  Json j = Json::parse(json_text.begin(), json_text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("config.json (LLaDA): not a JSON object");
  }
  ModelConfig c;
  c.model_type = "llada";
  c.architecture = "LLaDAModelLM";
  if (const Json* a = Find(j, "architectures"); a != nullptr && a->is_array() && !a->empty() &&
                                                (*a)[0].is_string()) {
    c.architecture = (*a)[0].get<std::string>();
  }
  // Unsupported variants first, so the message names what is wrong.
  ASSIGN_OR_RETURN(std::string block_type, Str(j, "block_type", "llama"));
  if (block_type != "llama") return Invalid("block_type", absl::StrCat("'", block_type, "' is not supported (only \"llama\")"));
  ASSIGN_OR_RETURN(std::string norm, Str(j, "layer_norm_type", "rms"));
  if (norm != "rms") return Invalid("layer_norm_type", absl::StrCat("'", norm, "' is not supported (only \"rms\")"));
  ASSIGN_OR_RETURN(std::string act, Str(j, "activation_type", "silu"));
  if (act != "silu") return Invalid("activation_type", absl::StrCat("'", act, "' is not supported (only \"silu\")"));
  for (const char* key : {"alibi", "attention_layer_norm", "input_emb_norm", "scale_logits",
                          "include_bias"}) {
    ASSIGN_OR_RETURN(bool on, Bool(j, key, false));
    if (on) return Invalid(key, "true is not supported");
  }
  ASSIGN_OR_RETURN(bool rope, Bool(j, "rope", true));
  if (!rope) return Invalid("rope", "false is not supported (RoPE models only)");
  ASSIGN_OR_RETURN(bool affine, Bool(j, "layer_norm_with_affine", true));
  if (!affine) return Invalid("layer_norm_with_affine", "false is not supported");

  ASSIGN_OR_RETURN(c.hidden_size, Int(j, "d_model", 0, true, 1));
  ASSIGN_OR_RETURN(c.num_attention_heads, Int(j, "n_heads", 0, true, 1));
  ASSIGN_OR_RETURN(c.num_hidden_layers, Int(j, "n_layers", 0, true, 1));
  ASSIGN_OR_RETURN(c.num_key_value_heads, Int(j, "n_kv_heads", c.num_attention_heads, false, 1));
  ASSIGN_OR_RETURN(bool mqa, Bool(j, "multi_query_attention", false));
  if (mqa) c.num_key_value_heads = 1;
  if (c.hidden_size % c.num_attention_heads != 0) {
    return Invalid("d_model", absl::StrCat(c.hidden_size, " is not a multiple of n_heads ",
                                           c.num_attention_heads));
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Invalid("n_kv_heads", absl::StrCat(c.num_key_value_heads, " does not divide n_heads ",
                                              c.num_attention_heads));
  }
  ASSIGN_OR_RETURN(int mlp_ratio, Int(j, "mlp_ratio", 4, false, 1));
  ASSIGN_OR_RETURN(c.intermediate_size, Int(j, "mlp_hidden_size", mlp_ratio * c.hidden_size, false, 1));
  ASSIGN_OR_RETURN(int vocab, Int(j, "vocab_size", 0, true, 1));
  ASSIGN_OR_RETURN(c.vocab_size, Int(j, "embedding_size", vocab, false, 1));
  if (c.vocab_size < vocab) {
    return Invalid("embedding_size", absl::StrCat(c.vocab_size, " is below vocab_size ", vocab));
  }
  ASSIGN_OR_RETURN(c.max_position_embeddings, Int(j, "max_sequence_length", 4096, false, 1));
  ASSIGN_OR_RETURN(c.rms_norm_eps, Num(j, "rms_norm_eps", 1e-5));
  if (!(c.rms_norm_eps > 0)) return Invalid("rms_norm_eps", "must be > 0");
  ASSIGN_OR_RETURN(c.rope_theta, Num(j, "rope_theta", 10000.0));
  if (!(c.rope_theta > 0)) return Invalid("rope_theta", "must be > 0");
  ASSIGN_OR_RETURN(c.tie_word_embeddings, Bool(j, "weight_tying", false));
  ASSIGN_OR_RETURN(c.qkv_bias, Bool(j, "include_qkv_bias", false));
  c.o_bias = false;
  c.is_causal = false;
  auto token = [&](const char* key, int fallback) -> absl::StatusOr<int> {
    ASSIGN_OR_RETURN(int id, Int(j, key, fallback, false, -1));
    if (id >= c.vocab_size) {
      return Invalid(key, absl::StrCat(id, " is outside [0, ", c.vocab_size, ")"));
    }
    return id;
  };
  ASSIGN_OR_RETURN(c.mask_token_id, token("mask_token_id", 126336 < c.vocab_size ? 126336 : -1));
  ASSIGN_OR_RETURN(int eos, token("eos_token_id", -1));
  if (eos >= 0) c.eos_token_ids = {eos};
  ASSIGN_OR_RETURN(c.pad_token_id, token("pad_token_id", -1));
  ASSIGN_OR_RETURN(c.bos_token_id, token("bos_token_id", -1));
  return c;
}

absl::StatusOr<bool> IsLladaCheckpoint(const std::string& model_dir) {
  ASSIGN_OR_RETURN(std::string text, ReadFile((std::filesystem::path(model_dir) / "config.json").string()));
  return IsLladaConfigJson(text);
}

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadLladaWeights(const std::string& model_dir) {
  ASSIGN_OR_RETURN(std::string text, ReadFile((std::filesystem::path(model_dir) / "config.json").string()));
  auto w = std::make_unique<ModelWeights>();
  ASSIGN_OR_RETURN(w->config, ParseLladaConfig(text));
  RETURN_IF_ERROR(LoadGenerationConfig(model_dir, &w->config));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(model_dir));
  const ModelConfig& c = w->config;
  const int64_t D = c.hidden_size, V = c.vocab_size, F = c.intermediate_size;
  const int64_t Q = static_cast<int64_t>(c.num_attention_heads) * c.head_dim;
  const int64_t KV = static_cast<int64_t>(c.num_key_value_heads) * c.head_dim;
  auto read = [&](const std::string& name, std::vector<int64_t> shape,
                  std::vector<float>* out) -> absl::Status {
    ASSIGN_OR_RETURN(*out, ckpt->ReadFloat32(name, shape));
    return absl::OkStatus();
  };
  const std::string t = "model.transformer.";
  RETURN_IF_ERROR(read(t + "wte.weight", {V, D}, &w->embed));
  RETURN_IF_ERROR(read(t + "ln_f.weight", {D}, &w->final_norm));
  if (!c.tie_word_embeddings) RETURN_IF_ERROR(read(t + "ff_out.weight", {V, D}, &w->lm_head));
  w->layers.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat(t, "blocks.", i, ".");
    LayerWeights& l = w->layers[i];
    RETURN_IF_ERROR(read(p + "q_proj.weight", {Q, D}, &l.wq));
    RETURN_IF_ERROR(read(p + "k_proj.weight", {KV, D}, &l.wk));
    RETURN_IF_ERROR(read(p + "v_proj.weight", {KV, D}, &l.wv));
    RETURN_IF_ERROR(read(p + "attn_out.weight", {D, Q}, &l.wo));
    if (c.qkv_bias) {
      RETURN_IF_ERROR(read(p + "q_proj.bias", {Q}, &l.bq));
      RETURN_IF_ERROR(read(p + "k_proj.bias", {KV}, &l.bk));
      RETURN_IF_ERROR(read(p + "v_proj.bias", {KV}, &l.bv));
    }
    RETURN_IF_ERROR(read(p + "ff_proj.weight", {F, D}, &l.w_gate));
    RETURN_IF_ERROR(read(p + "up_proj.weight", {F, D}, &l.w_up));
    RETURN_IF_ERROR(read(p + "ff_out.weight", {D, F}, &l.w_down));
    RETURN_IF_ERROR(read(p + "attn_norm.weight", {D}, &l.attn_norm));
    RETURN_IF_ERROR(read(p + "ff_norm.weight", {D}, &l.mlp_norm));
  }
  return w;
}

}  // namespace prehoc::dlm
