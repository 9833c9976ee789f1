// Diffuse across processes: prehoc-cachemgr + a prehoc-worker serving the shipped diffusion model
// (the cache manager computes the DLM plan and relays the block stream) against `prehoc serve`
// (embedded mode) on the same model: token-for-token equal, the plan came from the cache manager,
// the worker's per-layer recompute counts reach the client, errors pass through.
// Synchronisation is on lines the servers print, never on sleeps.
#include <grpcpp/grpcpp.h>
#include <sys/wait.h>

#include <filesystem>
#include <iostream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "tests/services/child_process.h"

namespace prehoc {
namespace {

using testing::ChildProcess;
using testing::Field;
using ::testing::StartsWith;
namespace fs = std::filesystem;

const absl::Duration kStartTimeout = absl::Seconds(60);

std::string Bin(const std::string& name) { return (fs::path(PREHOC_BIN_DIR) / name).string(); }
std::string DlmModel() {
  return (fs::path(PREHOC_SOURCE_DIR) / "models/prehoc-code-dlm").string();
}

struct Result {
  grpc::Status status;
  std::vector<int32_t> tokens;
  int messages = 0;
  v1::DiffuseResponse last;
};

Result Diffuse(int port, const v1::DiffuseRequest& req) {
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                                         grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  Result r;
  auto reader = stub->Diffuse(&ctx, req);
  v1::DiffuseResponse m;
  while (reader->Read(&m)) {
    r.tokens.insert(r.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    ++r.messages;
    r.last = m;
  }
  r.status = reader->Finish();
  return r;
}

v1::DiffuseRequest Request(const std::string& cache) {
  v1::DiffuseRequest r;
  r.set_model("code-dlm");
  r.set_text("import os\n\n\ndef main(argv):\n");
  r.set_gen_length(8);
  r.set_block_length(4);
  r.set_steps(8);
  r.set_cache(cache);
  if (cache == "spa") r.mutable_cache_params()->set_r_gen(3);
  r.mutable_sampling()->set_temperature(0.3f);
  r.mutable_sampling()->set_seed(5);
  return r;
}

// Prints a child's output when the test failed (sanitizer reports land there).
void DumpOnFailure(const char* name, ChildProcess* p) {
  if (p != nullptr && ::testing::Test::HasFailure()) {
    std::cerr << "--- " << name << " output:\n" << p->DrainOutput();
  }
}

TEST(SplitModeDiffuseTest, CacheManagerPlusWorkerEqualsEmbedded) {
  auto cm = ChildProcess::Start({Bin("prehoc-cachemgr"), "--listen=127.0.0.1:0",
                                 "--metrics-listen=", "--log-level=info",
                                 "--heartbeat-interval-ms=500", "--drain-timeout-s=0"});
  ASSERT_TRUE(cm.ok()) << cm.status();
  auto cm_ready = (*cm)->WaitForLine("prehoc-cachemgr ready", kStartTimeout);
  ASSERT_TRUE(cm_ready.ok()) << cm_ready.status();
  const int cm_port = std::stoi(Field(*cm_ready, "grpc_port"));
  auto worker = ChildProcess::Start(
      {Bin("prehoc-worker"), "--model=" + DlmModel(), "--model-name=code-dlm",
       "--listen=127.0.0.1:0", "--metrics-listen=", "--threads=1", "--kv-cache-mb=16",
       absl::StrCat("--cachemgr=127.0.0.1:", cm_port), "--log-level=info",
       "--drain-timeout-s=0"});
  ASSERT_TRUE(worker.ok()) << worker.status();
  ASSERT_TRUE((*worker)->WaitForLine("registered with cache manager", kStartTimeout).ok());
  auto serve = ChildProcess::Start({Bin("prehoc"), "serve", "--model=" + DlmModel(),
                                    "--model-name=code-dlm", "--listen=127.0.0.1:0",
                                    "--metrics-listen=", "--threads=1", "--kv-cache-mb=16",
                                    "--log-level=info"});
  ASSERT_TRUE(serve.ok()) << serve.status();
  auto serve_ready = (*serve)->WaitForLine("prehoc serve ready", kStartTimeout);
  ASSERT_TRUE(serve_ready.ok()) << serve_ready.status();
  const int serve_port = std::stoi(Field(*serve_ready, "grpc_port"));

  for (const std::string cache : {"spa", "dual"}) {
    const Result split = Diffuse(cm_port, Request(cache));
    const Result embedded = Diffuse(serve_port, Request(cache));
    ASSERT_TRUE(split.status.ok()) << cache << ": " << split.status.error_message();
    ASSERT_TRUE(embedded.status.ok()) << cache << ": " << embedded.status.error_message();
    EXPECT_FALSE(split.tokens.empty());
    EXPECT_EQ(split.tokens, embedded.tokens) << cache;
    EXPECT_TRUE(split.last.finished());
    EXPECT_EQ(split.last.stats().cache(), cache);
    EXPECT_GT(split.last.stats().plan_version(), 0);  // the cache manager's plan ran
    EXPECT_EQ(split.last.stats().rows_recomputed_size(), 6);
    EXPECT_THAT(split.last.stats().rows_recomputed(),
                ::testing::ElementsAreArray(embedded.last.stats().rows_recomputed()));
    EXPECT_EQ(split.last.stats().refreshes(), embedded.last.stats().refreshes());
    if (cache == "spa") EXPECT_EQ(split.last.stats().rho_size(), 6);
  }
  // Errors name the field through both front doors, and the servers stay up.
  v1::DiffuseRequest bad = Request("spa");
  bad.mutable_cache_params()->set_dllm_ratio(0.5);
  for (int port : {cm_port, serve_port}) {
    const Result r = Diffuse(port, bad);
    EXPECT_EQ(r.status.error_code(), grpc::INVALID_ARGUMENT);
    EXPECT_THAT(r.status.error_message(), StartsWith("cache_params.dllm_ratio:"));
  }
  bad = Request("none");
  bad.set_gen_length(5000);  // checked by the worker, passed through by the cache manager
  const Result r = Diffuse(cm_port, bad);
  EXPECT_EQ(r.status.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), StartsWith("gen_length: 5000 exceeds the limit"));
  EXPECT_TRUE(Diffuse(cm_port, Request("none")).status.ok());

  DumpOnFailure("cachemgr", cm->get());
  DumpOnFailure("worker", worker->get());
  DumpOnFailure("serve", serve->get());
  for (auto* p : {serve->get(), worker->get(), cm->get()}) {
    p->Signal(SIGTERM);
    const int status = p->Wait();
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  }
}

}  // namespace
}  // namespace prehoc
