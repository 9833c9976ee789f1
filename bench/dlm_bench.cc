// Diffusion-LM decoding throughput by cache policy at LLaDA-8B shape with random weights
// (CudaDlmModel), batch 1 and 16: tokens/s, speedup vs vanilla, and the per-phase cost.
//
//   dlm_bench [--backend=cuda|cpu] [--shape=llada8b|tiny] [--batches=1,16]
//             [--policies=none,prefix,dual,dllm,spa,spa:kv_all_rows=0]
//             [--prompt=1000] [--gen=256] [--block=32] [--steps=256] [--parallel-steps=64]
//             [--runs=1/*,16/dual] [--reps=3] [--gemm-tune=0|1] [--kernel-profile=0|1]
//             [--skinny-gemm=0|1] [--cuda-graphs=0|1] [--fused=0|1] [--phases=0|1]
//             [--fused-attention=0|1] [--fused-attention-max-rows=N]
//             [--stop-after-blocks=N,...] [--json=PATH]
//
// Shape: LLaDA-8B's config.json (GSAI-ML/LLaDA-8B-Instruct) parsed by our LLaDA reader
// (ParseLladaConfig): 32 layers, d_model 4096, 32 heads (MHA) of 128, MLP 12288, vocab 126464,
// mask 126336. Random bf16 weights and random rank-128 proxies (no SVD): the proxy ranking and the
// confidences are arbitrary, so the *quality* of a policy is not measured here — only its cost,
// which depends only on the schedule's fixed quantities (ρ(ℓ), R_full, R_gen, K_p, K_r, the
// steps and block sizes: the paper's defaults from MakeDlmSchedule), never on which rows are
// picked.
//
// Two measurements per (batch, policy):
//  * full run (--runs: "B/policy" pairs, "*" = every policy; default every policy at batch 1):
//    the real decoder (DiffuseBatchWithSchedule) over the whole generation: tokens/s =
//    B·gen / wall time;
//  * schedule estimate: the decoder's step sequence is enumerated from the schedule (fixed
//    steps: block b, step i of the block, global step b·spb + i, kind = StepKind) and grouped
//    into cost classes (full; gen-refresh; partial — for prefix per block, since its live rows
//    shrink block by block); each class is timed as the mean of --reps batched forwards of
//    exactly that step (same live rows, selection, logit rows = half a block), after a full
//    step that fills the caches and one untimed call of the class (first-use costs).
//    Estimate = Σ_class count · mean time; tokens/s = B·gen / it. Where both exist, the ratio
//    estimate / run is printed: the check of the estimate.
// Synthetic answer length (--stop-after-blocks, and "B/policy@N" in --runs): random weights never
// produce end-of-text, so a decode that stops early (stop_at_eos: after the block holding the
// first end-of-text, as SPA-Cache's reference generate does at block granularity) is timed by
// forcing end-of-text into block N − 1 (EosInBlockBackend) with stop_at_eos on: the real decoder
// then runs exactly the first N blocks' steps. The estimate reports, from the same class means,
// the time of the first N blocks' steps. The answer is counted as N · block tokens for every
// policy, so against a policy decoded at full length (vanilla, as LLaDA's generate) the
// answer-tokens/s ratio is the time ratio.
// Parallel decoding: with random weights no confidence reaches a threshold, so it is modelled
// as a fixed number of tokens per step (--parallel-steps total steps, e.g. 64 = 4 tokens/step),
// which costs what threshold decoding committing as many tokens per step would.
// Phase times come from CUDA events inside the forward (CudaDlmOptions::profile; --phases=1, the
// default). CUDA graphs are not used while those events are on, so measure --cuda-graphs=1 with
// --phases=0. --cuda-graphs / --fused (fused_row_ops) / --skinny-gemm / --fused-attention set
// those CudaDlmOptions (defaults: on / on / off / on); running the benchmark with 0 and 1
// compares them in one session.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "worker/dlm/cuda_forward.h"
#include "worker/dlm/decoder.h"
#include "worker/testing/eos_in_block_backend.h"
#include "worker/dlm/llada_checkpoint.h"
#include "worker/model_weights.h"

