#include "cachemgr/dlm_router.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "cachemgr/relay.h"
#include "common/logging.h"

namespace prehoc {

struct DlmRouter::Stream {
  std::string client_id;  // the id the client knows
  std::string worker_request_id;
  std::string worker_id;
  std::string model;
  std::string policy;
  std::shared_ptr<DiffusionLink> link;
  DiffusionCallback callback;
  absl::Mutex mu;  // serialises deliveries to `callback`
  bool ended ABSL_GUARDED_BY(mu) = false;
  absl::Status cancel_status ABSL_GUARDED_BY(mu);  // set by CancelDiffusion
};

namespace {

const ModelDescription* FindModel(const WorkerSnapshot& w, const std::string& model) {
  for (const ModelDescription& m : w.models) {
    if (model.empty() || m.name == model) return &m;
  }
  return nullptr;
}

}  // namespace

DlmRouterMetrics::DlmRouterMetrics(prometheus::Registry& registry) {
  requests = &prometheus::BuildCounter()
                  .Name("prehoc_cachemgr_dlm_requests_total")
                  .Help("Diffuse requests at the front door, by model, cache policy and outcome.")
                  .Register(registry);
  tokens = &prometheus::BuildCounter()
                .Name("prehoc_cachemgr_dlm_generated_tokens_total")
                .Help("Diffusion response tokens relayed to clients.")
                .Register(registry);
  steps = &prometheus::BuildCounter()
               .Name("prehoc_cachemgr_dlm_steps_total")
               .Help("Denoising steps reported by workers in final Diffuse messages.")
               .Register(registry);
  refreshes = &prometheus::BuildCounter()
                   .Name("prehoc_cachemgr_dlm_refreshes_total")
                   .Help("DLM cache refreshes (full + response refresh steps) reported by workers.")
                   .Register(registry);
  rows_recomputed = &prometheus::BuildCounter()
                         .Name("prehoc_cachemgr_dlm_tokens_recomputed_total")
                         .Help("Canvas rows recomputed per layer, as reported by workers.")
                         .Register(registry);
  active_streams = &prometheus::BuildGauge()
                        .Name("prehoc_cachemgr_dlm_active_streams")
                        .Help("Diffuse streams being relayed.")
                        .Register(registry)
                        .Add({});
}

void DlmRouterMetrics::PrepareModel(const ModelDescription& model) {
  if (!model.bidirectional) return;
  PrepareOutcomeCounters(*requests, model.name, model.dlm_cache_policies);
}

DlmRouter::DlmRouter(WorkerRegistry* workers, DlmRouterOptions options)
    : workers_(workers), options_(std::move(options)) {}

DlmRouter::~DlmRouter() {
  std::vector<std::shared_ptr<Stream>> all;
  {
    absl::MutexLock l(&mu_);
    draining_ = true;
    for (auto& [id, s] : streams_) all.push_back(s);
  }
  for (const auto& s : all) {
    DiffusionEvent ev;
    ev.status = absl::UnavailableError("cache manager shutting down");
    if (End(s, std::move(ev))) s->link->Cancel(s->worker_request_id);
  }
}

std::shared_ptr<DiffusionLink> DlmRouter::LinkFor(const WorkerSnapshot& w) {
  {
    absl::MutexLock l(&mu_);
    auto it = links_.find(w.worker_id);
    if (it != links_.end() && it->second.first == w.address) return it->second.second;
  }
  std::shared_ptr<DiffusionLink> link = options_.link_factory(w);
  absl::MutexLock l(&mu_);
  auto& slot = links_[w.worker_id];
  if (slot.second != nullptr && slot.first == w.address) return slot.second;  // lost a race
  slot = {w.address, link};
  return link;
}

absl::StatusOr<std::string> DlmRouter::Diffuse(DiffusionRequest request,
                                               DiffusionCallback callback) {
  {
    absl::MutexLock l(&mu_);
    if (draining_) return absl::UnavailableError("cache manager is draining");
    if (!request.request_id.empty() && streams_.contains(request.request_id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id: '", request.request_id, "' is already running"));
    }
  }
  // Candidates: ready workers with a healthy link serving the model as a diffusion LM.
  std::vector<WorkerSnapshot> candidates;
  const ModelDescription* autoregressive = nullptr;
  std::vector<WorkerSnapshot> all = workers_->Snapshot();
  for (const WorkerSnapshot& w : all) {
    if (!w.ready || (w.link != nullptr && !w.link->Healthy())) continue;
    const ModelDescription* m = FindModel(w, request.model);
    if (m == nullptr) continue;
    if (!m->bidirectional || m->dlm_cache_policies.empty()) {
      autoregressive = m;
      continue;
    }
    candidates.push_back(w);
  }
  if (candidates.empty()) {
    if (autoregressive != nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "model: '", autoregressive->name,
          "' is autoregressive (is_causal true); Diffuse needs a diffusion LM, use Generate"));
    }
    return absl::UnavailableError(
        request.model.empty() ? std::string("no ready worker")
                              : absl::StrCat("no ready worker serves model '", request.model, "'"));
  }
  std::shared_ptr<Stream> s = std::make_shared<Stream>();
  WorkerSnapshot chosen;
  uint64_t version;
  {
    absl::MutexLock l(&mu_);
    // Fewest active Diffuse streams first; ties round robin.
    int best = std::numeric_limits<int>::max();
    const size_t n = candidates.size();
    for (size_t k = 0; k < n; ++k) {
      const WorkerSnapshot& w = candidates[(round_robin_ + k) % n];
      const int active = per_worker_[w.worker_id];
      if (active < best) {
        best = active;
        chosen = w;
      }
    }
    round_robin_++;
    version = ++plan_version_;
  }
  const ModelDescription& m = *FindModel(chosen, request.model);
  // The plan: cachemgr/dlm_schedule on the model's shape, the request's overrides winning.
  request.plan.reset();
  absl::StatusOr<DlmSchedule> plan = ResolveDlmSchedule(request, m.num_layers, m.dlm_drift);
  if (!plan.ok()) return plan.status();
  plan->version = version;
  s->model = m.name;
  s->policy = plan->policy_name;
  s->worker_id = chosen.worker_id;
  s->callback = std::move(callback);
  s->link = LinkFor(chosen);
  {
    absl::MutexLock l(&mu_);
    if (draining_) return absl::UnavailableError("cache manager is draining");
    if (request.request_id.empty()) {
      do {
        s->client_id = absl::StrCat(options_.id_prefix, "-d", next_id_++);
      } while (streams_.contains(s->client_id));
    } else {
      if (streams_.contains(request.request_id)) {
        return absl::AlreadyExistsError(
            absl::StrCat("request_id: '", request.request_id, "' is already running"));
      }
      s->client_id = request.request_id;
    }
    s->worker_request_id = absl::StrCat(options_.id_prefix, "-dw", next_id_++);
    streams_[s->client_id] = s;
    per_worker_[s->worker_id]++;
    if (options_.metrics) options_.metrics->active_streams->Set(streams_.size());
  }
  DiffusionRequest forward = std::move(request);
  forward.request_id = s->worker_request_id;
  forward.model = m.name;
  forward.plan = std::move(*plan);
  absl::Status started =
      s->link->Start(forward, [this, s](DiffusionEvent ev) { OnWorkerEvent(s, std::move(ev)); });
  if (!started.ok()) {
    absl::MutexLock l(&mu_);
    streams_.erase(s->client_id);
    per_worker_[s->worker_id]--;
    if (options_.metrics) options_.metrics->active_streams->Set(streams_.size());
    return started;
  }
  return s->client_id;
}

