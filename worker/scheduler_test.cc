#include "worker/scheduler.h"

#include <atomic>
#include <filesystem>
#include <map>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "worker/engine.h"
#include "worker/generator.h"
#include "worker/testing/faulty_backend.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

std::unique_ptr<Engine> MakeEngine(int64_t kv_bytes = 16 << 20) {
  EngineOptions o;
  o.model_dir = (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
  o.num_threads = 1;
  o.kv_cache_bytes = kv_bytes;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return std::move(*e);
}

// Collects the events of one stream.
class Stream {
 public:
  InferenceCallback Callback() {
    return [this](InferenceEvent ev) {
      absl::MutexLock l(&mu_);
      for (int32_t t : ev.tokens) tokens_.push_back(t);
      text_ += ev.text;
      if (ev.first) first_seen_ = true;
      const bool terminal = ev.terminal();
      if (terminal) final_ = ev;
      ++events_;
      if (!ev.tokens.empty() && !first_token_.HasBeenNotified()) first_token_.Notify();
      if (terminal) done_.Notify();
    };
  }
  void WaitDone() { done_.WaitForNotification(); }
  void WaitFirstToken() { first_token_.WaitForNotification(); }
  std::vector<int32_t> tokens() {
    absl::MutexLock l(&mu_);
    return tokens_;
  }
  InferenceEvent final_event() {
    absl::MutexLock l(&mu_);
    return final_;
  }
  std::string text() {
    absl::MutexLock l(&mu_);
    return text_;
  }
  bool first_seen() {
    absl::MutexLock l(&mu_);
    return first_seen_;
  }

 private:
  absl::Mutex mu_;
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);
  std::string text_ ABSL_GUARDED_BY(mu_);
  bool first_seen_ ABSL_GUARDED_BY(mu_) = false;
  int events_ ABSL_GUARDED_BY(mu_) = 0;
  InferenceEvent final_ ABSL_GUARDED_BY(mu_);
  absl::Notification first_token_;
  absl::Notification done_;
};

// A before_step hook that blocks the step thread at its `block_at`-th call until Open().
class Gate {
 public:
  explicit Gate(int block_at) : block_at_(block_at) {}
  std::function<void()> Hook() {
    return [this] {
      absl::MutexLock l(&mu_);
      if (++calls_ == block_at_) {
        reached_.Notify();
        mu_.Await(absl::Condition(&open_));
      }
    };
  }
  void WaitReached() { reached_.WaitForNotification(); }
  void Open() {
    absl::MutexLock l(&mu_);
    open_ = true;
  }

 private:
  absl::Mutex mu_;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  const int block_at_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  absl::Notification reached_;
};

InferenceRequest Ids(std::vector<int32_t> ids, int max_tokens) {
  InferenceRequest r;
  r.token_ids = std::move(ids);
  r.max_tokens = max_tokens;
  return r;
}

std::vector<int32_t> Prompt(int n, int salt) {
  std::vector<int32_t> p = {256};
  for (int i = 1; i < n; ++i) p.push_back((i * 37 + salt * 11) % 256);
  return p;
}

TEST(SchedulerTest, GreedyOutputEqualsGenerateBatchWithChunkedPrefillAndStaggeredJoins) {
  SchedulerOptions o;
  o.max_running = 4;        // fewer than the requests: some wait and join later
  o.max_step_tokens = 12;   // forces prefill chunks to share steps with decode
  o.prefill_chunk = 5;
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok()) << sched.status();

  std::vector<GenerateRequest> reference;
  std::vector<InferenceRequest> requests;
  for (int i = 0; i < 7; ++i) {
    GenerateRequest g;
    g.prompt = Prompt(3 + 6 * i, i);
    g.max_tokens = 5 + 3 * i;
    g.stop_at_eos = false;
    reference.push_back(g);
    requests.push_back(Ids(g.prompt, g.max_tokens));
  }
  std::vector<Stream> streams(requests.size());
  // The first half goes in at once; the rest joins once the first stream is decoding.
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE((*sched)->Generate(requests[i], streams[i].Callback()).ok());
  }
  streams[0].WaitFirstToken();
  for (size_t i = 3; i < requests.size(); ++i) {
    ASSERT_TRUE((*sched)->Generate(requests[i], streams[i].Callback()).ok());
  }
  for (auto& s : streams) s.WaitDone();

  auto engine = MakeEngine();
  auto expected = GenerateBatch(*engine, reference);
  ASSERT_TRUE(expected.ok()) << expected.status();
  for (size_t i = 0; i < streams.size(); ++i) {
    EXPECT_EQ(streams[i].tokens(), (*expected)[i].tokens) << "request " << i;
    InferenceEvent f = streams[i].final_event();
    EXPECT_TRUE(f.finished);
    EXPECT_EQ(f.finish_reason, "length");
    EXPECT_EQ(f.completion_tokens, reference[i].max_tokens);
    EXPECT_EQ(f.prompt_tokens, static_cast<int>(reference[i].prompt.size()));
    EXPECT_EQ(f.sparsity.policy, "dense");
    EXPECT_TRUE(streams[i].first_seen());
  }
  ASSERT_TRUE((*sched)->WaitIdle(absl::InfiniteFuture()));
  LoadReport load = (*sched)->Load();
  EXPECT_EQ(load.kv_pages_used, 0);
  EXPECT_EQ(load.kv_pages_reserved, 0);
  EXPECT_EQ(load.running, 0);
}

