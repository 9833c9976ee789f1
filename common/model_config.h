// Hugging Face `config.json` for Llama-family decoder models (Llama, Mistral, Qwen2) and our
// masked-diffusion variant (same tensors, bidirectional attention), plus the end-of-text ids of
// `generation_config.json`.
#ifndef PREHOC_COMMON_MODEL_CONFIG_H_
#define PREHOC_COMMON_MODEL_CONFIG_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace prehoc {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  // llama3 only.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // architectures[0], e.g. "LlamaForCausalLM"
  std::string model_type;    // "llama", "mistral" or "qwen2"
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;  // defaults to num_attention_heads
  int head_dim = 0;             // defaults to hidden_size / num_attention_heads
  int max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  // Bias on q/k/v projections (qwen2 always; llama/mistral when attention_bias) and on o_proj
  // (llama/mistral when attention_bias; never for qwen2).
  bool qkv_bias = false;
  bool o_bias = false;
  bool tie_word_embeddings = false;
  bool is_causal = true;         // false for masked-diffusion models (bidirectional attention)
  int sliding_window = 0;        // 0 = none
  int bos_token_id = -1;         // -1 = not declared
  // End-of-text ids, any of which ends a generation: config.json's `eos_token_id` (int or
  // list), then generation_config.json's new ones (LoadModelConfig); no duplicates.
  std::vector<int> eos_token_ids;
  int pad_token_id = -1;
  int mask_token_id = -1;
};

// Parses config.json text. Accepts both transformers v4 keys (`rope_theta`, `rope_scaling`) and
// v5 keys (`rope_parameters` with `rope_type`/`rope_theta`). Validates: known model_type,
// hidden_act "silu", positive sizes, hidden/heads divisibility when head_dim is absent,
// heads % kv_heads == 0, known rope type with valid factors. Errors are INVALID_ARGUMENT naming
// the offending key and value.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);

// Merges the end-of-text ids of a Hugging Face `generation_config.json` into
// config->eos_token_ids: its `eos_token_id` (an integer or a list; absent, null
// or -1 = none) is appended after the ids already there (config.json's),
// skipping duplicates. transformers' generate() stops on the generation
// config's ids, which may extend config.json's (Llama-3-Instruct: config.json
// 128001, generation_config.json [128001, 128009], 128009 = <|eot_id|> ending a
// chat turn). transformers uses the generation config's ids as they are; the
// union differs from that only when generation_config.json omits an id of
// config.json's, which we keep as a stop id. Ids are validated like
// config.json's: in [0, config->vocab_size).
// Other keys are ignored (pad/bos ids do not stop generation in transformers;
// sampling defaults are the request's). INVALID_ARGUMENT naming
// "generation_config.json" (and the key) for invalid JSON, a non-object or a
// bad id; *config is unchanged on error.
absl::Status MergeGenerationConfig(std::string_view json_text,
                                   ModelConfig* config);

// Reads `<model_dir>/generation_config.json` and merges it as above; errors
// name the file's path. A missing file is not an error (the ids stay
// config.json's): many checkpoints have none, and transformers falls back to
// the model config then. A file that exists but cannot be read or parsed is an
// error, although transformers' from_pretrained would also fall back (it turns
// a JSON error into the same OSError as a missing file): ignoring it would
// silently drop end ids and let generations run to max_tokens, the failure this
// merge exists to prevent.
absl::Status LoadGenerationConfig(const std::string& model_dir,
                                  ModelConfig* config);

// Reads `<model_dir>/config.json`, parses it, then merges
// `<model_dir>/generation_config.json` when present (LoadGenerationConfig);
// errors name the file.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace prehoc

#endif  // PREHOC_COMMON_MODEL_CONFIG_H_
