#include "worker/dlm/decoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace prehoc::dlm {
namespace {

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// Uniform in (0, 1) from 53 random bits: (k + 0.5) / 2^53, so log(u) and log(−log u) are finite.
double Uniform01(std::mt19937_64* rng) {
  const uint64_t k = (*rng)() >> 11;
  return (static_cast<double>(k) + 0.5) * (1.0 / 9007199254740992.0);
}

}  // namespace

absl::Status DiffuseOptions::Validate() const {
  if (gen_length <= 0) return Bad("gen_length", absl::StrCat("must be > 0, got ", gen_length));
  if (block_length < 0) return Bad("block_length", absl::StrCat("must be >= 0, got ", block_length));
  const int bl = effective_block_length();
  if (gen_length % bl != 0) {
    return Bad("block_length", absl::StrCat(bl, " does not divide gen_length ", gen_length));
  }
  if (steps < 0) return Bad("steps", absl::StrCat("must be >= 0, got ", steps));
  const int nb = gen_length / bl;
  const int st = effective_steps();
  if (st % nb != 0) {
    return Bad("steps", absl::StrCat(st, " is not a multiple of the number of blocks ", nb,
                                     " (gen_length / block_length)"));
  }
  if (st / nb > bl) {
    return Bad("steps", absl::StrCat(st, " steps over ", nb, " blocks is ", st / nb,
                                     " per block, above block_length ", bl,
                                     " (a step would commit nothing)"));
  }
  if (remasking != "low_confidence" && remasking != "random") {
    return Bad("remasking", absl::StrCat("unknown value '", remasking,
                                         "' (valid: low_confidence, random)"));
  }
  if (!(temperature >= 0) || !std::isfinite(temperature)) {
    return Bad("temperature", absl::StrCat("must be finite and >= 0, got ", temperature));
  }
  if (!(parallel_threshold >= 0 && parallel_threshold <= 1)) {
    return Bad("parallel_threshold", absl::StrCat("must be in [0, 1], got ", parallel_threshold));
  }
  auto p = ParseDlmCachePolicy(cache);
  if (!p.ok()) return p.status();
  return absl::OkStatus();
}

absl::StatusOr<DiffuseResult> Diffuse(const DlmModel& model, const DiffuseRequest& request,
                                      std::span<const double> drift,
                                      const DlmStepObserver& observer) {
  RETURN_IF_ERROR(request.options.Validate());
  ASSIGN_OR_RETURN(DlmSchedule schedule,
                   MakeDlmSchedule(model.config(), request.options.cache,
                                   request.options.cache_overrides, drift));
  return DiffuseWithSchedule(model, request, schedule, observer);
}

