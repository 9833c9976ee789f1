// The cache manager and two workers in-process on 127.0.0.1:0 (the gRPC links are real).
#include "services/cachemgr/cachemgr_server.h"

#include <atomic>
#include <filesystem>
#include <set>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prehoc/v1/cachemgr.grpc.pb.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "services/common/embedded.h"
#include "services/common/plan_convert.h"
#include "services/common/proto_convert.h"
#include "common/metrics_test_util.h"
#include "services/common/test_util.h"
#include "services/worker/worker_server.h"
#include "worker/generator.h"
#include "worker/testing/faulty_backend.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
using prehoc::testing::MetricSum;
using grpc::health::v1::HealthCheckResponse;
namespace fs = std::filesystem;

std::string Fixture() {
  return (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
}

class CacheManagerServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CacheManagerServerOptions co;
    co.heartbeat_interval = absl::Milliseconds(500);
    StartCacheManager(co);
  }
  // (Re)starts the cache manager with `co` and connects the client stub to it.
  void StartCacheManager(const CacheManagerServerOptions& co) {
    cm_.reset();
    auto cm = CacheManagerServer::Create(co);
    ASSERT_TRUE(cm.ok()) << cm.status();
    cm_ = std::move(*cm);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", cm_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::Inference::NewStub(channel_);
  }
  void TearDown() override {
    workers_.clear();
    cm_.reset();
  }
  WorkerServer* AddWorker(
      absl::Duration step_delay = absl::ZeroDuration(), std::function<void()> before_step = nullptr,
      std::function<std::unique_ptr<ModelBackend>(std::unique_ptr<ModelBackend>)> wrap_backend =
          nullptr) {
    WorkerServerOptions o;
    o.engine.model_dir = Fixture();
    o.engine.num_threads = 1;
    o.engine.kv_cache_bytes = 16 << 20;
    o.model_name = "tiny";
    o.cachemgr_address = absl::StrCat("127.0.0.1:", cm_->port());
    o.scheduler.step_delay = step_delay;
    o.scheduler.before_step = std::move(before_step);
    o.wrap_backend = std::move(wrap_backend);
    auto w = WorkerServer::Create(o);
    EXPECT_TRUE(w.ok()) << w.status();
    workers_.push_back(std::move(*w));
    return workers_.back().get();
  }

  std::unique_ptr<CacheManagerServer> cm_;
  std::vector<std::unique_ptr<WorkerServer>> workers_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> stub_;
};

using testing::StepGate;

struct StreamResult {
  grpc::Status status;
  std::vector<v1::GenerateResponse> messages;
  std::vector<int32_t> tokens() const {
    std::vector<int32_t> t;
    for (const auto& m : messages) t.insert(t.end(), m.token_ids().begin(), m.token_ids().end());
    return t;
  }
};

StreamResult RunStream(v1::Inference::Stub* stub, const v1::GenerateRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  StreamResult r;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  while (reader->Read(&m)) r.messages.push_back(m);
  r.status = reader->Finish();
  return r;
}

v1::GenerateRequest IdsRequest(const std::vector<int32_t>& ids, int max_tokens) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  r.set_max_tokens(max_tokens);
  return r;
}

