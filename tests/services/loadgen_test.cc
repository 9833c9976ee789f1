// `prehoc loadgen` against real servers: prehoc-cachemgr + an autoregressive and a diffusion
// prehoc-worker (as scripts/device_services.sh runs them on the GPU machine). --wait-ready waits
// for the workers' registration through health + ListModels (the test starts loadgen right after
// the processes, without waiting for any worker line); --model-name routes Generate and Diffuse to
// their model; --rpc diffuse measures Diffuse; flag mistakes are usage errors.
#include <sys/wait.h>

#include <filesystem>
#include <iostream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/cli/cli.h"
#include "tests/services/child_process.h"

namespace prehoc {
namespace {

using testing::ChildProcess;
using testing::Field;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

const absl::Duration kStartTimeout = absl::Seconds(60);

std::string Bin(const std::string& name) { return (fs::path(PREHOC_BIN_DIR) / name).string(); }
std::string Model(const std::string& name) {
  return (fs::path(PREHOC_SOURCE_DIR) / "models" / name).string();
}

struct CliRun {
  int code;
  std::string out, err;
};

CliRun Loadgen(std::vector<std::string> args) {
  args.insert(args.begin(), {"prehoc", "loadgen"});
  std::ostringstream out, err;
  const int code = RunCli(args, out, err);
  return {code, out.str(), err.str()};
}

// "key=value" of a loadgen result line.
std::string Value(const std::string& line, const std::string& key) {
  return std::string(absl::StripAsciiWhitespace(Field(line, key)));
}

void DumpOnFailure(const char* name, ChildProcess* p) {
  if (p != nullptr && ::testing::Test::HasFailure()) {
    std::cerr << "--- " << name << " output:\n" << p->DrainOutput();
  }
}

TEST(LoadgenTest, FlagMistakesAreUsageErrors) {
  EXPECT_EQ(Loadgen({"--target=127.0.0.1:1", "--rpc=bogus"}).code, 2);
  CliRun r = Loadgen({"--target=127.0.0.1:1", "--cache=spa"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("are for --rpc diffuse"));
  r = Loadgen({"--target=127.0.0.1:1", "--rpc=diffuse", "--policy=prhs"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("are for --rpc generate"));
  r = Loadgen({"--model=" + Model("prehoc-code-dlm"), "--wait-ready=5"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--wait-ready needs --target"));
  r = Loadgen({"--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_THAT(r.out, HasSubstr("--rpc"));
}

TEST(LoadgenTest, InProcessDiffuse) {
  const CliRun r =
      Loadgen({"--model=" + Model("prehoc-code-dlm"), "--device=cpu", "--threads=1",
               "--kv-cache-mb=16", "--rpc=diffuse", "--cache=spa", "--streams=2", "--requests=2",
               "--warmup=0", "--prompt-len=16", "--max-tokens=8", "--block-length=4"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Value(r.out, "ok"), "2") << r.out;
  EXPECT_EQ(Value(r.out, "tokens"), "16") << r.out;  // gen_length 8 each, no EOS stop
  EXPECT_EQ(Value(r.out, "rpc"), "diffuse");
  EXPECT_EQ(Value(r.out, "cache"), "spa");
}

TEST(LoadgenTest, WaitsForWorkersAndDrivesGenerateAndDiffuseThroughTheCacheManager) {
  auto cm = ChildProcess::Start({Bin("prehoc-cachemgr"), "--listen=127.0.0.1:0",
                                 "--metrics-listen=", "--log-level=info",
                                 "--heartbeat-interval-ms=500", "--drain-timeout-s=5"});
  ASSERT_TRUE(cm.ok()) << cm.status();
  auto cm_ready = (*cm)->WaitForLine("prehoc-cachemgr ready", kStartTimeout);
  ASSERT_TRUE(cm_ready.ok()) << cm_ready.status();
  const std::string target = absl::StrCat("127.0.0.1:", Field(*cm_ready, "grpc_port"));

  // Nothing registered yet: a short wait fails naming what it waited for.
  CliRun r = Loadgen({"--target=" + target, "--wait-ready=0.3", "--model-name=prehoc-code-ar"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("not ready after"));

  std::vector<std::unique_ptr<ChildProcess>> workers;
  for (const std::string name : {"prehoc-code-ar", "prehoc-code-dlm"}) {
    auto w = ChildProcess::Start({Bin("prehoc-worker"), "--model=" + Model(name),
                                  "--listen=127.0.0.1:0", "--metrics-listen=", "--device=cpu",
                                  "--threads=1", "--kv-cache-mb=16", "--cachemgr=" + target,
                                  "--log-level=info", "--drain-timeout-s=5"});
    ASSERT_TRUE(w.ok()) << w.status();
    workers.push_back(std::move(*w));
  }
  // Diffuse first, straight after the workers started: --wait-ready covers their registration.
  r = Loadgen({"--target=" + target, "--wait-ready=60", "--model-name=prehoc-code-dlm",
               "--rpc=diffuse", "--cache=spa", "--streams=2", "--requests=4", "--warmup=1",
               "--prompt-len=16", "--max-tokens=8", "--block-length=4", "--label=split"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, ::testing::StartsWith("loadgen split mode=grpc streams=2 requests=4 ok=4"));
  EXPECT_EQ(Value(r.out, "tokens"), "32") << r.out;
  EXPECT_EQ(Value(r.out, "cache"), "spa");
  r = Loadgen({"--target=" + target, "--wait-ready=60", "--model-name=prehoc-code-ar",
               "--policy=dense", "--streams=2", "--requests=4", "--warmup=0", "--prompt-len=16",
               "--max-tokens=5"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Value(r.out, "ok"), "4") << r.out;
  EXPECT_EQ(Value(r.out, "tokens"), "20") << r.out;
  EXPECT_EQ(Value(r.out, "rpc"), "generate");
  EXPECT_EQ(Value(r.out, "policy"), "dense");
  // Diffuse to the autoregressive model is refused, and loadgen says so.
  r = Loadgen({"--target=" + target, "--model-name=prehoc-code-ar", "--rpc=diffuse",
               "--streams=1", "--requests=1", "--warmup=0", "--max-tokens=4"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is autoregressive"));

  // The workers name the backend they run on (what scripts/device_services.sh checks).
  for (auto& w : workers) {
    EXPECT_TRUE(w->WaitForLine("device=cpu: using the CPU", absl::Seconds(5)).ok())
        << w->DrainOutput();
  }
  DumpOnFailure("cachemgr", cm->get());
  for (auto& w : workers) DumpOnFailure("worker", w.get());
  for (auto& w : workers) {
    w->Signal(SIGTERM);
    const int status = w->Wait();
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  }
  (*cm)->Signal(SIGTERM);
  const int status = (*cm)->Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

}  // namespace
}  // namespace prehoc
