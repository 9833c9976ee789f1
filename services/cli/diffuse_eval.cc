// `prehoc diffuse --eval`: every DLM cache policy side by side on the same inputs (CPU, shipped
// model): tokens/s, speedup vs vanilla, retrieval accuracy, token agreement with vanilla, bits per
// byte of the generated text under the AR model, rows recomputed per layer, cost by phase.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cachemgr/selection_plan.h"
#include "common/logging.h"
#include "services/common/flags.h"
#include "nlohmann/json.hpp"
#include "services/cli/diffuse.h"
#include "worker/dlm/calibration.h"
#include "worker/dlm/decoder.h"
#include "worker/dlm/dlm_runner.h"  // CreateDlmBackend
#include "worker/engine.h"

namespace prehoc {
namespace {

constexpr char kUsage[] = R"(Usage: prehoc diffuse --eval [flags]

Runs every DLM cache policy on the same prompts (on --device) and reports, per policy: tokens/s and
speedup vs vanilla ("none"), retrieval accuracy on retrieval_2k.jsonl (input [BOS] + prompt +
[MASK]*len(answer) + suffix, exact match of the decoded answer), token agreement with vanilla,
bits per byte of the generated text under the AR model, rows recomputed per step and layer,
and the time by phase (layer 0, K/V, row selection, selected rows, LM head).

Flags:
  --model DIR             DLM (default models/prehoc-code-dlm)
  --ar-model DIR          AR model for bits per byte (default models/prehoc-code-ar; '' = skip)
  --data DIR              held-out sets (default tests/data)
  --policies LIST         comma list of POLICY[@key=value+key=value...]; keys are cache
                          overrides plus 'tau' (parallel threshold) and, for spa-auto,
                          'drift_proxy=1' (fit the proxy drift, not the output drift). Default:
                          none,prefix,dual,dllm,spa,spa@kv_all_rows=0,spa-auto
  --retrieval-rows N      first N rows of retrieval_2k.jsonl (default 16; 0 = skip)
  --retrieval-steps N     steps for the answer (default 0 = one token per step)
  --gen-rows N            open generation after the first N rows of ppl_2k.jsonl (default 4)
  --gen-prompt-bytes N    prompt = the row's first N bytes, cut at a line end (default 384)
  --gen-length N          (default 64)   --block-length N (default 32)   --steps N (default 64)
  --calibration-rows N    spa-auto calibration prompts: the LAST N rows of ppl_2k.jsonl
                          (first 256 bytes each; disjoint from the generation prompts) (default 4)
  --proxy-rank R          singular proxy rank (default 0 = model default)
  --fidelity              generation part: also run, at every step of every non-vanilla policy, an exact full
                          forward on the same canvas and report step fidelity: top-1 agreement of
                          the proposed tokens and the fraction of steps whose commits equal the
                          exact decision (no divergence cascade; costs a vanilla forward per step)
  --threads N             CPU threads (default 0 = all)
  --device D              backend the policies decode on: cpu (default), cuda or auto (CUDA when
                          usable); calibration, --fidelity's exact forwards and the AR scoring
                          run on the CPU
  --json FILE             write everything as JSON
  --log-level L           (default warning)
)";

struct Policy {
  std::string label, cache;
  std::map<std::string, double> overrides;
  double tau = 0;
  bool drift_proxy = false;  // spa-auto: fit to the proxy drift instead of the output drift
};

struct Acc {
  // retrieval
  int hits = 0, total = 0;
  double r_seconds = 0;
  int64_t r_tokens = 0, r_agree = 0, r_compared = 0;
  // generation
  double g_seconds = 0;
  int64_t g_tokens = 0, g_agree = 0, g_compared = 0;
  double ce_bits = 0;
  int64_t ce_bytes = 0;
  int g_steps = 0, g_runs = 0;
  std::vector<double> rows_per_step;
  dlm::ForwardStats fwd;
  std::vector<std::string> samples;
  // --fidelity: per step, the exact (full-forward) decision on the same canvas.
  int64_t fid_rows = 0, fid_top1 = 0, fid_steps = 0, fid_same_commit = 0;
};

absl::StatusOr<std::vector<nlohmann::json>> ReadJsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::vector<nlohmann::json> rows;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": bad JSON"));
    rows.push_back(std::move(j));
  }
  return rows;
}

