// End-to-end greedy decode on the GPU (worker/backends/cuda CudaModel) with random weights: the
// real architecture and cost per token (LLaMA-2-7B shape by default), dense attention and
// sparse attention over token index lists, against the roofline measured in the same run.
//
//   decode_bench [--layers=32] [--hidden=4096] [--heads=32] [--kv-heads=32] [--head-dim=128]
//                [--ffn=11008] [--vocab=32000] [--batch=16] [--ctx=4096] [--steps=32]
//                [--warmup=4] [--keep=8] [--modes=dense,random,streaming] [--json=PATH]
//                (modes: dense random streaming prhs prhs-budget-matched oracle streaming-plan
//                 quest h2o hshare step-logits-greedy step-device-greedy step-logits-sample
//                 step-device-sample)
//                [--gemm=autotune|default] [--model=DIR --prompt-file=PATH]
//                [--overrides=k=v,k=v]   (selection-plan overrides of the prhs modes, e.g.
//                                         tau=-1,max_reuse=9: the gate shares 9 steps of 10)
//
// --model: a trained Hugging Face model instead of random weights (the shape flags are then
// ignored); each sequence is prefilled on the GPU with the first --ctx bytes of --prompt-file
// (byte tokenizer, BOS first; the file repeats if shorter), so attention and the PrHS gate
// see real text.
//
// Method: the model's sequences are grown to --ctx positions without computing them (their K/V
// are uniform(-1, 1) bf16: the same bytes as real ones), then for each mode --warmup untimed and
// --steps timed greedy decode steps run back to back (DecodeGreedyAsync: tokens stay on the GPU,
// the host enqueues ahead). CUDA events between steps; ms/step is the median, tokens/s =
// batch x steps / total time. Roofline per step = (weight bytes: every layer's matrices + the LM
// head, bf16) + (KV bytes read: Σ over sequences of attended tokens x layers x 2 x Hkv x hd x 2 B)
// divided by the device-to-device copy bandwidth measured first in the same process (2 GiB,
// bytes read + written, median of 20). Activation traffic is not counted (≤ 0.1 % here).
// Sparse modes: one CSR token list per (sequence, kv head), shared by every layer, over the
// positions that exist when the mode starts (the tokens decoded during the mode are not added):
//   random    — one random token out of every --keep (stratified, as attention_bench);
//   streaming — the first 64 tokens (sinks) and the most recent ones, ceil(len / keep) in all.
// The lists are built once before timing: the selection cost (scoring, top-k, list building) is
// NOT included in the sparse numbers of those two modes.
//   prhs / prhs-budget-matched — end-to-end PrHS decode on the device (CudaModel's PrHS path,
//             plan of `prehoc generate --policy=...` at budget 1/--keep): per step and layer the
//             CIS gate, exact refresh scoring + top-k + dilation + δ of the gated rows, the CSR
//             lists and token-sparse attention, all inside the timed steps (real gate, no
//             imposed refresh rate). Reported with the realised refresh rate (refreshes /
//             gated selections over the timed steps), the mean kept fraction and mean δ. With
//             random weights and K/V the attention is random, so the gate's refresh rate is
//             whatever random queries give (reported, not chosen). Their roofline counts the
//             kept K/V plus the K of every refreshed row's whole context.
//   oracle / streaming-plan / quest — the baselines on the same device path (plans of
//             --policy=oracle / streaming / quest at budget 1/--keep): the oracle's exact top-k
//             over every key of every row at every step (a refresh per selection),
//             StreamingLLM's sink + window lists built per step and layer, Quest's page bounds
//             (updated for the new token's page), page scores and top pages every step (a
//             refresh per selection; its roofline counts the kept K/V plus the bounds, 1/8 of
//             the K bytes); selection inside the timed steps as for prhs.
//   h2o     — H2O (--policy=h2o at budget 1/--keep) on the same path: per step and layer the
//             heavy-hitter select and eviction (the first, warm-up, step scores every key), the
//             lists, the sparse attention, then the accumulation of the kept tokens' attention
//             probabilities (which re-reads the list's K: its roofline counts the kept K/V plus
//             the kept K once more).
//   hshare  — HShare (--policy=hshare at budget 1/--keep): channels and the cross-head /
//             cross-layer sharing map calibrated at the first (warm-up) step (exact top-k on
//             the device, overlap map on the host), then per step the approximate scores over
//             the calibrated channels of every key for the representative units every
//             refresh_interval steps, their top-k, the sharers' copies, the lists and the sparse
//             attention (its roofline counts the whole K row of every scored key: the channel
//             gathers touch most of each row's sectors).
// Step modes — the serving path's synchronous step (host tokens in, a token per sequence out,
// as the Scheduler runs it), timed on the host clock per step (median; tokens/s from the total),
// so the host's share is included:
//   step-logits-greedy / step-logits-sample — CudaModel::Step: the batch x vocab f32 logits are
//             copied to the host, which takes the argmax / samples with Sampler (temperature
//             0.8, top-p 0.95, one seeded Sampler per sequence);
//   step-device-greedy / step-device-sample — CudaModel::StepSample with the same draws
//             (Sampler::NextDraw): the device argmax / SampleRows, only the ids come back.
// Each mode runs on its own; a failing mode is reported and the others still run. Results are
// printed and (with --json) written after every mode.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <fstream>
#include <functional>
#include <map>

