#include "worker/dlm/decoder.h"

#include <algorithm>
#include <chrono>
#include <limits>
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

absl::StatusOr<DiffuseResult> Diffuse(const DlmBackend& model, const DiffuseRequest& request,
                                      std::span<const double> drift,
                                      const DlmStepObserver& observer,
                                      const DlmInterrupt& interrupt) {
  RETURN_IF_ERROR(request.options.Validate());
  ASSIGN_OR_RETURN(DlmSchedule schedule,
                   MakeDlmSchedule(model.config(), request.options.cache,
                                   request.options.cache_overrides, drift));
  return DiffuseWithSchedule(model, request, schedule, observer, interrupt);
}

ForwardSpec SpecForPlan(const DlmStepPlan& plan, std::span<const int> update_rows) {
  ForwardSpec spec;
  spec.live = plan.live;
  spec.select = plan.select;
  spec.first_selective_layer = plan.first_selective_layer;
  spec.kv_all_rows = plan.kv_all_rows;
  if (plan.select != RowSelect::kAll) spec.update_rows = update_rows;
  return spec;
}

DlmStepPlan PlanStep(const DlmSchedule& schedule, DlmStepKind kind, int P, int L, int S, int bs,
                     int be) {
  DlmStepPlan plan;
  const int N = P + L + S;
  auto range = [&](int a, int b) {
    plan.live.resize(b - a);
    std::iota(plan.live.begin(), plan.live.end(), a);
  };
  switch (kind) {
    case DlmStepKind::kFull:
      range(0, N);
      return plan;
    case DlmStepKind::kGenRefresh:
      range(P, P + L);
      return plan;
    case DlmStepKind::kPartial:
      break;
  }
  switch (schedule.policy) {
    case DlmCachePolicy::kPrefix:
      range(bs, N);
      break;
    case DlmCachePolicy::kDual:
      range(bs, be);
      break;
    case DlmCachePolicy::kDllm:
      range(P, P + L);
      plan.select = RowSelect::kDllm;
      plan.first_selective_layer = 0;
      break;
    case DlmCachePolicy::kSpa:
    case DlmCachePolicy::kSpaAuto:
      range(P, P + L);
      plan.select = RowSelect::kSpa;
      plan.first_selective_layer = 1;
      plan.kv_all_rows = schedule.kv_all_rows;
      break;
    case DlmCachePolicy::kNone:
      range(0, N);
      break;
  }
  return plan;
}

DlmRequestRun::DlmRequestRun(const DlmBackend& model, const DiffuseRequest& request,
                             const DlmSchedule& schedule, DlmStepObserver observer)
    : model_(model), req_(request), opt_(request.options), schedule_(schedule),
      observer_(std::move(observer)), rng_(request.options.seed) {}

// Validates the request (errors as DiffuseWithSchedule) and makes its caches.
absl::Status DlmRequestRun::Init() {
  RETURN_IF_ERROR(opt_.Validate());
  const ModelConfig& c = model_.config();
  V_ = c.vocab_size;
  NL_ = c.num_hidden_layers;
  mask_ = model_.mask_id();
  P_ = static_cast<int>(req_.prompt.size());
  L_ = opt_.gen_length;
  S_ = static_cast<int>(req_.suffix.size());
  const int N = P_ + L_ + S_;
  if (P_ == 0) return Bad("prompt", "empty (pass at least one token, e.g. BOS)");
  for (const auto* part : {&req_.prompt, &req_.suffix}) {
    const char* name = part == &req_.prompt ? "prompt" : "suffix";
    for (size_t i = 0; i < part->size(); ++i) {
      const int32_t t = (*part)[i];
      if (t < 0 || t >= V_) {
        return Bad(name, absl::StrCat("token ", t, " at position ", i, " is outside [0, ", V_, ")"));
      }
      if (t == mask_) {
        return Bad(name, absl::StrCat("token at position ", i, " is the mask id ", mask_,
                                      " (masks belong in the response)"));
      }
    }
  }
  if (N > c.max_position_embeddings) {
    return Bad("gen_length", absl::StrCat("prompt ", P_, " + gen_length ", L_, " + suffix ", S_,
                                          " = ", N, " exceeds the model's context ",
                                          c.max_position_embeddings));
  }
  eos_ids_.assign(model_.eos_ids().begin(), model_.eos_ids().end());
  if (opt_.stop_at_eos && eos_ids_.empty()) {
    return Bad("stop_at_eos", "the model declares no end-of-text id");
  }
  spa_ = schedule_.policy == DlmCachePolicy::kSpa ||
         schedule_.policy == DlmCachePolicy::kSpaAuto;
  if (spa_ && model_.proxy_rank() <= 0) {
    return absl::FailedPreconditionError(
        "cache: spa needs the model's singular proxies (proxy_rank > 0)");
  }
  if (spa_ && static_cast<int>(schedule_.rho.size()) != NL_) {
    return Bad("schedule.rho",
               absl::StrCat("has ", schedule_.rho.size(), " layers, model has ", NL_));
  }
  result_.schedule = schedule_;
  stats().canvas_rows = N;
  stats().forward.Resize(NL_);
  canvas_.reserve(N);
  canvas_.insert(canvas_.end(), req_.prompt.begin(), req_.prompt.end());
  canvas_.insert(canvas_.end(), L_, mask_);
  canvas_.insert(canvas_.end(), req_.suffix.begin(), req_.suffix.end());
  ASSIGN_OR_RETURN(cache_, model_.NewCache(N));
  update_rows_.resize(NL_);
  for (int l = 0; l < NL_; ++l) update_rows_[l] = schedule_.UpdateRows(l, L_);
  bl_ = opt_.effective_block_length();
  nb_ = L_ / bl_;
  spb_ = opt_.effective_steps() / nb_;
  random_remask_ = opt_.remasking == "random";
  tau_ = opt_.parallel_threshold;
  return absl::OkStatus();
}

