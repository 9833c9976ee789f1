// The worker server in-process on 127.0.0.1:0: the gRPC surface end to end.
#include "services/worker/worker_server.h"

#include <filesystem>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "common/tsan_annotations.h"
#include "services/common/test_util.h"
#include "worker/generator.h"
#include "worker/testing/faulty_backend.h"

namespace prehoc {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
namespace fs = std::filesystem;
using grpc::health::v1::HealthCheckResponse;

std::string Fixture() {
  return (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
}

using testing::StepGate;

WorkerServerOptions Options() {
  WorkerServerOptions o;
  o.engine.model_dir = Fixture();
  o.engine.num_threads = 1;
  o.engine.kv_cache_bytes = 16 << 20;
  o.model_name = "tiny";
  o.listen_address = "127.0.0.1:0";
  o.metrics_address = "";  // metrics only where tested
  o.max_request_bytes = 64 << 10;
  return o;
}

std::unique_ptr<WorkerServer> Start(WorkerServerOptions o = Options()) {
  auto s = WorkerServer::Create(std::move(o));
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

std::shared_ptr<grpc::Channel> Channel(const WorkerServer& s) {
  return grpc::CreateChannel(absl::StrCat("127.0.0.1:", s.port()),
                             grpc::InsecureChannelCredentials());
}

struct StreamResult {
  grpc::Status status;
  std::vector<v1::GenerateResponse> messages;
  std::vector<int32_t> tokens() const {
    std::vector<int32_t> t;
    for (const auto& m : messages) t.insert(t.end(), m.token_ids().begin(), m.token_ids().end());
    return t;
  }
};

StreamResult RunStream(v1::Inference::Stub* stub, const v1::GenerateRequest& req,
                       absl::Duration timeout = absl::Seconds(60)) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  StreamResult r;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  while (reader->Read(&m)) r.messages.push_back(m);
  r.status = reader->Finish();
  return r;
}

v1::GenerateRequest IdsRequest(std::vector<int32_t> ids, int max_tokens) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  r.set_max_tokens(max_tokens);
  return r;
}

TEST(WorkerServerTest, ConcurrentGreedyStreamsEqualEmbeddedGenerateBatch) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = v1::Inference::NewStub(Channel(*server));
  std::vector<GenerateRequest> reference;
  for (int i = 0; i < 8; ++i) {
    GenerateRequest g;
    g.prompt = {256};
    for (int j = 0; j < 5 + 7 * i; ++j) g.prompt.push_back((j * 31 + i * 17) % 256);
    g.max_tokens = 6 + 4 * i;
    g.stop_at_eos = false;
    reference.push_back(g);
  }
  std::vector<StreamResult> results(reference.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reference.size(); ++i) {
    threads.emplace_back([&, i] {
      results[i] = RunStream(stub.get(), IdsRequest(reference[i].prompt, reference[i].max_tokens));
    });
  }
  for (auto& t : threads) t.join();
  EngineOptions eo;
  eo.model_dir = Fixture();
  eo.num_threads = 1;
  eo.kv_cache_bytes = 16 << 20;
  auto engine = Engine::Create(eo);
  ASSERT_TRUE(engine.ok());
  auto expected = GenerateBatch(**engine, reference);
  ASSERT_TRUE(expected.ok()) << expected.status();
  for (size_t i = 0; i < reference.size(); ++i) {
    const StreamResult& r = results[i];
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens(), (*expected)[i].tokens) << "stream " << i;
    ASSERT_FALSE(r.messages.empty());
    EXPECT_FALSE(r.messages.front().request_id().empty());
    EXPECT_EQ(r.messages.front().served_by(), server->worker_id());
    const v1::GenerateResponse& last = r.messages.back();
    EXPECT_TRUE(last.finished());
    EXPECT_EQ(last.finish_reason(), "length");
    EXPECT_EQ(last.usage().completion_tokens(), reference[i].max_tokens);
    EXPECT_EQ(last.usage().prompt_tokens(), static_cast<int>(reference[i].prompt.size()));
    EXPECT_EQ(last.sparsity().policy(), "dense");
    EXPECT_DOUBLE_EQ(last.sparsity().mean_kept_fraction(), 1.0);
  }
  EXPECT_EQ(server->scheduler().Load().kv_pages_used, 0);
}

TEST(WorkerServerTest, TextPromptStreamsText) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = v1::Inference::NewStub(Channel(*server));
  v1::GenerateRequest req;
  req.set_text("hello");
  req.set_max_tokens(5);
  req.mutable_sparsity()->set_policy(v1::SparsityParams::STREAMING);
  StreamResult r = RunStream(stub.get(), req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.messages.back().usage().prompt_tokens(), 6);
  EXPECT_EQ(r.messages.back().sparsity().policy(), "streaming");
}

