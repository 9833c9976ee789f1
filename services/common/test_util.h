// Helpers for service tests (linked only into tests): raw HTTP GET for /metrics, the server
// reflection service listing through a generic stub (Debian ships no reflection client), and
// health checks.
#ifndef PREHOC_SERVICES_COMMON_TEST_UTIL_H_
#define PREHOC_SERVICES_COMMON_TEST_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include <functional>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace prehoc::testing {

// GET http://127.0.0.1:port/path; returns the body. UNAVAILABLE on connection errors.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);

// Service names listed by grpc.reflection.v1alpha.ServerReflection.
absl::StatusOr<std::vector<std::string>> ListServicesByReflection(
    const std::shared_ptr<grpc::Channel>& channel);

// grpc.health.v1.Health/Check of `service`.
absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& service);

// A grpc.health.v1 Watch of `service` on `channel`, open from construction to destruction.
class HealthWatch {
 public:
  HealthWatch(const std::shared_ptr<grpc::Channel>& channel, const std::string& service);
  ~HealthWatch();
  // Reads status updates until one is `want` (true) or the stream ends (false).
  bool Await(grpc::health::v1::HealthCheckResponse::ServingStatus want);

 private:
  std::unique_ptr<grpc::health::v1::Health::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<grpc::health::v1::HealthCheckResponse>> reader_;
};

// A SchedulerOptions::before_step hook that blocks the step thread at its `block_at`-th call
// until Open(). Thread-safe.
class StepGate {
 public:
  explicit StepGate(int block_at) : block_at_(block_at) {}
  std::function<void()> Hook();
  // Blocks until the step thread is held (or `deadline`); true when it is.
  bool WaitReached(absl::Time deadline = absl::InfiniteFuture());
  void Open();

 private:
  absl::Mutex mu_;
  const int block_at_;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  bool reached_ ABSL_GUARDED_BY(mu_) = false;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace prehoc::testing

#endif  // PREHOC_SERVICES_COMMON_TEST_UTIL_H_