namespace prehoc::dlm {
namespace {

// GSAI-ML/LLaDA-8B-Instruct's config.json (the keys our reader looks at).
constexpr char kLlada8B[] = R"({
  "activation_type": "silu", "alibi": false, "architectures": ["LLaDAModelLM"],
  "attention_layer_norm": false, "block_type": "llama", "d_model": 4096,
  "embedding_size": 126464, "eos_token_id": 126081, "include_bias": false,
  "include_qkv_bias": false, "layer_norm_type": "rms", "layer_norm_with_affine": true,
  "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
  "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": null, "n_heads": 32,
  "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "rms_norm_eps": 1e-05,
  "rope": true, "rope_theta": 500000.0, "scale_logits": false, "vocab_size": 126464,
  "weight_tying": false})";

struct Args {
  std::string backend = "cuda", shape = "llada8b", json;
  std::vector<int> batches = {1, 16};
  std::vector<std::string> policies = {"none", "prefix", "dual", "dllm", "spa",
                                       "spa:kv_all_rows=0"};
  int prompt = 1000, gen = 256, block = 32, steps = 256, parallel_steps = 64;
  // Full decoder runs, "B/policy" (policy "*" = every case), after all estimates.
  std::vector<std::string> runs = {"1/*"};
  int reps = 3;
  int gemm_tune = 0;  // CudaDlmOptions::gemm_tune (opt-in)
  // CudaDlmOptions::profile_kernels: per step class, ms per kernel class (the events add a
  // little time, so the class means of such a run are not the headline numbers).
  int kernel_profile = 0;
  int skinny_gemm = 0;  // CudaDlmOptions::skinny_gemm (opt-in)
  int cuda_graphs = 1;  // CudaDlmOptions::cuda_graphs (only effective with --phases=0)
  int fused = 1;        // CudaDlmOptions::fused_row_ops
  int fused_attention = 1;  // CudaDlmOptions::fused_attention
  int fused_attention_max_rows = 0;  // CudaDlmOptions::fused_attention_max_rows
  int phases = 1;       // CudaDlmOptions::profile
  // Synthetic answer lengths in blocks: the estimate also sums the first N blocks' steps.
  std::vector<int> stop_after_blocks;
};

ModelConfig TinyConfig() {
  ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 300;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000;
  c.is_causal = false;
  c.mask_token_id = 299;
  c.eos_token_ids = {298};  // for the synthetic answer length (@N runs)
  return c;
}

struct Case {
  std::string policy;  // name as given (with overrides)
  std::string cache;
  std::map<std::string, double> overrides;
  int steps = 0;
  bool parallel = false;
  int stop_blocks = 0;  // full runs "B/policy@N": end-of-text forced into block N − 1
};

Case ParseCase(const std::string& spec, int steps) {
  Case c;
  c.policy = spec;
  c.steps = steps;
  std::vector<std::string> parts = absl::StrSplit(spec, ':');
  c.cache = parts[0];
  for (size_t i = 1; i < parts.size(); ++i) {
    std::vector<std::string> kv = absl::StrSplit(parts[i], '=');
    double v = 0;
    if (kv.size() == 2 && absl::SimpleAtod(kv[1], &v)) c.overrides[kv[0]] = v;
  }
  return c;
}

std::vector<DiffuseRequest> Requests(const ModelConfig& cfg, int mask, const Args& a,
                                     const Case& cs, int batch) {
  std::vector<DiffuseRequest> reqs(batch);
  std::mt19937_64 rng(42);
  for (int b = 0; b < batch; ++b) {
    DiffuseRequest& r = reqs[b];
    r.prompt.resize(a.prompt);
    for (int32_t& t : r.prompt) {
      do {
        t = static_cast<int32_t>(rng() % cfg.vocab_size);
      } while (t == mask);
    }
    r.options.gen_length = a.gen;
    r.options.block_length = a.block;
    r.options.steps = cs.steps;
    r.options.cache = cs.cache;
    r.options.cache_overrides = cs.overrides;
  }
  return reqs;
}