#include "absl/strings/str_cat.h"
#include "bench/bench_kernels.h"
#include "cachemgr/selection_plan.h"
#include "worker/backends/cuda/cuda_model.h"
#include "worker/kernels/paged_decode.h"
#include "worker/sampler.h"
#include "worker/tokenizer.h"

namespace prehoc::bench {
namespace {

#define CHECK_CUDA(expr)                                                                      \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,               \
                   cudaGetErrorString(err_));                                                 \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

#define CHECK_OK(expr)                                                                  \
  do {                                                                                  \
    absl::Status st_ = (expr);                                                          \
    if (!st_.ok()) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,         \
                   st_.ToString().c_str());                                             \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

struct Options {
  int layers = 32, hidden = 4096, heads = 32, kv_heads = 32, head_dim = 128, ffn = 11008;
  int vocab = 32000, batch = 16, ctx = 4096, steps = 32, warmup = 4, keep = 8;
  std::vector<std::string> modes{"dense", "random", "streaming"};
  std::string json;
  bool gemm_autotune = true;
  std::string model_dir, prompt_file;
  std::map<std::string, double> overrides;  // selection-plan overrides (prhs modes)
  std::string overrides_text;
};

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "bad argument '%s' (use --name=value)\n", a.c_str());
      std::exit(2);
    }
    const std::string k = a.substr(2, eq - 2), v = a.substr(eq + 1);
    int* ints[] = {&o.layers, &o.hidden, &o.heads, &o.kv_heads, &o.head_dim, &o.ffn,
                   &o.vocab, &o.batch, &o.ctx, &o.steps, &o.warmup, &o.keep};
    const char* names[] = {"layers", "hidden", "heads", "kv-heads", "head-dim", "ffn",
                           "vocab", "batch", "ctx", "steps", "warmup", "keep"};
    bool found = false;
    for (int j = 0; j < 12; ++j) {
      if (k == names[j]) {
        *ints[j] = std::atoi(v.c_str());
        found = true;
      }
    }
    if (k == "modes") {
      o.modes.clear();
      std::stringstream ss(v);
      std::string m;
      while (std::getline(ss, m, ',')) o.modes.push_back(m);
      found = true;
    } else if (k == "json") {
      o.json = v;
      found = true;
    } else if (k == "gemm") {
      o.gemm_autotune = v != "default";
      found = true;
    } else if (k == "model") {
      o.model_dir = v;
      found = true;
    } else if (k == "prompt-file") {
      o.prompt_file = v;
      found = true;
    } else if (k == "overrides") {
      o.overrides_text = v;
      auto parsed = ParseOverrides(v);
      if (!parsed.ok()) {
        std::fprintf(stderr, "--overrides: %s\n", parsed.status().ToString().c_str());
        std::exit(2);
      }
      o.overrides = *parsed;
      found = true;
    }
    if (!found) {
      std::fprintf(stderr, "unknown option --%s\n", k.c_str());
      std::exit(2);
    }
  }
  return o;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double CopyBandwidthGBs() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  CHECK_CUDA(cudaMemset(b, 2, bytes));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<double> us;
  for (int i = 0; i < 23; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    CHECK_CUDA(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 3) us.push_back(ms * 1e3);
  }
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return 2.0 * bytes / Median(us) / 1e3;
}

