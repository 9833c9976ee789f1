#include "cachemgr/router.h"

#include <algorithm>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachemgr/relay.h"
#include "common/logging.h"

namespace prehoc {

struct Router::Stream {
  std::string request_id;
  std::string sequence_id;
  std::string worker_id;
  std::string model;
  std::string policy;
  SparsityOptions sparsity;  // as requested (policy "" = the worker's default)
  PlanModelShape shape;      // of the model on the chosen worker
  InferenceCallback callback;
  std::shared_ptr<WorkerLink> link;
  absl::Time arrival;
  // This stream's children of the per-(model, policy) metric families, looked up once at
  // placement (a family lookup builds a label map and takes the family's lock: not per token).
  prometheus::Counter* tokens_metric = nullptr;
  prometheus::Histogram* ttft_metric = nullptr;
  absl::Mutex mu;  // serialises deliveries to `callback`
  bool done ABSL_GUARDED_BY(mu) = false;
  bool seen_token ABSL_GUARDED_BY(mu) = false;
};

RouterMetrics::RouterMetrics(prometheus::Registry& registry) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  requests = &BuildCounter()
                  .Name("prehoc_cachemgr_requests_total")
                  .Help("Requests at the cache manager by model, policy and outcome.")
                  .Register(registry);
  time_to_first_token_s = &BuildHistogram()
                               .Name("prehoc_cachemgr_time_to_first_token_seconds")
                               .Help("Arrival at the cache manager to the first token relayed.")
                               .Register(registry);
  tokens = &BuildCounter()
                .Name("prehoc_cachemgr_generation_tokens_total")
                .Help("Tokens relayed to clients.")
                .Register(registry);
  auto gauge = [&](const char* name, const char* help) {
    return &BuildGauge().Name(name).Help(help).Register(registry).Add({});
  };
  active_streams = gauge("prehoc_cachemgr_active_streams", "Client streams being relayed.");
  workers_registered = gauge("prehoc_cachemgr_workers", "Registered workers.");
  workers_ready = gauge("prehoc_cachemgr_workers_ready", "Registered workers that are ready.");
  worker_failures = &BuildCounter()
                         .Name("prehoc_cachemgr_worker_failures_total")
                         .Help("Workers declared dead after missed heartbeats.")
                         .Register(registry)
                         .Add({});
  sequences = gauge("prehoc_cachemgr_sequences", "Sequences placed on workers.");
  kv_pages_used = gauge("prehoc_cachemgr_kv_pages_used",
                        "KV pages held by placed sequences, as reported by the workers.");
  kv_pages_reserved = gauge("prehoc_cachemgr_kv_pages_reserved",
                            "KV pages reserved at placement (prompt + max_tokens).");
  kv_pages_total = gauge("prehoc_cachemgr_kv_pages_total", "KV pages of all registered workers.");
  delta_observed = &BuildHistogram()
                        .Name("prehoc_cachemgr_sparsity_delta_observed")
                        .Help("Exact dropped attention mass at each refresh, from worker telemetry.")
                        .Register(registry);
  kept_fraction = &BuildHistogram()
                       .Name("prehoc_cachemgr_sparsity_kept_fraction")
                       .Help("Per finished sequence: mean kept fraction, from worker telemetry.")
                       .Register(registry);
  refreshes = &BuildCounter()
                   .Name("prehoc_cachemgr_sparsity_refreshes_total")
                   .Help("Exact top-k refreshes reported by workers.")
                   .Register(registry);
  telemetry_batches = &BuildCounter()
                           .Name("prehoc_cachemgr_telemetry_batches_total")
                           .Help("Telemetry batches received from workers.")
                           .Register(registry)
                           .Add({});
}

namespace {

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* const b = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
      0.75,  1.0,    2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 60.0};
  return *b;
}

bool Serves(const WorkerSnapshot& w, const std::string& model) {
  if (model.empty()) return true;
  for (const ModelDescription& m : w.models) {
    if (m.name == model) return true;
  }
  return false;
}

}  // namespace

Router::Router(WorkerRegistry* workers, SequenceRegistry* sequences, RouterOptions options)
    : workers_(workers), sequences_(sequences), options_(std::move(options)) {}

