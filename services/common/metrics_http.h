// A minimal HTTP/1.1 server for Prometheus scrapes: GET /metrics answers the registry in the
// text exposition format (prometheus-cpp's TextSerializer); any other path is 404, any other
// method 405. One connection at a time on one thread (scrapes are rare and small), each closed
// after its response; a client that sends nothing for 5 s is dropped.
//
// Why not prometheus-cpp's civetweb Exposer: civetweb (Debian 1.15) starts its threads with a
// fixed ~100 KB stack, and glibc carves the static TLS of every loaded library out of each
// thread's stack. With the CUDA backend linked, cuBLASLt alone brings 94 KB of static TLS, so
// civetweb's pthread_create fails with EINVAL and the Exposer throws "null context when
// constructing CivetServer" — every metrics port failed in CUDA builds. This server's thread
// has the default stack.
//
// Thread-safety: Start/Stop from one owner thread; the registry is collected on the server's
// thread (prometheus::Registry::Collect is thread-safe).
#ifndef PREHOC_SERVICES_COMMON_METRICS_HTTP_H_
#define PREHOC_SERVICES_COMMON_METRICS_HTTP_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace prehoc {

class MetricsHttpServer {
 public:
  // Listens on `address` ("host:port", "[v6host]:port" or ":port" = all interfaces; port 0 =
  // any free port) and serves `registry`. INVALID_ARGUMENT for a malformed address;
  // UNAVAILABLE naming the address and the OS error when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry);
  ~MetricsHttpServer();  // Stop()
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }
  // Closes the listening socket and joins the thread (an in-flight response is finished
  // first). Idempotent.
  void Stop();
  // Responses sent (any status), for tests and logs.
  int64_t requests_served() const { return served_.load(); }

 private:
  MetricsHttpServer(int listen_fd, int wake_fd, int port,
                    std::shared_ptr<prometheus::Registry> registry);
  void Run();
  void Serve(int fd);

  const int listen_fd_;
  const int wake_fd_;  // eventfd: Stop() writes it to end Run()'s poll
  const int port_;
  const std::shared_ptr<prometheus::Registry> registry_;
  std::atomic<int64_t> served_{0};
  std::thread thread_;
  bool stopped_ = false;  // owner thread only
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_METRICS_HTTP_H_
