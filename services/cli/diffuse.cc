#include "services/cli/diffuse.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cachemgr/selection_plan.h"
#include "common/logging.h"
#include "nlohmann/json.hpp"
#include "services/common/flags.h"
#include "worker/dlm/calibration.h"
#include "worker/dlm/decoder.h"
#include "worker/dlm/dlm_runner.h"  // CreateDlmBackend

namespace prehoc {
namespace {

constexpr char kDefaultModel[] = "models/prehoc-code-dlm";
constexpr char kDefaultPrompt[] = "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"";

constexpr char kUsage[] =
    R"(Usage: prehoc diffuse [flags]
       prehoc diffuse --eval [eval flags]   (every cache policy side by side; --eval --help)

Decodes a masked-diffusion LM (LLaDA-style): prompt | gen-length MASKs | optional suffix,
semi-autoregressive blocks, low-confidence remasking, with a cache policy. Prints the text,
tokens/s, steps and the rows recomputed per layer.

Flags:
  --model DIR            bidirectional model directory: our HF Llama layout with
                         "is_causal": false, or a LLaDA checkpoint (model_type "llada").
                         Default: models/prehoc-code-dlm
  --prompt TEXT          prompt text (byte tokenizer; BOS is prepended). Default: a Python snippet.
  --prompt-file FILE     prompt text from a file.
  --prompt-ids IDS       prompt as comma-separated token ids (no BOS added).
  --suffix TEXT          fixed text after the generated span (infilling).
  --suffix-ids IDS       suffix as token ids.
  --gen-length N         tokens to generate (default 64).
  --block-length N       semi-autoregressive block length; must divide gen-length
                         (default 32; 0 = gen-length, pure diffusion).
  --steps N              total denoising steps, a multiple of the block count, at most
                         block-length per block (default 0 = gen-length: one token per step).
  --remasking R          low_confidence (default) or random.
  --temperature T        Gumbel-max sampling temperature (default 0 = argmax).
  --seed S               seed for Gumbel noise and random remasking (default 0).
  --parallel-threshold P commit every masked token of the block with confidence >= P
                         (at least one per step); 0 = fixed schedule (default).
  --stop-at-eos          stop after the block in which end-of-text appears.
  --cache C              none (default), prefix, dual, dllm, spa, spa-auto.
  --cache-overrides KV   schedule overrides, e.g. r_full=50,r_gen=7,rho_mean=0.2,kv_all_rows=0
                         (spa), prompt_refresh=50,gen_refresh=7,dllm_ratio=0.25 (dllm),
                         block_refresh=4 (prefix/dual). See docs/dlm.md.
  --proxy-rank R         SPA singular-proxy rank (default 0 = max(16, kv_width/32)).
  --threads N            CPU threads (default 0 = all cores).
  --device D             auto (default: CUDA when a device is usable, else CPU), cpu or cuda.
  --print-ids            also print the generated token ids.
  --json FILE            write the result, schedule and statistics as JSON.
  --log-level L          debug, info, warning or error (default warning).
  --help                 show this message.
)";

template <typename T>
bool ParseNumber(const std::string& s, T* out) {
  if constexpr (std::is_floating_point_v<T>) {
    try {
      size_t pos = 0;
      const double v = std::stod(s, &pos);
      if (pos != s.size()) return false;
      *out = static_cast<T>(v);
      return true;
    } catch (...) {
      return false;
    }
  } else {
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
    return ec == std::errc() && p == s.data() + s.size();
  }
}

bool ParseIds(const std::string& text, std::vector<int32_t>* ids, std::string* bad) {
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::string p(absl::StripAsciiWhitespace(piece));
    int32_t id;
    if (!ParseNumber(p, &id)) {
      *bad = p;
      return false;
    }
    ids->push_back(id);
  }
  return true;
}

struct Flags {
  std::string model = kDefaultModel;
  std::optional<std::string> prompt, prompt_ids, suffix, suffix_ids;
  dlm::DiffuseOptions opt;
  std::string overrides;
  int proxy_rank = 0;
  int threads = 0;
  std::string device = "auto";
  bool print_ids = false;
  std::string json_path;
  std::string log_level = "warning";
};

