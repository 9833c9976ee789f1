#include "cachemgr/router.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "cachemgr/relay.h"
#include "common/metrics_test_util.h"
#include "prometheus/registry.h"

namespace prehoc {
namespace {

using ::prehoc::testing::MetricValue;
using ::testing::HasSubstr;

// A worker link whose streams the test drives by hand. Free ends a stream CANCELLED (as the
// real worker does).
class FakeLink : public WorkerLink {
 public:
  absl::Status Start(const std::string& seq, const InferenceRequest& request,
                     InferenceCallback callback) override {
    absl::MutexLock l(&mu_);
    started_.push_back(seq);
    requests_[seq] = request;
    callbacks_[seq] = std::move(callback);
    return absl::OkStatus();
  }
  void Free(const std::string& seq) override {
    InferenceCallback cb;
    {
      absl::MutexLock l(&mu_);
      freed_.push_back(seq);
      auto it = callbacks_.find(seq);
      if (it == callbacks_.end()) return;
      cb = std::move(it->second);
      callbacks_.erase(it);
    }
    InferenceEvent ev;
    ev.status = absl::CancelledError("freed");
    cb(ev);
  }
  bool Healthy() const override { return healthy_; }

  // Sends a non-terminal token event (or the terminal one when `finish`).
  void Emit(const std::string& seq, int32_t token, bool finish = false) {
    InferenceCallback cb;
    {
      absl::MutexLock l(&mu_);
      auto it = callbacks_.find(seq);
      ASSERT_NE(it, callbacks_.end()) << seq;
      cb = it->second;
      if (finish) callbacks_.erase(it);
    }
    InferenceEvent ev;
    {
      absl::MutexLock l(&mu_);
      ev.first = emitted_.insert(seq).second;  // as a worker marks its first event
    }
    ev.request_id = seq;
    ev.tokens = {token};
    ev.sequence_length = 10;
    ev.kv_pages = 1;
    if (finish) {
      ev.finished = true;
      ev.finish_reason = "length";
    }
    cb(ev);
  }
  std::vector<std::string> started() {
    absl::MutexLock l(&mu_);
    return started_;
  }
  std::vector<std::string> freed() {
    absl::MutexLock l(&mu_);
    return freed_;
  }
  std::atomic<bool> healthy_{true};

 private:
  absl::Mutex mu_;
  std::vector<std::string> started_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> freed_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, InferenceRequest> requests_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, InferenceCallback> callbacks_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> emitted_ ABSL_GUARDED_BY(mu_);
};

// Events of one client stream.
struct Client {
  absl::Mutex mu;
  std::vector<InferenceEvent> events ABSL_GUARDED_BY(mu);
  InferenceCallback Callback() {
    return [this](InferenceEvent ev) {
      absl::MutexLock l(&mu);
      events.push_back(std::move(ev));
    };
  }
  std::vector<InferenceEvent> Events() {
    absl::MutexLock l(&mu);
    return events;
  }
};

class RouterTest : public ::testing::Test {
 protected:
  RouterTest()
      : workers_({absl::Seconds(1), 2, [this] { return absl::FromUnixMicros(now_us_.load()); },
                  nullptr}),
        metrics_(registry_),
        router_(std::make_unique<Router>(&workers_, &sequences_,
                                         RouterOptions{"cm", &metrics_, &plans_})) {}

  std::shared_ptr<FakeLink> AddWorker(const std::string& id, int max_running = 4,
                                      int max_queue = 4, int pages = 1000,
                                      std::vector<std::string> live = {}) {
    auto link = std::make_shared<FakeLink>();
    WorkerRegistration r;
    r.worker_id = id;
    r.address = id + ":1";
    r.models = {ModelDescription{"tiny", "LlamaForCausalLM", 260, 256}};
    r.models[0].num_layers = 2;
    r.models[0].num_kv_heads = 2;
    r.page_size = 16;
    r.load.kv_pages_total = pages;
    r.load.max_running = max_running;
    r.load.max_queue = max_queue;
    r.ready = true;
    r.link = link;
    r.live_sequences = std::move(live);
    auto epoch = router_->RegisterWorker(r);
    EXPECT_TRUE(epoch.ok()) << epoch.status();
    epochs_[id] = *epoch;
    return link;
  }
  InferenceRequest Req(int max_tokens = 8) {
    InferenceRequest r;
    r.token_ids = {256, 1, 2};
    r.max_tokens = max_tokens;
    return r;
  }
  Client& NewClient() { return clients_.emplace_back(); }
  void Advance(absl::Duration d) { now_us_ += absl::ToInt64Microseconds(d); }

