// A real Prometheus (Debian's `prometheus` package) scrapes a live prehoc-cachemgr and
// prehoc-worker: the test writes a scrape config for their /metrics ports, starts Prometheus on
// a free port, sends one Generate request through the cache manager and queries Prometheus'
// HTTP API until the prehoc series with the expected values appear (bounded polling with a
// deadline). Skipped when no prometheus binary is found ($PREHOC_PROMETHEUS or PATH). ctest
// label `prometheus`.
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prehoc/v1/inference.grpc.pb.h"
#include "services/common/test_util.h"
#include "tests/services/child_process.h"

namespace prehoc {
namespace {

using testing::ChildProcess;
using testing::Field;
namespace fs = std::filesystem;

const absl::Duration kStartTimeout = absl::Seconds(60);

std::string Bin(const std::string& name) { return (fs::path(PREHOC_BIN_DIR) / name).string(); }

// $PREHOC_PROMETHEUS, else `prometheus` on PATH; "" when neither exists.
std::string FindPrometheus() {
  if (const char* env = std::getenv("PREHOC_PROMETHEUS"); env != nullptr && *env != '\0') {
    return fs::exists(env) ? env : "";
  }
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "", ':', absl::SkipEmpty())) {
    const fs::path p = fs::path(std::string(dir)) / "prometheus";
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return "";
}

// A port nothing listens on right now (bound and released; Prometheus binds it next).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(addr.sin_port);
}

std::string UrlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (isalnum(c) || c == '_' || c == '-' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out += absl::StrCat("%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return out;
}

// The value of the first sample of an instant query, or nullopt while Prometheus has none.
std::optional<double> Query(int port, const std::string& promql) {
  absl::StatusOr<std::string> body =
      testing::HttpGet(port, "/api/v1/query?query=" + UrlEncode(promql));
  if (!body.ok()) return std::nullopt;
  nlohmann::json j = nlohmann::json::parse(*body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || j.value("status", "") != "success") return std::nullopt;
  const nlohmann::json& result = j["data"]["result"];
  if (!result.is_array() || result.empty()) return std::nullopt;
  return std::stod(result[0]["value"][1].get<std::string>());
}

// Polls `promql` until its value satisfies `ok` or `deadline` passes; returns the last value.
std::optional<double> PollUntil(int port, const std::string& promql,
                                const std::function<bool(double)>& ok, absl::Time deadline) {
  std::optional<double> v;
  while (true) {
    v = Query(port, promql);
    if ((v.has_value() && ok(*v)) || absl::Now() >= deadline) return v;
    absl::SleepFor(absl::Milliseconds(100));  // polling interval, not synchronisation
  }
}

TEST(PrometheusScrapeTest, PrometheusScrapesWorkerAndCacheManagerMetrics) {
  const std::string prometheus = FindPrometheus();
  if (prometheus.empty()) {
    GTEST_SKIP() << "no prometheus binary (set PREHOC_PROMETHEUS or install Debian's "
                    "`prometheus` package: scripts/install_deps.sh)";
  }
  auto cm = ChildProcess::Start({Bin("prehoc-cachemgr"), "--listen=127.0.0.1:0",
                                 "--metrics-listen=127.0.0.1:0", "--heartbeat-interval-ms=200",
                                 "--drain-timeout-s=0"});
  ASSERT_TRUE(cm.ok()) << cm.status();
  auto cm_ready = (*cm)->WaitForLine("prehoc-cachemgr ready", kStartTimeout);
  ASSERT_TRUE(cm_ready.ok()) << cm_ready.status();
  const int cm_port = std::stoi(Field(*cm_ready, "grpc_port"));
  const int cm_metrics = std::stoi(Field(*cm_ready, "metrics_port"));
  const std::string model = (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
  auto worker = ChildProcess::Start(
      {Bin("prehoc-worker"), "--model=" + model, "--model-name=tiny", "--listen=127.0.0.1:0",
       "--metrics-listen=127.0.0.1:0", "--threads=1", "--kv-cache-mb=16",
       absl::StrCat("--cachemgr=127.0.0.1:", cm_port), "--drain-timeout-s=0"});
  ASSERT_TRUE(worker.ok()) << worker.status();
  auto w_ready = (*worker)->WaitForLine("prehoc-worker ready", kStartTimeout);
  ASSERT_TRUE(w_ready.ok()) << w_ready.status();
  const int w_metrics = std::stoi(Field(*w_ready, "metrics_port"));
  ASSERT_TRUE((*worker)->WaitForLine("registered with cache manager", kStartTimeout).ok());

  const fs::path dir = fs::path(::testing::TempDir()) / absl::StrCat("prehoc_prom_", getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream cfg(dir / "prometheus.yml");
    cfg << "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n"
        << "scrape_configs:\n  - job_name: prehoc\n    static_configs:\n"
        << "      - targets: ['127.0.0.1:" << w_metrics << "', '127.0.0.1:" << cm_metrics
        << "']\n";
  }
  const int prom_port = FreePort();
  ASSERT_GT(prom_port, 0);
  auto prom = ChildProcess::Start(
      {prometheus, "--config.file=" + (dir / "prometheus.yml").string(),
       "--storage.tsdb.path=" + (dir / "data").string(),
       absl::StrCat("--web.listen-address=127.0.0.1:", prom_port)});
  ASSERT_TRUE(prom.ok()) << prom.status();
  auto prom_ready = (*prom)->WaitForLine("Server is ready to receive web requests", kStartTimeout);
  ASSERT_TRUE(prom_ready.ok()) << prom_ready.status() << "\n" << (*prom)->DrainOutput();

  // One request through the cache manager.
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", cm_port),
                                                         grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(256);
  req.mutable_token_ids()->add_ids(7);
  req.set_max_tokens(6);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse m;
  int tokens = 0;
  while (reader->Read(&m)) tokens += m.token_ids_size();
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 6);

  // Prometheus' first scrape follows its target discovery (about 5 s after start).
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  auto positive = [](double v) { return v > 0; };
  auto at_least_one = [](double v) { return v >= 1; };
  std::optional<double> up = PollUntil(prom_port, "sum(up{job=\"prehoc\"})",
                                       [](double v) { return v == 2; }, deadline);
  EXPECT_EQ(up, 2.0) << "both targets up";
  EXPECT_TRUE(PollUntil(prom_port, "prehoc_kv_cache_pages_total{model=\"tiny\"}", positive,
                        deadline)
                  .has_value());
  EXPECT_TRUE(PollUntil(prom_port, "prehoc_cachemgr_kv_pages_total", positive, deadline)
                  .has_value());
  EXPECT_EQ(PollUntil(prom_port,
                      "sum(prehoc_requests_total{model=\"tiny\",outcome=\"ok\"})",
                      at_least_one, deadline),
            1.0);
  EXPECT_EQ(PollUntil(prom_port,
                      "sum(prehoc_cachemgr_requests_total{model=\"tiny\",outcome=\"ok\"})",
                      at_least_one, deadline),
            1.0);
  EXPECT_EQ(PollUntil(prom_port, "sum(prehoc_generation_tokens_total{model=\"tiny\"})",
                      [](double v) { return v >= 6; }, deadline),
            6.0);
  if (::testing::Test::HasFailure()) {
    std::cerr << "--- prometheus output:\n" << (*prom)->DrainOutput();
  }
  prom->reset();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace prehoc