void ExpectInvalid(v1::Inference::Stub* stub, const v1::GenerateRequest& req,
                   const std::string& field) {
  StreamResult r = RunStream(stub, req);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
  EXPECT_THAT(r.status.error_message(), HasSubstr(field));
  EXPECT_TRUE(r.messages.empty());
}

TEST(WorkerServerTest, BadRequestsAreInvalidArgumentNamingTheFieldAndServerStaysUp) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto stub = v1::Inference::NewStub(Channel(*server));
  v1::GenerateRequest no_prompt;
  no_prompt.set_max_tokens(4);
  ExpectInvalid(stub.get(), no_prompt, "prompt");
  ExpectInvalid(stub.get(), IdsRequest({}, 4), "token_ids");
  v1::GenerateRequest empty_text;
  empty_text.set_text("");
  empty_text.set_max_tokens(4);
  ExpectInvalid(stub.get(), empty_text, "text");
  v1::GenerateRequest model = IdsRequest({256}, 4);
  model.set_model("llama-70b");
  ExpectInvalid(stub.get(), model, "model");
  ExpectInvalid(stub.get(), IdsRequest({256, 1, 999}, 4), "token_ids[2]");
  ExpectInvalid(stub.get(), IdsRequest({256}, 0), "max_tokens");
  ExpectInvalid(stub.get(), IdsRequest({256}, -5), "max_tokens");
  ExpectInvalid(stub.get(), IdsRequest({256}, 1000), "max_tokens");
  v1::GenerateRequest sampling = IdsRequest({256}, 4);
  sampling.mutable_sampling()->set_top_p(2.0f);
  ExpectInvalid(stub.get(), sampling, "sampling.top_p");
  v1::GenerateRequest long_text;
  long_text.set_text(std::string(10000, 'a'));  // under the byte limit, over the context
  long_text.set_max_tokens(4);
  ExpectInvalid(stub.get(), long_text, "text");
  v1::GenerateRequest oversized;
  oversized.set_text(std::string(100 << 10, 'a'));  // over max_request_bytes (64 KiB)
  oversized.set_max_tokens(4);
  ExpectInvalid(stub.get(), oversized, "request");

  // Still up and serving.
  StreamResult ok = RunStream(stub.get(), IdsRequest({256, 3}, 3));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  grpc::ClientContext ctx;
  v1::ListModelsResponse models;
  ASSERT_TRUE(stub->ListModels(&ctx, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).name(), "tiny");
  EXPECT_EQ(models.models(0).vocab_size(), 260);
  EXPECT_EQ(models.models(0).max_context(), 256);
  EXPECT_THAT(models.models(0).sparsity_policies(), Contains("prhs"));
}