void DlmRouter::OnWorkerEvent(const std::shared_ptr<Stream>& s, DiffusionEvent ev) {
  if (ev.terminal()) {
    End(s, std::move(ev));
    return;
  }
  ev.request_id = s->client_id;
  if (options_.metrics && !ev.tokens.empty()) {
    options_.metrics->tokens->Add({{"model", s->model}, {"policy", s->policy}})
        .Increment(static_cast<double>(ev.tokens.size()));
  }
  absl::MutexLock l(&s->mu);
  if (s->ended) return;
  s->callback(std::move(ev));
}

bool DlmRouter::End(const std::shared_ptr<Stream>& s, DiffusionEvent ev) {
  {
    absl::MutexLock l(&mu_);
    auto it = streams_.find(s->client_id);
    if (it != streams_.end() && it->second == s) {
      streams_.erase(it);
      per_worker_[s->worker_id]--;
      if (options_.metrics) options_.metrics->active_streams->Set(streams_.size());
    }
  }
  absl::MutexLock l(&s->mu);
  if (s->ended) return false;
  s->ended = true;
  // A stream we cancelled ends with the status we cancelled it with (the worker or the
  // transport may only report CANCELLED).
  if (!ev.status.ok() && !s->cancel_status.ok()) ev.status = s->cancel_status;
  ev.request_id = s->client_id;
  if (options_.metrics) {
    DlmRouterMetrics& m = *options_.metrics;
    m.requests->Add({{"model", s->model}, {"policy", s->policy}, {"outcome", RelayOutcome(ev.status)}})
        .Increment();
    if (ev.finished) {
      if (!ev.tokens.empty()) {
        m.tokens->Add({{"model", s->model}, {"policy", s->policy}})
            .Increment(static_cast<double>(ev.tokens.size()));
      }
      m.steps->Add({{"model", s->model}, {"policy", s->policy}}).Increment(ev.stats.steps);
      m.refreshes->Add({{"model", s->model}, {"policy", s->policy}})
          .Increment(static_cast<double>(ev.stats.refreshes()));
      for (size_t l = 0; l < ev.stats.rows_recomputed.size(); ++l) {
        m.rows_recomputed
            ->Add({{"model", s->model}, {"policy", s->policy}, {"layer", std::to_string(l)}})
            .Increment(static_cast<double>(ev.stats.rows_recomputed[l]));
      }
    }
  }
  s->callback(std::move(ev));
  return true;
}