  std::atomic<int64_t> now_us_{1'000'000'000};
  WorkerRegistry workers_;
  SequenceRegistry sequences_;
  prometheus::Registry registry_;
  RouterMetrics metrics_;
  PlanManager plans_;
  std::deque<Client> clients_;  // destroyed after router_, which may still call them
  std::unique_ptr<Router> router_;
  std::map<std::string, int64_t> epochs_;
};

TEST_F(RouterTest, NoWorkerIsUnavailableAndUnknownModelIsInvalid) {
  EXPECT_FALSE(router_->Ready());
  Client& c = NewClient();
  EXPECT_EQ(router_->Generate(Req(), c.Callback()).status().code(),
            absl::StatusCode::kUnavailable);
  AddWorker("w1");
  EXPECT_TRUE(router_->Ready());
  InferenceRequest r = Req();
  r.model = "gpt-9";
  auto got = router_->Generate(r, c.Callback());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("model"));
  ASSERT_EQ(router_->ListModels().size(), 1u);
  EXPECT_EQ(router_->ListModels()[0].name, "tiny");
}

TEST_F(RouterTest, PlacementSpreadsStreamsAndRelaysEventsWithTheClientsRequestId) {
  auto a = AddWorker("a");
  auto b = AddWorker("b");
  std::vector<Client*> clients;
  for (int i = 0; i < 6; ++i) {
    InferenceRequest r = Req();
    if (i == 0) r.request_id = "mine";
    clients.push_back(&NewClient());
    ASSERT_TRUE(router_->Generate(r, clients[i]->Callback()).ok());
  }
  EXPECT_EQ(a->started().size(), 3u);
  EXPECT_EQ(b->started().size(), 3u);
  EXPECT_EQ(sequences_.Totals().sequences, 6);
  std::string seq;
  for (const SequenceRecord& r : sequences_.List()) {
    if (r.request_id == "mine") seq = r.sequence_id;
  }
  auto link = sequences_.Get(seq)->worker_id == "a" ? a : b;
  link->Emit(seq, 42);
  EXPECT_EQ(sequences_.Get(seq)->kv_pages, 1);
  link->Emit(seq, 43, /*finish=*/true);
  auto events = clients[0]->Events();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].request_id, "mine");
  EXPECT_EQ(events[0].tokens, std::vector<int32_t>{42});
  EXPECT_TRUE(events[1].finished);
  EXPECT_FALSE(sequences_.Get(seq).has_value());
  EXPECT_EQ(router_->ActiveStreams(), 5);
}

TEST_F(RouterTest, FullWorkersAreResourceExhaustedWithTheLimits) {
  AddWorker("a", /*max_running=*/1, /*max_queue=*/1);
  Client& c1 = NewClient();
  Client& c2 = NewClient();
  Client& c3 = NewClient();
  ASSERT_TRUE(router_->Generate(Req(), c1.Callback()).ok());
  ASSERT_TRUE(router_->Generate(Req(), c2.Callback()).ok());
  auto got = router_->Generate(Req(), c3.Callback());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("max_running=1"));
  // Pages: a request that needs more pages than the worker has unreserved.
  AddWorker("b", 8, 8, /*pages=*/4);
  auto big = router_->Generate(Req(/*max_tokens=*/200), c3.Callback());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(big.status().message()), HasSubstr("KV pages"));
}

TEST_F(RouterTest, DeadWorkerStreamsEndUnavailableAndItsPagesAreReleased) {
  auto a = AddWorker("a");
  auto b = AddWorker("b");
  std::vector<Client*> clients;
  for (int i = 0; i < 4; ++i) {
    clients.push_back(&NewClient());
    ASSERT_TRUE(router_->Generate(Req(), clients.back()->Callback()).ok());
  }
  for (const auto& s : a->started()) a->Emit(s, 1);
  for (const auto& s : b->started()) b->Emit(s, 1);
  EXPECT_EQ(sequences_.Usage("a").kv_pages, 2);

  // b keeps heartbeating, a goes silent: after two intervals only a is declared dead.
  Advance(absl::Milliseconds(1500));
  ASSERT_TRUE(router_->Heartbeat("b", epochs_["b"], LoadReport{1000, 0, 0, 0, 0, 4, 4}, true).ok());
  EXPECT_TRUE(router_->Tick().empty());
  Advance(absl::Milliseconds(1000));
  EXPECT_EQ(router_->Tick(), std::vector<std::string>{"a"});
  int unavailable = 0;
  for (Client* c : clients) {
    auto ev = c->Events();
    if (!ev.empty() && ev.back().status.code() == absl::StatusCode::kUnavailable) {
      ++unavailable;
      EXPECT_THAT(std::string(ev.back().status.message()), HasSubstr("worker a"));
    }
  }
  EXPECT_EQ(unavailable, 2);
  EXPECT_EQ(sequences_.Usage("a").sequences, 0);
  EXPECT_EQ(sequences_.Totals().sequences, 2);
  EXPECT_EQ(a->freed().size(), 2u);  // best-effort free sent to the (maybe partitioned) worker
  // A late heartbeat from a is refused: it must register again.
  EXPECT_EQ(router_->Heartbeat("a", epochs_["a"], {}, true).code(), absl::StatusCode::kNotFound);
  // The other streams finish normally.
  for (const auto& s : b->started()) b->Emit(s, 2, /*finish=*/true);
  EXPECT_EQ(sequences_.Totals().sequences, 0);
  EXPECT_EQ(sequences_.Totals().kv_pages, 0);
  EXPECT_EQ(router_->ActiveStreams(), 0);
}