absl::StatusOr<std::vector<Policy>> ParsePolicies(const std::string& text) {
  std::vector<Policy> out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    Policy p;
    p.label = std::string(item);
    std::vector<std::string> parts = absl::StrSplit(item, '@');
    p.cache = parts[0];
    if (parts.size() > 2) return absl::InvalidArgumentError(absl::StrCat("--policies: bad item '", item, "'"));
    if (parts.size() == 2) {
      std::string kv = parts[1];
      std::replace(kv.begin(), kv.end(), '+', ',');
      auto ov = ParseOverrides(kv);
      if (!ov.ok()) return absl::InvalidArgumentError(absl::StrCat("--policies: ", ov.status().message()));
      for (const auto& [k, v] : *ov) {
        if (k == "tau") {
          p.tau = v;
        } else if (k == "drift_proxy") {
          p.drift_proxy = v != 0;
        } else {
          p.overrides[k] = v;
        }
      }
    }
    out.push_back(std::move(p));
  }
  if (out.empty()) return absl::InvalidArgumentError("--policies: empty");
  return out;
}

std::vector<int32_t> Bytes(const std::string& s) {
  std::vector<int32_t> v;
  for (unsigned char ch : s) v.push_back(ch);
  return v;
}

std::string Printable(const std::string& s, size_t max_len = 60) {
  std::string o;
  for (char ch : s.substr(0, max_len)) {
    if (ch == '\n') {
      o += "\\n";
    } else if (ch == '|') {
      o += "\\|";
    } else {
      o += ch;
    }
  }
  return o;
}

}  // namespace

