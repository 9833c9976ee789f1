#include "services/common/embedded.h"

#include <atomic>
#include <filesystem>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "common/metrics_test_util.h"
#include "services/common/test_util.h"
#include "worker/generator.h"
#include "worker/testing/faulty_backend.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
using prehoc::testing::MetricSum;
namespace fs = std::filesystem;

EmbeddedOptions Options() {
  EmbeddedOptions o;
  o.engine.model_dir = (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
  o.engine.num_threads = 1;
  o.engine.kv_cache_bytes = 16 << 20;
  o.model_name = "tiny";
  return o;
}

TEST(EmbeddedTest, RouterOverLocalLinkEqualsGenerateBatchAndValidatesSynchronously) {
  auto cluster = EmbeddedCluster::Create(Options());
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  std::vector<GenerateRequest> reference;
  for (int i = 0; i < 6; ++i) {
    GenerateRequest g;
    g.prompt = {256, i, i + 1, i + 2};
    g.max_tokens = 4 + 2 * i;
    g.stop_at_eos = false;
    g.sparsity.policy = i % 2 ? "streaming" : "dense";
    g.sparsity.budget = 8;
    reference.push_back(g);
  }
  struct Out {
    absl::Mutex mu;
    std::vector<int32_t> tokens;
    InferenceEvent last;
    absl::Notification done;
  };
  std::vector<Out> outs(reference.size());
  for (size_t i = 0; i < reference.size(); ++i) {
    InferenceRequest r;
    r.token_ids = reference[i].prompt;
    r.max_tokens = reference[i].max_tokens;
    r.sparsity = reference[i].sparsity;
    Out* o = &outs[i];
    auto id = (*cluster)->backend().Generate(r, [o](InferenceEvent ev) {
      absl::MutexLock l(&o->mu);
      o->tokens.insert(o->tokens.end(), ev.tokens.begin(), ev.tokens.end());
      if (ev.terminal()) {
        o->last = ev;
        o->done.Notify();
      }
    });
    ASSERT_TRUE(id.ok()) << id.status();
  }
  auto engine = Engine::Create(Options().engine);
  ASSERT_TRUE(engine.ok());
  auto expected = GenerateBatch(**engine, reference);
  ASSERT_TRUE(expected.ok());
  for (size_t i = 0; i < outs.size(); ++i) {
    outs[i].done.WaitForNotification();
    absl::MutexLock l(&outs[i].mu);
    EXPECT_EQ(outs[i].tokens, (*expected)[i].tokens) << i;
    EXPECT_TRUE(outs[i].last.finished);
    EXPECT_EQ(outs[i].last.sparsity.policy, reference[i].sparsity.policy);
  }
  InferenceRequest bad;
  bad.token_ids = {256, 999};
  bad.max_tokens = 2;
  auto got = (*cluster)->backend().Generate(bad, [](InferenceEvent) { ADD_FAILURE(); });
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("token_ids[1]"));
  EXPECT_EQ((*cluster)->router().ActiveStreams(), 0);
}

TEST(EmbeddedTest, ServerSpeaksTheSameApi) {
  EmbeddedServerOptions o;
  o.cluster = Options();
  auto server = EmbeddedServer::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                                     grpc::InsecureChannelCredentials());
  EXPECT_EQ(*testing::CheckHealth(channel, "readiness"),
            grpc::health::v1::HealthCheckResponse::SERVING);
  auto stub = v1::Inference::NewStub(channel);
  v1::GenerateRequest req;
  req.set_text("abc");
  req.set_max_tokens(5);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  int tokens = 0;
  bool finished = false;
  std::string served_by;
  while (reader->Read(&m)) {
    tokens += m.token_ids_size();
    finished |= m.finished();
    if (!m.served_by().empty()) served_by = m.served_by();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 5);
  EXPECT_TRUE(finished);
  EXPECT_EQ(served_by, "embedded");
  grpc::ClientContext lctx;
  v1::ListModelsResponse models;
  ASSERT_TRUE(stub->ListModels(&lctx, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).name(), "tiny");
}

// Runs a Generate stream to its end; its final status.
grpc::Status GenerateStatus(v1::Inference::Stub* stub, const v1::GenerateRequest& req) {
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
  }
  return reader->Finish();
}