TEST_F(RouterTest, CancelEndsTheClientStreamWithTheGivenStatusAndFreesTheSequence) {
  auto a = AddWorker("a");
  Client& c = NewClient();
  InferenceRequest r = Req();
  r.request_id = "x";
  ASSERT_TRUE(router_->Generate(r, c.Callback()).ok());
  EXPECT_EQ(router_->Generate(r, c.Callback()).status().code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(router_->Cancel("x", absl::DeadlineExceededError("late")).ok());
  auto ev = c.Events();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(a->freed(), a->started());
  EXPECT_EQ(router_->Cancel("x").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(sequences_.Totals().sequences, 0);
}

TEST_F(RouterTest, OrphanSequencesOfAPreviousInstanceAreFreedAtRegistration) {
  auto a = AddWorker("a", 4, 4, 1000, {"old-1", "old-2"});
  EXPECT_EQ(a->freed(), (std::vector<std::string>{"old-1", "old-2"}));
  // Stale epochs and unknown workers are NOT_FOUND.
  EXPECT_EQ(router_->Heartbeat("a", epochs_["a"] + 1, {}, true).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(router_->Heartbeat("zzz", 1, {}, true).code(), absl::StatusCode::kNotFound);
}

TEST_F(RouterTest, UnhealthyOrNotReadyWorkersAreSkipped) {
  auto a = AddWorker("a");
  auto b = AddWorker("b");
  a->healthy_ = false;
  ASSERT_TRUE(router_->Heartbeat("b", epochs_["b"], LoadReport{1000, 0, 0, 0, 0, 4, 4}, false).ok());
  Client& c = NewClient();
  EXPECT_EQ(router_->Generate(Req(), c.Callback()).status().code(),
            absl::StatusCode::kUnavailable);
  a->healthy_ = true;
  ASSERT_TRUE(router_->Generate(Req(), c.Callback()).ok());
  EXPECT_EQ(a->started().size(), 1u);
}

TEST_F(RouterTest, DestructionEndsStreamsUnavailable) {
  auto a = AddWorker("a");
  Client& c = NewClient();
  ASSERT_TRUE(router_->Generate(Req(), c.Callback()).ok());
  router_.reset();
  auto ev = c.Events();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].status.code(), absl::StatusCode::kUnavailable);
}

TEST_F(RouterTest, MetricsCountOutcomesAndWorkers) {
  auto a = AddWorker("a");
  Client& c1 = NewClient();
  Client& c2 = NewClient();
  ASSERT_TRUE(router_->Generate(Req(), c1.Callback()).ok());
  ASSERT_TRUE(router_->Generate(Req(), c2.Callback()).ok());
  a->Emit(a->started()[0], 5, true);
  router_->Tick();
  auto value = [&](const std::string& name, const std::string& outcome) {
    for (const auto& fam : registry_.Collect()) {
      if (fam.name != name) continue;
      for (const auto& m : fam.metric) {
        bool match = outcome.empty();
        for (const auto& lp : m.label) match |= lp.name == "outcome" && lp.value == outcome;
        if (!match) continue;
        if (fam.type == prometheus::MetricType::Counter) return m.counter.value;
        if (fam.type == prometheus::MetricType::Gauge) return m.gauge.value;
        return static_cast<double>(m.histogram.sample_count);
      }
    }
    return -1.0;
  };
  EXPECT_EQ(value("prehoc_cachemgr_requests_total", "ok"), 1);
  EXPECT_EQ(value("prehoc_cachemgr_time_to_first_token_seconds", ""), 1);
  EXPECT_EQ(value("prehoc_cachemgr_workers_ready", ""), 1);
  EXPECT_EQ(value("prehoc_cachemgr_sequences", ""), 1);
  EXPECT_EQ(value("prehoc_cachemgr_kv_pages_total", ""), 1000);
}

TEST(RelayOutcomeTest, EveryStatusCodeMapsToAListedOutcome) {
  const std::vector<std::string>& all = RelayOutcomes();
  for (int code = 0; code <= 16; ++code) {
    const std::string o = RelayOutcome(absl::Status(static_cast<absl::StatusCode>(code), "x"));
    EXPECT_NE(std::find(all.begin(), all.end(), o), all.end()) << "code " << code << " -> " << o;
  }
}

TEST_F(RouterTest, RegistrationCreatesOutcomeCountersAtZeroSoTheFirstRequestCountsInRate) {
  std::vector<std::string> hooked;
  RouterOptions o{"cm", &metrics_, &plans_};
  o.on_model_registered = [&hooked](const ModelDescription& m) { hooked.push_back(m.name); };
  router_ = std::make_unique<Router>(&workers_, &sequences_, o);
  auto link = std::make_shared<FakeLink>();
  WorkerRegistration r;
  r.worker_id = "w";
  r.address = "w:1";
  r.models = {ModelDescription{"tiny", "LlamaForCausalLM", 260, 256}};
  r.models[0].sparsity_policies = {"dense", "prhs"};
  ModelDescription dlm;
  dlm.name = "tiny-dlm";
  dlm.bidirectional = true;
  dlm.dlm_cache_policies = {"none", "spa"};
  r.models.push_back(dlm);
  r.ready = true;
  r.link = link;
  ASSERT_TRUE(router_->RegisterWorker(r).ok());
  EXPECT_EQ(hooked, (std::vector<std::string>{"tiny", "tiny-dlm"}));

  auto count = [&](const std::string& policy, const std::string& outcome) {
    return MetricValue(registry_, "prehoc_cachemgr_requests_total",
                       {{"model", "tiny"}, {"policy", policy}, {"outcome", outcome}});
  };
  int series = 0;
  for (const auto& fam : registry_.Collect()) {
    if (fam.name != "prehoc_cachemgr_requests_total") continue;
    for (const auto& m : fam.metric) {
      ++series;
      EXPECT_EQ(m.counter.value, 0);
    }
  }
  // dense, prhs and "default" (requests naming no policy); none for the diffusion model.
  EXPECT_EQ(series, 3 * static_cast<int>(RelayOutcomes().size()));
  EXPECT_EQ(count("default", "ok"), 0);
  EXPECT_EQ(count("prhs", "unavailable"), 0);

  InferenceRequest named_none = Req();
  named_none.sparsity.policy.clear();  // as a client request naming no policy arrives
  ASSERT_TRUE(router_->Generate(named_none, NewClient().Callback()).ok());
  link->Emit(link->started().at(0), 5, /*finish=*/true);
  EXPECT_EQ(count("default", "ok"), 1);
  EXPECT_EQ(count("default", "error"), 0);
  EXPECT_EQ(count("dense", "ok"), 0);
}

TEST_F(RouterTest, PlansOpenAtTheFirstTokenFollowTelemetryAndCloseWithTheSequence) {
  auto w = AddWorker("w1");
  Client& c = NewClient();
  InferenceRequest r = Req();
  r.sparsity.policy = "prhs";
  r.sparsity.budget = 48;
  r.sparsity.target_delta = 0.05;
  ASSERT_TRUE(router_->Generate(r, c.Callback()).ok());
  const std::string seq = w->started().at(0);
  EXPECT_FALSE(plans_.Get(seq).has_value());  // not before the worker holds the sequence
  w->Emit(seq, 5);
  ASSERT_TRUE(plans_.Get(seq).has_value());
  const uint64_t v0 = plans_.Get(seq)->plan.version;
  ASSERT_EQ(plans_.TakePending("w1").size(), 1u);

  TelemetryReport t;
  t.worker_id = "w1";
  t.sequences.push_back({seq, "prhs", 1.0, 0, 0, /*in_progress=*/true});
  t.refreshes.push_back({seq, /*layer=*/1, /*kv_head=*/1, /*delta=*/0.4});
  router_->RecordTelemetry(t);
  std::vector<PlanUpdate> u = plans_.TakePending("w1");
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].plan.version, v0 + 1);
  EXPECT_DOUBLE_EQ(u[0].plan.layers[1].head_k_scale[1], 1.5);
  for (const auto& fam : registry_.Collect()) {
    if (fam.name == "prehoc_cachemgr_sparsity_kept_fraction") {
      EXPECT_TRUE(fam.metric.empty());  // an in-progress record is not a finished sequence
    }
  }

  w->Emit(seq, 6, /*finish=*/true);
  EXPECT_FALSE(plans_.Get(seq).has_value());
  // Requests without an explicit sparse policy get no plan.
  ASSERT_TRUE(router_->Generate(Req(), NewClient().Callback()).ok());
  w->Emit(w->started().at(1), 5);
  EXPECT_EQ(plans_.open_plans(), 0);
}

}  // namespace
}  // namespace prehoc