Router::~Router() {
  std::vector<std::shared_ptr<Stream>> all;
  {
    absl::MutexLock l(&mu_);
    shutting_down_ = true;
    for (auto& [id, s] : streams_) all.push_back(s);
  }
  for (const auto& s : all) {
    Retire(s);
    ReleaseSequence(s->sequence_id);
    FailStream(s, absl::UnavailableError("cache manager shutting down"));
    s->link->Free(s->sequence_id);
  }
  absl::MutexLock l(&mu_);
  auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return link_outstanding_ == 0; };
  mu_.Await(absl::Condition(&drained));
}

absl::StatusOr<std::string> Router::Generate(InferenceRequest request,
                                             InferenceCallback callback) {
  if (request.request_id.size() > 128) {
    return absl::InvalidArgumentError(absl::StrCat("request_id: ", request.request_id.size(),
                                                   " bytes exceeds the limit of 128"));
  }
  for (char ch : request.request_id) {
    if (ch < 0x21 || ch > 0x7e) {
      return absl::InvalidArgumentError("request_id: must be printable ASCII without spaces");
    }
  }
  const int prompt_estimate =
      request.text.has_value() ? static_cast<int>(request.text->size()) + 1
                               : static_cast<int>(request.token_ids.size());
  auto stream = std::make_shared<Stream>();
  stream->callback = std::move(callback);
  stream->sparsity = request.sparsity;
  stream->policy = request.sparsity.policy.empty() ? "default" : request.sparsity.policy;
  stream->arrival = workers_->Now();
  {
    absl::MutexLock l(&mu_);
    if (shutting_down_ || draining_) {
      return absl::UnavailableError("cache manager is draining and accepts no new requests");
    }
    if (!request.request_id.empty() && streams_.contains(request.request_id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id: '", request.request_id, "' is already running"));
    }
    // ---- Placement.
    const std::vector<WorkerSnapshot> all = workers_->Snapshot();
    std::set<std::string> served;
    for (const WorkerSnapshot& w : all) {
      for (const ModelDescription& m : w.models) served.insert(m.name);
    }
    if (!request.model.empty() && !all.empty() && !served.contains(request.model)) {
      return absl::InvalidArgumentError(absl::StrCat("model: unknown model '", request.model,
                                                     "' (served: ",
                                                     absl::StrJoin(served, ", "), ")"));
    }
    const WorkerSnapshot* best = nullptr;
    double best_score = 0;
    int32_t best_free = 0;
    int ready = 0;
    std::vector<std::string> full_reasons;
    // Visit workers starting at a rotating offset so that ties alternate (round robin).
    for (size_t k = 0; k < all.size(); ++k) {
      const WorkerSnapshot& w = all[(k + static_cast<size_t>(next_id_)) % all.size()];
      if (!w.ready || !w.link->Healthy() || !Serves(w, request.model)) continue;
      ++ready;
      const SequenceUsage u = sequences_->Usage(w.worker_id);
      const int max_running = std::max(1, w.load.max_running);
      const int capacity = max_running + std::max(0, w.load.max_queue);
      const int32_t need =
          static_cast<int32_t>((prompt_estimate + request.max_tokens + w.page_size - 1) /
                               std::max(1, w.page_size));
      const int32_t free_pages = w.load.kv_pages_total - u.reserved_pages;
      if (u.sequences >= capacity) {
        full_reasons.push_back(absl::StrCat(w.worker_id, ": max_running=", w.load.max_running,
                                            " + max_queue=", w.load.max_queue, " sequences"));
        continue;
      }
      if (w.load.kv_pages_total > 0 && need > free_pages) {
        full_reasons.push_back(absl::StrCat(w.worker_id, ": needs ", need, " KV pages, ",
                                            free_pages, " of ", w.load.kv_pages_total,
                                            " unreserved"));
        continue;
      }
      const double score = static_cast<double>(u.sequences) / max_running;
      if (best == nullptr || score < best_score ||
          (score == best_score && free_pages > best_free)) {
        best = &w;
        best_score = score;
        best_free = free_pages;
      }
    }
    if (best == nullptr) {
      if (ready == 0) {
        return absl::UnavailableError(
            request.model.empty()
                ? std::string("no ready worker")
                : absl::StrCat("no ready worker for model '", request.model, "'"));
      }
      return absl::ResourceExhaustedError(
          absl::StrCat("all ", ready, " ready workers are full (",
                       absl::StrJoin(full_reasons, "; "), ")"));
    }
    stream->worker_id = best->worker_id;
    stream->link = best->link;
    for (const ModelDescription& m : best->models) {
      if (request.model.empty() || m.name == request.model) {
        stream->shape = {m.num_layers, m.num_kv_heads};
        break;
      }
    }
    stream->model = request.model.empty() && !best->models.empty() ? best->models[0].name
                                                                   : request.model;
    stream->sequence_id = absl::StrCat(options_.id_prefix, "-s", next_id_);
    stream->request_id = request.request_id.empty()
                             ? absl::StrCat(options_.id_prefix, "-", next_id_)
                             : request.request_id;
    ++next_id_;
    SequenceRecord rec;
    rec.sequence_id = stream->sequence_id;
    rec.request_id = stream->request_id;
    rec.worker_id = stream->worker_id;
    rec.model = stream->model;
    rec.policy = stream->policy;
    rec.reserved_pages = static_cast<int>(
        (prompt_estimate + request.max_tokens + best->page_size - 1) / std::max(1, best->page_size));
    rec.created = stream->arrival;
    absl::Status added = sequences_->Add(std::move(rec));
    if (!added.ok()) return added;
    if (options_.metrics != nullptr) {  // before any thread can see the stream
      const prometheus::Labels labels = {{"model", stream->model}, {"policy", stream->policy}};
      stream->tokens_metric = &options_.metrics->tokens->Add(labels);
      stream->ttft_metric =
          &options_.metrics->time_to_first_token_s->Add(labels, LatencyBuckets());
    }
    streams_.emplace(stream->request_id, stream);
    ++link_outstanding_;
  }
  UpdateGauges();
  const std::string request_id = stream->request_id;
  absl::Status started = stream->link->Start(
      stream->sequence_id, request,
      [this, stream](InferenceEvent ev) { OnLinkEvent(stream, std::move(ev)); });
  if (!started.ok()) {
    Retire(stream);
    ReleaseSequence(stream->sequence_id);
    absl::MutexLock l(&mu_);
    --link_outstanding_;
    return started;
  }
  return request_id;
}

void Router::OnLinkEvent(const std::shared_ptr<Stream>& s, InferenceEvent ev) {
  const bool terminal = ev.terminal();
  if (!terminal) {
    sequences_->Update(s->sequence_id, ev.sequence_length, ev.kv_pages);
    if (ev.first) OpenPlan(*s);
  } else {
    // Accounting first, so a client that saw its stream end sees the pages released.
    Retire(s);
    ReleaseSequence(s->sequence_id);
  }
  {
    absl::MutexLock l(&s->mu);
    if (!s->done) {
      ev.request_id = s->request_id;
      if (terminal) s->done = true;
      if (s->tokens_metric != nullptr && !ev.tokens.empty()) {
        if (!s->seen_token) {
          s->ttft_metric->Observe(absl::ToDoubleSeconds(workers_->Now() - s->arrival));
        }
        s->tokens_metric->Increment(static_cast<double>(ev.tokens.size()));
      }
      if (terminal && options_.metrics != nullptr) CountOutcome(*s, ev.status);
      if (!ev.tokens.empty()) s->seen_token = true;
      s->callback(std::move(ev));
    }
  }
  if (terminal) {
    UpdateGauges();
    absl::MutexLock l(&mu_);
    --link_outstanding_;
  }
}

bool Router::FailStream(const std::shared_ptr<Stream>& s, const absl::Status& status) {
  absl::MutexLock l(&s->mu);
  if (s->done) return false;
  s->done = true;
  InferenceEvent ev;
  ev.request_id = s->request_id;
  ev.status = status;
  if (options_.metrics != nullptr) CountOutcome(*s, status);
  s->callback(std::move(ev));
  return true;
}

void Router::CountOutcome(const Stream& s, const absl::Status& status) {
  options_.metrics->requests
      ->Add({{"model", s.model}, {"policy", s.policy}, {"outcome", RelayOutcome(status)}})
      .Increment();
}

void Router::OpenPlan(const Stream& s) {
  if (options_.plans == nullptr) return;
  absl::StatusOr<uint64_t> v =
      options_.plans->Open(s.sequence_id, s.worker_id, s.model, s.shape, s.sparsity);
  if (!v.ok() && v.status().code() != absl::StatusCode::kFailedPrecondition) {
    LOG(DEBUG) << "no selection plan for " << s.sequence_id << ": " << v.status();
  }
}

void Router::ReleaseSequence(const std::string& sequence_id) {
  sequences_->Remove(sequence_id);
  if (options_.plans != nullptr) options_.plans->Close(sequence_id);
}

void Router::Retire(const std::shared_ptr<Stream>& s) {
  absl::MutexLock l(&mu_);
  auto it = streams_.find(s->request_id);
  if (it != streams_.end() && it->second == s) streams_.erase(it);
}

absl::Status Router::Cancel(std::string_view request_id, absl::Status status) {
  if (status.ok()) status = absl::CancelledError("cancelled");
  std::shared_ptr<Stream> s;
  {
    absl::MutexLock l(&mu_);
    auto it = streams_.find(std::string(request_id));
    if (it == streams_.end()) {
      return absl::NotFoundError(
          absl::StrCat("request_id: no running request '", std::string(request_id), "'"));
    }
    s = it->second;
  }
  Retire(s);
  ReleaseSequence(s->sequence_id);
  FailStream(s, status);
  s->link->Free(s->sequence_id);
  UpdateGauges();
  return absl::OkStatus();
}

std::vector<ModelDescription> Router::ListModels() const {
  std::vector<ModelDescription> out;
  for (const WorkerSnapshot& w : workers_->Snapshot()) {
    if (!w.ready) continue;
    for (const ModelDescription& m : w.models) {
      if (std::none_of(out.begin(), out.end(),
                       [&](const ModelDescription& o) { return o.name == m.name; })) {
        out.push_back(m);
      }
    }
  }
  return out;
}

bool Router::Ready() const {
  {
    absl::MutexLock l(&mu_);
    if (shutting_down_ || draining_) return false;
  }
  for (const WorkerSnapshot& w : workers_->Snapshot()) {
    if (w.ready && w.link->Healthy()) return true;
  }
  return false;
}

void RouterMetrics::PrepareModel(const ModelDescription& model) {
  if (model.bidirectional) return;
  std::vector<std::string> policies = model.sparsity_policies;
  policies.push_back("default");
  PrepareOutcomeCounters(*requests, model.name, policies);
}

absl::StatusOr<int64_t> Router::RegisterWorker(WorkerRegistration registration) {
  for (const ModelDescription& m : registration.models) {
    if (options_.metrics != nullptr) options_.metrics->PrepareModel(m);
    if (options_.on_model_registered) options_.on_model_registered(m);
  }
  std::vector<std::string> live = registration.live_sequences;
  const std::string id = registration.worker_id;
  absl::StatusOr<int64_t> epoch = workers_->Register(std::move(registration));
  if (!epoch.ok()) return epoch;
  std::optional<WorkerSnapshot> w = workers_->Get(id);
  int orphans = 0;
  for (const std::string& seq : live) {
    if (!sequences_->Get(seq).has_value() && w.has_value()) {
      w->link->Free(seq);
      ++orphans;
    }
  }
  LOG(INFO) << "worker registered id=" << id << " address=" << (w ? w->address : "")
            << " epoch=" << *epoch << " live_sequences=" << live.size()
            << " orphans_freed=" << orphans;
  UpdateGauges();
  return epoch;
}

absl::Status Router::Heartbeat(const std::string& worker_id, int64_t epoch,
                               const LoadReport& load, bool ready) {
  return workers_->Heartbeat(worker_id, epoch, load, ready);
}

std::vector<std::string> Router::Tick() {
  std::vector<std::string> ids;
  for (WorkerSnapshot& w : workers_->ExpireDead(workers_->Now())) {
    ids.push_back(w.worker_id);
    if (options_.metrics != nullptr) options_.metrics->worker_failures->Increment();
    std::vector<std::shared_ptr<Stream>> victims;
    {
      absl::MutexLock l(&mu_);
      for (auto& [rid, s] : streams_) {
        if (s->worker_id == w.worker_id) victims.push_back(s);
      }
    }
    const std::vector<SequenceRecord> dropped = sequences_->RemoveWorker(w.worker_id);
    if (options_.plans != nullptr) {
      for (const SequenceRecord& r : dropped) options_.plans->Close(r.sequence_id);
    }
    LOG(WARNING) << "worker " << w.worker_id << " missed heartbeats: declared dead; failing "
                 << victims.size() << " streams, releasing " << dropped.size() << " sequences";
    const absl::Status status = DeadWorkerStatus(w.worker_id);
    for (const auto& s : victims) {
      Retire(s);
      FailStream(s, status);
      w.link->Free(s->sequence_id);
    }
  }
  UpdateGauges();
  return ids;
}

void Router::StartDrain() {
  absl::MutexLock l(&mu_);
  draining_ = true;
}

bool Router::WaitIdle(absl::Time deadline) { return AwaitNoStreams(mu_, streams_, deadline); }

namespace {
const prometheus::Histogram::BucketBoundaries& DeltaBuckets() {
  static const auto* const b = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5};
  return *b;
}
const prometheus::Histogram::BucketBoundaries& FractionBuckets() {
  static const auto* const b = new prometheus::Histogram::BucketBoundaries{
      0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0};
  return *b;
}
}  // namespace