absl::StatusOr<DiffuseResult> DiffuseWithSchedule(const DlmModel& model,
                                                  const DiffuseRequest& request,
                                                  const DlmSchedule& schedule,
                                                  const DlmStepObserver& observer) {
  const DiffuseOptions& opt = request.options;
  RETURN_IF_ERROR(opt.Validate());
  const ModelConfig& c = model.config();
  const int V = c.vocab_size, NL = c.num_hidden_layers;
  const int mask = model.mask_id();
  const int P = static_cast<int>(request.prompt.size());
  const int L = opt.gen_length;
  const int S = static_cast<int>(request.suffix.size());
  const int N = P + L + S;
  if (P == 0) return Bad("prompt", "empty (pass at least one token, e.g. BOS)");
  for (const auto* part : {&request.prompt, &request.suffix}) {
    const char* name = part == &request.prompt ? "prompt" : "suffix";
    for (size_t i = 0; i < part->size(); ++i) {
      const int32_t t = (*part)[i];
      if (t < 0 || t >= V) {
        return Bad(name, absl::StrCat("token ", t, " at position ", i, " is outside [0, ", V, ")"));
      }
      if (t == mask) {
        return Bad(name, absl::StrCat("token at position ", i, " is the mask id ", mask,
                                      " (masks belong in the response)"));
      }
    }
  }
  if (N > c.max_position_embeddings) {
    return Bad("gen_length", absl::StrCat("prompt ", P, " + gen_length ", L, " + suffix ", S,
                                          " = ", N, " exceeds the model's context ",
                                          c.max_position_embeddings));
  }
  const int eos = model.eos_id();
  if (opt.stop_at_eos && eos < 0) {
    return Bad("stop_at_eos", "the model declares no end-of-text id");
  }
  const bool spa = schedule.policy == DlmCachePolicy::kSpa ||
                   schedule.policy == DlmCachePolicy::kSpaAuto;
  if (spa && model.proxy_rank() <= 0) {
    return absl::FailedPreconditionError("cache: spa needs the model's singular proxies (proxy_rank > 0)");
  }
  if (spa && static_cast<int>(schedule.rho.size()) != NL) {
    return Bad("schedule.rho", absl::StrCat("has ", schedule.rho.size(), " layers, model has ", NL));
  }

  DiffuseResult result;
  result.schedule = schedule;
  DlmRunStats& stats = result.stats;
  stats.canvas_rows = N;
  stats.forward.Resize(NL);

  std::vector<int32_t> canvas;
  canvas.reserve(N);
  canvas.insert(canvas.end(), request.prompt.begin(), request.prompt.end());
  canvas.insert(canvas.end(), L, mask);
  canvas.insert(canvas.end(), request.suffix.begin(), request.suffix.end());
  DlmState state(c, N, model.proxy_rank());
  std::mt19937_64 rng(opt.seed);

  std::vector<int32_t> all_rows(N), gen_rows(L);
  std::iota(all_rows.begin(), all_rows.end(), 0);
  std::iota(gen_rows.begin(), gen_rows.end(), P);
  std::vector<int> update_rows(NL);
  for (int l = 0; l < NL; ++l) update_rows[l] = schedule.UpdateRows(l, L);

  const int bl = opt.effective_block_length();
  const int nb = L / bl;
  const int spb = opt.effective_steps() / nb;
  const bool random_remask = opt.remasking == "random";
  const double tau = opt.parallel_threshold;

  std::vector<float> logits;
  std::vector<int32_t> live, mask_rows;
  const auto t_start = std::chrono::steady_clock::now();
  int step = 0;
  bool stopped = false;
  for (int b = 0; b < nb && !stopped; ++b) {
    const int bs = P + b * bl, be = bs + bl;
    // LLaDA's get_num_transfer_tokens over the block's masks.
    int masks = 0;
    for (int r = bs; r < be; ++r) masks += canvas[r] == mask;
    std::vector<int> transfer(spb, masks / spb);
    for (int i = 0; i < masks % spb; ++i) transfer[i]++;
    for (int i = 0;; ++i) {
      mask_rows.clear();
      for (int r = bs; r < be; ++r) {
        if (canvas[r] == mask) mask_rows.push_back(r);
      }
      if (mask_rows.empty()) break;
      if (tau <= 0 && i >= spb) break;  // cannot happen: the schedule sums to the masks
      const DlmStepKind kind = schedule.StepKind(step, i);
      ForwardSpec spec;
      spec.logit_rows = mask_rows;
      spec.store_proxy = spa;
      spec.proxy_begin = P;
      spec.proxy_end = P + L;
      switch (kind) {
        case DlmStepKind::kFull:
          spec.live = all_rows;
          stats.full_steps++;
          break;
        case DlmStepKind::kGenRefresh:
          spec.live = gen_rows;
          stats.gen_refresh_steps++;
          break;
        case DlmStepKind::kPartial:
          stats.partial_steps++;
          spec.store_proxy = false;
          switch (schedule.policy) {
            case DlmCachePolicy::kPrefix:
              live.assign(all_rows.begin() + bs, all_rows.end());
              spec.live = live;
              break;
            case DlmCachePolicy::kDual:
              live.assign(all_rows.begin() + bs, all_rows.begin() + be);
              spec.live = live;
              break;
            case DlmCachePolicy::kDllm:
              spec.live = gen_rows;
              spec.select = RowSelect::kDllm;
              spec.first_selective_layer = 0;
              spec.update_rows = update_rows;
              break;
            case DlmCachePolicy::kSpa:
            case DlmCachePolicy::kSpaAuto:
              spec.live = gen_rows;
              spec.select = RowSelect::kSpa;
              spec.first_selective_layer = 1;
              spec.update_rows = update_rows;
              spec.kv_all_rows = schedule.kv_all_rows;
              break;
            case DlmCachePolicy::kNone:
              spec.live = all_rows;
              break;
          }
          break;
      }
      RETURN_IF_ERROR(model.Forward(&state, canvas, spec, &logits, &stats.forward));
      stats.steps++;

      // x0 and confidence per masked row.
      const int nm = static_cast<int>(mask_rows.size());
      std::vector<int32_t> x0(nm);
      std::vector<double> conf(nm);
      for (int j = 0; j < nm; ++j) {
        const float* lg = logits.data() + static_cast<size_t>(j) * V;
        int best = 0;
        if (opt.temperature > 0) {
          double best_score = -std::numeric_limits<double>::infinity();
          for (int v = 0; v < V; ++v) {
            const double g = -std::log(-std::log(Uniform01(&rng)));
            const double s = static_cast<double>(lg[v]) + opt.temperature * g;
            if (s > best_score) best_score = s, best = v;
          }
        } else {
          for (int v = 1; v < V; ++v) {
            if (lg[v] > lg[best]) best = v;
          }
        }
        x0[j] = best;
        if (!random_remask) {
          float mx = lg[0];
          for (int v = 1; v < V; ++v) mx = std::max(mx, lg[v]);
          double sum = 0;
          for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v]) - mx);
          conf[j] = std::exp(static_cast<double>(lg[best]) - mx) / sum;
        }
      }
      if (random_remask) {
        for (int j = 0; j < nm; ++j) conf[j] = Uniform01(&rng);
      }
      // Most confident first, ties by position.
      std::vector<int> order(nm);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b2) { return conf[a] > conf[b2]; });
      int take;
      if (tau > 0) {
        take = 1;
        while (take < nm && conf[order[take]] >= tau) ++take;
      } else {
        take = std::min(transfer[i], nm);
      }
      std::vector<int> chosen(order.begin(), order.begin() + take);
      std::sort(chosen.begin(), chosen.end());
      DlmStepInfo info;
      info.step = step;
      info.block = b;
      info.block_step = i;
      info.kind = kind;
      info.masked_before = nm;
      if (observer) {
        for (int j = 0; j < nm; ++j) {
          info.candidate_rows.push_back(mask_rows[j] - P);
          info.candidate_tokens.push_back(x0[j]);
          info.candidate_confidence.push_back(static_cast<float>(conf[j]));
        }
      }
      for (int j : chosen) {
        canvas[mask_rows[j]] = x0[j];
        info.committed_rows.push_back(mask_rows[j] - P);
        info.committed_tokens.push_back(x0[j]);
        info.committed_confidence.push_back(static_cast<float>(conf[j]));
      }
      stats.decoded_tokens += take;
      if (observer) observer(info);
      ++step;
    }
    stats.blocks++;
    if (opt.stop_at_eos) {
      for (int r = P; r < be; ++r) {
        if (canvas[r] == eos) stopped = true;
      }
    }
  }
  stats.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();

  result.response.assign(canvas.begin() + P, canvas.begin() + P + L);
  result.output = result.response;
  if (eos >= 0) {
    auto it = std::find(result.output.begin(), result.output.end(), eos);
    result.output.erase(it, result.output.end());
  }
  // Never-decoded rows (after an EOS stop) are not output.
  auto mit = std::find(result.output.begin(), result.output.end(), mask);
  result.output.erase(mit, result.output.end());
  result.finish_reason = stopped ? "eos" : "length";
  stats.rows_per_step.assign(NL, 0.0);
  stats.recompute_fraction.assign(NL, 0.0);
  for (int l = 0; l < NL && stats.steps > 0; ++l) {
    stats.rows_per_step[l] = static_cast<double>(stats.forward.q_rows[l]) / stats.steps;
    stats.recompute_fraction[l] = stats.rows_per_step[l] / N;
  }
  return result;
}

}  // namespace prehoc::dlm