TEST(SchedulerTest, TextPromptsStreamDecodedText) {
  auto sched = Scheduler::Create(MakeEngine(), SchedulerOptions{});
  ASSERT_TRUE(sched.ok());
  InferenceRequest r;
  r.text = "def f(x):";
  r.max_tokens = 8;
  Stream s;
  auto id = (*sched)->Generate(r, s.Callback());
  ASSERT_TRUE(id.ok()) << id.status();
  s.WaitDone();
  EXPECT_EQ(s.final_event().prompt_tokens, 10);  // BOS + 9 bytes
  auto tokens = s.tokens();
  std::string decoded = (*sched)->backend().tokenizer()->Decode(tokens);
  EXPECT_EQ(s.text(), TakeCompleteUtf8(&decoded, /*flush=*/true));
}

TEST(SchedulerTest, BadRequestsNameTheField) {
  auto sched = Scheduler::Create(MakeEngine(), SchedulerOptions{});
  ASSERT_TRUE(sched.ok());
  Scheduler& s = **sched;
  auto expect_invalid = [&](InferenceRequest r, const std::string& field) {
    auto got = s.Generate(std::move(r), [](InferenceEvent) { ADD_FAILURE() << "callback called"; });
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(got.status().message()), HasSubstr(field));
  };
  expect_invalid(Ids({}, 4), "token_ids");
  InferenceRequest empty_text;
  empty_text.text = "";
  empty_text.max_tokens = 4;
  expect_invalid(empty_text, "text");
  expect_invalid(Ids({256, 260}, 4), "token_ids[1]");
  expect_invalid(Ids({256, -1}, 4), "token_ids[1]");
  expect_invalid(Ids({256}, 0), "max_tokens");
  expect_invalid(Ids({256}, -3), "max_tokens");
  expect_invalid(Ids({256}, 100000), "max_tokens");
  expect_invalid(Ids(std::vector<int32_t>(250, 1), 10), "max_tokens");  // 250 + 10 > 256
  expect_invalid(Ids(std::vector<int32_t>(300, 1), 1), "token_ids");
  InferenceRequest big_text;
  big_text.text = std::string(1 << 20, 'x');
  big_text.max_tokens = 1;
  expect_invalid(big_text, "text");
  InferenceRequest model = Ids({256}, 4);
  model.model = "nope";
  expect_invalid(model, "model");
  InferenceRequest temp = Ids({256}, 4);
  temp.sampling.temperature = -1;
  expect_invalid(temp, "sampling.temperature");
  InferenceRequest policy = Ids({256}, 4);
  policy.sparsity.policy = "no-such-policy";
  expect_invalid(policy, "sparsity.policy");
  InferenceRequest override = Ids({256}, 4);
  override.sparsity.policy = "prhs";
  override.sparsity.overrides = "no_such_key=1";
  expect_invalid(override, "sparsity");
  InferenceRequest delta = Ids({256}, 4);
  delta.sparsity.target_delta = 1.5;
  expect_invalid(delta, "sparsity.target_delta");
  InferenceRequest id = Ids({256}, 4);
  id.request_id = "has space";
  expect_invalid(id, "request_id");

  // Still serving.
  Stream ok;
  ASSERT_TRUE(s.Generate(Ids({256, 1, 2}, 3), ok.Callback()).ok());
  ok.WaitDone();
  EXPECT_TRUE(ok.final_event().finished);
}

