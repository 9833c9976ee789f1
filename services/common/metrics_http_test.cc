#include "services/common/metrics_http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/counter.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  return fd;
}

// Sends `request` and reads until the server closes the connection.
std::string Exchange(int port, const std::string& request) {
  const int fd = Connect(port);
  EXPECT_EQ(send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

class MetricsHttpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    registry_ = std::make_shared<prometheus::Registry>();
    auto& family = prometheus::BuildCounter().Name("prehoc_test_total").Help("test").Register(*registry_);
    counter_ = &family.Add({{"model", "m"}});
    auto s = MetricsHttpServer::Start("127.0.0.1:0", registry_);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    ASSERT_GT(server_->port(), 0);
  }
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Counter* counter_ = nullptr;
  std::unique_ptr<MetricsHttpServer> server_;
};

TEST_F(MetricsHttpTest, ServesTheRegistryInTextFormatWithCurrentValues) {
  counter_->Increment(3);
  std::string r = Exchange(server_->port(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(r, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(r, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(r, HasSubstr("prehoc_test_total{model=\"m\"} 3"));
  const size_t body = r.find("\r\n\r\n") + 4;
  EXPECT_THAT(r, HasSubstr(absl::StrCat("Content-Length: ", r.size() - body, "\r\n")));
  counter_->Increment();
  EXPECT_THAT(Exchange(server_->port(), "GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
              HasSubstr("prehoc_test_total{model=\"m\"} 4"));
  EXPECT_EQ(server_->requests_served(), 2);
}

TEST_F(MetricsHttpTest, OtherPathsMethodsAndGarbageGetErrorsAndTheServerStaysUp) {
  EXPECT_THAT(Exchange(server_->port(), "GET / HTTP/1.1\r\n\r\n"), StartsWith("HTTP/1.1 404 "));
  EXPECT_THAT(Exchange(server_->port(), "POST /metrics HTTP/1.1\r\n\r\n"),
              StartsWith("HTTP/1.1 405 "));
  EXPECT_THAT(Exchange(server_->port(), "garbage\r\n\r\n"), StartsWith("HTTP/1.1 400 "));
  const std::string head = Exchange(server_->port(), "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_THAT(head, StartsWith("HTTP/1.1 200 OK"));
  EXPECT_THAT(head, ::testing::EndsWith("\r\n\r\n"));  // no body
  EXPECT_THAT(Exchange(server_->port(), "GET /metrics HTTP/1.1\r\n\r\n"), StartsWith("HTTP/1.1 200"));
}

TEST_F(MetricsHttpTest, StopReturnsWhileAClientIsConnectedAndSilent) {
  const int fd = Connect(server_->port());  // never sends a request
  server_->Stop();                          // must not wait for the 5 s read timeout
  EXPECT_EQ(server_->requests_served(), 0);
  close(fd);
  server_->Stop();  // idempotent
}

TEST(MetricsHttpStartTest, BadAndBusyAddressesAreErrorsNamingTheAddress) {
  auto registry = std::make_shared<prometheus::Registry>();
  for (const char* bad : {"nohostport", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:999999"}) {
    auto s = MetricsHttpServer::Start(bad, registry);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad << " " << s.status();
  }
  auto first = MetricsHttpServer::Start("127.0.0.1:0", registry);
  ASSERT_TRUE(first.ok());
  const std::string busy = absl::StrCat("127.0.0.1:", (*first)->port());
  auto second = MetricsHttpServer::Start(busy, registry);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr(busy));
}

}  // namespace
}  // namespace prehoc