int RunDiffuseEval(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::string model_dir = "models/prehoc-code-dlm", ar_dir = "models/prehoc-code-ar";
  std::string data = "tests/data", json_path, log_level = "warning";
  std::string policies_text = "none,prefix,dual,dllm,spa,spa@kv_all_rows=0,spa-auto";
  int retrieval_rows = 16, retrieval_steps = 0, gen_rows = 4, gen_prompt_bytes = 384;
  int gen_length = 64, block_length = 32, steps = 64, calibration_rows = 4, proxy_rank = 0;
  int threads = 0;
  std::string device = "cpu";
  bool fidelity = false;
  bool eval = true;  // the flag that brought us here
  FlagSet flags(kUsage);
  flags.Bool("eval", &eval, "evaluation mode");
  flags.Bool("fidelity", &fidelity, "fidelity check");
  flags.String("model", &model_dir, "diffusion model directory");
  flags.String("ar-model", &ar_dir, "autoregressive model directory");
  flags.String("data", &data, "data directory");
  flags.String("policies", &policies_text, "cache policies");
  flags.String("json", &json_path, "JSON output");
  flags.String("log-level", &log_level, "log level");
  flags.Int("retrieval-rows", &retrieval_rows, "retrieval rows");
  flags.Int("retrieval-steps", &retrieval_steps, "retrieval steps");
  flags.Int("gen-rows", &gen_rows, "generation rows");
  flags.Int("gen-prompt-bytes", &gen_prompt_bytes, "generation prompt bytes");
  flags.Int("gen-length", &gen_length, "generation length");
  flags.Int("block-length", &block_length, "block length");
  flags.Int("steps", &steps, "steps");
  flags.Int("calibration-rows", &calibration_rows, "calibration rows");
  flags.Int("proxy-rank", &proxy_rank, "singular-proxy rank");
  flags.Int("threads", &threads, "CPU threads");
  flags.String("device", &device, "decoding backend: cpu, cuda or auto");
  if (int code = flags.ParseCommand(args, 2, "prehoc diffuse --eval", kUsage, out, err);
      code >= 0) {
    return code;
  }
  if (absl::Status s = flags.CheckNonNegative(
          {"retrieval-rows", "retrieval-steps", "gen-rows", "gen-prompt-bytes", "gen-length",
           "block-length", "steps", "calibration-rows", "proxy-rank", "threads"});
      !s.ok()) {
    err << "prehoc diffuse --eval: " << s.message() << "\n";
    return 2;
  }
  LogLevel level;
  if (!ParseLogLevel(log_level, &level)) {
    err << "prehoc diffuse --eval: invalid --log-level '" << log_level << "'\n";
    return 2;
  }
  SetMinLogLevel(level);
  if (device != "auto" && device != "cpu" && device != "cuda") {
    err << "prehoc diffuse --eval: --device must be auto, cpu or cuda, got '" << device << "'\n";
    return 2;
  }
  auto policies_or = ParsePolicies(policies_text);
  if (!policies_or.ok()) {
    err << "prehoc diffuse --eval: " << policies_or.status().message() << "\n";
    return 2;
  }
  const std::vector<Policy> policies = *policies_or;
  int vanilla = -1;
  for (size_t p = 0; p < policies.size(); ++p) {
    if (policies[p].cache == "none" && policies[p].overrides.empty() && policies[p].tau == 0) {
      vanilla = static_cast<int>(p);
      break;
    }
  }

  dlm::DlmModelOptions mo;
  mo.model_dir = model_dir;
  mo.num_threads = threads;
  mo.proxy_rank = proxy_rank;
  auto model_or = dlm::DlmModel::Create(mo);
  if (!model_or.ok()) {
    err << "prehoc diffuse --eval: cannot load '" << model_dir << "': " << model_or.status() << "\n";
    return 1;
  }
  std::shared_ptr<const dlm::DlmModel> cpu_model = std::move(*model_or);
  const dlm::DlmModel& model = *cpu_model;
  if (model.tokenizer() == nullptr) {
    err << "prehoc diffuse --eval: the model has no byte tokenizer\n";
    return 1;
  }
  // The backend the policies decode on; calibration, the fidelity shadow forwards and the AR
  // scoring stay on the CPU reference.
  std::string device_why;
  auto backend_or = CreateDlmBackend(device, cpu_model, /*cuda_device=*/0, &device_why);
  if (!backend_or.ok()) {
    err << "prehoc diffuse --eval: --device " << device << ": " << backend_or.status().message()
        << "\n";
    return 1;
  }
  const dlm::DlmBackend& backend = **backend_or;
  const int bos = model.tokenizer()->bos_id();
  std::unique_ptr<Engine> ar;
  if (!ar_dir.empty()) {
    EngineOptions eo;
    eo.model_dir = ar_dir;
    eo.num_threads = threads;
    eo.kv_cache_bytes = int64_t{128} << 20;
    auto e = Engine::Create(eo);
    if (!e.ok()) {
      err << "prehoc diffuse --eval: cannot load AR model '" << ar_dir << "': " << e.status() << "\n";
      return 1;
    }
    ar = std::move(*e);
  }
  auto ppl = ReadJsonl((std::filesystem::path(data) / "ppl_2k.jsonl").string());
  auto retr = ReadJsonl((std::filesystem::path(data) / "retrieval_2k.jsonl").string());
  if (!ppl.ok() || !retr.ok()) {
    err << "prehoc diffuse --eval: " << (ppl.ok() ? retr.status() : ppl.status()) << "\n";
    return 1;
  }

  // spa-auto: calibrate once at load on prompts disjoint from the evaluation prompts.
  std::vector<double> drift, drift_proxy;
  double calib_seconds = 0;
  bool need_drift = false;
  for (const Policy& p : policies) need_drift |= p.cache == "spa-auto";
  if (need_drift) {
    std::vector<std::vector<int32_t>> calib;
    const int n = static_cast<int>(ppl->size());
    for (int r = std::max(0, n - calibration_rows); r < n; ++r) {
      std::string text = (*ppl)[r]["text"].get<std::string>().substr(0, 256);
      calib.push_back(model.tokenizer()->Encode(text, true));
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto d = dlm::MeasureDrift(model, calib);
    if (!d.ok()) {
      err << "prehoc diffuse --eval: calibration: " << d.status() << "\n";
      return 1;
    }
    drift = d->output;
    drift_proxy = d->proxy;
    calib_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  std::vector<Acc> acc(policies.size());
  std::map<std::string, DlmSchedule> schedules;
  auto run = [&](size_t pi, dlm::DiffuseRequest req, bool shadow) -> absl::StatusOr<dlm::DiffuseResult> {
    const Policy& p = policies[pi];
    req.options.cache = p.cache;
    req.options.cache_overrides = p.overrides;
    req.options.parallel_threshold = p.tau;
    dlm::DlmStepObserver observer = nullptr;
    std::vector<int32_t> canvas;
    const int P = static_cast<int>(req.prompt.size());
    absl::Status shadow_status;
    double shadow_seconds = 0;  // excluded from the policy's time
    if (shadow && fidelity && static_cast<int>(pi) != vanilla) {
      canvas = req.prompt;
      canvas.insert(canvas.end(), req.options.gen_length, model.mask_id());
      canvas.insert(canvas.end(), req.suffix.begin(), req.suffix.end());
      observer = [&, P](const dlm::DlmStepInfo& s) {
        const auto t0 = std::chrono::steady_clock::now();
        struct Timer {
          std::chrono::steady_clock::time_point t0;
          double* acc;
          ~Timer() { *acc += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
        } timer{t0, &shadow_seconds};
        const int N = static_cast<int>(canvas.size()), V = model.config().vocab_size;
        dlm::DlmState st(model.config(), N, 0);
        std::vector<int32_t> all(N), rows;
        for (int i = 0; i < N; ++i) all[i] = i;
        for (int32_t r : s.candidate_rows) rows.push_back(P + r);
        dlm::ForwardSpec spec;
        spec.live = all;
        spec.logit_rows = rows;
        std::vector<float> logits;
        if (absl::Status st2 = model.Forward(&st, canvas, spec, &logits, nullptr); !st2.ok()) {
          shadow_status = st2;
          return;
        }
        std::vector<std::pair<double, int>> order;  // (-confidence, candidate index)
        std::vector<int32_t> best(rows.size());
        Acc& a = acc[pi];
        for (size_t j = 0; j < rows.size(); ++j) {
          const float* lg = logits.data() + j * V;
          int b = 0;
          for (int v = 1; v < V; ++v) b = lg[v] > lg[b] ? v : b;
          double sum = 0;
          for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v]) - lg[b]);
          best[j] = b;
          order.push_back({-1.0 / sum, static_cast<int>(j)});
          a.fid_rows++;
          a.fid_top1 += b == s.candidate_tokens[j];
        }
        std::stable_sort(order.begin(), order.end(),
                         [](const auto& x, const auto& y) { return x.first < y.first; });
        size_t take = s.committed_rows.size();
        if (p.tau > 0) {
          take = 1;
          while (take < order.size() && -order[take].first >= p.tau) ++take;
        }
        std::vector<std::pair<int32_t, int32_t>> exact, got;
        for (size_t k = 0; k < take && k < order.size(); ++k) {
          exact.push_back({s.candidate_rows[order[k].second], best[order[k].second]});
        }
        for (size_t k = 0; k < s.committed_rows.size(); ++k) {
          got.push_back({s.committed_rows[k], s.committed_tokens[k]});
        }
        std::sort(exact.begin(), exact.end());
        std::sort(got.begin(), got.end());
        a.fid_steps++;
        a.fid_same_commit += exact == got;
        for (size_t k = 0; k < s.committed_rows.size(); ++k) {
          canvas[P + s.committed_rows[k]] = s.committed_tokens[k];
        }
      };
    }
    auto r = dlm::Diffuse(backend, req,
                          std::span<const double>(p.drift_proxy ? drift_proxy : drift), observer);
    if (r.ok() && !shadow_status.ok()) return shadow_status;
    if (r.ok()) r->stats.seconds -= shadow_seconds;
    if (r.ok()) schedules[p.label] = r->schedule;
    return r;
  };

  // ---- Retrieval.
  const int nr = std::min<int>(retrieval_rows, static_cast<int>(retr->size()));
  for (int row = 0; row < nr; ++row) {
    const nlohmann::json& j = (*retr)[row];
    const std::string answer = j["answer"].get<std::string>();
    dlm::DiffuseRequest req;
    req.prompt = model.tokenizer()->Encode(j["prompt"].get<std::string>(), true);
    req.suffix = Bytes(j["suffix"].get<std::string>());
    req.options.gen_length = static_cast<int>(answer.size());
    req.options.block_length = 0;
    req.options.steps = retrieval_steps;
    std::vector<int32_t> vanilla_out;
    for (size_t p = 0; p < policies.size(); ++p) {
      auto r = run(p, req, /*shadow=*/false);
      if (!r.ok()) {
        err << "prehoc diffuse --eval: retrieval row " << row << " policy " << policies[p].label
            << ": " << r.status() << "\n";
        return 1;
      }
      Acc& a = acc[p];
      a.total++;
      a.hits += model.tokenizer()->Decode(r->response) == answer;
      a.r_seconds += r->stats.seconds;
      a.r_tokens += r->stats.decoded_tokens;
      if (static_cast<int>(p) == vanilla) vanilla_out = r->response;
      if (vanilla >= 0 && !vanilla_out.empty()) {
        for (size_t i = 0; i < r->response.size(); ++i) a.r_agree += r->response[i] == vanilla_out[i];
        a.r_compared += static_cast<int64_t>(r->response.size());
      }
    }
    LOG(INFO) << "retrieval row " << row << " done";
  }

  // ---- Open generation after held-out code prompts.
  const int ng = std::min<int>(gen_rows, static_cast<int>(ppl->size()));
  for (int row = 0; row < ng; ++row) {
    std::string text = (*ppl)[row]["text"].get<std::string>();
    std::string prompt = text.substr(0, gen_prompt_bytes);
    if (auto nl = prompt.rfind('\n'); nl != std::string::npos && nl > 0) prompt = prompt.substr(0, nl + 1);
    dlm::DiffuseRequest req;
    req.prompt = model.tokenizer()->Encode(prompt, true);
    req.options.gen_length = gen_length;
    req.options.block_length = block_length;
    req.options.steps = steps;
    std::vector<int32_t> vanilla_out;
    for (size_t p = 0; p < policies.size(); ++p) {
      auto r = run(p, req, /*shadow=*/true);
      if (!r.ok()) {
        err << "prehoc diffuse --eval: generation row " << row << " policy " << policies[p].label
            << ": " << r.status() << "\n";
        return r.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
      }
      Acc& a = acc[p];
      a.g_seconds += r->stats.seconds;
      a.g_tokens += r->stats.decoded_tokens;
      a.g_steps += r->stats.steps;
      a.g_runs++;
      a.fwd.Add(r->stats.forward);
      if (a.rows_per_step.empty()) a.rows_per_step.assign(r->stats.rows_per_step.size(), 0.0);
      for (size_t l = 0; l < a.rows_per_step.size(); ++l) a.rows_per_step[l] += r->stats.rows_per_step[l];
      if (static_cast<int>(p) == vanilla) vanilla_out = r->response;
      if (vanilla >= 0 && !vanilla_out.empty()) {
        for (size_t i = 0; i < r->response.size(); ++i) a.g_agree += r->response[i] == vanilla_out[i];
        a.g_compared += static_cast<int64_t>(r->response.size());
      }
      if (row == 0) a.samples.push_back(model.tokenizer()->Decode(r->output));
      if (ar != nullptr && !r->output.empty()) {
        std::vector<int32_t> seq = {bos};
        for (unsigned char ch : prompt) seq.push_back(ch);
        const size_t first = seq.size();
        seq.insert(seq.end(), r->output.begin(), r->output.end());
        auto logits = ar->ForwardFull(seq, /*causal=*/true);
        if (!logits.ok()) {
          err << "prehoc diffuse --eval: AR scoring: " << logits.status() << "\n";
          return 1;
        }
        const int V = ar->config().vocab_size;
        for (size_t t = first; t < seq.size(); ++t) {
          const float* lg = logits->data() + (t - 1) * V;
          float mx = lg[0];
          for (int v = 1; v < V; ++v) mx = std::max(mx, lg[v]);
          double sum = 0;
          for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v] - mx));
          a.ce_bits += (std::log(sum) - (lg[seq[t]] - mx)) / std::log(2.0);
          a.ce_bytes++;
        }
      }
    }
    LOG(INFO) << "generation row " << row << " done";
  }

  // ---- Report.
  const Acc* base = vanilla >= 0 ? &acc[vanilla] : nullptr;
  out << absl::StrFormat(
      "# prehoc diffuse --eval | model %s | backend %s | %d CPU threads | retrieval_2k rows %d "
      "(gen = answer, %s) | generation: %d ppl_2k prompts (<= %d bytes), gen %d, block %d, "
      "steps %d\n\n",
      model_dir, backend.backend_name(), model.num_threads(), nr,
      retrieval_steps == 0 ? "one token per step" : absl::StrCat(retrieval_steps, " steps"), ng,
      gen_prompt_bytes, gen_length, block_length, steps);
  out << "| policy | retrieval acc | retr. tok/s | retr. speedup | retr. agree | gen tok/s | gen "
         "speedup | gen agree | bpb (AR) | steps/run | mean rows recomputed / step / layer | "
         "step top-1 vs exact | step commits = exact |\n"
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  nlohmann::json jp = nlohmann::json::array();
  for (size_t p = 0; p < policies.size(); ++p) {
    const Acc& a = acc[p];
    const double rtps = a.r_seconds > 0 ? a.r_tokens / a.r_seconds : 0;
    const double gtps = a.g_seconds > 0 ? a.g_tokens / a.g_seconds : 0;
    const double rsp = base != nullptr && a.r_seconds > 0 ? base->r_seconds / a.r_seconds : 0;
    const double gsp = base != nullptr && a.g_seconds > 0 ? base->g_seconds / a.g_seconds : 0;
    const double racc = a.total > 0 ? 100.0 * a.hits / a.total : 0;
    const double ragr = a.r_compared > 0 ? 100.0 * a.r_agree / a.r_compared : 0;
    const double gagr = a.g_compared > 0 ? 100.0 * a.g_agree / a.g_compared : 0;
    const double bpb = a.ce_bytes > 0 ? a.ce_bits / a.ce_bytes : 0;
    std::vector<double> rps = a.rows_per_step;
    for (double& x : rps) x /= std::max(a.g_runs, 1);
    double mean_rows = 0;
    for (double x : rps) mean_rows += x / std::max<size_t>(rps.size(), 1);
    const std::string fid_top1 =
        a.fid_rows > 0 ? absl::StrFormat("%.1f %%", 100.0 * a.fid_top1 / a.fid_rows) : "-";
    const std::string fid_commit =
        a.fid_steps > 0 ? absl::StrFormat("%.1f %%", 100.0 * a.fid_same_commit / a.fid_steps) : "-";
    out << absl::StrFormat("| %s | %.1f %% (%d/%d) | %.2f | %.2fx | %.1f %% | %.2f | %.2fx | %.1f %% | %.3f | %.1f | %.1f | %s | %s |\n",
                           policies[p].label, racc, a.hits, a.total, rtps, rsp, ragr, gtps, gsp,
                           gagr, bpb, a.g_runs > 0 ? static_cast<double>(a.g_steps) / a.g_runs : 0,
                           mean_rows, fid_top1, fid_commit);
    nlohmann::json j;
    j["policy"] = policies[p].label;
    j["cache"] = policies[p].cache;
    j["overrides"] = policies[p].overrides;
    j["parallel_threshold"] = policies[p].tau;
    if (a.fid_steps > 0) {
      j["step_fidelity"] = {{"candidate_rows", a.fid_rows},
                            {"top1_agreement", static_cast<double>(a.fid_top1) / a.fid_rows},
                            {"steps", a.fid_steps},
                            {"same_commit_fraction", static_cast<double>(a.fid_same_commit) / a.fid_steps}};
    }
    j["retrieval"] = {{"rows", a.total},       {"hits", a.hits},       {"accuracy", racc / 100},
                      {"seconds", a.r_seconds}, {"tokens", a.r_tokens}, {"tokens_per_second", rtps},
                      {"speedup_vs_vanilla", rsp}, {"agreement_with_vanilla", ragr / 100}};
    j["generation"] = {{"runs", a.g_runs},
                       {"seconds", a.g_seconds},
                       {"tokens", a.g_tokens},
                       {"tokens_per_second", gtps},
                       {"speedup_vs_vanilla", gsp},
                       {"agreement_with_vanilla", gagr / 100},
                       {"bits_per_byte_ar", bpb},
                       {"scored_bytes", a.ce_bytes},
                       {"steps", a.g_steps},
                       {"rows_per_step_by_layer", rps},
                       {"seconds_by_phase",
                        {{"layer0", a.fwd.seconds_layer0},
                         {"kv", a.fwd.seconds_kv},
                         {"select", a.fwd.seconds_select},
                         {"rows", a.fwd.seconds_rows},
                         {"lm_head", a.fwd.seconds_lm}}},
                       {"sample", a.samples.empty() ? "" : a.samples[0]}};
    if (auto it = schedules.find(policies[p].label); it != schedules.end()) {
      const DlmSchedule& s = it->second;
      j["schedule"] = {{"rho", s.rho},         {"r_full", s.r_full},
                       {"r_gen", s.r_gen},     {"kv_all_rows", s.kv_all_rows},
                       {"prompt_refresh", s.prompt_refresh}, {"gen_refresh", s.gen_refresh},
                       {"dllm_ratio", s.dllm_ratio}, {"block_refresh", s.block_refresh},
                       {"mean_update_ratio", s.MeanUpdateRatio()}};
      if (s.policy == DlmCachePolicy::kSpaAuto) {
        j["schedule"]["drift"] = s.drift;
        j["schedule"]["fit"] = {{"peak_pos", s.rho_curve.peak_pos}, {"start", s.rho_curve.start},
                                {"peak", s.rho_curve.peak},         {"end", s.rho_curve.end},
                                {"floor", s.rho_curve.floor},       {"scale", s.rho_curve.scale},
                                {"rmse", s.fit_rmse}};
      }
    }
    jp.push_back(j);
  }
  out << "\nTime by phase in the generation runs (s): layer 0 | K/V | select | rows | LM head\n";
  for (size_t p = 0; p < policies.size(); ++p) {
    const dlm::ForwardStats& f = acc[p].fwd;
    out << absl::StrFormat("  %-22s %7.2f | %7.2f | %7.2f | %7.2f | %7.2f\n", policies[p].label,
                           f.seconds_layer0, f.seconds_kv, f.seconds_select, f.seconds_rows,
                           f.seconds_lm);
  }
  out << "\nRows recomputed per step by layer (generation):\n";
  for (size_t p = 0; p < policies.size(); ++p) {
    std::vector<std::string> parts;
    for (double x : acc[p].rows_per_step) {
      parts.push_back(absl::StrFormat("%.1f", x / std::max(acc[p].g_runs, 1)));
    }
    out << absl::StrFormat("  %-22s %s\n", policies[p].label, absl::StrJoin(parts, " "));
  }
  for (const auto& [label, s] : schedules) {
    if (s.policy == DlmCachePolicy::kSpa || s.policy == DlmCachePolicy::kSpaAuto) {
      std::vector<std::string> parts;
      for (double x : s.rho) parts.push_back(absl::StrFormat("%.3f", x));
      out << absl::StrFormat("rho(%s): %s (mean over layers >= 1: %.3f)\n", label,
                             absl::StrJoin(parts, " "), s.MeanUpdateRatio());
    }
  }
  if (!drift.empty()) {
    std::vector<std::string> parts, pparts;
    for (double x : drift) parts.push_back(absl::StrFormat("%.4f", x));
    for (double x : drift_proxy) pparts.push_back(absl::StrFormat("%.4f", x));
    out << absl::StrFormat(
        "spa-auto drift profiles: output %s | proxy %s (calibration %.2f s)\n",
        absl::StrJoin(parts, " "), absl::StrJoin(pparts, " "), calib_seconds);
  }
  out << "\nSamples (first generation prompt):\n";
  for (size_t p = 0; p < policies.size(); ++p) {
    out << absl::StrFormat("  %-22s %s\n", policies[p].label,
                           acc[p].samples.empty() ? "" : Printable(acc[p].samples[0], 80));
  }
  if (!json_path.empty()) {
    nlohmann::json j;
    j["command"] = absl::StrJoin(args, " ");
    j["model"] = model_dir;
    j["ar_model"] = ar_dir;
    j["threads"] = model.num_threads();
    j["backend"] = backend.backend_name();
    j["proxy_rank"] = model.proxy_rank();
    j["proxy_build_seconds"] = model.proxy_build_seconds();
    j["retrieval"] = {{"set", "retrieval_2k.jsonl"}, {"rows", nr},
                      {"steps", retrieval_steps == 0 ? "gen_length (one token per step)" : std::to_string(retrieval_steps)}};
    j["generation"] = {{"set", "ppl_2k.jsonl"}, {"rows", ng}, {"prompt_bytes", gen_prompt_bytes},
                       {"gen_length", gen_length}, {"block_length", block_length}, {"steps", steps}};
    j["spa_auto"] = {{"output_drift", drift}, {"proxy_drift", drift_proxy},
                     {"calibration_seconds", calib_seconds},
                     {"calibration_rows", calibration_rows}};
    j["policies"] = jp;
    std::ofstream fo(json_path);
    fo << j.dump(2) << "\n";
    if (!fo) {
      err << "prehoc diffuse --eval: cannot write " << json_path << "\n";
      return 1;
    }
  }
  return 0;
}

}  // namespace prehoc
