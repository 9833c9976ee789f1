// prehoc.v1.Inference/Diffuse on an in-process worker (127.0.0.1:0) serving the shipped
// diffusion model: the stream equals the decoder run directly, bad requests are refused naming
// the field, Cancel and deadlines end a running request, Generate is not blocked by it.
#include <filesystem>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "services/common/test_util.h"
#include "services/worker/worker_server.h"
#include "worker/dlm/decoder.h"
#include "worker/testing/faulty_dlm_backend.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
namespace fs = std::filesystem;

std::string DlmDir() { return (fs::path(PREHOC_SOURCE_DIR) / "models/prehoc-code-dlm").string(); }

// Blocks the DLM executor before step `at` of every request until Open().
struct StepGate {
  int at = -1;
  absl::Mutex mu;
  bool open ABSL_GUARDED_BY(mu) = false;
  absl::Notification reached;
  std::function<void(const std::string&, int)> Hook() {
    return [this](const std::string&, int step) {
      if (step != at) return;
      if (!reached.HasBeenNotified()) reached.Notify();
      absl::MutexLock l(&mu);
      mu.Await(absl::Condition(&open));
    };
  }
  void Open() {
    absl::MutexLock l(&mu);
    open = true;
  }
};

// `tweak` (optional) edits the options before the server starts.
std::unique_ptr<WorkerServer> StartDlm(
    StepGate* gate = nullptr, const std::function<void(WorkerServerOptions&)>& tweak = {}) {
  WorkerServerOptions o;
  o.engine.model_dir = DlmDir();
  o.engine.num_threads = 2;
  o.engine.kv_cache_bytes = 16 << 20;
  o.model_name = "code-dlm";
  o.listen_address = "127.0.0.1:0";
  o.max_request_bytes = 64 << 10;
  if (gate != nullptr) o.dlm.before_step = gate->Hook();
  if (tweak) tweak(o);
  auto s = WorkerServer::Create(std::move(o));
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

std::unique_ptr<v1::Inference::Stub> Stub(int port) {
  return v1::Inference::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                                    grpc::InsecureChannelCredentials()));
}

v1::DiffuseRequest Request() {
  v1::DiffuseRequest r;
  r.set_text("def add(a, b):\n");
  r.set_gen_length(8);
  r.set_block_length(4);
  r.set_steps(8);
  r.set_cache("spa");
  r.mutable_sampling()->set_temperature(0.5f);
  r.mutable_sampling()->set_seed(7);
  return r;
}

struct Result {
  grpc::Status status;
  std::vector<v1::DiffuseResponse> messages;
  std::vector<int32_t> tokens() const {
    std::vector<int32_t> t;
    for (const auto& m : messages) t.insert(t.end(), m.token_ids().begin(), m.token_ids().end());
    return t;
  }
};

Result RunDiffuse(v1::Inference::Stub* stub, const v1::DiffuseRequest& req) {
  grpc::ClientContext ctx;
  Result r;
  auto reader = stub->Diffuse(&ctx, req);
  v1::DiffuseResponse m;
  while (reader->Read(&m)) r.messages.push_back(m);
  r.status = reader->Finish();
  return r;
}