// Returns an error message, or empty on success (FlagSet: --name=value, --name value,
// --config FILE). The --help text stays kUsage.
std::string Parse(const std::vector<std::string>& args, Flags* f, bool* help) {
  f->opt.gen_length = 64;
  f->opt.block_length = 32;
  PromptFlags prompt;
  std::string suffix, suffix_ids;
  double temperature = f->opt.temperature;
  bool eval = false;  // --eval: handled by the caller
  FlagSet flags(kUsage);
  flags.String("model", &f->model, "model directory");
  prompt.Register(&flags);
  flags.String("suffix", &suffix, "suffix text");
  flags.String("suffix-ids", &suffix_ids, "suffix token ids");
  flags.Int("gen-length", &f->opt.gen_length, "response rows");
  flags.Int("block-length", &f->opt.block_length, "block length");
  flags.Int("steps", &f->opt.steps, "steps");
  flags.String("remasking", &f->opt.remasking, "remasking");
  flags.Double("temperature", &temperature, "temperature");
  flags.Uint64("seed", &f->opt.seed, "seed");
  flags.Double("parallel-threshold", &f->opt.parallel_threshold, "parallel threshold");
  flags.Bool("stop-at-eos", &f->opt.stop_at_eos, "stop at end of text");
  flags.String("cache", &f->opt.cache, "cache policy");
  flags.String("cache-overrides", &f->overrides, "cache overrides");
  flags.Int("proxy-rank", &f->proxy_rank, "singular-proxy rank");
  flags.Int("threads", &f->threads, "CPU threads");
  flags.String("device", &f->device, "auto, cpu or cuda");
  flags.Bool("print-ids", &f->print_ids, "print the token ids");
  flags.String("json", &f->json_path, "JSON output");
  flags.String("log-level", &f->log_level, "log level");
  flags.Bool("eval", &eval, "evaluation mode");
  if (absl::Status s = flags.Parse(args, 2, help); !s.ok()) return std::string(s.message());
  f->opt.temperature = static_cast<float>(temperature);
  if (f->proxy_rank < -1) return absl::StrCat("invalid value '", f->proxy_rank, "' for --proxy-rank");
  if (absl::Status s = flags.CheckNonNegative({"threads"}); !s.ok()) {
    return std::string(s.message());
  }
  if (f->device != "auto" && f->device != "cpu" && f->device != "cuda") {
    return absl::StrCat("--device must be auto, cpu or cuda, got '", f->device, "'");
  }
  if (std::string e = prompt.Resolve(flags, &f->prompt, &f->prompt_ids); !e.empty()) return e;
  if (flags.IsSet("suffix")) f->suffix = suffix;
  if (flags.IsSet("suffix-ids")) f->suffix_ids = suffix_ids;
  if (f->suffix && f->suffix_ids) return "--suffix and --suffix-ids are mutually exclusive";
  if (!f->overrides.empty()) {
    auto ov = ParseOverrides(f->overrides);
    if (!ov.ok()) return absl::StrCat("--cache-overrides: ", ov.status().message());
    f->opt.cache_overrides = *ov;
  }
  return "";
}

std::string LayerList(const std::vector<double>& v, const char* fmt) {
  std::vector<std::string> parts;
  for (double x : v) parts.push_back(absl::StrFormat(fmt, x));
  return absl::StrJoin(parts, " ");
}

}  // namespace