struct Record {
  std::string mode;
  int batch = 0, ctx_start = 0, ctx_end = 0, keep = 1, steps = 0, list_len = 0;
  double ms_median = 0, ms_mean = 0, tokens_per_s = 0;
  double weight_bytes = 0, kv_bytes = 0, roofline_ms = 0, roofline_fraction = 0;
  bool selection_included = false;
  // PrHS modes (timed steps only): refreshes / gated selections, mean kept fraction, mean δ.
  double refresh_rate = -1, kept_fraction = -1, mean_delta = -1;
};

#define RET_CUDA(expr)                                                                \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    if (err_ != cudaSuccess) {                                                        \
      return absl::InternalError(absl::StrCat(#expr, ": ", cudaGetErrorString(err_))); \
    }                                                                                 \
  } while (0)
#define RET_OK(expr)                 \
  do {                               \
    absl::Status st_ = (expr);       \
    if (!st_.ok()) return st_;       \
  } while (0)

void PrintAndWrite(const Options& o, const cudaDeviceProp& prop, double copy_gbs, int page,
                   const std::vector<Record>& records) {
  std::printf("\n%-20s %5s %11s %5s %8s %9s %9s %10s %9s %9s %11s %8s %8s %7s %7s\n", "mode",
              "batch", "ctx", "keep", "list", "ms/step", "ms(mean)", "tokens/s", "GB/step",
              "roof ms", "% roofline", "vs dense", "refresh", "kept", "delta");
  double dense_tps = 0;
  for (const Record& r : records) {
    if (r.mode == "dense") dense_tps = r.tokens_per_s;
  }
  for (const Record& r : records) {
    char ctx[32];
    std::snprintf(ctx, sizeof(ctx), "%d-%d", r.ctx_start, r.ctx_end);
    std::printf("%-20s %5d %11s %5d %8d %9.3f %9.3f %10.1f %9.2f %9.3f %10.1f%% %7.2fx %8.3f "
                "%7.3f %7.4f\n",
                r.mode.c_str(), r.batch, ctx, r.keep, r.list_len, r.ms_median, r.ms_mean,
                r.tokens_per_s, (r.weight_bytes + r.kv_bytes) / 1e9, r.roofline_ms,
                100 * r.roofline_fraction, dense_tps > 0 ? r.tokens_per_s / dense_tps : 0.0,
                r.refresh_rate, r.kept_fraction, r.mean_delta);
  }
  std::fflush(stdout);
  if (o.json.empty()) return;
  FILE* f = std::fopen(o.json.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot write %s\n", o.json.c_str());
    return;
  }
  std::fprintf(f,
               "{\"device\": \"%s\", \"copy_gbs\": %.1f, \"model\": \"%s\", \"config\": "
               "{\"layers\": %d, \"hidden\": %d, \"heads\": %d, \"kv_heads\": %d, \"head_dim\": "
               "%d, \"ffn\": %d, \"vocab\": %d, \"dtype\": \"bf16\", \"page_size\": %d, \"gemm\": "
               "\"%s\"}, \"overrides\": \"%s\", \"records\": [\n",
               prop.name, copy_gbs, o.model_dir.empty() ? "random" : o.model_dir.c_str(),
               o.layers, o.hidden, o.heads, o.kv_heads, o.head_dim, o.ffn, o.vocab, page,
               o.gemm_autotune ? "autotune" : "default", o.overrides_text.c_str());
  for (size_t i = 0; i < records.size(); ++i) {
    const Record& r = records[i];
    std::fprintf(f,
                 "  {\"mode\": \"%s\", \"batch\": %d, \"ctx_start\": %d, \"ctx_end\": %d, "
                 "\"keep\": %d, \"list_len\": %d, \"steps\": %d, \"ms_per_step_median\": %.4f, "
                 "\"ms_per_step_mean\": %.4f, \"tokens_per_s\": %.1f, \"weight_bytes\": %.0f, "
                 "\"kv_bytes_per_step\": %.0f, \"roofline_ms\": %.4f, "
                 "\"roofline_fraction\": %.4f, \"vs_dense\": %.3f, \"selection_included\": %s, "
                 "\"refresh_rate\": %.4f, \"kept_fraction\": %.4f, \"mean_delta\": %.5f}%s\n",
                 r.mode.c_str(), r.batch, r.ctx_start, r.ctx_end, r.keep, r.list_len, r.steps,
                 r.ms_median, r.ms_mean, r.tokens_per_s, r.weight_bytes, r.kv_bytes,
                 r.roofline_ms, r.roofline_fraction,
                 dense_tps > 0 ? r.tokens_per_s / dense_tps : 0.0,
                 r.selection_included ? "true" : "false", r.refresh_rate, r.kept_fraction,
                 r.mean_delta, i + 1 < records.size() ? "," : "");
  }
  std::fprintf(f, "]}\n");
  std::fclose(f);
}