TEST(WorkerDiffuseTest, StreamsBlocksEqualToTheDecoderAndRefusesBadRequests) {
  StepGate gate;
  gate.at = 4;  // after block 0 (steps 0-3): held until the client has read its message
  std::unique_ptr<WorkerServer> server = StartDlm(&gate);
  ASSERT_NE(server, nullptr);
  ASSERT_NE(server->dlm_runner(), nullptr);
  auto stub = Stub(server->port());

  const v1::DiffuseRequest req = Request();
  Result got;
  {
    grpc::ClientContext ctx;
    auto reader = stub->Diffuse(&ctx, req);
    v1::DiffuseResponse m;
    ASSERT_TRUE(reader->Read(&m));
    EXPECT_FALSE(m.finished());
    EXPECT_EQ(m.block(), 0);
    EXPECT_EQ(m.step(), 4);
    got.messages.push_back(m);
    gate.Open();
    while (reader->Read(&m)) got.messages.push_back(m);
    got.status = reader->Finish();
  }
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_GE(got.messages.size(), 2u);  // block 0, then block 1 (+ the final message)

  // The same request through the decoder directly.
  auto tok = Tokenizer::LoadFromModelDir(DlmDir(), 260);
  ASSERT_TRUE(tok.ok() && *tok != nullptr);
  dlm::DiffuseRequest direct;
  direct.prompt = (*tok)->Encode(req.text(), /*add_bos=*/true);
  direct.options.gen_length = 8;
  direct.options.block_length = 4;
  direct.options.steps = 8;
  direct.options.cache = "spa";
  direct.options.temperature = 0.5f;
  direct.options.seed = 7;
  auto want = dlm::Diffuse(server->dlm_runner()->model(), direct);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_EQ(got.tokens(), want->output);

  EXPECT_FALSE(got.messages.front().request_id().empty());
  const v1::DiffuseResponse& last = got.messages.back();
  ASSERT_TRUE(last.finished());
  EXPECT_EQ(last.usage().completion_tokens(), static_cast<int>(want->output.size()));
  EXPECT_EQ(last.usage().prompt_tokens(), static_cast<int>(direct.prompt.size()));
  EXPECT_EQ(last.stats().cache(), "spa");
  EXPECT_EQ(last.stats().steps(), 8);
  ASSERT_EQ(last.stats().rows_recomputed_size(), 6);
  for (int l = 0; l < 6; ++l) {
    EXPECT_EQ(last.stats().rows_recomputed(l), want->stats.forward.q_rows[l]) << l;
  }
  EXPECT_EQ(last.stats().refreshes(), want->stats.full_steps + want->stats.gen_refresh_steps);
  EXPECT_EQ(last.stats().rho_size(), 6);

  struct Bad {
    std::function<void(v1::DiffuseRequest*)> edit;
    grpc::StatusCode code;
    std::string prefix;
  };
  const std::vector<Bad> bad = {
      {[](v1::DiffuseRequest* r) { r->set_gen_length(-3); }, grpc::INVALID_ARGUMENT, "gen_length:"},
      {[](v1::DiffuseRequest* r) { r->set_steps(5); }, grpc::INVALID_ARGUMENT, "steps:"},
      {[](v1::DiffuseRequest* r) { r->set_remasking("sometimes"); }, grpc::INVALID_ARGUMENT,
       "remasking:"},
      {[](v1::DiffuseRequest* r) { r->mutable_sampling()->set_top_k(5); }, grpc::INVALID_ARGUMENT,
       "sampling.top_k:"},
      {[](v1::DiffuseRequest* r) { r->mutable_cache_params()->set_r_full(-1); },
       grpc::INVALID_ARGUMENT, "cache_params.r_full:"},
      {[](v1::DiffuseRequest* r) { r->mutable_cache_params()->set_dllm_ratio(0.5); },
       grpc::INVALID_ARGUMENT, "cache_params.dllm_ratio: unknown key for cache 'spa'"},
      {[](v1::DiffuseRequest* r) { r->add_rho(0.5); }, grpc::INVALID_ARGUMENT, "rho:"},
      {[](v1::DiffuseRequest* r) { r->set_cache("spa-auto"); }, grpc::FAILED_PRECONDITION,
       "cache: spa-auto needs"},
      {[](v1::DiffuseRequest* r) { r->clear_text(); }, grpc::INVALID_ARGUMENT, "prompt:"},
      {[](v1::DiffuseRequest* r) { r->set_parallel_threshold(2); }, grpc::INVALID_ARGUMENT,
       "parallel_threshold:"},
      {[](v1::DiffuseRequest* r) { r->set_model("other"); }, grpc::NOT_FOUND, "model:"},
  };
  for (const Bad& b : bad) {
    v1::DiffuseRequest r = Request();
    b.edit(&r);
    Result res = RunDiffuse(stub.get(), r);
    EXPECT_EQ(res.status.error_code(), b.code) << b.prefix << " " << res.status.error_message();
    EXPECT_THAT(res.status.error_message(), StartsWith(b.prefix));
    EXPECT_TRUE(res.messages.empty());
  }
  // Still up, and the same seed gives the same tokens again.
  Result again = RunDiffuse(stub.get(), req);
  ASSERT_TRUE(again.status.ok());
  EXPECT_EQ(again.tokens(), got.tokens());
}