int RunDiffuse(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  for (size_t i = 2; i < args.size(); ++i) {
    if (args[i] == "--eval") return RunDiffuseEval(args, out, err);
  }
  Flags f;
  bool help = false;
  if (std::string e = Parse(args, &f, &help); !e.empty()) {
    err << "prehoc diffuse: " << e << "\n\n" << kUsage;
    return 2;
  }
  if (help) {
    out << kUsage;
    return 0;
  }
  LogLevel level;
  if (!ParseLogLevel(f.log_level, &level)) {
    err << "prehoc diffuse: invalid --log-level '" << f.log_level << "'\n";
    return 2;
  }
  SetMinLogLevel(level);
  // Request-level validation before the (slower) model load.
  if (absl::Status s = f.opt.Validate(); !s.ok()) {
    err << "prehoc diffuse: " << s.message() << "\n";
    return 2;
  }
  if (!std::filesystem::is_directory(f.model)) {
    err << "prehoc diffuse: model directory '" << f.model << "' does not exist\n";
    return 1;
  }
  dlm::DlmModelOptions mo;
  mo.model_dir = f.model;
  mo.num_threads = f.threads;
  mo.proxy_rank = f.proxy_rank;
  auto model_or = dlm::DlmModel::Create(mo);
  if (!model_or.ok()) {
    err << "prehoc diffuse: cannot load model '" << f.model << "': " << model_or.status() << "\n";
    return 1;
  }
  std::shared_ptr<const dlm::DlmModel> cpu_model = std::move(*model_or);
  const dlm::DlmModel& model = *cpu_model;
  const Tokenizer* tok = model.tokenizer();
  auto backend_or = CreateDlmBackend(f.device, cpu_model);
  if (!backend_or.ok()) {
    err << "prehoc diffuse: " << backend_or.status().message() << "\n";
    return 1;
  }
  const dlm::DlmBackend& backend = **backend_or;

  dlm::DiffuseRequest req;
  req.options = f.opt;
  std::string bad;
  if (f.prompt_ids) {
    if (!ParseIds(*f.prompt_ids, &req.prompt, &bad)) {
      err << "prehoc diffuse: --prompt-ids: '" << bad << "' is not an integer\n";
      return 2;
    }
  } else {
    if (tok == nullptr) {
      err << "prehoc diffuse: model '" << f.model
          << "' has no prehoc_tokenizer.json; pass the prompt as --prompt-ids\n";
      return 2;
    }
    req.prompt = tok->Encode(f.prompt.value_or(kDefaultPrompt), /*add_bos=*/true);
  }
  if (f.suffix_ids) {
    if (!ParseIds(*f.suffix_ids, &req.suffix, &bad)) {
      err << "prehoc diffuse: --suffix-ids: '" << bad << "' is not an integer\n";
      return 2;
    }
  } else if (f.suffix) {
    if (tok == nullptr) {
      err << "prehoc diffuse: --suffix needs a tokenizer; use --suffix-ids\n";
      return 2;
    }
    req.suffix = tok->Encode(*f.suffix, /*add_bos=*/false);
  }

  std::vector<double> drift;
  double calib_s = 0;
  if (f.opt.cache == "spa-auto") {
    const auto t0 = std::chrono::steady_clock::now();
    auto d = dlm::MeasureDriftProfile(model, {});  // output drift (see calibration.h)
    if (!d.ok()) {
      err << "prehoc diffuse: spa-auto calibration failed: " << d.status() << "\n";
      return 1;
    }
    drift = *d;
    calib_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (tok != nullptr && !f.prompt_ids) {
    const std::string shown = f.prompt.value_or(kDefaultPrompt);
    constexpr size_t kShow = 400;
    if (shown.size() > kShow) {
      out << "[... " << shown.size() - kShow << " bytes of prompt not shown ...]\n"
          << shown.substr(shown.size() - kShow);
    } else {
      out << shown;
    }
  }
  auto res = dlm::Diffuse(backend, req, std::span<const double>(drift));
  if (!res.ok()) {
    err << "\nprehoc diffuse: " << res.status() << "\n";
    return res.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  const dlm::DiffuseResult& r = *res;
  if (tok != nullptr) out << tok->Decode(r.output);
  if (tok != nullptr && !req.suffix.empty()) out << tok->Decode(req.suffix);
  out << "\n";
  if (f.print_ids || tok == nullptr) {
    out << "ids:";
    for (int32_t id : r.response) out << ' ' << id;
    out << "\n";
  }
  const dlm::DlmRunStats& s = r.stats;
  out << absl::StrFormat(
      "--- %d tokens (%s) in %d steps (%d full, %d gen-refresh, %d partial), %d blocks | "
      "%.3f s | %.2f tokens/s | cache=%s | canvas %d rows | %d threads | %s\n",
      s.decoded_tokens, r.finish_reason, s.steps, s.full_steps, s.gen_refresh_steps,
      s.partial_steps, s.blocks, s.seconds, s.tokens_per_second(), r.schedule.policy_name,
      s.canvas_rows, model.num_threads(), backend.backend_name());
  out << "--- rows recomputed per step by layer: " << LayerList(s.rows_per_step, "%.1f")
      << "  (fraction of canvas: " << LayerList(s.recompute_fraction, "%.3f") << ")\n";
  std::vector<double> kv(s.forward.kv_rows.begin(), s.forward.kv_rows.end());
  for (double& x : kv) x /= std::max(s.steps, 1);
  out << "--- K/V rows per step by layer: " << LayerList(kv, "%.1f") << "\n";
  out << absl::StrFormat(
      "--- time: layer0 %.3f s, K/V %.3f s, select %.3f s, rows %.3f s, LM head %.3f s\n",
      s.forward.seconds_layer0, s.forward.seconds_kv, s.forward.seconds_select,
      s.forward.seconds_rows, s.forward.seconds_lm);
  const DlmSchedule& sch = r.schedule;
  if (sch.policy == DlmCachePolicy::kSpa || sch.policy == DlmCachePolicy::kSpaAuto) {
    out << "--- schedule: rho " << LayerList(sch.rho, "%.3f")
        << absl::StrFormat(" (mean %.3f) r_full=%d r_gen=%d kv_all_rows=%d proxy_rank=%d\n",
                           sch.MeanUpdateRatio(), sch.r_full, sch.r_gen, sch.kv_all_rows,
                           model.proxy_rank());
    if (sch.policy == DlmCachePolicy::kSpaAuto) {
      out << "--- spa-auto: drift " << LayerList(sch.drift, "%.4f")
          << absl::StrFormat(" | fit mu=%.2f start=%.3f peak=%.3f end=%.3f scale=%.3f rmse=%.4f | calibration %.2f s\n",
                             sch.rho_curve.peak_pos, sch.rho_curve.start, sch.rho_curve.peak,
                             sch.rho_curve.end, sch.rho_curve.scale, sch.fit_rmse, calib_s);
    }
  } else if (sch.policy == DlmCachePolicy::kDllm) {
    out << absl::StrFormat("--- schedule: prompt_refresh=%d gen_refresh=%d dllm_ratio=%.3f\n",
                           sch.prompt_refresh, sch.gen_refresh, sch.dllm_ratio);
  }
  if (!f.json_path.empty()) {
    nlohmann::json j;
    j["model"] = f.model;
    j["cache"] = sch.policy_name;
    j["prompt_tokens"] = req.prompt.size();
    j["suffix_tokens"] = req.suffix.size();
    j["gen_length"] = f.opt.gen_length;
    j["block_length"] = f.opt.effective_block_length();
    j["steps_requested"] = f.opt.effective_steps();
    j["response_ids"] = r.response;
    if (tok != nullptr) j["text"] = tok->Decode(r.output);
    j["finish_reason"] = r.finish_reason;
    j["steps"] = s.steps;
    j["full_steps"] = s.full_steps;
    j["gen_refresh_steps"] = s.gen_refresh_steps;
    j["partial_steps"] = s.partial_steps;
    j["seconds"] = s.seconds;
    j["tokens_per_second"] = s.tokens_per_second();
    j["rows_per_step"] = s.rows_per_step;
    j["recompute_fraction"] = s.recompute_fraction;
    j["rho"] = sch.rho;
    j["threads"] = model.num_threads();
    j["backend"] = backend.backend_name();
    std::ofstream fo(f.json_path);
    fo << j.dump(2) << "\n";
    if (!fo) {
      err << "prehoc diffuse: cannot write " << f.json_path << "\n";
      return 1;
    }
  }
  return 0;
}

}  // namespace prehoc