TEST(SchedulerTest, RestrictedPolicyListIsEnforced) {
  SchedulerOptions o;
  o.sparsity_policies = {"dense"};
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  InferenceRequest r = Ids({256}, 4);
  r.sparsity.policy = "prhs";
  auto got = (*sched)->Generate(r, [](InferenceEvent) { ADD_FAILURE(); });
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("sparsity.policy: 'prhs'"));
}

TEST(SchedulerTest, SparsePoliciesMatchGenerateBatchAndReport) {
  SchedulerOptions o;
  o.prefill_chunk = 64;
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  std::vector<GenerateRequest> reference;
  for (const char* policy : {"prhs", "streaming", "oracle", "dense"}) {
    GenerateRequest g;
    g.prompt = Prompt(150, 3);
    g.max_tokens = 40;
    g.stop_at_eos = false;
    g.sparsity.policy = policy;
    g.sparsity.budget = 48;
    reference.push_back(g);
  }
  std::vector<Stream> streams(reference.size());
  for (size_t i = 0; i < reference.size(); ++i) {
    InferenceRequest r = Ids(reference[i].prompt, reference[i].max_tokens);
    r.sparsity = reference[i].sparsity;
    ASSERT_TRUE((*sched)->Generate(r, streams[i].Callback()).ok());
  }
  for (auto& s : streams) s.WaitDone();
  auto engine = MakeEngine();
  auto expected = GenerateBatch(*engine, reference);
  ASSERT_TRUE(expected.ok()) << expected.status();
  for (size_t i = 0; i < reference.size(); ++i) {
    const InferenceEvent f = streams[i].final_event();
    EXPECT_EQ(streams[i].tokens(), (*expected)[i].tokens) << reference[i].sparsity.policy;
    EXPECT_EQ(f.sparsity.policy, reference[i].sparsity.policy);
    EXPECT_DOUBLE_EQ(f.sparsity.mean_kept_fraction, (*expected)[i].sparsity.mean_kept_fraction);
    EXPECT_EQ(f.sparsity.refreshes, (*expected)[i].sparsity.refreshes);
    if (reference[i].sparsity.policy != "dense") {
      EXPECT_LT(f.sparsity.mean_kept_fraction, 1.0) << reference[i].sparsity.policy;
    }
  }
}

TEST(SchedulerTest, TelemetryRecordsFinishedSequencesAndDeltaControllersAreShared) {
  SchedulerOptions o;
  o.telemetry_capacity = 3;
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  std::vector<Stream> streams(4);
  for (int i = 0; i < 4; ++i) {
    InferenceRequest r = Ids(Prompt(150, i), 30);
    r.sparsity.policy = "prhs";
    r.sparsity.budget = 48;
    r.sparsity.target_delta = 0.05;
    ASSERT_TRUE((*sched)->Generate(r, streams[i].Callback()).ok());
  }
  for (auto& s : streams) s.WaitDone();
  ASSERT_TRUE((*sched)->WaitIdle(absl::InfiniteFuture()));
  std::vector<SequenceTelemetry> t = (*sched)->TakeTelemetry();
  ASSERT_EQ(t.size(), 3u);  // capacity 3: the oldest record was dropped
  EXPECT_EQ((*sched)->telemetry_dropped(), 1);
  int64_t refreshes = 0;
  for (const SequenceTelemetry& s : t) {
    EXPECT_EQ(s.policy, "prhs");
    EXPECT_DOUBLE_EQ(s.target_delta, 0.05);
    EXPECT_EQ(s.length, 150 + 29);
    EXPECT_LT(s.report.mean_kept_fraction, 1.0);
    EXPECT_EQ(s.refresh_delta.size(), s.refresh_layer.size());
    EXPECT_LE(static_cast<int64_t>(s.refresh_delta.size()), s.report.refreshes);
    refreshes += s.report.refreshes;
  }
  EXPECT_GT(refreshes, 0);
  EXPECT_TRUE((*sched)->TakeTelemetry().empty());
}

