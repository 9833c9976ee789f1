// Whole-model prefill on the GPU (CudaModel, random weights; LLaMA-2-7B shape
// by default): one sequence of --ctx tokens prefilled in one step, dense vs
// with each prefill plan of --plans (selection-plan overrides of the prhs
// policy, ';'-separated; ETF needs the whole prompt in one step from position
// 0), all in the same process. Per configuration: --reps timed prefills after
// one warm-up (each a fresh sequence: CreateSequence, a synchronous Step with
// the last token's logits, FreeSequence), wall-clock ms (median), the ratio
// dense / plan, and the fraction of (layer, row) pairs the plan computes (Σ_l
// (T − frozen_l) / (L · T), the ETF compute bound; attention shrinks less:
// computed rows still read the frozen keys).
//
//   etf_prefill_bench [--layers=32] [--hidden=4096] [--heads=32]
//   [--kv-heads=32]
//                     [--head-dim=128] [--ffn=11008] [--vocab=32000]
//                     [--ctx=8192] [--reps=5]
//                     [--plans=etf_start=0,etf_psi=0.9;etf_start=0,etf_psi=0.5]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cachemgr/selection_plan.h"
#include "worker/backends/cuda/cuda_model.h"

namespace {

struct Options {
  int layers = 32, hidden = 4096, heads = 32, kv_heads = 32, head_dim = 128,
      ffn = 11008;
  int vocab = 32000, ctx = 8192, reps = 5;
  std::string plans = "etf_start=0,etf_psi=0.9;etf_start=0,etf_psi=0.5";
};

bool Parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) return false;
    const std::string k = a.substr(2, eq - 2), v = a.substr(eq + 1);
    if (k == "plans") {
      o->plans = v;
      continue;
    }
    int* dst = k == "layers"     ? &o->layers
               : k == "hidden"   ? &o->hidden
               : k == "heads"    ? &o->heads
               : k == "kv-heads" ? &o->kv_heads
               : k == "head-dim" ? &o->head_dim
               : k == "ffn"      ? &o->ffn
               : k == "vocab"    ? &o->vocab
               : k == "ctx"      ? &o->ctx
               : k == "reps"     ? &o->reps
                                 : nullptr;
    if (dst == nullptr) return false;
    *dst = std::atoi(v.c_str());
  }
  return o->ctx > 1 && o->reps > 0;
}

}  // namespace

int main(int argc, char** argv) {
  using prehoc::CudaModel;
  Options o;
  if (!Parse(argc, argv, &o)) {
    std::fprintf(stderr, "usage: see the top of bench/etf_prefill_bench.cc\n");
    return 2;
  }
  prehoc::ModelConfig cfg;
  cfg.num_hidden_layers = o.layers;
  cfg.hidden_size = o.hidden;
  cfg.num_attention_heads = o.heads;
  cfg.num_key_value_heads = o.kv_heads;
  cfg.head_dim = o.head_dim;
  cfg.intermediate_size = o.ffn;
  cfg.vocab_size = o.vocab;
  cfg.max_position_embeddings = o.ctx;
  prehoc::CudaModelOptions mo;
  mo.random_config = cfg;
  mo.kv_cache_bytes = static_cast<int64_t>(o.ctx + 64) * o.layers * 2 *
                      o.kv_heads * o.head_dim * 2;
  auto model = CudaModel::Create(mo);
  if (!model.ok()) {
    std::fprintf(stderr, "etf_prefill_bench: %s\n",
                 model.status().ToString().c_str());
    return 1;
  }
  const int page = (*model)->page_size();
  std::vector<int32_t> tokens(o.ctx);
  std::mt19937 rng(5);
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % o.vocab);

  // "" = dense (no prefill plan), then each --plans entry.
  std::vector<std::string> names{""};
  std::stringstream ss(o.plans);
  for (std::string p; std::getline(ss, p, ';');) {
    if (!p.empty()) names.push_back(p);
  }
  std::printf(
      "{\"device\": \"%s\", \"layers\": %d, \"hidden\": %d, \"heads\": %d, "
      "\"kv_heads\": %d, \"head_dim\": %d, \"ffn\": %d, \"ctx\": %d, \"reps\": "
      "%d, "
      "\"records\": [\n",
      (*model)->device_name().c_str(), o.layers, o.hidden, o.heads, o.kv_heads,
      o.head_dim, o.ffn, o.ctx, o.reps);
  double dense_ms = 0;
  for (size_t n = 0; n < names.size(); ++n) {
    std::unique_ptr<prehoc::SelectionPlan> plan;
    double computed = 1.0;
    if (!names[n].empty()) {
      auto ov = prehoc::ParseOverrides(names[n]);
      if (!ov.ok()) {
        std::fprintf(stderr, "--plans: %s\n", ov.status().ToString().c_str());
        return 2;
      }
      prehoc::SparsityOptions so;
      so.policy = "prhs";
      auto p = prehoc::MakeSelectionPlan(cfg, so, *ov);
      if (!p.ok()) {
        std::fprintf(stderr, "--plans: %s\n", p.status().ToString().c_str());
        return 2;
      }
      plan = std::make_unique<prehoc::SelectionPlan>(std::move(*p));
      // The frozen rows per layer that Engine::Step and CudaModel apply.
      int64_t rows = 0;
      for (int64_t f : prehoc::EtfFrozenRows(*plan, o.layers, o.ctx, page)) {
        rows += o.ctx - f;
      }
      computed =
          static_cast<double>(rows) / (static_cast<double>(o.layers) * o.ctx);
    }
    std::vector<double> ms;
    for (int r = 0; r <= o.reps; ++r) {
      const CudaModel::SeqId seq = (*model)->CreateSequence();
      CudaModel::StepItem it;
      it.seq = seq;
      it.tokens = tokens;
      it.prefill_plan = plan.get();
      const auto t0 = std::chrono::steady_clock::now();
      auto st = (*model)->Step({&it, 1});
      const double t = std::chrono::duration<double, std::milli>(
                           std::chrono::steady_clock::now() - t0)
                           .count();
      if (!st.ok()) {
        std::fprintf(stderr, "etf_prefill_bench: %s\n",
                     st.status().ToString().c_str());
        return 1;
      }
      auto aliased = (*model)->AliasedPages(seq);
      if (!(*model)->FreeSequence(seq).ok() || !aliased.ok()) return 1;
      if (r > 0) ms.push_back(t);  // r = 0: warm-up
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    if (n == 0) dense_ms = med;
    std::printf(
        "  {\"plan\": \"%s\", \"prefill_ms\": %.2f, \"min_ms\": %.2f, "
        "\"max_ms\": %.2f, "
        "\"speedup_vs_dense\": %.3f, \"computed_row_fraction\": %.4f}%s\n",
        names[n].empty() ? "dense" : names[n].c_str(), med, ms.front(),
        ms.back(), dense_ms / med, computed, n + 1 < names.size() ? "," : "");
  }
  std::printf("]}\n");
  return 0;
}
