// Multi-process scenarios: prehoc-cachemgr and two prehoc-worker processes on loopback.
//   - 32 concurrent greedy streams produce exactly the embedded GenerateBatch tokens;
//   - kill -9 of a worker mid-stream: its streams end UNAVAILABLE, the others finish, page
//     accounting returns to zero;
//   - a hung worker (SIGSTOP: connections open, no heartbeats) fails its streams UNAVAILABLE
//     within two missed heartbeats;
//   - restarting the cache manager on the same port: workers re-register, service resumes.
// Synchronisation is on lines the servers print (ChildProcess::WaitForLine), never on sleeps.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <iostream>
#include <filesystem>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prehoc/v1/cachemgr.grpc.pb.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "tests/services/child_process.h"
#include "worker/engine.h"
#include "worker/generator.h"

namespace prehoc {
namespace {

using testing::ChildProcess;
using testing::Field;
namespace fs = std::filesystem;

constexpr int kHeartbeatMs = 500;
const absl::Duration kStartTimeout = absl::Seconds(60);

std::string Bin(const std::string& name) { return (fs::path(PREHOC_BIN_DIR) / name).string(); }
std::string Fixture() {
  return (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
}

struct Cluster {
  std::unique_ptr<ChildProcess> cachemgr;
  int cachemgr_port = 0;
  std::vector<std::unique_ptr<ChildProcess>> workers;
  std::vector<std::string> worker_ids;

  Cluster() = default;
  Cluster(Cluster&&) = default;
  Cluster& operator=(Cluster&&) = default;
  // Prints the servers' output when the test failed (sanitizer reports land there).
  ~Cluster() {
    if (!::testing::Test::HasFailure()) return;
    if (cachemgr != nullptr) std::cerr << "--- cachemgr output:\n" << cachemgr->DrainOutput();
    for (size_t i = 0; i < workers.size(); ++i) {
      if (workers[i] != nullptr) {
        std::cerr << "--- worker " << i << " output:\n" << workers[i]->DrainOutput();
      }
    }
  }
};

std::unique_ptr<ChildProcess> StartCacheManager(int port, int* bound_port) {
  auto p = ChildProcess::Start({Bin("prehoc-cachemgr"), absl::StrCat("--listen=127.0.0.1:", port),
                                "--metrics-listen=", "--log-level=info",
                                absl::StrCat("--heartbeat-interval-ms=", kHeartbeatMs),
                                "--drain-timeout-s=0"});
  EXPECT_TRUE(p.ok()) << p.status();
  auto line = (*p)->WaitForLine("prehoc-cachemgr ready", kStartTimeout);
  EXPECT_TRUE(line.ok()) << line.status();
  if (line.ok()) *bound_port = std::stoi(Field(*line, "grpc_port"));
  return std::move(*p);
}

// Starts a worker registered with the cache manager; waits until it is registered.
std::unique_ptr<ChildProcess> StartWorker(int cachemgr_port, int step_delay_ms, std::string* id) {
  auto p = ChildProcess::Start(
      {Bin("prehoc-worker"), "--model=" + Fixture(), "--model-name=tiny",
       "--listen=127.0.0.1:0", "--metrics-listen=", "--threads=1", "--kv-cache-mb=16",
       absl::StrCat("--cachemgr=127.0.0.1:", cachemgr_port),
       absl::StrCat("--debug-step-delay-ms=", step_delay_ms), "--log-level=info",
       "--drain-timeout-s=0"});
  EXPECT_TRUE(p.ok()) << p.status();
  auto ready = (*p)->WaitForLine("prehoc-worker ready", kStartTimeout);
  EXPECT_TRUE(ready.ok()) << ready.status();
  if (ready.ok()) *id = Field(*ready, "id");
  auto reg = (*p)->WaitForLine("registered with cache manager", kStartTimeout);
  EXPECT_TRUE(reg.ok()) << reg.status();
  return std::move(*p);
}

Cluster StartCluster(int step_delay_ms) {
  Cluster c;
  c.cachemgr = StartCacheManager(0, &c.cachemgr_port);
  for (int i = 0; i < 2; ++i) {
    std::string id;
    c.workers.push_back(StartWorker(c.cachemgr_port, step_delay_ms, &id));
    c.worker_ids.push_back(id);
  }
  return c;
}

std::shared_ptr<grpc::Channel> Channel(int port) {
  return grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
}

v1::ClusterState State(int port) {
  auto stub = v1::CacheManager::NewStub(Channel(port));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ClusterState s;
  grpc::Status st = stub->GetClusterState(&ctx, v1::GetClusterStateRequest(), &s);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return s;
}

std::vector<GenerateRequest> References(int n, int max_tokens_base) {
  std::vector<GenerateRequest> out;
  for (int i = 0; i < n; ++i) {
    GenerateRequest g;
    g.prompt = {256};
    for (int j = 0; j < 3 + (i * 7) % 37; ++j) g.prompt.push_back((j * 41 + i * 23) % 256);
    g.max_tokens = max_tokens_base + (i % 9);
    g.stop_at_eos = false;
    out.push_back(g);
  }
  return out;
}

std::vector<std::vector<int32_t>> Embedded(const std::vector<GenerateRequest>& reqs) {
  EngineOptions eo;
  eo.model_dir = Fixture();
  eo.num_threads = 1;
  auto engine = Engine::Create(eo);
  EXPECT_TRUE(engine.ok());
  auto results = GenerateBatch(**engine, reqs);
  EXPECT_TRUE(results.ok()) << results.status();
  std::vector<std::vector<int32_t>> out;
  for (const auto& r : *results) out.push_back(r.tokens);
  return out;
}

struct StreamOutcome {
  grpc::Status status;
  std::string served_by;
  std::vector<int32_t> tokens;
  bool finished = false;
};

// Runs `reqs` concurrently through the cache manager. `on_first` is counted down when a stream
// got its first message (or ended).
std::vector<StreamOutcome> RunConcurrently(int port, const std::vector<GenerateRequest>& reqs,
                                           absl::BlockingCounter* on_first = nullptr) {
  auto stub = v1::Inference::NewStub(Channel(port));
  std::vector<StreamOutcome> out(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest r;
      r.mutable_token_ids()->mutable_ids()->Add(reqs[i].prompt.begin(), reqs[i].prompt.end());
      r.set_max_tokens(reqs[i].max_tokens);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      auto reader = stub->Generate(&ctx, r);
      v1::GenerateResponse m;
      bool counted = false;
      while (reader->Read(&m)) {
        if (!m.served_by().empty()) out[i].served_by = m.served_by();
        out[i].tokens.insert(out[i].tokens.end(), m.token_ids().begin(), m.token_ids().end());
        out[i].finished |= m.finished();
        if (!counted && on_first != nullptr) {
          on_first->DecrementCount();
          counted = true;
        }
      }
      out[i].status = reader->Finish();
      if (!counted && on_first != nullptr) on_first->DecrementCount();
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

TEST(SplitModeTest, ThirtyTwoConcurrentGreedyStreamsEqualEmbeddedOutput) {
  Cluster c = StartCluster(/*step_delay_ms=*/0);
  const auto reqs = References(32, 12);
  const auto expected = Embedded(reqs);
  const auto got = RunConcurrently(c.cachemgr_port, reqs);
  std::map<std::string, int> per_worker;
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(got[i].status.ok()) << i << ": " << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, expected[i]) << "stream " << i;
    EXPECT_TRUE(got[i].finished);
    ++per_worker[got[i].served_by];
  }
  EXPECT_EQ(per_worker.size(), 2u);
  const v1::ClusterState s = State(c.cachemgr_port);
  EXPECT_EQ(s.workers_size(), 2);
  EXPECT_EQ(s.sequences(), 0);
  EXPECT_EQ(s.kv_pages(), 0);
}

TEST(SplitModeTest, KillNineOfAWorkerMidStreamFailsOnlyItsStreams) {
  Cluster c = StartCluster(/*step_delay_ms=*/5);  // ~100 steps x 5 ms: streams are mid-way
  const auto reqs = References(32, 100);
  const auto expected = Embedded(reqs);
  absl::BlockingCounter first(static_cast<int>(reqs.size()));
  std::vector<StreamOutcome> got;
  std::thread runner([&] { got = RunConcurrently(c.cachemgr_port, reqs, &first); });
  first.Wait();  // every stream is running
  c.workers[0]->Signal(SIGKILL);
  c.workers[0]->Wait();
  runner.join();
  int failed = 0, finished = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (got[i].served_by == c.worker_ids[0]) {
      EXPECT_EQ(got[i].status.error_code(), grpc::StatusCode::UNAVAILABLE)
          << i << ": " << got[i].status.error_message();
      ++failed;
    } else {
      ASSERT_TRUE(got[i].status.ok()) << i << ": " << got[i].status.error_message();
      EXPECT_EQ(got[i].tokens, expected[i]) << "stream " << i;
      ++finished;
    }
  }
  EXPECT_GT(failed, 0);
  EXPECT_GT(finished, 0);
  // Page accounting returns to zero (the dead worker's sequences are released).
  const v1::ClusterState s = State(c.cachemgr_port);
  EXPECT_EQ(s.sequences(), 0);
  EXPECT_EQ(s.kv_pages(), 0);
  // New requests go to the surviving worker.
  const auto after = RunConcurrently(c.cachemgr_port, References(4, 5));
  for (const auto& o : after) {
    EXPECT_TRUE(o.status.ok()) << o.status.error_message();
    EXPECT_EQ(o.served_by, c.worker_ids[1]);
  }
}

TEST(SplitModeTest, HungWorkerStreamsFailWithinTwoMissedHeartbeats) {
  Cluster c = StartCluster(/*step_delay_ms=*/5);
  const auto reqs = References(8, 150);
  absl::BlockingCounter first(static_cast<int>(reqs.size()));
  std::vector<StreamOutcome> got;
  std::thread runner([&] { got = RunConcurrently(c.cachemgr_port, reqs, &first); });
  first.Wait();
  const absl::Time stopped = absl::Now();
  c.workers[0]->Signal(SIGSTOP);  // the process hangs: connections stay open, no heartbeats
  runner.join();                  // the other worker's streams take ~150 x 5 ms
  const absl::Duration took = absl::Now() - stopped;
  int failed = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (got[i].served_by != c.worker_ids[0]) continue;
    ++failed;
    EXPECT_EQ(got[i].status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(got[i].status.error_message(), ::testing::HasSubstr("heartbeat"));
  }
  EXPECT_GT(failed, 0);
  // Two intervals (1 s) + a tick, with slack for loaded machines; without the heartbeat check
  // the hung streams would only end at their 120 s deadline.
  EXPECT_LT(took, absl::Seconds(10));
  const v1::ClusterState s = State(c.cachemgr_port);
  EXPECT_EQ(s.workers_size(), 1);
  EXPECT_EQ(s.kv_pages(), 0);
  c.workers[0]->Signal(SIGKILL);
}

TEST(SplitModeTest, CacheManagerRestartResumesService) {
  Cluster c = StartCluster(/*step_delay_ms=*/0);
  ASSERT_TRUE(RunConcurrently(c.cachemgr_port, References(2, 4))[0].status.ok());
  for (auto& w : c.workers) {
    ASSERT_TRUE(w->WaitForLine("plan stream connected", kStartTimeout).ok());
  }
  const int port = c.cachemgr_port;
  c.cachemgr->Signal(SIGKILL);
  c.cachemgr->Wait();
  // Workers see their plan streams end (they keep decoding with the plans they hold) ...
  for (auto& w : c.workers) {
    const int ended = w->CountLines("plan stream from");
    ASSERT_TRUE(w->WaitForLine("plan stream from", kStartTimeout, ended + 1).ok());
  }
  int bound = 0;
  c.cachemgr = StartCacheManager(port, &bound);
  ASSERT_EQ(bound, port);
  // Workers notice (heartbeat NOT_FOUND) and register again.
  for (auto& w : c.workers) {
    ASSERT_TRUE(w->WaitForLine("registering again", kStartTimeout).ok());
  }
  for (auto& w : c.workers) {
    auto again = w->WaitForLine("registered with cache manager", kStartTimeout, /*occurrence=*/2);
    ASSERT_TRUE(again.ok()) << again.status();
    // ... and reconnect them to the new instance.
    auto plans = w->WaitForLine("plan stream connected", kStartTimeout, /*occurrence=*/2);
    ASSERT_TRUE(plans.ok()) << plans.status();
  }
  const auto reqs = References(8, 6);
  const auto expected = Embedded(reqs);
  const auto got = RunConcurrently(bound, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(got[i].status.ok()) << got[i].status.error_message();
    EXPECT_EQ(got[i].tokens, expected[i]);
  }
  EXPECT_EQ(State(bound).workers_size(), 2);
}

}  // namespace
}  // namespace prehoc

