#include "services/cli/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "services/common/flags.h"
#include "nlohmann/json.hpp"
#include "worker/engine.h"
#include "worker/sampler.h"
#include "cachemgr/delta_controller.h"
#include "worker/selection/session.h"

namespace prehoc {
namespace {

constexpr char kUsage[] = R"(Usage: prehoc eval [flags]

Quality of sparse-attention policies against dense attention on held-out data
(bits per byte, top-1 agreement, exact dropped mass δ, retrieval accuracy, refresh rate,
real kept fraction). Every (policy, budget) pair runs on the same inputs in one batch.

Flags:
  --model DIR            model directory (default models/prehoc-code-ar)
  --data DIR             eval sets (default tests/data)
  --policies LIST        comma list (default prhs,prhs-budget-matched,oracle,quest,h2o,streaming,hshare);
                         policy[k=v;k=v] adds overrides for that entry, e.g. prhs[tau=0.5]
  --budgets LIST         kept fractions (default 0.25,0.125,0.0625)
  --targets LIST         δ* values for PrHS with the δ-controller on (default 0.05; '' = none)
  --ppl-rows N           rows of ppl_2k.jsonl to use (default 4)
  --ppl-tokens N         teacher-forced tokens per row (default 256)
  --ppl-skip N           skip the first N rows of ppl_2k.jsonl (default 0)
  --retrieval LIST       sets, e.g. 2k,4k,8k (default 2k,4k)
  --retrieval-rows N     rows per set (default 16)
  --retrieval-skip N     skip the first N rows of each set (default 0)
  --overrides KV         preset overrides for every policy, e.g. tau=0.9,psaw_phi=0.95
  --sparse-prefill KV    also run every PrHS config with a sparse prefill (PSAW band, and ETF
                         when KV enables it, e.g. etf_start=4); KV are extra overrides ('-' = none)
  --threads N            CPU threads (default 0 = all)
  --json FILE            write all results as JSON
  --help
)";

struct Config {
  std::string name;  // e.g. "prhs@0.125" or "prhs@δ*=0.05"
  SparsityOptions sparsity;
  double fraction = 1.0;  // nominal budget
  bool sparse_prefill = false;  // prefill its own copy with the plan (PSAW band, ETF)
};

struct Accum {
  double ce_nats = 0;
  int64_t predictions = 0;
  int64_t agree = 0;
  std::map<std::string, std::pair<int, int>> retrieval;  // set -> (hits, total)
  std::vector<float> step_delta;
  std::vector<float> refresh_delta;
  double target_delta = 0;
  int64_t selections = 0, refreshes = 0, shares = 0, kept_tokens = 0;
  int64_t scored_keys = 0, context_keys = 0;
  double kept_fraction_sum = 0;
  double seconds = 0;
  // Per (layer, kv head) unit: Σ exact δ, Σ output error and selections measured, refreshes.
  std::vector<double> unit_delta_sum, unit_error_sum;
  std::vector<int64_t> unit_selections, unit_refreshes;
};

std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipWhitespace())) out.emplace_back(p);
  return out;
}

absl::StatusOr<std::vector<nlohmann::json>> ReadJsonl(const std::string& path, int max_rows) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::vector<nlohmann::json> rows;
  std::string line;
  int n = 0;
  while (std::getline(in, line) && static_cast<int>(rows.size()) < max_rows) {
    ++n;
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": bad JSON"));
    rows.push_back(std::move(j));
  }
  return rows;
}

double Quantile(std::vector<float> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))];
}

double LogSoftmaxAt(std::span<const float> logits, int target) {
  float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l - mx));
  return static_cast<double>(logits[target] - mx) - std::log(sum);
}

class Harness {
 public:
  Harness(Engine* engine, std::vector<Config> configs)
      : engine_(engine), configs_(std::move(configs)), acc_(configs_.size() + 1) {
    // One δ-controller per δ* configuration, shared by every example (as the cache manager
    // keeps one per model and policy), so what it learns carries over from row to row.
    const ModelConfig& m = engine_->config();
    for (const Config& c : configs_) {
      controllers_.push_back(c.sparsity.target_delta > 0
                                 ? std::make_unique<DeltaController>(
                                       m.num_hidden_layers, m.num_key_value_heads,
                                       DeltaControllerOptions{.target_delta = c.sparsity.target_delta})
                                 : nullptr);
    }
  }