void Router::RecordTelemetry(const TelemetryReport& report) {
  if (RouterMetrics* m = options_.metrics; m != nullptr) {
    m->telemetry_batches->Increment();
    std::map<std::string, std::string> policy_of;
    for (const TelemetryReport::Sequence& s : report.sequences) {
      policy_of[s.sequence_id] = s.policy;
      if (s.in_progress) continue;  // totals are counted once, when the sequence finished
      m->kept_fraction->Add({{"policy", s.policy}}, FractionBuckets()).Observe(s.mean_kept_fraction);
      m->refreshes->Add({{"policy", s.policy}}).Increment(static_cast<double>(s.refreshes));
    }
    // One child lookup per (batch, policy), not per sample.
    std::map<std::string, prometheus::Histogram*> hist;
    for (const TelemetryReport::Refresh& r : report.refreshes) {
      auto p = policy_of.find(r.sequence_id);
      const std::string& policy = p == policy_of.end() ? std::string("unknown") : p->second;
      prometheus::Histogram*& h = hist[policy];
      if (h == nullptr) h = &m->delta_observed->Add({{"policy", policy}}, DeltaBuckets());
      h->Observe(r.delta);
    }
  }
  if (options_.plans != nullptr && !report.refreshes.empty()) {
    std::vector<RefreshSample> samples;
    samples.reserve(report.refreshes.size());
    for (const TelemetryReport::Refresh& r : report.refreshes) {
      samples.push_back({r.sequence_id, r.layer, r.kv_head, r.delta});
    }
    options_.plans->Observe(samples);
  }
  absl::MutexLock l(&mu_);
  ++telemetry_batches_;
}

bool Router::AwaitTelemetry(int64_t n, absl::Time deadline) {
  absl::MutexLock l(&mu_);
  auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return telemetry_batches_ >= n; };
  return mu_.AwaitWithDeadline(absl::Condition(&enough), deadline);
}

int Router::ActiveStreams() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(streams_.size());
}

void Router::UpdateGauges() {
  RouterMetrics* m = options_.metrics;
  if (m == nullptr) return;
  const std::vector<WorkerSnapshot> all = workers_->Snapshot();
  int ready = 0;
  int64_t total = 0;
  for (const WorkerSnapshot& w : all) {
    ready += w.ready ? 1 : 0;
    total += w.load.kv_pages_total;
  }
  const SequenceUsage u = sequences_->Totals();
  m->workers_registered->Set(static_cast<double>(all.size()));
  m->workers_ready->Set(ready);
  m->kv_pages_total->Set(static_cast<double>(total));
  m->sequences->Set(u.sequences);
  m->kv_pages_used->Set(u.kv_pages);
  m->kv_pages_reserved->Set(u.reserved_pages);
  m->active_streams->Set(ActiveStreams());
}

}  // namespace prehoc
