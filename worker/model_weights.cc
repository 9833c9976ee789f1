#include "worker/model_weights.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "common/safetensors.h"
#include "common/status.h"

namespace prehoc {
namespace {

absl::Status ReadInto(const Checkpoint& ckpt, const std::string& name,
                      std::vector<int64_t> shape, std::vector<float>* out) {
  ASSIGN_OR_RETURN(*out, ckpt.ReadFloat32(name, shape));
  return absl::OkStatus();
}

}  // namespace

int64_t ModelWeights::num_parameters() const {
  int64_t n = embed.size() + final_norm.size() + lm_head.size();
  for (const LayerWeights& l : layers) {
    for (const auto* v : {&l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.bo, &l.w_gate,
                          &l.w_up, &l.w_down, &l.attn_norm, &l.mlp_norm}) {
      n += static_cast<int64_t>(v->size());
    }
  }
  return n;
}

absl::StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& model_dir) {
  auto w = std::make_unique<ModelWeights>();
  ASSIGN_OR_RETURN(w->config, LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(model_dir));
  const ModelConfig& c = w->config;
  const int64_t D = c.hidden_size, V = c.vocab_size, F = c.intermediate_size;
  const int64_t Q = static_cast<int64_t>(c.num_attention_heads) * c.head_dim;
  const int64_t KV = static_cast<int64_t>(c.num_key_value_heads) * c.head_dim;

  RETURN_IF_ERROR(ReadInto(*ckpt, "model.embed_tokens.weight", {V, D}, &w->embed));
  RETURN_IF_ERROR(ReadInto(*ckpt, "model.norm.weight", {D}, &w->final_norm));
  if (!c.tie_word_embeddings) {
    RETURN_IF_ERROR(ReadInto(*ckpt, "lm_head.weight", {V, D}, &w->lm_head));
  }
  w->layers.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& l = w->layers[i];
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.q_proj.weight", {Q, D}, &l.wq));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.k_proj.weight", {KV, D}, &l.wk));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.v_proj.weight", {KV, D}, &l.wv));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.o_proj.weight", {D, Q}, &l.wo));
    if (c.qkv_bias) {
      RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.q_proj.bias", {Q}, &l.bq));
      RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.k_proj.bias", {KV}, &l.bk));
      RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.v_proj.bias", {KV}, &l.bv));
    }
    if (c.o_bias) RETURN_IF_ERROR(ReadInto(*ckpt, p + "self_attn.o_proj.bias", {D}, &l.bo));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "mlp.gate_proj.weight", {F, D}, &l.w_gate));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "mlp.up_proj.weight", {F, D}, &l.w_up));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "mlp.down_proj.weight", {D, F}, &l.w_down));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "input_layernorm.weight", {D}, &l.attn_norm));
    RETURN_IF_ERROR(ReadInto(*ckpt, p + "post_attention_layernorm.weight", {D}, &l.mlp_norm));
  }
  return w;
}

std::unique_ptr<ModelWeights> ModelWeights::Random(const ModelConfig& config, uint64_t seed) {
  auto w = std::make_unique<ModelWeights>();
  w->config = config;
  const ModelConfig& c = w->config;
  std::mt19937_64 rng(seed);
  auto fill = [&](std::vector<float>* v, size_t n, float scale) {
    v->resize(n);
    // Uniform with the variance of normal(0, scale): cheap and deterministic.
    std::uniform_real_distribution<float> u(-scale * 1.7320508f, scale * 1.7320508f);
    for (float& x : *v) x = u(rng);
  };
  auto ones = [](std::vector<float>* v, size_t n) { v->assign(n, 1.0f); };
  const size_t D = c.hidden_size, V = c.vocab_size, F = c.intermediate_size;
  const size_t Q = static_cast<size_t>(c.num_attention_heads) * c.head_dim;
  const size_t KV = static_cast<size_t>(c.num_key_value_heads) * c.head_dim;
  fill(&w->embed, V * D, 0.02f);
  ones(&w->final_norm, D);
  if (!c.tie_word_embeddings) fill(&w->lm_head, V * D, 0.02f);
  w->layers.resize(c.num_hidden_layers);
  for (LayerWeights& l : w->layers) {
    fill(&l.wq, Q * D, 0.02f);
    fill(&l.wk, KV * D, 0.02f);
    fill(&l.wv, KV * D, 0.02f);
    fill(&l.wo, D * Q, 0.02f);
    if (c.qkv_bias) {
      fill(&l.bq, Q, 0.02f);
      fill(&l.bk, KV, 0.02f);
      fill(&l.bv, KV, 0.02f);
    }
    if (c.o_bias) fill(&l.bo, D, 0.02f);
    fill(&l.w_gate, F * D, 0.02f);
    fill(&l.w_up, F * D, 0.02f);
    fill(&l.w_down, D * F, 0.02f);
    ones(&l.attn_norm, D);
    ones(&l.mlp_norm, D);
  }
  return w;
}

}  // namespace prehoc