namespace prehoc {
namespace {

TEST(ProcessTest, WorkerSigtermDrainsInFlightStreamsAndExitsCleanly) {
  auto w = ChildProcess::Start({Bin("prehoc-worker"), "--model=" + Fixture(),
                                "--listen=127.0.0.1:0", "--metrics-listen=", "--threads=1",
                                "--kv-cache-mb=16", "--debug-step-delay-ms=5",
                                "--drain-timeout-s=60", "--log-level=info"});
  ASSERT_TRUE(w.ok());
  auto ready = (*w)->WaitForLine("prehoc-worker ready", kStartTimeout);
  ASSERT_TRUE(ready.ok()) << ready.status();
  const std::string address = Field(*ready, "grpc");
  auto stub = v1::Inference::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(256);
  req.mutable_token_ids()->add_ids(7);
  req.set_max_tokens(60);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  ASSERT_TRUE(reader->Read(&m));
  int tokens = m.token_ids_size();
  (*w)->Signal(SIGTERM);
  ASSERT_TRUE((*w)->WaitForLine("draining", kStartTimeout).ok());
  bool finished = false;
  while (reader->Read(&m)) {
    tokens += m.token_ids_size();
    finished |= m.finished();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_TRUE(finished);
  EXPECT_EQ(tokens, 60);
  const int status = (*w)->Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

TEST(ProcessTest, ServeSubcommandServesTheSameApiAsTheCacheManager) {
  auto s = ChildProcess::Start({Bin("prehoc"), "serve", "--model=" + Fixture(),
                                "--model-name=tiny", "--listen=127.0.0.1:0",
                                "--metrics-listen=", "--threads=1", "--kv-cache-mb=16",
                                "--log-level=info"});
  ASSERT_TRUE(s.ok());
  auto ready = (*s)->WaitForLine("prehoc serve ready", kStartTimeout);
  ASSERT_TRUE(ready.ok()) << ready.status();
  const int port = std::stoi(Field(*ready, "grpc_port"));
  const auto reqs = References(8, 10);
  const auto expected = Embedded(reqs);
  const auto got = RunConcurrently(port, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(got[i].status.ok()) << i << ": " << got[i].status.error_message()
                                    << "\nprehoc serve output:\n" << (*s)->DrainOutput();
    EXPECT_EQ(got[i].tokens, expected[i]);
    EXPECT_EQ(got[i].served_by, "embedded");
  }
  (*s)->Signal(SIGTERM);
  const int status = (*s)->Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

}  // namespace
}  // namespace prehoc