int Main(int argc, char** argv) {
  Options o = ParseArgs(argc, argv);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "decode_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double copy_gbs = CopyBandwidthGBs();
  std::printf("device: %s (%d SMs); device-to-device copy: %.1f GB/s (read + write)\n", prop.name,
              prop.multiProcessorCount, copy_gbs);

  const int total_steps = static_cast<int>(o.modes.size()) * (o.warmup + o.steps);
  const int max_len = o.ctx + total_steps + 16;
  const int page = 16;
  CudaModelOptions mo;
  mo.page_size = page;
  mo.gemm_autotune = o.gemm_autotune;
  ModelConfig cfg;
  if (!o.model_dir.empty()) {
    auto loaded = LoadModelConfig(o.model_dir);
    if (!loaded.ok()) {
      std::fprintf(stderr, "decode_bench: %s\n", loaded.status().ToString().c_str());
      return 1;
    }
    cfg = *loaded;
    if (max_len > cfg.max_position_embeddings) {
      std::fprintf(stderr, "decode_bench: ctx + steps = %d exceeds the model's context %d\n",
                   max_len, cfg.max_position_embeddings);
      return 2;
    }
    mo.model_dir = o.model_dir;
    o.layers = cfg.num_hidden_layers;
    o.hidden = cfg.hidden_size;
    o.heads = cfg.num_attention_heads;
    o.kv_heads = cfg.num_key_value_heads;
    o.head_dim = cfg.head_dim;
    o.ffn = cfg.intermediate_size;
    o.vocab = cfg.vocab_size;
  } else {
    cfg.architecture = "LlamaForCausalLM";
    cfg.model_type = "llama";
    cfg.vocab_size = o.vocab;
    cfg.hidden_size = o.hidden;
    cfg.intermediate_size = o.ffn;
    cfg.num_hidden_layers = o.layers;
    cfg.num_attention_heads = o.heads;
    cfg.num_key_value_heads = o.kv_heads;
    cfg.head_dim = o.head_dim;
    cfg.max_position_embeddings = max_len;
    cfg.rms_norm_eps = 1e-5;
    mo.random_config = cfg;
    mo.random_seed = 7;
  }
  mo.max_context = max_len;
  const int64_t page_bytes = int64_t{2} * o.layers * o.kv_heads * page * o.head_dim * 2;
  mo.kv_cache_bytes = static_cast<int64_t>(o.batch) * ((max_len + page - 1) / page) * page_bytes;
  auto created = CudaModel::Create(mo);
  if (!created.ok()) {
    std::fprintf(stderr, "decode_bench: %s\n", created.status().ToString().c_str());
    return 1;
  }
  CudaModel& model = **created;
  std::printf("model: %s layers=%d hidden=%d heads=%d kv_heads=%d head_dim=%d ffn=%d vocab=%d; "
              "weights streamed per step %.2f GB; KV %.1f KB/token; pool %.2f GB; gemm %s\n",
              o.model_dir.empty() ? "random" : o.model_dir.c_str(), o.layers, o.hidden, o.heads,
              o.kv_heads, o.head_dim, o.ffn, o.vocab, model.weight_bytes() / 1e9,
              model.kv_bytes_per_token() / 1e3,
              static_cast<double>(model.num_pages()) * page_bytes / 1e9,
              o.gemm_autotune ? "autotune" : "default");

  std::vector<CudaModel::SeqId> seqs(o.batch);
  for (auto& s : seqs) s = model.CreateSequence();
  std::vector<int32_t> first_tokens(o.batch);
  if (!o.model_dir.empty()) {
    // Prefill every sequence with the prompt, in chunks of 2048 positions for all sequences.
    std::ifstream in(o.prompt_file);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string text = ss.str();
    if (text.empty()) {
      std::fprintf(stderr, "decode_bench: --prompt-file '%s' is empty or unreadable\n",
                   o.prompt_file.c_str());
      return 2;
    }
    while (static_cast<int>(text.size()) < o.ctx) text += text;
    auto tok = Tokenizer::LoadFromModelDir(o.model_dir, cfg.vocab_size);
    if (!tok.ok() || *tok == nullptr) {
      std::fprintf(stderr, "decode_bench: the model has no usable byte tokenizer\n");
      return 1;
    }
    std::vector<int32_t> prompt = (*tok)->Encode(text, /*add_bos=*/true);
    prompt.resize(o.ctx);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<int32_t> greedy;
    for (int off = 0; off < o.ctx; off += 2048) {
      const int n = std::min(2048, o.ctx - off);
      std::vector<CudaModel::StepItem> items;
      for (auto s : seqs) items.push_back({s, {prompt.data() + off, static_cast<size_t>(n)}});
      auto st = model.Step(items, true, &greedy);
      if (!st.ok()) {
        std::fprintf(stderr, "decode_bench: prefill: %s\n", st.status().ToString().c_str());
        return 1;
      }
    }
    first_tokens = greedy;
    std::printf("prefill: %d sequences x %d tokens of %s in %.2f s\n", o.batch, o.ctx,
                o.prompt_file.c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  } else {
    for (auto s : seqs) CHECK_OK(model.AppendUninitialized(s, o.ctx));
    CHECK_OK(model.FillKvRandom(11));
    std::mt19937 rng(3);
    for (int32_t& x : first_tokens) x = static_cast<int32_t>(rng() % o.vocab);
  }

  int32_t *d_a = nullptr, *d_b = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_a), o.batch * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_b), o.batch * sizeof(int32_t)));
  CHECK_CUDA(cudaMemcpy(d_a, first_tokens.data(), first_tokens.size() * 4, cudaMemcpyHostToDevice));

  std::vector<Record> records;
  const int rows = o.batch * o.kv_heads;
  // One mode: lists (random / streaming, before timing) or plans (PrHS), warm-up, timed steps.
  auto run_mode = [&](const std::string& mode) -> absl::StatusOr<Record> {
    const int len0 = *model.SequenceLength(seqs[0]);
    // Modes decoded through CudaModel's plans (selection on the device inside the timed steps).
    const bool prhs = mode == "prhs" || mode == "prhs-budget-matched" || mode == "oracle" ||
                      mode == "streaming-plan" || mode == "quest" || mode == "h2o" ||
                      mode == "hshare";
    const bool step_mode = mode.rfind("step-", 0) == 0;
    if (step_mode && mode != "step-logits-greedy" && mode != "step-logits-sample" &&
        mode != "step-device-greedy" && mode != "step-device-sample") {
      return absl::InvalidArgumentError(absl::StrCat("unknown mode '", mode, "'"));
    }
    if (step_mode) {
      // Synchronous steps with host tokens; the first tokens are the device-side ones.
      std::vector<int32_t> cur(o.batch);
      RET_CUDA(cudaMemcpy(cur.data(), d_a, o.batch * 4, cudaMemcpyDeviceToHost));
      const bool greedy = mode.find("greedy") != std::string::npos;
      const bool on_device = mode.find("device") != std::string::npos;
      SamplingOptions so;
      if (!greedy) {
        so.temperature = 0.8f;
        so.top_p = 0.95f;
      }
      std::vector<Sampler> samplers;
      for (int b = 0; b < o.batch; ++b) {
        so.seed = 1000 + b;
        samplers.emplace_back(so);
      }
      auto one_step = [&]() -> absl::Status {
        std::vector<CudaModel::StepItem> items(o.batch);
        for (int b = 0; b < o.batch; ++b) {
          items[b].seq = seqs[b];
          items[b].tokens = std::span<const int32_t>(&cur[b], 1);
        }
        if (on_device) {
          std::vector<TokenDraw> draws(o.batch);
          for (int b = 0; b < o.batch; ++b) draws[b] = samplers[b].NextDraw();
          absl::StatusOr<std::vector<int32_t>> ids = model.StepSample(items, draws);
          if (!ids.ok()) return ids.status();
          cur = *ids;
        } else {
          absl::StatusOr<std::vector<std::vector<float>>> l = model.Step(items);
          if (!l.ok()) return l.status();
          for (int b = 0; b < o.batch; ++b) cur[b] = samplers[b].Sample((*l)[b]);
        }
        return absl::OkStatus();
      };
      for (int i = 0; i < o.warmup; ++i) RET_OK(one_step());
      const int ctx_start = *model.SequenceLength(seqs[0]) + 1;
      std::vector<double> ms(o.steps);
      const auto t_all = std::chrono::steady_clock::now();
      for (int i = 0; i < o.steps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        RET_OK(one_step());
        ms[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count();
      }
      const double total_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_all)
              .count();
      for (int32_t t : cur) {
        if (t < 0 || t >= o.vocab) {
          return absl::InternalError(absl::StrCat("step produced token ", t));
        }
      }
      RET_CUDA(cudaMemcpy(d_a, cur.data(), o.batch * 4, cudaMemcpyHostToDevice));
      Record r;
      r.mode = mode;
      r.batch = o.batch;
      r.ctx_start = ctx_start;
      r.ctx_end = ctx_start + o.steps - 1;
      r.steps = o.steps;
      r.ms_median = Median(ms);
      r.ms_mean = total_ms / o.steps;
      r.tokens_per_s = o.batch * o.steps / (total_ms / 1e3);
      r.weight_bytes = static_cast<double>(model.weight_bytes());
      r.kv_bytes = o.batch * 0.5 * (r.ctx_start + r.ctx_end) *
                   static_cast<double>(model.kv_bytes_per_token());
      r.roofline_ms = (r.weight_bytes + r.kv_bytes) / (copy_gbs * 1e9) * 1e3;
      r.roofline_fraction = r.roofline_ms / r.ms_mean;
      return r;
    }
    int32_t *d_indptr = nullptr, *d_indices = nullptr, *d_counts = nullptr;
    uint8_t* d_mask = nullptr;
    struct Freer {
      std::vector<void*> p;
      ~Freer() {
        for (void* x : p) cudaFree(x);
      }
    } freer;
    CudaKvSelection sel;
    int list_len = 0;
    std::vector<SelectionPlan> plans;
    std::vector<SelectionTelemetry> tel(o.batch);
    std::vector<const SelectionPlan*> plan_ptrs;
    std::vector<SelectionTelemetry*> tel_ptrs;
    if (prhs) {
      SparsityOptions so;
      so.policy = mode == "streaming-plan" ? "streaming" : mode;
      so.budget = 1.0 / o.keep;
      auto plan = MakeSelectionPlan(cfg, so, o.overrides);
      if (!plan.ok()) return plan.status();
      RET_OK(CudaModel::SupportsPlan(cfg, page, *plan));
      plans.assign(o.batch, *plan);
      for (int b = 0; b < o.batch; ++b) {
        tel[b].refreshes_per_layer.assign(o.layers, 0);
        tel[b].shares_per_layer.assign(o.layers, 0);
        plan_ptrs.push_back(&plans[b]);
        tel_ptrs.push_back(&tel[b]);
      }
    } else if (mode != "dense") {
      list_len = (len0 + o.keep - 1) / o.keep;
      RET_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_indptr), (rows + 1) * sizeof(int32_t)));
      freer.p.push_back(d_indptr);
      RET_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_indices),
                          static_cast<size_t>(rows) * list_len * sizeof(int32_t)));
      freer.p.push_back(d_indices);
      if (mode == "random") {
        const int stride = (len0 + 15) / 16 * 16;
        RET_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_mask), static_cast<size_t>(rows) * stride));
        freer.p.push_back(d_mask);
        RET_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_counts), rows * sizeof(int32_t)));
        freer.p.push_back(d_counts);
        RET_CUDA(MakeStratifiedMask(d_mask, rows, stride, len0, o.keep, 5, nullptr));
        RET_CUDA(kernels::BuildIndexListsFromMask(d_mask, rows, stride, d_counts, d_indptr,
                                                  d_indices, nullptr));
      } else if (mode == "streaming") {
        const int sinks = std::min(64, list_len);
        std::vector<int32_t> indptr{0}, indices;
        for (int r = 0; r < rows; ++r) {
          for (int t = 0; t < sinks; ++t) indices.push_back(t);
          for (int t = len0 - (list_len - sinks); t < len0; ++t) indices.push_back(t);
          indptr.push_back(static_cast<int32_t>(indices.size()));
        }
        RET_CUDA(cudaMemcpy(d_indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice));
        RET_CUDA(cudaMemcpy(d_indices, indices.data(), indices.size() * 4,
                            cudaMemcpyHostToDevice));
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "unknown mode '", mode,
            "' (dense, random, streaming, prhs, prhs-budget-matched, oracle, streaming-plan, "
            "quest, h2o, hshare)"));
      }
      RET_CUDA(cudaDeviceSynchronize());
      sel.d_indptr = {d_indptr};
      sel.d_indices = {d_indices};
      sel.max_list_len = list_len;
    }
    const CudaKvSelection* selp = (mode == "dense" || prhs) ? nullptr : &sel;
    auto step = [&]() {
      return prhs ? model.DecodeGreedyAsync(seqs, d_a, d_b, plan_ptrs, tel_ptrs)
                  : model.DecodeGreedyAsync(seqs, d_a, d_b, selp);
    };

    // ---- Warm-up, then timed steps with an event after each.
    for (int i = 0; i < o.warmup; ++i) {
      RET_OK(step());
      std::swap(d_a, d_b);
    }
    RET_OK(model.Synchronize());
    const std::vector<SelectionTelemetry> before = tel;
    const int ctx_start = *model.SequenceLength(seqs[0]) + 1;  // length during the first step
    std::vector<cudaEvent_t> ev(o.steps + 1);
    for (auto& e : ev) RET_CUDA(cudaEventCreate(&e));
    // Events go on the model's own stream so that they order with its work.
    const cudaStream_t stream = static_cast<cudaStream_t>(model.cuda_stream());
    RET_CUDA(cudaEventRecord(ev[0], stream));
    for (int i = 0; i < o.steps; ++i) {
      RET_OK(step());
      std::swap(d_a, d_b);
      RET_CUDA(cudaEventRecord(ev[i + 1], stream));
    }
    RET_OK(model.Synchronize());
    std::vector<double> ms(o.steps);
    for (int i = 0; i < o.steps; ++i) {
      float t = 0;
      RET_CUDA(cudaEventElapsedTime(&t, ev[i], ev[i + 1]));
      ms[i] = t;
    }
    float total_ms = 0;
    RET_CUDA(cudaEventElapsedTime(&total_ms, ev[0], ev[o.steps]));
    for (auto& e : ev) RET_CUDA(cudaEventDestroy(e));
    // Sanity: the last tokens are valid ids.
    std::vector<int32_t> last(o.batch);
    RET_CUDA(cudaMemcpy(last.data(), d_a, o.batch * 4, cudaMemcpyDeviceToHost));
    for (int32_t t : last) {
      if (t < 0 || t >= o.vocab) {
        return absl::InternalError(absl::StrCat("decode produced token ", t, " outside [0, ",
                                                o.vocab, ")"));
      }
    }

    Record r;
    r.mode = mode;
    r.batch = o.batch;
    r.ctx_start = ctx_start;
    r.ctx_end = ctx_start + o.steps - 1;
    r.keep = mode == "dense" ? 1 : o.keep;
    r.steps = o.steps;
    r.list_len = list_len;
    r.ms_median = Median(ms);
    r.ms_mean = total_ms / o.steps;
    r.tokens_per_s = o.batch * o.steps / (total_ms / 1e3);
    r.weight_bytes = static_cast<double>(model.weight_bytes());
    const double mean_len = 0.5 * (r.ctx_start + r.ctx_end);
    double tokens_read = mode == "dense" ? mean_len : list_len;
    if (prhs) {
      int64_t refreshes = 0, gated = 0, selections = 0, deltas = 0;
      double kept = 0, delta = 0;
      for (int b = 0; b < o.batch; ++b) {
        refreshes += tel[b].refreshes - before[b].refreshes;
        gated += tel[b].refreshes + tel[b].shares - before[b].refreshes - before[b].shares;
        selections += tel[b].selections - before[b].selections;
        kept += tel[b].kept_fraction_sum - before[b].kept_fraction_sum;
        for (size_t i = before[b].refresh_delta.size(); i < tel[b].refresh_delta.size(); ++i) {
          delta += tel[b].refresh_delta[i];
          ++deltas;
        }
      }
      r.selection_included = true;
      r.refresh_rate = gated > 0 ? static_cast<double>(refreshes) / gated : 0.0;
      r.kept_fraction = selections > 0 ? kept / selections : 1.0;
      r.mean_delta = deltas > 0 ? delta / deltas : 0.0;
      r.list_len = static_cast<int>(r.kept_fraction * mean_len);
      // Kept K/V plus the keys of every refreshed row (half of its K/V bytes); Quest reads the
      // page bounds instead (2 x hd per 16 keys: 1/16 of the K/V bytes); H2O re-reads the kept
      // keys after attention (their probabilities).
      tokens_read = r.kept_fraction * mean_len +
                    (mode == "quest" ? 0.0625 : 0.5) * r.refresh_rate * mean_len +
                    (mode == "h2o" ? 0.5 * r.kept_fraction * mean_len : 0.0);
    }
    r.kv_bytes = o.batch * tokens_read * static_cast<double>(model.kv_bytes_per_token());
    r.roofline_ms = (r.weight_bytes + r.kv_bytes) / (copy_gbs * 1e9) * 1e3;
    r.roofline_fraction = r.roofline_ms / r.ms_mean;
    return r;
  };
  for (const std::string& mode : o.modes) {
    absl::StatusOr<Record> r = run_mode(mode);
    if (!r.ok()) {
      std::fprintf(stderr, "decode_bench: mode %s failed: %s\n", mode.c_str(),
                   r.status().ToString().c_str());
      std::fflush(stderr);
      if (r.status().code() == absl::StatusCode::kInternal) break;  // the model is unusable
      continue;
    }
    records.push_back(*r);
    PrintAndWrite(o, prop, copy_gbs, page, records);
  }
  cudaFree(d_a);
  cudaFree(d_b);
  return records.size() == o.modes.size() ? 0 : 1;
}

}  // namespace
}  // namespace prehoc::bench

int main(int argc, char** argv) { return prehoc::bench::Main(argc, argv); }