TEST(WorkerDiffuseTest, CancelRpcEndsARunningRequestWhileGenerateStillServes) {
  StepGate gate;
  gate.at = 5;  // block 0 (steps 0-3) is streamed, then the executor waits before step 5
  std::unique_ptr<WorkerServer> server = StartDlm(&gate);
  ASSERT_NE(server, nullptr);
  auto stub = Stub(server->port());

  grpc::ClientContext ctx;
  auto reader = stub->Diffuse(&ctx, Request());
  v1::DiffuseResponse first;
  ASSERT_TRUE(reader->Read(&first));
  EXPECT_GT(first.token_ids_size(), 0);
  const std::string id = first.request_id();
  ASSERT_FALSE(id.empty());
  gate.reached.WaitForNotification();

  // The DLM executor is held; Generate runs on the scheduler's own step thread.
  {
    grpc::ClientContext gctx;
    v1::GenerateRequest g;
    g.mutable_token_ids()->add_ids(256);
    g.mutable_token_ids()->add_ids(100);
    g.set_max_tokens(2);
    auto greader = stub->Generate(&gctx, g);
    v1::GenerateResponse gm;
    bool finished = false;
    while (greader->Read(&gm)) finished |= gm.finished();
    EXPECT_TRUE(greader->Finish().ok());
    EXPECT_TRUE(finished);
  }

  grpc::ClientContext cctx;
  v1::CancelRequest creq;
  creq.set_request_id(id);
  v1::CancelResponse cresp;
  ASSERT_TRUE(stub->Cancel(&cctx, creq, &cresp).ok());
  gate.Open();
  v1::DiffuseResponse m;
  while (reader->Read(&m)) EXPECT_FALSE(m.finished());
  grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::CANCELLED) << st.error_message();
  EXPECT_TRUE(server->dlm_runner()->WaitIdle(absl::InfiniteFuture()));
}

// A failed diffusion forward (device fault) fails the whole worker: the stream ends INTERNAL
// naming it, the scheduler's backend is marked failed (Generate and Diffuse refused UNAVAILABLE,
// backend-healthy gauge 0), readiness and — with liveness_follows_backend — liveness go
// NOT_SERVING.
TEST(WorkerDiffuseTest, FailedForwardFailsTheWorker) {
  testing::FaultyDlmBackend* faulty = nullptr;
  auto server = StartDlm(nullptr, [&faulty](WorkerServerOptions& o) {
    o.metrics_address = "127.0.0.1:0";
    o.liveness_follows_backend = true;
    o.dlm.wrap_backend = testing::WrapInFaultyDlmBackend(&faulty);
  });
  ASSERT_NE(server, nullptr);
  ASSERT_NE(faulty, nullptr);
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::Inference::NewStub(channel);
  testing::HealthWatch readiness(channel, "readiness");
  ASSERT_TRUE(readiness.Await(grpc::health::v1::HealthCheckResponse::SERVING));
  ASSERT_TRUE(RunDiffuse(stub.get(), Request()).status.ok());

  faulty->FailForwards(absl::InternalError("CUDA error: an illegal memory access"));
  Result failed = RunDiffuse(stub.get(), Request());
  EXPECT_EQ(failed.status.error_code(), grpc::INTERNAL);
  EXPECT_THAT(failed.status.error_message(), HasSubstr("illegal memory access"));
  ASSERT_TRUE(readiness.Await(grpc::health::v1::HealthCheckResponse::NOT_SERVING));
  EXPECT_EQ(*testing::CheckHealth(channel, "liveness"),
            grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_FALSE(server->scheduler().Ready());
  EXPECT_THAT(std::string(server->scheduler().backend_status().message()),
              HasSubstr("illegal memory access"));

  Result refused = RunDiffuse(stub.get(), Request());
  EXPECT_EQ(refused.status.error_code(), grpc::UNAVAILABLE);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("backend failed"));
  v1::GenerateRequest gen;
  gen.mutable_token_ids()->add_ids(256);
  gen.set_max_tokens(2);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, gen);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::UNAVAILABLE);

  auto body = testing::HttpGet(server->metrics_port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_THAT(*body, HasSubstr("prehoc_worker_backend_healthy{model=\"code-dlm\"} 0"));
  EXPECT_THAT(*body, HasSubstr("prehoc_worker_backend_failures_total{model=\"code-dlm\"} 1"));
  EXPECT_EQ(faulty->failed_forwards(), 1);
}

TEST(WorkerDiffuseTest, AutoregressiveWorkerRefusesDiffuse) {
  WorkerServerOptions o;
  o.engine.model_dir = (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
  o.engine.num_threads = 1;
  o.engine.kv_cache_bytes = 16 << 20;
  o.model_name = "tiny";
  auto server = WorkerServer::Create(std::move(o));
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_EQ((*server)->dlm_runner(), nullptr);
  auto stub = Stub((*server)->port());
  v1::DiffuseRequest r = Request();
  r.clear_text();
  r.mutable_token_ids()->add_ids(1);
  Result res = RunDiffuse(stub.get(), r);
  EXPECT_EQ(res.status.error_code(), grpc::FAILED_PRECONDITION);
  EXPECT_THAT(res.status.error_message(), HasSubstr("'tiny' is autoregressive"));
}

}  // namespace
}  // namespace prehoc
