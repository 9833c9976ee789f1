// Loader for LLaDA-style checkpoints (GSAI-ML/LLaDA-8B-*, "LLaDAModelLM", OLMo-derived code), so
// that a user can point prehoc at a real LLaDA directory.
//
// config.json keys read (LLaDA names → ModelConfig):
//   d_model → hidden_size; n_heads → num_attention_heads; n_kv_heads (null = n_heads;
//   multi_query_attention true = 1) → num_key_value_heads; n_layers → num_hidden_layers;
//   mlp_hidden_size (null = mlp_ratio · d_model) → intermediate_size; embedding_size (null =
//   vocab_size) → vocab_size (rows of the embedding and LM head); max_sequence_length →
//   max_position_embeddings; rms_norm_eps (1e-5); rope_theta (10000); weight_tying →
//   tie_word_embeddings; include_qkv_bias → q/k/v biases; mask_token_id (126336 when absent, the
//   id LLaDA's generate() hard-codes), eos_token_id, pad_token_id. head_dim = d_model / n_heads;
//   attention is bidirectional (is_causal false).
// Refused with INVALID_ARGUMENT naming the key: block_type other than "llama", layer_norm_type
// other than "rms", activation_type other than "silu", rope false, alibi, attention_layer_norm
// (q/k norm), input_emb_norm, scale_logits, include_bias (MLP biases), layer_norm_with_affine
// false, and the usual size checks.
//
// Tensors (prefix model.transformer.):
//   wte.weight [V, D]; ln_f.weight [D]; ff_out.weight [V, D] (LM head; absent when tied)
//   blocks.i.{q_proj [H·hd, D], k_proj [KVH·hd, D], v_proj [KVH·hd, D], attn_out [D, H·hd],
//             ff_proj (gate) [F, D], up_proj [F, D], ff_out (down) [D, F],
//             attn_norm [D], ff_norm [D]}.weight  (+ q/k/v_proj.bias with include_qkv_bias)
// The MLP is silu(ff_proj·x) ⊙ (up_proj·x) → ff_out, i.e. the Llama SwiGLU.
#ifndef PREHOC_WORKER_DLM_LLADA_CHECKPOINT_H_
#define PREHOC_WORKER_DLM_LLADA_CHECKPOINT_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/model_config.h"
#include "worker/model_weights.h"

namespace prehoc::dlm {

// True when the JSON declares a LLaDA checkpoint (model_type "llada" or architectures[0]
// "LLaDAModelLM"); false for anything else, including malformed JSON.
bool IsLladaConfigJson(std::string_view json_text);

// Parses a LLaDA config.json (see the file comment). INVALID_ARGUMENT naming the key otherwise.
absl::StatusOr<ModelConfig> ParseLladaConfig(std::string_view json_text);

// Whether `<model_dir>/config.json` is a LLaDA config. NOT_FOUND when the file is missing.
absl::StatusOr<bool> IsLladaCheckpoint(const std::string& model_dir);

// Loads config and weights (float32). The end-of-text ids are config.json's eos_token_id, then
// those of `<model_dir>/generation_config.json` when present (LoadGenerationConfig,
// common/model_config.h). Errors: config errors as above; those of LoadGenerationConfig (naming
// the file); those of Checkpoint::Open and ReadFloat32 (naming the tensor, expected and actual
// shape).
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadLladaWeights(const std::string& model_dir);

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_LLADA_CHECKPOINT_H_