  // Index 0 is dense; 1.. are configs_.
  const std::vector<Accum>& accums() const { return acc_; }

  // Prefills `prefix` once, forks it per configuration, and teacher-forces `forced` tokens.
  // Then greedily generates `generate` tokens per configuration. Returns per configuration the
  // generated tokens; accumulates CE / agreement on the forced steps when `score` is set.
  absl::StatusOr<std::vector<std::vector<int32_t>>> Run(std::span<const int32_t> prefix,
                                                        std::span<const int32_t> forced,
                                                        int generate, bool score) {
    const size_t n = configs_.size() + 1;
    const Engine::SeqId base = engine_->CreateSequence();
    {
      Engine::StepItem item{base, prefix, false};
      auto r = engine_->Step(std::span<const Engine::StepItem>(&item, 1));
      if (!r.ok()) {
        engine_->FreeSequence(base).IgnoreError();
        return r.status();
      }
    }
    std::vector<Engine::SeqId> seqs(n);
    std::vector<std::unique_ptr<SelectionSession>> sessions(n);
    absl::Status status;
    for (size_t i = 0; i < n && status.ok(); ++i) {
      auto s = SelectionSession::Create(engine_->config(),
                                        i == 0 ? SparsityOptions{} : configs_[i - 1].sparsity,
                                        i == 0 ? nullptr : controllers_[i - 1].get());
      if (!s.ok()) {
        status = s.status();
        break;
      }
      sessions[i] = std::move(*s);
      sessions[i]->selector()->set_measure_step_delta(i > 0);
      if (i > 0 && configs_[i - 1].sparse_prefill) {
        seqs[i] = engine_->CreateSequence();
        Engine::StepItem item{seqs[i], prefix, false, nullptr, &sessions[i]->plan()};
        auto r = engine_->Step(std::span<const Engine::StepItem>(&item, 1));
        if (!r.ok()) status = r.status();
        continue;
      }
      auto f = engine_->ForkSequence(base);
      if (!f.ok()) {
        status = f.status();
        break;
      }
      seqs[i] = *f;
    }
    engine_->FreeSequence(base).IgnoreError();
    std::vector<std::vector<int32_t>> generated(n);
    std::vector<int32_t> input(n);
    const int total_steps = static_cast<int>(forced.size()) + generate;
    for (int step = 0; status.ok() && step < total_steps; ++step) {
      const bool teacher = step < static_cast<int>(forced.size());
      std::vector<Engine::StepItem> items(n);
      for (size_t i = 0; i < n; ++i) {
        input[i] = teacher ? forced[step] : generated[i].back();
        items[i] = {seqs[i], std::span<const int32_t>(&input[i], 1), false,
                    i == 0 ? nullptr : sessions[i]->selector()};
      }
      auto t0 = std::chrono::steady_clock::now();
      auto logits = engine_->Step(items);
      if (!logits.ok()) {
        status = logits.status();
        break;
      }
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const int dense_top = ArgMax((*logits)[0]);
      for (size_t i = 0; i < n; ++i) {
        sessions[i]->AfterStep();
        acc_[i].seconds += dt / n;
        const int top = ArgMax((*logits)[i]);
        if (score && step + 1 < static_cast<int>(forced.size())) {
          acc_[i].ce_nats -= LogSoftmaxAt((*logits)[i], forced[step + 1]);
          acc_[i].predictions++;
          acc_[i].agree += top == dense_top;
        }
        if (step + 1 >= static_cast<int>(forced.size())) generated[i].push_back(top);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      if (sessions[i] != nullptr) {
        const SelectionTelemetry& t = sessions[i]->selector()->telemetry();
        Accum& a = acc_[i];
        a.step_delta.insert(a.step_delta.end(), t.step_delta.begin(), t.step_delta.end());
        a.refresh_delta.insert(a.refresh_delta.end(), t.refresh_delta.begin(), t.refresh_delta.end());
        a.selections += t.selections;
        a.refreshes += t.refreshes;
        a.shares += t.shares;
        a.kept_tokens += t.kept_tokens_sum;
        a.scored_keys += t.scored_keys_sum;
        a.context_keys += t.context_keys_sum;
        a.kept_fraction_sum += t.kept_fraction_sum;
        a.target_delta = sessions[i]->plan().target_delta;
        const size_t units = t.refreshes_per_unit.size();
        a.unit_delta_sum.resize(units, 0.0);
        a.unit_error_sum.resize(units, 0.0);
        a.unit_selections.resize(units, 0);
        a.unit_refreshes.resize(units, 0);
        for (size_t k = 0; k < t.step_delta.size() && k < t.step_delta_unit.size(); ++k) {
          const int u = t.step_delta_unit[k];
          a.unit_delta_sum[u] += t.step_delta[k];
          a.unit_error_sum[u] += k < t.step_output_error.size() ? t.step_output_error[k] : 0.0f;
          ++a.unit_selections[u];
        }
        for (size_t u = 0; u < units; ++u) a.unit_refreshes[u] += t.refreshes_per_unit[u];
      }
      if (seqs[i] != 0) engine_->FreeSequence(seqs[i]).IgnoreError();
    }
    if (!status.ok()) return status;
    // The last generated token is an extra prediction past the request; trim to `generate`.
    for (auto& g : generated) {
      if (static_cast<int>(g.size()) > generate) g.resize(generate);
    }
    return generated;
  }

  void AddRetrieval(const std::string& set, const std::vector<std::vector<int32_t>>& outs,
                    const std::vector<int32_t>& answer) {
    for (size_t i = 0; i < outs.size(); ++i) {
      auto& [hits, total] = acc_[i].retrieval[set];
      hits += outs[i] == answer;
      ++total;
    }
  }

 private:
  Engine* engine_;
  std::vector<Config> configs_;
  std::vector<Accum> acc_;
  std::vector<std::unique_ptr<DeltaController>> controllers_;
};

}  // namespace