nlohmann::json Phases(const ForwardStats& f, double scale) {
  return {{"layer0_s", f.seconds_layer0 * scale}, {"kv_s", f.seconds_kv * scale},
          {"select_s", f.seconds_select * scale}, {"rows_s", f.seconds_rows * scale},
          {"lm_head_s", f.seconds_lm * scale}, {"attention_s", f.seconds_attn * scale}};
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The schedule estimate (see the file comment). Returns the JSON of the case or an error.
absl::StatusOr<nlohmann::json> Estimate(const DlmBackend& model, const Args& a, const Case& cs,
                                        const DlmSchedule& sched,
                                        const std::vector<DiffuseRequest>& reqs) {
  const ModelConfig& cfg = model.config();
  const int NL = cfg.num_hidden_layers;
  const int B = static_cast<int>(reqs.size());
  const int P = a.prompt, L = a.gen, N = P + L;
  const int nb = L / a.block, spb = cs.steps / nb;
  // Cost classes: key = (kind, block for prefix partial steps).
  std::map<std::pair<int, int>, int> count;
  // The same for the first N blocks only (N = --stop-after-blocks).
  std::map<int, std::map<std::pair<int, int>, int>> count_first;
  for (int b = 0; b < nb; ++b) {
    for (int i = 0; i < spb; ++i) {
      const DlmStepKind kind = sched.StepKind(b * spb + i, i);
      const int blk = (kind == DlmStepKind::kPartial && sched.policy == DlmCachePolicy::kPrefix) ? b : 0;
      count[{static_cast<int>(kind), blk}]++;
      for (int n : a.stop_after_blocks) {
        if (b < n) count_first[n][{static_cast<int>(kind), blk}]++;
      }
    }
  }
  std::map<std::pair<int, int>, double> means;
  std::vector<std::unique_ptr<DlmCache>> caches;
  std::vector<std::vector<int32_t>> canvases;
  for (const DiffuseRequest& r : reqs) {
    ASSIGN_OR_RETURN(std::unique_ptr<DlmCache> c, model.NewCache(N));
    caches.push_back(std::move(c));
    std::vector<int32_t> cv = r.prompt;
    cv.insert(cv.end(), L, model.mask_id());
    canvases.push_back(std::move(cv));
  }
  std::vector<int> update(NL);
  for (int l = 0; l < NL; ++l) update[l] = sched.UpdateRows(l, L);
  const bool spa = sched.policy == DlmCachePolicy::kSpa || sched.policy == DlmCachePolicy::kSpaAuto;
  auto run = [&](DlmStepKind kind, int blk, ForwardStats* times) -> absl::StatusOr<double> {
    const int bs = P + blk * a.block, be = bs + a.block;
    DlmStepPlan plan = PlanStep(sched, kind, P, L, 0, bs, be);
    ForwardSpec spec = SpecForPlan(plan, update);
    std::vector<int32_t> logit_rows;
    for (int r = bs; r < bs + std::max(1, a.block / 2); ++r) logit_rows.push_back(r);
    spec.logit_rows = logit_rows;
    spec.store_proxy = spa && kind != DlmStepKind::kPartial;
    spec.proxy_begin = P;
    spec.proxy_end = P + L;
    std::vector<std::vector<int32_t>> top(B);
    std::vector<std::vector<double>> prob(B);
    std::vector<DlmBatchItem> items(B);
    for (int b = 0; b < B; ++b) {
      items[b].cache = caches[b].get();
      items[b].canvas = canvases[b];
      items[b].spec = &spec;
      items[b].top1 = &top[b];
      items[b].top1_prob = &prob[b];
    }
    const double t0 = Now();
    RETURN_IF_ERROR(model.ForwardBatch(items, times));
    return Now() - t0;
  };
  // Fill the caches (and warm up) with one full step.
  ForwardStats scratch;
  ASSIGN_OR_RETURN(double warm, run(DlmStepKind::kFull, 0, &scratch));
  (void)warm;
  double total = 0;
  ForwardStats phases;
  nlohmann::json classes = nlohmann::json::array();
  for (const auto& [key, n] : count) {
    const DlmStepKind kind = static_cast<DlmStepKind>(key.first);
    // Two untimed calls first: the first use of a GEMM shape loads its cuBLAS kernels (CUDA lazy
    // module loading: up to ~0.1 s), which a full run pays once and which would otherwise
    // dominate a 2-sample mean; the second captures the step's CUDA graph (cuda_graphs), which a
    // decode also pays once per step shape.
    ASSIGN_OR_RETURN(double first, run(kind, key.second, &scratch));
    ASSIGN_OR_RETURN(double second, run(kind, key.second, &scratch));
    (void)second;
    const auto* cuda = dynamic_cast<const CudaDlmModel*>(&model);
    if (cuda != nullptr) cuda->TakeKernelProfile();  // drop the fill and first calls
    ForwardStats t;
    double sum = 0;
    for (int r = 0; r < a.reps; ++r) {
      ASSIGN_OR_RETURN(double s, run(kind, key.second, &t));
      sum += s;
    }
    const double mean = sum / a.reps;
    means[key] = mean;
    nlohmann::json kernels = nlohmann::json::object();
    if (cuda != nullptr && a.kernel_profile) {
      int64_t forwards = 0;
      std::vector<std::pair<std::string, double>> prof = cuda->TakeKernelProfile(&forwards);
      double total_ms = 0;
      for (const auto& [name, ms] : prof) total_ms += ms;
      std::printf("    kernels, ms per step (%s block %d; %lld forwards; sum %.3f ms):",
                  DlmStepKindName(kind), key.second, static_cast<long long>(forwards),
                  forwards > 0 ? total_ms / forwards : 0.0);
      for (const auto& [name, ms] : prof) {
        const double per = forwards > 0 ? ms / forwards : 0.0;
        kernels[name] = per;
        std::printf(" %s %.3f", name.c_str(), per);
      }
      std::printf("\n");
    }
    total += n * mean;
    ForwardStats scaled;
    scaled.AddTimes(t);
    scaled.seconds_layer0 *= static_cast<double>(n) / a.reps;
    scaled.seconds_kv *= static_cast<double>(n) / a.reps;
    scaled.seconds_select *= static_cast<double>(n) / a.reps;
    scaled.seconds_rows *= static_cast<double>(n) / a.reps;
    scaled.seconds_lm *= static_cast<double>(n) / a.reps;
    scaled.seconds_attn *= static_cast<double>(n) / a.reps;
    phases.AddTimes(scaled);
    classes.push_back({{"kind", DlmStepKindName(kind)}, {"block", key.second}, {"steps", n},
                       {"mean_s", mean}, {"first_call_s", first}});
    if (!kernels.empty()) classes.back()["kernels_ms"] = kernels;
    std::printf("    class %-11s block %d: %3d steps x %.4f s\n", DlmStepKindName(kind), key.second,
                n, mean);
    std::fflush(stdout);
  }
  nlohmann::json j = {{"seconds", total},
                      {"tokens_per_s", B * L / total},
                      {"classes", classes},
                      {"phases", Phases(phases, 1.0)}};
  for (const auto& [n, cnt] : count_first) {
    double t = 0;
    int steps = 0;
    for (const auto& [key, k] : cnt) t += k * means[key], steps += k;
    const int answer = std::min(n, nb) * a.block;
    j["stop_after_blocks"].push_back({{"blocks", n}, {"steps", steps}, {"seconds", t},
                                      {"answer_tokens", B * answer},
                                      {"answer_tokens_per_s", B * answer / t}});
    std::printf("    first %d blocks (synthetic answer %d tokens): %d steps, %.3f s\n", n, answer,
                steps, t);
  }
  return j;
}

int Main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto eq = arg.find('=');
    std::string key = arg.substr(0, eq), val = eq == std::string::npos ? "" : arg.substr(eq + 1);
    auto ints = [&](std::vector<int>* out) {
      out->clear();
      for (auto part : absl::StrSplit(val, ',')) {
        int v = 0;
        if (!absl::SimpleAtoi(part, &v)) return false;
        out->push_back(v);
      }
      return true;
    };
    auto one = [&](int* out) { return absl::SimpleAtoi(val, out); };
    bool ok = true;
    if (key == "--backend") a.backend = val;
    else if (key == "--shape") a.shape = val;
    else if (key == "--json") a.json = val;
    else if (key == "--batches") ok = ints(&a.batches);
    else if (key == "--policies") a.policies = absl::StrSplit(val, ',');
    else if (key == "--prompt") ok = one(&a.prompt);
    else if (key == "--gen") ok = one(&a.gen);
    else if (key == "--block") ok = one(&a.block);
    else if (key == "--steps") ok = one(&a.steps);
    else if (key == "--parallel-steps") ok = one(&a.parallel_steps);
    else if (key == "--runs") a.runs = absl::StrSplit(val, ',', absl::SkipEmpty());
    else if (key == "--reps") ok = one(&a.reps);
    else if (key == "--gemm-tune") ok = one(&a.gemm_tune);
    else if (key == "--kernel-profile") ok = one(&a.kernel_profile);
    else if (key == "--skinny-gemm") ok = one(&a.skinny_gemm);
    else if (key == "--cuda-graphs") ok = one(&a.cuda_graphs);
    else if (key == "--phases") ok = one(&a.phases);
    else if (key == "--fused") ok = one(&a.fused);
    else if (key == "--fused-attention") ok = one(&a.fused_attention);
    else if (key == "--fused-attention-max-rows") ok = one(&a.fused_attention_max_rows);
    else if (key == "--stop-after-blocks") ok = ints(&a.stop_after_blocks);
    else ok = false;
    if (!ok) {
      std::fprintf(stderr, "dlm_bench: bad argument '%s' (see the file comment)\n", arg.c_str());
      return 2;
    }
  }
  ModelConfig cfg;
  if (a.shape == "llada8b") {
    auto c = ParseLladaConfig(kLlada8B);
    if (!c.ok()) {
      std::fprintf(stderr, "LLaDA config: %s\n", c.status().ToString().c_str());
      return 1;
    }
    cfg = *c;
  } else {
    cfg = TinyConfig();
  }
  std::unique_ptr<DlmBackend> model;
  std::string device = "cpu";
  if (a.backend == "cuda") {
    CudaDlmOptions o;
    o.random_config = cfg;
    o.profile = a.phases != 0;
    o.skinny_gemm = a.skinny_gemm != 0;
    o.cuda_graphs = a.cuda_graphs != 0;
    o.fused_row_ops = a.fused != 0;
    o.fused_attention = a.fused_attention != 0;
    o.fused_attention_max_rows = a.fused_attention_max_rows;
    o.gemm_tune = a.gemm_tune != 0;
    o.profile_kernels = a.kernel_profile != 0;
    auto m = CudaDlmModel::Create(o);
    if (!m.ok()) {
      std::fprintf(stderr, "CudaDlmModel: %s\n", m.status().ToString().c_str());
      return 1;
    }
    device = (*m)->device_name();
    model = std::move(*m);
  } else {
    DlmModelOptions o;
    o.weights = ModelWeights::Random(cfg, 1);
    o.num_threads = 2;
    auto m = DlmModel::Create(o);
    if (!m.ok()) {
      std::fprintf(stderr, "DlmModel: %s\n", m.status().ToString().c_str());
      return 1;
    }
    model = std::move(*m);
  }
  std::printf("dlm_bench: %s, layers %d, hidden %d, heads %d/%d x %d, mlp %d, vocab %d, proxy rank "
              "%d; prompt %d gen %d block %d steps %d (parallel: %d)\n",
              model->backend_name().c_str(), cfg.num_hidden_layers, cfg.hidden_size,
              cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
              cfg.intermediate_size, cfg.vocab_size, model->proxy_rank(), a.prompt, a.gen,
              a.block, a.steps, a.parallel_steps);
  std::fflush(stdout);

  std::vector<Case> cases;
  for (const std::string& p : a.policies) cases.push_back(ParseCase(p, a.steps));
  if (a.parallel_steps > 0) {
    for (const std::string p : {"none", "dual", "spa"}) {
      Case c = ParseCase(p, a.parallel_steps);
      c.policy = p + "+parallel";
      c.parallel = true;
      cases.push_back(c);
    }
  }
  nlohmann::json out = {{"device", device},
                        {"backend", model->backend_name()},
                        {"shape", a.shape},
                        {"config",
                         {{"layers", cfg.num_hidden_layers}, {"hidden", cfg.hidden_size},
                          {"heads", cfg.num_attention_heads}, {"kv_heads", cfg.num_key_value_heads},
                          {"head_dim", cfg.head_dim}, {"mlp", cfg.intermediate_size},
                          {"vocab", cfg.vocab_size}, {"proxy_rank", model->proxy_rank()}}},
                        {"prompt", a.prompt}, {"gen", a.gen}, {"block", a.block},
                        {"steps", a.steps}, {"parallel_steps", a.parallel_steps},
                        {"gemm_tune", a.gemm_tune}, {"kernel_profile", a.kernel_profile},
                        {"skinny_gemm", a.skinny_gemm}, {"cuda_graphs", a.cuda_graphs},
                        {"fused_row_ops", a.fused}, {"phases", a.phases},
                        {"fused_attention", a.fused_attention},
                        {"fused_attention_max_rows", a.fused_attention_max_rows},
                        {"results", nlohmann::json::array()}};
  auto save = [&] {
    if (a.json.empty()) return;
    std::ofstream f(a.json);
    f << out.dump(1) << "\n";
  };
  // Phase 1: the schedule estimate of every case at every batch size (the primary numbers);
  // phase 2: full decoder runs at batch --full-runs (the check of the estimate). Results are
  // printed and saved after every case, so a time limit loses only what did not run.
  std::map<std::pair<int, std::string>, size_t> index;  // (batch, policy) → results entry
  std::map<int, std::map<std::string, double>> est_tps, run_tps;
  auto table = [&](int B, const char* what, const std::map<std::string, double>& tps) {
    if (tps.empty()) return;
    const double base = tps.count("none") ? tps.at("none") : 0;
    std::printf("B=%d %s tokens/s (speedup vs vanilla):\n", B, what);
    for (const auto& [p, v] : tps) {
      // "policy@N": answer tokens/s; vanilla decoded at full length produces the same answer
      // tokens, so its answer tokens/s is its tokens/s · N · block / gen (the time ratio).
      double scale = 1;
      if (const size_t at = p.find('@'); at != std::string::npos) {
        scale = std::atof(p.c_str() + at + 1) * a.block / a.gen;
      }
      std::printf("  %-22s %10.1f  %6.2fx\n", p.c_str(), v, base > 0 ? v / (base * scale) : 0.0);
    }
    std::fflush(stdout);
  };
  for (int B : a.batches) {
    for (const Case& cs : cases) {
      nlohmann::json r = {{"batch", B}, {"policy", cs.policy}, {"steps", cs.steps}};
      auto sched = MakeDlmSchedule(cfg, cs.cache, cs.overrides);
      if (!sched.ok()) {
        std::printf("B=%d %s: schedule error %s\n", B, cs.policy.c_str(),
                    sched.status().ToString().c_str());
        continue;
      }
      r["schedule"] = {{"r_full", sched->r_full}, {"r_gen", sched->r_gen},
                       {"prompt_refresh", sched->prompt_refresh},
                       {"gen_refresh", sched->gen_refresh}, {"dllm_ratio", sched->dllm_ratio},
                       {"kv_all_rows", sched->kv_all_rows}, {"min_rows", sched->min_rows},
                       {"rho", sched->rho}};
      std::vector<DiffuseRequest> reqs = Requests(cfg, model->mask_id(), a, cs, B);
      std::printf("B=%d %s:\n", B, cs.policy.c_str());
      std::fflush(stdout);
      auto est = Estimate(*model, a, cs, *sched, reqs);
      if (est.ok()) {
        r["estimate"] = *est;
        est_tps[B][cs.policy] = (*est)["tokens_per_s"];
        std::printf("  estimate: %.3f s, %.1f tokens/s; phases %s\n",
                    (*est)["seconds"].get<double>(), (*est)["tokens_per_s"].get<double>(),
                    (*est)["phases"].dump().c_str());
      } else {
        r["estimate_error"] = est.status().ToString();
        std::printf("  estimate failed: %s\n", est.status().ToString().c_str());
      }
      index[{B, cs.policy}] = out["results"].size();
      out["results"].push_back(r);
      save();
      std::fflush(stdout);
    }
    table(B, "estimate", est_tps[B]);
  }
  std::vector<std::pair<int, Case>> runs;
  for (const std::string& spec : a.runs) {
    const size_t slash = spec.find('/');
    int rb = 0;
    if (slash == std::string::npos || !absl::SimpleAtoi(spec.substr(0, slash), &rb) || rb <= 0) {
      std::fprintf(stderr, "dlm_bench: bad --runs entry '%s' (B/policy)\n", spec.c_str());
      return 2;
    }
    std::string pol = spec.substr(slash + 1);
    int stop = 0;
    if (const size_t at = pol.find('@'); at != std::string::npos) {
      if (!absl::SimpleAtoi(pol.substr(at + 1), &stop) || stop <= 0 || stop > a.gen / a.block) {
        std::fprintf(stderr, "dlm_bench: bad --runs entry '%s' (@N: 1..blocks)\n", spec.c_str());
        return 2;
      }
      pol = pol.substr(0, at);
    }
    for (Case cs : cases) {
      if (pol != "*" && pol != cs.policy) continue;
      cs.stop_blocks = stop;
      runs.push_back({rb, cs});
    }
  }
  for (const auto& [B, cs] : runs) {
    auto sched = MakeDlmSchedule(cfg, cs.cache, cs.overrides);
    if (!sched.ok()) continue;
    std::vector<DiffuseRequest> reqs = Requests(cfg, model->mask_id(), a, cs, B);
    const std::string name =
        cs.stop_blocks > 0 ? cs.policy + "@" + std::to_string(cs.stop_blocks) : cs.policy;
    // The estimate of the base policy (for the @N runs: its first-N-blocks sum).
    nlohmann::json est_seconds;
    if (index.count({B, cs.policy})) {
      const nlohmann::json& base = out["results"][index[{B, cs.policy}]];
      if (base.contains("estimate")) {
        const nlohmann::json& e = base["estimate"];
        if (cs.stop_blocks == 0) {
          est_seconds = e["seconds"];
        } else if (e.contains("stop_after_blocks")) {
          for (const auto& sb : e["stop_after_blocks"]) {
            if (sb["blocks"] == cs.stop_blocks) est_seconds = sb["seconds"];
          }
        }
      }
    }
    if (!index.count({B, name})) {
      index[{B, name}] = out["results"].size();
      out["results"].push_back({{"batch", B}, {"policy", name}, {"steps", cs.steps}});
    }
    nlohmann::json& r = out["results"][index[{B, name}]];
    std::printf("B=%d %s full run:\n", B, name.c_str());
    std::fflush(stdout);
    absl::StatusOr<std::vector<DiffuseResult>> res;
    int answer = a.gen;  // tokens per request counted in tokens/s
    if (cs.stop_blocks > 0) {
      const int b0 = a.prompt + (cs.stop_blocks - 1) * a.block;
      EosInBlockBackend eos(*model, b0, b0 + a.block);
      for (DiffuseRequest& q : reqs) q.options.stop_at_eos = true;
      res = DiffuseBatchWithSchedule(eos, reqs, *sched);
      answer = cs.stop_blocks * a.block;
    } else {
      res = DiffuseBatchWithSchedule(*model, reqs, *sched);
    }
    if (res.ok()) {
      const DlmRunStats& st = (*res)[0].stats;
      const double tps = B * answer / st.seconds;
      run_tps[B][name] = tps;
      nlohmann::json rows = nlohmann::json::array();
      for (double v : st.rows_per_step) rows.push_back(v);
      r["run"] = {{"seconds", st.seconds}, {"tokens_per_s", tps}, {"steps", st.steps},
                  {"full_steps", st.full_steps}, {"gen_refresh_steps", st.gen_refresh_steps},
                  {"partial_steps", st.partial_steps}, {"rows_per_step", rows},
                  {"phases", Phases(st.forward, 1.0)}, {"blocks", st.blocks},
                  {"answer_tokens", B * answer}, {"finish_reason", (*res)[0].finish_reason}};
      std::printf("  %.3f s, %.1f tokens/s (%d steps: %d full, %d gen-refresh, %d partial); "
                  "phases s: layer0 %.3f kv %.3f select %.3f rows %.3f (attention %.3f) lm %.3f\n",
                  st.seconds, tps, st.steps, st.full_steps, st.gen_refresh_steps,
                  st.partial_steps, st.forward.seconds_layer0, st.forward.seconds_kv,
                  st.forward.seconds_select, st.forward.seconds_rows, st.forward.seconds_attn,
                  st.forward.seconds_lm);
      if (!est_seconds.is_null()) {
        const double ratio = est_seconds.get<double>() / st.seconds;
        r["estimate_over_run"] = ratio;
        std::printf("  estimate / run time: %.3f\n", ratio);
      }
    } else {
      r["run_error"] = res.status().ToString();
      std::printf("  full run failed: %s\n", res.status().ToString().c_str());
    }
    save();
    std::fflush(stdout);
  }
  for (int b : a.batches) table(b, "estimate", est_tps[b]);
  for (const auto& [b, tps] : run_tps) table(b, "full run", tps);
  if (const auto* cm = dynamic_cast<const CudaDlmModel*>(model.get())) {
    out["gemm_tuning"] = cm->gemm_tuning_summary();
    out["graphs"] = cm->graph_summary();
    std::printf("gemm tuning: %s\n%s\n", cm->gemm_tuning_summary().c_str(),
                cm->graph_summary().c_str());
  }
  save();
  return 0;
}

}  // namespace
}  // namespace prehoc::dlm

int main(int argc, char** argv) { return prehoc::dlm::Main(argc, argv); }