// Sets up the next step (spec and outputs); false when the request is finished.
bool DlmRequestRun::Prepare() {
  while (true) {
    if (b_ >= nb_ || stopped_) return false;
    const int bs = P_ + b_ * bl_, be = bs + bl_;
    if (!block_started_) {
      // LLaDA's get_num_transfer_tokens over the block's masks.
      int masks = 0;
      for (int r = bs; r < be; ++r) masks += canvas_[r] == mask_;
      transfer_.assign(spb_, masks / spb_);
      for (int i = 0; i < masks % spb_; ++i) transfer_[i]++;
      block_started_ = true;
      i_ = 0;
    }
    mask_rows_.clear();
    for (int r = bs; r < be; ++r) {
      if (canvas_[r] == mask_) mask_rows_.push_back(r);
    }
    // The block ends when it has no mask (with a fixed schedule, after spb steps).
    if (mask_rows_.empty() || (tau_ <= 0 && i_ >= spb_)) {
      stats().blocks++;
      if (opt_.stop_at_eos) {
        for (int r = P_; r < be; ++r) {
          if (IsEos(eos_ids_, canvas_[r])) stopped_ = true;
        }
      }
      ++b_;
      block_started_ = false;
      continue;
    }
    kind_ = schedule_.StepKind(step_, i_);
    plan_ = PlanStep(schedule_, kind_, P_, L_, S_, bs, be);
    spec_ = SpecForPlan(plan_, update_rows_);
    spec_.logit_rows = mask_rows_;
    spec_.store_proxy = spa_ && kind_ != DlmStepKind::kPartial;
    spec_.proxy_begin = P_;
    spec_.proxy_end = P_ + L_;
    switch (kind_) {
      case DlmStepKind::kFull: stats().full_steps++; break;
      case DlmStepKind::kGenRefresh: stats().gen_refresh_steps++; break;
      case DlmStepKind::kPartial: stats().partial_steps++; break;
    }
    return true;
  }
}

// The backend's work for the prepared step: top-1 rows (temperature 0) or full logits.
DlmBatchItem DlmRequestRun::item() {
  DlmBatchItem it;
  it.cache = cache_.get();
  it.canvas = canvas_;
  it.spec = &spec_;
  if (opt_.temperature > 0) {
    it.logits = &logits_;
  } else {
    it.top1 = &top1_;
    it.top1_prob = &top1_prob_;
  }
  it.stats = &stats().forward;
  return it;
}