TEST(SchedulerTest, AdmissionControlReportsTheLimit) {
  Gate gate(1);
  SchedulerOptions o;
  o.max_running = 1;
  o.max_queue = 1;
  o.before_step = gate.Hook();
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  Stream a, b;
  ASSERT_TRUE((*sched)->Generate(Ids({256, 5}, 4), a.Callback()).ok());
  gate.WaitReached();  // `a` is running, blocked before its first step
  ASSERT_TRUE((*sched)->Generate(Ids({256, 6}, 4), b.Callback()).ok());  // queued
  auto c = (*sched)->Generate(Ids({256, 7}, 4), [](InferenceEvent) { ADD_FAILURE(); });
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("max_queue=1"));
  LoadReport load = (*sched)->Load();
  EXPECT_EQ(load.queue_depth, 1);
  EXPECT_EQ(load.running, 1);
  gate.Open();
  a.WaitDone();
  b.WaitDone();
  EXPECT_TRUE(b.final_event().finished);

  // A request that cannot fit in the whole cache: 2 pages of 16 tokens.
  auto engine = MakeEngine();
  const int64_t page_bytes = KvPageBytes(engine->config(), 16);
  auto small = Scheduler::Create(MakeEngine(2 * page_bytes), SchedulerOptions{});
  ASSERT_TRUE(small.ok());
  auto d = (*small)->Generate(Ids({256, 1}, 40), [](InferenceEvent) { ADD_FAILURE(); });
  EXPECT_EQ(d.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(d.status().message()), HasSubstr("2 pages"));
}

TEST(SchedulerTest, PageReservationsQueueRequestsUntilPagesFree) {
  auto probe = MakeEngine();
  const int64_t page_bytes = KvPageBytes(probe->config(), 16);
  SchedulerOptions o;
  o.max_running = 8;
  auto sched = Scheduler::Create(MakeEngine(3 * page_bytes), o);  // 3 pages
  ASSERT_TRUE(sched.ok());
  std::vector<Stream> streams(4);
  for (int i = 0; i < 4; ++i) {  // each needs 2 pages (2 + 20 tokens): one runs at a time
    ASSERT_TRUE((*sched)->Generate(Ids({256, i}, 20), streams[i].Callback()).ok());
  }
  for (auto& s : streams) {
    s.WaitDone();
    EXPECT_TRUE(s.final_event().finished);
    EXPECT_EQ(s.tokens().size(), 20u);
  }
}