int RunEval(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::string model = "models/prehoc-code-ar", data = "tests/data", json_path, overrides;
  std::string policies = "prhs,prhs-budget-matched,oracle,quest,h2o,streaming,hshare";
  std::string budgets = "0.25,0.125,0.0625", targets = "0.05", retrieval = "2k,4k";
  std::string sparse_prefill;
  int ppl_rows = 4, ppl_tokens = 256, ppl_skip = 0, retrieval_rows = 16, retrieval_skip = 0, threads = 0;
  FlagSet flags(kUsage);
  flags.String("model", &model, "model directory");
  flags.String("data", &data, "data directory");
  flags.String("policies", &policies, "policies");
  flags.String("budgets", &budgets, "budget fractions");
  flags.String("targets", &targets, "δ targets");
  flags.String("retrieval", &retrieval, "retrieval lengths");
  flags.String("overrides", &overrides, "preset overrides");
  flags.String("sparse-prefill", &sparse_prefill, "sparse prefill overrides");
  flags.String("json", &json_path, "JSON output");
  flags.Int("ppl-rows", &ppl_rows, "perplexity rows");
  flags.Int("ppl-tokens", &ppl_tokens, "perplexity tokens");
  flags.Int("ppl-skip", &ppl_skip, "perplexity rows skipped");
  flags.Int("retrieval-rows", &retrieval_rows, "retrieval rows");
  flags.Int("retrieval-skip", &retrieval_skip, "retrieval rows skipped");
  flags.Int("threads", &threads, "CPU threads");
  if (int code = flags.ParseCommand(args, 2, "prehoc eval", kUsage, out, err); code >= 0) {
    return code;
  }
  if (absl::Status s = flags.CheckNonNegative(
          {"ppl-rows", "ppl-tokens", "ppl-skip", "retrieval-rows", "retrieval-skip", "threads"});
      !s.ok()) {
    err << "prehoc eval: " << s.message() << "\n";
    return 2;
  }

  std::vector<Config> configs;
  for (const std::string& spec : SplitList(policies)) {
    if (spec == "dense") continue;  // always run as the reference
    // "policy[key=value;key=value]" adds per-policy overrides (e.g. prhs[tau=0.5]).
    std::string p = spec, own;
    if (auto lb = spec.find('['); lb != std::string::npos && spec.back() == ']') {
      p = spec.substr(0, lb);
      own = spec.substr(lb + 1, spec.size() - lb - 2);
      std::replace(own.begin(), own.end(), ';', ',');
    }
    std::string policy_overrides = overrides;
    if (!own.empty()) policy_overrides = overrides.empty() ? own : overrides + "," + own;
    for (const std::string& b : SplitList(budgets)) {
      double f;
      if (!absl::SimpleAtod(b, &f) || !(f > 0 && f <= 1)) {
        err << "prehoc eval: --budgets: '" << b << "' is not a fraction in (0, 1]\n";
        return 2;
      }
      configs.push_back({absl::StrCat(spec, "@", b), SparsityOptions{p, 0.0, f, policy_overrides}, f});
      if (!sparse_prefill.empty() && p.rfind("prhs", 0) == 0) {
        std::string ov = policy_overrides;
        if (sparse_prefill != "-") ov = ov.empty() ? sparse_prefill : ov + "," + sparse_prefill;
        configs.push_back({absl::StrCat(spec, "+prefill@", b), SparsityOptions{p, 0.0, f, ov}, f, true});
      }
    }
  }
  for (const std::string& t : SplitList(targets)) {
    double d;
    if (!absl::SimpleAtod(t, &d) || !(d > 0 && d < 1)) {
      err << "prehoc eval: --targets: '" << t << "' is not a δ in (0, 1)\n";
      return 2;
    }
    // Start from 1/16 and let the controller find the budget.
    configs.push_back({absl::StrCat("prhs@delta*=", t), SparsityOptions{"prhs", d, 0.0625, overrides}, 0.0625});
  }
  SetMinLogLevel(LogLevel::kWarning);
  EngineOptions eo;
  eo.model_dir = model;
  eo.num_threads = threads;
  eo.kv_cache_bytes = int64_t{4} << 30;
  auto engine_or = Engine::Create(eo);
  if (!engine_or.ok()) {
    err << "prehoc eval: cannot load model '" << model << "': " << engine_or.status() << "\n";
    return 1;
  }
  Engine& engine = **engine_or;
  // Validate every configuration before spending time.
  for (const Config& c : configs) {
    auto s = SelectionSession::Create(engine.config(), c.sparsity);
    if (!s.ok()) {
      err << "prehoc eval: " << c.name << ": " << s.status().message() << "\n";
      return 2;
    }
  }
  Harness h(&engine, configs);
  const int BOS = engine.tokenizer() ? engine.tokenizer()->bos_id() : 256;
  auto to_ids = [&](const std::string& text) {
    std::vector<int32_t> ids = {BOS};
    for (unsigned char ch : text) ids.push_back(ch);
    return ids;
  };
  const auto start = std::chrono::steady_clock::now();

  if (ppl_rows > 0) {
    auto rows = ReadJsonl((std::filesystem::path(data) / "ppl_2k.jsonl").string(), ppl_skip + ppl_rows);
    if (rows.ok()) rows->erase(rows->begin(), rows->begin() + std::min<size_t>(ppl_skip, rows->size()));
    if (!rows.ok()) {
      err << "prehoc eval: " << rows.status() << "\n";
      return 1;
    }
    for (size_t r = 0; r < rows->size(); ++r) {
      std::vector<int32_t> ids = to_ids((*rows)[r]["text"].get<std::string>());
      if (static_cast<int>(ids.size()) <= ppl_tokens + 1) continue;
      const size_t split = ids.size() - ppl_tokens;
      auto res = h.Run(std::span<const int32_t>(ids).first(split),
                       std::span<const int32_t>(ids).subspan(split), 0, /*score=*/true);
      if (!res.ok()) {
        err << "prehoc eval: ppl row " << r << ": " << res.status() << "\n";
        return 1;
      }
      err << absl::StrFormat("[eval] ppl row %d/%d done (%.0f s)\n", r + 1, rows->size(),
                             std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  for (const std::string& set : SplitList(retrieval)) {
    auto rows = ReadJsonl((std::filesystem::path(data) / ("retrieval_" + set + ".jsonl")).string(),
                          retrieval_skip + retrieval_rows);
    if (rows.ok()) rows->erase(rows->begin(), rows->begin() + std::min<size_t>(retrieval_skip, rows->size()));
    if (!rows.ok()) {
      err << "prehoc eval: " << rows.status() << "\n";
      return 1;
    }
    for (size_t r = 0; r < rows->size(); ++r) {
      const std::string prompt = (*rows)[r]["prompt"].get<std::string>();
      const std::string answer = (*rows)[r]["answer"].get<std::string>();
      std::vector<int32_t> ids = to_ids(prompt);
      // The query line (after the last newline) is decoded with selection, not prefilled.
      const size_t nl = prompt.rfind('\n');
      const size_t tail = nl == std::string::npos ? 1 : prompt.size() - nl - 1;
      const size_t split = ids.size() - std::max<size_t>(tail, 1);
      std::vector<int32_t> want(answer.begin(), answer.end());
      auto res = h.Run(std::span<const int32_t>(ids).first(split),
                       std::span<const int32_t>(ids).subspan(split),
                       static_cast<int>(want.size()), /*score=*/false);
      if (!res.ok()) {
        err << "prehoc eval: retrieval_" << set << " row " << r << ": " << res.status() << "\n";
        return 1;
      }
      h.AddRetrieval(set, *res, want);
      std::string hits;
      for (const auto& o : *res) hits += o == want ? '1' : '0';
      err << "[eval] retrieval " << set << " row " << r << " depth "
          << (*rows)[r].value("depth", -1.0) << " hits (dense first, then configs in order): "
          << hits << "\n";
      err << absl::StrFormat("[eval] retrieval %s row %d/%d done (%.0f s)\n", set, r + 1, rows->size(),
                             std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }

  // ---- Report.
  const auto& acc = h.accums();
  const double dense_bpb =
      acc[0].predictions ? acc[0].ce_nats / acc[0].predictions / std::log(2.0) : 0;
  nlohmann::json j;
  j["model"] = model;
  j["data"] = data;
  j["ppl_rows"] = ppl_rows;
  j["ppl_skip"] = ppl_skip;
  j["ppl_tokens"] = ppl_tokens;
  j["retrieval_rows"] = retrieval_rows;
  j["overrides"] = overrides;
  j["threads"] = engine.num_threads();
  j["wall_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<std::string> sets = SplitList(retrieval);
  std::string header = "| config | kept (real) | kept tokens | bpb | Δbpb % | top-1 agree | δ mean | δ p95 | δ max | refresh rate | equiv refresh |";
  std::string rule = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |";
  for (const auto& s : sets) {
    header += " retr " + s + " |";
    rule += " --- |";
  }
  out << header << "\n" << rule << "\n";
  for (size_t i = 0; i < acc.size(); ++i) {
    const Accum& a = acc[i];
    nlohmann::json c;
    const std::string name = i == 0 ? "dense" : configs[i - 1].name;
    c["config"] = name;
    c["policy"] = i == 0 ? "dense" : configs[i - 1].sparsity.policy;
    c["nominal_fraction"] = i == 0 ? 1.0 : configs[i - 1].fraction;
    c["target_delta"] = a.target_delta;
    const double kept = a.selections ? a.kept_fraction_sum / a.selections : 1.0;
    const double kept_tokens = a.selections ? static_cast<double>(a.kept_tokens) / a.selections : 0;
    const double bpb = a.predictions ? a.ce_nats / a.predictions / std::log(2.0) : 0;
    c["real_kept_fraction"] = kept;
    c["mean_kept_tokens"] = kept_tokens;
    c["bits_per_byte"] = bpb;
    c["bpb_rel_change_pct"] = dense_bpb > 0 ? (bpb / dense_bpb - 1) * 100 : 0;
    c["top1_agreement"] = a.predictions ? static_cast<double>(a.agree) / a.predictions : 1.0;
    double dmean = 0;
    for (float d : a.step_delta) dmean += d;
    dmean = a.step_delta.empty() ? 0 : dmean / a.step_delta.size();
    c["delta_mean"] = dmean;
    c["delta_p95"] = Quantile(a.step_delta, 0.95);
    c["delta_max"] = a.step_delta.empty() ? 0 : *std::max_element(a.step_delta.begin(), a.step_delta.end());
    c["refresh_rate"] = a.selections ? static_cast<double>(a.refreshes) / a.selections : 0;
    // Keys selection scored beyond the kept set / keys of per-step selection (PrHS, oracle).
    c["equiv_refresh_rate"] =
        a.context_keys ? static_cast<double>(a.scored_keys) / a.context_keys : 0;
    c["refreshes"] = a.refreshes;
    c["shares"] = a.shares;
    c["selections"] = a.selections;
    c["refresh_delta_samples"] = a.refresh_delta.size();
    if (a.target_delta > 0 && !a.refresh_delta.empty()) {
      // Overall, and after the controller's warm-up (its first kWarmup measurements).
      constexpr size_t kWarmup = 1000;
      int64_t ok = 0, ok_late = 0;
      for (size_t k = 0; k < a.refresh_delta.size(); ++k) {
        const bool within = a.refresh_delta[k] <= a.target_delta;
        ok += within;
        if (k >= kWarmup) ok_late += within;
      }
      c["refresh_delta_within_target"] = static_cast<double>(ok) / a.refresh_delta.size();
      if (a.refresh_delta.size() > kWarmup) {
        c["refresh_delta_within_target_after_warmup"] =
            static_cast<double>(ok_late) / (a.refresh_delta.size() - kWarmup);
      }
    }
    std::string row = absl::StrFormat("| %s | %.4f | %.1f | %.4f | %+.2f | %.4f | %.4f | %.4f | %.4f | %.4f | %.4f |",
                                      name, kept, kept_tokens, bpb,
                                      c["bpb_rel_change_pct"].get<double>(),
                                      c["top1_agreement"].get<double>(), dmean,
                                      c["delta_p95"].get<double>(), c["delta_max"].get<double>(),
                                      c["refresh_rate"].get<double>(),
                                      c["equiv_refresh_rate"].get<double>());
    for (const auto& s : sets) {
      auto it = a.retrieval.find(s);
      const int hits = it == a.retrieval.end() ? 0 : it->second.first;
      const int total = it == a.retrieval.end() ? 0 : it->second.second;
      c["retrieval"][s] = {{"hits", hits}, {"total", total},
                           {"accuracy", total ? static_cast<double>(hits) / total : 0.0}};
      row += absl::StrFormat(" %d/%d |", hits, total);
    }
    out << row << "\n";
    double err_sum = 0;
    int64_t measured = 0;
    for (size_t u = 0; u < a.unit_selections.size(); ++u) {
      const double n = static_cast<double>(a.unit_selections[u]);
      err_sum += a.unit_error_sum[u];
      measured += a.unit_selections[u];
      if (n == 0) continue;
      c["per_unit"].push_back({{"unit", u},
                               {"delta_mean", a.unit_delta_sum[u] / n},
                               {"output_error_mean", a.unit_error_sum[u] / n},
                               {"refresh_rate", a.unit_refreshes[u] / n}});
    }
    c["output_error_mean"] = measured > 0 ? err_sum / measured : 0.0;
    j["configs"].push_back(c);
  }
  // Per (layer, kv head) unit "L.h": mean relative attention-output error vs dense / refresh rate.
  const int kv_heads = engine.config().num_key_value_heads;
  const size_t num_units = static_cast<size_t>(engine.config().num_hidden_layers) * kv_heads;
  out << "\nper (layer.kv head), attention output error vs dense / refresh rate:\n\n| config | all |";
  for (size_t u = 0; u < num_units; ++u) out << " " << u / kv_heads << "." << u % kv_heads << " |";
  out << "\n| --- | --- |";
  for (size_t u = 0; u < num_units; ++u) out << " --- |";
  out << "\n";
  for (const nlohmann::json& c : j["configs"]) {
    if (!c.contains("per_unit") || c["per_unit"].size() != num_units) continue;
    out << "| " << c["config"].get<std::string>()
        << absl::StrFormat(" | %.3f |", c["output_error_mean"].get<double>());
    for (const nlohmann::json& pu : c["per_unit"]) {
      out << absl::StrFormat(" %.3f / %.2f |", pu["output_error_mean"].get<double>(),
                             pu["refresh_rate"].get<double>());
    }
    out << "\n";
  }
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << j.dump(2) << "\n";
    if (!f) {
      err << "prehoc eval: cannot write " << json_path << "\n";
      return 1;
    }
  }
  return 0;
}

}  // namespace prehoc