// Chooses x0 and the confidence per masked row from the step's output and commits.
void DlmRequestRun::Commit() {
  stats().steps++;
  const int nm = static_cast<int>(mask_rows_.size());
  std::vector<int32_t> x0(nm);
  std::vector<double> conf(nm);
  if (opt_.temperature > 0) {
    for (int j = 0; j < nm; ++j) {
      const float* lg = logits_.data() + static_cast<size_t>(j) * V_;
      int best = 0;
      double best_score = -std::numeric_limits<double>::infinity();
      for (int v = 0; v < V_; ++v) {
        const double g = -std::log(-std::log(Uniform01(&rng_)));
        const double s = static_cast<double>(lg[v]) + opt_.temperature * g;
        if (s > best_score) best_score = s, best = v;
      }
      x0[j] = best;
      if (!random_remask_) {
        float mx = lg[0];
        for (int v = 1; v < V_; ++v) mx = std::max(mx, lg[v]);
        double sum = 0;
        for (int v = 0; v < V_; ++v) sum += std::exp(static_cast<double>(lg[v]) - mx);
        conf[j] = std::exp(static_cast<double>(lg[best]) - mx) / sum;
      }
    }
  } else {
    for (int j = 0; j < nm; ++j) {
      x0[j] = top1_[j];
      if (!random_remask_) conf[j] = top1_prob_[j];
    }
  }
  if (random_remask_) {
    for (int j = 0; j < nm; ++j) conf[j] = Uniform01(&rng_);
  }
  // Most confident first, ties by position.
  std::vector<int> order(nm);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b2) { return conf[a] > conf[b2]; });
  int take;
  if (tau_ > 0) {
    take = 1;
    while (take < nm && conf[order[take]] >= tau_) ++take;
  } else {
    take = std::min(transfer_[i_], nm);
  }
  std::vector<int> chosen(order.begin(), order.begin() + take);
  std::sort(chosen.begin(), chosen.end());
  DlmStepInfo info;
  info.step = step_;
  info.block = b_;
  info.block_step = i_;
  info.kind = kind_;
  info.masked_before = nm;
  if (observer_) {
    for (int j = 0; j < nm; ++j) {
      info.candidate_rows.push_back(mask_rows_[j] - P_);
      info.candidate_tokens.push_back(x0[j]);
      info.candidate_confidence.push_back(static_cast<float>(conf[j]));
    }
  }
  for (int j : chosen) {
    canvas_[mask_rows_[j]] = x0[j];
    info.committed_rows.push_back(mask_rows_[j] - P_);
    info.committed_tokens.push_back(x0[j]);
    info.committed_confidence.push_back(static_cast<float>(conf[j]));
  }
  stats().decoded_tokens += take;
  if (observer_) observer_(info);
  ++step_;
  ++i_;
}

// The result, with `seconds` as the loop's wall time and the batch's phase times.
DiffuseResult DlmRequestRun::Finish(double seconds, const ForwardStats& times) {
  DlmRunStats& st = stats();
  st.seconds = seconds;
  st.forward.AddTimes(times);
  result_.response.assign(canvas_.begin() + P_, canvas_.begin() + P_ + L_);
  result_.output = result_.response;
  // The output ends before the first end-of-text, whichever of the ids it is.
  auto it = std::find_if(result_.output.begin(), result_.output.end(),
                         [&](int32_t t) { return IsEos(eos_ids_, t); });
  result_.output.erase(it, result_.output.end());
  // Never-decoded rows (after an EOS stop) are not output.
  auto mit = std::find(result_.output.begin(), result_.output.end(), mask_);
  result_.output.erase(mit, result_.output.end());
  result_.finish_reason = stopped_ ? "eos" : "length";
  st.rows_per_step.assign(NL_, 0.0);
  st.recompute_fraction.assign(NL_, 0.0);
  for (int l = 0; l < NL_ && st.steps > 0; ++l) {
    st.rows_per_step[l] = static_cast<double>(st.forward.q_rows[l]) / st.steps;
    st.recompute_fraction[l] = st.rows_per_step[l] / st.canvas_rows;
  }
  return std::move(result_);
}



absl::StatusOr<std::vector<DiffuseResult>> DiffuseBatchWithSchedule(
    const DlmBackend& model, std::span<const DiffuseRequest> requests,
    const DlmSchedule& schedule, const DlmStepObserver& observer, const DlmInterrupt& interrupt) {
  if (requests.empty()) return Bad("requests", "empty batch");
  std::vector<std::unique_ptr<DlmRequestRun>> runs;
  runs.reserve(requests.size());
  for (const DiffuseRequest& r : requests) {
    runs.push_back(std::make_unique<DlmRequestRun>(model, r, schedule, observer));
    RETURN_IF_ERROR(runs.back()->Init());
  }
  ForwardStats times;
  std::vector<DlmBatchItem> items;
  const auto t_start = std::chrono::steady_clock::now();
  while (true) {
    items.clear();
    std::vector<DlmRequestRun*> active;
    for (auto& run : runs) {
      if (run->Prepare()) {
        items.push_back(run->item());
        active.push_back(run.get());
      }
    }
    if (items.empty()) break;
    if (interrupt) RETURN_IF_ERROR(interrupt());
    RETURN_IF_ERROR(model.ForwardBatch(items, &times));
    for (DlmRequestRun* run : active) run->Commit();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::vector<DiffuseResult> results;
  results.reserve(runs.size());
  for (auto& run : runs) results.push_back(run->Finish(seconds, times));
  return results;
}

absl::StatusOr<DiffuseResult> DiffuseWithSchedule(const DlmBackend& model,
                                                  const DiffuseRequest& request,
                                                  const DlmSchedule& schedule,
                                                  const DlmStepObserver& observer,
                                                  const DlmInterrupt& interrupt) {
  ASSIGN_OR_RETURN(std::vector<DiffuseResult> r,
                   DiffuseBatchWithSchedule(model, std::span(&request, 1), schedule, observer,
                                            interrupt));
  return std::move(r[0]);
}

}  // namespace prehoc::dlm
