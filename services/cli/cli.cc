#include "services/cli/cli.h"

#include <charconv>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <map>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "services/common/flags.h"
#include "worker/backend_factory.h"
#include "worker/engine.h"
#include "worker/generator.h"
#include "services/cli/diffuse.h"
#include "services/cli/eval.h"
#include "services/cli/serve.h"

namespace prehoc {
namespace {

constexpr char kDefaultModel[] = "models/prehoc-code-ar";
constexpr char kDefaultPrompt[] = "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"";

constexpr char kUsage[] =
    R"(prehoc: long-context LLM serving with pre-hoc sparse attention.

Usage: prehoc <command> [flags]

Commands:
  generate   Generate text from a prompt with the embedded engine (CUDA or CPU).
  eval       Quality of sparse-attention policies vs dense on held-out data.
  diffuse    Diffusion-LM decoding with a cache policy (none/prefix/dual/dllm/spa/spa-auto).
  serve      Serve the gRPC API in embedded mode (worker + cache manager in one process).
  loadgen    Closed-loop load against a server or an in-process backend (tokens/s, latency).
  help       Show this message.

Run `prehoc <command> --help` for the command's flags.
)";

constexpr char kGenerateUsage[] =
    R"(Usage: prehoc generate [flags]

Generates a continuation of a prompt and prints it, then tokens/s and the sparsity report.

Flags:
  --model DIR          Hugging Face model directory (config.json + *.safetensors).
                       Default: models/prehoc-code-ar
  --prompt TEXT        Prompt text (needs the model's prehoc_tokenizer.json).
                       Default: a short Python snippet.
  --prompt-file FILE   Prompt text read from a file (e.g. a long source file).
  --prompt-ids IDS     Prompt as comma-separated token ids instead of text.
  --max-tokens N       Tokens to generate (default 128).
  --temperature T      0 = greedy (default 0).
  --top-k K            Keep the K most likely tokens (default 0 = off).
  --top-p P            Nucleus sampling mass in (0, 1] (default 1 = off).
  --seed S             Sampling seed (default 0).
  --no-stop-at-eos     Keep generating after the end-of-text token.
  --device D           auto (default: CUDA when a device is usable, else CPU), cpu or
                       cuda. The CUDA backend runs dense, prhs and prhs-budget-matched.
  --threads N          CPU threads (default 0 = all cores).
  --kv-cache-mb MB     KV cache size in MiB (default 1024).
  --policy P           Sparse attention for decode: dense (default), prhs,
                       prhs-budget-matched, oracle, streaming, h2o, quest, hshare.
  --budget B           Kept tokens per (layer, kv head): a fraction in (0, 1] of the
                       context or a token count > 1 (default 1/8 for sparse policies).
  --target-delta D     Target dropped attention mass δ* in (0, 1): the δ-controller then
                       adjusts the budget (default 0 = fixed budget).
  --sparsity-overrides KV  Preset overrides, e.g. tau=0.9,sink=4 (see docs/quality.md).
  --print-ids          Also print the generated token ids.
  --log-level L        debug, info, warning or error (default warning).
  --help               Show this message.
)";

struct GenerateFlags {
  std::string model = kDefaultModel;
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_ids;
  int max_tokens = 128;
  SamplingOptions sampling;
  bool stop_at_eos = true;
  int threads = 0;
  int64_t kv_cache_mb = 1024;
  bool print_ids = false;
  std::string log_level = "warning";
  SparsityOptions sparsity;
  std::string device = "auto";
};

// Parses a whole integer (a prompt token id).
template <typename T>
bool ParseNumber(const std::string& s, T* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size() && !s.empty();
}

// Returns an error message, or empty on success. Sets *help when --help was given. The flags
// are parsed by FlagSet (so --config FILE and --stop-at-eos / --no-stop-at-eos work too); the
// --help text stays kGenerateUsage.
std::string ParseGenerateFlags(const std::vector<std::string>& args, GenerateFlags* f, bool* help) {
  PromptFlags prompt;
  double temperature = f->sampling.temperature;
  double top_p = f->sampling.top_p;
  FlagSet flags(kGenerateUsage);
  flags.String("model", &f->model, "model directory");
  prompt.Register(&flags);
  flags.Int("max-tokens", &f->max_tokens, "tokens to generate");
  flags.Double("temperature", &temperature, "sampling temperature");
  flags.Int("top-k", &f->sampling.top_k, "top-k");
  flags.Double("top-p", &top_p, "nucleus mass");
  flags.Uint64("seed", &f->sampling.seed, "sampling seed");
  flags.Bool("stop-at-eos", &f->stop_at_eos, "stop at the end-of-text token");
  flags.String("device", &f->device, "auto, cpu or cuda");
  flags.Int("threads", &f->threads, "CPU threads");
  flags.Int64("kv-cache-mb", &f->kv_cache_mb, "KV cache MiB");
  flags.String("policy", &f->sparsity.policy, "sparse attention policy");
  flags.Double("budget", &f->sparsity.budget, "kept tokens per (layer, kv head)");
  flags.Double("target-delta", &f->sparsity.target_delta, "target dropped mass");
  flags.String("sparsity-overrides", &f->sparsity.overrides, "preset overrides");
  flags.Bool("print-ids", &f->print_ids, "print the token ids");
  flags.String("log-level", &f->log_level, "log level");
  if (absl::Status s = flags.Parse(args, 2, help); !s.ok()) return std::string(s.message());
  f->sampling.temperature = static_cast<float>(temperature);
  f->sampling.top_p = static_cast<float>(top_p);
  if (absl::Status s = flags.CheckNonNegative({"threads"}); !s.ok()) {
    return std::string(s.message());
  }
  auto bad = [](const std::string& flag, auto value) {
    return absl::StrCat("invalid value '", value, "' for --", flag);
  };
  if (f->kv_cache_mb <= 0) return bad("kv-cache-mb", f->kv_cache_mb);
  if (f->sparsity.budget < 0) return bad("budget", f->sparsity.budget);
  if (std::string e = prompt.Resolve(flags, &f->prompt, &f->prompt_ids); !e.empty()) return e;
  if (f->max_tokens < 1) return absl::StrCat("--max-tokens must be >= 1, got ", f->max_tokens);
  if (f->device != "auto" && f->device != "cpu" && f->device != "cuda") {
    return absl::StrCat("--device must be auto, cpu or cuda, got '", f->device, "'");
  }
  return "";
}

int RunGenerate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  GenerateFlags f;
  bool help = false;
  if (std::string e = ParseGenerateFlags(args, &f, &help); !e.empty()) {
    err << "prehoc generate: " << e << "\n\n" << kGenerateUsage;
    return 2;
  }
  if (help) {
    out << kGenerateUsage;
    return 0;
  }
  LogLevel level;
  if (!ParseLogLevel(f.log_level, &level)) {
    err << "prehoc generate: invalid --log-level '" << f.log_level << "'\n";
    return 2;
  }
  SetMinLogLevel(level);
  if (absl::Status s = f.sampling.Validate(); !s.ok()) {
    err << "prehoc generate: " << s.message() << "\n";
    return 2;
  }
  if (!std::filesystem::is_directory(f.model)) {
    err << "prehoc generate: model directory '" << f.model << "' does not exist\n";
    return 1;
  }