TEST_F(CacheManagerServerTest, ReadinessFollowsWorkersAndStreamsEqualEmbeddedOutput) {
  EXPECT_EQ(*testing::CheckHealth(channel_, "liveness"), HealthCheckResponse::SERVING);
  EXPECT_EQ(*testing::CheckHealth(channel_, "readiness"), HealthCheckResponse::NOT_SERVING);
  StreamResult none = RunStream(stub_.get(), IdsRequest({256, 1}, 2));
  EXPECT_EQ(none.status.error_code(), grpc::StatusCode::UNAVAILABLE);

  AddWorker();
  AddWorker();
  ASSERT_TRUE(cm_->workers().AwaitReady(2, absl::Now() + absl::Seconds(30)));
  auto services = testing::ListServicesByReflection(channel_);
  ASSERT_TRUE(services.ok());
  EXPECT_THAT(*services, ::testing::Contains("prehoc.v1.CacheManager"));

  std::vector<GenerateRequest> reference;
  for (int i = 0; i < 16; ++i) {
    GenerateRequest g;
    g.prompt = {256};
    for (int j = 0; j < 4 + 5 * (i % 7); ++j) g.prompt.push_back((j * 13 + i * 29) % 256);
    g.max_tokens = 5 + 3 * (i % 5);
    g.stop_at_eos = false;
    reference.push_back(g);
  }
  std::vector<StreamResult> results(reference.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reference.size(); ++i) {
    threads.emplace_back([&, i] {
      results[i] = RunStream(stub_.get(), IdsRequest(reference[i].prompt, reference[i].max_tokens));
    });
  }
  for (auto& t : threads) t.join();
  EngineOptions eo;
  eo.model_dir = Fixture();
  eo.num_threads = 1;
  auto engine = Engine::Create(eo);
  ASSERT_TRUE(engine.ok());
  auto expected = GenerateBatch(**engine, reference);
  ASSERT_TRUE(expected.ok());
  std::set<std::string> served_by;
  for (size_t i = 0; i < reference.size(); ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens(), (*expected)[i].tokens) << "stream " << i;
    served_by.insert(results[i].messages.front().served_by());
    EXPECT_TRUE(results[i].messages.back().finished());
    EXPECT_EQ(results[i].messages.back().usage().completion_tokens(), reference[i].max_tokens);
  }
  EXPECT_EQ(served_by.size(), 2u) << *served_by.begin();  // placement used both workers
  EXPECT_EQ(cm_->sequences().Totals().sequences, 0);
  {
    // Readiness turns SERVING (the health service streams the change).
    auto health = grpc::health::v1::Health::NewStub(channel_);
    grpc::ClientContext wctx;
    wctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    grpc::health::v1::HealthCheckRequest wreq;
    wreq.set_service("readiness");
    auto watch = health->Watch(&wctx, wreq);
    grpc::health::v1::HealthCheckResponse h;
    while (watch->Read(&h) && h.status() != HealthCheckResponse::SERVING) {
    }
    EXPECT_EQ(h.status(), HealthCheckResponse::SERVING);
    wctx.TryCancel();
  }

  // Cluster view over the internal API.
  auto cstub = v1::CacheManager::NewStub(channel_);
  grpc::ClientContext ctx;
  v1::ClusterState state;
  ASSERT_TRUE(cstub->GetClusterState(&ctx, v1::GetClusterStateRequest(), &state).ok());
  EXPECT_EQ(state.workers_size(), 2);
  EXPECT_EQ(state.kv_pages(), 0);
}

TEST_F(CacheManagerServerTest, WorkerValidationErrorsAndCancelPassThrough) {
  // The cancelled request is held after its first token (prefill, then the first decode step
  // blocks) so that the Cancel RPC always finds it running: without the gate a loaded machine
  // could finish all 200 tokens before the Cancel arrived (NOT_FOUND, stream OK). The refused
  // requests below never reach a step, so the held step is the cancelled request's.
  StepGate gate(2);
  AddWorker(absl::ZeroDuration(), gate.Hook());
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  StreamResult bad = RunStream(stub_.get(), IdsRequest({256, 300}, 4));
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.status.error_message(), HasSubstr("token_ids[1]"));
  StreamResult zero = RunStream(stub_.get(), IdsRequest({256}, 0));
  EXPECT_EQ(zero.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(zero.status.error_message(), HasSubstr("max_tokens"));
  v1::GenerateRequest model = IdsRequest({256}, 2);
  model.set_model("other");
  StreamResult m = RunStream(stub_.get(), model);
  EXPECT_EQ(m.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(m.status.error_message(), HasSubstr("model"));

  // Cancel by request id through the cache manager.
  v1::GenerateRequest req = IdsRequest({256, 5}, 200);
  req.set_request_id("via-cm");
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, req);
  v1::GenerateResponse first;
  ASSERT_TRUE(reader->Read(&first));
  EXPECT_EQ(first.request_id(), "via-cm");
  ASSERT_TRUE(gate.WaitReached(absl::Now() + absl::Seconds(30)));
  grpc::ClientContext cctx;
  v1::CancelRequest creq;
  creq.set_request_id("via-cm");
  v1::CancelResponse cresp;
  const grpc::Status cancelled = stub_->Cancel(&cctx, creq, &cresp);
  gate.Open();
  ASSERT_TRUE(cancelled.ok()) << cancelled.error_message();
  while (reader->Read(&first)) EXPECT_FALSE(first.finished());
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(cm_->router().WaitIdle(absl::Now() + absl::Seconds(30)));
  ASSERT_TRUE(workers_[0]->scheduler().WaitIdle(absl::Now() + absl::Seconds(30)));
  EXPECT_EQ(workers_[0]->scheduler().Load().kv_pages_used, 0);
  EXPECT_EQ(cm_->sequences().Totals().sequences, 0);
}

