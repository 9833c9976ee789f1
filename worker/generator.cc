#include "worker/generator.h"

#include <chrono>
#include <span>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/selection/session.h"

namespace prehoc {
namespace {
double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

double GenerateStats::decode_tokens_per_s() const {
  const int64_t decoded = generated_tokens - (generated_tokens > 0 ? 1 : 0);
  return decode_s > 0 ? static_cast<double>(decoded) / decode_s : 0.0;
}

absl::StatusOr<std::vector<GenerateResult>> GenerateBatch(ModelBackend& engine,
                                                          const std::vector<GenerateRequest>& requests,
                                                          const TokenCallback& on_token,
                                                          GenerateStats* stats) {
  const ModelConfig& c = engine.config();
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerateRequest& r = requests[i];
    if (r.prompt.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("request ", i, ": prompt is empty"));
    }
    for (size_t j = 0; j < r.prompt.size(); ++j) {
      if (r.prompt[j] < 0 || r.prompt[j] >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("request ", i, ": prompt token ", j, " = ",
                                                       r.prompt[j], " is outside [0, ",
                                                       c.vocab_size, ")"));
      }
    }
    if (r.max_tokens < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("request ", i, ": max_tokens must be >= 1, got ", r.max_tokens));
    }
    if (static_cast<int64_t>(r.prompt.size()) + r.max_tokens > engine.max_context()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "request ", i, ": prompt (", r.prompt.size(), " tokens) + max_tokens (", r.max_tokens,
          ") exceeds the maximum context of ", engine.max_context(), " tokens"));
    }
    absl::Status s = r.sampling.Validate();
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("request ", i, ": ", s.message()));
  }
  // Selection plan + selector (+ δ-controller) per request: what the cache manager and worker
  // do in split mode.
  const size_t n = requests.size();
  std::vector<std::unique_ptr<SelectionSession>> sessions(n);
  for (size_t i = 0; i < n; ++i) {
    auto session = SelectionSession::Create(c, requests[i].sparsity);
    if (!session.ok()) {
      return absl::Status(session.status().code(),
                          absl::StrCat("request ", i, ": ", session.status().message()));
    }
    sessions[i] = std::move(*session);
    if (absl::Status s = engine.SupportsPlan(sessions[i]->plan()); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("request ", i, ": ", s.message()));
    }
  }
  auto is_eos = [&](int32_t t) {
    for (int e : c.eos_token_ids) {
      if (t == e) return true;
    }
    return false;
  };

  std::vector<ModelBackend::SeqId> seqs(n);
  for (size_t i = 0; i < n; ++i) seqs[i] = engine.CreateSequence();
  absl::Cleanup free_all = [&] {
    for (ModelBackend::SeqId s : seqs) engine.FreeSequence(s).IgnoreError();
  };
  std::vector<Sampler> samplers;
  samplers.reserve(n);
  for (const GenerateRequest& r : requests) samplers.emplace_back(r.sampling);
  std::vector<GenerateResult> results(n);
  std::vector<bool> done(n, false);
  std::vector<int32_t> last(n);
  GenerateStats local;

  auto accept = [&](size_t i, int32_t token) {
    results[i].tokens.push_back(token);
    if (on_token) on_token(static_cast<int>(i), token);
    if (requests[i].stop_at_eos && is_eos(token)) {
      done[i] = true;
      results[i].finish_reason = "eos";
    } else if (static_cast<int>(results[i].tokens.size()) >= requests[i].max_tokens) {
      done[i] = true;
      results[i].finish_reason = "length";
    }
    last[i] = token;
  };

  // Prefill: all prompts in one step.
  const auto t0 = std::chrono::steady_clock::now();
  {
    std::vector<ModelBackend::StepItem> items(n);
    for (size_t i = 0; i < n; ++i) {
      items[i] = {seqs[i], std::span<const int32_t>(requests[i].prompt), false, nullptr,
                  &sessions[i]->plan()};
      results[i].prompt_tokens = static_cast<int>(requests[i].prompt.size());
      local.prompt_tokens += results[i].prompt_tokens;
    }
    std::vector<TokenDraw> draws(n);
    for (size_t i = 0; i < n; ++i) draws[i] = samplers[i].NextDraw();
    // Sampled by the backend (ModelBackend::StepSample), with the draws Sample would use.
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, engine.StepSample(items, draws));
    local.prefill_s = SecondsSince(t0);
    for (size_t i = 0; i < n; ++i) {
      results[i].time_to_first_token_s = local.prefill_s;
      accept(i, ids[i]);
    }
  }
  // Decode.
  const auto t1 = std::chrono::steady_clock::now();
  while (true) {
    std::vector<ModelBackend::StepItem> items;
    std::vector<size_t> which;
    for (size_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      items.push_back({seqs[i], std::span<const int32_t>(&last[i], 1), false, sessions[i]->selector()});
      which.push_back(i);
    }
    if (items.empty()) break;
    std::vector<TokenDraw> draws(which.size());
    for (size_t j = 0; j < which.size(); ++j) draws[j] = samplers[which[j]].NextDraw();
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, engine.StepSample(items, draws));
    ++local.decode_steps;
    for (size_t j = 0; j < which.size(); ++j) accept(which[j], ids[j]);
    for (size_t i : which) sessions[i]->AfterStep();  // closes the δ loop
  }
  local.decode_s = SecondsSince(t1);
  for (size_t i = 0; i < n; ++i) {
    local.generated_tokens += static_cast<int64_t>(results[i].tokens.size());
    results[i].sparsity = sessions[i]->selector()->Report();
    results[i].telemetry = sessions[i]->selector()->telemetry();
  }
  if (stats != nullptr) *stats = local;
  return results;
}

}  // namespace prehoc