TEST(WorkerServerTest, CancelByRequestIdAndByClientEndTheStreamAndFreePages) {
  StepGate gate(2);
  WorkerServerOptions o = Options();
  o.scheduler.before_step = gate.Hook();
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Inference::NewStub(Channel(*server));

  v1::GenerateRequest req = IdsRequest({256, 1, 2}, 100);
  req.set_request_id("cancel-me");
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse first;
  ASSERT_TRUE(reader->Read(&first));
  EXPECT_EQ(first.request_id(), "cancel-me");
  gate.WaitReached();
  {
    grpc::ClientContext cctx;
    v1::CancelRequest creq;
    creq.set_request_id("cancel-me");
    v1::CancelResponse cresp;
    ASSERT_TRUE(stub->Cancel(&cctx, creq, &cresp).ok());
  }
  gate.Open();
  v1::GenerateResponse m;
  while (reader->Read(&m)) EXPECT_FALSE(m.finished());
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  {
    grpc::ClientContext cctx;
    v1::CancelRequest creq;
    creq.set_request_id("cancel-me");
    v1::CancelResponse cresp;
    EXPECT_EQ(stub->Cancel(&cctx, creq, &cresp).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  // Client-side cancellation reaches the step loop.
  grpc::ClientContext ctx2;
  auto reader2 = stub->Generate(&ctx2, IdsRequest({256, 4}, 200));
  ASSERT_TRUE(reader2->Read(&m));
  ctx2.TryCancel();
  while (reader2->Read(&m)) {
  }
  EXPECT_EQ(reader2->Finish().error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(server->scheduler().WaitIdle(absl::Now() + absl::Seconds(30)));
  EXPECT_EQ(server->scheduler().Load().kv_pages_used, 0);
}

TEST(WorkerServerTest, DeadlineIsHonouredAndTheRequestIsReaped) {
#ifdef PREHOC_TSAN
  // Under TSan about 1 run in 60 (3 in parallel) reports a race entirely inside gRPC 1.51's
  // callback machinery when the client's deadline cancels the call: the call teardown's
  // call_requester() (ServerCallbackWriterImpl::CallOnDone) frees an object whose
  // CallbackWithSuccessTag another gRPC thread had just run — an order the uninstrumented core
  // guarantees but TSan cannot see. Neither stack has a prehoc frame, and no suppression pattern
  // can name it without also hiding races in our reactors (common/tsan/suppressions.txt; TSan
  // annotations on StreamReactor did not remove it). The Release and ASan+UBSan runs cover this
  // test; under TSan the same reactor is still exercised by the cancel tests.
  GTEST_SKIP() << "gRPC-internal TSan report on deadline teardown (see comment)";
#endif
  StepGate gate(2);
  WorkerServerOptions o = Options();
  o.scheduler.before_step = gate.Hook();
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto stub = v1::Inference::NewStub(Channel(*server));
  StreamResult r;
  std::thread client([&] {
    r = RunStream(stub.get(), IdsRequest({256, 1}, 100), absl::Milliseconds(300));
  });
  gate.WaitReached();  // the step loop is held after the first token
  client.join();       // the client gives up at its deadline
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  gate.Open();
  ASSERT_TRUE(server->scheduler().WaitIdle(absl::Now() + absl::Seconds(30)));
  EXPECT_EQ(server->scheduler().Load().kv_pages_used, 0);
  StreamResult ok = RunStream(stub.get(), IdsRequest({256, 3}, 3));
  EXPECT_TRUE(ok.status.ok());
}

TEST(WorkerServerTest, FullQueueIsResourceExhaustedWithTheLimit) {
  StepGate gate(1);
  WorkerServerOptions o = Options();
  o.scheduler.max_running = 1;
  o.scheduler.max_queue = 1;
  o.scheduler.before_step = gate.Hook();
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  // Fill the batch and the queue in-process, then ask over gRPC.
  absl::Notification a_done, b_done;
  auto done_on_terminal = [](absl::Notification* n) {
    return [n](InferenceEvent ev) {
      if (ev.terminal()) n->Notify();
    };
  };
  InferenceRequest a;
  a.token_ids = {256, 1};
  a.max_tokens = 2;
  ASSERT_TRUE(server->scheduler().Generate(a, done_on_terminal(&a_done)).ok());
  gate.WaitReached();
  ASSERT_TRUE(server->scheduler().Generate(a, done_on_terminal(&b_done)).ok());
  auto stub = v1::Inference::NewStub(Channel(*server));
  StreamResult r = RunStream(stub.get(), IdsRequest({256, 2}, 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(r.status.error_message(), HasSubstr("max_queue=1"));
  gate.Open();
  a_done.WaitForNotification();
  b_done.WaitForNotification();
}

TEST(WorkerServerTest, HealthReflectionAndMetrics) {
  WorkerServerOptions o = Options();
  o.metrics_address = "127.0.0.1:0";
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto channel = Channel(*server);
  EXPECT_EQ(*testing::CheckHealth(channel, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"), HealthCheckResponse::SERVING);
  EXPECT_EQ(*testing::CheckHealth(channel, "readiness"), HealthCheckResponse::SERVING);
  auto services = testing::ListServicesByReflection(channel);
  ASSERT_TRUE(services.ok()) << services.status();
  EXPECT_THAT(*services, Contains("prehoc.v1.Inference"));
  EXPECT_THAT(*services, Contains("prehoc.v1.Worker"));
  EXPECT_THAT(*services, Contains("grpc.health.v1.Health"));

  auto stub = v1::Inference::NewStub(channel);
  ASSERT_TRUE(RunStream(stub.get(), IdsRequest({256, 7}, 4)).status.ok());
  ASSERT_GT(server->metrics_port(), 0);
  auto body = testing::HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_THAT(*body, HasSubstr("prehoc_time_to_first_token_seconds_count{model=\"tiny\",policy=\"dense\"} 1"));
  EXPECT_THAT(*body, HasSubstr("prehoc_generation_tokens_total{model=\"tiny\",policy=\"dense\"} 4"));
  EXPECT_THAT(*body, HasSubstr("prehoc_kv_cache_pages_total{model=\"tiny\"}"));
  EXPECT_THAT(*body, HasSubstr("prehoc_requests_total{model=\"tiny\",outcome=\"ok\",policy=\"dense\"} 1"));
}

TEST(WorkerServerTest, DrainTurnsReadinessOffRefusesNewWorkAndFinishesInFlight) {
  StepGate gate(2);
  WorkerServerOptions o = Options();
  o.scheduler.before_step = gate.Hook();
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto channel = Channel(*server);
  auto stub = v1::Inference::NewStub(channel);
  StreamResult inflight;
  std::thread client([&] { inflight = RunStream(stub.get(), IdsRequest({256, 1}, 10)); });
  gate.WaitReached();

  // Watch readiness: SERVING now, NOT_SERVING once the drain starts.
  auto readiness = std::make_unique<testing::HealthWatch>(channel, "readiness");
  ASSERT_TRUE(readiness->Await(HealthCheckResponse::SERVING));
  std::thread drainer([&] { server->Shutdown(absl::InfiniteFuture()); });
  ASSERT_TRUE(readiness->Await(HealthCheckResponse::NOT_SERVING));
  StreamResult refused = RunStream(stub.get(), IdsRequest({256, 2}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"), HealthCheckResponse::SERVING);
  readiness.reset();  // before the server stops
  gate.Open();
  client.join();
  drainer.join();
  EXPECT_TRUE(inflight.status.ok()) << inflight.status.error_message();
  EXPECT_EQ(inflight.tokens().size(), 10u);
}

TEST(WorkerServerTest, BackendFailureTurnsReadinessOffAndRefusesNewWorkNamingTheCause) {
  testing::FaultyBackend* backend = nullptr;
  WorkerServerOptions o = Options();
  o.metrics_address = "127.0.0.1:0";
  o.wrap_backend = testing::WrapInFaultyBackend(&backend);
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(backend, nullptr);
  auto channel = Channel(*server);
  auto stub = v1::Inference::NewStub(channel);
  ASSERT_TRUE(RunStream(stub.get(), IdsRequest({256, 7}, 3)).status.ok());

  // Watch readiness: SERVING while healthy, NOT_SERVING once a step fails.
  testing::HealthWatch readiness(channel, "readiness");
  ASSERT_TRUE(readiness.Await(HealthCheckResponse::SERVING));

  backend->FailSteps(absl::InternalError("CUDA error: an illegal memory access"));
  StreamResult failed = RunStream(stub.get(), IdsRequest({256, 8}, 5));
  EXPECT_EQ(failed.status.error_code(), grpc::StatusCode::INTERNAL);
  EXPECT_THAT(failed.status.error_message(), HasSubstr("illegal memory access"));
  ASSERT_TRUE(readiness.Await(HealthCheckResponse::NOT_SERVING));
  EXPECT_EQ(*testing::CheckHealth(channel, "readiness"), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(*testing::CheckHealth(channel, "prehoc.v1.Inference"),
            HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"), HealthCheckResponse::SERVING);
  EXPECT_FALSE(server->scheduler().Ready());  // what the heartbeats carry as ready

  StreamResult refused = RunStream(stub.get(), IdsRequest({256, 9}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("backend failed"));
  EXPECT_THAT(refused.status.error_message(), HasSubstr("illegal memory access"));
  EXPECT_EQ(backend->failed_steps(), 1);

  auto body = testing::HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_THAT(*body, HasSubstr("prehoc_worker_backend_healthy{model=\"tiny\"} 0"));
  EXPECT_THAT(*body, HasSubstr("prehoc_worker_backend_failures_total{model=\"tiny\"} 1"));
  EXPECT_THAT(*body, HasSubstr("prehoc_ready{model=\"tiny\"} 0"));
}

// --liveness-follows-backend: the failure turns liveness NOT_SERVING too (a probe restarts the
// process); without it liveness stays SERVING (the test above).
TEST(WorkerServerTest, LivenessFollowsABackendFailureWhenAsked) {
  testing::FaultyBackend* backend = nullptr;
  WorkerServerOptions o = Options();
  o.liveness_follows_backend = true;
  o.wrap_backend = testing::WrapInFaultyBackend(&backend);
  auto server = Start(o);
  ASSERT_NE(server, nullptr);
  auto channel = Channel(*server);
  auto stub = v1::Inference::NewStub(channel);
  // Readiness turns NOT_SERVING after liveness (the server sets it last).
  testing::HealthWatch readiness(channel, "readiness");
  ASSERT_TRUE(readiness.Await(HealthCheckResponse::SERVING));
  ASSERT_TRUE(RunStream(stub.get(), IdsRequest({256, 7}, 2)).status.ok());
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"), HealthCheckResponse::SERVING);

  backend->FailSteps(absl::InternalError("CUDA error: an illegal memory access"));
  EXPECT_EQ(RunStream(stub.get(), IdsRequest({256, 8}, 2)).status.error_code(),
            grpc::StatusCode::INTERNAL);
  ASSERT_TRUE(readiness.Await(HealthCheckResponse::NOT_SERVING));
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(*testing::CheckHealth(channel, ""), HealthCheckResponse::NOT_SERVING);
}

}  // namespace
}  // namespace prehoc