  BackendOptions options;
  options.device = f.device;
  options.engine.model_dir = f.model;
  options.engine.num_threads = f.threads;
  options.engine.kv_cache_bytes = f.kv_cache_mb << 20;
  std::string why;
  auto engine_or = CreateBackend(options, &why);
  if (!engine_or.ok()) {
    err << "prehoc generate: cannot load model '" << f.model << "': " << engine_or.status() << "\n";
    return 1;
  }
  ModelBackend& engine = **engine_or;

  GenerateRequest req;
  req.max_tokens = f.max_tokens;
  req.sampling = f.sampling;
  req.stop_at_eos = f.stop_at_eos;
  req.sparsity = f.sparsity;
  if (f.prompt_ids) {
    for (absl::string_view piece : absl::StrSplit(*f.prompt_ids, ',', absl::SkipWhitespace())) {
      int32_t id;
      std::string p(absl::StripAsciiWhitespace(piece));
      if (!ParseNumber(p, &id)) {
        err << "prehoc generate: --prompt-ids: '" << p << "' is not an integer\n";
        return 2;
      }
      req.prompt.push_back(id);
    }
  } else {
    if (engine.tokenizer() == nullptr) {
      err << "prehoc generate: model '" << f.model
          << "' has no prehoc_tokenizer.json; pass the prompt as --prompt-ids\n";
      return 2;
    }
    req.prompt = engine.tokenizer()->Encode(f.prompt.value_or(kDefaultPrompt), /*add_bos=*/true);
  }

  const Tokenizer* tok = engine.tokenizer();
  if (tok != nullptr && !f.prompt_ids) {
    const std::string shown = f.prompt.value_or(kDefaultPrompt);
    constexpr size_t kShow = 400;  // a long prompt is summarised: only its end is echoed
    if (shown.size() > kShow) {
      out << "[... " << shown.size() - kShow << " bytes of prompt not shown ...]\n"
          << shown.substr(shown.size() - kShow);
    } else {
      out << shown;
    }
  }
  GenerateStats stats;
  auto results = GenerateBatch(
      engine, {req},
      [&](int, int32_t id) {
        if (tok != nullptr) {
          out << tok->Decode(std::span<const int32_t>(&id, 1));
          out.flush();
        }
      },
      &stats);
  if (!results.ok()) {
    err << "\nprehoc generate: " << results.status() << "\n";
    return 1;
  }
  const GenerateResult& r = (*results)[0];
  out << "\n";
  if (f.print_ids || tok == nullptr) {
    out << "ids:";
    for (int32_t id : r.tokens) out << ' ' << id;
    out << "\n";
  }
  out << absl::StrFormat(
      "--- %d tokens (%s) from a %d-token prompt | prefill %.1f ms | decode %.1f tokens/s | "
      "%s: %s\n",
      static_cast<int>(r.tokens.size()), r.finish_reason, r.prompt_tokens, stats.prefill_s * 1e3,
      stats.decode_tokens_per_s(), engine.kind(), engine.description());
  out << absl::StrFormat(
      "--- sparsity: policy=%s kept_fraction=%.3f delta_mean=%.4f delta_max=%.4f refreshes=%d "
      "shares=%d\n",
      r.sparsity.policy, r.sparsity.mean_kept_fraction, r.sparsity.mean_delta,
      r.sparsity.max_delta, r.sparsity.refreshes, r.sparsity.shares);
  return 0;
}

}  // namespace

int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.size() < 2) {
    err << kUsage;
    return 2;
  }
  const std::string& cmd = args[1];
  if (cmd == "help" || cmd == "--help" || cmd == "-h") {
    out << kUsage;
    return 0;
  }
  if (cmd == "generate") return RunGenerate(args, out, err);
  if (cmd == "eval") return RunEval(args, out, err);
  if (cmd == "diffuse") return RunDiffuse(args, out, err);
  if (cmd == "serve") return RunServe(args, out, err);
  if (cmd == "loadgen") return RunLoadgen(args, out, err);
  err << "prehoc: unknown command '" << cmd << "'\n\n" << kUsage;
  return 2;
}

}  // namespace prehoc
