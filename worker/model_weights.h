// Weights of a Llama-family model held in float32 host memory, loaded from a Hugging Face
// directory (config.json + *.safetensors, sharded or not) or made random for benchmarks.
//
// Tensor names (HF): model.embed_tokens.weight [V, D]; per layer i, model.layers.i.:
//   self_attn.{q,k,v,o}_proj.weight [H*hd, D], [KVH*hd, D], [KVH*hd, D], [D, H*hd] (+ .bias)
//   mlp.{gate,up}_proj.weight [F, D], mlp.down_proj.weight [D, F]
//   input_layernorm.weight [D], post_attention_layernorm.weight [D]
// model.norm.weight [D]; lm_head.weight [V, D] unless tie_word_embeddings.
#ifndef PREHOC_WORKER_MODEL_WEIGHTS_H_
#define PREHOC_WORKER_MODEL_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model_config.h"

namespace prehoc {

struct LayerWeights {
  std::vector<float> wq, wk, wv, wo;  // row-major [out, in]
  std::vector<float> bq, bk, bv, bo;  // empty when the model has no such bias
  std::vector<float> w_gate, w_up, w_down;
  std::vector<float> attn_norm, mlp_norm;
};

struct ModelWeights {
  ModelConfig config;
  std::vector<float> embed;       // [V, D]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [D]
  std::vector<float> lm_head;     // [V, D]; empty when tied (use embed)

  const float* lm_head_data() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
  int64_t num_parameters() const;

  // Loads config.json and every tensor, checking each tensor's shape against the config.
  // Errors: those of LoadModelConfig and Checkpoint (naming file and tensor), INVALID_ARGUMENT
  // for a missing tensor or a shape mismatch (naming the tensor, expected and actual shape).
  static absl::StatusOr<std::unique_ptr<ModelWeights>> Load(const std::string& model_dir);

  // Random weights with the shapes of `config` (normal(0, 0.02)-like, norms 1): same cost per
  // token as real weights. For benchmarks only.
  static std::unique_ptr<ModelWeights> Random(const ModelConfig& config, uint64_t seed);
};

}  // namespace prehoc

#endif  // PREHOC_WORKER_MODEL_WEIGHTS_H_