TEST(SchedulerTest, CancelEndsTheStreamAndFreesPages) {
  Gate gate(2);  // block before the second step (after the first token is delivered)
  SchedulerOptions o;
  o.before_step = gate.Hook();
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  InferenceRequest r = Ids({256, 1, 2, 3}, 50);
  r.request_id = "client-1";
  Stream s;
  auto id = (*sched)->Generate(r, s.Callback());
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, "client-1");
  // The same id cannot be used twice while running.
  EXPECT_EQ((*sched)->Generate(r, [](InferenceEvent) { ADD_FAILURE(); }).status().code(),
            absl::StatusCode::kAlreadyExists);
  gate.WaitReached();
  EXPECT_GT((*sched)->Load().kv_pages_used, 0);
  ASSERT_TRUE((*sched)->Cancel("client-1").ok());
  gate.Open();
  s.WaitDone();
  EXPECT_EQ(s.final_event().status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(s.tokens().size(), 50u);
  EXPECT_EQ((*sched)->Cancel("client-1").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE((*sched)->WaitIdle(absl::InfiniteFuture()));
  EXPECT_EQ((*sched)->Load().kv_pages_used, 0);
}

TEST(SchedulerTest, DeadlineEndsTheStreamWithDeadlineExceeded) {
  std::atomic<int64_t> now_us{1000000};
  SchedulerOptions o;
  o.clock = [&] { return absl::FromUnixMicros(now_us.load()); };
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  InferenceRequest r = Ids({256, 1, 2, 3}, 50);
  r.deadline = absl::FromUnixMicros(now_us.load() + 1000);
  absl::Mutex mu;
  int seen = 0;
  absl::Status final_status;
  absl::Notification done;
  ASSERT_TRUE((*sched)
                  ->Generate(r,
                             [&](InferenceEvent ev) {
                               absl::MutexLock l(&mu);
                               seen += static_cast<int>(ev.tokens.size());
                               if (seen == 3) now_us += 5000;  // time passes the deadline
                               if (ev.terminal()) {
                                 final_status = ev.status;
                                 done.Notify();
                               }
                             })
                  .ok());
  done.WaitForNotification();
  absl::MutexLock l(&mu);
  EXPECT_EQ(final_status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(seen, 3);
}

TEST(SchedulerTest, DrainRefusesNewWorkAndFinishesRunningWork) {
  Gate gate(1);
  SchedulerOptions o;
  o.before_step = gate.Hook();
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  Stream s;
  ASSERT_TRUE((*sched)->Generate(Ids({256, 9}, 6), s.Callback()).ok());
  gate.WaitReached();
  EXPECT_TRUE((*sched)->Ready());
  (*sched)->StartDrain();
  EXPECT_FALSE((*sched)->Ready());
  EXPECT_EQ((*sched)->Generate(Ids({256}, 2), [](InferenceEvent) {}).status().code(),
            absl::StatusCode::kUnavailable);
  gate.Open();
  EXPECT_TRUE((*sched)->WaitIdle(absl::InfiniteFuture()));
  EXPECT_TRUE(s.final_event().finished);
  EXPECT_EQ(s.tokens().size(), 6u);
}

TEST(SchedulerTest, DestructionEndsInFlightRequestsUnavailable) {
  SchedulerOptions o;
  o.step_delay = absl::Milliseconds(2);  // 200 tokens take >= 400 ms: still running at reset
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  Stream s;
  ASSERT_TRUE((*sched)->Generate(Ids({256, 9}, 200), s.Callback()).ok());
  s.WaitFirstToken();
  sched->reset();
  s.WaitDone();
  EXPECT_EQ(s.final_event().status.code(), absl::StatusCode::kUnavailable);
}

double Value(prometheus::Registry& reg, const std::string& name,
             const std::map<std::string, std::string>& labels) {
  for (const auto& fam : reg.Collect()) {
    if (fam.name != name) continue;
    for (const auto& m : fam.metric) {
      bool match = true;
      for (const auto& [k, v] : labels) {
        bool found = false;
        for (const auto& lp : m.label) found |= (lp.name == k && lp.value == v);
        match &= found;
      }
      if (!match) continue;
      if (fam.type == prometheus::MetricType::Counter) return m.counter.value;
      if (fam.type == prometheus::MetricType::Gauge) return m.gauge.value;
      if (fam.type == prometheus::MetricType::Histogram) {
        return static_cast<double>(m.histogram.sample_count);
      }
    }
  }
  return -1;
}

TEST(SchedulerTest, MetricsCountTokensOutcomesAndLatencies) {
  prometheus::Registry reg;
  SchedulerMetrics metrics(reg, "tiny");
  SchedulerOptions o;
  o.model_name = "tiny";
  o.metrics = &metrics;
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  std::vector<Stream> streams(3);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE((*sched)->Generate(Ids({256, i, i + 1}, 4), streams[i].Callback()).ok());
  }
  EXPECT_FALSE((*sched)->Generate(Ids({}, 4), [](InferenceEvent) {}).ok());
  for (auto& s : streams) s.WaitDone();
  ASSERT_TRUE((*sched)->WaitIdle(absl::InfiniteFuture()));
  const std::map<std::string, std::string> dense{{"model", "tiny"}, {"policy", "dense"}};
  auto with = [&](std::string k, std::string v) {
    auto l = dense;
    l[k] = v;
    return l;
  };
  EXPECT_EQ(Value(reg, "prehoc_requests_total", with("outcome", "ok")), 3);
  EXPECT_EQ(Value(reg, "prehoc_requests_total", with("outcome", "invalid_argument")), 1);
  EXPECT_EQ(Value(reg, "prehoc_generation_tokens_total", dense), 12);
  EXPECT_EQ(Value(reg, "prehoc_prompt_tokens_total", dense), 9);
  EXPECT_EQ(Value(reg, "prehoc_time_to_first_token_seconds", dense), 3);
  EXPECT_EQ(Value(reg, "prehoc_inter_token_latency_seconds", dense), 9);
  EXPECT_EQ(Value(reg, "prehoc_sparsity_kept_fraction", dense), 3);
  EXPECT_EQ(Value(reg, "prehoc_kv_cache_pages_used", {{"model", "tiny"}}), 0);
  EXPECT_GT(Value(reg, "prehoc_kv_cache_pages_total", {{"model", "tiny"}}), 0);
  EXPECT_EQ(Value(reg, "prehoc_ready", {{"model", "tiny"}}), 1);
}

TEST(SchedulerTest, BackendFailureIsStickyEndsRequestsAndTurnsReadinessOff) {
  prometheus::Registry reg;
  SchedulerMetrics metrics(reg, "tiny");
  auto faulty = std::make_unique<testing::FaultyBackend>(MakeEngine());
  testing::FaultyBackend* backend = faulty.get();
  Gate gate(3);  // step 1: prefill, step 2: a decode token, step 3: held here
  absl::Notification told;
  absl::Status told_status;
  int told_count = 0;  // written by the step thread before Notify, read after the wait
  SchedulerOptions o;
  o.model_name = "tiny";
  o.metrics = &metrics;
  o.max_running = 1;  // the second request waits in the queue
  o.before_step = gate.Hook();
  o.on_backend_failure = [&](const absl::Status& s) {
    told_status = s;
    if (++told_count == 1) told.Notify();
  };
  auto sched = Scheduler::Create(std::move(faulty), o);
  ASSERT_TRUE(sched.ok());
  Stream running, queued;
  ASSERT_TRUE((*sched)->Generate(Ids({256, 9}, 50), running.Callback()).ok());
  ASSERT_TRUE((*sched)->Generate(Ids({256, 8}, 50), queued.Callback()).ok());
  gate.WaitReached();
  EXPECT_TRUE((*sched)->Ready());
  EXPECT_TRUE((*sched)->backend_status().ok());
  EXPECT_EQ(Value(reg, "prehoc_worker_backend_healthy", {{"model", "tiny"}}), 1);
  backend->FailSteps(absl::InternalError("CUDA error: an illegal memory access"));
  gate.Open();

  running.WaitDone();
  EXPECT_EQ(running.final_event().status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(running.final_event().status.message(), HasSubstr("illegal memory access"));
  EXPECT_EQ(running.tokens().size(), 2u);  // from steps 1 (prefill) and 2; step 3 failed
  queued.WaitDone();
  EXPECT_EQ(queued.final_event().status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(queued.final_event().status.message(), HasSubstr("backend failed"));
  EXPECT_THAT(queued.final_event().status.message(), HasSubstr("illegal memory access"));
  told.WaitForNotification();
  EXPECT_EQ(told_status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(told_status.message(), HasSubstr("illegal memory access"));

  // Sticky: not ready, new requests refused naming the cause, no further step is attempted.
  EXPECT_FALSE((*sched)->Ready());
  EXPECT_EQ((*sched)->backend_status().code(), absl::StatusCode::kInternal);
  auto refused = (*sched)->Generate(Ids({256, 7}, 4), [](InferenceEvent) {});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(refused.status().message(), HasSubstr("backend failed"));
  EXPECT_THAT(refused.status().message(), HasSubstr("illegal memory access"));
  EXPECT_TRUE((*sched)->WaitIdle(absl::InfiniteFuture()));
  EXPECT_EQ(backend->failed_steps(), 1);
  EXPECT_EQ(backend->num_sequences(), 0);  // both sequences' pages were returned
  EXPECT_EQ((*sched)->Load().kv_pages_reserved, 0);
  EXPECT_EQ(Value(reg, "prehoc_ready", {{"model", "tiny"}}), 0);
  EXPECT_EQ(Value(reg, "prehoc_worker_backend_healthy", {{"model", "tiny"}}), 0);
  EXPECT_EQ(Value(reg, "prehoc_worker_backend_failures_total", {{"model", "tiny"}}), 1);
  const std::map<std::string, std::string> dense{{"model", "tiny"}, {"policy", "dense"}};
  auto outcome = [&](std::string o) {
    auto l = dense;
    l["outcome"] = o;
    return Value(reg, "prehoc_requests_total", l);
  };
  EXPECT_EQ(outcome("error"), 1);
  EXPECT_EQ(outcome("unavailable"), 2);  // the queued request and the refused one
  sched->reset();
  EXPECT_EQ(told_count, 1);
}

TEST(SchedulerTest, TakeCompleteUtf8HoldsBackPartialCharactersAndReplacesInvalidBytes) {
  std::string p = "ab\xC3";  // 'a', 'b', first byte of 'é'
  EXPECT_EQ(TakeCompleteUtf8(&p), "ab");
  EXPECT_EQ(p, "\xC3");
  p += "\xA9";
  EXPECT_EQ(TakeCompleteUtf8(&p), "\xC3\xA9");
  EXPECT_EQ(p, "");
  p = "\xE2\x82";  // 2 of 3 bytes of '€'
  EXPECT_EQ(TakeCompleteUtf8(&p), "");
  p += "\xAC!";
  EXPECT_EQ(TakeCompleteUtf8(&p), "\xE2\x82\xAC!");
  const std::string kBad = "\xEF\xBF\xBD";
  p = "\x80x";  // stray continuation byte
  EXPECT_EQ(TakeCompleteUtf8(&p), kBad + "x");
  p = "\xC3(";  // lead byte followed by a non-continuation
  EXPECT_EQ(TakeCompleteUtf8(&p), kBad + "(");
  p = "\xED\xA0\x80";  // a UTF-16 surrogate: invalid in UTF-8
  EXPECT_EQ(TakeCompleteUtf8(&p), kBad + kBad + kBad);
  p = "\xF0\x9F";  // incomplete, flushed at the end of the stream
  EXPECT_EQ(TakeCompleteUtf8(&p, /*flush=*/true), kBad);
  EXPECT_EQ(p, "");
}

// ---- Plans from the cache manager, dense fallbacks, running-sequence telemetry.

TEST(SchedulerTest, OfferedPlansAreSwappedInAtAStepBoundaryAndCountDenseFallbacks) {
  prometheus::Registry reg;
  SchedulerMetrics metrics(reg, "tiny");
  Gate gate(3);  // step 1 = prefill, step 2 = first decode; blocks before step 3 runs
  SchedulerOptions o;
  o.model_name = "tiny";
  o.metrics = &metrics;
  o.before_step = gate.Hook();
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  InferenceRequest r = Ids(Prompt(150, 1), 10);
  r.request_id = "seq-1";
  r.sparsity.policy = "prhs";
  r.sparsity.budget = 48;
  Stream s;
  ASSERT_TRUE((*sched)->Generate(r, s.Callback()).ok());
  gate.WaitReached();

  const ModelConfig& config = (*sched)->backend().config();
  SparsityOptions wide = r.sparsity;
  wide.budget = 400;  // ≥ every context this request reaches: the steps after the swap are dense
  auto plan = MakeSelectionPlan(config, wide);
  ASSERT_TRUE(plan.ok());
  plan->version = 5;
  const absl::Time produced = absl::Now() - absl::Seconds(100);
  EXPECT_EQ((*sched)->OfferPlan("nope", *plan, produced).code(), absl::StatusCode::kNotFound);
  SparsityOptions other = r.sparsity;
  other.policy = "streaming";
  auto streaming = MakeSelectionPlan(config, other);
  ASSERT_TRUE(streaming.ok());
  absl::Status wrong = (*sched)->OfferPlan("seq-1", *streaming, produced);
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong.message(), HasSubstr("streaming"));
  SelectionPlan short_plan = *plan;
  short_plan.layers.pop_back();
  EXPECT_EQ((*sched)->OfferPlan("seq-1", short_plan, produced).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE((*sched)->AwaitPlan("seq-1", 5, absl::Now()));
  ASSERT_TRUE((*sched)->OfferPlan("seq-1", *plan, produced).ok());
  SelectionPlan stale = *plan;
  stale.version = 3;
  stale.budget_tokens = 1;
  ASSERT_TRUE((*sched)->OfferPlan("seq-1", stale, produced).ok());  // older: ignored
  EXPECT_TRUE((*sched)->AwaitPlan("seq-1", 5, absl::Now() + absl::Seconds(10)));
  gate.Open();
  s.WaitDone();
  const InferenceEvent f = s.final_event();
  ASSERT_TRUE(f.finished) << f.status;
  EXPECT_EQ(f.sparsity.plan_version, 5);
  EXPECT_EQ(f.sparsity.plan_updates, 1);
  // 9 decode steps: the batch of step 3 was built before the offer, so steps 2 and 3 ran the
  // local 48-token plan (sparse at context 151, 152) and steps 4..10 the 400-token one (dense).
  EXPECT_EQ(f.sparsity.dense_fallback_steps, 7);
  EXPECT_LT(f.sparsity.mean_kept_fraction, 1.0);
  EXPECT_GT(f.sparsity.mean_kept_fraction, 7.0 / 9.0);
  const std::map<std::string, std::string> prhs{{"model", "tiny"}, {"policy", "prhs"}};
  EXPECT_EQ(Value(reg, "prehoc_sparsity_dense_fallbacks_total", prhs), 7);
  EXPECT_EQ(Value(reg, "prehoc_selection_plans_applied_total", prhs), 1);
  // The last step ran the offered plan, produced 100 s before.
  EXPECT_GE(Value(reg, "prehoc_selection_plan_age_seconds", {{"model", "tiny"}}), 100);
}

TEST(SchedulerTest, DenseFallbacksCountShortContextsNotDensePolicies) {
  prometheus::Registry reg;
  SchedulerMetrics metrics(reg, "tiny");
  SchedulerOptions o;
  o.model_name = "tiny";
  o.metrics = &metrics;
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  std::vector<Stream> streams(3);
  // prhs with B = 48 over contexts 21..59: every step with t <= 48 attends everything.
  InferenceRequest short_prhs = Ids(Prompt(20, 2), 40);
  short_prhs.sparsity.policy = "prhs";
  short_prhs.sparsity.budget = 48;
  InferenceRequest long_prhs = Ids(Prompt(150, 2), 10);
  long_prhs.sparsity = short_prhs.sparsity;
  InferenceRequest dense = Ids(Prompt(20, 2), 10);
  ASSERT_TRUE((*sched)->Generate(short_prhs, streams[0].Callback()).ok());
  ASSERT_TRUE((*sched)->Generate(long_prhs, streams[1].Callback()).ok());
  ASSERT_TRUE((*sched)->Generate(dense, streams[2].Callback()).ok());
  for (auto& s : streams) s.WaitDone();
  const int64_t short_steps = streams[0].final_event().sparsity.dense_fallback_steps;
  EXPECT_GE(short_steps, 28);  // decode steps 1..28 have t = 21..48 <= B
  EXPECT_LT(short_steps, 39);  // not all 39: at t = 59 sink + local + k(t) + dilation < t
  EXPECT_EQ(streams[1].final_event().sparsity.dense_fallback_steps, 0);
  EXPECT_EQ(streams[2].final_event().sparsity.dense_fallback_steps, 0);  // dense by request
  EXPECT_EQ(Value(reg, "prehoc_sparsity_dense_fallbacks_total",
                  {{"model", "tiny"}, {"policy", "prhs"}}),
            static_cast<double>(short_steps));
  EXPECT_EQ(Value(reg, "prehoc_sparsity_dense_fallbacks_total",
                  {{"model", "tiny"}, {"policy", "dense"}}),
            0);
}

TEST(SchedulerTest, TelemetryReportsRunningSequencesBoundedPerRecord) {
  Gate gate(12);
  SchedulerOptions o;
  o.before_step = gate.Hook();
  o.telemetry_deltas_per_sequence = 4;
  auto sched = Scheduler::Create(MakeEngine(), o);
  ASSERT_TRUE(sched.ok());
  InferenceRequest r = Ids(Prompt(150, 4), 30);
  r.request_id = "running";
  r.sparsity.policy = "prhs";
  r.sparsity.budget = 48;
  r.sparsity.overrides = "tau=0.9999";  // refresh at almost every step
  Stream s;
  ASSERT_TRUE((*sched)->Generate(r, s.Callback()).ok());
  gate.WaitReached();  // 10 decode steps ran, 2 layers x 2 kv heads each
  std::vector<SequenceTelemetry> t = (*sched)->TakeTelemetry();
  ASSERT_EQ(t.size(), 1u);
  EXPECT_TRUE(t[0].in_progress);
  EXPECT_EQ(t[0].request_id, "running");
  EXPECT_EQ(t[0].policy, "prhs");
  EXPECT_EQ(t[0].length, 150 + 10);
  EXPECT_EQ(t[0].refresh_delta.size(), 4u);  // bounded
  EXPECT_EQ(t[0].refresh_layer.size(), 4u);
  EXPECT_EQ(t[0].refresh_head.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_GE(t[0].refresh_layer[i], 0);
    EXPECT_LT(t[0].refresh_layer[i], 2);
    EXPECT_GE(t[0].refresh_head[i], 0);
    EXPECT_LT(t[0].refresh_head[i], 2);
    EXPECT_GE(t[0].refresh_delta[i], 0.0f);
    EXPECT_LE(t[0].refresh_delta[i], 1.0f);
  }
  const int64_t dropped = (*sched)->telemetry_deltas_dropped();
  EXPECT_GT(dropped, 0);
  EXPECT_TRUE((*sched)->TakeTelemetry().empty());  // nothing new while the step is held
  gate.Open();
  s.WaitDone();
  ASSERT_TRUE((*sched)->WaitIdle(absl::InfiniteFuture()));
  t = (*sched)->TakeTelemetry();
  ASSERT_EQ(t.size(), 1u);
  EXPECT_FALSE(t[0].in_progress);
  EXPECT_LE(t[0].refresh_delta.size(), 4u);
  EXPECT_GT(t[0].report.refreshes, 40);
  EXPECT_EQ(static_cast<int64_t>(t[0].refresh_delta.size()) + 4 +
                (*sched)->telemetry_deltas_dropped(),
            static_cast<int64_t>(s.final_event().sparsity.refreshes) - 4);
}

}  // namespace
}  // namespace prehoc