// A failed backend step: the stream ends INTERNAL, the in-process worker leaves the router's
// ready set (as a split-mode worker's ready=false heartbeat does), readiness turns NOT_SERVING and
// new requests are refused UNAVAILABLE.
TEST(EmbeddedTest, BackendFailureTurnsReadinessOff) {
  testing::FaultyBackend* backend = nullptr;
  EmbeddedServerOptions o;
  o.cluster = Options();
  o.cluster.wrap_backend = testing::WrapInFaultyBackend(&backend);
  auto server = EmbeddedServer::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_NE(backend, nullptr);
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                                     grpc::InsecureChannelCredentials());
  testing::HealthWatch readiness(channel, "readiness");
  ASSERT_TRUE(readiness.Await(grpc::health::v1::HealthCheckResponse::SERVING));
  EXPECT_TRUE((*server)->cluster().router().Ready());

  backend->FailSteps(absl::InternalError("CUDA error: an illegal memory access"));
  auto stub = v1::Inference::NewStub(channel);
  v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(256);
  req.set_max_tokens(3);
  {
    grpc::Status st = GenerateStatus(stub.get(), req);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INTERNAL);
    EXPECT_THAT(st.error_message(), HasSubstr("illegal memory access"));
  }
  ASSERT_TRUE(readiness.Await(grpc::health::v1::HealthCheckResponse::NOT_SERVING));
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"),
            grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_FALSE((*server)->cluster().router().Ready());
  EXPECT_FALSE((*server)->cluster().scheduler().Ready());
  EXPECT_EQ(GenerateStatus(stub.get(), req).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(backend->failed_steps(), 1);
}

// With liveness_follows_backend the failure turns liveness NOT_SERVING too.
TEST(EmbeddedTest, LivenessFollowsABackendFailureWhenAsked) {
  testing::FaultyBackend* backend = nullptr;
  EmbeddedServerOptions o;
  o.cluster = Options();
  o.cluster.wrap_backend = testing::WrapInFaultyBackend(&backend);
  o.liveness_follows_backend = true;
  auto server = EmbeddedServer::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                                     grpc::InsecureChannelCredentials());
  // Readiness turns NOT_SERVING after liveness (the server sets it last).
  testing::HealthWatch readiness(channel, "readiness");
  ASSERT_TRUE(readiness.Await(grpc::health::v1::HealthCheckResponse::SERVING));
  backend->FailSteps(absl::InternalError("CUDA error: an illegal memory access"));
  auto stub = v1::Inference::NewStub(channel);
  v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(256);
  req.set_max_tokens(3);
  EXPECT_EQ(GenerateStatus(stub.get(), req).error_code(), grpc::StatusCode::INTERNAL);
  ASSERT_TRUE(readiness.Await(grpc::health::v1::HealthCheckResponse::NOT_SERVING));
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"),
            grpc::health::v1::HealthCheckResponse::NOT_SERVING);
}

// Embedded mode runs the split-mode δ loop: a request with a δ target far below what its budget
// achieves measures violations at refreshes; the agent hands them to the cache-manager core's
// PlanManager, whose controller for (tiny, prhs, δ*) raises k, and the Scheduler applies the
// newer plan version at a step boundary while the request still runs.
TEST(EmbeddedTest, TargetDeltaRequestGetsItsPlansFromTheCacheManagerPlanner) {
  std::atomic<EmbeddedCluster*> cluster_ptr{nullptr};
  std::atomic<int> steps{0};
  std::atomic<bool> updated{false};
  EmbeddedOptions o = Options();
  o.telemetry_interval = absl::Milliseconds(5);
  // At the 8th step (6 decode steps measured δ), hold the step thread until a plan newer than
  // the initial one (version 2: the preset plus the controller's initial scales) was offered.
  o.scheduler.before_step = [&] {
    if (++steps != 8) return;
    EmbeddedCluster* c = cluster_ptr.load();
    std::vector<LiveSequenceInfo> live = c->scheduler().LiveSequences();
    if (live.size() != 1) return;
    updated = c->scheduler().AwaitPlan(live[0].request_id, 3, absl::Now() + absl::Seconds(30));
  };
  auto cluster = EmbeddedCluster::Create(o);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  cluster_ptr = cluster->get();
  InferenceRequest r;
  for (int j = 0; j < 150; ++j) r.token_ids.push_back(j == 0 ? 256 : (j * 37) % 256);
  r.max_tokens = 16;
  r.sparsity.policy = "prhs";
  r.sparsity.budget = 48;
  r.sparsity.target_delta = 1e-4;
  r.sparsity.overrides = "tau=0.9999";  // refresh (and measure δ) every step
  absl::Notification done;
  InferenceEvent last;
  auto id = (*cluster)->backend().Generate(r, [&](InferenceEvent ev) {
    if (!ev.terminal()) return;
    last = ev;
    done.Notify();
  });
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(120)));
  ASSERT_TRUE(last.status.ok()) << last.status;
  EXPECT_TRUE(updated.load());
  EXPECT_GE(last.sparsity.plan_version, 3);
  EXPECT_GE(last.sparsity.plan_updates, 1);
  const DeltaController* c = (*cluster)->plans().Controller("tiny", "prhs", 1e-4);
  ASSERT_NE(c, nullptr);
  EXPECT_GT(c->version(), 0u);
  prometheus::Registry& reg = (*cluster)->registry();
  EXPECT_GT(MetricSum(reg, "prehoc_cachemgr_delta_samples_total"), 0);
  EXPECT_GE(MetricSum(reg, "prehoc_cachemgr_selection_plans_sent_total"), 2);
  EXPECT_GE(MetricSum(reg, "prehoc_selection_plans_applied_total"), 1);
  EXPECT_EQ((*cluster)->plans().open_plans(), 0);  // closed with the sequence
}

}  // namespace
}  // namespace prehoc