absl::Status DlmRouter::CancelDiffusion(std::string_view request_id, absl::Status status) {
  if (status.ok()) status = absl::CancelledError("cancelled");
  std::shared_ptr<Stream> s;
  {
    absl::MutexLock l(&mu_);
    auto it = streams_.find(std::string(request_id));
    if (it == streams_.end()) {
      return absl::NotFoundError(
          absl::StrCat("request_id: no running Diffuse has id '", std::string(request_id), "'"));
    }
    s = it->second;
  }
  {
    absl::MutexLock l(&s->mu);
    if (s->cancel_status.ok()) s->cancel_status = status;
  }
  s->link->Cancel(s->worker_request_id);  // the worker's terminal event ends the stream
  return absl::OkStatus();
}

std::vector<std::string> DlmRouter::Tick() {
  std::vector<WorkerSnapshot> workers = workers_->Snapshot();
  std::vector<std::shared_ptr<Stream>> orphans;
  {
    absl::MutexLock l(&mu_);
    for (const auto& [id, s] : streams_) {
      const bool alive = std::any_of(workers.begin(), workers.end(), [&](const WorkerSnapshot& w) {
        return w.worker_id == s->worker_id;
      });
      if (!alive) orphans.push_back(s);
    }
  }
  std::vector<std::string> ids;
  for (const auto& s : orphans) {
    DiffusionEvent ev;
    ev.status = DeadWorkerStatus(s->worker_id);
    if (End(s, std::move(ev))) {
      ids.push_back(s->client_id);
      s->link->Cancel(s->worker_request_id);
    }
  }
  return ids;
}

void DlmRouter::StartDrain() {
  absl::MutexLock l(&mu_);
  draining_ = true;
}

bool DlmRouter::WaitIdle(absl::Time deadline) {
  return AwaitNoStreams(mu_, streams_, deadline);
}

int DlmRouter::ActiveStreams() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(streams_.size());
}

}  // namespace prehoc