TEST_F(CacheManagerServerTest, WorkerGoingAwayMidStreamEndsItsStreamsUnavailable) {
  WorkerServer* w = AddWorker(absl::Milliseconds(2));
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, IdsRequest({256, 9}, 200));
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  w->Shutdown(absl::Now());  // no drain time: in-flight requests end UNAVAILABLE
  while (reader->Read(&m)) {
  }
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  ASSERT_TRUE(cm_->router().WaitIdle(absl::Now() + absl::Seconds(30)));
  EXPECT_EQ(cm_->sequences().Totals().kv_pages, 0);
}

// A worker whose backend failed heartbeats ready=false: the cache manager's readiness turns
// NOT_SERVING and it places nothing there; a healthy worker joining takes the next request.
TEST_F(CacheManagerServerTest, WorkerWithAFailedBackendIsNotReadyAndGetsNoRequests) {
  testing::FaultyBackend* backend = nullptr;
  WorkerServer* faulty =
      AddWorker(absl::ZeroDuration(), nullptr, testing::WrapInFaultyBackend(&backend));
  ASSERT_NE(backend, nullptr);
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  testing::HealthWatch readiness(channel_, "readiness");
  ASSERT_TRUE(readiness.Await(HealthCheckResponse::SERVING));

  backend->FailSteps(absl::InternalError("CUDA error: an illegal memory access"));
  StreamResult failed = RunStream(stub_.get(), IdsRequest({256, 3}, 4));
  EXPECT_EQ(failed.status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(failed.status.error_message(), HasSubstr("illegal memory access"));
  ASSERT_TRUE(readiness.Await(HealthCheckResponse::NOT_SERVING));  // after its next heartbeat
  auto snapshot = cm_->workers().Get(faulty->worker_id());
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_FALSE(snapshot->ready);
  StreamResult refused = RunStream(stub_.get(), IdsRequest({256, 4}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("no ready worker"));

  WorkerServer* healthy = AddWorker();
  ASSERT_TRUE(readiness.Await(HealthCheckResponse::SERVING));
  StreamResult ok = RunStream(stub_.get(), IdsRequest({256, 5}, 3));
  ASSERT_TRUE(ok.status.ok()) << ok.status.error_message();
  ASSERT_FALSE(ok.messages.empty());
  EXPECT_EQ(ok.messages.front().served_by(), healthy->worker_id());
  EXPECT_EQ(backend->failed_steps(), 1);
}

TEST_F(CacheManagerServerTest, WorkerTelemetryReachesTheCacheManagerMetrics) {
  AddWorker();
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  v1::GenerateRequest req;
  for (int j = 0; j < 150; ++j) req.mutable_token_ids()->add_ids(j == 0 ? 256 : (j * 37) % 256);
  req.set_max_tokens(40);
  req.mutable_sparsity()->set_policy(v1::SparsityParams::PRHS);
  req.mutable_sparsity()->set_budget(48);
  StreamResult r = RunStream(stub_.get(), req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const int64_t refreshes = r.messages.back().sparsity().refreshes();
  double counted = -1, observed = -1;
  auto collect = [&] {
    for (const auto& fam : cm_->registry().Collect()) {
      for (const auto& m : fam.metric) {
        bool prhs = false;
        for (const auto& l : m.label) prhs |= l.name == "policy" && l.value == "prhs";
        if (!prhs) continue;
        if (fam.name == "prehoc_cachemgr_sparsity_refreshes_total") counted = m.counter.value;
        if (fam.name == "prehoc_cachemgr_sparsity_delta_observed") {
          observed = static_cast<double>(m.histogram.sample_count);
        }
      }
    }
  };
  // The worker sends telemetry after each heartbeat; batches sent while the request ran carry
  // in-progress records (not counted as finished), so wait batch by batch for the final one.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  for (int64_t n = 1; counted != static_cast<double>(refreshes) &&
                      cm_->router().AwaitTelemetry(n, deadline);
       ++n) {
    collect();
  }
  EXPECT_EQ(counted, static_cast<double>(refreshes));
  EXPECT_GT(observed, 0);
}

v1::GenerateRequest PrhsRequest(double target_delta, int max_tokens) {
  v1::GenerateRequest req;
  for (int j = 0; j < 150; ++j) req.mutable_token_ids()->add_ids(j == 0 ? 256 : (j * 37) % 256);
  req.set_max_tokens(max_tokens);
  req.mutable_sparsity()->set_policy(v1::SparsityParams::PRHS);
  req.mutable_sparsity()->set_budget(48);
  req.mutable_sparsity()->set_target_delta(target_delta);
  return req;
}

// A telemetry batch with one refresh δ = delta(layer, kv head) for each of the tiny model's 2
// layers × 2 kv heads of sequence `seq`.
v1::TelemetryBatch SyntheticTelemetry(const std::string& seq, const std::string& worker_id,
                                      const std::function<double(int, int)>& delta) {
  v1::TelemetryBatch b;
  b.set_worker_id(worker_id);
  for (int layer = 0; layer < 2; ++layer) {
    for (int head = 0; head < 2; ++head) {
      v1::RefreshEvent* e = b.add_refreshes();
      e->set_sequence_id(seq);
      e->set_layer(layer);
      e->set_kv_head(head);
      e->set_delta(delta(layer, head));
    }
  }
  return b;
}

// Sends `batch` over CacheManager.ReportTelemetry; true once the cache manager recorded it.
bool SendTelemetry(const std::shared_ptr<grpc::Channel>& channel, const v1::TelemetryBatch& batch) {
  auto stub = v1::CacheManager::NewStub(channel);
  grpc::ClientContext ctx;
  v1::ReportTelemetryResponse resp;
  auto writer = stub->ReportTelemetry(&ctx, &resp);
  if (!writer->Write(batch)) return false;
  writer->WritesDone();
  return writer->Finish().ok();
}

// A synthetic telemetry batch (δ far above δ* at every layer and kv head) sent through
// CacheManager.ReportTelemetry drives the cache manager's controller; the new plan reaches the
// worker over StreamPlans and is swapped in at a step boundary.
TEST_F(CacheManagerServerTest, SyntheticTelemetryDrivesTheControllerAndTheWorkerAppliesThePlan) {
  StepGate gate(3);  // prefill, first decode, then held
  WorkerServer* w = AddWorker(absl::ZeroDuration(), gate.Hook());
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  StreamResult result;
  std::thread client([&] { result = RunStream(stub_.get(), PrhsRequest(0.05, 10)); });
  ASSERT_TRUE(gate.WaitReached(absl::Now() + absl::Seconds(30)));
  const std::vector<SequenceRecord> seqs = cm_->sequences().List();
  ASSERT_EQ(seqs.size(), 1u);
  const std::string seq = seqs[0].sequence_id;
  // The plan computed at the first token reaches the worker (version 2: the preset plus the
  // controller's initial per-head scales).
  ASSERT_TRUE(w->scheduler().AwaitPlan(seq, 1, absl::Now() + absl::Seconds(30)));
  const uint64_t v0 = cm_->plans().Get(seq)->plan.version;

  ASSERT_TRUE(SendTelemetry(channel_, SyntheticTelemetry(seq, w->worker_id(),
                                                         [](int, int) { return 0.3; })));

  const uint64_t v1 = cm_->plans().Get(seq)->plan.version;
  EXPECT_EQ(v1, v0 + 1);
  for (int layer = 0; layer < 2; ++layer) {
    EXPECT_EQ(cm_->plans().Get(seq)->plan.layers[layer].head_k_scale,
              std::vector<double>({1.5, 1.5}));
  }
  ASSERT_TRUE(w->scheduler().AwaitPlan(seq, v1, absl::Now() + absl::Seconds(30)));
  gate.Open();
  client.join();
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  const v1::SparsityReport& report = result.messages.back().sparsity();
  EXPECT_EQ(report.plan_version(), static_cast<int64_t>(v1));
  EXPECT_GE(report.plan_updates(), 1);
  EXPECT_GE(MetricSum(cm_->registry(), "prehoc_cachemgr_selection_plans_sent_total"), 2);
  EXPECT_GE(MetricSum(w->registry(), "prehoc_selection_plans_applied_total"), 1);
  EXPECT_EQ(cm_->plans().open_plans(), 0);  // closed with the sequence
}

// The whole loop with real telemetry: a request with a δ target far below what its budget
// achieves makes the worker measure violations at refreshes; they travel to the cache manager
// with the next heartbeat, its controller raises k and the worker applies a newer plan while
// the request still runs.
TEST_F(CacheManagerServerTest, TargetDeltaRequestGetsAPlanUpdateFromTheCacheManager) {
  std::atomic<WorkerServer*> worker{nullptr};
  std::atomic<int> steps{0};
  std::atomic<bool> updated{false};
  // At the 8th step (6 decode steps measured δ), hold the step thread until a plan newer than
  // the initial one (version 2) was offered: telemetry and plans flow on other threads.
  auto hook = [&] {
    if (++steps != 8) return;
    WorkerServer* w = worker.load();
    std::vector<LiveSequenceInfo> live = w->scheduler().LiveSequences();
    if (live.size() != 1) return;
    updated = w->scheduler().AwaitPlan(live[0].request_id, 3, absl::Now() + absl::Seconds(30));
  };
  worker = AddWorker(absl::ZeroDuration(), hook);
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  v1::GenerateRequest req = PrhsRequest(1e-4, 16);
  req.mutable_sparsity()->set_overrides("tau=0.9999");  // refresh (and measure δ) every step
  StreamResult r = RunStream(stub_.get(), req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_TRUE(updated.load());
  const v1::SparsityReport& report = r.messages.back().sparsity();
  EXPECT_GE(report.plan_version(), 3);
  EXPECT_GE(report.plan_updates(), 1);
  EXPECT_GT(MetricSum(cm_->registry(), "prehoc_cachemgr_delta_samples_total"), 0);
  EXPECT_GE(MetricSum(worker.load()->registry(), "prehoc_selection_plans_received_total"), 2);
}

// The cache manager's clock runs an hour behind the worker's. The worker estimates the offset
// from its register/heartbeat round trips (within half the round trip) and maps the plans' time
// stamps onto its own clock, so the plan age it reports is the real one (milliseconds), not the
// skew (uncorrected it would read about 3600 s).
TEST_F(CacheManagerServerTest, PlanAgeExcludesTheClockOffsetToTheCacheManager) {
  const absl::Duration skew = -absl::Hours(1);
  CacheManagerServerOptions co;
  co.heartbeat_interval = absl::Milliseconds(50);
  co.clock = [skew] { return absl::Now() + skew; };
  StartCacheManager(co);
  if (HasFatalFailure()) return;

  StepGate gate(3);  // prefill, first decode, then held until the plan was offered
  std::function<void()> gate_hook = gate.Hook();
  std::atomic<WorkerServer*> worker{nullptr};
  absl::Mutex mu;
  double max_age = -1;
  WorkerServer* w = AddWorker(absl::ZeroDuration(), [&] {
    gate_hook();
    if (WorkerServer* p = worker.load(); p != nullptr) {
      const double age = MetricSum(p->registry(), "prehoc_selection_plan_age_seconds");
      absl::MutexLock l(&mu);
      max_age = std::max(max_age, age);
    }
  });
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  StreamResult result;
  std::thread client([&] { result = RunStream(stub_.get(), PrhsRequest(0.05, 10)); });
  ASSERT_TRUE(gate.WaitReached(absl::Now() + absl::Seconds(30)));
  const std::string seq = w->scheduler().LiveSequences().at(0).request_id;
  ASSERT_TRUE(w->scheduler().AwaitPlan(seq, 1, absl::Now() + absl::Seconds(30)));
  // The plan stream opens only after the registration's round trip was sampled.
  const auto estimate = w->cachemgr_clock().estimate();
  ASSERT_TRUE(estimate.has_value());
  EXPECT_LE(absl::AbsDuration(estimate->offset - skew),
            estimate->rtt / 2 + absl::Microseconds(1));  // stamps carry microseconds
  EXPECT_NEAR(MetricSum(w->registry(), "prehoc_worker_cachemgr_clock_offset_seconds"),
              absl::ToDoubleSeconds(skew), 1.0);
  worker = w;  // measure from the step that applies the cache manager's plan on
  gate.Open();
  client.join();
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_GE(result.messages.back().sparsity().plan_updates(), 1);
  absl::MutexLock l(&mu);
  EXPECT_GE(max_age, 0.0);
  EXPECT_LT(max_age, 10.0);
}

// Embedded mode and split mode run the same planner: the same request held after its first
// decode step gets the same initial plan from both, and the same telemetry batches (sent over
// CacheManager.ReportTelemetry in split mode, handed to the embedded Router through the same
// TelemetryBatch conversion) produce the same sequence of plan versions, which both Schedulers
// are offered.
TEST_F(CacheManagerServerTest, EmbeddedModeProducesTheSamePlanSequenceForTheSameTelemetry) {
  StepGate split_gate(3), embedded_gate(3);  // prefill, first decode, then held
  WorkerServer* w = AddWorker(absl::ZeroDuration(), split_gate.Hook());
  EmbeddedOptions eo;
  eo.engine.model_dir = Fixture();
  eo.engine.num_threads = 1;
  eo.engine.kv_cache_bytes = 16 << 20;
  eo.model_name = "tiny";
  eo.scheduler.before_step = embedded_gate.Hook();
  eo.telemetry_interval = absl::Hours(1);  // only the batches below reach the planner
  auto em = EmbeddedCluster::Create(eo);
  ASSERT_TRUE(em.ok()) << em.status();
  ASSERT_TRUE(cm_->workers().AwaitReady(1, absl::Now() + absl::Seconds(30)));
  const v1::GenerateRequest req = PrhsRequest(0.05, 10);
  StreamResult split_result;
  std::thread client([&] { split_result = RunStream(stub_.get(), req); });
  absl::Notification embedded_done;
  InferenceEvent embedded_last;
  auto request = FromProto(req);
  ASSERT_TRUE(request.ok()) << request.status();
  ASSERT_TRUE((*em)->backend()
                  .Generate(*request,
                            [&](InferenceEvent ev) {
                              if (!ev.terminal()) return;
                              embedded_last = ev;
                              embedded_done.Notify();
                            })
                  .ok());
  ASSERT_TRUE(split_gate.WaitReached(absl::Now() + absl::Seconds(30)));
  ASSERT_TRUE(embedded_gate.WaitReached(absl::Now() + absl::Seconds(30)));
  const std::string split_seq = w->scheduler().LiveSequences().at(0).request_id;
  const std::string em_seq = (*em)->scheduler().LiveSequences().at(0).request_id;
  ASSERT_TRUE(w->scheduler().AwaitPlan(split_seq, 1, absl::Now() + absl::Seconds(30)));
  ASSERT_TRUE((*em)->scheduler().AwaitPlan(em_seq, 1, absl::Now() + absl::Seconds(30)));
  // A plan without its sequence id and time stamp.
  auto canonical = [](const PlanManager& plans, const std::string& seq) {
    return PlanToProto("", plans.Get(seq)->plan, absl::UnixEpoch()).SerializeAsString();
  };
  ASSERT_EQ(canonical(cm_->plans(), split_seq), canonical((*em)->plans(), em_seq));
  std::set<uint64_t> versions = {cm_->plans().Get(split_seq)->plan.version};
  // Violations, then δ far below δ*, then mixed per head.
  for (const double delta : {0.3, 0.2, 0.001, 0.0005, 0.12}) {
    auto per_head = [delta](int layer, int head) { return delta * (1 + head) / (1 + layer); };
    ASSERT_TRUE(
        SendTelemetry(channel_, SyntheticTelemetry(split_seq, w->worker_id(), per_head)));
    (*em)->router().RecordTelemetry(
        TelemetryReportFromProto(SyntheticTelemetry(em_seq, "embedded", per_head)));
    EXPECT_EQ(canonical(cm_->plans(), split_seq), canonical((*em)->plans(), em_seq))
        << "after delta " << delta;
    versions.insert(cm_->plans().Get(split_seq)->plan.version);
  }
  EXPECT_GE(versions.size(), 3u);  // the controller moved the plan more than once
  const uint64_t last = cm_->plans().Get(split_seq)->plan.version;
  ASSERT_TRUE(w->scheduler().AwaitPlan(split_seq, last, absl::Now() + absl::Seconds(30)));
  ASSERT_TRUE((*em)->scheduler().AwaitPlan(em_seq, last, absl::Now() + absl::Seconds(30)));
  split_gate.Open();
  embedded_gate.Open();
  client.join();
  ASSERT_TRUE(embedded_done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  ASSERT_TRUE(split_result.status.ok()) << split_result.status.error_message();
  ASSERT_TRUE(embedded_last.status.ok()) << embedded_last.status;
  EXPECT_EQ(split_result.messages.back().sparsity().plan_version(),
            embedded_last.sparsity.plan_version);
  EXPECT_EQ(embedded_last.sparsity.plan_version, static_cast<int64_t>(last));
}

}  // namespace
}  // namespace prehoc
